"""Decode speed and weight size of bf16, int8 and int4 weight-only models, in one run, on CPU.

Builds a Baichuan2-shaped model with random weights (by default the shape of ../shared/ANCHORS.md: 32 layers,
hidden 1536, 12 heads, FFN 4096, vocab 125,696; 1.29 B parameters), quantizes copies of it, and measures batch-1
greedy decode with a KVCache. Also measures the hardware mat-vec bandwidth (fp32 `x @ W.T` over a large W) and
reports the roofline tok/s of each variant: bandwidth / bytes of weights read per token (all but the embedding).

    PYTHONPATH=. python benchmarks/bench_quantize.py                # the ANCHORS shape
    PYTHONPATH=. python benchmarks/bench_quantize.py --layers 8     # smaller and faster
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from baichuan.checkpoint import fold_norm_head
from baichuan.config import Config
from baichuan.kv_cache import KVCache
from baichuan.model import Baichuan
from baichuan.quantize import quantize_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=125_696)
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens, prefilled before timing")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per run")
    p.add_argument(
        "--repeats", type=int, default=5, help="decode runs per variant (median and best reported)"
    )
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--variants", default="bf16,int8,int4", help="comma-separated subset of bf16,int8,int4")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--roofline-mib", type=int, default=1024, help="size of the fp32 matrix for the bandwidth test"
    )
    return p.parse_args()


def random_model(config: Config) -> Baichuan:
    with torch.device("meta"):
        model = Baichuan(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # never materialise an fp32 copy
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return fold_norm_head(model.eval())


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(all weights, weights read per decoded token): a decode step reads one embedding row, so skip it."""
    total = read = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        nbytes = t.numel() * t.element_size()
        total += nbytes
        if not name.startswith("model.embed_tokens"):
            read += nbytes
    return total, read


def decode_run(model: Baichuan, prompt: int, tokens: int) -> float:
    """tok/s of one greedy decode of `tokens` steps after a `prompt`-token prefill (not timed)."""
    cache = KVCache.for_model(model.config, 1, prompt + tokens + 1, torch.bfloat16)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids, 0, cache, last_only=True)
        idx, pos = logits[:, -1].argmax(-1, keepdim=True), prompt
        start = time.perf_counter()
        for _ in range(tokens):
            logits = model(idx, pos, cache, last_only=True)
            idx, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    return tokens / (time.perf_counter() - start)


def matvec_bandwidth(mib: int, repeats: int = 10) -> float:
    """GB/s of fp32 x @ W.T with W of `mib` MiB: about what streaming the weights can reach on this machine."""
    k = 4096
    w = torch.randn(mib * 2**20 // (4 * k), k)
    x = torch.randn(1, k)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        x @ w.t()
        times.append(time.perf_counter() - start)
    return w.numel() * 4 / min(times[2:]) / 1e9  # the best run, as for decode


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        position="rope",
        norm_head=True,
        max_seq_len=args.prompt + args.tokens + 1,
    )
    print(
        f"model: {args.layers} layers, hidden {args.dim}, {args.heads} heads, FFN {args.ffn}, vocab {args.vocab} "
        f"({config.num_params() / 1e9:.3f} B params); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    start = time.perf_counter()
    base = random_model(config)
    print(f"built bf16 model in {time.perf_counter() - start:.1f}s")
    bandwidth = matvec_bandwidth(args.roofline_mib)
    print(f"mat-vec bandwidth (fp32, {args.roofline_mib} MiB): {bandwidth:.1f} GB/s")

    models, setup = {}, {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        if variant == "bf16":
            models[variant] = base
        else:
            models[variant] = copy.deepcopy(base)
            quantize_model(models[variant], {"int8": 8, "int4": 4}[variant], args.group_size)
        setup[variant] = time.perf_counter() - start
        print(f"  {variant}: ready in {setup[variant]:.1f}s", flush=True)

    # Round robin, after one warm-up each, so that load from other processes hits every variant alike.
    rates: dict[str, list[float]] = {variant: [] for variant in models}
    for repeat in range(args.repeats + 1):
        for variant, model in models.items():
            rate = decode_run(model, args.prompt, args.tokens)
            if repeat:
                rates[variant].append(rate)
    rows = [(v, *weight_bytes(m), statistics.median(rates[v]), max(rates[v])) for v, m in models.items()]
    for variant in models:
        print(f"  {variant}: " + ", ".join(f"{r:.2f}" for r in rates[variant]) + " tok/s")

    # On a shared machine the best run is the one least disturbed by other processes (timeit's reasoning).
    bf16 = next((row for row in rows if row[0] == "bf16"), None)
    print()
    print(
        "| variant | weights GB | read/token GB | decode tok/s median | best | best vs bf16 | bytes vs bf16 | "
        "roofline tok/s | best % of roofline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, total, read, median, best in rows:
        roofline = bandwidth * 1e9 / read
        speed = f"{best / bf16[4]:.2f}x" if bf16 else "-"
        size = f"{read / bf16[2]:.2f}" if bf16 else "-"
        print(
            f"| {variant} | {total / 1e9:.2f} | {read / 1e9:.2f} | {median:.2f} | {best:.2f} | {speed} | {size} | "
            f"{roofline:.1f} | {100 * best / roofline:.0f}% |"
        )
    print(
        f"\nint4 = group-wise int4 (group {args.group_size}) for the decoder linears, lm_head int8 "
        "(quantize_model's default); int8 = every linear per-channel int8."
    )


if __name__ == "__main__":
    main()
