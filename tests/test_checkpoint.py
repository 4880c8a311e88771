"""Checkpoint directories: official layouts, sharding, our saved layout, and clear errors for bad input."""

import json
import shutil

import pytest
import torch

from baichuan.checkpoint import CheckpointError, load_model, read_config, save_model
from baichuan.model import Baichuan
from tests.conftest import shared_path, tiny_config


def tiny_model(position="alibi", norm_head=True):
    torch.manual_seed(0)
    model = Baichuan(tiny_config(position, norm_head)).eval()
    model.init_weights()
    return model


def same_logits(a, b):
    ids = torch.randint(0, a.config.vocab_size, (1, 7))
    with torch.no_grad():
        return torch.equal(a(ids), b(ids))


def test_save_load_round_trip_sharded(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path, max_shard_bytes=100_000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in files
    assert any(f.startswith("model-00001-of-") for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["position_encoding"] == "alibi" and config["norm_head"] is True
    again = load_model(tmp_path)
    assert again.config == model.config
    assert same_logits(model, again)


def test_load_into_dtype(tmp_path):
    model = tiny_model("rope", False)
    save_model(model, tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize("variant", ["baichuan1_7b", "baichuan2_13b"])
def test_official_bin_and_safetensors_agree(variant, tmp_path):
    root = shared_path("oracle", "fixtures", variant, "checkpoint")
    from_safetensors = load_model(root, torch.float32)
    # only the .bin file (with Baichuan-7B's persistent inv_freq buffers, which are ignored)
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(root / name, tmp_path / name)
    from_bin = load_model(tmp_path, torch.float32)
    assert same_logits(from_safetensors, from_bin)


def test_sharded_bin_with_index(tmp_path):
    model = tiny_model("rope", True)
    state = model.state_dict()
    names = list(state)
    half = len(names) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:half],
        "pytorch_model-00002-of-00002.bin": names[half:],
    }
    for filename, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / filename)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    assert same_logits(model, load_model(tmp_path))


@pytest.fixture
def saved(tmp_path):
    save_model(tiny_model(), tmp_path, max_shard_bytes=100_000)
    return tmp_path


def test_missing_shard(saved):
    next(saved.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(saved)


def test_truncated_shard(saved):
    shard = next(saved.glob("model-00001-of-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(saved)


def test_wrong_shapes(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 100
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(saved)


def test_unknown_model_type_and_missing_config(saved, tmp_path_factory):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "llama"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type"):
        read_config(saved)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path_factory.mktemp("empty"))


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)


def test_pickled_objects_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    torch.save({"model.norm.weight": torch.ones(64), "evil": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unpickle|cannot read"):
        load_model(tmp_path)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_equals_quantize_after_load_and_round_trips(tmp_path, bits):
    from baichuan.checkpoint import fold_norm_head
    from baichuan.quantize import quantize_model

    model = tiny_model("alibi", True)
    save_model(model, tmp_path / "float", max_shard_bytes=100_000)
    on_load = load_model(tmp_path / "float", quantize=bits, group_size=32)
    after = fold_norm_head(load_model(tmp_path / "float"))
    quantize_model(after, bits, group_size=32)
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        expected = after(ids)
        assert torch.equal(on_load(ids), expected)
    save_model(on_load, tmp_path / "quantized")
    record = json.loads((tmp_path / "quantized" / "config.json").read_text())["quantization"]
    assert record["bits"] == bits and record["group_size"] == 32
    reloaded = load_model(tmp_path / "quantized")
    with torch.no_grad():
        assert torch.equal(reloaded(ids), expected)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(tmp_path / "quantized", quantize=8)


def test_unsupported_bits_is_a_clear_error(saved):
    with pytest.raises(CheckpointError, match="bits"):
        load_model(saved, quantize=3)


def test_plain_reader_equals_safetensors_and_catches_truncation(saved):
    from baichuan.checkpoint import iter_tensors

    shard = next(saved.glob("model-00001-of-*.safetensors"))
    mapped = dict(iter_tensors(shard, mmap=True))
    read = dict(iter_tensors(shard, mmap=False))
    assert mapped.keys() == read.keys() and all(torch.equal(mapped[k], read[k]) for k in mapped)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(saved, quantize=8)
