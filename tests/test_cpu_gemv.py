"""The CPU kernels of `baichuan.cpu_gemv` (int8, int4, bf16) against float64 products of the same weights, in
every build this CPU runs (avx2, avx512, avx512bf16), and how the build is chosen and what happens where it cannot
be built.

int8 activations are quantized to int16 per block (relative error ~1.5e-5 per value), so outputs agree with the
exact product to ~3e-5 (bound 1e-4). Every build quantizes int4 activations to int8 per group, as the prompt
kernel `int4_matmul_int8` does, and is checked against the float64 product of those quantized activations (bound
1e-5: fp32 rounding over up to 428 groups). bf16 sums exact products in fp32 (bound 1e-5); with AVX512-BF16, fp32
activations are first rounded to bf16, so there the reference takes them rounded. bf16 activations give bf16 outputs: the fp32 result rounded once, which the tests
check bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baichuan import cpu, cpu_gemv
from baichuan.quant.int4 import Int4Linear, unpack_int4
from tests.conftest import (
    int8_reference,
    kernel_build,
    random_bf16_linear,
    require_cpu_kernels,
    skip_platform,
)


@pytest.fixture(scope="module")
def kernels():
    require_cpu_kernels()
    return cpu_gemv


@pytest.fixture(scope="module", params=cpu.KERNEL_TARGETS)
def build(request):
    """The compiled module of one target, where this CPU runs it."""
    return kernel_build(request.param)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


# Every build's int4 kernel against the float64 product of its activations quantized to int8 per group
# (`int8_reference`): fp32 rounding over up to 428 groups.
INT4_BOUND = 1e-5


# Row counts around the kernel's tiles (1-4 weight rows, up to 4 activation rows) and chunks (64 rows); K not
# a multiple of the 256-value activation block (48, 13696 = 107 * 128).
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9])
@pytest.mark.parametrize("shape", [(67, 16), (64, 48), (130, 1536), (5, 13696)], ids=str)
def test_int8_matches_exact_product(kernels, shape, rows):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    exact = (x.double() @ weight.double().t()) * scales.double()
    assert rel(kernels.int8_gemv(x, weight, scales), exact) < 1e-4


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("shape", [(67, 64, 32), (64, 256, 128), (130, 1536, 256), (5, 13696, 32)], ids=str)
def test_int4_matches_exact_product(kernels, shape, rows):
    out_features, in_features, group_size = shape
    generator = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=generator)
        linear.weight[0, :group_size] += 0.5  # a group away from zero: the zero points matter
    module = Int4Linear.from_linear(linear, group_size)
    x = torch.randn(rows, in_features, generator=generator)
    got = kernels.int4_gemv(x, module.weight, module.scales_and_zeros, group_size)
    assert rel(got, int8_reference(x, module)) < INT4_BOUND
    # int8 activations: each off by up to half its group's step (1/254 of the group's largest), ~0.5-1% in all
    assert rel(got, x.double() @ module.dequantize().double().t()) < 2.5e-2
    assert torch.equal(unpack_int4(module.weight), module.codes())  # the kernel read the plain nibbles


def test_non_finite_activations_give_nan_not_numbers(kernels):
    x = torch.randn(3, 64)
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    y = kernels.int8_gemv(x, torch.ones(4, 64, dtype=torch.int8), torch.ones(4))
    assert y[:2].isnan().all() and y[2].isfinite().all()
    zeros = kernels.int8_gemv(torch.zeros(1, 32), torch.ones(3, 32, dtype=torch.int8), torch.ones(3))
    assert torch.equal(zeros, torch.zeros(1, 3))


def test_any_float_activations_and_leading_shape(kernels):
    weight = torch.randint(-128, 128, (8, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    exact = (x.double() @ weight.double().t()) * 0.5
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        y = kernels.int8_gemv(x.to(dtype), weight, torch.full((8,), 0.5))
        assert y.shape == (2, 3, 8) and y.dtype == dtype
        assert rel(y, exact) < tol
    transposed = x.transpose(0, 1)  # not contiguous
    assert rel(kernels.int8_gemv(transposed, weight, torch.full((8,), 0.5)), exact.transpose(0, 1)) < 1e-4


def test_bad_shapes_are_refused_with_a_message(kernels):
    compiled = kernels.load()
    weight = torch.zeros(4, 24, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        compiled.int8_gemv(torch.zeros(1, 24), weight, torch.ones(4))
    with pytest.raises(RuntimeError, match="columns"):
        compiled.int8_gemv(torch.zeros(1, 32), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4))
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        compiled.int8_gemv(
            torch.zeros(1, 16, dtype=torch.float16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
        )
    with pytest.raises(RuntimeError, match="bf16 \\(N, K\\)"):
        compiled.bf16_gemv(torch.zeros(1, 16), torch.zeros(4, 16))
    scales_and_zeros = torch.zeros(1, 4, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="group size"):
        compiled.int4_gemv(torch.zeros(1, 48), torch.zeros(4, 24, dtype=torch.uint8), scales_and_zeros, 48)


def test_switched_off_by_the_environment():
    code = "from baichuan import cpu_gemv; print(cpu_gemv.load(), cpu_gemv.int8_gemv(None, None, None))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, cpu_gemv.ENV_SWITCH: "0"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_gemv, "target", lambda: "avx2")
    monkeypatch.setattr(cpu_gemv, "_built", lambda *_: True)
    cpu_gemv.load.cache_clear()
    cpu_gemv.load_target.cache_clear()
    try:
        with pytest.warns(
            UserWarning, match="avx2 CPU kernels could not be built .*Ninja is required.*torch's"
        ):
            assert cpu_gemv.load() is None
        assert (
            cpu_gemv.int8_gemv(torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int8), torch.ones(1))
            is None
        )
    finally:
        cpu_gemv.load.cache_clear()
        cpu_gemv.load_target.cache_clear()


# --- every build: odd shapes, 1-17 rows, misaligned buffers ------------------------------------------------------

ROWS = range(1, 18)


def _misaligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A copy of t that starts `nbytes` past a 64-byte boundary."""
    buf = torch.empty(t.numel() * t.element_size() + 64 + nbytes, dtype=torch.uint8)
    start = (-buf.data_ptr()) % 64 + nbytes
    return buf[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)


