"""Per-kernel rates of the decode products: our kernels (`cpu_gemv`, each build this CPU runs) against torch's,
on the layer shapes of the 1.29B benchmark model, for 1 and 8 activation rows, as weights and bytes per second
against a streamed read of memory measured in the same run.

    python benchmarks/bench_kernels.py                                      # every kernel, every build, 1 and 8 rows
    python benchmarks/bench_kernels.py --dtypes int8 --targets avx2 --shapes 1536x1536 --pool-mb 64 --runs 3

Each product reads its weight from memory, as in a decode step (the model's weights are many times the caches):
every case cycles through enough copies of its weight to fill `--pool-mb` (past the last-level cache), and a
timed pass calls the kernel once on every copy. Passes of the implementations of one case are interleaved (A, B,
A, B, ...) and each rate is the median over `--runs` passes, so a machine busy with other work slows all of them
alike. The roofline is the median rate of `torch.sum` over an fp32 buffer of `--pool-mb`, timed between the
cases. Activations are bf16, as the model sends them where bf16 is native; on a CPU that emulates bf16 the model
sends fp32 (`--activations fp32`).

Bytes read per product: the weight plus its scales (int8: fp32 per row; int4: bf16 scale and zero per group).
"G w/s" is 10^9 weights per second (N·K / time), whatever the rows; "rows x" is the rows per second at 8 rows over
those at 1 row of the same implementation (8 for a kernel that reads its weight once and is never short of
arithmetic).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from baichuan import cpu, cpu_gemv
from baichuan.quant.int4 import pack_int4
from baichuan.quant.kernels import has_int4_cpu_kernel, tile_int4_cpu

# (out_features, in_features) of the 1.29B benchmark model (32 layers x 1536, FFN 4096, vocabulary 125,696):
# o_proj, W_pack, gate_proj/up_proj, down_proj, lm_head.
SHAPES = ("1536x1536", "4608x1536", "4096x1536", "1536x4096", "125696x1536")
DTYPES = ("bf16", "int8", "int4")


def weights_of(dtype: str, n: int, k: int, group_size: int, generator: torch.Generator) -> dict:
    """One random weight in the layouts the kernels read: ours and torch's."""
    if dtype == "bf16":
        w = torch.randn(n, k, generator=generator).bfloat16()
        return {"w": w, "bytes": w.numel() * 2}
    if dtype == "int8":
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        scales = torch.rand(n, generator=generator) / 127
        return {"w": w, "scales": scales, "bytes": w.numel() + scales.numel() * 4}
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    sz = (torch.rand(k // group_size, n, 2, generator=generator) / 8).bfloat16()
    return {"w": pack_int4(codes), "codes": codes, "sz": sz, "bytes": n * k // 2 + sz.numel() * 2}


def implementations(dtype: str, weight: dict, targets: list[str], group_size: int) -> dict[str, Callable]:
    """name -> f(x, copy) for each implementation of this dtype; `copy` is one entry of the weight's pool."""
    impls: dict[str, Callable] = {}
    for isa in targets:
        module = cpu_gemv.load_target(isa)
        if module is None:
            continue
        if dtype == "bf16":
            impls[f"ours {isa}"] = lambda x, c, m=module: m.bf16_gemv(x, c["w"])
        elif dtype == "int8":
            impls[f"ours {isa}"] = lambda x, c, m=module: m.int8_gemv(x, c["w"], c["scales"])
        else:
            impls[f"ours {isa}"] = lambda x, c, m=module: m.int4_gemv(x, c["w"], c["sz"], group_size)
    if dtype == "bf16":
        impls["torch F.linear"] = lambda x, c: F.linear(x.bfloat16(), c["w"])
    elif dtype == "int8" and hasattr(torch, "_weight_int8pack_mm"):
        impls["torch _weight_int8pack_mm"] = lambda x, c: torch._weight_int8pack_mm(
            x.bfloat16(), c["w"], c["scales_bf16"]
        )
    elif dtype == "int4" and has_int4_cpu_kernel() and weight["w"].shape[0] % 16 == 0:
        impls["torch _weight_int4pack_mm_for_cpu"] = lambda x, c: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), c["tiled"], group_size, c["sz"]
        )
    return impls


def pool_of(weight: dict, impl_names: list[str], pool_bytes: int) -> list[dict]:
    """Copies of the weight (and of what torch's kernels read) filling pool_bytes, at least two."""
    copies = max(2, -(-pool_bytes // weight["bytes"]))
    extra = {}
    if any("int8pack" in name for name in impl_names):
        extra["scales_bf16"] = weight["scales"].bfloat16()
    if any("int4pack" in name for name in impl_names):
        extra["tiled"] = tile_int4_cpu(weight["codes"])
    first = {key: value for key, value in weight.items() if key not in ("codes", "bytes")} | extra
    return [first] + [{key: value.clone() for key, value in first.items()} for _ in range(copies - 1)]


def pass_seconds(fn: Callable, x: torch.Tensor, pool: list[dict]) -> float:
    """Seconds per product over one pass through the pool."""
    start = time.perf_counter()
    for copy in pool:
        fn(x, copy)
    return (time.perf_counter() - start) / len(pool)


def stream_gbps(buffer: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * buffer.element_size() / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help="NxK (out x in) products, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="weight formats: bf16,int8,int4")
    parser.add_argument("--rows", default="1,8", help="activation rows, comma-separated")
    parser.add_argument(
        "--targets", default=None, help="builds of our kernels (default: every one this CPU runs)"
    )
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (the model's default)")
    parser.add_argument("--activations", choices=("bf16", "fp32"), default="bf16", help="activation dtype")
    parser.add_argument(
        "--pool-mb", type=int, default=768, help="weight copies per case, and the roofline buffer"
    )
    parser.add_argument("--runs", type=int, default=7, help="timed passes per implementation (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    supported = cpu.kernel_targets()
    targets = supported if args.targets is None else [t for t in args.targets.split(",") if t in supported]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    act_dtype = torch.bfloat16 if args.activations == "bf16" else torch.float32
    pool_bytes = args.pool_mb << 20
    generator = torch.Generator().manual_seed(0)

    stream_buffer = torch.ones(pool_bytes // 4)
    stream_buffer.sum()  # fault the pages in
    roofs = [stream_gbps(stream_buffer, args.runs)]
    print(
        f"threads {torch.get_num_threads()}, builds {', '.join(targets) or 'none'}, activations {args.activations}"
    )

    results = []  # (dtype, shape, rows, impl, seconds, bytes)
    for dtype in args.dtypes.split(","):
        for n, k in shapes:
            weight = weights_of(dtype, n, k, args.group_size, generator)
            impls = implementations(dtype, weight, targets, args.group_size)
            pool = pool_of(weight, list(impls), pool_bytes)
            for m in rows:
                x = torch.randn(m, k, generator=generator).to(act_dtype)
                times = {name: [] for name in impls}
                for fn in impls.values():  # warm up: builds, pages, thread pool
                    pass_seconds(fn, x, pool[:2])
                for _ in range(args.runs):
                    for name, fn in impls.items():
                        times[name].append(pass_seconds(fn, x, pool))
                for name, ts in times.items():
                    results.append((dtype, f"{n}x{k}", m, name, statistics.median(ts), weight["bytes"]))
            del pool
            roofs.append(stream_gbps(stream_buffer, max(3, args.runs // 2)))

    roof = statistics.median(roofs)
    print(
        f"roofline (torch.sum over {args.pool_mb} MiB fp32, median of {len(roofs)} checks): {roof:.1f} GB/s\n"
    )
    by_one_row = {(d, s, name): t for d, s, m, name, t, _ in results if m == 1}
    print("| weights | N x K | rows | implementation | µs | G w/s | GB/s | of roofline | rows x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, shape, m, name, seconds, nbytes in results:
        n, k = (int(v) for v in shape.split("x"))
        one = by_one_row.get((dtype, shape, name))
        gain = f"{m * one / seconds:.2f}" if one and m > 1 else ""
        print(
            f"| {dtype} | {shape} | {m} | {name} | {seconds * 1e6:.0f} | {n * k / seconds / 1e9:.2f} | "
            f"{nbytes / seconds / 1e9:.1f} | {nbytes / seconds / 1e9 / roof:.0%} | {gain} |"
        )


if __name__ == "__main__":
    main()
