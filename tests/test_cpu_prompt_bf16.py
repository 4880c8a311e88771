"""The bf16 prompt kernel (`cpu_gemv.bf16_matmul`, csrc/cpu_prompt_bf16.cpp) against float64 products of the same
weights in every build this CPU runs, and where bf16 products go to it: `cpu.bf16_prompt_min_rows`,
`cpu_gemv.bf16_linear`, `model.Linear` and the fused decode layer.

The kernel sums exact fp32 products (a bf16 weight widens to fp32 exactly) in fp32, so fp32 rows agree with the
float64 product to fp32 rounding (bound 1e-5 of the norm). bf16 rows are widened first and the fp32 result
rounded once, so they give the bits of the fp32 rows' result rounded to bf16."""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu, cpu_gemv
from baichuan.model import _BF16_PRODUCT, Linear, _fused_product
from tests.conftest import kernel_build, on_one_thread, random_bf16_linear, require_cpu_kernels


@pytest.fixture(scope="module", params=cpu.KERNEL_TARGETS)
def build(request):
    """The compiled module of one target, where this CPU runs it (every build has the kernel: it is AVX2 code)."""
    return kernel_build(request.param)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def operands(rows: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, K, generator=generator), torch.randn(N, K, generator=generator).bfloat16()


# Rows around the 6-row tile; N with a partial block of 128 columns (144, 272) and K with a partial chunk of 256
# inputs (264, 520) or shorter than one (8, 24).
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 66])
@pytest.mark.parametrize("shape", [(16, 8), (48, 24), (144, 264), (272, 520), (1536, 256)], ids=str)
def test_matches_the_exact_product(build, shape, rows):
    N, K = shape
    x, weight = operands(rows, N, K, seed=rows + N)
    y = build.bf16_matmul(x, weight)
    assert y.shape == (rows, N) and y.dtype == torch.float32
    assert rel(y, x.double() @ weight.double().t()) < 1e-5
    rounded = build.bf16_matmul(x.bfloat16(), weight)
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, build.bf16_matmul(x.bfloat16().float(), weight).bfloat16())


def test_the_bits_do_not_depend_on_the_threads(build):
    x, weight = operands(31, 1552, 264, seed=3)  # 1552 = 12 blocks of 128 and one of 16
    assert torch.equal(on_one_thread(lambda: build.bf16_matmul(x, weight)), build.bf16_matmul(x, weight))


def test_empty_operands(build):
    _, weight = operands(1, 32, 16)
    assert build.bf16_matmul(torch.empty(0, 16), weight).shape == (0, 32)
    y = build.bf16_matmul(torch.empty(3, 0).bfloat16(), torch.empty(32, 0).bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.zeros(3, 32, dtype=torch.bfloat16))


def test_non_finite_rows_stay_non_finite_and_leave_the_others_alone(build):
    x, weight = operands(9, 32, 24, seed=5)
    x[2, 7], x[6, 0] = float("inf"), float("nan")
    y = build.bf16_matmul(x, weight)
    assert not y[2].isfinite().any() and y[6].isnan().all()
    clean = [r for r in range(9) if r not in (2, 6)]
    assert rel(y[clean], x[clean].double() @ weight.double().t()) < 1e-5


@pytest.mark.parametrize(
    ("x", "weight", "message"),
    [
        (torch.randn(4, 16), torch.randn(24, 16).bfloat16(), "multiple of 16"),
        (torch.randn(4, 12), torch.randn(16, 12).bfloat16(), "multiple of 16 and inputs of 8"),
        (torch.randn(4, 16), torch.randn(16, 16), "must be bf16"),
        (torch.ones(4, 16, dtype=torch.int32), torch.randn(16, 16).bfloat16(), "fp32 or bf16"),
        (torch.randn(16, 4).t(), torch.randn(16, 16).bfloat16(), "contiguous"),
        (torch.randn(4, 16), torch.randn(16, 32).bfloat16(), "has 16 inputs"),
    ],
    ids=["outputs", "inputs", "weight-dtype", "x-dtype", "strided", "mismatch"],
)
def test_bad_operands_are_refused_with_a_message(build, x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        build.bf16_matmul(x, weight)


# --- where bf16 products go -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "emulated", "capability", "expected"),
    [
        ("avx2", True, "AVX2", cpu.BF16_PROMPT_MIN_ROWS),
        ("avx2", False, "AVX512", None),  # native bf16 (AMX, AVX512-BF16), a lower build forced
        ("avx2", True, "AVX512", None),  # an AVX-512 CPU without bf16: MKL's AVX-512 fp32 GEMM stays
        ("avx512", True, "AVX512", None),
        (None, True, "DEFAULT", None),
    ],
)
def test_only_the_avx2_build_on_an_avx2_cpu_takes_bf16_prompts(
    monkeypatch, target, emulated, capability, expected
):
    monkeypatch.setattr(cpu, "half_is_emulated", lambda dtype: emulated)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert cpu.bf16_prompt_min_rows(target) == expected
    # No rows between the mat-vec's and the prompt kernel's.
    assert cpu.BF16_PROMPT_MIN_ROWS == cpu.BF16_GEMV_MAX_ROWS + 1


@pytest.fixture
def prompt_calls(monkeypatch):
    """The kernels, with prompts from BF16_PROMPT_MIN_ROWS rows routed as on an AVX2-only CPU whatever this one
    is; the shapes `bf16_matmul` was called with."""
    require_cpu_kernels()
    monkeypatch.setattr(cpu_gemv, "_bf16_prompt_min_rows", lambda: cpu.BF16_PROMPT_MIN_ROWS)
    calls = []
    matmul = cpu_gemv.bf16_matmul
    monkeypatch.setattr(cpu_gemv, "bf16_matmul", lambda x, w: calls.append(tuple(x.shape)) or matmul(x, w))
    return calls


def test_linear_gives_prompts_to_the_kernel(prompt_calls, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    linear = random_bf16_linear(generator)
    least = cpu.BF16_PROMPT_MIN_ROWS
    with torch.inference_mode():
        # The rows of all leading dimensions count.
        for shape in ((1, 1), (1, least - 1), (1, least), (2, 20)):
            x = torch.randn(*shape, 64, generator=generator)
            for dtype in (torch.bfloat16, torch.float32):
                y = linear(x.to(dtype))
                exact = x.to(dtype).double() @ linear.weight.double().t() + linear.bias.double()
                assert y.shape == (*shape, 48) and y.dtype == dtype
                assert rel(y, exact) < (5e-3 if dtype is torch.bfloat16 else 1e-5)
    assert prompt_calls == [(1, least, 64), (1, least, 64), (2, 20, 64), (2, 20, 64)]

    x = torch.randn(least, 64, generator=generator)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast rounds fp32 rows itself: torch's product
            linear(x)
        Linear(64, 40).bfloat16()(x.bfloat16())  # 40 outputs: not a multiple of 16
        monkeypatch.setattr(cpu_gemv, "BF16_PROMPTS", False)
        linear(x.bfloat16())
    linear(x.bfloat16()).sum().backward()  # training: autograd needs torch's product
    assert len(prompt_calls) == 4 and linear.weight.grad is not None


def test_the_fused_decode_layer_leaves_larger_bf16_batches_to_the_kernel(prompt_calls):
    linear = Linear(64, 48, bias=False).bfloat16()
    assert _fused_product(linear, cpu.BF16_GEMV_MAX_ROWS, torch.bfloat16)[0] == _BF16_PRODUCT
    assert _fused_product(linear, cpu.BF16_PROMPT_MIN_ROWS, torch.bfloat16) is None  # the module's forward
