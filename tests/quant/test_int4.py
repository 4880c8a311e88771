"""int4 in groups: the original quant4 codes reproduced, the CPU kernel's tiling undone, moves and casts."""

from __future__ import annotations

import copy

import numpy as np
import torch

from baichuan import cpu_gemv
from baichuan.quant.int4 import Int4Linear, quantize_int4, unpack_int4
from tests.conftest import shared_path, skip_platform
from tests.quant.conftest import HAS_INT4_KERNEL, gaussian_linear, rel


def test_symmetric_int4_reproduces_baichuan13b_quant4_codes():
    # quant4: scale = absmax(row)/7, codes round(w/scale) in [-7, 7], 8 nibbles per int32, column 8j+k at bits 4k.
    ref = np.load(shared_path("oracle", "fixtures", "baichuan1_13b", "reference.npz"))
    weight = torch.from_numpy(ref["quant8_layer0_W_pack_fp32_weight"])
    codes, scales, zeros = quantize_int4(weight, group_size=weight.shape[1], symmetric=True)
    packed = torch.from_numpy(ref["quant4_layer0_W_pack_packed_int32"])
    nibbles = torch.stack([(packed >> (4 * k)) & 15 for k in range(8)], dim=-1).view(weight.shape)
    original = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    assert torch.equal(codes.long() - 8, original)
    assert torch.equal(scales[:, 0], torch.from_numpy(ref["quant4_layer0_W_pack_scale"]))
    assert not zeros.any()


def test_int4_cpu_tiling_round_trips(monkeypatch):
    if not HAS_INT4_KERNEL:
        skip_platform(f"torch {torch.__version__} has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)")
    monkeypatch.setattr(cpu_gemv, "load", lambda: None)  # torch's kernel and its tiling
    # 176 rows: full blocks of 64 or 32 plus a shorter tail block, which the CPU kernel tiles differently.
    codes = torch.randint(0, 16, (176, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    scales = torch.rand(176, 2) * 0.01
    module = Int4Linear.from_quantized_tensors(
        codes[:, 0::2] | (codes[:, 1::2] << 4), scales, torch.zeros_like(scales), group_size=128
    )
    assert module.tiled is not None
    assert torch.equal(module.codes(), codes)
    assert torch.equal(unpack_int4(module.state_dict()["weight"]), codes)


def test_int4_moves_and_casts(kernels):
    linear = gaussian_linear(256, 64)
    module = Int4Linear.from_linear(linear, 64)
    x = torch.randn(2, 256)
    before = module(x)
    module.to(torch.bfloat16)
    assert module.scales_and_zeros.dtype == torch.bfloat16 and module.weight.dtype == torch.uint8
    assert rel(module(x.bfloat16()), before) < 1e-2
    assert (module.tiled is not None) == (HAS_INT4_KERNEL and kernels == "torch")
    meta = copy.deepcopy(module).to("meta")  # leaving the CPU restores the portable layout first
    assert meta.tiled is None and meta.weight.shape == (64, 128)
