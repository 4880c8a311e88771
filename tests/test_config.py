import json

import pytest
import torch

from baichuan.config import ALIBI, PRESETS, ROPE, Config, ConfigError, resolve_norm_head, resolve_position
from baichuan.model import Baichuan
from tests.conftest import shared_path

# The originals' published counts (Baichuan-7B, Baichuan-13B) and the counts of the original code (Baichuan2).
EXPECTED = {
    "baichuan-7b": 7_000_559_616,
    "baichuan-13b": 13_264_901_120,
    "baichuan2-7b": 7_505_973_248,
    "baichuan2-13b": 13_896_668_160,
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_preset_parameter_counts_exact(name):
    config = PRESETS[name]
    assert config.num_params() == EXPECTED[name]
    with torch.device("meta"):
        model = Baichuan(config)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]


def test_param_counts_match_oracle_file():
    counts = json.loads(shared_path("oracle", "fixtures", "common", "param_counts.json").read_text())
    names = {
        "baichuan1_7b": "baichuan-7b",
        "baichuan1_13b": "baichuan-13b",
        "baichuan2_7b": "baichuan2-7b",
        "baichuan2_13b": "baichuan2-13b",
    }
    for variant, preset in names.items():
        real = counts[variant]["real_config"]
        config = PRESETS[preset]
        assert (config.vocab_size, config.dim, config.ffn_dim, config.n_layers, config.n_heads) == (
            real["vocab_size"],
            real["hidden_size"],
            real["intermediate_size"],
            real["num_hidden_layers"],
            real["num_attention_heads"],
        )
        assert config.position == (ALIBI if real["position_encoding"] == "ALiBi" else ROPE)
        assert config.norm_head == (real["lm_head"] == "NormHead")
        assert config.num_params() == counts[variant]["total_parameters"]


def _official(**keys):
    base = {
        "model_type": "baichuan",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    base.update(keys)
    return base


def test_position_from_clues():
    assert (
        resolve_position(_official(architectures=["BaiChuanForCausalLM"], max_position_embeddings=4096))
        == ROPE
    )
    assert (
        resolve_position(_official(max_position_embeddings=256, model_max_length=256)) == ROPE
    )  # Baichuan2-7B
    assert resolve_position(_official(model_max_length=4096)) == ALIBI  # the 13B configs
    assert (
        resolve_position(
            _official(model_max_length=4096, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40)
        )
        == ALIBI
    )
    assert (
        resolve_position(_official(model_max_length=4096, position_encoding="rope")) == ROPE
    )  # explicit wins


def test_position_conflict_and_absence_are_clear_errors():
    with pytest.raises(ConfigError, match="conflict"):
        resolve_position(_official(architectures=["BaiChuanForCausalLM"], model_max_length=4096))
    with pytest.raises(ConfigError, match="conflict"):
        resolve_position(
            _official(
                max_position_embeddings=4096, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40
            )
        )
    with pytest.raises(ConfigError, match="position"):
        resolve_position(_official())


def test_norm_head_from_clues():
    assert resolve_norm_head(_official(vocab_size=125_696)) is True
    assert resolve_norm_head(_official(z_loss_weight=0)) is True
    assert resolve_norm_head(_official(max_position_embeddings=4096, model_max_length=4096)) is True
    assert resolve_norm_head(_official(vocab_size=64_000)) is False
    assert resolve_norm_head(_official(vocab_size=64_000, norm_head=True)) is True
    with pytest.raises(ConfigError, match="conflict"):
        resolve_norm_head(_official(vocab_size=64_000, z_loss_weight=0))


def test_hf_dict_round_trip():
    for config in PRESETS.values():
        assert Config.from_hf_dict(config.to_hf_dict()) == config


def test_bad_configs():
    with pytest.raises(ConfigError, match="model_type"):
        Config.from_hf_dict(_official(model_type="llama", max_position_embeddings=64))
    with pytest.raises(ConfigError, match="lacks"):
        Config.from_hf_dict({"model_type": "baichuan", "vocab_size": 10})
    with pytest.raises(ConfigError, match="divisible"):
        Config(dim=100, n_heads=3)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"hidden_size": "4096"}, "hidden_size must be a positive integer, got '4096'"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": True}, "vocab_size must be a positive integer"),
        ({"model_max_length": -1}, "model_max_length must be a positive integer"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be an integer token id"),
    ],
)
def test_config_types_are_checked_before_any_arithmetic(change, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_hf_dict({**_official(max_position_embeddings=64), **change})


@pytest.mark.parametrize("value, kind", [([], "array"), ("x", "string"), (None, "null"), (3, "number")])
def test_config_that_is_not_an_object(value, kind):
    with pytest.raises(ConfigError, match=f"expected a JSON object of settings, got a JSON {kind}"):
        Config.from_hf_dict(value)


def test_zero_heads_is_a_config_error_not_a_division_by_zero():
    with pytest.raises(ConfigError, match="n_heads must be a positive integer"):
        Config(n_heads=0)
