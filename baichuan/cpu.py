"""What this CPU computes natively, asked of torch and of oneDNN (the library behind torch's CPU matmuls)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def half_is_emulated(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks native bf16/fp16 matmul (AVX2, AVX-512 before Cooper Lake): oneDNN's check."""
    try:
        if dtype == torch.bfloat16:
            return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        if dtype == torch.float16:
            return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):  # torch built without oneDNN
        return True
    return False


def has_avx2() -> bool:
    """Whether torch runs its AVX2 (or AVX-512) kernels here, which our own kernels (cpu_gemv) need too."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
