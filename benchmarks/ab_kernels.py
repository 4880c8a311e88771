"""A/B of variants of our CPU kernel source, timed interleaved in one process.

Tuning a kernel (a prefetch distance, a tile shape) moves decode speed by a few percent, less than this kind of
machine drifts between two runs of `bench_kernels.py`. Here each variant is a directory holding its own copies of
the files of `baichuan/csrc/` it changes (say `cpu_gemv_int4.cpp`, or `gemv.h`); the package's files fill in the
rest, so an empty directory is the package as it is. Every variant is built for one target under its own extension
name, checked to agree with the first (to 2% of the output's norm), then timed in alternating rounds over the same
pool of weights (on transparent huge pages where the system offers them, as our loads place the weights;
--small-pages for torch's allocator), so a drift of the machine slows all of them alike:

    mkdir -p /tmp/ab/base /tmp/ab/try
    cp baichuan/csrc/cpu_gemv_int4.cpp /tmp/ab/try/   # edit try/; base stays empty: the package's sources
    python benchmarks/ab_kernels.py /tmp/ab/base /tmp/ab/try --dtype int4 --target avx2 --rows 1

Each line gives the median time per call of each variant and its ratio to the first (below 1: faster). Run it
alone: the variants share the machine only with each other.

Every variant reads one activation row as the package would on this CPU (`cpu.single_stream`); --stream-on and
--stream-off set that for the variants they name, so one source can be timed both ways (two directories holding
the same copy, one of them named by --stream-off):

    python benchmarks/ab_kernels.py /tmp/on /tmp/off --stream-on /tmp/on --stream-off /tmp/off --dtype bf16

--amx times the AMX kernels a batch goes to on a CPU with AMX (the avx512bf16 target) in place of the mat-vecs:

    python benchmarks/ab_kernels.py /tmp/ab/base /tmp/ab/try --dtype bf16 --target avx512bf16 --amx --rows 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baichuan.cpu import has_amx, kernel_targets, single_stream  # noqa: E402
from baichuan.cpu_gemv import CSRC, SOURCES, TARGET_FLAGS  # noqa: E402
from baichuan.hugepages import HugePageArena, huge_pages_available  # noqa: E402

SHAPES = ("1536x1536", "4608x1536", "4096x1536", "1536x4096", "125696x1536")  # the 1.29B benchmark model's


def build(directory: Path, target: str, streamed: bool | None = None):
    from torch.utils import cpp_extension

    if not directory.is_dir():
        raise SystemExit(f"{directory} is not a directory")
    unknown = sorted(p.name for p in directory.iterdir() if p.is_file() and not (CSRC / p.name).is_file())
    if unknown:
        raise SystemExit(f"{directory}: {', '.join(unknown)} not among the files of {CSRC}")
    # the package's csrc/ with the variant's files laid over it, so each source includes the variant's headers
    with tempfile.TemporaryDirectory(prefix=f"ab-{directory.name}-") as scratch:
        tree = Path(scratch)
        for file in CSRC.iterdir():
            if file.is_file():
                shutil.copy(
                    directory / file.name if (directory / file.name).is_file() else file, tree / file.name
                )
        module = cpp_extension.load(
            name=f"baichuan_ab_{directory.name}_{target}",
            sources=[str(tree / source.name) for source in SOURCES],
            extra_cflags=["-O3", *TARGET_FLAGS[target], "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    # as the package sets it unless told (copies of the source older than the setter lack it)
    if hasattr(module, "set_single_stream"):
        module.set_single_stream(single_stream(target) if streamed is None else streamed)
    elif streamed is not None:
        raise SystemExit(f"{directory}: its sources have no single stream to set (set_single_stream)")
    return module


def weights(
    dtype: str,
    N: int,
    K: int,
    group_size: int,
    int8_group: int | None,
    generator: torch.Generator,
    arena: HugePageArena | None,
):
    """One copy of a layer's tensors, on huge pages with an `arena` (as our loads place them): int8 weights with
    a scale a row, or with bf16 scales per `int8_group` columns (as an 8-bit model's head)."""
    if dtype == "int4":
        packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=generator)
        tensors = (packed, torch.randn(K // group_size, N, 2, generator=generator).bfloat16())
    elif dtype == "int8":
        tensors = (
            torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=generator),
            torch.rand(N, generator=generator)
            if int8_group is None
            else torch.rand(N, K // int8_group, generator=generator).bfloat16(),
        )
    else:
        tensors = (torch.randn(N, K, generator=generator).bfloat16(),)
    return tensors if arena is None else tuple(arena.place(t) for t in tensors)


def product(
    module, dtype: str, x: torch.Tensor, w: tuple, group_size: int, amx: bool = False
) -> torch.Tensor:
    """The decode mat-vec of this weight format, or with `amx` the AMX kernel the package gives batches of it."""
    if amx:
        if dtype == "int4":
            return module.amx_int4_matmul(x, *w, group_size)
        if dtype == "int8":
            return module.amx_int8_int16_matmul(x, *w)
        return module.amx_bf16_matmul(x, *w)
    if dtype == "int4":
        return module.int4_gemv(x, *w, group_size)
    if dtype == "int8":
        return module.int8_gemv(x, *w)
    return module.bf16_gemv(x, *w)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "variants", nargs="+", type=Path, help="directories, each with the csrc/ files it changes"
    )
    parser.add_argument("--dtype", choices=("bf16", "int8", "int4"), default="int4", help="weight format")
    parser.add_argument("--target", choices=sorted(TARGET_FLAGS), default="avx2", help="build target")
    parser.add_argument("--rows", type=int, default=1, help="activation rows")
    parser.add_argument(
        "--amx",
        action="store_true",
        help="time the AMX kernels batches take (amx_bf16_matmul, amx_int8_int16_matmul, amx_int4_matmul; the "
        "avx512bf16 target on a CPU with AMX) in place of the mat-vecs",
    )
    parser.add_argument("--shapes", default=",".join(SHAPES), help="NxK products, comma-separated")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument(
        "--int8-groups",
        type=int,
        default=None,
        help="int8: bf16 scales per this many columns (default: one a row)",
    )
    parser.add_argument("--pool-mb", type=int, default=768, help="weight copies per shape (past the caches)")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timed rounds (median)")
    parser.add_argument(
        "--small-pages",
        action="store_true",
        help="weights in torch's allocator (4 KiB pages), not on transparent huge pages as our loads put them",
    )
    parser.add_argument(
        "--stream-on",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="this variant reads one activation row's weights one row at a time, unprefetched (repeatable)",
    )
    parser.add_argument(
        "--stream-off",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="this variant keeps the four-row tiles prefetched ahead at one activation row (repeatable)",
    )
    args = parser.parse_args()
    if len(args.variants) < 2:
        parser.error("give at least two variant directories")
    if args.target not in kernel_targets():
        parser.error(
            f"this CPU cannot run the {args.target} build (it runs: {', '.join(kernel_targets()) or 'none'})"
        )

    streamed: dict[Path, bool] = {}
    for directories, setting in ((args.stream_on, True), (args.stream_off, False)):
        for directory in directories:
            if directory not in args.variants:
                parser.error(f"{directory} is not one of the variants")
            if streamed.setdefault(directory, setting) != setting:
                parser.error(f"{directory} is named by both --stream-on and --stream-off")
    if args.amx and (args.target != "avx512bf16" or not has_amx()):
        parser.error("--amx needs the avx512bf16 target on a CPU with AMX")
    modules = [build(directory, args.target, streamed.get(directory)) for directory in args.variants]
    generator = torch.Generator().manual_seed(0)
    arena = None if args.small_pages or not huge_pages_available() else HugePageArena()
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        one = weights(args.dtype, N, K, args.group_size, args.int8_groups, generator, arena)
        copies = max(1, (args.pool_mb << 20) // sum(t.numel() * t.element_size() for t in one))
        pool = [one] + [
            weights(args.dtype, N, K, args.group_size, args.int8_groups, generator, arena)
            for _ in range(copies - 1)
        ]
        x = torch.randn(args.rows, K, generator=generator).bfloat16()
        expected = product(modules[0], args.dtype, x, one, args.group_size, args.amx).float()
        for directory, module in zip(args.variants[1:], modules[1:], strict=True):
            got = product(module, args.dtype, x, one, args.group_size, args.amx).float()
            # Relative to the whole output, not per value: a variant that rounds activations differently (int8
            # against int16 codes) moves each output by ~1% of the output's scale, not of its own size.
            error = ((got - expected).norm() / expected.norm()).item()
            if not error < 2e-2:
                raise SystemExit(
                    f"{directory} disagrees with {args.variants[0]} on {shape}: relative error {error:.1e}"
                )
        seconds: list[list[float]] = [[] for _ in modules]
        for _ in range(args.rounds):
            for i, module in enumerate(modules):
                start = time.perf_counter()
                for w in pool:
                    product(module, args.dtype, x, w, args.group_size, args.amx)
                seconds[i].append((time.perf_counter() - start) / len(pool))
        medians = [statistics.median(s) * 1e6 for s in seconds]
        timings = "  ".join(f"{d.name} {m:.0f} µs" for d, m in zip(args.variants, medians, strict=True))
        ratios = " ".join(f"{m / medians[0]:.3f}" for m in medians[1:])
        pages = "4 KiB pages" if arena is None else "huge pages"
        kernel = "AMX" if args.amx else "mat-vec"
        print(
            f"{args.dtype} {shape}, {args.rows} row(s), {args.target} {kernel}, {pages}: {timings}; ÷ first {ratios}",
            flush=True,
        )


if __name__ == "__main__":
    main()
