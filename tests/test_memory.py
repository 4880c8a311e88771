"""The memory estimate: its arithmetic against real tensors, and the free memory read from /proc and cgroups."""

from pathlib import Path

import pytest
import torch

from baichuan.config import preset
from baichuan.kv_cache import KVCache
from baichuan.memory import (
    GiB,
    activation_bytes,
    available_memory,
    estimate,
    kv_cache_bytes,
    largest,
    weight_bytes,
)
from baichuan.model import Baichuan
from baichuan.quant.swap import quantize_model
from tests.conftest import tiny_config


@pytest.mark.parametrize("name", ["baichuan-7b", "baichuan2-13b"])
def test_float_weights_are_the_parameter_count_times_the_dtype(name):
    config = preset(name)
    assert weight_bytes(config, 2) == 2 * config.num_params()
    assert weight_bytes(config, 4) == 4 * config.num_params()


@pytest.mark.parametrize(
    "bits, head_bits, head_group", [(8, 8, 32), (8, 8, None), (8, None, None), (4, 8, None), (4, None, None)]
)
def test_quantized_weights_match_the_modules(bits, head_bits, head_group):
    config = tiny_config(dim=256, n_heads=4, ffn_dim=512, vocab_size=1024)
    model = Baichuan(config)
    overrides = {"lm_head": head_bits}
    int8_groups = {} if head_group is None else {"lm_head": head_group}
    quantize_model(model, bits, group_size=64, overrides=overrides, int8_groups=int8_groups)
    measured = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    estimate = weight_bytes(config, 4, bits, group_size=64, head_bits=head_bits, head_int8_group=head_group)
    assert estimate == measured


def test_kv_cache_bytes_are_the_buffers():
    config = tiny_config()
    cache = KVCache.for_model(config, 3, 40, torch.bfloat16)
    assert kv_cache_bytes(config, 3, 40, 2) == cache.k.nbytes + cache.v.nbytes


def test_the_issue_numbers():
    """Baichuan2-7B served with the defaults (8 rows + 1 prefill row x 4,096 positions): 36 GiB of fp32 cache,
    18 in bf16; ~28 GiB of fp32 weights, 5.6 with int4 (the embeddings stay fp32, the head int8)."""
    config = preset("baichuan2-7b")
    assert kv_cache_bytes(config, 9, 4096, 4) == 36 * GiB
    assert kv_cache_bytes(config, 9, 4096, 2) == 18 * GiB
    assert 27.9 < weight_bytes(config, 4) / GiB < 28.0
    assert 5.5 < weight_bytes(config, 4, bits=4, head_bits=8) / GiB < 5.7


def test_alibi_prefill_counts_its_mask():
    rope, alibi = preset("baichuan2-7b"), preset("baichuan2-13b")
    # (40 heads x 4,096 x 4,096) fp32 bias + its masked copy + the bf16 cast: 5 GiB for a 4,096-token prompt.
    mask = activation_bytes(alibi, 4096, 4096, 2) - activation_bytes(
        alibi.replace(position="rope"), 4096, 4096, 2
    )
    assert mask == 40 * 4096 * 4096 * 10
    assert activation_bytes(rope, 1, 4096, 2) < 2**22  # a decode step: a few MB


def test_estimate_totals_its_parts():
    """The caches come after loading: the peak holds the larger of them and loading's moment."""
    config = preset("baichuan2-7b")
    e = estimate(config, dtype_bytes=2, kv_bytes=2, rows=1, seq_len=4096, prefill=16)
    assert e.total == e.weights + e.runtime + max(e.kv_cache + e.activations, e.loading)
    assert "KV cache 2.00 GiB for 4,096 positions 16-bit" in e.describe()
    # Folding the NormHead: an fp32 copy of the head and the folded bf16 one, 125,696 x 4,096 x 6 bytes.
    assert e.loading == 125_696 * 4096 * 6
    short = estimate(config, dtype_bytes=2, kv_bytes=2, rows=1, seq_len=64, prefill=16)
    assert short.total == short.weights + short.runtime + short.loading
    plain = estimate(preset("baichuan-7b"), dtype_bytes=2, kv_bytes=2, rows=1, seq_len=64, prefill=16)
    assert plain.loading == 0
    quantized = estimate(
        config,
        dtype_bytes=4,
        kv_bytes=2,
        rows=1,
        seq_len=64,
        prefill=16,
        bits=4,
        head_bits=8,
        stored_bytes=2,
        quantized_on_load=True,
    )
    assert quantized.loading == 125_696 * 4096 * 2  # the head read whole, as stored


