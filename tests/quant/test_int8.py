"""int8 per output channel: the original QLinear reproduced, and torch's int8 kernel only where it is safe; int8 with
a scale per group of columns (the head of an 8-bit model)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from baichuan.checkpoint import load_model
from baichuan.quant.int4 import int4pack_mm_safe
from baichuan.quant.int8 import Int8Linear, int8pack_mm_safe, quantize_int8
from baichuan.quant.spec import QuantizationError
from baichuan.quant.swap import (
    quantize_model,
)
from tests.conftest import require_cpu_kernels, shared_path


def test_int8_reproduces_baichuan13b_qlinear():
    ref = np.load(shared_path("oracle", "fixtures", "baichuan1_13b", "reference.npz"))
    codes, scales = quantize_int8(torch.from_numpy(ref["quant8_layer0_W_pack_fp32_weight"]))
    assert torch.equal(
        codes.t(), torch.from_numpy(ref["quant8_layer0_W_pack_int8_weightT"])
    )  # QLinear stores [in, out]
    assert torch.equal(scales, torch.from_numpy(ref["quant8_layer0_W_pack_scale"]))


def test_int8_model_matches_original_quantize8_logits():
    """The original quantize(8) leaves lm_head in float; with the same choice the logits agree to float noise on
    the fp32 reference path. The CPU kernels move them far less than int8 quantization itself does (7.2e-3 from
    the float model): ours (int16 activations) by 2.5e-5, PyTorch's (bf16) by 3.2e-3."""
    directory = shared_path("oracle", "fixtures", "baichuan1_13b")
    ref = np.load(directory / "reference.npz")
    ids, expected = torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["quant8_logits"])
    model = load_model(directory / "checkpoint", torch.float32)
    with torch.no_grad():
        quantization_error = (model(ids) - expected).abs().max().item()
    quantize_model(model, 8, overrides={"lm_head": None})
    with torch.no_grad():
        fast = model(ids)
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.use_kernel = False
        reference = model(ids)
    assert (reference - expected).abs().max().item() < 1e-5
    assert (fast - expected).abs().max().item() < 0.5 * quantization_error


def test_torch_int8_kernel_only_where_safe():
    """torch's int8 kernel reads 16 bf16 at a time with aligned loads and no remainder loop (issue 9): it is only
    given in_features % 16 == 0 and aligned buffers. Only the predicate runs here; the kernels run over awkward
    shapes in a child process, in tests/test_native_canary.py."""
    weight = torch.zeros(16, 128, dtype=torch.int8)
    rows = torch.zeros(3, 128, dtype=torch.bfloat16)
    assert int8pack_mm_safe(rows, weight)
    for in_features in (8, 24, 120):  # 8 * odd: wrong sums for one row, SIGSEGV for more on AVX-512
        assert not int8pack_mm_safe(rows[:, :in_features].contiguous(), weight[:, :in_features].contiguous())
    assert not int8pack_mm_safe(torch.zeros(3 * 128 + 1, dtype=torch.bfloat16)[1:].view(3, 128), weight)
    assert not int8pack_mm_safe(rows, torch.zeros(16 * 128 + 8, dtype=torch.int8)[8:].view(16, 128))
    assert not int8pack_mm_safe(rows.t().contiguous().t(), weight)
    # A weight read straight from a file at an odd offset is copied to an aligned buffer once, on loading.
    module = Int8Linear(128, 16, device="meta")
    module.load_state_dict(
        {"weight": torch.zeros(16 * 128 + 8, dtype=torch.int8)[8:].view(16, 128), "scales": torch.ones(16)},
        assign=True,
    )
    assert module.weight.data_ptr() % 64 == 0
    assert int4pack_mm_safe(256, 64, 128) and not int4pack_mm_safe(256, 40, 128)
    assert not int4pack_mm_safe(96, 64, 64) and not int4pack_mm_safe(192, 64, 96)


