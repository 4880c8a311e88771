"""Single quantized layers on every CPU kernel path, against float and against the reference path.

Tolerances are relative Frobenius errors ||y - y_ref|| / ||y_ref|| of layer outputs, with N(0, 0.02) weights
like the real checkpoints: int8 per channel measures ~4e-3 (bound 1e-2), int4 with groups of 32 ~8e-2
(bound 0.12). The fast CPU kernels are compared with the reference dequantise-and-matmul path on the same
quantized weights: torch's (bf16) to 1e-2, ours (`cpu_gemv`) to 1e-4 in fp32 where activations are quantized to
int16 (int8 layers) and 1e-2 where they are rounded to int8 per group (int4 layers);
the reference path itself to 1e-5 in fp32, 1e-2 in bf16 (bf16 rounding of the output).
"""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu_gemv
from baichuan.cpu import AVX2_TARGETS, half_is_emulated
from baichuan.quant.int4 import INT4_WIDEN_MIN_ROWS, Int4Linear
from baichuan.quant.int8 import INT8_WIDEN_MIN_ROWS, Int8Linear
from tests.quant.conftest import HAS_INT4_KERNEL, gaussian_linear, rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 256), (80, 240), (172, 80)], ids=str)
def test_quantized_linear_close_to_float(shape, dtype):
    in_features, out_features = shape
    linear = gaussian_linear(in_features, out_features, dtype=dtype)
    x = torch.randn(3, 5, in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        expected = linear.float()(x.float())
        assert rel(Int8Linear.from_linear(linear)(x), expected) < 1e-2
        assert rel(Int4Linear.from_linear(linear, group_size=32)(x), expected) < 0.12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(256, 64, 128), (512, 176, 64), (64, 512, 32)], ids=str)
def test_kernels_equal_reference_path(shape, dtype, kernels):
    in_features, out_features, group_size = shape
    linear = gaussian_linear(in_features, out_features, dtype=dtype)
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    # torch's kernels compute in bf16 whatever the input dtype (KERNEL_DTYPE); ours in int16 x int8 (int8 x int4 for
    # int4 layers) with fp32 sums; the reference path in the input's dtype.
    build = cpu_gemv.load()
    codes = {Int8Linear: "int8_activations", Int4Linear: "int4_activations"}  # the build's attribute for each
    reference_tol = 1e-5 if dtype == torch.float32 else 1e-2
    for module in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, group_size)):
        exact = (
            kernels == "avx2" and dtype == torch.float32 and getattr(build, codes[type(module)]) == "int16"
        )
        kernel_tol = 1e-4 if exact else 1e-2
        # The reference: the dequantised weight in fp32, times the same (rounded) input.
        reference = x.float() @ module.dequantize().t()
        with torch.no_grad():
            fast = module(x)
            module.use_kernel = False
            slow = module(x)
        assert fast.dtype == slow.dtype == dtype
        assert rel(fast, reference) < kernel_tol
        assert rel(slow, reference) < reference_tol
    if kernels == "avx2":
        assert "kernel=avx2" in repr(module) and module.tiled is None
    elif HAS_INT4_KERNEL:
        assert module.tiled is not None, "the int4 CPU kernel exists but was not used"


@pytest.mark.parametrize("bits", [8, 4])
def test_prompt_sized_products(bits, kernels):
    """Prompts on a CPU without native bf16: our int4 kernels take any number of rows (the avx2 build's prompt
    product with activations rounded to int8 per group, the AVX-512 builds' decode kernel likewise).
    int8 from INT8_WIDEN_MIN_ROWS rows on, and torch's int4 from INT4_WIDEN_MIN_ROWS, become one fp32 GEMM on the
    dequantised weight (faster than the bf16 kernel there), which is exact; but the avx2 build's int8 prompts,
    which its prompt kernel takes with int16 activations (~3e-5). With native bf16 the kernels keep them (bf16
    error). 128 output rows: whole int4 tiles, of 64 or 32 rows."""
    linear = gaussian_linear(256, 128)
    module = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, 64)
    min_rows = INT8_WIDEN_MIN_ROWS if bits == 8 else INT4_WIDEN_MIN_ROWS
    x = torch.randn(3, min_rows // 3 + 1, 256, generator=torch.Generator().manual_seed(7))
    reference = x @ module.dequantize().t()
    with torch.no_grad():
        got = module(x)
    assert got.shape == (3, min_rows // 3 + 1, 128)
    if not half_is_emulated(torch.bfloat16):
        tol = 1e-2
    elif kernels == "avx2" and bits == 4:
        tol = 1e-2
    elif kernels == "avx2" and cpu_gemv.load().target in AVX2_TARGETS:
        tol = 1e-4  # the avx2 build's int8 prompt kernel: int16 activations
    else:
        tol = 1e-6
    assert rel(got, reference) < tol
