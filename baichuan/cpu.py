"""What this CPU computes natively, and the row counts at which each CPU product changes kernels.

Every probe of the CPU's features lives here: whether torch's (oneDNN's) half-precision matmuls are native or
emulated, and which build of our own kernels (`cpu_gemv`, `csrc/`) this CPU can run.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch

# The builds of our kernels (`csrc/`), lowest first; each needs the features of the AVX2 ones, avx512bf16 those of
# avx512 too (avx2vnni is not among avx512's: Ice Lake and Zen 4 have AVX-512 VNNI but not AVX-VNNI).
#   avx2        AVX2 + FMA (Haswell, Zen 1 and later)
#   avx2vnni    the above + AVX-VNNI (Alder Lake and later cores without AVX-512, Sapphire Rapids, Zen 5)
#   avx512      AVX-512 F/BW/VL/DQ + VNNI (Cascade Lake, Ice Lake, Zen 4 and later; Skylake-X runs avx2)
#   avx512bf16  the above + AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later)
KERNEL_TARGETS = ("avx2", "avx2vnni", "avx512", "avx512bf16")
# The builds whose tiles are the AVX2 ones (`csrc/int8_tile_avx2.h`; avx2vnni only fuses int8's multiply and add),
# which the routes made for the avx2 build take as well.
AVX2_TARGETS = ("avx2", "avx2vnni")

# Row thresholds: how many activation rows (tokens in a forward) a product must have before a kernel changes.
# The measurements behind each are in benchmarks/README.md, with the CPU they were taken on.
# int8/int4: our kernels (cpu_gemv) up to this many rows, past it torch's kernels or a widened GEMM (the quantized
# layers may lift it where bf16 is emulated).
GEMV_MAX_ROWS = 128
# int8 on the avx2 target: from this many rows on, the prompt kernel (cpu_gemv's `int8_matmul_int16`) rather than
# the decode one, whose time per row it about matches at 16 rows and beats by 1-23% at 32 (Zen 3, 1.29B shapes).
INT8_PROMPT_MIN_ROWS = 32
# bf16: our mat-vec (cpu_gemv.bf16_gemv) up to this many rows, past it torch's GEMM: batch-8 decoding, in every
# build (even the widening ones against oneDNN's native bf16, where a lower target is forced on an AVX512-BF16 CPU).
BF16_GEMV_MAX_ROWS = 8
# bf16/fp16 weights where half precision is emulated: an fp32 GEMM on the widened weight from this many rows on.
UPCAST_MIN_ROWS = 16
# bf16 weights where the avx2 build is the best the CPU runs and bf16 is emulated: from this many rows on, our
# prompt kernel (cpu_gemv's `bf16_matmul`) in place of torch's bf16 GEMM (9-15 rows) and of its fp32 GEMM on a
# widened copy (16 rows on). Time ÷ the widened fp32 GEMM's: 0.20-0.38 at 12 rows (torch's bf16 GEMM 0.58-1.20),
# 0.24-0.38 at 32, 0.67-0.93 at 512; our mat-vec in chunks of 8 rows about ties it at 16 (Zen 3, 1.29B shapes).
BF16_PROMPT_MIN_ROWS = BF16_GEMV_MAX_ROWS + 1
# bf16 on a CPU with AMX (the avx512bf16 build): from AMX_BF16_MIN_ROWS to AMX_BF16_MAX_ROWS rows, our AMX kernel
# (cpu_gemv's `amx_bf16_matmul`), in place of our mat-vec below 9 rows and of torch's oneDNN GEMM above, which
# reorders the whole weight on every call (time ÷ torch's, a layer's 5 products: 0.66 at 16 rows, 0.58 at 64, 0.70
# at 128, 0.82 at 192, 0.93 at 256, 1.08 at 384, 1.10 at 512; Xeon with AMX, 1.29B shapes). Since a decode batch
# multiplies one row tile alone, time ÷ the mat-vec's, a decode step's products: 1.02 at 2 rows (0.98-1.06 a shape),
# 0.96 at 3 (0.92-1.01), 0.91 at 4 (0.88-0.96), 0.85 at 5 (Emerald Rapids, 1.29B shapes, 2026-12-05); whole batch-4
# decodes 39.5 against 38.5 tok/s, batch 3 29.1 against 27.6 (noise of the VM: rounds 35.3-45.8).
AMX_BF16_MIN_ROWS = 4
AMX_BF16_MAX_ROWS = 256
# int8 (per-row scales) and int4 weights against bf16 rows, where the CPU has AMX (the avx512bf16 build): from
# AMX_QUANTIZED_MIN_ROWS to AMX_QUANTIZED_MAX_ROWS rows, our AMX kernels (cpu_gemv's `amx_int8_matmul`,
# `amx_int4_matmul`: the weight widened to bf16 in tile order as it is used), in place of our mat-vecs and, past 128
# rows, of the weight dequantized into torch's GEMM. Time ÷ theirs, int8 / int4 g128: 0.91-1.24 / 0.90-0.99 at 8
# rows, 0.72-0.94 / 0.74-0.85 at 9, 0.17-0.18 / 0.11-0.15 at 128; a layer's 5 products: 0.83 / 0.76 at 384, 0.87 /
# 0.85 at 512, 0.98 / 1.02 at 1024, 1.17 / 1.35 at 2048. Xeon with AMX, 1.29B shapes.
AMX_QUANTIZED_MIN_ROWS = 9
AMX_QUANTIZED_MAX_ROWS = 768
# int8 weights (a scale a row, or per group of a multiple of 32 columns) where the CPU has AMX-INT8 (the avx512bf16
# build): from AMX_INT8_MIN_ROWS to AMX_INT8_MAX_ROWS rows, of fp32 or bf16 activations, our AMX-INT8 kernel on the
# decode kernel's int16 codes (cpu_gemv's `amx_int8_int16_matmul`: no widening of the weight), in place of our
# mat-vec and, from 9 rows, of `amx_int8_matmul`. Time ÷ the mat-vec's at 5 / 6 / 8 rows: 0.88-0.97 / 0.73-0.91 /
# 0.66-0.67 (1.07-1.23 at one row), the head's (groups of 32) 0.64 / - / 0.45; ÷ `amx_int8_matmul`'s at 16 rows
# 0.45-0.72, at 64 1.01-1.49. Xeon with AMX, 1.29B shapes.
AMX_INT8_MIN_ROWS = 5
AMX_INT8_MAX_ROWS = 16
# One activation row in the bf16 and int8 (a scale a row) mat-vecs: one weight row at a time, no prefetch
# instructions, on AVX-512 CPUs from these vendors (whose hardware prefetcher follows one stream a thread), else four
# rows (the avx2 int8 tile: one) prefetched ahead. On a Zen 4 (1.29B shapes, weights on huge pages) the avx512bf16
# build's bf16 took 0.73-0.98 of the time and its int8 0.87-1.00; the avx2 build's, forced there, 0.71-0.98 and
# 0.71-0.97. On an AVX2-only AMD EPYC (family 23; the avx2 build) it took 1.11-1.26 and 0.98-1.14, so AMD CPUs
# without AVX-512 keep the prefetched tiles (a Zen 2 or Zen 3 not measured). Never measured on an Intel CPU, where the
# prefetch distances were tuned. BAICHUAN_SINGLE_STREAM=1/0 decides instead.
SINGLE_STREAM_VENDORS = ("AuthenticAMD",)
ENV_SINGLE_STREAM = "BAICHUAN_SINGLE_STREAM"


@functools.cache
def half_is_emulated(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks native bf16/fp16 matmul: the one answer to "native half precision?", for the
    default dtype (`runtime.pick_dtype`), the upcasting of prompts (`model.Linear`) and the kernels' thresholds.

    Native needs oneDNN (the library behind torch's CPU matmuls) to take the dtype and, for bf16 on x86, the
    instructions themselves (AVX512-BF16 or AMX): some torch versions let oneDNN take bf16 on any AVX-512 CPU,
    where it is converted to fp32 for every product and runs slower than fp32 itself."""
    try:
        if dtype == torch.bfloat16:
            native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
            if native and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
                native = _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported")
            return not native
        if dtype == torch.float16:
            return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):  # torch built without oneDNN
        return True
    return False


