"""llama.cpp runs our GGUF exports as our model computes: logits and greedy tokens, per variant and tensor type.

    pip install llama-cpp-python          # builds llama.cpp from source: ~45+ minutes on 2 busy cores
    python benchmarks/check_gguf_llamacpp.py                      # 4 variants x f32,f16,bf16,q8_0,q4_0
    python benchmarks/check_gguf_llamacpp.py --types f32 --new-tokens 8   # a quick look

This is not a CI test because llama-cpp-python has no wheel for Linux on PyPI: building it took far longer
than CI's budget. tests/convert/ checks the files themselves with the `gguf` reader.

Each variant is a random fp32 checkpoint of a shape llama.cpp gives the model's own position encoding (RoPE
needs 32 layers, ALiBi 40; ALiBi with 12 heads, not a power of two), with and without NormHead, and `baichuan
init`'s 4,000-piece tokenizer. For each --types entry the checkpoint is exported with `baichuan.convert.gguf`,
llama.cpp evaluates a prompt and then decodes greedily (--new-tokens), and at every step its last-row logits
are compared with ours. "Ours" is our model on the weights the GGUF holds (imported back with
`import_gguf`, so quantized types are compared on their own dequantized weights: the difference left is
llama.cpp's arithmetic, e.g. its Q8 activations for quantized matrices and F16 products); the last column
also gives the difference to the original fp32 model. Greedy agreement: our greedy tokens (our own decode from
the same prompt) against llama.cpp's. The prompt's ids are llama.cpp's own tokenization of the text, which is
compared with ours too.

The tolerance is on max |logit difference| / max |logit|: TOLERANCE below per type (llama.cpp runs with an F32 KV
cache here; its matrix products for F16/BF16/Q8_0/Q4_0 weights quantize or round the activations, hence the
looser bounds). Greedy tokens pass when they are all equal, or when the first step where they split was a
near-tie: our top-2 margin there at most twice the logit difference measured on that step (random tiny models
have many). Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "bf16": 3e-2, "q8_0": 3e-2, "q4_0": 5e-2}
PROMPT = "The quick brown fox jumps over the lazy dog. 天下大事，分久必合，合久必分。"


def last_logits(llm, vocab_size: int):
    """The context's last logits row (llama-cpp-python keeps no scores without logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab_size,)).copy()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--variants", default="rope,alibi,rope-normhead,alibi-normhead")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoints and GGUFs here")
    args = parser.parse_args()

    import numpy as np
    import torch
    from llama_cpp import Llama

    from baichuan.checkpoint import load_model
    from baichuan.config import ALIBI, ROPE, Config
    from baichuan.convert.gguf import export_gguf, import_gguf
    from baichuan.scaffold import init_checkpoint, tokenizer_model
    from baichuan.tokenizer import Tokenizer

    shapes = {
        ROPE: dict(n_layers=32, dim=64, n_heads=4, ffn_dim=128),
        ALIBI: dict(n_layers=40, dim=96, n_heads=12, ffn_dim=128),
    }
    root = args.dir or Path(tempfile.mkdtemp(prefix="gguf-check-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = root / "tokenizer.model"
    if not tokenizer_path.is_file():
        tokenizer_path.write_bytes(tokenizer_model(4000))
    tokenizer = Tokenizer(tokenizer_path)
    ours_ids = tokenizer.encode(PROMPT)

    def greedy(model, prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt) :]

    print(
        "| variant | type | tokenization | max abs diff (rel.) | tolerance | greedy equal | vs fp32 original |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for seed, variant in enumerate(args.variants.split(",")):
        position, norm_head = variant.split("-")[0], variant.endswith("normhead")
        config = Config(
            vocab_size=4096, position=position, norm_head=norm_head, max_seq_len=256, **shapes[position]
        )
        directory = root / variant
        if not (directory / "config.json").is_file():
            init_checkpoint(config, directory, dtype=torch.float32, seed=seed, tokenizer=tokenizer_path)
        original = load_model(directory, dtype=torch.float32)
        for type in args.types.split(","):
            path = export_gguf(directory, root / f"{variant}.{type}.gguf", type)
            reference = load_model(
                import_gguf(path, root / f"{variant}.{type}", dtype=torch.float32), torch.float32
            )
            llm = Llama(
                model_path=str(path),
                n_ctx=256,
                n_batch=256,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                type_k=0,  # GGML_TYPE_F32: llama.cpp's default F16 KV cache would add its own rounding
                type_v=0,
                verbose=False,
            )
            prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
            same_tokens = "equal" if prompt == ours_ids else f"DIFFERS ({len(prompt)} vs {len(ours_ids)} ids)"

            llm.reset()
            llm.eval(prompt)
            rows, theirs = [last_logits(llm, config.vocab_size)], []
            for _ in range(args.new_tokens):
                theirs.append(int(rows[-1].argmax()))
                llm.eval([theirs[-1]])
                rows.append(last_logits(llm, config.vocab_size))
            sequence = torch.tensor([prompt + theirs])
            with torch.no_grad():
                ours_rows = reference(sequence)[0, len(prompt) - 1 :].numpy()
                original_rows = original(sequence)[0, len(prompt) - 1 :].numpy()
            llama_rows = np.stack(rows)
            diff = float(np.abs(llama_rows - ours_rows).max())
            relative = diff / float(np.abs(ours_rows).max())
            to_original = float(np.abs(llama_rows - original_rows).max())
            ours_greedy = greedy(reference, prompt, args.new_tokens)
            agree = sum(a == b for a, b in zip(ours_greedy, theirs, strict=True))
            split = next(
                (i for i, (a, b) in enumerate(zip(ours_greedy, theirs, strict=True)) if a != b), None
            )
            greedy_note = ""
            if split is not None:
                # Where the two first choose differently, was it a near-tie? Our top-2 margin on that step (same
                # prefix for both) against the logit difference measured there.
                top2 = np.sort(ours_rows[split])[-2:]
                margin, step_diff = (
                    float(top2[1] - top2[0]),
                    float(np.abs(llama_rows[split] - ours_rows[split]).max()),
                )
                tie = margin <= 2 * step_diff
                greedy_note = f" (first split at step {split}: top-2 margin {margin:.1e}, step diff {step_diff:.1e}{', a near-tie' if tie else ''})"
            ok = relative <= TOLERANCE[type] and (split is None or tie)
            failed |= not ok
            print(
                f"| {variant} | {type} | {same_tokens} | {diff:.2e} ({relative:.1e}) | {TOLERANCE[type]:.0e} | "
                f"{agree}/{args.new_tokens}{greedy_note}{'' if ok else ' FAIL'} | {to_original:.2e} |",
                flush=True,
            )
            del llm
    print(f"\nfiles in {root}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
