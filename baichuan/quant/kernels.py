"""What the quantized layers need of torch's CPU kernels: the dtype they compute in, the rows worked on at a
time, and the tiling of torch's int4 kernel (found by a probe, undone for saving). Our own AVX2 int8/int4
kernels are `baichuan.cpu_gemv` (the loader of `baichuan/csrc/`); the layers call it directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from baichuan.cpu import AVX2_TARGETS, half_is_emulated, has_amx

# torch's CPU weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) are vectorised for bf16
# activations and much slower with fp32 or fp16 ones (benchmarks/README.md), so the CPU path always computes in
# bf16 and casts back. int4 scales and zeros are kept in bf16 for the same reason (and because the CUDA tinygemm
# kernel takes nothing else).
KERNEL_DTYPE = torch.bfloat16
# Rows quantized (or tiled, or normalised) at a time: fp32 temporaries of a few MB instead of a copy of a
# 125,696-row head. A multiple of 64, so the CPU int4 kernel's row blocks never straddle two chunks.
ROW_CHUNK = 1024
# Prompts (more rows than `cpu_gemv.MAX_ROWS`): the weight is dequantized up to this many bytes of output rows at
# a time (`prefill_matmul`). One tile holds any layer but a large vocabulary's head: a GEMM of torch's per tile of
# 1 MiB took 1.3-2.5x as long as one GEMM on the whole weight (benchmarks/README.md), whose dequantizing takes ~5%.
PREFILL_TILE_BYTES = 64 << 20


def prefill_dtype(x: torch.Tensor) -> torch.dtype:
    """What a CPU prompt product of quantized weights computes in: bf16 for bf16 activations where the CPU
    multiplies bf16 natively (oneDNN), else fp32 (fp32 activations keep their precision)."""
    return (
        torch.bfloat16
        if x.dtype == torch.bfloat16 and not half_is_emulated(torch.bfloat16)
        else torch.float32
    )


def prefill_matmul(
    x: torch.Tensor, out_features: int, dequantize_rows: Callable[[int, torch.Tensor], None]
) -> torch.Tensor:
    """x (..., in) @ w.T for a quantized weight w (out_features, in), as one GEMM of torch's per tile of output
    rows: `dequantize_rows(start, tile)` writes rows [start, start + len(tile)) of w into `tile` (in the compute
    dtype, `prefill_dtype`), a buffer reused for every tile. A prompt reuses each weight hundreds of times, so
    dequantizing it once per product costs little beside the GEMM."""
    in_features = x.shape[-1]
    dtype = prefill_dtype(x)
    rows = x.reshape(-1, in_features).to(dtype).contiguous()  # (M, in)
    size = torch.finfo(dtype).bits // 8
    tile_rows = max(16, PREFILL_TILE_BYTES // (in_features * size) // 16 * 16)
    scratch = torch.empty(min(tile_rows, out_features), in_features, dtype=dtype)
    if out_features <= tile_rows:
        dequantize_rows(0, scratch)
        y = torch.mm(rows, scratch.t())
    else:
        y = torch.empty(rows.shape[0], out_features, dtype=dtype)  # (M, out)
        for start in range(0, out_features, tile_rows):
            tile = scratch[: min(tile_rows, out_features - start)]
            dequantize_rows(start, tile)
            # A column block of y (row stride out_features): BLAS writes it in place.
            torch.mm(rows, tile.t(), out=y[:, start : start + len(tile)])
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


# int4 prompts of bf16 or fp32 activations: quantized to int8 per weight group and multiplied by the codes in int8
# (`csrc/cpu_prefill.cpp`, `int4_matmul_int8`, in every build: VNNI `vpdpbusd` in the AVX-512 ones, twice bf16's
# multiply-adds an instruction; `vpmaddubsw` in the avx2 one, 32 products an instruction against an fp32 FMA's 8).
# The int8 rounding (~0.7% of a product of Gaussian rows) is small beside the int4 weights' own error, which the
# dequantizing path keeps as well; fp32 prompts took that path until the fp32 int4 prompts of a Zen 3 were measured
# twice as fast this way (benchmarks/README.md). False: always the dequantizing path (benchmarks compare).
INT4_INT8_ACTIVATIONS = True


def takes_int4_int8(module, x: torch.Tensor, out_features: int) -> bool:
    """Whether `int4_matmul_int8` takes x (bf16 or fp32, the layer's outputs a multiple of 16) with this kernel
    module. Not bf16 prompts where the CPU has AMX: the weight dequantized into oneDNN's bf16 GEMM (AMX tiles) is
    faster there (benchmarks/README.md)."""
    return (
        INT4_INT8_ACTIVATIONS
        and (x.dtype is torch.float32 or (x.dtype is torch.bfloat16 and not has_amx()))
        and out_features % 16 == 0
        and hasattr(module, "int4_matmul_int8")
    )


def int4_matmul_int8(
    module, x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor | None:
    """x (..., in) @ w.T for `Int4Linear`'s plain nibbles (out, in/2) with x quantized to int8 per group, or None
    where this does not apply (then `prefill_matmul`)."""
    out_features = packed.shape[0]
    if not takes_int4_int8(module, x, out_features):
        return None
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty(rows.shape[0], out_features)
    module.int4_matmul_int8(rows, packed, scales_and_zeros, group_size, y)
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


# int8 prompts on the avx2 target (from `cpu.INT8_PROMPT_MIN_ROWS` rows): `csrc/cpu_prompt_int8.cpp`, the decode
# kernel's int16 activations and exact integer sums in GEMM blocking, so that a prompt row gets the bits the decode
# kernel gives it, at 1.2-1.7x the speed of the dequantized fp32 GEMM it replaces on a Zen 3 (benchmarks/README.md).
# The AVX-512 builds keep the dequantizing path (oneDNN's bf16 and AMX GEMMs; not measured against this), and so do
# bf16 prompts where the CPU has AMX, in every build (far faster there: benchmarks/README.md). False: always that
# path (benchmarks compare).
INT8_INT16_PROMPTS = True


def int8_matmul_int16(
    module, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor | None:
    """x (..., in) @ w.T for an int8 weight (out, in) with fp32 scales (out,) or bf16 group scales (out, in/G) as
    the decode kernel takes them, or None where the prompt kernel does not apply."""
    out_features, in_features = weight.shape
    if not (
        INT8_INT16_PROMPTS
        and module is not None
        and module.target in AVX2_TARGETS
        and out_features % 16 == 0
        and in_features % 16 == 0
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (x.dtype is torch.bfloat16 and has_amx())
    ):
        return None
    rows = x.reshape(-1, in_features)
    rows = (rows.float() if rows.dtype is torch.float16 else rows).contiguous()
    y = torch.empty(rows.shape[0], out_features)
    module.int8_matmul_int16(rows, weight, scales, y)
    return y.view(*x.shape[:-1], out_features).to(x.dtype)


def has_int4_cpu_kernel() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


# The CPU int4 kernel wants its codes tiled in a layout that depends on the CPU's vector width (see
# aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel): rows in blocks of 64 (AVX-512) or 32,
# each block stored column by column with two rows per byte; full blocks pair row j with row j + block/2
# (AVX-512, AVX2), the rest pair rows 2j and 2j+1. We save the plain layout, so we need the inverse;
# `cpu_int4_layout` finds which of these layouts this machine's torch uses by packing a probe.
CPU_INT4_LAYOUTS = ((64, True), (32, True), (32, False))  # (block rows, full blocks pair j with j + block/2)


def untile_int4_cpu(tiled: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    """Kernel-tiled (out, in/2) uint8 -> plain codes (out, in)."""
    n_rows, k = tiled.shape[0], tiled.shape[1] * 2
    full = n_rows // block * block
    codes = torch.empty(n_rows, k, dtype=torch.uint8, device=tiled.device)
    if full:
        b = tiled[:full].reshape(full // block, k, block // 2)  # (blocks, column, byte)
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], 2) if halves else torch.stack([lo, hi], 3).view(-1, k, block)
        codes[:full] = rows.transpose(1, 2).reshape(full, k)
    if n_rows > full:
        t = tiled[full:].reshape(k, (n_rows - full) // 2)
        codes[full:] = torch.stack([t & 15, t >> 4], 2).view(k, -1).t()
    return codes


@functools.cache
def cpu_int4_layout() -> tuple[int, bool] | None:
    """The tiling of aten._convert_weight_to_int4pack_for_cpu on this machine, or None (then no kernel)."""
    if not has_int4_cpu_kernel():
        return None
    probe = torch.randint(0, 16, (176, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block, halves in CPU_INT4_LAYOUTS:
        if torch.equal(untile_int4_cpu(tiled, block, halves), probe.to(torch.uint8)):
            return block, halves
    return None


def tile_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    """Plain codes (out, in) -> the CPU kernel's tiling, ROW_CHUNK rows at a time."""
    chunks = []
    # Blocks never straddle chunks of ROW_CHUNK rows (a multiple of 64), so chunks tile independently.
    for i in range(0, codes.shape[0], ROW_CHUNK):
        chunk = codes[i : i + ROW_CHUNK].to(torch.int32)
        chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1))
    return torch.cat(chunks)