@functools.cache
def has_amx() -> bool:
    """Whether torch's bf16 GEMMs run on AMX tiles here (oneDNN takes them where the CPU has AMX and bf16 is
    native): then a prompt's quantized weights are dequantized into them rather than multiplied by our int8/int4
    prompt kernels, which reach a fraction of their rate (benchmarks/README.md)."""
    return not half_is_emulated(torch.bfloat16) and _probe("_is_amx_tile_supported")


def has_avx2() -> bool:
    """Whether torch runs its AVX2 (or AVX-512) kernels here, which our own kernels (cpu_gemv) need too."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _probe(name: str) -> bool:
    """One of torch's cpuinfo feature checks (`torch.cpu._is_*_supported`, private: False where it moved)."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@functools.cache
def kernel_targets() -> tuple[str, ...]:
    """The builds of our kernels this CPU (and its operating system) can run, lowest first; () without AVX2."""
    if not has_avx2():
        return ()
    targets = ["avx2"]
    if has_avx_vnni():
        targets.append("avx2vnni")
    if _probe("_is_avx512_supported") and _probe("_is_vnni_supported"):
        targets.append("avx512")
        if _probe("_is_avx512_bf16_supported"):
            targets.append("avx512bf16")
    return tuple(targets)


@functools.cache
def has_avx_vnni() -> bool:
    """Whether the CPU has AVX-VNNI (`vpdpwssd` on 256-bit vectors, VEX-encoded), as Linux's /proc/cpuinfo flags say
    (torch has no probe for it); False elsewhere, where the avx2 build runs instead."""
    return "avx_vnni" in cpuinfo_field("flags").split()


