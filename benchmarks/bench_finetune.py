"""Fine-tuning speed and memory: full, LoRA and LoRA over an int4 base through `baichuan finetune`'s library,
and the same steps through the HF Trainer + peft on the same model and data (as LLaMA-Factory runs it). Run it
alone: it measures the whole machine.

    PYTHONPATH=. python benchmarks/bench_finetune.py                       # ~100M model, 20 steps each
    PYTHONPATH=. python benchmarks/bench_finetune.py --size tiny --steps 3 # smoke run

Each method runs in its own process, so its peak memory is its own: on CPU the peak resident set of the process
(ru_maxrss; it includes the ~0.5 GB of the Python/torch runtime, ~0.2 GB more where peft and transformers are
imported, and the final save of the weights), on CUDA
`max_memory_allocated`. The LoRA/full ratios are also given above the runtime: the peak less the resident set
once Python and torch are imported (what CUDA's figure leaves out by itself). Every example is at least --seq-len tokens long (shorter ones are dropped), so every
row of every batch is full and both stacks compute the same number of tokens a step: tokens/s = steps x batch x
seq-len / the time of the steps after the first --warmup. Both stacks use the same precision (bf16 autocast
where the hardware computes bf16 natively, else fp32), AdamW, LoRA r/alpha/dropout and target (W_pack).

A row is METHOD or METHOD:gc / METHOD:nogc (gradient checkpointing forced on or off). Plain METHOD runs our
defaults (checkpointing on for LoRA, off for full; a LoRA run's frozen base stored in the autocast dtype), and
an HF row takes the checkpointing of our matching row, so each speed is compared like with like. Every row
prints its settings. The goal of issue 12: LoRA peak memory <= 0.5x full, with the defaults; the ratios with
the same checkpointing for both are printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SFT = ROOT.parent / "shared" / "data" / "baichuan2_sft" / "belle_chat_ramdon_10k.first1000.json"
SIZES = {  # Baichuan2-shaped (NormHead), the vocabulary of `baichuan init`'s tokenizer (4,000 pieces)
    "tiny": dict(n_layers=2, dim=64, n_heads=4, ffn_dim=128),
    "100m": dict(n_layers=12, dim=768, n_heads=12, ffn_dim=2048),  # ~91M parameters
}
METHODS = ("full", "full:gc", "lora", "lora:nogc", "lora-int4", "hf-full", "hf-lora", "hf-lora:nogc")


def checkpointing(spec: str) -> bool:
    """Whether a row recomputes activations: its suffix, else our default for its method."""
    from baichuan.train.finetune import FinetuneConfig

    method, _, suffix = spec.partition(":")
    if suffix:
        return suffix == "gc"
    return FinetuneConfig(lora="lora" in method).checkpointing()


def make_inputs(directory: Path, size: str, seq_len: int, n_records: int) -> tuple[Path, Path]:
    """A random checkpoint of the size and a data file of conversations at least seq_len tokens long."""
    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint, sample_text
    from baichuan.tokenizer import Tokenizer
    from baichuan.train.sft_data import encode_conversation, read_sft

    config = preset("baichuan2-7b").replace(vocab_size=4000, max_seq_len=max(seq_len, 512), **SIZES[size])
    base = init_checkpoint(config, directory / "base", dtype=torch.float32)
    tokenizer = Tokenizer(base / "tokenizer.model")
    if SFT.is_file():
        records = json.loads(SFT.read_text(encoding="utf-8"))
    else:  # without ../shared: generated text, long enough
        lines = sample_text(4 * n_records, seed=1)
        records = [
            {"conversations": [{"from": "human", "value": " ".join(lines[i : i + 2])},
                               {"from": "gpt", "value": " ".join(lines[i + 2 : i + 4] * 8)}]}
            for i in range(0, len(lines), 4)
        ]  # fmt: skip
    path = directory / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    long = [
        r
        for r, c in zip(records, read_sft(path).conversations, strict=False)
        if len(encode_conversation(tokenizer, c)[0]) >= seq_len
    ]
    if len(long) < 8:
        raise SystemExit(f"only {len(long)} records of at least {seq_len} tokens: lower --seq-len")
    path.write_text(json.dumps(long[:n_records], ensure_ascii=False), encoding="utf-8")
    return base, path


def peak_memory() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def runtime_memory() -> float:
    """What the process holds before fine-tuning starts (Python + torch imported), the same for every row; 0 on
    CUDA, where max_memory_allocated already leaves the runtime out."""
    if torch.cuda.is_available():
        return 0.0
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def run_ours(spec: str, base: Path, data: Path, args) -> dict:
    import csv

    from baichuan.train.finetune import FinetuneConfig, finetune

    method, _, suffix = spec.partition(":")
    out = Path(args.work) / spec.replace(":", "-")
    cfg = FinetuneConfig(
        model=str(base),
        data=str(data),
        output_dir=str(out),
        model_max_length=args.seq_len,
        batch_size=args.batch,
        max_steps=args.steps,
        lora=method != "full",
        quantize=4 if method == "lora-int4" else None,
        gradient_checkpointing=checkpointing(spec) if suffix else None,  # None: the default
        progress=False,
        tensorboard=False,
        plot=False,
        log_every=10**9,
        keep_last=1,
    )
    finetune(cfg, say=lambda _: None)
    with open(out / "loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timed = rows[args.warmup :]
    seconds = sum(args.batch * args.seq_len / float(r["tokens_per_s"]) for r in timed)
    return {"tokens_per_s": len(timed) * args.batch * args.seq_len / seconds, "loss": float(rows[-1]["loss"])}


def run_hf(spec: str, base: Path, data: Path, args) -> dict:
    """The HF Trainer + peft on our transformers face, the data tokenised by the original's preprocessing."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import baichuan  # noqa: F401  (registers the Auto classes)
    from baichuan.tokenizer import Tokenizer
    from baichuan.train.loop import resolve_precision
    from baichuan.train.sft_data import read_sft, tokenize_conversation

    method = spec.partition(":")[0]
    tokenizer = Tokenizer(base / "tokenizer.model")
    dataset = [tokenize_conversation(tokenizer, c, args.seq_len) for c in read_sft(data).conversations]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    # Set on the trunk: the same per-layer recompute as the Trainer's gradient_checkpointing=True, which our
    # face took only once its _set_gradient_checkpointing accepted transformers 5's every_n_layers.
    model.model.gradient_checkpointing = checkpointing(spec)
    if method == "hf-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["W_pack"])
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = resolve_precision("auto", device)[0] is torch.bfloat16
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times[-1] = time.perf_counter() - times[-1]

    training = TrainingArguments(
        output_dir=str(Path(args.work) / spec.replace(":", "-")),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=2e-4 if method == "hf-lora" else 2e-5,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-8,
        weight_decay=1e-4,
        max_grad_norm=1.0,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        save_strategy="no",
        report_to=[],
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[Clock()])
    result = trainer.train()
    timed = times[args.warmup :]
    return {"tokens_per_s": len(timed) * args.batch * args.seq_len / sum(timed), "loss": result.training_loss}


