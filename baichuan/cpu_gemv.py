"""Our CPU kernels (`csrc/cpu_gemv*.cpp`): weight-only int8/int4 and bf16 products for decoding, compiled on
first use, once per instruction set, and cached by torch.

torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` run out of arithmetic before memory on
decode-sized products (they widen every weight to float), and its bf16 mat-vec does too where bf16 is emulated;
these kernels do pairs of int8 x int16 products per instruction (int4 x int8: 32 or, with VNNI, 64 products), and
bf16 products with `vdpbf16ps` or two FMAs per 32-bit lane, and so stream weights much closer to the memory's rate.

Which build runs is decided from the CPU's features (`cpu.kernel_target`): avx2, avx2vnni (AVX2 with
AVX-VNNI), avx512 (with VNNI) or avx512bf16 (which also multiplies short bf16, int8 and int4 prompts on AMX tiles
where the CPU has them: `amx_ready`). Each build is named after its target (`baichuan_cpu_gemv_avx512bf16`, its own directory in torch's
extension cache), so a cache shared between machines never hands a CPU a kernel it cannot run.
BAICHUAN_CPU_ISA=avx2 (or avx2vnni, avx512) forces a lower target; one the CPU cannot run is clamped, with a
warning.
They need an x86 CPU with AVX2 and a C++ compiler; where either is missing, or the build fails, or
BAICHUAN_CPU_KERNELS=0 is set, `load()` gives None and the callers keep torch's kernels.
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

from baichuan.cpu import (
    AMX_BF16_MIN_ROWS,
    AMX_INT8_MAX_ROWS,
    AMX_INT8_MIN_ROWS,
    AMX_QUANTIZED_MIN_ROWS,
    AVX2_TARGETS,
    GEMV_MAX_ROWS,
    amx_bf16_max_rows,
    amx_int8_max_rows,
    amx_quantized_max_rows,
    bf16_gemv_max_rows,
    bf16_prompt_min_rows,
    kernel_target,
    single_stream,
)

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "cpu_gemv.cpp"
# Every source of the one extension built per target; each defines its own functions in the module.
SOURCES = (
    SOURCE,
    CSRC / "cpu_gemv_int8.cpp",
    CSRC / "cpu_gemv_int4.cpp",
    CSRC / "cpu_gemv_bf16.cpp",
    CSRC / "cpu_fused.cpp",
    CSRC / "cpu_prefill.cpp",
    CSRC / "cpu_prompt_int8.cpp",
    CSRC / "cpu_prompt_bf16.cpp",
    CSRC / "cpu_prompt_amx.cpp",
    CSRC / "cpu_attention_amx.cpp",
    CSRC / "cpu_amx_int8.cpp",
    CSRC / "bindings.cpp",  # the Python module; each source declares what it offers in kernels.h
)
NAME = "baichuan_cpu_gemv"
ENV_SWITCH = "BAICHUAN_CPU_KERNELS"
ENV_TARGET = "BAICHUAN_CPU_ISA"
MAX_ROWS = GEMV_MAX_ROWS  # the name the quantized layers use
INT8_MAX_GROUP = 256  # int8 group scales: the kernel's activation block is the group, at most kMaxBlock
# What each target compiles with. Never -march=native: a build must run on every CPU of its target.
TARGET_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": [
        "-mavx2",
        "-mfma",
        "-mf16c",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512vnni",
    ],
}
TARGET_FLAGS["avx2vnni"] = [*TARGET_FLAGS["avx2"], "-mavxvnni"]
TARGET_FLAGS["avx512bf16"] = [*TARGET_FLAGS["avx512"], "-mavx512bf16"]


def serves(x: torch.Tensor, in_features: int, max_rows: int = MAX_ROWS) -> bool:
    """Whether the kernels should take these activations (..., in_features)."""
    return x.device.type == "cpu" and x.numel() <= max_rows * in_features


def target() -> str | None:
    """The instruction set of the build `load()` uses here (BAICHUAN_CPU_ISA may lower it); None without AVX2
    or where BAICHUAN_CPU_KERNELS=0."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return kernel_target(os.environ.get(ENV_TARGET))