def _check_rows(kernel, x: torch.Tensor, args: tuple, exact, tolerance: float) -> None:
    """kernel(x, *args) against exact(x) for fp32 x, and bf16 x: the fp32 result of the same bf16 values, rounded."""
    y = kernel(x, *args)
    assert y.dtype == torch.float32 and rel(y, exact(x)) < tolerance, (tuple(x.shape), rel(y, exact(x)))
    xb = x.bfloat16()
    yb = kernel(xb, *args)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, kernel(xb.float(), *args).bfloat16())


@pytest.mark.parametrize("shape", [(67, 16), (64, 48), (13, 208), (130, 1536), (5, 13696)], ids=str)
def test_int8_every_build(build, shape):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        w = _misaligned(weight, rows % 3)  # a weight row may start anywhere, as read from a file
        _check_rows(
            build.int8_gemv,
            x,
            (w, scales),
            lambda x: (x.double() @ weight.double().t()) * scales.double(),
            1e-4,
        )
    x = _misaligned(torch.randn(3, in_features, generator=generator), 4)
    assert (
        rel(build.int8_gemv(x, weight, scales), (x.double() @ weight.double().t()) * scales.double()) < 1e-4
    )


# Group scales (an output head's, as Q8_0): the activation block is the group, 16 (the AVX-512 tail of 16) to 256;
# at one row the avx2 build takes 8 groups at a time, compile-time for 32 and 64, with a tail of fewer.
@pytest.mark.parametrize(
    "shape", [(67, 64, 32), (9, 48, 16), (13, 208, 16), (130, 1536, 32), (11, 1024, 64), (5, 1536, 256)]
)
def test_int8_group_scales_every_build(build, shape):
    out_features, in_features, group_size = shape
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randint(-127, 128, shape[:2], dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, in_features // group_size, generator=generator).bfloat16()
    widened = weight.double() * scales.double().repeat_interleave(group_size, 1)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        _check_rows(build.int8_gemv, x, (weight, scales), lambda x: x.double() @ widened.t(), 1e-4)
    with pytest.raises(RuntimeError, match="group size must be a multiple of 16"):
        build.int8_gemv(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 4).bfloat16())
    with pytest.raises(RuntimeError, match="group scales: contiguous bf16"):
        build.int8_gemv(torch.randn(1, 64), torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2))


