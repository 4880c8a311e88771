"""The prompt path of the int8/int4 layers (more rows than `cpu_gemv.MAX_ROWS`): the weight dequantized tile by
tile by `csrc/cpu_prefill.cpp` into one GEMM of torch's per tile, against float64 products of the same weights
over odd shapes; the dequantizing functions in every build this CPU runs; and decode-sized inputs still taking the
decode kernels."""

from __future__ import annotations

import pytest
import torch

from baichuan import cpu, cpu_gemv
from baichuan.cpu import INT8_PROMPT_MIN_ROWS
from baichuan.quant import int4, int8, kernels
from baichuan.quant.int4 import Int4Linear
from baichuan.quant.int8 import Int8Linear
from tests.conftest import int8_activations, int8_reference, kernel_build, require_cpu_kernels, skip_platform
from tests.quant.conftest import gaussian_linear

PROMPT_ROWS = cpu_gemv.MAX_ROWS + 1


@pytest.fixture(scope="module", params=cpu.KERNEL_TARGETS)
def build(request):
    """The compiled module of one target, where this CPU runs it."""
    return kernel_build(request.param)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows, so that every shape below spans several of them and ends on a partial one (the
    default tile holds a whole layer: `test_decode_rows_take_the_decode_kernels` runs that)."""
    require_cpu_kernels()
    monkeypatch.setattr(kernels, "PREFILL_TILE_BYTES", 4096)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def int8_layer(out_features: int, in_features: int) -> Int8Linear:
    return Int8Linear.from_linear(gaussian_linear(in_features, out_features, seed=out_features))


def int4_layer(out_features: int, in_features: int, group_size: int) -> Int4Linear:
    linear = gaussian_linear(in_features, out_features, seed=out_features)
    with torch.no_grad():
        linear.weight[0, :group_size] += 0.5  # a group away from zero: the zero points matter
    return Int4Linear.from_linear(linear, group_size)


def check_prompt(layer, x: torch.Tensor) -> None:
    """fp32 activations: fp32 products of the dequantized weight; bf16 ones: within bf16 rounding of it."""
    w = layer.dequantize().double()
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], layer.out_features)
    assert rel(y, x.double() @ w.t()) < 1e-5
    xb = x.bfloat16()
    yb = layer(xb)
    assert yb.dtype == torch.bfloat16 and rel(yb, xb.double() @ w.t()) < 1e-2


def require_int4_prompt_path() -> None:
    """int4 prompts take the prompt path only where bf16 is native; where it is emulated (this CPU, or a torch
    that cannot tell, such as 2.4) they stay on the decode kernels for every row, as `Int4Linear._gemv` says,
    and tests/test_cpu_gemv.py covers those; but for bf16 prompts under the avx2 build, which the
    `test_avx2_build_*` tests below cover on any CPU."""
    if cpu.half_is_emulated(torch.bfloat16):
        skip_platform(
            "bf16 is emulated here, so int4 prompts stay on the decode kernels (not the prompt path)"
        )


# K not a multiple of 16 (int8 only: torch's int8 kernel and ours refuse those), N odd, rows just past the
# decode kernels and a batch of prompts.
@pytest.mark.parametrize("shape", [(67, 40), (130, 208), (33, 1536), (16, 13)], ids=str)
@pytest.mark.parametrize("leading", [(PROMPT_ROWS,), (3, 70)], ids=str)
def test_int8_prompt_matches_exact_product(small_tiles, shape, leading):
    layer = int8_layer(*shape)
    x = torch.randn(*leading, shape[1], generator=torch.Generator().manual_seed(shape[0]))
    check_prompt(layer, x)


@pytest.mark.parametrize("shape", [(67, 64, 32), (130, 384, 128), (33, 512, 256), (16, 192, 64)], ids=str)
@pytest.mark.parametrize("leading", [(PROMPT_ROWS,), (3, 70)], ids=str)
def test_int4_prompt_matches_exact_product(small_tiles, shape, leading):
    require_int4_prompt_path()
    layer = int4_layer(*shape)
    assert layer.tiled is None  # our kernels built: plain nibbles
    x = torch.randn(*leading, shape[1], generator=torch.Generator().manual_seed(shape[0]))
    rows, w = x.reshape(-1, shape[1]), layer.dequantize().double()
    for xin in (rows, rows.bfloat16()):
        y = layer(xin.view(*leading, shape[1]))
        assert y.dtype == xin.dtype and y.shape == (*leading, shape[0])
        if kernels.takes_int4_int8(cpu_gemv.load(), xin, shape[0]):
            # Activations rounded to int8 per group first (`int4_matmul_int8`): held to that arithmetic, exact up
            # to fp32 (and the bf16 output's) rounding.
            exact, limit = int8_reference(xin, layer), 2e-6
        else:  # the weight dequantized into a GEMM: the float product of the dequantized weight
            exact, limit = xin.double() @ w.t(), 1e-5
        assert rel(y.reshape(-1, shape[0]), exact) < (limit if xin.dtype == torch.float32 else 1e-2)


def test_emulated_bf16_computes_in_fp32(small_tiles, monkeypatch):
    """Where the CPU only emulates bf16, bf16 prompts are multiplied in fp32 and rounded once at the end."""
    monkeypatch.setattr(kernels, "half_is_emulated", lambda dtype: True)
    layer = int8_layer(67, 48)
    x = torch.randn(PROMPT_ROWS, 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = x.double() @ layer.dequantize().double().t()
    assert torch.equal(layer(x), layer(x.float()).bfloat16())
    assert rel(layer(x), exact) < 4e-3


@pytest.mark.parametrize("module_name", ["int8", "int4"])
def test_decode_rows_take_the_decode_kernels(module_name, monkeypatch):
    """Up to MAX_ROWS rows go to cpu_gemv's kernels and never to the prompt path; one row more goes there."""
    require_cpu_kernels()
    if module_name == "int4":
        require_int4_prompt_path()
    calls = []
    module = int8 if module_name == "int8" else int4
    # The avx2 build's int8 prompt kernel takes prompts before the prompt path (the test below follows it).
    monkeypatch.setattr(kernels, "INT8_INT16_PROMPTS", False)
    real = module.prefill_matmul
    monkeypatch.setattr(module, "prefill_matmul", lambda x, *args: calls.append(len(x)) or real(x, *args))
    if module_name == "int4":  # the int8-activation kernel is tried first (None where the build has none)
        real_int8 = int4.int4_matmul_int8
        monkeypatch.setattr(
            int4, "int4_matmul_int8", lambda m, x, *args: calls.append(len(x)) or real_int8(m, x, *args)
        )
    layer = int8_layer(64, 256) if module_name == "int8" else int4_layer(64, 256, 128)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 8, cpu_gemv.MAX_ROWS):
        layer(torch.randn(rows, 256, generator=generator).bfloat16())
    assert calls == []
    layer(torch.randn(PROMPT_ROWS, 256, generator=generator).bfloat16())
    assert calls and set(calls) == {PROMPT_ROWS}


