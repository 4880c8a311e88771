"""Format changes stream tensor by tensor and write atomically: .bin -> safetensors, a dtype change,
resharding, and the head migration (identical logits before and after)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from baichuan.checkpoint import SAFETENSORS_INDEX, load_model, weight_files
from baichuan.config import ALIBI, ROPE, Config
from baichuan.convert.formats import ConvertError, convert_checkpoint, parse_size
from baichuan.convert.migrate import migrate_head
from baichuan.scaffold import init_checkpoint
from tests.convert.conftest import logits, sample_ids

SMALL = dict(vocab_size=4096, dim=64, n_layers=3, n_heads=4, ffn_dim=128, max_seq_len=128)


@pytest.fixture(scope="module", params=[(ROPE, True), (ALIBI, False)], ids=["rope-normhead", "alibi"])
def small(request, tmp_path_factory) -> Path:
    position, norm_head = request.param
    config = Config(position=position, norm_head=norm_head, **SMALL)
    return init_checkpoint(
        config, tmp_path_factory.mktemp("small") / "m", torch.float32, tokenizer_vocab=4000
    )


def _bin_copy(source: Path, target: Path) -> Path:
    """The checkpoint as the originals ship it: pytorch_model.bin."""
    target.mkdir()
    model = load_model(source)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_bin_to_safetensors_same_logits(small, tmp_path):
    source = _bin_copy(small, tmp_path / "bin")
    convert_checkpoint(source, tmp_path / "st")
    assert [p.name for p in weight_files(tmp_path / "st")] == ["model.safetensors"]
    assert (tmp_path / "st" / "tokenizer.model").read_bytes() == (small / "tokenizer.model").read_bytes()
    ids = sample_ids()
    assert torch.equal(logits(source, ids), logits(tmp_path / "st", ids))


def test_in_place_dtype_change_and_reshard(small, tmp_path):
    target = tmp_path / "m"
    init_checkpoint(Config(**SMALL), target, torch.float32, tokenizer=small / "tokenizer.model")
    reference = load_model(target)
    convert_checkpoint(target, target, dtype=torch.bfloat16, max_shard_bytes=parse_size("200KB"))
    files = weight_files(target)
    assert len(files) > 3 and (target / SAFETENSORS_INDEX).is_file()
    assert not list(target.glob(".baichuan-save-*")) and not (target / "model.safetensors").exists()
    sizes = [
        sum(safe_open(str(f), "pt").get_slice(n).get_shape()[0] for n in safe_open(str(f), "pt").keys())
        for f in files
    ]
    assert all(s > 0 for s in sizes)
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    converted = load_model(target)
    for name, tensor in reference.state_dict().items():
        value = converted.state_dict()[name]
        assert value.dtype == torch.bfloat16 and torch.equal(value, tensor.to(torch.bfloat16))
    # and back into one file: the shards and the index go
    convert_checkpoint(target, target, dtype=torch.float32)
    assert [p.name for p in weight_files(target)] == ["model.safetensors"]
    assert not list(target.glob("model-*")) and not (target / SAFETENSORS_INDEX).exists()


def test_failed_conversion_leaves_the_target_as_it_was(small, tmp_path):
    target = tmp_path / "t"
    convert_checkpoint(small, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(name, tensor):
        if "layers.2" in name:
            raise RuntimeError("disk full, say")
        return tensor

    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(small, target, dtype=torch.bfloat16, transform=fail)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_migrate_head_identical_logits(small, tmp_path):
    config = json.loads((small / "config.json").read_text())
    if not config["norm_head"]:
        with pytest.raises(ConvertError, match="no NormHead"):
            migrate_head(small, tmp_path / "out")
        return
    migrate_head(small, tmp_path / "out")
    migrated = json.loads((tmp_path / "out" / "config.json").read_text())
    assert migrated["norm_head"] is False and migrated["position_encoding"] == config["position_encoding"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight")
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(head.shape[0]))
    ids = sample_ids()
    assert torch.equal(logits(small, ids), logits(tmp_path / "out", ids))


def test_cli(small, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "baichuan.cli", "convert", *map(str, args)], capture_output=True, text=True
        )

    done = run(
        "-m",
        small,
        "--to",
        "safetensors",
        "--dtype",
        "bf16",
        "--shard-size",
        "300KB",
        "--out",
        tmp_path / "a",
    )
    assert done.returncode == 0, done.stderr
    assert len(weight_files(tmp_path / "a")) > 1
    for args, says in [
        (("-m", small, "--out", tmp_path / "b"), "exactly one of"),
        (("-m", small, "--to", "onnx", "--out", tmp_path / "b"), "--to takes gguf or safetensors"),
        (("-m", small, "--to", "safetensors", "--out", tmp_path / "a"), "pass --force"),
        (
            ("-m", small, "--to", "safetensors", "--shard-size", "lots", "--out", tmp_path / "b"),
            "cannot read the size",
        ),
        (("--from", "gguf", tmp_path / "none.gguf", "--out", tmp_path / "b"), "is not a file"),
        (
            ("-m", tmp_path / "a", "--to", "gguf", "--type", "q2_k", "--out", tmp_path / "c.gguf"),
            "unknown GGUF type",
        ),
    ]:
        failed = run(*args)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert failed.stderr.startswith("error:") and says in " ".join(failed.stderr.split()), failed.stderr
