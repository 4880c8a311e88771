"""The AVX2 int8/int4 kernels of `baichuan.cpu_gemv` against float64 products of the same quantized weights, and
what happens where they cannot be built.

Activations are quantized to int16 per block (relative error ~1.5e-5 per value), so outputs agree with the
exact product to ~3e-5 (bound 1e-4)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from baichuan import cpu_gemv
from baichuan.quant.int4 import Int4Linear, unpack_int4
from tests.conftest import require_cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    require_cpu_kernels()
    return cpu_gemv


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


# Row counts around the kernel's tiles (4 weight rows, 4 activation rows) and chunks (64 rows); K not a multiple
# of the 256-value activation block (48, 13696 = 107 * 128).
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
    exact = x.double() @ module.dequantize().double().t()
    got = kernels.int4_gemv(x, module.weight, module.scales_and_zeros, group_size)
    assert rel(got, exact) < 1e-4
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
    with pytest.raises(RuntimeError, match="fp32"):
        compiled.int8_gemv(
            torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.int8), torch.ones(4)
        )
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
    monkeypatch.setattr(cpu_gemv, "has_avx2", lambda: True)
    monkeypatch.setattr(cpu_gemv, "_built", lambda _: True)
    cpu_gemv.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built .*Ninja is required.*using torch's kernels"):
            assert cpu_gemv.load() is None
        assert (
            cpu_gemv.int8_gemv(torch.zeros(1, 16), torch.zeros(1, 16, dtype=torch.int8), torch.ones(1))
            is None
        )
    finally:
        cpu_gemv.load.cache_clear()