def build_name(isa: str) -> str:
    return f"{NAME}_{isa}"


def _built(cpp_extension: ModuleType, name: str) -> bool:
    try:
        return any(Path(cpp_extension._get_build_directory(name, False)).glob(f"{name}*.so"))
    except Exception:  # a private helper of torch's: if it moves, the message just shows every time
        return False


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module for this CPU, or None where it cannot be used here (the reason goes to a
    warning once)."""
    isa = target()
    return None if isa is None else load_target(isa)


@functools.cache
def load_target(isa: str) -> ModuleType | None:
    """The build for one target (tests run the lower ones too). The caller makes sure the CPU runs it."""
    # Importing cpp_extension on a CPU-only machine logs a warning about CUDA_HOME that concerns only CUDA builds.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)

    name = build_name(isa)
    try:
        if not _built(cpp_extension, name):
            print(
                f"baichuan: building the {isa} CPU kernels (once per machine, about a minute)...",
                file=sys.stderr,
            )
        module = cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            # Without -fopenmp, at::parallel_for (a header template) silently runs on one thread.
            extra_cflags=["-O3", *TARGET_FLAGS[isa], "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a build error: torch's kernels still work
        warnings.warn(
            f"the {isa} CPU kernels could not be built ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"using torch's kernels. Set {ENV_SWITCH}=0 to skip the attempt.",
            stacklevel=2,
        )
        return None
    if module.target != isa:  # the source's feature tests disagree with the flags: never run it
        warnings.warn(f"the {isa} CPU kernels built as {module.target}; using torch's kernels.", stacklevel=2)
        return None
    module.set_single_stream(single_stream(isa))
    return module


@functools.cache
def _bf16_max_rows() -> int:
    return bf16_gemv_max_rows(target())


@functools.cache
def _bf16_prompt_min_rows() -> int | None:
    return bf16_prompt_min_rows(target())


def _amx_ready() -> bool:
    """Whether the build in use runs its AMX kernels here (a lower build has none: `amx_ready` is False there)."""
    module = load()
    return module is not None and module.amx_ready()


def _amx_max_rows() -> int:
    return amx_bf16_max_rows(load().target) if _amx_ready() else 0


def _amx_quantized_max_rows() -> int:
    return amx_quantized_max_rows(load().target) if _amx_ready() else 0


def _amx_int8_max_rows() -> int:
    if not _amx_ready():
        return 0
    module = load()
    return amx_int8_max_rows(module.target) if module.amx_int8_ready() else 0


# False restores the products bf16, int8 and int4 prompts had before `bf16_matmul` and the AMX kernels (the
# benchmarks compare).
BF16_PROMPTS = True
AMX_PROMPTS = True
# False sends int8 batches back to the mat-vec and `amx_int8_matmul` (the benchmarks compare).
AMX_INT8 = True


def bf16_prompts(rows: int, weight: torch.Tensor) -> bool:
    """Whether `bf16_linear` gives `rows` activation rows against this bf16 weight to `bf16_matmul`."""
    least = _bf16_prompt_min_rows()
    return (
        BF16_PROMPTS
        and least is not None
        and rows >= least
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 8 == 0
    )


def amx_prompts(rows: int, weight: torch.Tensor) -> bool:
    """Whether `bf16_linear` gives `rows` bf16 activation rows against this bf16 weight to `amx_bf16_matmul`."""
    return (
        rows >= AMX_BF16_MIN_ROWS
        and AMX_PROMPTS
        and rows <= _amx_max_rows()
        and weight.shape[0] % 32 == 0
        and weight.shape[1] % 32 == 0
    )


def amx_quantized_prompts(rows: int, out_features: int, in_features: int) -> bool:
    """Whether `rows` bf16 activation rows against an int8 (per-row scales) or int4 weight of this shape go to
    `amx_int8_matmul` / `amx_int4_matmul`."""
    return (
        rows >= AMX_QUANTIZED_MIN_ROWS
        and AMX_PROMPTS
        and rows <= _amx_quantized_max_rows()
        and out_features % 32 == 0
        and in_features % 32 == 0
    )


def amx_int8_products(rows: int, out_features: int, in_features: int) -> bool:
    """Whether `rows` activation rows (fp32 or bf16) against an int8 weight of this shape (per-row scales, or group
    scales of a multiple of 32 columns) go to `amx_int8_int16_matmul`."""
    return (
        AMX_INT8_MIN_ROWS <= rows <= AMX_INT8_MAX_ROWS  # cheap tests first: prompts never ask the build
        and AMX_INT8
        and out_features % 32 == 0
        and in_features % 64 == 0
        and rows <= _amx_int8_max_rows()
    )


# False sends prompts' causal attention back to torch's SDPA (the benchmarks compare).
AMX_ATTENTION = True


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal attention of a fresh prompt, q, k, v (B, H, T, D) of one shape, on `amx_causal_attention`: (B, T,
    H * D) bf16, the output projection's input. None where it does not apply: no AMX, not bf16 on the CPU,
    autograd, a head size not a multiple of 32, rows not contiguous."""
    if not (
        AMX_ATTENTION
        and q.dtype is torch.bfloat16
        and k.dtype is torch.bfloat16
        and v.dtype is torch.bfloat16
        and q.device.type == "cpu"
        and not torch.is_grad_enabled()
        and q.shape == k.shape == v.shape
        and q.shape[-1] % 32 == 0
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and k.stride(2) % 2 == 0
        and _amx_ready()
    ):
        return None
    return amx_causal_attention(q, k, v)


