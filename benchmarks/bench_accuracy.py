"""Accuracy cost of weight-only quantization on real text: perplexity and next-token KL divergence, on CPU.

    PYTHONPATH=. python benchmarks/bench_accuracy.py                    # about 6 minutes on 2 idle cores
    PYTHONPATH=. python benchmarks/bench_accuracy.py --train-steps 0    # the random model only (1.5 minutes)

This benchmark reports two models of one small Baichuan2-style shape (NormHead, RoPE; by default 4 layers, hidden 256, 4 heads, FFN 768)
with the real Baichuan-7B vocabulary (64,000 pieces):
  random           randomly initialised, N(0, 0.02).
  briefly trained  the same initial weights after --train-steps steps of AdamW on the training part of the
                   text, by the project's training loop (baichuan/train/loop.py). Its next-token
                   distributions are peaked, as a real model's are, so its KL says far more than the random one's.

Each model's NormHead is folded into a plain Linear (`checkpoint.fold_norm_head`, as inference does) and this fp32
model is the reference. Variants, each built from a deep copy of it: bf16 (every weight rounded to bf16), int8
(every linear, per output channel), int8 with lm_head kept in float (as the original `quantize(8)` does), int4
group 128 with lm_head int8 (`quantize_model`'s default), int4 group 32, and int4 group 128 with lm_head int4 too.
FFN 768 keeps every in_features a multiple of both group sizes and every out_features a multiple of 16, as the CPU
int4 kernel needs.

The tables evaluate every variant with fp32 activations, so that only its stored weights differ from the
reference: bf16 weights are widened back to fp32 and each quantized linear becomes an fp32 Linear holding its
dequantized weight. That isolates the cost of the weights, gives the same numbers on every machine, and runs at
fp32 speed (bf16 arithmetic is emulated on CPUs without AVX-512 BF16). What the quantized modules' own forward
adds on this machine (the CPU kernels baichuan/quant picks: ours from baichuan/cpu_gemv.py where they build, else
torch's, each with the activation dtype it computes in) is measured on the first --kernel-windows windows and
printed under each table.

Metrics, over every predicted position of fixed-length held-out windows: perplexity exp(mean NLL of the next
token), its increase over fp32, mean KL(p_fp32 || p_variant) in nats, and how often the argmax agrees with fp32's.

Data: every .txt file of --corpus (Project Gutenberg texts cut to the book between the licence header and
footer), plus the chinese_poetry JSON files as one source whose poems are taken from each file in turn. From each
source a slice of --chars-per-source characters starting 10% into the text (past title pages and the ebook-site
notes at the top of the novels) is tokenized; the last windows of each slice are held out, the rest is training
text, so the two never overlap.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from baichuan.checkpoint import fold_norm_head
from baichuan.config import Config
from baichuan.model import Baichuan
from baichuan.quant.swap import QUANTIZED_TYPES, quantize_model
from baichuan.tokenizer import Tokenizer
from baichuan.train.data import json_strings
from baichuan.train.loop import TrainConfig
from baichuan.train.loop import train as train_loop

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=DATA / "pretrain_corpus")
    p.add_argument("--tokenizer", type=Path, default=DATA / "baichuan-7b-tokenizer" / "tokenizer.model")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training and held-out window")
    p.add_argument("--eval-tokens", type=int, default=16_384, help="held-out tokens (whole windows)")
    p.add_argument("--eval-batch", type=int, default=4, help="held-out windows per trunk forward")
    p.add_argument(
        "--kernel-windows", type=int, default=4, help="held-out windows run through the quantized modules"
    )
    p.add_argument("--chars-per-source", type=int, default=120_000, help="text taken from each source")
    p.add_argument("--train-steps", type=int, default=80, help="0: the random model only")
    p.add_argument("--batch-size", type=int, default=4, help="training windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args()


# --- data ---------------------------------------------------------------------------------------------------


def read_sources(corpus: Path) -> dict[str, str]:
    """name -> text: each .txt file, and all .json files as one source interleaving their records."""
    sources = {}
    for path in sorted(corpus.rglob("*.txt")):
        text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
        start, end = text.find("*** START OF"), text.find("*** END OF")
        if 0 <= start < end:  # a Project Gutenberg book: drop the licence header and footer
            text = text[text.index("\n", start) + 1 : end]
        sources[str(path.relative_to(corpus))] = text
    files = sorted(corpus.rglob("*.json"))
    records = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        records.append(["\n".join(json_strings(r)) for r in (data if isinstance(data, list) else [data])])
    # One record from each file in turn, so that any slice of the source mixes the collections.
    if files:
        mixed = (r for group in itertools.zip_longest(*records) for r in group if r)
        name = f"{files[0].parent.parent.relative_to(corpus)}/*.json ({len(files)} files)"
        sources[name] = "\n\n".join(mixed)
    return sources


def tokenize(
    tokenizer: Tokenizer, sources: dict[str, str], chars: int, n_windows: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training stream (N,), held-out windows (n_windows, seq_len)): the held-out windows are the last tokens
    of each source's slice, spread evenly over the sources; the training stream is everything before them, the
    sources joined by EOS."""
    train, heldout = [], []
    for i, (name, text) in enumerate(sources.items()):
        start = len(text) // 10
        ids = tokenizer.encode(text[start : start + chars])
        k = n_windows // len(sources) + (i < n_windows % len(sources))
        cut = len(ids) - k * seq_len
        if cut < seq_len:
            sys.exit(
                f"{name}: {len(ids)} tokens are too few for {k} held-out windows; raise --chars-per-source"
            )
        train += [*ids[:cut], tokenizer.eos_id]
        heldout += [ids[cut + j * seq_len : cut + (j + 1) * seq_len] for j in range(k)]
    return torch.tensor(train), torch.tensor(heldout)


