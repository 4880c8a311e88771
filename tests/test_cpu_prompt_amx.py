"""The AMX bf16 kernel (`cpu_gemv.amx_bf16_matmul`, csrc/cpu_prompt_amx.cpp) against float64 products of the same
operands, where this CPU has AMX-BF16; and where bf16 products go to it (`cpu.amx_bf16_max_rows`,
`cpu_gemv.bf16_linear`, the fused decode layer), on any CPU.

The tiles sum exact products of bf16 values in fp32 and the result is rounded to bf16 once, so each output is
within one bf16 step (2^-8 relative, plus fp32 rounding of the sum) of the exact product."""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu, cpu_gemv, model
from baichuan.model import (
    _AMX_BF16_PRODUCT,
    _BF16_PRODUCT,
    _TORCH_PRODUCT,
    Linear,
    _fused_layer,
    _fused_product,
)
from tests.conftest import kernel_build, on_one_thread, random_bf16_linear, require_cpu_kernels
from tests.test_fused import decode_both_ways, tiny_model


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


# Rows around the 16-row tiles and the 32-row pairs of them, past those multiplied with K in chunks (more than 256:
# kFewRowPairs in csrc/cpu_prompt_amx.cpp) and past one panel of them (more than 512); K of one 32-value step, of a
# chunk and a step more (288), or many; N of one block of 32 outputs or many (96: blocks that do not fill a group).
@pytest.mark.parametrize("rows", [1, 9, 16, 17, 31, 33, 77, 128, 300, 600])
@pytest.mark.parametrize("shape", [(32, 32), (96, 288), (1536, 256), (64, 4096)], ids=str)
def test_matches_the_exact_product(amx, shape, rows):
    N, K = shape
    x, weight = operands(rows, N, K, seed=rows + N)
    assert_within_one_bf16_step(amx.amx_bf16_matmul(x, weight), x, weight)


@pytest.mark.parametrize("rows", [45, 300])  # K whole, or in chunks
def test_the_bits_do_not_depend_on_the_threads(amx, rows):
    x, weight = operands(rows, 32 * 7, 96, seed=3)  # 7 blocks over 2 threads
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


def test_the_fused_decode_layer_gives_bf16_batches_to_the_kernel(amx_calls, monkeypatch):
    # past the AMX kernel's rows, as where bf16 is native: torch's product (elsewhere other prompt paths)
    monkeypatch.setattr(cpu_gemv, "_bf16_prompt_min_rows", lambda: None)
    monkeypatch.setattr(model, "half_is_emulated", lambda dtype: False)
    linear = Linear(64, 96, bias=False).bfloat16()
    assert _fused_product(linear, cpu.AMX_BF16_MIN_ROWS - 1, torch.bfloat16)[0] == _BF16_PRODUCT
    for rows in (cpu.AMX_BF16_MIN_ROWS, cpu.BF16_GEMV_MAX_ROWS, cpu.AMX_BF16_MAX_ROWS):
        kind, weight, _, _ = _fused_product(linear, rows, torch.bfloat16)
        assert kind == _AMX_BF16_PRODUCT and weight is linear.weight
    strided = Linear(64, 96, bias=False).bfloat16()
    # (96, 64), not contiguous
    strided.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t())
    assert _fused_product(strided, cpu.AMX_BF16_MIN_ROWS, torch.bfloat16) is None  # the module's forward
    assert (
        _fused_product(Linear(64, 48, bias=False).bfloat16(), cpu.BF16_GEMV_MAX_ROWS, torch.bfloat16)[0]
        == _BF16_PRODUCT
    )
    assert _fused_product(linear, cpu.AMX_BF16_MAX_ROWS + 1, torch.bfloat16)[0] == _TORCH_PRODUCT


def test_fused_batched_decode_matches_the_modules(amx):
    """A bf16 batch of 8 through the fused layer (the AMX kernel called from C++) and through the modules (from
    Linear): the same products, so the same logits up to the fused path's own roundings."""
    tiny = tiny_model(torch.bfloat16, None)
    layer = _fused_layer(tiny.model.layers[0], 8, torch.bfloat16)
    assert layer is not None and set(layer[4]) == {_AMX_BF16_PRODUCT}
    (fused, _), (plain, _) = decode_both_ways(tiny, 8, torch.bfloat16)
    assert ((fused - plain).norm() / plain.norm()).item() < 2e-2


# --- int8 codes (amx_int8_matmul) -----------------------------------------------------------------------------------


def int8_operands(rows: int, N: int, K: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=generator).bfloat16()
    codes = torch.randint(-127, 128, (N, K), generator=generator, dtype=torch.int8)
    scales = torch.rand(N, generator=generator) * 0.01 + 1e-4
    return x, codes, scales