def worker(args) -> None:
    torch.manual_seed(0)
    runtime = runtime_memory()
    base, data = Path(args.base), Path(args.data)
    result = (run_hf if args.worker.startswith("hf-") else run_ours)(args.worker, base, data, args)
    result["peak_gib"] = peak_memory()
    result["runtime_gib"] = runtime
    from baichuan.train.loop import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision("auto", device)[0]
    settings = [f"GC {'on' if checkpointing(args.worker) else 'off'}", "bf16 autocast" if dtype else "fp32"]
    if args.worker in ("lora", "lora:nogc", "lora:gc") and dtype:
        settings.append("frozen base bf16")
    if not args.worker.partition(":")[2] and not args.worker.startswith("hf-"):
        settings.insert(0, "defaults")
    result["settings"] = ", ".join(settings)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.warmup = min(args.warmup, args.steps - 1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, data = make_inputs(work, args.size, args.seq_len, n_records=max(64, args.steps * args.batch))
        print(f"model {args.size}, batch {args.batch} x {args.seq_len} tokens, {args.steps} steps "
              f"({args.warmup} untimed); data {data.name} from {'the shared SFT sample' if SFT.is_file() else 'generated text'}")  # fmt: skip
        results = {}
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--worker", method, "--base", str(base), "--data", str(data),
                       "--work", str(work), "--size", args.size, "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(f"{method}: failed\n{done.stderr[-2000:]}")
                continue
            results[method] = json.loads(line[7:])
            r = results[method]
            print(
                f"{method:13} {r['tokens_per_s']:10,.0f} tok/s  peak {r['peak_gib']:6.2f} GiB"
                f" (runtime {r['runtime_gib']:.2f})  loss {r['loss']:.4f}"
                f"  ({r['settings']})"
            )
        for lora, full, what in (
            ("lora", "full", "defaults (the goal: <= 0.5)"),
            ("lora", "full:gc", "both with GC"),
            ("lora:nogc", "full", "both without GC"),
        ):
            if lora in results and full in results:
                a, b = results[lora], results[full]
                ratio = a["peak_gib"] / b["peak_gib"]
                above = (a["peak_gib"] - a["runtime_gib"]) / (b["peak_gib"] - b["runtime_gib"])
                print(
                    f"LoRA / full peak memory, {what}: {ratio:.2f} of the process, {above:.2f} above the "
                    f"torch runtime ({lora} / {full})"
                )
        for ours, theirs in (("full", "hf-full"), ("lora", "hf-lora"), ("lora:nogc", "hf-lora:nogc")):
            if ours in results and theirs in results:
                speed = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
                memory = results[ours]["peak_gib"] / results[theirs]["peak_gib"]
                print(
                    f"{ours} vs {theirs} (HF Trainer + peft): {speed:.2f}x tokens/s, {memory:.2f}x peak memory"
                )


if __name__ == "__main__":
    main()