# --- models -------------------------------------------------------------------------------------------------


class RandomWindows:
    """Batches of random windows of the token stream, drawn from `generator` in step order (the loop's data)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
        self.stream, self.seq_len, self.global_batch, self.generator = stream, seq_len, batch_size, generator

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        offsets = torch.randint(
            0, len(self.stream) - self.seq_len, (self.global_batch,), generator=self.generator
        )
        return [torch.stack([self.stream[o : o + self.seq_len] for o in offsets.tolist()])]  # (B, T)

    def state_dict(self) -> dict:
        return {}


def train(
    model: Baichuan, stream: torch.Tensor, args: argparse.Namespace, generator: torch.Generator
) -> list[float]:
    """A short run of the project's training loop (baichuan.train.loop: AdamW 0.9/0.95, weight decay 0.1 on
    matrices, warm-up then cosine decay to 10%, clipping at 1.0; fp32) on random windows; the losses."""
    config = TrainConfig(
        max_steps=args.train_steps,
        lr=args.lr,
        warmup_steps=max(1, args.train_steps // 10),
        precision="fp32",
        log_every=20,
        progress=False,
        tensorboard=False,
        plot=False,
        measure_peak=False,
        save=False,
    )
    batches = RandomWindows(stream, args.seq_len, args.batch_size, generator)
    with tempfile.TemporaryDirectory() as out:
        result = train_loop(model, batches, config, out, say=lambda line: print(f"  {line}", flush=True))
    return result.losses


def quantized(
    bits: int, group_size: int = 128, overrides: dict | None = None, int8_groups: dict | None = None
) -> Callable[[nn.Module], nn.Module]:
    def build(reference: nn.Module) -> nn.Module:
        model = copy.deepcopy(reference)
        quantize_model(model, bits, group_size, overrides=overrides, int8_groups=int8_groups)
        return model

    return build


# key -> (table label, builder of the variant as stored, from the folded fp32 reference)
VARIANTS: dict[str, tuple[str, Callable[[nn.Module], nn.Module]]] = {
    "bf16": ("bf16 weights", lambda reference: copy.deepcopy(reference).to(torch.bfloat16)),
    "int8": ("int8, lm_head int8 g32 (default)", quantized(8)),
    # As the original quantize(8) (Baichuan-13B's QLinear, Baichuan2's bnb path): lm_head left in float.
    "int8-headf": ("int8, lm_head float (as the original)", quantized(8, overrides={"lm_head": None})),
    "int8-head-row": ("int8, lm_head one scale a row", quantized(8, int8_groups={})),
    "int4": ("int4 g128, lm_head int8 (default)", quantized(4)),
    "int4-g32": ("int4 g32, lm_head int8", quantized(4, 32)),
    "int4-head4": ("int4 g128, lm_head int4", quantized(4, overrides={})),
}


def as_fp32(model: nn.Module) -> nn.Module:
    """The same weights in plain fp32 modules, in place: each quantized linear becomes an nn.Linear holding its
    dequantized weight, and bf16 tensors go back to fp32."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANTIZED_TYPES):
            bias = module.bias is not None
            linear = nn.Linear(module.in_features, module.out_features, bias=bias, device="meta")
            linear.weight = nn.Parameter(module.dequantize(torch.float32), requires_grad=False)
            if bias:
                linear.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model.float()


