"""The quantized layers and the model on CUDA (`pytest -m cuda`; platform skips without a GPU), and the parts of
the CUDA packing that a CPU can check.

On CUDA, Int4Linear keeps its codes in torch's tinygemm tiling and Int8Linear calls torch's fused int8 kernel
for decode-sized products; both are compared with the reference dequantise-and-matmul path on the same weights
(bf16 rounding: 1e-2), and the portable state dict must not depend on the device the layer is on.
"""

from __future__ import annotations

import pytest
import torch

from baichuan.quant.int4 import Int4Linear, pack_int4
from baichuan.quant.int8 import Int8Linear
from baichuan.quant.kernels import (
    CUDA_INT8_KERNEL_MAX_ROWS,
    cuda_int4_inner_k_tiles,
    cuda_int4_nibble_order,
    swap_nibbles,
)
from tests.quant.conftest import gaussian_linear, input_ids, rel, tiny_model

cuda = pytest.mark.cuda


# --- on any machine ---------------------------------------------------------------------------------------------


def test_swapped_nibbles_are_the_high_nibble_first_order():
    codes = torch.randint(0, 16, (24, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    high_first = (codes[:, 0::2] << 4) | codes[:, 1::2]  # torch >= 2.5's input to _convert_weight_to_int4pack
    assert torch.equal(swap_nibbles(pack_int4(codes)), high_first)
    assert torch.equal(swap_nibbles(swap_nibbles(pack_int4(codes))), pack_int4(codes))


@pytest.mark.parametrize(
    "shape, tiles",
    [
        ((4096, 12288, 128), 8),  # Baichuan2-7B W_pack
        ((11008, 4096, 128), 8),  # 7B down_proj: 11008 = 86 x 128
        ((13696, 5120, 128), 8),  # 13B down_proj
        ((4096, 125696, 128), 8),  # a 7B head
        ((96, 64, 32), 2),  # 96 inputs: super-tiles of 32 only
        ((4096, 12, 128), None),  # output columns not in tiles of 8
        ((4096, 64, 512), None),  # groups larger than the kernel's 256
    ],
)
def test_tinygemm_tiling_choice(shape, tiles):
    assert cuda_int4_inner_k_tiles(*shape) == tiles


def test_cpu_layers_keep_no_cuda_tiling():
    layer = Int4Linear.from_linear(gaussian_linear(256, 64), group_size=64)
    assert layer.cuda_tiles is None and "tinygemm" not in layer.extra_repr()


# --- on a CUDA GPU ----------------------------------------------------------------------------------------------


@cuda
def test_tinygemm_input_order_is_found():
    assert cuda_int4_nibble_order(torch.device("cuda")) is not None, "tinygemm did not read a probe back"


@cuda
@pytest.mark.parametrize("shape", [(256, 64, 64), (4096, 11008, 128), (96, 40, 32)], ids=str)
def test_int4_on_cuda_equals_reference_and_saves_the_same(shape):
    in_features, out_features, group_size = shape
    layer = Int4Linear.from_linear(gaussian_linear(in_features, out_features), group_size=group_size)
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer = layer.to("cuda")
    assert layer.cuda_tiles is not None and "kernel=tinygemm" in layer.extra_repr()
    reference = Int4Linear.from_linear(gaussian_linear(in_features, out_features), group_size=group_size)
    reference = reference.to("cuda")
    reference.use_kernel = False
    for rows in (1, 8, 300):
        x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
        assert rel(layer(x), reference(x)) < 1e-2
    # The portable format whatever the device: identical on CUDA and after the way back.
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor.cpu(), saved[name]), name
    back = layer.to("cpu")
    assert back.cuda_tiles is None
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


@cuda
def test_int4_shape_tinygemm_cannot_take_uses_the_reference_path():
    layer = Int4Linear.from_linear(gaussian_linear(256, 12), group_size=64).to("cuda")
    assert layer.cuda_tiles is None
    x = torch.randn(3, 256, device="cuda")
    assert rel(layer(x), x @ layer.dequantize().t()) < 1e-5


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_on_cuda_kernel_equals_reference(dtype):
    linear = gaussian_linear(4096, 1024)
    layer = Int8Linear.from_linear(linear).to("cuda")
    reference = Int8Linear.from_linear(linear).to("cuda")
    reference.use_kernel = False
    for rows in (1, CUDA_INT8_KERNEL_MAX_ROWS, 4 * CUDA_INT8_KERNEL_MAX_ROWS):
        x = torch.randn(rows, 4096, device="cuda").to(dtype)
        y = layer(x)
        assert y.dtype == dtype and rel(y, reference(x)) < 1e-2


@cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_quantized_model_on_cuda_matches_cpu(bits, position):
    from baichuan.checkpoint import fold_norm_head
    from baichuan.quant.swap import quantize_model

    model = fold_norm_head(tiny_model(position))
    quantize_model(model, bits, group_size=32)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).float()
        got = model.to("cuda", torch.bfloat16)(ids.cuda()).float().cpu()
    assert rel(got, expected) < 3e-2


@cuda
def test_prefill_takes_flash_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from baichuan.kv_cache import KVCache

    model = tiny_model("rope", norm_head=False).to("cuda", torch.bfloat16)
    ids = input_ids().cuda()
    cache = KVCache.for_model(model.config, ids.shape[0], 64, torch.bfloat16, "cuda")
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails if a mask forces another kernel
        full = model(ids)
        cached = model(ids, 0, cache)
    assert rel(cached, full) < 1e-2