@pytest.mark.parametrize("rows", [1, 9, 17, 33, 128, 384, 600])
@pytest.mark.parametrize("shape", [(32, 32), (96, 288), (64, 4096)], ids=str)
def test_int8_codes_match_the_exact_product(amx, shape, rows):
    N, K = shape
    x, codes, scales = int8_operands(rows, N, K, seed=rows + N)
    y = amx.amx_int8_matmul(x, codes, scales)
    exact = (x.double() @ codes.double().t()) * scales.double()
    magnitudes = (x.double().abs() @ codes.double().abs().t()) * scales.double()
    # the codes widen to bf16 exactly: one rounding to bf16 at the end, fp32 sums and the fp32 scaling before it
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= exact.abs() * 2.0**-8 + magnitudes * 2.0**-20).all()


def test_int8_bits_do_not_depend_on_the_threads(amx):
    x, codes, scales = int8_operands(45, 32 * 7, 96, seed=4)
    assert torch.equal(
        on_one_thread(lambda: amx.amx_int8_matmul(x, codes, scales)), amx.amx_int8_matmul(x, codes, scales)
    )


@pytest.mark.parametrize(
    ("codes", "scales", "message"),
    [
        (torch.zeros(32, 64, dtype=torch.int8), torch.ones(32).bfloat16(), "scales must be contiguous fp32"),
        (torch.zeros(32, 64, dtype=torch.int8), torch.ones(64), r"scales must be contiguous fp32 \(32,\)"),
        (torch.zeros(32, 64).bfloat16(), torch.ones(32), "int8 codes"),
        (torch.zeros(48, 64, dtype=torch.int8), torch.ones(48), "multiples of 32"),
    ],
    ids=["scale-dtype", "scale-shape", "weight-dtype", "outputs"],
)
def test_bad_int8_operands_are_refused_with_a_message(amx, codes, scales, message):
    with pytest.raises(RuntimeError, match=message):
        amx.amx_int8_matmul(torch.randn(4, 64).bfloat16(), codes, scales)


@pytest.mark.parametrize(
    ("target", "amx", "expected"),
    [
        ("avx512bf16", True, cpu.AMX_QUANTIZED_MAX_ROWS),
        ("avx512bf16", False, 0),
        ("avx512", True, 0),
        ("avx2", True, 0),
    ],
)
def test_only_the_avx512bf16_build_on_an_amx_cpu_takes_int8_prompts(monkeypatch, target, amx, expected):
    monkeypatch.setattr(cpu, "has_amx", lambda: amx)
    assert cpu.amx_quantized_max_rows(target) == expected
    # our int8 mat-vec keeps batched decoding's rows; past the kernel's rows, the dequantized weight in torch's GEMM
    assert (
        cpu.BF16_GEMV_MAX_ROWS < cpu.AMX_QUANTIZED_MIN_ROWS <= cpu.GEMV_MAX_ROWS < cpu.AMX_QUANTIZED_MAX_ROWS
    )


@pytest.mark.parametrize("rows", [1, 9, 33, 384, 600])
@pytest.mark.parametrize(("shape", "group"), [((32, 32), 32), ((96, 256), 64), ((64, 4096), 128)], ids=str)
def test_int4_codes_match_the_exact_product_of_their_bf16_dequantization(amx, shape, group, rows):
    from baichuan.quant.int4 import Int4Linear

    N, K = shape
    generator = torch.Generator().manual_seed(rows + N)
    layer = Int4Linear.from_weight(torch.randn(N, K, generator=generator).bfloat16(), group_size=group)
    assert layer.tiled is None  # the plain nibbles
    x = torch.randn(rows, K, generator=generator).bfloat16()
    weight = torch.empty(N, K, dtype=torch.bfloat16)
    amx.dequantize_int4(layer.weight, layer.scales_and_zeros, group, 0, weight)  # the prompts' rounding
    assert_within_one_bf16_step(
        amx.amx_int4_matmul(x, layer.weight, layer.scales_and_zeros, group), x, weight
    )


def test_bad_int4_operands_are_refused_with_a_message(amx):
    x, packed = torch.randn(4, 64).bfloat16(), torch.zeros(32, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="multiple of 32 dividing K"):
        amx.amx_int4_matmul(x, packed, torch.zeros(4, 32, 2).bfloat16(), 16)
    with pytest.raises(
        RuntimeError, match=r"scales_and_zeros must be contiguous bf16 \(K/group_size, N, 2\)"
    ):
        amx.amx_int4_matmul(x, packed, torch.zeros(1, 32, 2), 64)
    with pytest.raises(RuntimeError, match="packed in uint8"):
        amx.amx_int4_matmul(x, packed.to(torch.int8), torch.zeros(1, 32, 2).bfloat16(), 64)