def weight_mb(model: nn.Module) -> tuple[float, float]:
    """(MB of the linear layers, MB of the whole state dict), in the portable format a checkpoint stores."""

    def nbytes(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    linears = sum(nbytes(m) for m in model.modules() if isinstance(m, (nn.Linear, *QUANTIZED_TYPES)))
    return linears / 1e6, nbytes(model) / 1e6


def log_softmax_(logits: torch.Tensor, probs: torch.Tensor) -> None:
    """In place: logits become log-probabilities and probs receives the probabilities."""
    logits.sub_(logits.amax(-1, keepdim=True))
    total = torch.exp(logits, out=probs).sum(-1, keepdim=True)
    probs.div_(total)
    logits.sub_(total.log_())


def head_into(model: Baichuan, hidden: torch.Tensor, out: torch.Tensor) -> None:
    """out = model.lm_head(hidden), with no new (rows, vocab) tensor where the head is a plain fp32 Linear."""
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.bias is None and head.weight.dtype == out.dtype:
        torch.mm(hidden, head.weight.t(), out=out)
    else:
        out.copy_(head(hidden))


@torch.inference_mode()
def evaluate(
    models: dict[str, Baichuan], windows: torch.Tensor, batch: int, head_rows: int = 128
) -> tuple[dict[str, dict[str, float]], float]:
    """Per model: perplexity, mean KL(p_ref || p_model) in nats and top-1 agreement with the first model, the
    reference, over every predicted position of the windows; and the mean entropy of the reference's
    next-token distributions.

    Baichuan.forward is lm_head(model(ids)). Here the trunk runs on `batch` whole windows and the head on
    `head_rows` positions at a time, into (head_rows, vocab) buffers allocated once: fresh tensors of this size
    cost a page fault every 4 KiB, which took most of the time. Each KL term is the difference of two fp32
    log-probabilities weighted by p_ref, so no two large sums cancel (fp64 gives the same to within 0.1%)."""
    names, ref = list(models), next(iter(models))
    nll, kl, agree = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    entropy = 0.0
    ref_logp, ref_p, logp, scratch = (torch.empty(head_rows, models[ref].config.vocab_size) for _ in range(4))
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        targets = ids[:, 1:].reshape(-1, 1)
        hidden = {name: m.model(ids)[:, :-1].reshape(len(targets), -1) for name, m in models.items()}
        for j in range(0, len(targets), head_rows):
            n = min(head_rows, len(targets) - j)
            target = targets[j : j + n]
            head_into(models[ref], hidden[ref][j : j + n], ref_logp[:n])
            log_softmax_(ref_logp[:n], ref_p[:n])
            ref_top = ref_logp[:n].argmax(-1)
            entropy -= torch.dot(ref_p[:n].view(-1), ref_logp[:n].view(-1)).item()
            nll[ref] -= ref_logp[:n].gather(-1, target).sum().item()
            agree[ref] += n
            for name in names[1:]:
                head_into(models[name], hidden[name][j : j + n], logp[:n])
                log_softmax_(logp[:n], scratch[:n])
                nll[name] -= logp[:n].gather(-1, target).sum().item()
                agree[name] += (logp[:n].argmax(-1) == ref_top).sum().item()
                torch.sub(ref_logp[:n], logp[:n], out=scratch[:n])
                kl[name] += torch.dot(ref_p[:n].view(-1), scratch[:n].view(-1)).item()
    count = windows.shape[0] * (windows.shape[1] - 1)
    results = {
        name: {"ppl": math.exp(nll[name] / count), "kl": kl[name] / count, "top1": agree[name] / count}
        for name in names
    }
    return results, entropy / count


def report(title: str, reference: Baichuan, windows: torch.Tensor, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    models, sizes, own = {"fp32": reference}, {"fp32": weight_mb(reference)}, {}
    for key in args.variants.split(","):
        stored = VARIANTS[key][1](reference)
        sizes[key] = weight_mb(stored)
        models[key] = as_fp32(copy.deepcopy(stored))
        if any(isinstance(m, QUANTIZED_TYPES) for m in stored.modules()):
            own[key] = stored
    results, entropy = evaluate(models, windows, args.eval_batch)
    ref_ppl = results["fp32"]["ppl"]
    print(f"\n### {title}\n")
    print(
        f"fp32 next-token distributions: mean entropy {entropy:.2f} nats (uniform: "
        f"{math.log(reference.config.vocab_size):.2f})\n"
    )
    print(
        "| variant | linears MB | model MB | perplexity | PPL increase | mean KL (nats) | top-1 agreement |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, r in results.items():
        label = "fp32 (reference)" if key == "fp32" else VARIANTS[key][0]
        linears, total = sizes[key]
        print(
            f"| {label} | {linears:.1f} | {total:.1f} | {r['ppl']:.2f} | {100 * (r['ppl'] / ref_ppl - 1):+.2f}% | "
            f"{r['kl']:.2e} | {100 * r['top1']:.2f}% |"
        )

    subset = windows[: args.kernel_windows]
    if own and len(subset):
        check, _ = evaluate(
            {"fp32": reference}
            | {key: models[key] for key in own}
            | {f"{key} own": m for key, m in own.items()},
            subset,
            args.eval_batch,
        )
        print(
            f"\nThe quantized modules' own forward on this machine vs the fp32 evaluation above, on the first "
            f"{len(subset)} windows ({subset.shape[0] * (subset.shape[1] - 1):,} positions):\n"
        )
        print("| variant | mean KL, fp32 evaluation | mean KL, own forward | top-1 agreement, own forward |")
        print("|---|---|---|---|")
        for key in own:
            mine = check[f"{key} own"]
            print(
                f"| {VARIANTS[key][0]} | {check[key]['kl']:.2e} | {mine['kl']:.2e} | {100 * mine['top1']:.2f}% |"
            )
    print(
        f"\n(fp32 and {len(models) - 1} variants evaluated in {time.perf_counter() - start:.0f}s)", flush=True
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    if not args.corpus.is_dir():
        sys.exit(f"corpus directory {args.corpus} not found (see ../shared/data/README.md); pass --corpus")
    if not args.tokenizer.is_file():
        sys.exit(f"tokenizer {args.tokenizer} not found; pass --tokenizer")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    tokenizer = Tokenizer(args.tokenizer)
    sources = read_sources(args.corpus)
    if not sources:
        sys.exit(f"no .txt or .json files under {args.corpus}")
    windows_count = max(1, args.eval_tokens // args.seq_len)
    stream, windows = tokenize(tokenizer, sources, args.chars_per_source, windows_count, args.seq_len)
    config = Config(
        vocab_size=tokenizer.vocab_size,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        position="rope",
        norm_head=True,
        max_seq_len=args.seq_len,
    )
    print(
        f"model: Baichuan2-style (NormHead, RoPE), {args.layers} layers, hidden {args.dim}, {args.heads} heads, "
        f"FFN {args.ffn}, vocab {config.vocab_size:,} ({args.tokenizer.parent.name}); "
        f"{config.num_params() / 1e6:.1f} M params; seed {args.seed}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"data: {len(sources)} sources of {args.corpus} ({', '.join(sources)}), up to "
        f"{args.chars_per_source:,} characters each: {len(stream):,} training tokens; {windows.numel():,} held-out "
        f"tokens in {len(windows)} windows of {args.seq_len} ({len(windows) * (args.seq_len - 1):,} predicted "
        f"positions); read and tokenized in {time.perf_counter() - start:.1f}s"
    )
    print(
        "models: `random` is randomly initialised (N(0, 0.02)); "
        f"`briefly trained` is the same model after {args.train_steps} AdamW steps of {args.batch_size}x"
        f"{args.seq_len} tokens by the project's training loop (baichuan/train/loop.py)."
    )

    model = Baichuan(config)
    model.init_weights(generator=generator)
    random_model = fold_norm_head(copy.deepcopy(model).eval())
    report("random (randomly initialised, N(0, 0.02))", random_model, windows, args)
    del random_model

    if args.train_steps:
        print(f"\ntraining (baichuan.train.loop, lr {args.lr:g}):", flush=True)
        losses = train(model, stream, args, generator)
        tail = losses[-10:]
        print(
            f"final training loss {losses[-1]:.3f} (mean of the last {len(tail)} steps {sum(tail) / len(tail):.3f}; "
            f"ln(vocab) = {math.log(config.vocab_size):.2f})"
        )
        trained = fold_norm_head(model.eval())
        report(f"briefly trained ({args.train_steps} steps, baichuan.train.loop)", trained, windows, args)
    print(
        "\nPPL increase is relative to the fp32 row; KL is KL(p_fp32 || p_variant) per predicted position; "
        "top-1 agreement is how often the variant's argmax equals fp32's. The main tables compute every variant "
        "in fp32 from its stored weights (see --help); the sizes are those of the variant as stored."
    )


if __name__ == "__main__":
    main()