# --- CUDA ------------------------------------------------------------------------------------------------------
# Not yet run on a GPU: tests/quant/test_cuda.py (`pytest -m cuda`) and benchmarks/gpu_check.sh check all of this.
#
# int4: torch's tinygemm kernel (aten/src/ATen/native/cuda/int4mm.cu; the one gpt-fast and torchao use) computes
# w = (q - 8) * scale + zero from bf16 scales and zeros laid out (groups, out, 2): exactly our format, so only the
# codes are re-laid. `_convert_weight_to_int4pack` takes (out, in/2) uint8 with two codes a byte (since torch 2.5;
# before, int32 codes) and tiles them for the tensor cores in `inner_k_tiles` of 16 inputs.
CUDA_INT4_GROUP_SIZES = (32, 64, 128, 256)
CUDA_INT4_INNER_K_TILES = (8, 4, 2)  # the largest that divides in_features / 16 is taken


def has_int4_cuda_kernel() -> bool:
    ops = torch.ops.aten
    return (
        torch.version.cuda is not None
        and hasattr(ops, "_weight_int4pack_mm")
        and hasattr(ops, "_convert_weight_to_int4pack")
    )


def cuda_int4_inner_k_tiles(in_features: int, out_features: int, group_size: int) -> int | None:
    """The tinygemm tiling for this layer shape, or None where the kernel does not take it: output columns in
    tiles of 8, whole groups of 32..256, inputs in whole super-tiles of inner_k_tiles x 16."""
    if out_features % 8 or group_size not in CUDA_INT4_GROUP_SIZES or in_features % group_size:
        return None
    return next((t for t in CUDA_INT4_INNER_K_TILES if in_features % (t * 16) == 0), None)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Our packing (column 2j in the low nibble) <-> the other order (column 2j in the high nibble)."""
    return (packed << 4) | (packed >> 4)


def tile_int4_cuda(packed: torch.Tensor, inner_k_tiles: int, swap: bool) -> torch.Tensor:
    """Our (out, in/2) nibbles on a CUDA device -> tinygemm's tiling (`swap`: its input order is the other one)."""
    return torch.ops.aten._convert_weight_to_int4pack(
        (swap_nibbles(packed) if swap else packed).contiguous(), inner_k_tiles
    )