def test_gradients_flow_through_the_reference_path():
    """A prompt that records gradients (out= products record none) takes the widened-weight path (in_features
    not a multiple of 16, where torch's int8 kernel, which has no gradient, is not used either)."""
    require_cpu_kernels()
    layer = int8_layer(32, 40)
    x = torch.randn(PROMPT_ROWS, 40, requires_grad=True, generator=torch.Generator().manual_seed(0))
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(67, 16), (13, 40), (130, 1536)], ids=str)
def test_dequantize_int8_every_build(build, shape):
    generator = torch.Generator().manual_seed(shape[1])
    weight = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    scales = torch.rand(shape[0], generator=generator)
    exact = weight.float() * scales[:, None]
    for start, rows in ((0, shape[0]), (5, 7)):
        out = torch.empty(rows, shape[1])
        build.dequantize_int8(weight, scales, start, out)
        assert torch.equal(out, exact[start : start + rows])
        out16 = torch.empty(rows, shape[1], dtype=torch.bfloat16)
        build.dequantize_int8(weight, scales, start, out16)
        assert torch.equal(out16, exact[start : start + rows].bfloat16())


@pytest.mark.parametrize("shape", [(67, 64, 32), (9, 192, 64), (130, 1536, 128), (5, 512, 256)], ids=str)
def test_dequantize_int4_every_build(build, shape):
    layer = int4_layer(*shape)
    exact = layer.dequantize()
    for start, rows in ((0, shape[0]), (1, 3)):
        out = torch.empty(rows, shape[1])
        build.dequantize_int4(layer.weight, layer.scales_and_zeros, shape[2], start, out)
        assert torch.allclose(out, exact[start : start + rows], rtol=1e-6, atol=1e-7)
        out16 = torch.empty(rows, shape[1], dtype=torch.bfloat16)
        build.dequantize_int4(layer.weight, layer.scales_and_zeros, shape[2], start, out16)
        assert torch.equal(out16, out.bfloat16())


