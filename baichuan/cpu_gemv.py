"""The AVX2 int8/int4 mat-vec kernels (`csrc/cpu_gemv.cpp`), compiled on first use and cached by torch.

torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` run out of arithmetic before memory on
decode-sized products (they widen every weight to float); these kernels do pairs of int8 (or int4) x int16
products per instruction and so stream weights much closer to the memory's rate. They need an x86 CPU with AVX2
and a C++ compiler; where either is missing, or the build fails, or BAICHUAN_CPU_KERNELS=0 is set, `load()` gives
None and the callers keep torch's kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from baichuan.cpu import has_avx2

SOURCE = Path(__file__).parent / "csrc" / "cpu_gemv.cpp"
NAME = "baichuan_cpu_gemv"
ENV_SWITCH = "BAICHUAN_CPU_KERNELS"
# Activation rows up to which the kernels are used by default. 2-core Zen 3, 4608x1536, 1536x4096, 4096x4096 and
# 125696x1536 layers against torch's bf16 kernels: int8 1.4-2.9x faster from 1 to 128 rows; int4 1.4-2.8x up to
# 32 rows, 0.95-1.7x at 128.
# Past that, prompts: int8 is faster as an fp32 GEMM on the widened weight (512-token prefill of the 1.29B
# benchmark model: 64.7 against 36.2 tok/s), while int4 stays faster in the kernel (55.9 against 41.6 tok/s with
# torch's kernel and its widening), so `quantize.Int4Linear` lifts the limit where bf16 is emulated.
MAX_ROWS = 128


def serves(x: torch.Tensor, in_features: int, max_rows: int = MAX_ROWS) -> bool:
    """Whether the kernels should take these activations (..., in_features)."""
    return x.device.type == "cpu" and x.numel() <= max_rows * in_features


def _built(cpp_extension: ModuleType) -> bool:
    try:
        return any(Path(cpp_extension._get_build_directory(NAME, False)).glob(f"{NAME}*.so"))
    except Exception:  # a private helper of torch's: if it moves, the message just shows every time
        return False


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, or None where it cannot be used here (the reason goes to a warning once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not has_avx2():
        return None
    # Importing cpp_extension on a CPU-only machine logs a warning about CUDA_HOME that concerns only CUDA builds.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    try:
        if not _built(cpp_extension):
            print(
                "baichuan: building the AVX2 int8/int4 kernels (once per machine, about a minute)...",
                file=sys.stderr,
            )
        module = cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            # Without -fopenmp, at::parallel_for (a header template) silently runs on one thread.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a build error: torch's kernels still work
        warnings.warn(
            f"the AVX2 int8/int4 kernels could not be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"using torch's kernels. Set {ENV_SWITCH}=0 to skip the attempt.",
            stacklevel=2,
        )
        return None
    return module


def _apply(kernel: str, x: torch.Tensor, *args) -> torch.Tensor | None:
    """Run a kernel on x (..., K) of any float dtype: (..., N) in x's dtype, or None where the kernels are not
    available. Called once per layer per token, so it skips the conversions that are not needed."""
    module = load()
    if module is None:
        return None
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != torch.float32:
        rows = rows.float()
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = getattr(module, kernel)(rows, *args)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """(x @ weight.T) * scales for x (..., K), int8 weight (N, K) with K % 16 == 0, fp32 scales (N,); None where
    the kernels are not available."""
    return _apply("int8_gemv", x, weight, scales)


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor | None:
    """x @ w.T for x (..., K) and `quantize.Int4Linear`'s plain layout: packed uint8 (N, K/2), bf16
    scales_and_zeros (K/group_size, N, 2), group_size a multiple of 32 dividing K; None where the kernels are not
    available."""
    return _apply("int4_gemv", x, packed, scales_and_zeros, group_size)
