"""Weights on transparent huge pages: the arena's tensors, moving a module's onto them, and loads that put every
large weight there with the same values as before."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from baichuan import checkpoint, hugepages
from baichuan.checkpoint import fold_norm_head, load_model, save_model
from baichuan.hugepages import HugePageArena, transparent_huge_pages
from baichuan.model import Baichuan
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are Linux's")


def advised_huge(tensor: torch.Tensor) -> bool:
    """Whether the mapping that holds `tensor` is advised for huge pages (/proc/self/smaps: VmFlags "hg")."""
    address, inside = tensor.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return "hg" in line.split()[1:]
    return False


def test_transparent_huge_pages_reads_the_chosen_mode(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert transparent_huge_pages(setting) == "madvise"
    setting.write_text("[never]\n")
    assert transparent_huge_pages(setting) == "never"
    assert transparent_huge_pages(tmp_path / "absent") is None


def test_arena_tensors_are_aligned_advised_and_stored_apart(tmp_path):
    arena = HugePageArena(chunk_bytes=4 * 2**20)
    a = arena.empty((512, 1024), torch.bfloat16)  # 1 MiB
    b = arena.empty((3, 1000, 100), torch.float32)  # 1.2 MB, not a multiple of 4 KiB
    c = arena.empty((4096, 1024), torch.int8)  # 4 MiB: a mapping of its own
    for tensor in (a, b, c):
        tensor.copy_(torch.randn(tensor.shape).to(tensor.dtype) if tensor.is_floating_point() else 7)
        assert tensor.data_ptr() % 4096 == 0 and arena.holds(tensor) and advised_huge(tensor)
    small = arena.empty((16, 16), torch.float32)
    assert not arena.holds(small) and small.shape == (16, 16)
    assert not arena.holds(torch.zeros(300_000))
    # each tensor has a storage of its own: safetensors (which refuses shared storage) saves them
    save_file({"a": a, "b": b, "c": c}, tmp_path / "t.safetensors")
    again = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(again[k], t) for k, t in (("a", a), ("b", b), ("c", c)))


def test_a_refused_mapping_falls_back_to_torch(monkeypatch):
    def refuse(nbytes):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages, "_mapping", refuse)
    arena = HugePageArena()
    tensor = arena.empty((1024, 1024), torch.float32)
    assert tensor.shape == (1024, 1024) and not arena.holds(tensor) and not advised_huge(tensor)


def test_adopt_moves_large_tensors_in_place_and_leaves_embeddings():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 256), nn.Linear(256, 1024), nn.LayerNorm(1024))
    model[1].register_buffer("scales", torch.rand(1024, 128))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    arena = HugePageArena()
    moved = arena.adopt(model)
    assert moved == 256 * 1024 * 4 + 1024 * 128 * 4  # the weight and the buffer; the rest is small or skipped
    assert model[1].weight is weight and weight.requires_grad  # the same Parameter, its data moved
    assert arena.holds(model[1].weight) and arena.holds(model[1].scales)
    assert not arena.holds(model[0].weight) and not arena.holds(model[1].bias)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert arena.adopt(model) == 0  # nothing left to move


def test_clone_is_a_copy_on_huge_pages():
    source = torch.randn(1024, 300)
    copy = hugepages.clone(source)
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    copy[0, 0] += 1
    assert not torch.equal(copy, source)
    small = torch.randn(3, 3)
    assert (
        torch.equal(hugepages.clone(small), small) and hugepages.clone(small).data_ptr() != small.data_ptr()
    )


@pytest.fixture
def huge_everything(monkeypatch):
    """Every tensor counts as large, and the system as offering huge pages (whatever this one's setting)."""
    monkeypatch.setattr(hugepages, "MIN_BYTES", 1)
    monkeypatch.setattr(checkpoint, "huge_pages_available", lambda: True)


@pytest.mark.parametrize("quantize", [None, 8, 4])
def test_loads_put_weights_on_huge_pages_with_the_same_values(tmp_path, huge_everything, quantize):
    torch.manual_seed(0)
    source = Baichuan(tiny_config("rope", norm_head=True)).eval()
    source.init_weights()
    save_model(source, tmp_path)
    plain = fold_norm_head(load_model(tmp_path, torch.bfloat16, quantize=quantize, huge_pages=False))
    huge = fold_norm_head(load_model(tmp_path, torch.bfloat16, quantize=quantize))
    plain_state, huge_state = plain.state_dict(), huge.state_dict()
    assert plain_state.keys() == huge_state.keys()
    assert all(torch.equal(plain_state[k], huge_state[k]) for k in plain_state)
    # what the modules hold (an int4 layer's state dict is worked out from its packed tensors)
    held = {**dict(huge.named_parameters()), **dict(huge.named_buffers())}
    streamed = [k for k in held if k.startswith(("model.layers.", "lm_head.")) and "norm" not in k]
    assert streamed and all(advised_huge(held[k]) for k in streamed)
    plain_held = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    # (fold_norm_head copies a NormHead onto huge pages whatever the load did)
    assert not any(advised_huge(plain_held[k]) for k in streamed if k.startswith("model."))
    ids = torch.randint(0, source.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(plain(ids), huge(ids))


def test_float_load_that_does_not_fit_in_memory_maps_the_files(tmp_path, huge_everything, monkeypatch):
    torch.manual_seed(0)
    source = Baichuan(tiny_config("alibi")).eval()
    source.init_weights()
    save_model(source, tmp_path)
    monkeypatch.setattr(checkpoint, "available_memory", lambda: (1000, "MemAvailable"))
    model = load_model(tmp_path)
    weight = model.model.layers[0].self_attn.W_pack.weight
    assert not advised_huge(weight) and torch.equal(weight, source.model.layers[0].self_attn.W_pack.weight)