def amx_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return load().amx_causal_attention(q, k, v)


def _apply(kernel: str, x: torch.Tensor, *args) -> torch.Tensor | None:
    """Run a kernel on x (..., K) of any float dtype: (..., N) in x's dtype, or None where the kernels are not
    available. Called once per layer per token, so it skips the conversions that are not needed (the kernels
    take fp32 and bf16 rows as they are)."""
    module = load()
    if module is None:
        return None
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype is not torch.float32 and rows.dtype is not torch.bfloat16:
        rows = rows.float()
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = getattr(module, kernel)(rows, *args)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """(x @ weight.T) * scales for x (..., K), int8 weight (N, K) with K % 16 == 0, fp32 scales (N,); or with bf16
    scales (N, K/G), one per group of G columns (G a multiple of 16 up to `INT8_MAX_GROUP`). None where the
    kernels are not available."""
    return _apply("int8_gemv", x, weight, scales)


def int4_gemv(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor | None:
    """x @ w.T for x (..., K) and `quantize.Int4Linear`'s plain layout: packed uint8 (N, K/2), bf16
    scales_and_zeros (K/group_size, N, 2), group_size a multiple of 32 dividing K; None where the kernels are not
    available."""
    return _apply("int4_gemv", x, packed, scales_and_zeros, group_size)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T for x (..., K) and a contiguous bf16 weight (N, K), in x's dtype (fp32 x is rounded to bf16
    where the CPU has AVX512-BF16); None where the kernels are not available."""
    return _apply("bf16_gemv", x, weight)


def amx_bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T for bf16 x (..., K) and a contiguous bf16 weight (N, K), N and K multiples of 32, on AMX tiles
    (`csrc/cpu_prompt_amx.cpp`); only where `amx_prompts` allows (the kernel raises where the CPU or the build has
    no AMX). None where the kernels are not available."""
    return _apply("amx_bf16_matmul", x, weight)


def amx_int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """x @ (weight * scales[:, None]).T for bf16 x (..., K), contiguous int8 codes (N, K) and fp32 per-row scales
    (N,), N and K multiples of 32, on AMX tiles; only where `amx_quantized_prompts` allows. None where the kernels are
    not available."""
    return _apply("amx_int8_matmul", x, weight, scales)