def kernel_target(requested: str | None = None, supported: tuple[str, ...] | None = None) -> str | None:
    """The build of our kernels to use: the highest the CPU runs (`supported`, default `kernel_targets()`), or
    `requested` where that is lower. A target the CPU cannot run is clamped to the highest it can, with a
    warning, as is a name that is no target. None: the CPU runs none (no AVX2)."""
    supported = kernel_targets() if supported is None else supported
    if not supported:
        return None
    best = supported[-1]
    if not requested:
        return best
    requested = requested.strip().lower()
    if requested not in KERNEL_TARGETS:
        warnings.warn(
            f"unknown CPU kernel target {requested!r} (choose from {', '.join(KERNEL_TARGETS)}); using {best}",
            stacklevel=2,
        )
        return best
    if requested not in supported:
        warnings.warn(
            f"this CPU cannot run the {requested} kernels (it runs {', '.join(supported)}); using {best}",
            stacklevel=2,
        )
        return best
    return requested


def bf16_gemv_max_rows(target: str | None) -> int:
    """Activation rows up to which our bf16 mat-vec (the build for `target`) beats torch's bf16 product here."""
    return 0 if target is None else BF16_GEMV_MAX_ROWS


def amx_bf16_max_rows(target: str | None) -> int:
    """Activation rows up to which our AMX kernel (the avx512bf16 build's) takes bf16 products here (from
    AMX_BF16_MIN_ROWS on): 0 where the CPU has no AMX or a lower build runs."""
    return AMX_BF16_MAX_ROWS if target == "avx512bf16" and has_amx() else 0


def amx_quantized_max_rows(target: str | None) -> int:
    """Activation rows up to which our AMX kernels take int8 and int4 products of bf16 rows here (from
    AMX_QUANTIZED_MIN_ROWS on): 0 where the CPU has no AMX or a lower build runs."""
    return AMX_QUANTIZED_MAX_ROWS if target == "avx512bf16" and has_amx() else 0


def amx_int8_max_rows(target: str | None) -> int:
    """Activation rows up to which our AMX-INT8 kernel takes int8 products here (from
    AMX_INT8_MIN_ROWS on): 0 where the CPU has no AMX or a lower build runs (the build itself checks AMX-INT8)."""
    return AMX_INT8_MAX_ROWS if target == "avx512bf16" and has_amx() else 0


def bf16_prompt_min_rows(target: str | None) -> int | None:
    """Activation rows from which our bf16 prompt kernel (the build for `target`) takes bf16 products here; None
    where torch's GEMMs stay: native bf16 (oneDNN's), or an AVX-512 CPU (MKL's AVX-512 fp32 GEMM, against which
    the kernel's AVX2 FMAs were never measured), even with a lower build forced."""
    if target not in AVX2_TARGETS or not half_is_emulated(torch.bfloat16):
        return None
    return BF16_PROMPT_MIN_ROWS if torch.backends.cpu.get_cpu_capability() == "AVX2" else None


def cpuinfo_field(name: str) -> str:
    """One field of the first CPU in Linux's /proc/cpuinfo ("vendor_id", "model name"); "" where it is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it ("AuthenticAMD", "GenuineIntel"); "" where it does not say."""
    return cpuinfo_field("vendor_id")


def single_stream(target: str | None) -> bool:
    """Whether our mat-vecs (the build for `target`) read one weight row at a time without prefetch instructions
    for one activation row (bf16, and int8 with a scale a row): on an AVX-512 CPU (whatever the build) of
    `SINGLE_STREAM_VENDORS`, or as BAICHUAN_SINGLE_STREAM says. The same bits either way; only the speed differs."""
    if target not in KERNEL_TARGETS:
        return False
    forced = os.environ.get(ENV_SINGLE_STREAM, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_vendor() in SINGLE_STREAM_VENDORS and "avx512" in kernel_targets()