def test_dequantize_refuses_bad_arguments(build):
    weight = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="rows"):
        build.dequantize_int8(weight, torch.ones(8), 4, torch.empty(5, 32))
    with pytest.raises(RuntimeError, match="columns"):
        build.dequantize_int8(weight, torch.ones(8), 0, torch.empty(2, 16))
    with pytest.raises(RuntimeError, match="group size"):
        build.dequantize_int4(
            torch.zeros(8, 24, dtype=torch.uint8), torch.zeros(1, 8, 2).bfloat16(), 48, 0, torch.empty(2, 48)
        )


# N: one block of 64 columns, a block and a tail of 16, a tail of 48; M not a multiple of the 4-row tiles.
@pytest.mark.parametrize("shape", [(64, 256, 128), (80, 384, 128), (112, 192, 64), (16, 1536, 32)], ids=str)
@pytest.mark.parametrize("rows", [1, 7, 66])
def test_int4_matmul_int8_every_build(build, shape, rows):
    layer = int4_layer(*shape)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, shape[1], generator=generator)
    x[0, : shape[2]] *= 50  # one group's scale far from the others
    if rows > 1:
        x[1] = 0  # a row of zeros: scale 0, no division by it
    for xin in (x, x.bfloat16()):
        out = torch.full((rows, shape[0]), float("nan"))
        build.int4_matmul_int8(xin, layer.weight, layer.scales_and_zeros, shape[2], out)
        # Its own arithmetic: exact integer dots, then fp32 rounding only.
        assert rel(out, int8_reference(xin, layer)) < 2e-6
        # The exact product: each input is off by at most half its group's step, so each output is off by at most
        # sum_g step_g / 2 * sum_(k in g) |w[n, k]| (plus fp32 rounding).
        w = layer.dequantize().double()
        exact = xin.double() @ w.t()
        _, xs = int8_activations(xin, shape[2])
        abs_w = w.abs().view(shape[0], -1, shape[2]).sum(-1)  # (N, K/G)
        bound = (xs.double().squeeze(-1) / 2) @ abs_w.t()
        assert ((out.double() - exact).abs() <= bound * 1.001 + 1e-5 * exact.abs().max()).all()
        if rows > 2:  # plain Gaussian rows (row 0 has a scaled-up group, row 1 is zero): 1-2%
            assert rel(out[2:], exact[2:]) < 2.5e-2
        if rows > 1:
            assert torch.equal(out[1], torch.zeros(shape[0]))


def test_int4_matmul_int8_refuses_bad_arguments(build):
    layer = int4_layer(24, 64, 32)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        build.int4_matmul_int8(
            torch.zeros(2, 64), layer.weight, layer.scales_and_zeros, 32, torch.empty(2, 24)
        )
    layer = int4_layer(16, 64, 32)
    with pytest.raises(RuntimeError, match="out"):
        build.int4_matmul_int8(
            torch.zeros(2, 64), layer.weight, layer.scales_and_zeros, 32, torch.empty(2, 32)
        )