def amx_int8_int16_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """(x @ weight.T) * scales for x (..., K), contiguous int8 codes (N, K) and fp32 per-row scales (N,) or bf16
    group scales (N, K/G) with G a multiple of 32, N and K multiples of 32, on AMX-INT8 tiles against x's int16 codes
    as `int8_gemv` quantizes them (`csrc/cpu_amx_int8.cpp`); only where `amx_int8_products` allows. None where the
    kernels are not available."""
    return _apply("amx_int8_int16_matmul", x, weight, scales)


def amx_int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor | None:
    """x @ w.T for bf16 x (..., K) and an int4 weight (`quant.int4.Int4Linear`'s plain nibbles (N, K/2) and bf16
    scales_and_zeros (K/G, N, 2), G a multiple of 32), w dequantized to bf16 as `dequantize_int4` rounds it, on AMX
    tiles; only where `amx_quantized_prompts` allows. None where the kernels are not available."""
    return _apply("amx_int4_matmul", x, packed, scales_and_zeros, group_size)


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x @ weight.T for prompt-sized x (..., K) and a contiguous bf16 weight (N, K), N % 16 == 0 and K % 8 == 0,
    in x's dtype: fp32 FMAs on the weight widened a block at a time (`csrc/cpu_prompt_bf16.cpp`), the products of
    the fp32 GEMM on a widened copy without the copy. None where the kernels are not available."""
    return _apply("bf16_matmul", x, weight)


@functools.cache
def widens_fp32_rows() -> bool:
    """Whether our bf16 mat-vec here multiplies fp32 activation rows as they are, each bf16 weight widened to
    fp32 (the avx2 and avx512 builds): the products of an fp32 weight holding the same values, at half the bytes
    read. The avx512bf16 build rounds the rows to bf16 for `vdpbf16ps`."""
    return target() in (*AVX2_TARGETS, "avx512")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for the device: it rounds fp32 rows to its dtype before a product, which torch's
    product then does (a frozen bf16 LoRA base under bf16 autocast, train.finetune.store_frozen_base)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before the device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """F.linear(x, weight, bias) through our kernels where they are the faster product: a bf16 weight on the CPU,
    no gradient to record, and either
    - bf16 x of `cpu.AMX_BF16_MIN_ROWS` to `cpu.amx_bf16_max_rows` rows where `amx_prompts` (a CPU with AMX):
      `amx_bf16_matmul`;
    - else bf16 x of at most `cpu.bf16_gemv_max_rows` rows (decoding): `bf16_gemv`;
    - more rows of bf16 x, or of fp32 x with autocast off, where `bf16_prompts`: `bf16_matmul`;
    - fp32 x of any rows where `widens_fp32_rows` and autocast is off, in chunks of the mat-vec's rows: an fp32
      weight's products without an fp32 copy of the weight (a quantized fp32 model's head,
      checkpoint.bf16_head_beside).
    None elsewhere, and the caller runs torch's. Runs once per layer per token, so the cheap checks come first."""
    if (
        weight.dtype is not torch.bfloat16
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        or not weight.is_contiguous()
    ):
        return None
    limit = _bf16_max_rows()
    if x.dtype is torch.bfloat16 and x.shape[-1] and amx_prompts(x.numel() // x.shape[-1], weight):
        y = amx_bf16_matmul(x, weight)
    elif x.dtype is torch.bfloat16 and x.numel() <= limit * x.shape[-1]:
        y = bf16_gemv(x, weight)
    elif x.dtype is torch.float32 and autocast_enabled("cpu"):
        return None
    elif (
        (x.dtype is torch.bfloat16 or x.dtype is torch.float32)
        and x.shape[-1]
        and bf16_prompts(x.numel() // x.shape[-1], weight)
    ):
        y = bf16_matmul(x, weight)
    elif x.dtype is torch.float32 and x.numel() and widens_fp32_rows():
        chunks = [bf16_gemv(rows, weight) for rows in x.reshape(-1, x.shape[-1]).split(limit)]
        if chunks[0] is None:
            return None
        y = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        y = y.view(*x.shape[:-1], weight.shape[0])
    else:
        return None
    if y is None or bias is None:
        return y
    return y + bias.to(y.dtype)
