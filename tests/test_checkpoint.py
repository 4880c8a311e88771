"""Checkpoint directories: official layouts, sharding, our saved layout, and clear errors for bad input."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from baichuan.checkpoint import CheckpointError, load_model, load_weights, read_config, save_model
from baichuan.model import Baichuan
from tests.conftest import require_cpu_kernels, run_with_avx2, shared_path, tiny_config


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


def test_load_weights_transform_hook(tmp_path):
    """The one hook of a load (quantizing, folding the head): it sees each tensor checked and cast; what it
    returns is put in place, None means it used the tensor itself."""
    source = tiny_model("rope", False)
    save_model(source, tmp_path)
    with torch.device("meta"):
        model = Baichuan(source.config)
    seen = {}

    def transform(name, tensor):
        seen[name] = tensor.dtype
        if name == "lm_head.weight":
            model.lm_head.weight = torch.nn.Parameter(torch.ones_like(tensor), requires_grad=False)
            return None
        return tensor * 2 if name == "model.norm.weight" else tensor

    load_weights(model, tmp_path, torch.bfloat16, transform=transform, mmap=False)
    assert set(seen) == set(source.state_dict()) and set(seen.values()) == {torch.bfloat16}
    assert torch.equal(model.lm_head.weight, torch.ones_like(source.lm_head.weight, dtype=torch.bfloat16))
    assert torch.equal(model.model.norm.weight, source.model.norm.weight.bfloat16() * 2)
    embed = model.model.embed_tokens.weight
    assert torch.equal(embed, source.model.embed_tokens.weight.bfloat16()) and embed.requires_grad


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
    from baichuan.quant.swap import quantize_model

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


@pytest.mark.parametrize("norm_head", [False, True])
def test_quantized_fp32_model_keeps_its_bf16_head_where_the_kernel_widens_it(tmp_path, norm_head):
    """With the avx2 build (forced; it widens each bf16 weight to fp32), an int8 checkpoint with a float head (as
    the original quantize(8) leaves it, and as 8-bit checkpoints of format 1 were saved) loaded in fp32 keeps that
    head in the checkpoint's bf16: the logits of the fp32 head's values, half its bytes, and the memory estimate
    counts them."""
    require_cpu_kernels()
    from baichuan.checkpoint import fold_norm_head
    from baichuan.quant.swap import quantize_model

    model = tiny_model(norm_head=norm_head).bfloat16()
    fold_norm_head(model)
    model.quantization = quantize_model(model, 8, overrides={"lm_head": None})
    save_model(model, tmp_path)
    code = f"""