def test_int4_prompts_take_the_int8_kernel(monkeypatch):
    """bf16 and fp32 prompts of a layer whose outputs are a multiple of 16 go to the int8 kernel where the build has
    it (bf16 ones not where the CPU has AMX); with INT4_INT8_ACTIVATIONS off they take the dequantizing path (fp32
    ones exact there)."""
    require_cpu_kernels()
    require_int4_prompt_path()
    module = cpu_gemv.load()
    layer = int4_layer(96, 512, 128)
    x = torch.randn(3, 70, 512, generator=torch.Generator().manual_seed(0))
    xb = x.bfloat16()
    exact = xb.double() @ layer.dequantize().double().t()
    y = layer(xb)
    bf16_takes_it = kernels.takes_int4_int8(module, xb, 96)
    assert bf16_takes_it == (hasattr(module, "int4_matmul_int8") and not cpu.has_amx())
    if hasattr(module, "int4_matmul_int8"):
        direct = torch.empty(210, 96)
        module.int4_matmul_int8(xb.view(210, 512), layer.weight, layer.scales_and_zeros, 128, direct)
        assert torch.equal(y, direct.view(3, 70, 96).bfloat16()) == bf16_takes_it
        direct32 = torch.empty(210, 96)
        module.int4_matmul_int8(x.view(210, 512), layer.weight, layer.scales_and_zeros, 128, direct32)
        assert torch.equal(layer(x), direct32.view(3, 70, 96))
    assert y.dtype == torch.bfloat16 and rel(y, exact) < 1e-2
    exact32 = x.double() @ layer.dequantize().double().t()
    assert layer(x).dtype == torch.float32 and rel(layer(x), exact32) < 1e-2
    monkeypatch.setattr(kernels, "INT4_INT8_ACTIVATIONS", False)
    y_dequantized = layer(xb)  # products of the dequantized weight
    assert rel(y_dequantized, exact) < 1e-2
    assert torch.equal(y_dequantized, y) != bf16_takes_it
    assert rel(layer(x), exact32) < 1e-5  # fp32 on the dequantizing path: exact


# --- the avx2 build's int4 x int8 product (`vpmaddubsw`) -------------------------------------------------------


