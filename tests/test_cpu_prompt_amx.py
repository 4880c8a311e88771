"""The AMX bf16 kernel (`cpu_gemv.amx_bf16_matmul`, csrc/cpu_prompt_amx.cpp) against float64 products of the same
operands, where this CPU has AMX-BF16; and where bf16 products go to it (`cpu.amx_bf16_max_rows`,
`cpu_gemv.bf16_linear`, the fused decode layer), on any CPU.

The tiles sum exact products of bf16 values in fp32 and the result is rounded to bf16 once, so each output is
within one bf16 step (2^-8 relative, plus fp32 rounding of the sum) of the exact product."""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu, cpu_gemv, model
from baichuan.model import _BF16_PRODUCT, _TORCH_PRODUCT, Linear, _fused_product
from tests.conftest import kernel_build, on_one_thread, random_bf16_linear, require_cpu_kernels, skip_platform


@pytest.fixture(scope="module")
def amx():
    """The avx512bf16 build, where this CPU has AMX-BF16 and lets this process use the tiles."""
    module = kernel_build("avx512bf16")
    if not module.amx_ready():
        skip_platform("this CPU has no AMX-BF16 (or the kernel refuses the tiles)")
    return module


def operands(rows: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, K, generator=generator).bfloat16(),
        torch.randn(N, K, generator=generator).bfloat16(),
    )


def assert_within_one_bf16_step(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    exact = x.double() @ weight.double().t()
    # fp32 sums of K products: their rounding grows with the sum of magnitudes, not the result's own size
    magnitudes = x.double().abs() @ weight.double().abs().t()
    bound = exact.abs() * 2.0**-8 + magnitudes * 2.0**-20
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= bound).all()


# Rows around the 16-row tiles and the 32-row pairs of them; K of one 32-value step or several; N of one block of
# 32 outputs or many.
@pytest.mark.parametrize("rows", [1, 9, 16, 17, 31, 33, 77, 128])
@pytest.mark.parametrize("shape", [(32, 32), (96, 160), (1536, 256), (64, 4096)], ids=str)
def test_matches_the_exact_product(amx, shape, rows):
    N, K = shape
    x, weight = operands(rows, N, K, seed=rows + N)
    assert_within_one_bf16_step(amx.amx_bf16_matmul(x, weight), x, weight)


def test_the_bits_do_not_depend_on_the_threads(amx):
    x, weight = operands(45, 32 * 7, 96, seed=3)  # 7 blocks over 2 threads
    assert torch.equal(on_one_thread(lambda: amx.amx_bf16_matmul(x, weight)), amx.amx_bf16_matmul(x, weight))


def test_empty_and_non_finite_rows(amx):
    _, weight = operands(1, 32, 64)
    assert amx.amx_bf16_matmul(torch.empty(0, 64, dtype=torch.bfloat16), weight).shape == (0, 32)
    x, weight = operands(20, 64, 64, seed=5)
    x[2, 7], x[17, 0] = float("inf"), float("nan")
    y = amx.amx_bf16_matmul(x, weight)
    assert not y[2].isfinite().any() and y[17].isnan().all()
    clean = [r for r in range(20) if r not in (2, 17)]
    assert_within_one_bf16_step(y[clean], x[clean], weight)


@pytest.mark.parametrize(
    ("x", "weight", "message"),
    [
        (torch.randn(4, 64).bfloat16(), torch.randn(48, 64).bfloat16(), "multiples of 32"),
        (torch.randn(4, 48).bfloat16(), torch.randn(32, 48).bfloat16(), "multiples of 32"),
        (torch.randn(4, 64), torch.randn(32, 64).bfloat16(), "must be bf16"),
        (torch.randn(64, 4).bfloat16().t(), torch.randn(32, 64).bfloat16(), "contiguous"),
        (torch.randn(4, 64).bfloat16(), torch.randn(32, 96).bfloat16(), "has 64 inputs"),
    ],
    ids=["outputs", "inputs", "x-dtype", "strided", "mismatch"],
)
def test_bad_operands_are_refused_with_a_message(amx, x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        amx.amx_bf16_matmul(x, weight)


def test_lower_builds_refuse_it_with_a_message():
    module = kernel_build("avx512") if "avx512" in cpu.kernel_targets() else kernel_build("avx2")
    assert not module.amx_ready()
    with pytest.raises(RuntimeError, match="no AMX-BF16"):
        module.amx_bf16_matmul(*operands(4, 32, 32))


# --- where bf16 products go -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "amx", "expected"),
    [
        ("avx512bf16", True, cpu.AMX_BF16_MAX_ROWS),
        ("avx512bf16", False, 0),  # a Zen 4: AVX512-BF16 without tiles
        ("avx512", True, 0),  # a lower build forced on an AMX CPU
        ("avx2", True, 0),
        (None, True, 0),
    ],
)
def test_only_the_avx512bf16_build_on_an_amx_cpu_takes_bf16_prompts(monkeypatch, target, amx, expected):
    monkeypatch.setattr(cpu, "has_amx", lambda: amx)
    assert cpu.amx_bf16_max_rows(target) == expected
    # No rows left to torch between the mat-vec's and the AMX kernel's.
    assert 1 < cpu.AMX_BF16_MIN_ROWS <= cpu.BF16_GEMV_MAX_ROWS + 1 <= cpu.AMX_BF16_MAX_ROWS


