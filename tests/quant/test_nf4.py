"""bitsandbytes NF4 checkpoints, dequantised without bitsandbytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from baichuan.checkpoint import load_model
from baichuan.quant.nf4 import NF4_LEVELS, dequantize_bnb_stream, dequantize_nf4
from baichuan.quant.spec import QuantizationError
from tests.quant.conftest import gaussian_linear, input_ids, rel, tiny_model


def test_dequantize_nf4_hand_built():
    """Built from the documented format (bitsandbytes functional.quantize_4bit / QuantState.as_dict and the
    QLoRA paper's NF4 table), independently of bitsandbytes: blocks of 64 of the flattened weight, value =
    NF4[code] * absmax[block], the even element in the high nibble; with double quantisation absmax is a uint8
    index into a 256-entry map, times a per-256-block fp32 absmax, plus an offset."""
    gen = torch.Generator().manual_seed(5)
    shape, blocksize = (48, 96), 64  # 72 blocks
    codes = torch.randint(0, 16, (shape[0] * shape[1],), generator=gen)
    absmax = torch.rand(72, generator=gen) + 0.5
    expected = (torch.tensor(NF4_LEVELS)[codes].view(72, 64) * absmax[:, None]).view(shape)
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).view(-1, 1)
    assert torch.equal(dequantize_nf4(packed, absmax, shape, blocksize), expected)

    # Double quantisation of absmax: a[j] = map[u8[j]] * nested_absmax[j // 256] + offset.
    nested_map = torch.linspace(-1, 1, 256)
    index = torch.randint(0, 256, (72,), generator=gen, dtype=torch.int64)
    nested_absmax, offset = torch.tensor([0.25]), 0.75
    absmax2 = nested_map[index] * 0.25 + offset
    expected2 = (torch.tensor(NF4_LEVELS)[codes].view(72, 64) * absmax2[:, None]).view(shape)
    got = dequantize_nf4(
        packed,
        index.to(torch.uint8),
        shape,
        blocksize,
        torch.tensor(NF4_LEVELS),
        nested_absmax,
        nested_map,
        256,
        offset,
    )
    assert torch.allclose(got, expected2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "plain"])
def test_dequantize_bnb_checkpoint_matches_bitsandbytes(compress_statistics):
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_4bit

    linear = gaussian_linear(128, 96, seed=6)
    try:
        layer = bnb.nn.Linear4bit(
            128,
            96,
            bias=False,
            quant_type="nf4",
            compress_statistics=compress_statistics,
            compute_dtype=torch.float32,
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=compress_statistics,
        )
        layer = layer.to("cpu")  # bitsandbytes quantizes on the move to a device
        reference = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    except (RuntimeError, NotImplementedError) as e:  # builds without a CPU backend
        pytest.skip(f"bitsandbytes cannot quantize on this CPU: {e}")
    state = nn.Sequential(nn.Identity(), layer).state_dict()  # the official "1.weight.absmax"... layout
    assert "1.weight.quant_state.bitsandbytes__nf4" in state
    stream = list(dequantize_bnb_stream([("0.norm", torch.ones(3)), *state.items()]))
    assert [name for name, _ in stream] == ["0.norm", "1.weight"]
    weight = stream[1][1]
    assert weight.shape == (96, 128) and weight.dtype == torch.float32
    assert torch.equal(weight, reference)
    assert rel(weight, linear.weight) < 0.15


def test_dequantize_bnb_stream_reports_missing_parts():
    state = {"x.weight": torch.zeros(8, 1, dtype=torch.uint8), "x.weight.absmax": torch.ones(1)}
    with pytest.raises(QuantizationError, match="incomplete"):
        list(dequantize_bnb_stream(state.items()))


def _nf4_parts(weight: torch.Tensor, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """A bitsandbytes `Linear4bit` state dict for `weight` without double quantisation, built from the documented
    format (see test_dequantize_nf4_hand_built): nearest NF4 level of w / absmax per block of the flattened row-major
    weight, the even element in the high nibble."""
    flat = weight.float().reshape(-1)
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    levels = torch.tensor(NF4_LEVELS)
    codes = (blocks / absmax[:, None]).reshape(-1, 1).sub(levels).abs().argmin(dim=1)
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": list(weight.shape)}
    return {
        "": ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).view(-1, 1),
        ".absmax": absmax,
        ".quant_map": levels,
        ".quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }


def test_official_nf4_checkpoint_directory(tmp_path):
    """The `Baichuan2-*-Chat-4bits` layout: every decoder Linear in bitsandbytes NF4 parts, lm_head, embeddings
    and norms in fp16, and a `quantization_config` in config.json. On CPU it loads dequantized (or requantized to
    our int4 with quantize=4)."""
    from baichuan.hf import BaichuanForCausalLM

    source = tiny_model("rope", norm_head=True)
    tensors, expected = {}, {}
    for name, tensor in source.state_dict().items():
        if name.startswith("model.layers.") and tensor.dim() == 2:
            parts = _nf4_parts(tensor)
            tensors.update({name + suffix: part for suffix, part in parts.items()})
            stream = dequantize_bnb_stream(
                [(name + suffix, part) for suffix, part in parts.items()], torch.float32
            )
            expected[name] = next(stream)[1]
        else:
            tensors[name] = tensor.half()
            expected[name] = tensor.half().float()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_config = source.config.to_hf_dict()
    hf_config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    reference = tiny_model("rope", norm_head=True)
    reference.load_state_dict(expected)
    ids = input_ids()
    with torch.no_grad():
        want = reference(ids)
        got = load_model(tmp_path, dtype=torch.float32)(ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert (
            rel(BaichuanForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)(ids).logits, want) < 1e-5
        )
        requantized = load_model(tmp_path, dtype=torch.float32, quantize=4, group_size=32)
        assert requantized.quantization["bits"] == 4
        assert rel(requantized(ids), want) < 0.15
    nf4_error = rel(expected["model.layers.0.mlp.up_proj.weight"], source.model.layers[0].mlp.up_proj.weight)
    assert 0.02 < nf4_error < 0.15  # the parts really are 4-bit: a lossy, not a float, copy