import torch
from baichuan import checkpoint, cpu_gemv, runtime
from baichuan.kv_cache import KVCache
directory = {str(tmp_path)!r}
kept = checkpoint.load_model(directory, torch.float32)
prepared = runtime.Prepared(
    directory, kept.config, torch.device("cpu"), torch.float32, torch.float32, None, kept.quantization,
    torch.bfloat16, None, None, None, False, "",
)  # what runtime.prepare gives, without the tokenizer it reads
estimate = prepared.estimate(1, 16, 16).weights
checkpoint.bf16_head_beside = lambda *a: False
fp32 = checkpoint.load_model(directory, torch.float32)
rows = fp32.lm_head.weight.detach()
measured = sum(t.nbytes for t in kept.state_dict().values())
assert estimate == measured, (estimate, measured)
assert measured + kept.lm_head.weight.numel() * 2 == sum(t.nbytes for t in fp32.state_dict().values())
assert kept.lm_head.weight.dtype == torch.bfloat16 and torch.equal(kept.lm_head.weight.float(), rows)
assert fp32.lm_head.weight.dtype == torch.float32
calls, prompts = [], []
gemv, matmul = cpu_gemv.bf16_gemv, cpu_gemv.bf16_matmul
cpu_gemv.bf16_gemv = lambda *a: calls.append(a[0].shape) or gemv(*a)
cpu_gemv.bf16_matmul = lambda *a: prompts.append(a[0].numel() // a[0].shape[-1]) or matmul(*a)
ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
with torch.inference_mode():
    # Every position: the prompt kernel where it takes 9 rows (an AVX2-only CPU), else the mat-vec in chunks of 8.
    worst = rel(kept(ids), fp32(ids))
    caches = [KVCache.for_model(m.config, 1, 16, torch.float32) for m in (kept, fp32)]
    prefix = [m(ids, 0, c, last_only=True) for m, c in zip((kept, fp32), caches)]
    step = [m(ids[:, :1], 9, c) for m, c in zip((kept, fp32), caches)]  # a decoded token: the kernel
    worst = max(worst, rel(prefix[0], prefix[1]), rel(step[0], step[1]))
    assert step[0].dtype == torch.float32
whole = [9] if cpu_gemv.bf16_prompts(9, kept.lm_head.weight) else []
routed = prompts == whole and max(c[0] for c in calls) <= 8 and sum(c[0] for c in calls) + sum(whole) == 9 + 1 + 1
print(cpu_gemv.target(), routed, worst < 1e-5)
"""
    assert run_with_avx2(code) == ["avx2", "True", "True"]


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


# Saves: what a save owns is replaced as a whole, what it does not own is kept, and a crash mid-save leaves the
# previous checkpoint loadable.


def state_equal(model, expected: dict) -> bool:
    state = model.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def weight_names(directory) -> set[str]:
    return {p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json")}


def test_single_file_save_over_sharded_removes_the_stale_shards_and_index(saved):
    other = tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    save_model(other, saved)
    assert weight_names(saved) == {"config.json", "model.safetensors"}
    assert state_equal(load_model(saved), other.state_dict())
    save_model(tiny_model(), saved, max_shard_bytes=100_000)  # and back to shards
    assert "model.safetensors" not in weight_names(saved)
    assert state_equal(load_model(saved), tiny_model().state_dict())


def test_save_over_the_directory_it_was_loaded_from(saved):
    model = load_model(saved)  # memory-mapped from the shards that the save replaces
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, saved)
    assert state_equal(load_model(saved), expected)


def test_save_keeps_what_it_does_not_own_and_removes_old_weights_of_every_format(tmp_path):
    model = tiny_model()
    kept = {"tokenizer.model": b"sp", "README.md": b"# mine", "adapter_model.safetensors": b"lora"}
    for name, content in kept.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "log.txt").write_text("step 1")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"not ours")
    # An official-style sharded .bin checkpoint, whose index also names files a save must never delete.
    torch.save({}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        "a": "pytorch_model-00001-of-00002.bin",
        "b": "pytorch_model-00002-of-00002.bin",
        "c": "tokenizer.model",
        "d": f"../{outside.name}",
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_model(model, tmp_path)
    assert weight_names(tmp_path) == {"config.json", "model.safetensors", "adapter_model.safetensors"}
    assert all((tmp_path / name).read_bytes() == content for name, content in kept.items())
    assert (tmp_path / "runs" / "log.txt").read_text() == "step 1" and outside.read_bytes() == b"not ours"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert state_equal(load_model(tmp_path), model.state_dict())


def test_save_writes_the_files_it_is_given_with_the_weights(tmp_path):
    from baichuan.checkpoint import config_dict, save_checkpoint

    model = tiny_model("rope", False)
    (tmp_path / "tokenizer.model").write_bytes(b"old")
    save_checkpoint(
        tmp_path,
        config_dict(model.config, torch.float32),
        model.state_dict().items(),
        files={"tokenizer.model": b"new", "generation_config.json": b"{}\n"},
    )
    assert (tmp_path / "tokenizer.model").read_bytes() == b"new"
    assert (tmp_path / "generation_config.json").read_bytes() == b"{}\n"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    assert state_equal(load_model(tmp_path), model.state_dict())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask-022", "umask-027"])
def test_saved_files_get_the_usual_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_model(tiny_model(), tmp_path, max_shard_bytes=100_000)
        save_model(tiny_model(), tmp_path / "single")
    finally:
        os.umask(old)
    files = [p for p in [*tmp_path.iterdir(), *(tmp_path / "single").iterdir()] if p.is_file()]
    assert len(files) > 4
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_an_index_and_a_single_file_that_disagree_is_an_error_naming_both(tmp_path, fmt):
    model = tiny_model()
    state = model.state_dict()
    if fmt == "safetensors":
        save_model(model, tmp_path, max_shard_bytes=100_000)
        shutil.copy(next(tmp_path.glob("model-00001-of-*")), tmp_path / "model.safetensors")
        index, single = "model.safetensors.index.json", "model.safetensors"
    else:
        save_model(model, tmp_path)
        (tmp_path / "model.safetensors").unlink()
        torch.save(state, tmp_path / "pytorch_model-00001-of-00001.bin")
        index_map = dict.fromkeys(state, "pytorch_model-00001-of-00001.bin")
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": index_map}))
        torch.save(state, tmp_path / "pytorch_model.bin")
        index, single = "pytorch_model.bin.index.json", "pytorch_model.bin"
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert index in message and f"{single} " in message and "\n" not in message


def test_an_index_that_names_the_single_file_agrees_with_it(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path)
    index = {"weight_map": dict.fromkeys(model.state_dict(), "model.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert state_equal(load_model(tmp_path), model.state_dict())


def test_safetensors_is_preferred_to_bin_as_transformers_does(tmp_path):
    model, other = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    save_model(model, tmp_path)
    torch.save(other.state_dict(), tmp_path / "pytorch_model-00001-of-00001.bin")
    index = {"weight_map": dict.fromkeys(other.state_dict(), "pytorch_model-00001-of-00001.bin")}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert state_equal(load_model(tmp_path), model.state_dict())


def test_an_index_of_the_wrong_shape_is_a_clear_error(saved):
    (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_model(saved)


# The child saves a new model from a generator that stops after its first shards are written, says so with a
# marker file and waits there to be killed.
PAUSED_SAVE = """
import sys, time
from pathlib import Path
from baichuan.checkpoint import config_dict, load_model, save_checkpoint

source, target, marker = map(Path, sys.argv[1:])
model = load_model(source)

def tensors():
    for i, item in enumerate(model.state_dict().items()):
        if i == 3:  # one tensor a shard: shards 1 and 2 are on disk by now
            marker.write_text("paused")
            time.sleep(600)
        yield item

save_checkpoint(target, config_dict(model.config), tensors(), max_shard_bytes=1)
"""


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    old, new = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    target, source, marker = tmp_path / "model", tmp_path / "new", tmp_path / "marker"
    save_model(old, target, max_shard_bytes=100_000)
    save_model(new, source)
    child = subprocess.Popen([sys.executable, "-c", PAUSED_SAVE, str(source), str(target), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the saving child exited before it paused"
            assert time.monotonic() < deadline, "the saving child never paused"
            time.sleep(0.05)
        staged = [p for p in target.rglob("*") if p.is_file() and p.parent != target]
        assert len(staged) >= 3  # config.json and the first shards are written, in staging
        assert state_equal(load_model(target), old.state_dict())
    finally:
        child.kill()  # SIGKILL: no cleanup runs
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert state_equal(load_model(target), old.state_dict())
    save_model(new, target)  # a later save succeeds and clears what the killed one left
    assert {p.name for p in target.iterdir()} == {"config.json", "model.safetensors"}
    assert state_equal(load_model(target), new.state_dict())


# Corrupt safetensors files: each reader (memory-mapped, and the plain one of quantize-on-load) names the file
# and says what is wrong in one line; never MemoryError, KeyError or AttributeError.
def _safetensors(header: bytes, data: bytes = bytes(16), header_len: int | None = None) -> bytes:
    return (len(header) if header_len is None else header_len).to_bytes(8, "little") + header + data


def _entry(**fields) -> bytes:
    entry = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    entry.update(fields)
    return json.dumps({"model.norm.weight": entry}).encode()


CORRUPT = {
    "truncated": b"\x10\x00\x00",
    "huge-header-length": b"\xff" * 8 + b"{}" + bytes(16),
    "header-past-the-end": _safetensors(b"{}", header_len=1000),
    "header-not-utf8": _safetensors(b"\xff\xfe\xfd"),
    "header-not-json": _safetensors(b"{not json"),
    "header-not-an-object": _safetensors(b"[1, 2]"),
    "entry-not-an-object": _safetensors(b'{"model.norm.weight": 5}'),
    "entry-missing-fields": _safetensors(b'{"model.norm.weight": {"dtype": "F32"}}'),
    "unknown-dtype": _safetensors(_entry(dtype="F99")),
    "shape-not-a-list": _safetensors(_entry(shape="4")),
    "negative-shape": _safetensors(_entry(shape=[-4])),
    "huge-shape": _safetensors(_entry(shape=[2**40, 2**40])),
    "offsets-not-numbers": _safetensors(_entry(data_offsets=["0", "16"])),
    "offsets-past-the-end": _safetensors(_entry(shape=[8], data_offsets=[0, 32])),
    "offsets-disagree-with-shape": _safetensors(_entry(shape=[2])),
    "data-truncated": _safetensors(_entry(), data=bytes(10)),
}


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "plain"])
@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_safetensors_is_one_clear_line_naming_the_file(tmp_path, content, mmap):
    from baichuan.checkpoint import iter_tensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        list(iter_tensors(path, mmap=mmap))
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_corrupt_safetensors_through_quantize_on_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf_dict()))
    (tmp_path / "model.safetensors").write_bytes(CORRUPT["header-not-an-object"])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path, quantize=8)


def test_a_save_that_fails_while_moving_in_refuses_to_load_and_keeps_the_new_checkpoint(saved, monkeypatch):
    replace = os.replace

    def failing(src, dst):
        if Path(dst).name == "model.safetensors":  # the new entry point: the last move
            raise OSError("simulated failure")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated"):
        save_model(tiny_model("rope", False), saved)
    monkeypatch.undo()
    staged = [p for p in saved.iterdir() if p.is_dir()]
    assert len(staged) == 1 and (staged[0] / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match=f"no weights found.*{staged[0].name}"):
        load_model(saved)  # never the old shards under the new config.json
    save_model(tiny_model("rope", False), saved)
    assert state_equal(load_model(saved), tiny_model("rope", False).state_dict())
