"""What the quantized layers need of torch's CPU kernels: the dtype they compute in, the rows worked on at a
time, and the tiling of torch's int4 kernel (found by a probe, undone for saving). Our own AVX2 int8/int4
kernels are `baichuan.cpu_gemv` (the loader of `baichuan/csrc/`); the layers call it directly.
"""

from __future__ import annotations

import functools

import torch

# torch's CPU weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) are vectorised for bf16
# activations and much slower with fp32 or fp16 ones (benchmarks/README.md), so the CPU path always computes in
# bf16 and casts back. int4 scales and zeros are kept in bf16 for the same reason (and because the CUDA tinygemm
# kernel takes nothing else).
KERNEL_DTYPE = torch.bfloat16
# Rows quantized (or tiled, or normalised) at a time: fp32 temporaries of a few MB instead of a copy of a
# 125,696-row head. A multiple of 64, so the CPU int4 kernel's row blocks never straddle two chunks.
ROW_CHUNK = 1024


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