def test_group_scales_quantize_each_group_against_its_own_absmax():
    """Scales per group of 32 columns (the head of an 8-bit model, as llama.cpp's Q8_0): bf16, one per group,
    codes rounded against the scale as stored, and an outlier costs only its own group's precision."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 256, generator=generator) * 0.02
    weight[:, 7] = 1.0  # an outlier in the first group of every row
    codes, scales = quantize_int8(weight, group_size=32)
    assert scales.dtype == torch.bfloat16 and scales.shape == (40, 8)
    assert codes.abs().amax(-1).eq(127).all()
    step = scales.float().repeat_interleave(32, 1)
    grouped_error = (codes.float() * step - weight).abs()
    assert (grouped_error <= 0.5 * step + 1e-9).all()
    row_codes, row_scales = quantize_int8(weight)
    row_error = (row_codes.float() * row_scales[:, None] - weight).abs()
    assert grouped_error[:, 32:].mean() < 0.1 * row_error[:, 32:].mean()


@pytest.mark.parametrize("group_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_scales_linear_kernel_prompt_and_reference_paths_agree(group_size, dtype):
    """The kernel (decode rows), the tile-by-tile prompt path and the plain reference agree; after `float()` widens
    the scales the kernel reads a bf16 copy of them, made once."""
    require_cpu_kernels()
    generator = torch.Generator().manual_seed(group_size)
    linear = torch.nn.Linear(192, 200, bias=True)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05, generator=generator)
    module = Int8Linear.from_linear(linear, group_size=group_size)
    assert module.group_size == group_size and module.scales.shape == (200, 192 // group_size)
    reference = copy.deepcopy(module)
    reference.use_kernel = False
    exact = linear.weight.detach().double()
    for rows in (1, 3, 8, 40):  # 40 rows: past cpu_gemv.MAX_ROWS, the prompt path
        x = torch.randn(2, rows, 192, generator=generator).to(dtype)
        with torch.no_grad():
            got, want = module(x), reference(x)
        assert got.dtype == dtype and got.shape == (2, rows, 200)
        bound = 1e-4 if dtype == torch.float32 else 1e-2
        assert (got.double() - want.double()).norm() / want.double().norm() < bound
        # the int8 rounding of the weight itself, well under 1%
        assert (
            want.double() - (x.double() @ exact.t() + linear.bias.double())
        ).norm() / want.double().norm() < 1e-2
    module.float()
    assert module.scales.dtype == torch.float32
    x = torch.randn(1, 192, generator=generator)
    with torch.no_grad():
        first, second = module(x), module(x)
    assert torch.equal(first, second) and module._bf16_scales[1].dtype == torch.bfloat16
    assert (first.double() - reference.float()(x).double()).norm() / first.double().norm() < 1e-4


def test_bad_int8_group_is_one_clear_line():
    with pytest.raises(QuantizationError, match="int8 group size must be a positive integer dividing"):
        quantize_int8(torch.zeros(4, 48), group_size=32)
    with pytest.raises(QuantizationError, match=r"int8 scales must have shape \(4,\) or"):
        Int8Linear.from_quantized_tensors(torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, 5))


def test_group_scales_off_the_kernels_tile_the_weight_and_keep_gradients(monkeypatch):
    """Without our kernels (CUDA, or none built) a group-scaled weight is dequantized a tile of rows at a time;
    a gradient to the activations (LoRA over a quantized base) takes the whole weight at once."""
    import baichuan.quant.int8 as int8

    monkeypatch.setattr(int8, "GROUPED_TILE_ROWS", 48)
    generator = torch.Generator().manual_seed(3)
    module = Int8Linear.from_weight(torch.randn(200, 64, generator=generator), group_size=32)
    module.use_kernel = False
    x = torch.randn(3, 5, 64, generator=generator)
    expected = x @ module.dequantize().t()
    with torch.no_grad():
        assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    module(x).sum().backward()
    assert torch.allclose(x.grad, module.dequantize().sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