@pytest.mark.parametrize(
    "shape", [(67, 64, 32), (9, 192, 64), (16, 288, 96), (64, 256, 128), (130, 1536, 256), (5, 13696, 128)]
)
def test_int4_every_build(build, shape):
    out_features, in_features, group_size = shape
    generator = torch.Generator().manual_seed(in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=generator)
        linear.weight[0, :group_size] += 0.5  # a group away from zero: the zero points matter
    module = Int4Linear.from_linear(linear, group_size)
    packed = _misaligned(module.weight, 1)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        args = (packed, module.scales_and_zeros, group_size)
        _check_rows(build.int4_gemv, x, args, lambda x: int8_reference(x, module), INT4_BOUND)


@pytest.mark.parametrize("group_size", [96, 256])
def test_avx2_int4_sums_the_extremes_without_wrapping(group_size):
    """Codes 15 against activations +-127 over whole groups: a group of 256 adds 8 `vpmaddubsw` pair sums of 3810
    per s16 lane (30480, the most there can be), which must not wrap; rows of code 0 beside them. One to four
    activation rows (every tile shape); fp32 rounding of the scales only."""
    avx2 = kernel_build("avx2")
    n, k = 20, 576 if group_size == 96 else 512
    codes = torch.full((n, k), 15, dtype=torch.uint8)
    codes[1::2, group_size:] = 0
    layer = Int4Linear.from_quantized_tensors(
        codes,
        torch.full((n, k // group_size), 0.5),
        torch.zeros(n, k // group_size),
        group_size,
        packed=False,
    )
    exact = torch.ones(4, k).double() @ layer.dequantize().double().t()  # +-1 quantize to +-127 exactly
    for rows in range(1, 5):
        x = torch.ones(rows, k)
        x[1::2] = -1
        sign = torch.ones(rows, 1).double()
        sign[1::2] = -1
        y = avx2.int4_gemv(x, layer.weight, layer.scales_and_zeros, group_size)
        assert rel(y, exact[:rows] * sign) < 1e-6  # a wrapped s16 sum would be off by 65536 steps


@pytest.mark.parametrize("shape", [(1, 1), (7, 15), (67, 16), (33, 100), (64, 48), (130, 1536), (5, 13696)])
def test_bf16_every_build(build, shape):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(shape, generator=generator).bfloat16()
    w = _misaligned(weight, 2)
    rounds_x = build.target == "avx512bf16"  # vdpbf16ps takes bf16 activations

    def exact(x: torch.Tensor) -> torch.Tensor:
        return (x.bfloat16() if rounds_x else x).double() @ weight.double().t()

    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        _check_rows(build.bf16_gemv, x, (w,), exact, 1e-5)
        xb = _misaligned(x.bfloat16(), 2)
        assert torch.equal(build.bf16_gemv(xb, weight), build.bf16_gemv(x.bfloat16(), weight))


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8, 9, 12, 16, 17])
def test_a_batch_gives_each_row_what_it_gets_alone(build, rows):
    """Batched decoding: one pass over the weights serves up to 8 activation rows in register tiles whose shape
    depends on the row count (and more rows take more passes). Each row's sums run in the same order whatever
    the tile, so int8, int4 and vdpbf16ps give every row bit for bit its result alone (avx2's int8 from 5 rows
    takes 16 columns a step in order, up to 4 rows 32 in `quantize_activations`' split order: the same exact
    block sums); the widening bf16 kernels
    may pair even and odd halves differently (fp32 rounding only), as may avx2's int8 tile of one row with group
    scales (8 blocks at a time); from two rows on, group scales too give each row the same bits in every tile
    (the rows in the lanes of one accumulator with groups up to 64 columns: `run_quads`, and avx2's `run_lanes`
    at 3-4 rows and `run_pairs` from 5; tiles of one weight row past them). 130 outputs: whole tiles and a remainder."""
    generator = torch.Generator().manual_seed(rows)
    k = 1536
    x = torch.randn(rows, k, generator=generator).bfloat16()
    weight8 = torch.randint(-128, 128, (130, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(130, generator=generator)
    packed = torch.randint(0, 256, (130, k // 2), dtype=torch.uint8, generator=generator)
    scales_and_zeros = (torch.rand(k // 128, 130, 2, generator=generator) / 8).bfloat16()
    weight16 = torch.randn(130, k, generator=generator).bfloat16()
    group_scales = torch.rand(130, k // 32, generator=generator).bfloat16()
    group_scales128 = torch.rand(130, k // 128, generator=generator).bfloat16()
    products = {
        "int8": lambda x: build.int8_gemv(x, weight8, scales),
        "int8 groups of 32": lambda x: build.int8_gemv(x, weight8, group_scales),
        "int8 groups of 128": lambda x: build.int8_gemv(x, weight8, group_scales128),
        "int4": lambda x: build.int4_gemv(x, packed, scales_and_zeros, 128),
        "bf16": lambda x: build.bf16_gemv(x, weight16),
    }
    for name, product in products.items():
        xf = x.float()
        batch, alone = product(xf), torch.cat([product(xf[i : i + 1]) for i in range(rows)])
        if name == "bf16" and build.target != "avx512bf16":
            assert rel(batch, alone.double()) < 1e-6, name
        elif name.startswith("int8 groups") and build.target in cpu.AVX2_TARGETS:
            assert rel(batch, alone.double()) < 1e-6, name
            # each pair of rows against a call of those two, but for a batch's last pass of one row (as alone)
            paired = rows - (rows % 8 == 1)
            for i in range(paired - 1):
                assert torch.equal(batch[i : i + 2], product(xf[i : i + 2])), (name, i)
        else:
            assert torch.equal(batch, alone), name


@pytest.mark.parametrize("rows", [5, 8, 13])
def test_threads_claiming_chunks_compute_each_output_once(build, rows):
    """From `kClaimedChunksMinRows` activation rows the threads claim chunks of 64 output rows as they go (a
    product of at least 4 chunks a thread): every output is computed once, as one thread computes it alone."""
    generator = torch.Generator().manual_seed(rows)
    n, k = 64 * 21 + 5, 512
    x = torch.randn(rows, k, generator=generator)
    products = {
        "int8": (
            build.int8_gemv,
            torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator),
            torch.rand(n, generator=generator),
        ),
        "int8 groups of 32": (
            build.int8_gemv,
            torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator),
            torch.rand(n, k // 32, generator=generator).bfloat16(),
        ),
        "int4": (
            build.int4_gemv,
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator),
            (torch.rand(k // 128, n, 2, generator=generator) / 8).bfloat16(),
            128,
        ),
        "bf16": (build.bf16_gemv, torch.randn(n, k, generator=generator).bfloat16()),
    }
    threads = torch.get_num_threads()
    for name, (product, *operands) in products.items():
        torch.set_num_threads(max(threads, 2))
        try:
            claimed = product(x, *operands)
            torch.set_num_threads(1)
            alone = product(x, *operands)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(claimed, alone), name


@pytest.mark.parametrize("rows", [1, 4, 8, 11])
def test_int8_gives_the_same_bits_in_every_build(rows):
    """The int8 tiles of every build sum each activation block exactly in int32 and add it to a row's fp32 sum
    with one multiply-add, block after block (as the AMX-INT8 kernel does), so a row gets the same bits from the
    avx2, avx2vnni (`vpdpwssd`), avx512 and avx512bf16 builds: a scale a row, and group scales against several
    activation rows."""
    builds = [kernel_build(target) for target in cpu.kernel_targets()]
    if len(builds) < 2:
        skip_platform(f"this CPU runs one build of the kernels ({builds[0].target}): nothing to compare")
    generator = torch.Generator().manual_seed(rows)
    k = 1536
    x = torch.randn(rows, k, generator=generator)
    weight = torch.randint(-128, 128, (130, k), dtype=torch.int8, generator=generator)
    scales = torch.rand(130, generator=generator)
    group_scales = torch.rand(130, k // 32, generator=generator).bfloat16()
    first = builds[0]
    for build in builds[1:]:
        assert torch.equal(build.int8_gemv(x, weight, scales), first.int8_gemv(x, weight, scales)), (
            build.target
        )
        if rows > 1:
            got, want = build.int8_gemv(x, weight, group_scales), first.int8_gemv(x, weight, group_scales)
            assert torch.equal(got, want), build.target


@pytest.mark.parametrize("rows", [2, 3, 4, 8])
def test_non_finite_rows_leave_the_others_alone(build, rows):
    """A batch's rows share a register tile (AVX2: one vector of every row's sums): a NaN or inf in one row makes
    that row NaN and leaves every other row what it gets alone."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=generator)
    x[0, 3], x[-1, 300] = float("nan"), float("inf")
    weight8 = torch.randint(-127, 128, (70, 512), dtype=torch.int8, generator=generator)
    scales = torch.rand(70, generator=generator)
    packed = torch.randint(0, 256, (70, 256), dtype=torch.uint8, generator=generator)
    scales_and_zeros = (torch.rand(4, 70, 2, generator=generator) / 8).bfloat16()
    for product in (
        lambda x: build.int8_gemv(x, weight8, scales),
        lambda x: build.int4_gemv(x, packed, scales_and_zeros, 128),
    ):
        y = product(x)
        assert y[0].isnan().all() and y[-1].isnan().all()
        for i in range(1, rows - 1):
            assert torch.equal(y[i], product(x[i : i + 1])[0])


def test_bf16_non_finite_values_propagate(build):
    weight = torch.ones(4, 40, dtype=torch.bfloat16)
    x = torch.ones(3, 40)
    x[0, 3], x[1, 39] = float("nan"), float("inf")  # 39: in the tail past the last whole vector
    y = build.bf16_gemv(x, weight)
    assert y[0].isnan().all() and y[1].isinf().all() and torch.equal(y[2], torch.full((4,), 40.0))


@pytest.mark.parametrize("target", cpu.KERNEL_TARGETS)
@pytest.mark.parametrize("shape", [(130, 1536), (7, 96)], ids=str)
def test_one_row_streamed_alone_gives_the_same_bits(target, shape):
    """The mat-vecs of one activation row (bf16, int8 with a scale a row) take four weight rows a tile (the avx2
    int8 tile one), prefetched ahead, or on AMD AVX-512 CPUs one at a time unprefetched (`cpu.single_stream`):
    each row's sums in the same order, so the same bits. Tiles and a remainder (130 rows), and a row shorter than a
    step (96 columns: masked loads, a narrow int8 block, the widening tiles' scalar tail)."""
    build = kernel_build(target)
    generator = torch.Generator().manual_seed(shape[1])
    x = torch.randn(1, shape[1], generator=generator)
    weight8 = _misaligned(torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator), 3)
    scales = torch.rand(shape[0], generator=generator)
    weight16 = _misaligned(torch.randn(shape, generator=generator).bfloat16(), 2)
    products = {
        "int8": lambda: build.int8_gemv(x, weight8, scales),
        "bf16": lambda: build.bf16_gemv(x, weight16),
    }
    chosen = cpu.single_stream(target)
    try:
        assert build.set_single_stream(False) == chosen  # what loading the build set
        four_rows = {name: product() for name, product in products.items()}
        assert build.set_single_stream(True) is False
        one_row = {name: product() for name, product in products.items()}
    finally:
        build.set_single_stream(chosen)
    for name in products:
        assert torch.equal(one_row[name], four_rows[name]), name
    assert rel(one_row["int8"], (x.double() @ weight8.double().t()) * scales.double()) < 1e-4
    assert rel(one_row["bf16"], x.double() @ weight16.double().t()) < 1e-2  # x rounded to bf16 in avx512bf16


# --- choosing the build ------------------------------------------------------------------------------------------


def test_the_target_is_the_highest_the_cpu_runs_or_a_lower_one_asked_for():
    everything = cpu.KERNEL_TARGETS
    assert cpu.kernel_target(None, everything) == "avx512bf16"
    assert cpu.kernel_target("avx2", everything) == "avx2"
    assert cpu.kernel_target(" AVX512 ", everything) == "avx512"
    assert cpu.kernel_target(None, ()) is None
    assert cpu.kernel_target("avx2", ()) is None  # no AVX2 at all: nothing to force
    with pytest.warns(UserWarning, match="cannot run the avx512bf16 kernels .*using avx2"):
        assert cpu.kernel_target("avx512bf16", ("avx2",)) == "avx2"
    with pytest.warns(UserWarning, match="unknown CPU kernel target 'sse2'"):
        assert cpu.kernel_target("sse2", ("avx2", "avx512")) == "avx512"
    with pytest.warns(UserWarning, match="cannot run the avx2vnni kernels .*using avx512bf16"):
        assert cpu.kernel_target("avx2vnni", ("avx2", "avx512", "avx512bf16")) == "avx512bf16"
    assert cpu.kernel_target("avx2vnni", everything) == "avx2vnni"
    targets = cpu.kernel_targets()
    assert targets == () or (targets[0] == "avx2" and list(targets) == sorted(targets, key=everything.index))
    assert ("avx2vnni" in targets) == (bool(targets) and cpu.has_avx_vnni())


@pytest.mark.parametrize(
    ("avx_vnni", "avx512", "bf16", "expected"),
    [
        (False, False, False, ("avx2",)),  # Haswell, Zen 3
        (True, False, False, ("avx2", "avx2vnni")),  # Alder Lake
        (False, True, False, ("avx2", "avx512")),  # Ice Lake
        (False, True, True, ("avx2", "avx512", "avx512bf16")),  # Zen 4
        (True, True, True, ("avx2", "avx2vnni", "avx512", "avx512bf16")),  # Sapphire Rapids, Zen 5
    ],
)
def test_the_builds_a_cpu_runs_follow_its_features(monkeypatch, avx_vnni, avx512, bf16, expected):
    """AVX-VNNI (VEX) and AVX-512 VNNI come separately: an Ice Lake or a Zen 4 has the second, an Alder Lake the
    first, so avx2vnni is a build of its own beside the AVX-512 ones, not below them."""
    probes = {"_is_avx512_supported": avx512, "_is_vnni_supported": avx512, "_is_avx512_bf16_supported": bf16}
    monkeypatch.setattr(cpu, "has_avx2", lambda: True)
    monkeypatch.setattr(cpu, "has_avx_vnni", lambda: avx_vnni)
    monkeypatch.setattr(cpu, "_probe", probes.__getitem__)
    cpu.kernel_targets.cache_clear()
    try:
        assert cpu.kernel_targets() == expected
        assert cpu.kernel_target() == expected[-1]
    finally:
        cpu.kernel_targets.cache_clear()


def test_avx_vnni_is_read_from_the_cpu_flags(monkeypatch):
    flags = cpu.cpuinfo_field("flags").split()
    assert cpu.has_avx_vnni() == ("avx_vnni" in flags)
    # a whole flag: AVX-512 VNNI (Ice Lake, Zen 4) is not AVX-VNNI
    for line, expected in (("fpu avx2 avx512_vnni", False), ("fpu avx2 avx_vnni avx512f", True), ("", False)):
        monkeypatch.setattr(cpu, "cpuinfo_field", lambda name, line=line: line if name == "flags" else "")
        cpu.has_avx_vnni.cache_clear()
        try:
            assert cpu.has_avx_vnni() is expected, line
        finally:
            cpu.has_avx_vnni.cache_clear()


def test_one_row_streams_alone_on_amd_avx512_cpus_unless_told(monkeypatch):
    monkeypatch.delenv(cpu.ENV_SINGLE_STREAM, raising=False)
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    # a Zen 4: every build, forced or not
    monkeypatch.setattr(cpu, "kernel_targets", lambda: cpu.KERNEL_TARGETS)
    assert all(cpu.single_stream(target) for target in cpu.KERNEL_TARGETS)
    assert not cpu.single_stream(None)
    monkeypatch.setattr(cpu, "kernel_targets", lambda: cpu.KERNEL_TARGETS[:1])  # AVX2 only
    assert not cpu.single_stream("avx2")
    monkeypatch.setenv(cpu.ENV_SINGLE_STREAM, "1")
    assert cpu.single_stream("avx2")
    monkeypatch.setattr(cpu, "kernel_targets", lambda: cpu.KERNEL_TARGETS)
    monkeypatch.setenv(cpu.ENV_SINGLE_STREAM, "0")
    assert not cpu.single_stream("avx512bf16")
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv(cpu.ENV_SINGLE_STREAM, "1")
    assert cpu.single_stream("avx512bf16")
    monkeypatch.delenv(cpu.ENV_SINGLE_STREAM)
    assert not cpu.single_stream("avx512bf16")
    assert not cpu.single_stream("avx2")


def test_the_vendor_is_read_from_the_cpu():
    vendor = cpu.cpu_vendor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "vendor_id" in cpuinfo.read_text(errors="replace"):
        assert vendor and vendor in cpuinfo.read_text(errors="replace")
    else:
        assert vendor == ""


def test_each_build_is_named_after_its_target(kernels):
    """Separate names, so separate directories in torch's extension cache: a cache shared between machines never
    gives one CPU another's build."""
    assert [cpu_gemv.build_name(t) for t in cpu.KERNEL_TARGETS] == [
        "baichuan_cpu_gemv_avx2",
        "baichuan_cpu_gemv_avx2vnni",
        "baichuan_cpu_gemv_avx512",
        "baichuan_cpu_gemv_avx512bf16",
    ]
    assert (
        kernels.load().target == cpu_gemv.target() == cpu.kernel_target(os.environ.get(cpu_gemv.ENV_TARGET))
    )
    assert "-mavx512f" not in cpu_gemv.TARGET_FLAGS["avx2"]
    assert "-mavx512bf16" not in cpu_gemv.TARGET_FLAGS["avx512"]
    assert (
        "-mavxvnni" not in cpu_gemv.TARGET_FLAGS["avx512"]
        and "-mavxvnni" in cpu_gemv.TARGET_FLAGS["avx2vnni"]
    )


def test_a_lower_target_forced_by_the_environment():
    """BAICHUAN_CPU_ISA=avx2 on any AVX2 CPU: the AVX2 build runs, and the model's layers give correct results."""
    require_cpu_kernels()
    code = """
import torch
from baichuan import cpu_gemv
from baichuan.model import Linear
from baichuan.quant.int8 import Int8Linear
module = cpu_gemv.load()
linear = Linear(96, 40, bias=True).bfloat16()
x = torch.randn(2, 96).bfloat16()
with torch.inference_mode():
    ours = linear(x)
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    int8 = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    y8 = int8(x.float())
    exact8 = x.double() @ int8.dequantize(torch.float64).t()
rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
print(cpu_gemv.target(), module.target, rel(ours, exact) < 5e-3, rel(y8, exact8) < 1e-4)
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, cpu_gemv.ENV_TARGET: "avx2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["avx2", "avx2", "True", "True"]


# --- the bf16 decode path of the model -----------------------------------------------------------------------------


def test_model_linear_takes_the_bf16_kernel_for_decoding_only(kernels, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    linear = random_bf16_linear(generator)
    calls = []
    gemv = cpu_gemv.bf16_gemv
    monkeypatch.setattr(cpu_gemv, "bf16_gemv", lambda *a: calls.append(a[0].shape) or gemv(*a))
    limit = cpu.bf16_gemv_max_rows(cpu_gemv.target())
    for rows in (1, limit, limit + 1):
        x = torch.randn(1, rows, 64, generator=generator).bfloat16()
        with torch.inference_mode():
            y = linear(x)
        exact = x.double() @ linear.weight.double().t() + linear.bias.double()
        assert y.shape == (1, rows, 48) and y.dtype == torch.bfloat16 and rel(y, exact) < 5e-3
    assert calls == [(1, 1, 64), (1, limit, 64)]  # past the limit: the prompt kernel or torch's product
    x = torch.randn(1, 64).bfloat16()
    linear(x).sum().backward()  # training: autograd needs torch's product
    linear.float()(x.float())
    assert len(calls) == 2 and linear.weight.grad is not None