@pytest.fixture
def amx_quantized_calls(monkeypatch):
    """As amx_calls, for int8 and int4 weights: rows from AMX_QUANTIZED_MIN_ROWS to AMX_QUANTIZED_MAX_ROWS routed to
    the kernels (answered by the dequantized product where this CPU has no AMX); the shapes they were called with.
    The int8 rows the AMX-INT8 kernel takes first where the CPU has it (test_cpu_amx_int8.py) stay with these."""
    require_cpu_kernels()
    monkeypatch.setattr(cpu_gemv, "_amx_quantized_max_rows", lambda: cpu.AMX_QUANTIZED_MAX_ROWS)
    monkeypatch.setattr(cpu_gemv, "_amx_int8_max_rows", lambda: 0)
    calls = []
    ready = cpu_gemv.load().amx_ready()

    def int8(x, codes, scales):
        calls.append(("int8", tuple(x.shape)))
        if ready:
            return cpu_gemv._apply("amx_int8_matmul", x, codes, scales)
        return (x.float() @ (codes.float() * scales[:, None]).t()).to(x.dtype)

    def int4(x, packed, scales_and_zeros, group):
        calls.append(("int4", tuple(x.shape)))
        if ready:
            return cpu_gemv._apply("amx_int4_matmul", x, packed, scales_and_zeros, group)
        weight = torch.empty(packed.shape[0], x.shape[-1], dtype=torch.bfloat16)
        cpu_gemv.load().dequantize_int4(packed, scales_and_zeros, group, 0, weight)
        return torch.nn.functional.linear(x, weight)

    monkeypatch.setattr(cpu_gemv, "amx_int8_matmul", int8)
    monkeypatch.setattr(cpu_gemv, "amx_int4_matmul", int4)
    return calls


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_give_bf16_prompts_to_the_kernels(amx_quantized_calls, monkeypatch, bits):
    from baichuan.quant.int4 import Int4Linear
    from baichuan.quant.int8 import Int8Linear

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    if bits == 8:
        layer = Int8Linear.from_weight(weight)
        refused = Int8Linear.from_weight(weight, group_size=32)  # group scales: not the kernel's
    else:
        layer = Int4Linear.from_weight(weight, group_size=32)
        refused = Int4Linear.from_weight(weight[:80], group_size=32)  # 80 outputs: not a multiple of 32
    least, most = cpu.AMX_QUANTIZED_MIN_ROWS, cpu.AMX_QUANTIZED_MAX_ROWS
    with torch.inference_mode():
        for shape in ((1, least - 1), (1, least), (3, 20), (1, most), (1, most + 1)):
            x = torch.randn(*shape, 64, generator=generator).bfloat16()
            y = layer(x)
            exact = x.double() @ layer.dequantize(torch.float64).t()
            assert y.shape == (*shape, 96) and y.dtype == torch.bfloat16
            # bf16 outputs; the rows left to the mat-vecs of the avx2 build (int4) have int8 activations: ~5e-3
            assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-2
        x = torch.randn(20, 64, generator=generator)
        layer(x)  # fp32 rows: not the kernel's
        refused(x.bfloat16())
        monkeypatch.setattr(cpu_gemv, "AMX_PROMPTS", False)
        layer(x.bfloat16())
    kind = f"int{bits}"
    assert amx_quantized_calls == [(kind, (1, least, 64)), (kind, (3, 20, 64)), (kind, (1, most, 64))]


def test_the_fused_decode_layer_leaves_quantized_prompt_rows_to_the_kernels(amx_quantized_calls):
    from baichuan.model import _INT4_PRODUCT, _INT8_PRODUCT
    from baichuan.quant.int4 import Int4Linear
    from baichuan.quant.int8 import Int8Linear

    weight = torch.randn(96, 64).bfloat16()
    layers = {
        _INT8_PRODUCT: Int8Linear.from_weight(weight),
        _INT4_PRODUCT: Int4Linear.from_weight(weight, group_size=32),
    }
    least = cpu.AMX_QUANTIZED_MIN_ROWS
    for product, layer in layers.items():
        assert _fused_product(layer, least - 1, torch.bfloat16)[0] == product
        assert _fused_product(layer, least, torch.bfloat16) is None  # the module's forward
        assert _fused_product(layer, least, torch.float32)[0] == product  # fp32 rows stay
