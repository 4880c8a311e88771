"""The AMX-INT8 kernel (`cpu_gemv.amx_int8_int16_matmul`, csrc/cpu_amx_int8.cpp) against the exact product
within the rounding of the mat-vec's int16 activation codes, where this CPU has AMX-INT8; and where int8 products go
to it (`cpu.amx_int8_max_rows`, `Int8Linear`, the fused decode layer), on any CPU.

The tiles sum the codes' products exactly in int32 per activation block, as `int8_gemv` does, and only the fp32
accumulation of the blocks' scaled sums rounds; so the kernel agrees with the mat-vec to fp32 rounding."""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu, cpu_gemv
from baichuan.model import _AMX_INT8_PRODUCT, _INT8_PRODUCT, _fused_product
from baichuan.quant.int8 import Int8Linear
from tests.conftest import kernel_build, on_one_thread, require_cpu_kernels
from tests.test_fused import decode_both_ways, tiny_model


def operands(rows: int, N: int, K: int, seed: int = 0, group: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=generator) * 3
    codes = torch.randint(-128, 128, (N, K), generator=generator, dtype=torch.int8)
    if group is None:
        scales = torch.rand(N, generator=generator) * 0.01 + 1e-4
    else:
        scales = (torch.rand(N, K // group, generator=generator) * 0.01 + 1e-4).bfloat16()
    return x, codes, scales


def exact_and_bound(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor):
    """The float64 product, and how far the kernel may be from it: x's int16 codes (as `int8_gemv` quantizes
    them: per block of B inputs, step = block absmax / 32767) are within half a step of x, and the fp32 sums of the
    blocks' exact integer sums round by a few parts in 2^24 of the terms' magnitudes."""
    K = x.shape[1]
    if scales.dim() == 2:
        B = K // scales.shape[1]
        weight = codes.double() * scales.double().repeat_interleave(B, dim=1)
    else:
        B = next(b for b in (256, 128, 64, 32) if K % b == 0)
        weight = codes.double() * scales.double()[:, None]
    steps = x.double().abs().view(x.shape[0], K // B, B).amax(-1) / 32767  # (M, blocks)
    w = weight.abs().view(codes.shape[0], K // B, B).sum(-1)  # (N, blocks)
    exact = x.double() @ weight.t()
    magnitudes = x.double().abs() @ weight.abs().t()
    return exact, (steps @ w.t() / 2) * 1.001 + magnitudes * 2.0**-20


# Rows around the 16-row groups; K of one 64-input step, of blocks of 64 and 256, or many; N of one block of 32
# outputs or several; a scale a row, or per group of 32 (tile steps of 32 inputs), 64 or 128.
@pytest.mark.parametrize("rows", [1, 5, 8, 16, 17, 40])
@pytest.mark.parametrize(
    "shape",
    [(32, 64, None), (96, 320, None), (64, 4096, None), (128, 1536, None), (64, 1536, 32), (96, 384, 128)],
    ids=str,
)
def test_matches_the_exact_product_to_the_codes_rounding(amx_int8, shape, rows):
    N, K, group = shape
    x, codes, scales = operands(rows, N, K, seed=rows + N, group=group)
    y = amx_int8.amx_int8_int16_matmul(x, codes, scales)
    exact, bound = exact_and_bound(x, codes, scales)
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    assert ((y.double() - exact).abs() <= bound).all()
    # and the mat-vec, whose sums are the same up to the order of its fp32 additions (of lanes' partial sums)
    gemv = amx_int8.int8_gemv(x, codes, scales)
    assert ((y - gemv).norm() / gemv.norm()).item() < 1e-6


def test_bf16_rows_give_the_fp32_result_rounded(amx_int8):
    x, codes, scales = operands(8, 64, 1536, seed=1)
    xb = x.bfloat16()
    y = amx_int8.amx_int8_int16_matmul(xb, codes, scales)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, amx_int8.amx_int8_int16_matmul(xb.float(), codes, scales).bfloat16())


def test_the_bits_do_not_depend_on_the_threads(amx_int8):
    x, codes, scales = operands(20, 32 * 7, 320, seed=3)  # 7 blocks over 2 threads, two 16-row groups
    y = amx_int8.amx_int8_int16_matmul(x, codes, scales)
    assert torch.equal(on_one_thread(lambda: amx_int8.amx_int8_int16_matmul(x, codes, scales)), y)


def test_non_finite_rows_leave_the_others_alone(amx_int8):
    x, codes, scales = operands(8, 64, 512, seed=5)
    x[2, 7], x[5, 300] = float("inf"), float("nan")
    y = amx_int8.amx_int8_int16_matmul(x, codes, scales)
    assert y[2].isnan().all() and y[5].isnan().all()
    for row in (0, 1, 3, 4, 6, 7):
        assert torch.equal(y[row], amx_int8.amx_int8_int16_matmul(x[row : row + 1], codes, scales)[0])
    assert amx_int8.amx_int8_int16_matmul(torch.empty(0, 64), codes[:, :64].contiguous(), scales).shape == (
        0,
        64,
    )


@pytest.mark.parametrize(
    ("x", "codes", "scales", "message"),
    [
        (torch.randn(4, 64), torch.zeros(48, 64, dtype=torch.int8), torch.ones(48), "multiples of 32"),
        (torch.randn(4, 80), torch.zeros(32, 80, dtype=torch.int8), torch.ones(32), "multiples of 32"),
        (torch.randn(4, 64), torch.zeros(32, 64).bfloat16(), torch.ones(32), "int8 codes"),
        (
            torch.randn(4, 64),
            torch.zeros(32, 64, dtype=torch.int8),
            torch.ones(32, 4).bfloat16(),
            "multiple of 32",
        ),
        (torch.randn(4, 64), torch.zeros(32, 64, dtype=torch.int8), torch.ones(32).bfloat16(), "fp32"),
        (torch.randn(4, 64).half(), torch.zeros(32, 64, dtype=torch.int8), torch.ones(32), "fp32 or bf16"),
        (torch.randn(4, 128), torch.zeros(32, 64, dtype=torch.int8), torch.ones(32), "has 128 inputs"),
    ],
    ids=["outputs", "inputs", "weight-dtype", "groups-of-16", "scale-dtype", "x-dtype", "mismatch"],
)
def test_bad_operands_are_refused_with_a_message(amx_int8, x, codes, scales, message):
    with pytest.raises(RuntimeError, match=message):
        amx_int8.amx_int8_int16_matmul(x, codes, scales)


def test_lower_builds_refuse_it_with_a_message():
    module = kernel_build("avx512") if "avx512" in cpu.kernel_targets() else kernel_build("avx2")
    assert not module.amx_int8_ready()
    with pytest.raises(RuntimeError, match="no AMX-INT8"):
        module.amx_int8_int16_matmul(*operands(8, 32, 64))


# --- where int8 products go -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "amx_cpu", "expected"),
    [
        ("avx512bf16", True, cpu.AMX_INT8_MAX_ROWS),
        ("avx512bf16", False, 0),  # a Zen 4: AVX512-BF16 without tiles
        ("avx512", True, 0),  # a lower build forced on an AMX CPU
        ("avx2", True, 0),
        (None, True, 0),
    ],
)
def test_only_the_avx512bf16_build_on_an_amx_cpu_takes_int8_batches(monkeypatch, target, amx_cpu, expected):
    monkeypatch.setattr(cpu, "has_amx", lambda: amx_cpu)
    assert cpu.amx_int8_max_rows(target) == expected
    # batched decoding (8 rows) is the kernel's; one row stays with the mat-vec, which streams it faster
    assert 1 < cpu.AMX_INT8_MIN_ROWS <= 8 <= cpu.AMX_INT8_MAX_ROWS <= cpu.GEMV_MAX_ROWS
    # bf16 prompts past it go on to `amx_int8_matmul`, with no rows between the two left to the mat-vec
    assert cpu.AMX_QUANTIZED_MIN_ROWS <= cpu.AMX_INT8_MAX_ROWS + 1 <= cpu.AMX_QUANTIZED_MAX_ROWS


@pytest.fixture
def amx_int8_calls(monkeypatch):
    """The kernels, with int8 rows from AMX_INT8_MIN_ROWS to AMX_INT8_MAX_ROWS routed to the AMX-INT8 kernel
    whatever this CPU is (its calls answered by the mat-vec where the CPU has none); the shapes it was called
    with."""
    require_cpu_kernels()
    monkeypatch.setattr(cpu_gemv, "_amx_int8_max_rows", lambda: cpu.AMX_INT8_MAX_ROWS)
    calls = []
    module = cpu_gemv.load()
    kernel = "amx_int8_int16_matmul" if module.amx_int8_ready() else "int8_gemv"

    def spy(x, weight, scales):
        calls.append(tuple(x.shape))
        return cpu_gemv._apply(kernel, x, weight, scales)

    monkeypatch.setattr(cpu_gemv, "amx_int8_int16_matmul", spy)
    return calls


def test_int8_linear_gives_batches_to_the_kernel(amx_int8_calls, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    linear = Int8Linear.from_weight(torch.randn(96, 128, generator=generator))
    least, most = cpu.AMX_INT8_MIN_ROWS, cpu.AMX_INT8_MAX_ROWS
    with torch.inference_mode():
        for shape in ((1, least - 1), (1, least), (2, 4), (1, most), (1, most + 1)):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(*shape, 128, generator=generator).to(dtype)
                y = linear(x)
                exact = (x.double() @ linear.weight.double().t()) * linear.scales.double()
                assert y.shape == (*shape, 96) and y.dtype == dtype
                assert ((y.double() - exact).norm() / exact.norm()).item() < 5e-3
        monkeypatch.setattr(cpu_gemv, "AMX_INT8", False)
        linear(torch.randn(8, 128))
    assert amx_int8_calls == [(1, least, 128)] * 2 + [(2, 4, 128)] * 2 + [(1, most, 128)] * 2


def test_a_head_with_groups_of_32_goes_to_the_kernel_and_odd_shapes_stay_with_the_mat_vec(amx_int8_calls):
    generator = torch.Generator().manual_seed(2)
    head = Int8Linear.from_weight(torch.randn(96, 128, generator=generator), group_size=32)
    groups_of_16 = Int8Linear.from_weight(torch.randn(96, 128, generator=generator), group_size=16)
    narrow = Int8Linear.from_weight(torch.randn(64, 96, generator=generator))  # K not a multiple of 64
    with torch.inference_mode():
        x = torch.randn(8, 128, generator=generator)
        y = head(x)
        groups_of_16(x)
        narrow(torch.randn(8, 96, generator=generator))
    assert amx_int8_calls == [(8, 128)]
    exact = x.double() @ head.dequantize(torch.float64).t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-4
    assert _fused_product(head, 8, torch.float32) is None  # the head is not a decoder layer's
    assert _fused_product(narrow, 8, torch.float32)[0] == _INT8_PRODUCT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_decode_layer_gives_batches_to_the_kernel(amx_int8_calls, dtype):
    linear = Int8Linear.from_weight(torch.randn(96, 128))
    assert _fused_product(linear, cpu.AMX_INT8_MIN_ROWS - 1, dtype)[0] == _INT8_PRODUCT
    for rows in (cpu.AMX_INT8_MIN_ROWS, 8, cpu.AMX_INT8_MAX_ROWS):
        kind, weight, scales, _ = _fused_product(linear, rows, dtype)
        assert kind == _AMX_INT8_PRODUCT and weight is linear.weight and scales.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_batched_decode_matches_the_modules(amx_int8, dtype):
    """A batch of 8 through the fused layer (the kernel called from C++) and through the modules (from
    Int8Linear): the same products, so the same logits up to the fused path's own roundings."""
    model = tiny_model(dtype, 8)
    (fused, _), (plain, _) = decode_both_ways(model, 8, dtype)
    assert ((fused - plain).norm() / plain.norm()).item() < (1e-4 if dtype == torch.float32 else 2e-2)
