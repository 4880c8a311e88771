"""Where a decode step's time goes: the quantized (or float) linear layers against everything else.

    python benchmarks/profile_decode.py --dir /tmp/baichuan-bench-32x1536x12x4096x125696 --quantize 8
    python benchmarks/profile_decode.py --dir DIR --quantize 4 --dtype fp32
    python benchmarks/profile_decode.py --dir DIR --bf16-weights   # as `--dtype auto` runs bf16 where it is emulated

Loads a checkpoint (for example the one `bench_decode.py` made in its --dir) as `bench_decode.py` does and times
--tokens greedy decode steps as the model runs them (each layer one call of the fused kernel where it applies).
Then it times every linear layer's forward during the same steps (a timer on each layer's forward, which also
turns the fused path off, so the products run one by one through the same kernels), and prints per layer shape
the milliseconds a call and the weights streamed per second, then the products' share of a token and what is
left outside them. Those products ran unfused, so it also times the same products alone, one after another on a
random row (each layer's own forward, one pass over all of them), alternated with fused decode steps, one of each a
round: what the fused step spends outside its products, each round's step against its pass. It also counts the
PyTorch operations one decode step dispatches (a TorchDispatchMode).
--no-fused runs the modules' own forwards throughout (the path before the fused kernel).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from baichuan.checkpoint import fold_norm_head, load_model
from baichuan.generate import SamplingConfig, generate_tokens
from baichuan.quant.swap import QUANTIZED_TYPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True, help="checkpoint directory")
    parser.add_argument("--quantize", type=int, choices=(8, 4), default=None, help="weight-only int8/int4")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="activation dtype")
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--no-fused", action="store_true", help="the modules' forwards, not the fused layer")
    parser.add_argument(
        "--bf16-weights",
        action="store_true",
        help="fp32 activations over the checkpoint's bf16 linear weights (what --dtype auto runs where bf16 is "
        "emulated; load_model(bf16_weights=True))",
    )
    args = parser.parse_args()
    if args.bf16_weights and (args.quantize or args.dtype != "fp32"):
        parser.error(
            "--bf16-weights is a float model with fp32 activations: leave out --quantize and --dtype bf16"
        )

    model = fold_norm_head(
        load_model(args.dir, dtype=DTYPES[args.dtype], quantize=args.quantize, bf16_weights=args.bf16_weights)
    )
    model.model.fused_decode = not args.no_fused
    prompt = list(range(100, 116))
    seconds: dict[tuple[int, int], float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    recording = False  # only the forwards after the first new token: decode steps, not the prompt

    def timed(module: nn.Module, forward):
        def run(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = forward(x)
            if recording:
                key = (module.out_features, module.in_features)
                seconds[key] += time.perf_counter() - start
                calls[key] += 1
            return y

        return run

    def decode(n: int) -> list[float]:
        nonlocal recording
        stamps = [time.perf_counter()]
        for _ in generate_tokens(model, prompt, SamplingConfig(max_new_tokens=n, eos_ids=())):
            stamps.append(time.perf_counter())
            recording = len(stamps) < n + 1  # the step after the last token is never taken
        recording = False
        return stamps

    decode(4)  # warm up (and build the CPU kernels if needed)
    steps = args.tokens
    stamps = decode(steps + 1)
    per_token = (stamps[-1] - stamps[1]) / steps

    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, *QUANTIZED_TYPES))]
    for module in linears:
        module.forward = timed(module, module.forward)
    decode(2)
    seconds.clear()
    calls.clear()
    stamps = decode(steps + 1)
    per_token_timed = (stamps[-1] - stamps[1]) / steps
    for module in linears:
        del module.forward
    path = "modules" if args.no_fused else "fused layers where they apply"
    print(
        f"{args.quantize or ('bf16' if args.bf16_weights else args.dtype)} weights, {args.dtype} activations "
        f"({path}): {1 / per_token:.2f} tok/s"
    )
    print(f"with a timer on every linear layer (modules' forwards): {1 / per_token_timed:.2f} tok/s")
    print("| layer (out x in) | calls a token | ms a call | G weights/s |")
    print("|---|---|---|---|")
    for (out_features, in_features), total in sorted(seconds.items()):
        n = calls[(out_features, in_features)]
        a_call = total / n
        print(
            f"| {out_features}x{in_features} | {n / steps:.0f} | {a_call * 1e3:.3f} | "
            f"{out_features * in_features / a_call / 1e9:.1f} |"
        )
    layers = sum(seconds.values()) / steps
    print(
        f"linear layers {layers * 1e3:.1f} ms of {per_token * 1e3:.1f} ms a token "
        f"({1 - layers / per_token:.1%} outside the products)"
    )

    # The products alone (each layer's forward on a random row, in the model's order) alternated with fused decode
    # steps, a pass and a step a round: this VM's speed drifts by tens of percent within minutes, and a drift then
    # slows both alike (measured one after the other, an int4 step's share outside them swung from 8.7% to 16.2%).
    rows = {m: torch.randn(1, 1, m.in_features).to(DTYPES[args.dtype]) for m in linears}

    def products_alone() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for module in linears:
                module(rows[module])
        return time.perf_counter() - start

    rounds = []
    steps_left = generate_tokens(model, prompt, SamplingConfig(max_new_tokens=steps + 3, eos_ids=()))
    next(steps_left)  # the prompt
    next(steps_left)  # a first decode step, untimed
    for _ in range(steps):
        start = time.perf_counter()
        next(steps_left)
        rounds.append((time.perf_counter() - start, products_alone()))
    steps_left.close()
    step = statistics.median(step for step, _ in rounds)
    alone = statistics.median(alone for _, alone in rounds)
    outside = sorted(1 - alone / step for step, alone in rounds)
    print(
        f"the same products alone, alternated with fused steps ({steps} rounds): {alone * 1e3:.1f} ms a pass "
        f"against {step * 1e3:.1f} ms a step (medians); outside the products {statistics.median(outside):.1%} "
        f"of a step (median of the rounds; quartiles {outside[len(outside) // 4]:.1%} to "
        f"{outside[(3 * len(outside)) // 4]:.1%})"
    )

    steps_left = generate_tokens(model, prompt, SamplingConfig(max_new_tokens=3, eos_ids=()))
    next(steps_left)
    counter = OpCounter()
    with counter:
        next(steps_left)
    steps_left.close()
    print(f"PyTorch operations dispatched by one decode step: {counter.count:,}")


if __name__ == "__main__":
    main()