def untile_int4_cuda(tiled: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """tinygemm-tiled codes -> plain (out, in) codes 0..15, exactly. There is no unpacking op, so the kernel itself
    multiplies an identity by the weight with unit scales and zero zeros: every product is then q - 8, an integer
    a bf16 holds exactly."""
    out_features = tiled.shape[0] * 8
    n_groups = in_features // group_size
    unit = torch.zeros(n_groups, out_features, 2, dtype=torch.bfloat16, device=tiled.device)
    unit[..., 0] = 1
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=tiled.device)
    for i in range(0, in_features, ROW_CHUNK):
        rows = min(ROW_CHUNK, in_features - i)
        eye = torch.zeros(rows, in_features, dtype=torch.bfloat16, device=tiled.device)
        r = torch.arange(rows, device=tiled.device)
        eye[r, i + r] = 1
        w_t = torch.ops.aten._weight_int4pack_mm(eye, tiled, group_size, unit)  # (rows, out) = (q - 8)^T
        codes[:, i : i + rows] = (w_t.t() + 8).to(torch.uint8)
    return codes


@functools.cache
def cuda_int4_nibble_order(device: torch.device) -> bool | None:
    """Whether this torch's tinygemm wants the nibbles swapped relative to ours (True), not (False), or None when
    it has no working kernel on `device` (then the int4 layers dequantise and matmul). Found by packing a probe and
    reading it back, as `cpu_int4_layout` does: torch has changed this input format before."""
    if not has_int4_cuda_kernel():
        return None
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (64, 256), dtype=torch.uint8, generator=generator).to(device)
    packed = probe[:, 0::2] | (probe[:, 1::2] << 4)
    for swap in (True, False):  # torch 2.5 and later: column 2j in the high nibble
        try:
            back = untile_int4_cuda(tile_int4_cuda(packed, 8, swap), 256, 64)
        except RuntimeError:  # no kernel for this GPU (tinygemm needs compute capability 8.0)
            return None
        if torch.equal(back, probe):
            return swap
    return None


# int8: torch's CUDA `_weight_int8pack_mm` (aten/src/ATen/native/cuda/int8mm.cu) gives each output element its own
# warp, reading the int8 row and fp32 activations: a fused GEMV, fine for a decode step, but it re-reads the weight
# for every row of activations, so prompts are faster widened to the activations' dtype for cuBLAS. Where the two
# cross is measured by benchmarks/gpu_report.py (its int8 layer lines); this is a first guess, not a measurement.
CUDA_INT8_KERNEL_MAX_ROWS = 8


def has_int8_cuda_kernel() -> bool:
    return torch.version.cuda is not None and hasattr(torch, "_weight_int8pack_mm")
