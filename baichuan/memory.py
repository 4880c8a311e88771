"""What a run will need in memory, worked out from the config before anything is loaded, and what this
machine has free. Pure arithmetic and the standard library, so the front ends can refuse (or shorten the
context of) a run that cannot fit before reading gigabytes of weights, instead of being killed half way.

Sizes are in bytes. Dtypes are given by their size in bytes (bf16/fp16 2, fp32 4).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baichuan.config import Config
from baichuan.cpu import UPCAST_MIN_ROWS

GiB = 2**30
# The interpreter, torch and its libraries, the tokenizer: resident before the first weight is read (about the
# peak RSS of `baichuan generate` on a checkpoint of a few MB; torch's shared libraries are most of it).
RUNTIME_BYTES = 800 * 2**20
# Sizes chosen to fit (a shorter context, a smaller batch) use this share of the free memory: the rest is for
# what an estimate does not see (other processes starting, allocator fragmentation).
HEADROOM = 0.9
# Where a CPU only emulates bf16/fp16, prompts of cpu.UPCAST_MIN_ROWS rows and more multiply an fp32 copy of each
# weight (model.Linear), and int8/int4 prompts a widened one (quant.int8.INT8_WIDEN_MIN_ROWS): one layer's worth,
# freed after each product.


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int
    activations: int
    loading: int  # what loading needs for a moment beyond the weights, before any cache exists
    runtime: int
    rows: int  # KV cache rows (sequences decoded together, plus the server's prefill row)
    seq_len: int  # positions per row
    kv_bytes: int  # bytes per cached element

    @property
    def total(self) -> int:
        """The peak: the caches and activations come after loading, so the larger of the two counts."""
        return self.weights + self.runtime + max(self.kv_cache + self.activations, self.loading)

    def describe(self) -> str:
        kv = {2: "16-bit", 4: "fp32"}.get(self.kv_bytes, f"{self.kv_bytes}-byte")
        rows = f"{self.rows} rows x " if self.rows > 1 else ""
        shown = self.loading >= GiB // 200  # what rounds to 0.00 GiB is noise here
        loading = f"; loading needs {gib(self.loading)} more for a moment" if shown else ""
        return (
            f"{gib(self.total)} (weights {gib(self.weights)}, KV cache {gib(self.kv_cache)} for "
            f"{rows}{self.seq_len:,} positions {kv}, activations {gib(self.activations)}, "
            f"runtime {gib(self.runtime)}{loading})"
        )


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def weight_bytes(
    config: Config,
    dtype_bytes: int,
    bits: int | None = None,
    group_size: int = 128,
    head_bits: int | None = None,
    head_bytes: int | None = None,
    head_int8_group: int | None = None,
    linear_bytes: int | None = None,
) -> int:
    """The weights as loaded: embeddings and norms always in the float dtype; the decoder's linear layers in it
    too (or in `linear_bytes` a weight: bf16 weights beside fp32 activations), or weight-only int8 (one byte a
    weight + one float scale a row) or int4 (half a byte a weight + a bf16 scale and zero a group of
    `group_size` inputs a row). `head_bits`: the output head's, None for float
    (by default int8 in 8-bit and 4-bit models, see quant.spec.DEFAULT_HEAD_BITS), with a bf16 scale per
    `head_int8_group` inputs where given; a float head's bytes a weight are `head_bytes` (default the linear
    layers'; see checkpoint.bf16_head_beside)."""
    d, f, V = config.dim, config.ffn_dim, config.vocab_size
    floats = V * d + (2 * config.n_layers + 1) * d  # embeddings, norms
    layer = [(3 * d, d), (d, d), (f, d), (f, d), (d, f)]  # (out, in): W_pack, o_proj, gate, up, down

    float_linear = linear_bytes or dtype_bytes

    def linear(
        out: int, inp: int, b: int | None, float_bytes: int = float_linear, int8_group: int | None = None
    ) -> int:
        if b is None:
            return out * inp * float_bytes
        if b == 8:
            return out * inp + (out * dtype_bytes if int8_group is None else out * (inp // int8_group) * 2)
        return out * inp // 2 + math.ceil(inp / group_size) * out * 2 * 2

    layers = config.n_layers * sum(linear(o, i, bits) for o, i in layer)
    return (
        floats * dtype_bytes + layers + linear(V, d, head_bits, head_bytes or float_linear, head_int8_group)
    )


def kv_cache_bytes(config: Config, rows: int, seq_len: int, kv_bytes: int) -> int:
    """Keys and values of every layer: rows x layers x 2 x positions x hidden x bytes."""
    return rows * config.n_layers * 2 * seq_len * config.dim * kv_bytes


def activation_bytes(
    config: Config, prefill: int, seq_len: int, dtype_bytes: int, rows: int = 1, upcast: bool = False
) -> int:
    """A rough upper bound of the temporaries of one forward: a prefill of `prefill` tokens against `seq_len`
    cached positions (the larger of that and a decode step of `rows` rows). Layers run one after another, so
    one layer's worth counts, plus the residual stream:
    - hidden states: residual, norm, q/k/v and their rotated copies, attention output (8 x T x d);
    - the MLP: gate, up, their product (3 x T x f);
    - ALiBi's additive mask (H, T, S): the fp32 bias, the masked fp32 copy and the cast one (RoPE prefills use
      SDPA's causal path, with no mask);
    - the sampler's fp32 logits and their sorted/softmaxed copies (4 x rows x V);
    - `upcast`: one fp32 copy of the largest weight and of the input rows (emulated half precision, or a
      quantized layer widened for a long prompt)."""
    d, f, H, V = config.dim, config.ffn_dim, config.n_heads, config.vocab_size
    T = max(prefill, rows)
    hidden = (8 * T * d + 3 * T * f) * dtype_bytes
    mask = H * T * seq_len * (4 + 4 + dtype_bytes) if config.position == "alibi" and prefill > 1 else 0
    logits = 4 * rows * V * 4
    widened = max(3 * d * d, f * d) * 4 + T * max(d, f) * 4 if upcast and prefill >= UPCAST_MIN_ROWS else 0
    return hidden + mask + logits + widened


def loading_bytes(config: Config, dtype_bytes: int, stored_bytes: int, quantized: bool) -> int:
    """What loading holds for a moment beyond the weights. Float weights stream in one tensor at a time (or
    are memory-mapped), but folding Baichuan2's NormHead normalises the head in fp32 and keeps the result
    next to it (checkpoint.fold_norm_head); quantizing reads each tensor whole, the largest being the
    embeddings or the head (V x d in the stored dtype)."""
    head = config.vocab_size * config.dim
    if quantized:
        return head * stored_bytes
    return head * (4 + dtype_bytes) if config.norm_head else 0


def estimate(
    config: Config,
    *,
    dtype_bytes: int,
    kv_bytes: int,
    rows: int,
    seq_len: int,
    prefill: int,
    bits: int | None = None,
    group_size: int = 128,
    head_bits: int | None = None,
    head_bytes: int | None = None,
    head_int8_group: int | None = None,
    upcast: bool = False,
    stored_bytes: int | None = None,
    quantized_on_load: bool = False,
    runtime: int = RUNTIME_BYTES,
    linear_bytes: int | None = None,
) -> Estimate:
    """Weights + the runtime + the larger of KV cache (`rows` x `seq_len`) + activations (a prefill of `prefill`
    tokens) and what loading needs for a moment. `stored_bytes`: the checkpoint's dtype (default: the one
    loaded); `quantized_on_load`: `bits` are applied while reading float weights."""
    stored = dtype_bytes if stored_bytes is None else stored_bytes
    return Estimate(
        weights=weight_bytes(
            config, dtype_bytes, bits, group_size, head_bits, head_bytes, head_int8_group, linear_bytes
        ),
        kv_cache=kv_cache_bytes(config, rows, seq_len, kv_bytes),
        activations=activation_bytes(config, min(prefill, seq_len), seq_len, dtype_bytes, rows, upcast),
        loading=loading_bytes(config, dtype_bytes, stored, quantized_on_load),
        runtime=runtime,
        rows=rows,
        seq_len=seq_len,
        kv_bytes=kv_bytes,
    )


def largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest n in low..high with fits(n), for a `fits` that holds up to some n and fails beyond it."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


# --- what the machine has ----------------------------------------------------------------------------------


def available_memory(root: Path = Path("/")) -> tuple[int, str] | None:
    """Bytes this process may still allocate, and where the figure comes from: the smallest of the cgroup v2
    limit (memory.max - memory.current), the cgroup v1 limit (memory.limit_in_bytes - memory.usage_in_bytes),
    each counting the page cache it could drop (inactive_file) as free, and /proc/meminfo's MemAvailable.
    None where none of them can be read (not Linux). `root` is for tests."""
    found: list[tuple[int, str]] = []
    meminfo = _read(root / "proc/meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    for group in _cgroups(root):
        found.append(group)
    return min(found, default=None)


def _cgroups(root: Path) -> list[tuple[int, str]]:
    limits = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "" and hierarchy == "0":  # cgroup v2
            mounts = [root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"]
            names = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            mounts = [root / "sys/fs/cgroup/memory"]
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for mount in mounts:
            # The process's own group and every group above it: a parent's limit binds the children too.
            parts = [p for p in path.strip("/").split("/") if p]
            for depth in range(len(parts), -1, -1):
                group = mount.joinpath(*parts[:depth])
                limit = _int(_read(group / names[0]))
                usage = _int(_read(group / names[1]))
                if limit is None or usage is None or limit >= 2**60:  # "max" or v1's huge "no limit"
                    continue
                stat = _read(group / "memory.stat") or ""
                reclaimable = next(
                    (int(v) for k, v in (ln.split() for ln in stat.splitlines() if ln) if k == names[2]), 0
                )
                free = max(limit - usage + reclaimable, 0)
                limits.append((free, f"cgroup limit {gib(limit)}"))
    return limits


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc hands a freed block bigger than its mmap threshold straight back to the system, and trims the top of its
# heap past its trim threshold; both follow the largest block freed, and not past 32 MiB. A prompt's products free
# blocks of several MB every layer (oneDNN's reordered copy of each weight, int8/int4 weights dequantized for the
# GEMM), so every forward faulted in those pages again: 100,000-400,000 page faults and a third of the time of an
# int8 or int4 prefill of 512 tokens on a 1.29B model (benchmarks/README.md). Blocks up to this size stay in the
# heap: Baichuan2-13B's largest layer (W_pack, 15,360 x 5,120 in bf16) is 150 MiB.
KEPT_BLOCK_BYTES = 256 * 2**20
# Where glibc refuses a threshold that high (some versions cap it at 32 MiB, half their 64 MiB heaps).
KEPT_BLOCK_BYTES_CAPPED = 32 * 2**20
# Free memory the heap keeps at its top before trimming: a few layers' temporaries of the largest model.
KEPT_FREE_BYTES = 512 * 2**20


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # macOS, Windows
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


@functools.cache
def keep_freed_memory() -> bool:
    """Let the C allocator keep the large blocks a forward pass frees, for the next one, instead of returning them
    to the system and faulting fresh zeroed pages in again (glibc's `mallopt`, thresholds above); once per process,
    called where CPU inference starts. False where it changed nothing: not glibc (musl's mallopt does nothing), or
    glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set, which then stand. Memory kept this way is
    reused by the process, and handed back by `return_free_memory` (a server does when it is idle)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # The mmap threshold first: setting either one ends glibc's moving thresholds, and the trim threshold alone
    # would leave the mmap one at its 128 KiB start.
    if not (
        mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES) or mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES_CAPPED)
    ):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: musl, macOS, Windows
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_free_memory() -> bool:
    """Hand the pages that the C allocator holds free back to the system (glibc's `malloc_trim`); False where the
    C library has no such call. glibc keeps freed blocks in its heaps and per-thread arenas: a server's requests
    come and go in many threads, and a quantizing load's temporaries leave holes that the small blocks it keeps
    pin, so resident memory would stay at the high-water mark of work long finished."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