def test_largest():
    assert largest(lambda n: n * n <= 1000, 1, 10**6) == 31
    assert largest(lambda n: n <= 5, 6, 100) is None
    assert largest(lambda n: True, 3, 9) == 9


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str], available_kb: int = 8 * 2**20) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_kb} kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_available_memory_meminfo_only(tmp_path):
    assert available_memory(fake_root(tmp_path, "", {})) == (8 * GiB, "MemAvailable")


def test_available_memory_cgroup_v2_counts_reclaimable_cache(tmp_path):
    files = {
        "job/memory.max": str(4 * GiB),
        "job/memory.current": str(3 * GiB),
        "job/memory.stat": f"anon {2 * GiB}\ninactive_file {GiB // 2}\n",
        "memory.max": "max",
        "memory.current": str(5 * GiB),
    }
    free, source = available_memory(fake_root(tmp_path, "0::/job\n", files))
    assert free == GiB + GiB // 2 and "cgroup" in source


def test_available_memory_cgroup_v1_parent_limit_binds(tmp_path):
    files = {
        "memory/a/memory.limit_in_bytes": str(2 * GiB),
        "memory/a/memory.usage_in_bytes": str(GiB),
        "memory/a/b/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "memory/a/b/memory.usage_in_bytes": str(GiB),
    }
    free, _ = available_memory(fake_root(tmp_path, "4:memory:/a/b\n", files))
    assert free == GiB


def test_available_memory_takes_meminfo_when_smaller(tmp_path):
    files = {"memory.max": str(64 * GiB), "memory.current": str(GiB)}
    assert available_memory(fake_root(tmp_path, "0::/\n", files, available_kb=2**20)) == (GiB, "MemAvailable")


def test_returning_free_memory_runs_where_the_c_library_has_malloc_trim():
    import ctypes.util
    import platform

    from baichuan.memory import return_free_memory

    glibc = (
        platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    )
    assert return_free_memory() is bool(glibc)


def _glibc() -> bool:
    import ctypes.util
    import platform

    return bool(
        platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c")
    )


# In a process of its own: a heap that earlier tests left holding hundreds of MB free at its top is trimmed at the
# first block freed onto it, whatever the thresholds. The blocks come from malloc itself, as torch's CPU allocator
# takes them (some torch versions map the largest ones themselves).
FAULTS_OF_REUSED_BLOCKS = """
import ctypes, ctypes.util, resource
from baichuan.memory import keep_freed_memory
kept = keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
block = 48 * 2**20  # past glibc's moving thresholds, which stop at 32 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    pointer = libc.malloc(block)
    ctypes.memset(pointer, 1, block)  # written, then freed
    libc.free(pointer)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_freed_memory_is_reused_without_faulting_pages_in_again():
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_REUSED_BLOCKS], capture_output=True, text=True, check=True
    )
    kept, faults = run.stdout.split()
    assert kept == str(_glibc())
    if _glibc():
        # Mapped and unmapped each time, every pass would fault each of its 12,288 pages in. Kept, the first pass
        # faults them in, and a second may too where small allocations took a piece of the freed block.
        assert int(faults) < 3 * 12_288


def test_glibcs_own_thresholds_set_by_the_user_stand(monkeypatch):
    import baichuan.memory as memory

    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda: lambda *args: calls.append(args) or 1)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert memory.keep_freed_memory.__wrapped__() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert memory.keep_freed_memory.__wrapped__() is True
    # The mmap threshold before the trim one: the trim one alone would pin the mmap one at 128 KiB.
    assert calls == [(-3, memory.KEPT_BLOCK_BYTES), (-1, memory.KEPT_FREE_BYTES)]


def test_an_old_glibcs_cap_on_the_mmap_threshold_falls_back_to_it(monkeypatch):
    import baichuan.memory as memory

    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return int(not (param == -3 and value > memory.KEPT_BLOCK_BYTES_CAPPED))

    monkeypatch.setattr(memory, "_mallopt", lambda: mallopt)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.keep_freed_memory.__wrapped__() is True
    assert calls[1] == (-3, memory.KEPT_BLOCK_BYTES_CAPPED)


def test_generation_on_the_cpu_keeps_freed_memory(monkeypatch):
    import baichuan.generate as generate
    from baichuan.config import Config
    from baichuan.generate import SamplingConfig, generate_tokens

    asked = []
    monkeypatch.setattr(generate, "keep_freed_memory", lambda: asked.append(True))
    config = Config(vocab_size=64, dim=32, n_layers=1, n_heads=4, ffn_dim=64)
    model = Baichuan(config).eval()
    list(generate_tokens(model, [1, 2, 3], SamplingConfig(max_new_tokens=2, eos_ids=())))
    assert asked