def int8_dequantized_reference(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """float64 product of the activations as the kernel quantizes them (xq * xs) and the dequantized weight."""
    xq, xs = int8_activations(x, layer.group_size)
    return (xq.double() * xs.double()).view(x.shape[0], -1) @ layer.dequantize().double().t()


# Rows past the decode kernels and across the 4-row tiles (129, 200, 513); outputs a multiple of 16 but not of the
# 64-column blocks; every group size the prompt path meets.
@pytest.mark.parametrize("shape", [(48, 96, 32), (208, 192, 64), (80, 384, 128), (64, 512, 32)], ids=str)
@pytest.mark.parametrize("rows", [129, 200, 513])
def test_avx2_int4_matmul_int8_matches_the_references(shape, rows):
    """The avx2 kernel against the dequantized weight times the int8-quantized activations (float64), and against
    the AVX-512 kernel (same quantizing, same fp32 arithmetic on the same int32 dots: equal) where this CPU runs it."""
    avx2 = kernel_build("avx2")
    layer = int4_layer(*shape)
    generator = torch.Generator().manual_seed(rows + shape[0])
    x = torch.randn(rows, shape[1], generator=generator)
    x[3, : shape[2]] *= 50  # one group's scale far from the others
    x[5] = 0  # a row of zeros
    for xin in (x.bfloat16(), x):
        out = torch.full((rows, shape[0]), float("nan"))
        avx2.int4_matmul_int8(xin, layer.weight, layer.scales_and_zeros, shape[2], out)
        assert rel(out, int8_dequantized_reference(xin, layer)) < 2e-6
        assert rel(out, int8_reference(xin, layer)) < 2e-6
        assert torch.equal(out[5], torch.zeros(shape[0]))
        if "avx512" in cpu.kernel_targets():
            out512 = torch.empty(rows, shape[0])
            kernel_build("avx512").int4_matmul_int8(
                xin, layer.weight, layer.scales_and_zeros, shape[2], out512
            )
            assert torch.equal(out, out512)


@pytest.mark.parametrize("shape", [(48, 96, 32), (208, 192, 64), (80, 384, 128), (32, 480, 160)], ids=str)
def test_avx2_int4_decode_and_prompt_kernels_agree(shape):
    """The avx2 build rounds int4 activations to int8 alike for decoding (`int4_gemv`) and for prompts
    (`int4_matmul_int8`), so a row gets the same product from either to fp32 rounding: a prompt's last position
    and the decode steps after it see one quantization. Groups of 160: odd multiples of 32 past one chunk."""
    avx2 = kernel_build("avx2")
    layer = int4_layer(*shape)
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(shape[0]))
    x[2, : shape[2]] *= 50  # one group's scale far from the others
    for xin in (x, x.bfloat16()):
        prompt = torch.empty(5, shape[0])
        avx2.int4_matmul_int8(xin, layer.weight, layer.scales_and_zeros, shape[2], prompt)
        decode = avx2.int4_gemv(xin.float(), layer.weight, layer.scales_and_zeros, shape[2])
        assert rel(decode, prompt.double()) < 2e-6