@pytest.fixture
def amx_calls(monkeypatch):
    """The kernels, with bf16 rows from AMX_BF16_MIN_ROWS to AMX_BF16_MAX_ROWS routed to the AMX kernel whatever
    this CPU is (its calls answered by torch's product where the CPU has no AMX); the shapes it was called with."""
    require_cpu_kernels()
    monkeypatch.setattr(cpu_gemv, "_amx_max_rows", lambda: cpu.AMX_BF16_MAX_ROWS)
    calls = []
    ready = cpu_gemv.load().amx_ready()

    def spy(x, weight):
        calls.append(tuple(x.shape))
        return (
            cpu_gemv._apply("amx_bf16_matmul", x, weight) if ready else torch.nn.functional.linear(x, weight)
        )

    monkeypatch.setattr(cpu_gemv, "amx_bf16_matmul", spy)
    return calls


def test_linear_gives_short_bf16_prompts_to_the_kernel(amx_calls, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    linear = random_bf16_linear(generator, in_features=64, out_features=96)
    least, most = cpu.AMX_BF16_MIN_ROWS, cpu.AMX_BF16_MAX_ROWS
    with torch.inference_mode():
        # The rows of all leading dimensions count; the mat-vec keeps the fewest rows, torch's GEMM the most.
        for shape in ((1, least - 1), (1, least), (2, 20), (1, most), (1, most + 1)):
            x = torch.randn(*shape, 64, generator=generator).bfloat16()
            y = linear(x)
            exact = x.double() @ linear.weight.double().t() + linear.bias.double()
            assert y.shape == (*shape, 96) and y.dtype == torch.bfloat16
            assert ((y.double() - exact).norm() / exact.norm()).item() < 5e-3
        x = torch.randn(20, 64, generator=generator)
        linear(x)  # fp32 rows: not the kernel's
        Linear(64, 48).bfloat16()(x.bfloat16())  # 48 outputs: not a multiple of 32
        monkeypatch.setattr(cpu_gemv, "AMX_PROMPTS", False)
        linear(x.bfloat16())
    linear(x.bfloat16()).sum().backward()  # training: autograd needs torch's product
    assert amx_calls == [(1, least, 64), (2, 20, 64), (1, most, 64)]
    assert linear.weight.grad is not None


def test_the_fused_decode_layer_leaves_larger_bf16_batches_to_the_kernel(amx_calls, monkeypatch):
    # past the AMX kernel's rows, as where bf16 is native: torch's product (elsewhere other prompt paths)
    monkeypatch.setattr(cpu_gemv, "_bf16_prompt_min_rows", lambda: None)
    monkeypatch.setattr(model, "half_is_emulated", lambda dtype: False)
    linear = Linear(64, 96, bias=False).bfloat16()
    assert _fused_product(linear, cpu.AMX_BF16_MIN_ROWS - 1, torch.bfloat16)[0] == _BF16_PRODUCT
    assert _fused_product(linear, cpu.AMX_BF16_MIN_ROWS, torch.bfloat16) is None  # the module's forward
    assert (
        _fused_product(Linear(64, 48, bias=False).bfloat16(), cpu.BF16_GEMV_MAX_ROWS, torch.bfloat16)[0]
        == _BF16_PRODUCT
    )
    assert _fused_product(linear, cpu.AMX_BF16_MAX_ROWS + 1, torch.bfloat16)[0] == _TORCH_PRODUCT
