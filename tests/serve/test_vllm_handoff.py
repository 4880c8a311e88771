"""`serve --engine vllm` refuses, in one line, a directory that vLLM would load wrongly or not at all: vLLM picks
RoPE by hidden_size == 4096 and normalises the head by vocab_size == 125696, and does not know our int8/int4
format. The checks read config.json (and the head's first rows); no vLLM or GPU is needed for them."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from baichuan.checkpoint import fold_norm_head, save_model
from baichuan.cli import app
from baichuan.config import preset
from baichuan.model import Baichuan
from baichuan.quant.swap import quantize_model
from baichuan.serve.vllm import vllm_refusal

SMALL = dict(n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=512, max_seq_len=128)


def saved(directory, config, fold: bool = False, bits: int | None = None, normalise: bool = False):
    model = Baichuan(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    if fold or bits:
        fold_norm_head(model)
    if normalise:  # a plain head whose rows happen to be unit (what --migrate-head writes)
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight, dim=-1))
    if bits:
        model.quantization = quantize_model(model, bits)
    save_model(model, directory)
    return directory


def config_only(directory, config, architecture: str = "BaichuanForCausalLM"):
    directory.mkdir()
    hf = config.to_hf_dict() | {"architectures": [architecture]}
    (directory / "config.json").write_text(json.dumps(hf))
    return directory


def test_the_official_shapes_pass(tmp_path):
    # The position rule is decided from config.json alone, before any weight is read.
    for name in ("baichuan-7b", "baichuan-13b", "baichuan2-7b", "baichuan2-13b"):
        assert vllm_refusal(config_only(tmp_path / name, preset(name))) is None


def test_baichuan_7b_architecture_is_always_rope(tmp_path):
    config = preset("baichuan-7b").replace(dim=2048, n_heads=16)
    assert vllm_refusal(config_only(tmp_path / "a", config, "BaiChuanForCausalLM")) is None
    message = vllm_refusal(config_only(tmp_path / "b", config))
    assert "ALiBi" in message and "hidden_size == 4096" in message and "--engine baichuan" in message


def test_alibi_at_width_4096_is_refused(tmp_path):
    config = preset("baichuan-13b").replace(dim=4096, n_heads=32)
    assert "would run this alibi model with RoPE" in vllm_refusal(config_only(tmp_path / "a", config))


def test_quantized_directories_are_refused(tmp_path):
    config = preset("baichuan-13b").replace(**SMALL)
    for bits in (8, 4):
        message = vllm_refusal(saved(tmp_path / str(bits), config, bits=bits))
        assert f"{bits}-bit weight-only format" in message and "--engine baichuan" in message


def test_norm_head_outside_baichuan2_vocabulary(tmp_path):
    config = preset("baichuan2-13b").replace(**SMALL)  # NormHead, 512 tokens: vLLM would not normalise
    assert "--migrate-head" in vllm_refusal(saved(tmp_path / "raw", config))
    assert vllm_refusal(saved(tmp_path / "folded", config, fold=True)) is None


def test_plain_head_over_baichuan2_vocabulary(tmp_path):
    config = preset("baichuan-13b").replace(**(SMALL | {"vocab_size": 125_696}))
    assert "normalise the rows of this plain head" in vllm_refusal(saved(tmp_path / "raw", config))
    assert vllm_refusal(saved(tmp_path / "unit", config, normalise=True)) is None


def test_serve_refuses_in_one_line(tmp_path):
    config = preset("baichuan-13b").replace(**SMALL)
    directory = saved(tmp_path / "q", config, bits=8)
    result = CliRunner().invoke(app, ["serve", "-m", str(directory), "--engine", "vllm"])
    assert (
        result.exit_code == 1 and "weight-only format" in result.output and "Traceback" not in result.output
    )