def test_avx2_int4_matmul_int8_sums_the_extremes_exactly():
    """Codes 15 against activations +-127 over whole groups: the s16 sums of 32 products reach +-30480, the most
    they can, and must not wrap (the dot of a group of 128 is then 127 * 15 * 128 in int32)."""
    avx2 = kernel_build("avx2")
    n, k, g = 32, 256, 128
    codes = torch.full((n, k), 15, dtype=torch.uint8)
    codes[1::2, 64:] = 0  # some columns of code 0: the other extreme
    scales = torch.full((n, k // g), 0.5)
    zeros = torch.zeros(n, k // g)
    layer = Int4Linear.from_quantized_tensors(codes, scales, zeros, g, packed=False)
    x = torch.ones(2, k)
    x[1] = -1
    out = torch.empty(2, n)
    avx2.int4_matmul_int8(x.bfloat16(), layer.weight, layer.scales_and_zeros, g, out)
    exact = x.double() @ layer.dequantize().double().t()  # +-1 quantize to +-127 exactly
    assert torch.equal(out.double(), exact)


class CountingBuild:
    """A kernel module that records the rows of each product it runs (`int4_gemv`, `int4_matmul_int8`, ...)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def counted(x, *args):
            self.calls.append((name, x.shape[0]))
            return attr(x, *args)

        return counted


@pytest.mark.parametrize("emulated", [True, False], ids=["bf16-emulated", "bf16-native"])
def test_avx2_build_sends_int4_bf16_prompts_to_the_int8_kernel(monkeypatch, emulated):
    """Under the avx2 build, bf16 and fp32 prompts of an int4 layer go to `int4_matmul_int8` (where bf16 is
    emulated, as on a Zen 3, instead of the decode kernel); decode rows and outputs not a multiple of 16 keep their
    paths."""
    build = CountingBuild(kernel_build("avx2"))
    monkeypatch.setattr(cpu_gemv, "load", lambda: build)
    monkeypatch.setattr(int4, "half_is_emulated", lambda dtype: emulated)
    monkeypatch.setattr(kernels, "half_is_emulated", lambda dtype: emulated)
    monkeypatch.setattr(kernels, "has_amx", lambda: False)  # a Zen 3, or a Zen 4 with the avx2 build forced
    layer = int4_layer(96, 512, 128)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 512, generator=generator).bfloat16()
    y = layer(x)
    assert build.calls == [("int4_matmul_int8", 210)]
    direct = torch.empty(210, 96)
    build.module.int4_matmul_int8(x.view(210, 512), layer.weight, layer.scales_and_zeros, 128, direct)
    assert torch.equal(y, direct.view(3, 70, 96).bfloat16())
    build.calls.clear()
    layer(torch.randn(cpu_gemv.MAX_ROWS, 512, generator=generator).bfloat16())
    assert build.calls == [("int4_gemv", cpu_gemv.MAX_ROWS)]
    build.calls.clear()
    layer(x.float())
    assert build.calls == [("int4_matmul_int8", 210)]
    build.calls.clear()
    odd = int4_layer(40, 512, 128)
    odd(x)
    assert [name for name, _ in build.calls] == (["int4_gemv"] if emulated else ["dequantize_int4"])


@pytest.mark.parametrize("target", cpu.KERNEL_TARGETS)
def test_amx_sends_int4_bf16_prompts_to_the_dequantized_gemm(monkeypatch, target):
    """Where torch's bf16 GEMM runs on AMX tiles, a bf16 prompt's int4 weight is dequantized into it in every
    build; fp32 prompts keep the int8 kernel."""
    build = CountingBuild(kernel_build(target))
    monkeypatch.setattr(cpu_gemv, "load", lambda: build)
    monkeypatch.setattr(int4, "half_is_emulated", lambda dtype: False)
    monkeypatch.setattr(kernels, "half_is_emulated", lambda dtype: False)
    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    layer = int4_layer(96, 512, 128)
    x = torch.randn(3, 70, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = layer(x)
    assert [name for name, _ in build.calls] == ["dequantize_int4"]
    assert rel(y, x.double() @ layer.dequantize().double().t()) < 1e-2
    build.calls.clear()
    layer(x.float())
    assert build.calls == [("int4_matmul_int8", 210)]


@pytest.mark.parametrize("target", cpu.KERNEL_TARGETS)
def test_amx_sends_int8_bf16_prompts_to_the_dequantized_gemm(monkeypatch, target):
    """The avx2 build's int8 prompt kernel takes fp32 prompts, but not bf16 ones where the GEMM runs on AMX tiles."""
    build = CountingBuild(kernel_build(target))
    monkeypatch.setattr(cpu_gemv, "load", lambda: build)
    monkeypatch.setattr(int8, "half_is_emulated", lambda dtype: False)
    monkeypatch.setattr(kernels, "half_is_emulated", lambda dtype: False)
    monkeypatch.setattr(kernels, "has_amx", lambda: True)
    layer = int8_layer(96, 512)
    x = torch.randn(3, 70, 512, generator=torch.Generator().manual_seed(0))
    y = layer(x.bfloat16())
    assert [name for name, _ in build.calls] == ["dequantize_int8"]
    assert rel(y, x.bfloat16().double() @ layer.dequantize().double().t()) < 1e-2
    build.calls.clear()
    layer(x)
    assert [name for name, _ in build.calls] == [
        "int8_matmul_int16" if target in cpu.AVX2_TARGETS else "dequantize_int8"
    ]


def test_avx512_build_keeps_its_emulated_bf16_route(monkeypatch):
    """Only the avx2 build's routing changed: an AVX-512 build where bf16 is emulated still sends int4 prompts to
    the decode kernel."""
    if "avx512" not in cpu.kernel_targets():
        skip_platform("this CPU cannot run the avx512 kernels")
    build = CountingBuild(kernel_build("avx512"))
    monkeypatch.setattr(cpu_gemv, "load", lambda: build)
    monkeypatch.setattr(int4, "half_is_emulated", lambda dtype: True)
    layer = int4_layer(96, 512, 128)
    layer(torch.randn(PROMPT_ROWS, 512, generator=torch.Generator().manual_seed(0)).bfloat16())
    assert build.calls == [("int4_gemv", PROMPT_ROWS)]


def test_avx2_build_int4_model_prompt_takes_the_int8_kernel(monkeypatch):
    """A bf16 int4 model's prompt under the avx2 build, bf16 emulated (a Zen 3): every int4 layer runs the int8
    kernel, none the decode kernel, and the logits stay those of the dequantized model."""
    from baichuan.config import ROPE
    from baichuan.model import Baichuan
    from baichuan.quant.swap import quantize_model
    from tests.conftest import tiny_config

    build = CountingBuild(kernel_build("avx2"))
    monkeypatch.setattr(cpu_gemv, "load", lambda: build)
    monkeypatch.setattr(int4, "half_is_emulated", lambda dtype: True)
    monkeypatch.setattr(kernels, "has_amx", lambda: False)  # bf16 emulated: no AMX either
    model = Baichuan(tiny_config(ROPE, ffn_dim=128))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    quantize_model(model, 4, group_size=32)
    model = model.to(torch.bfloat16).eval()
    n_int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    ids = torch.randint(3, 512, (1, PROMPT_ROWS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = model(ids)
        names = [name for name, rows in build.calls if rows == PROMPT_ROWS]
        assert names.count("int4_matmul_int8") == n_int4 > 0 and "int4_gemv" not in names
        for m in model.modules():
            if isinstance(m, Int4Linear):
                m.use_kernel = False  # the dequantized weight, in fp32 (`_matmul`'s reference path)
        reference = model(ids)
    assert rel(logits.float(), reference.double()) < 3e-2


# int8 prompts on the avx2 target: `int8_matmul_int16` (csrc/cpu_prompt_int8.cpp), the decode kernel's arithmetic in
# GEMM blocking. N: a block of 64 columns, blocks with tails of 16 and 48; K: one activation block of 256, six,
# blocks of 16 (48, 208) and 4096; rows around the 4-row tiles and the decode kernel's 8-row passes.
@pytest.mark.parametrize("shape", [(64, 256), (80, 1536), (112, 48), (16, 4096), (32, 208)], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 66])
def test_int8_matmul_int16_gives_the_decode_kernels_bits(build, shape, rows):
    """Per-row scales: the same int16 codes, exact int32 block sums and fp32 steps as the avx2 decode kernel, so
    the same bits for every row, whatever the build; Gaussian rows within 1e-4 of the exact product."""
    decode = kernel_build("avx2")
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(rows * in_features)
    weight = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    x[0, :16] *= 1000  # one block's scale far from the others
    if rows > 1:
        x[1] = 0  # a row of zeros: scale 0
    for xin in (x, x.bfloat16()):
        out = torch.full((rows, out_features), float("nan"))
        build.int8_matmul_int16(xin, weight, scales, out)
        assert torch.equal(out, decode.int8_gemv(xin.float(), weight, scales))
        if rows > 2:  # plain Gaussian rows (row 0's block of large values leaves its others few bits)
            exact = (xin[2:].double() @ weight.double().t()) * scales.double()
            assert rel(out[2:], exact) < 1e-4
        if rows > 1:
            assert torch.equal(out[1], torch.zeros(out_features))


# Groups of 16 to 256 inputs; of 48, the kernel's chunks of 256 inputs hold 5 whole groups, and the last chunk fewer.
@pytest.mark.parametrize(
    "shape", [(64, 256, 32), (80, 1536, 32), (16, 1024, 64), (48, 512, 256), (32, 48, 16), (16, 480, 48)]
)
@pytest.mark.parametrize("rows", [1, 2, 5, 66])
def test_int8_matmul_int16_group_scales(build, shape, rows):
    """Group scales (an output head's): each block's scale is the group's times the activations', as the decode
    kernel rounds it, so the same bits as its passes of several rows; one row alone it sums 8 groups at a time
    in the lanes of a vector, so there the two differ by fp32 rounding only."""
    decode = kernel_build("avx2")
    out_features, in_features, group_size = shape
    generator = torch.Generator().manual_seed(rows * in_features)
    weight = torch.randint(-127, 128, shape[:2], dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, in_features // group_size, generator=generator).bfloat16()
    widened = weight.double() * scales.double().repeat_interleave(group_size, 1)
    x = torch.randn(rows, in_features, generator=generator)
    out = torch.empty(rows, out_features)
    build.int8_matmul_int16(x, weight, scales, out)
    expected = decode.int8_gemv(x, weight, scales)
    if rows > 1:
        assert torch.equal(out, expected)
    else:
        assert rel(out, expected.double()) < 1e-6
    assert rel(out, x.double() @ widened.t()) < 1e-4


def test_int8_matmul_int16_propagates_inf_and_nan(build):
    weight = torch.ones(16, 64, dtype=torch.int8)
    x = torch.ones(3, 64)
    x[0, 3], x[2, 60] = float("inf"), float("nan")
    out = torch.zeros(3, 16)
    build.int8_matmul_int16(x, weight, torch.ones(16), out)
    assert out[0].isnan().all() and out[2].isnan().all() and torch.equal(out[1], torch.full((16,), 64.0))


def test_int8_matmul_int16_refuses_bad_arguments(build):
    weight = torch.zeros(24, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        build.int8_matmul_int16(torch.zeros(2, 64), weight, torch.ones(24), torch.empty(2, 24))
    weight = torch.zeros(16, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="out: contiguous fp32"):
        build.int8_matmul_int16(torch.zeros(2, 64), weight, torch.ones(16), torch.empty(2, 32))
    with pytest.raises(RuntimeError, match="x: contiguous"):
        build.int8_matmul_int16(torch.zeros(2, 48), weight, torch.ones(16), torch.empty(2, 16))
    with pytest.raises(RuntimeError, match="group size must be a multiple of 16"):
        build.int8_matmul_int16(torch.zeros(2, 64), weight, torch.ones(16, 8).bfloat16(), torch.empty(2, 16))
    with pytest.raises(RuntimeError, match="K must be a multiple of 16"):
        build.int8_matmul_int16(
            torch.zeros(2, 40), torch.zeros(16, 40, dtype=torch.int8), torch.ones(16), torch.empty(2, 16)
        )


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_prompts_take_the_prompt_kernel_on_avx2(monkeypatch, group_size):
    """From `INT8_PROMPT_MIN_ROWS` rows, prompts of the avx2 build go to `int8_matmul_int16` and give each row the
    bits it gets decoded alone (per-row scales); fewer rows stay on the decode kernel. Other builds, or the switch
    off: the routes before it (the decode kernel up to MAX_ROWS, then the dequantizing path)."""
    require_cpu_kernels()
    calls = []
    real = int8.int8_matmul_int16
    monkeypatch.setattr(
        int8, "int8_matmul_int16", lambda m, x, *a: calls.append(x.numel() // x.shape[-1]) or real(m, x, *a)
    )
    linear = gaussian_linear(256, 64, seed=1)
    layer = Int8Linear.from_linear(linear, group_size=group_size)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 8, INT8_PROMPT_MIN_ROWS - 1):
        layer(torch.randn(rows, 256, generator=generator))
    assert calls == []
    x = torch.randn(2, PROMPT_ROWS // 2, 256, generator=generator)
    y = layer(x)
    assert calls == [PROMPT_ROWS // 2 * 2] and y.shape == (2, PROMPT_ROWS // 2, 64)
    exact = x.double() @ layer.dequantize().double().t()
    assert rel(y, exact) < 1e-4
    avx2 = cpu_gemv.load().target in cpu.AVX2_TARGETS
    if avx2 and group_size is None:
        rows = x.view(-1, 256)
        assert torch.equal(y.view(-1, 64)[::37], torch.cat([layer(row[None]) for row in rows[::37]]))
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    monkeypatch.setattr(kernels, "INT8_INT16_PROMPTS", False)
    assert rel(layer(x), exact) < 1e-4
