"""Weight-only int8/int4 quantization by swapping `nn.Linear` modules from outside the model (as gpt-fast does),
and dequantisation of bitsandbytes NF4 checkpoints.

This module knows only `nn.Linear` and tensor names. Baichuan2's NormHead must be folded into a plain Linear
(`checkpoint.fold_norm_head`) before quantizing, because quantizing the raw rows and normalising afterwards is
not possible.

What a saved checkpoint holds for a quantized linear `X` (the `format_version` 1 of the config record):
  int8  X.weight int8 (out, in) and X.scales (out,): w = weight * scales[:, None]. Symmetric per output channel,
        scale = absmax/127, rounded as Baichuan-13B's `QLinear` does, so its int8 values are reproduced exactly.
  int4  X.weight uint8 (out, in/2), column 2j in the low nibble and 2j+1 in the high one, codes q in 0..15, and
        X.scales, X.zeros bf16 (out, ceil(in/group_size)): w = (q - 8) * scale + zero. This is the convention of
        PyTorch's tinygemm int4 kernels, so loading only re-tiles the codes for the CPU kernel.
The config.json record (see `quantize_model`) says which layers hold which format.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import functools
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baichuan import cpu_gemv
from baichuan.cpu import half_is_emulated

QUANT_METHOD = "baichuan_weight_only"
FORMAT_VERSION = 1
SUPPORTED_BITS = (8, 4)
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
DEFAULT_GROUP_SIZE = 128
# The output head is kept at 8 bits in 4-bit models: its error goes straight into the logits with nothing after
# it to average it out (llama.cpp's Q4_0 likewise keeps output.weight at higher precision). Measured on the tiny
# Baichuan2 test model, see tests/test_quantize.py::test_int4_head_policy.
DEFAULT_INT4_OVERRIDES = {"lm_head": 8}
# Rows quantized at a time: fp32 temporaries of a few MB instead of a copy of a 125,696-row head. A multiple of
# 64, so the CPU int4 kernel's row blocks never straddle two chunks.
_ROW_CHUNK = 1024
# torch's CPU weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) are vectorised for bf16
# activations; with fp32 or fp16 ones they ran 8-17x slower on a 4096x4096 layer here (AVX2 Zen 3, torch 2.14), so
# the CPU path always computes in bf16 and casts back. int4 scales and zeros are kept in bf16 for the same reason
# (and because the CUDA tinygemm kernel takes nothing else).
KERNEL_DTYPE = torch.bfloat16
# Where the CPU only emulates bf16, int8 products of this many rows (prompts) are faster as an fp32 GEMM on the
# widened weight: 4096x1536 and 1536x4096 layers, 2-core Zen 3: 128 rows 61 vs 68 ms, 256 rows 42-76 vs 100-104 ms
# (the kernel wins below, 32 rows 5-28 vs 21-40 ms).
INT8_WIDEN_MIN_ROWS = 128
# The same for int4, dequantising straight from the kernel's tiles: 4096x1536, 1536x4096 and 4608x1536 layers,
# 256 rows 32-41 vs 55-63 ms, 512 rows 59-103 vs 100-125 ms; at 128 rows the kernel still wins (20-33 vs 24-44).
INT4_WIDEN_MIN_ROWS = 256


class QuantizationError(ValueError):
    """A quantization request or a quantized checkpoint that cannot be served; the message is one line."""


def check_bits(bits: Any) -> int:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise QuantizationError(f"unsupported quantization bits {bits!r}: choose 8 (int8) or 4 (int4)")
    return int(bits)


def check_group_size(group_size: Any) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise QuantizationError(f"int4 group size must be an even integer >= 2, got {group_size!r}")
    return group_size


# --- int8 ---------------------------------------------------------------------------------------------------


def quantize_int8(
    weight: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 codes (out, in) and scales (out,), symmetric per output channel.

    The codes are rounded against the scale as stored (in `scale_dtype`), so a bf16 scale adds no second error.
    With fp32 scales this is exactly Baichuan-13B's QLinear: round(w / (absmax/127)).
    """
    scale_dtype = scale_dtype or weight.dtype
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for i in range(0, weight.shape[0], _ROW_CHUNK):
        # A copy of its own, worked on in place: one fp32 temporary per chunk (quantizing on load is CPU-bound).
        w = weight[i : i + _ROW_CHUNK].to(torch.float32, copy=True)
        lo, hi = torch.aminmax(w, dim=1)
        # tiny keeps all-zero rows finite; it never changes the scale of a non-zero row.
        s = (torch.maximum(-lo, hi) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
        codes[i : i + _ROW_CHUNK] = w.div_(s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[i : i + _ROW_CHUNK] = s
    return codes, scales


# torch's CPU int8 kernel (aten/src/ATen/native/cpu/int8mm_kernel.cpp, tinygemm_kernel) walks each row of bf16
# activations 16 values at a time (AVX-512; 8 under AVX2) with *aligned* vector loads from x + row * in_features,
# reads weight rows 16 bytes at a time likewise, and has no loop for a remainder. So with in_features % 16 != 0
# it sums values past the end of every row (wrong outputs, one row included) and, from the second row on, loads
# from a misaligned address: SIGSEGV (issue 9). A buffer that does not start on a 32-byte (activations) or
# 16-byte (weights) boundary faults too, whatever in_features. The file has no AMX code: AMX CPUs run the AVX-512
# one. Only bf16 activations take the vectorised code (fp32 and fp16 ones a scalar loop), and bf16 is all we
# send. `benchmarks/kernel_canary_sweep.py` shows all of this under each of torch's x86 kernels.
_HAS_INT8_CPU_KERNEL = hasattr(torch, "_weight_int8pack_mm")
INT8_KERNEL_K_MULTIPLE = 16  # AVX-512 loads 16 bf16; AVX2 and NEON 8, but one rule serves every CPU
_INT8_KERNEL_X_ALIGN, _INT8_KERNEL_W_ALIGN = 32, 16  # bytes: the widest aligned loads of activations, weights


def int8pack_mm_safe(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._weight_int8pack_mm(rows, weight, scales)` is known to be safe and exact on any x86 CPU:
    rows (M, K) and weight (N, K) contiguous on the CPU, K a multiple of 16, both buffers aligned for the kernel's
    vector loads. Callers fall back to the dequantise-and-matmul path outside it."""
    return (
        _HAS_INT8_CPU_KERNEL
        and rows.device.type == "cpu"
        and rows.dim() == 2
        and rows.shape[1] % INT8_KERNEL_K_MULTIPLE == 0
        and rows.is_contiguous()
        and weight.is_contiguous()
        and rows.data_ptr() % _INT8_KERNEL_X_ALIGN == 0
        and weight.data_ptr() % _INT8_KERNEL_W_ALIGN == 0
    )


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """t, or a copy of it in a fresh buffer (torch's CPU allocator aligns those to 64 bytes) where t does not start
    on an `alignment`-byte boundary, as tensors read straight from a safetensors file often do not."""
    return t.clone() if t.device.type == "cpu" and t.data_ptr() % alignment else t


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T, weight int8 (out, in). CPU: the AVX2 kernel of `cpu_gemv` (where it
    `serves` those rows and could be built), else `torch._weight_int8pack_mm` in bf16 where `int8pack_mm_safe`
    says so, else the widened weight in a float matmul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.use_kernel = True  # False forces the reference path (tests compare the two)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, scale_dtype)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, scale_dtype: torch.dtype | None = None
    ) -> Int8Linear:
        weight = weight.detach()
        if weight.is_meta:  # an empty module with the right shapes, to be filled from a checkpoint
            return cls(
                weight.shape[1], weight.shape[0], bias is not None, scale_dtype or weight.dtype, "meta"
            )
        codes, scales = quantize_int8(weight, scale_dtype)
        return cls.from_quantized_tensors(codes, scales, bias)

    @classmethod
    def from_quantized_tensors(
        cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int8Linear:
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise QuantizationError(
                f"int8 weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        if tuple(scales.shape) != (weight.shape[0],):
            raise QuantizationError(
                f"int8 scales must have shape ({weight.shape[0]},), got {tuple(scales.shape)}"
            )
        module = cls(weight.shape[1], weight.shape[0], bias is not None, scales.dtype, "meta")
        module.weight, module.scales = _aligned(weight.contiguous()), scales.contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x) if self.use_kernel else None
        if y is None:
            y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.use_kernel
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not (x.numel() >= INT8_WIDEN_MIN_ROWS * self.in_features and half_is_emulated(KERNEL_DTYPE))
        ):
            # A bf16 view may start anywhere (a slice of a larger batch): copied, it starts aligned.
            rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
            rows = _aligned(rows, _INT8_KERNEL_X_ALIGN)
            if int8pack_mm_safe(rows, self.weight):
                y = torch._weight_int8pack_mm(rows, self.weight, self.scales.to(KERNEL_DTYPE))
                return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        # Per-channel scaling commutes with the matmul, so the int8 weight is only widened, never rescaled
        # (gpt-fast's form; under torch.compile it fuses into one kernel). Emulated half precision is
        # computed in fp32.
        dtype = torch.float32 if x.device.type == "cpu" and half_is_emulated(x.dtype) else x.dtype
        return (F.linear(x.to(dtype), self.weight.to(dtype)) * self.scales.to(dtype)).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) puts a file's tensor here as it is; aligned, it keeps torch's kernel.
        self.weight = _aligned(self.weight)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decode-sized products through the AVX2 kernel (`cpu_gemv`); None where it does not apply."""
        if self.in_features % 16 or not cpu_gemv.serves(x, self.in_features):
            return None
        # _buffers: this runs once per layer per token, and Module.__getattr__ costs a microsecond a lookup.
        scales = self._buffers["scales"]
        if scales.dtype != torch.float32:
            scales = scales.float()
        return cpu_gemv.int8_gemv(x, self._buffers["weight"], scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


# --- int4 ---------------------------------------------------------------------------------------------------


def quantize_int4(
    weight: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> codes uint8 (out, in) in 0..15, scales and zeros (out, ceil(in/group_size)) in
    `scale_dtype` (default: the weight's).

    w = (q - 8) * scale + zero. Asymmetric: scale = (max - min)/15, zero = min + 8*scale, so q = 0..15 spans
    [min, max]. Symmetric: scale = absmax/7, zero = 0 (codes 1..15, as Baichuan-13B's quant4). A last group
    shorter than group_size uses only its own values. Codes are rounded against the scale/zero as stored.
    """
    check_group_size(group_size)
    scale_dtype = scale_dtype or weight.dtype
    out_features, in_features = weight.shape
    n_groups = math.ceil(in_features / group_size)
    pad = n_groups * group_size - in_features
    codes = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, n_groups, dtype=scale_dtype, device=weight.device)
    zeros = torch.empty_like(scales)
    for i in range(0, out_features, _ROW_CHUNK):
        w = weight[i : i + _ROW_CHUNK].to(torch.float32, copy=True)  # worked on in place, as in quantize_int8
        if pad:  # repeat the row's last value: it changes neither min nor max of the short group
            w = F.pad(w[None], (0, pad), mode="replicate")[0]
        w = w.view(w.shape[0], n_groups, group_size)
        lo, hi = torch.aminmax(w, dim=-1)
        if symmetric:
            s = (torch.maximum(-lo, hi) / 7).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
            z = torch.zeros_like(s)
        else:
            s = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
            z = (lo + 8 * s.float()).to(scale_dtype)
        q = w.sub_(z.float()[..., None]).div_(s.float()[..., None]).add_(8).round_().clamp_(0, 15)
        codes[i : i + _ROW_CHUNK] = q.view(q.shape[0], -1)[:, :in_features].to(torch.uint8)
        scales[i : i + _ROW_CHUNK], zeros[i : i + _ROW_CHUNK] = s, z
    return codes, scales, zeros


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) uint8, column 2j in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) codes 0..15; the inverse of `pack_int4`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def _has_int4_cpu_kernel() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def int4pack_mm_safe(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether `aten._weight_int4pack_mm_for_cpu` is known to be safe and exact for this layer shape, whatever the
    rows: unlike the int8 kernel (see `int8pack_mm_safe`), int4mm_kernel.cpp reads activations one value at a
    time and weights with unaligned loads, and takes output columns in blocks of 16 to 64 and whole groups of a
    power of two (its group starts are found with a bit mask). Swept with `benchmarks/kernel_canary_sweep.py`."""
    return out_features % 16 == 0 and group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0


# The CPU int4 kernel wants its codes tiled in a layout that depends on the CPU's vector width (see
# aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel): rows in blocks of 64 (AVX-512) or 32,
# each block stored column by column with two rows per byte; full blocks pair row j with row j + block/2
# (AVX-512, AVX2), the rest pair rows 2j and 2j+1. We save the plain layout, so we need the inverse;
# `_cpu_int4_layout` finds which of these layouts this machine's torch uses by packing a probe.
_CPU_INT4_LAYOUTS = ((64, True), (32, True), (32, False))  # (block rows, full blocks pair j with j + block/2)


def _untile_int4_cpu(tiled: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
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
def _cpu_int4_layout() -> tuple[int, bool] | None:
    """The tiling of aten._convert_weight_to_int4pack_for_cpu on this machine, or None (then no kernel)."""
    if not _has_int4_cpu_kernel():
        return None
    probe = torch.randint(0, 16, (176, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block, halves in _CPU_INT4_LAYOUTS:
        if torch.equal(_untile_int4_cpu(tiled, block, halves), probe.to(torch.uint8)):
            return block, halves
    return None


def _tile_int4_cpu(codes: torch.Tensor) -> torch.Tensor:
    chunks = []
    # Blocks never straddle chunks of _ROW_CHUNK rows (a multiple of 64), so chunks tile independently.
    for i in range(0, codes.shape[0], _ROW_CHUNK):
        chunk = codes[i : i + _ROW_CHUNK].to(torch.int32)
        chunks.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk, 1))
    return torch.cat(chunks)


class Int4Linear(nn.Module):
    """Group-wise int4 weights: w = (q - 8) * scale + zero, scales and zeros in bf16 whatever the model's dtype.
    CPU: the AVX2 kernel of `cpu_gemv` on the plain nibbles (`cpu_gemv.serves` says for how many rows, and past
    them: dequantise and matmul); where it cannot be built, `aten._weight_int4pack_mm_for_cpu` in bf16 on its own tiling
    when the shape allows (out % 16 == 0, group size 32..256 dividing in); otherwise dequantise and matmul.

    `state_dict()` always gives the portable format (weight, scales, zeros) and `load_state_dict` takes it, so
    the kernel's machine-dependent tiling never reaches a file.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_group_size(group_size)
        if in_features % 2:
            raise QuantizationError(f"int4 needs an even number of input features, got {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        # (groups, out, 2): scale and zero side by side, the kernel's layout, so a forward copies nothing.
        self.register_buffer(
            "scales_and_zeros", torch.empty(n_groups, out_features, 2, dtype=KERNEL_DTYPE, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.tiled: tuple[int, bool] | None = None  # the CPU kernel layout `weight` is in, None when plain
        self.use_kernel = True

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False
    ) -> Int4Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size, symmetric)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        symmetric: bool = False,
    ) -> Int4Linear:
        weight = weight.detach()
        if weight.shape[1] % 2:
            raise QuantizationError(f"int4 needs an even number of input features, got {weight.shape[1]}")
        if weight.is_meta:
            return cls(
                weight.shape[1],
                weight.shape[0],
                group_size,
                bias is not None,
                weight.dtype,
                "meta",
            )
        # Codes are rounded against the bf16 scales and zeros the module keeps, so storing adds no error.
        codes, scales, zeros = quantize_int4(weight, group_size, symmetric, KERNEL_DTYPE)
        return cls.from_quantized_tensors(codes, scales, zeros, group_size, bias, packed=False)

    @classmethod
    def from_quantized_tensors(
        cls,
        weight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: torch.Tensor | None = None,
        packed: bool = True,
    ) -> Int4Linear:
        """From the portable format: weight uint8 (out, in/2), scales and zeros (out, ceil(in/group_size)).
        `packed=False`: weight holds the (out, in) codes one per byte (saves a pack/unpack when quantizing)."""
        if weight.dtype != torch.uint8 or weight.dim() != 2:
            raise QuantizationError(
                f"int4 weight must be a 2-D uint8 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape[0], weight.shape[1] * (2 if packed else 1)
        module = cls(in_features, out_features, group_size, bias is not None, scales.dtype, "meta")
        n_groups = module.scales_and_zeros.shape[0]
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, n_groups):
                raise QuantizationError(
                    f"int4 {name} must have shape ({out_features}, {n_groups}) for {in_features} inputs in groups of "
                    f"{group_size}, got {tuple(t.shape)}"
                )
        module.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        if packed:
            module.weight = weight.contiguous()
            module._tile()
        else:
            module._set_codes(weight)
        return module

    def _gemv_fits(self) -> bool:
        """Whether `cpu_gemv.int4_gemv` takes this shape (it reads the plain nibbles)."""
        g = self.group_size
        return g % 32 == 0 and g <= 256 and self.in_features % g == 0

    def _cpu_kernel_layout(self) -> tuple[int, bool] | None:
        """The tiling of torch's CPU kernel, when this shape suits it, this torch has it, and the AVX2 kernel of
        `cpu_gemv` (faster, on the plain nibbles) does not apply."""
        if self._gemv_fits() and cpu_gemv.load() is not None:
            return None
        fits = int4pack_mm_safe(self.in_features, self.out_features, self.group_size)
        return _cpu_int4_layout() if fits else None

    def _tile(self) -> None:
        if self.tiled is None and self.weight.device.type == "cpu" and self._cpu_kernel_layout():
            self._set_codes(unpack_int4(self.weight))

    def _set_codes(self, codes: torch.Tensor) -> None:
        """Keep (out, in) codes in the kernel's tiling where it applies, else as plain nibbles."""
        self.tiled = self._cpu_kernel_layout() if codes.device.type == "cpu" else None
        self.weight = pack_int4(codes) if self.tiled is None else _tile_int4_cpu(codes)

    def codes(self) -> torch.Tensor:
        """The (out, in) codes 0..15, whatever layout `weight` is kept in."""
        if self.tiled is None:
            return unpack_int4(self.weight)
        chunks = [
            _untile_int4_cpu(self.weight[i : i + _ROW_CHUNK], *self.tiled)
            for i in range(0, self.out_features, _ROW_CHUNK)
        ]
        return torch.cat(chunks)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The portable format: weight (plain nibbles), scales, zeros."""
        if self.weight.is_meta:
            weight = torch.empty_like(self.weight)
        else:
            weight = self.weight if self.tiled is None else pack_int4(self.codes())
        return {
            "weight": weight,
            "scales": self.scales_and_zeros[..., 0].t().contiguous(),
            "zeros": self.scales_and_zeros[..., 1].t().contiguous(),
        }

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes().float()
        n_groups = self.scales_and_zeros.shape[0]
        pad = n_groups * self.group_size - self.in_features
        codes = F.pad(codes, (0, pad)).view(self.out_features, n_groups, self.group_size)
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
        w = (codes - 8) * scales[..., None] + zeros[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features].to(dtype)

    def _weight_t_from_tiles(self) -> torch.Tensor | None:
        """The dequantised weight transposed, (in, out) fp32, computed from the CPU kernel's tiles without
        untiling them; None when rows do not fill whole tiles."""
        block, halves = self.tiled
        if self.out_features % block:
            return None
        blocks, k, g = self.out_features // block, self.in_features, self.group_size
        tiles = self.weight.view(blocks, k, block // 2)
        lo, hi = tiles & 15, tiles >> 4
        codes = torch.cat([lo, hi], 2) if halves else torch.stack([lo, hi], 3).view(blocks, k, block)
        # (groups, out, 2) -> (blocks, groups, 2, block): each tile's scales and zeros beside its codes.
        sz = self.scales_and_zeros.view(k // g, blocks, block, 2).permute(1, 0, 3, 2).float().contiguous()
        scales, zeros = sz[:, :, 0, None, :], sz[:, :, 1, None, :]
        w = torch.addcmul(zeros - 8 * scales, codes.view(blocks, k // g, g, block).float(), scales)
        return w.view(blocks, k, block).permute(1, 0, 2).reshape(k, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x) if self.use_kernel else None
        if y is None:
            y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decode-sized products through the AVX2 kernel (`cpu_gemv`); None where it does not apply."""
        # Prompts too where bf16 is emulated: measured faster than torch's kernel and than widening (cpu_gemv).
        max_rows = sys.maxsize if half_is_emulated(KERNEL_DTYPE) else cpu_gemv.MAX_ROWS
        if (
            self.tiled is not None
            or not self._gemv_fits()
            or not cpu_gemv.serves(x, self.in_features, max_rows)
        ):
            return None
        buffers = self._buffers
        return cpu_gemv.int4_gemv(x, buffers["weight"], buffers["scales_and_zeros"], self.group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        weight_t = None
        if (
            self.use_kernel
            and self.tiled is not None
            and x.device.type == "cpu"
            and x.numel() >= INT4_WIDEN_MIN_ROWS * self.in_features
            and half_is_emulated(KERNEL_DTYPE)
        ):
            weight_t = self._weight_t_from_tiles()
        if weight_t is not None:  # a prompt where bf16 is emulated: one fp32 GEMM
            y = (x.reshape(-1, self.in_features).float() @ weight_t).view(*x.shape[:-1], self.out_features)
            return y.to(x.dtype)
        if self.use_kernel and self.tiled is not None and x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous(),
                self.weight,
                self.group_size,
                self.scales_and_zeros,
            )
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        # Emulated half precision is computed in fp32.
        dtype = torch.float32 if x.device.type == "cpu" and half_is_emulated(x.dtype) else x.dtype
        return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)

    # state_dict in the portable format, whatever the in-memory layout.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in self.quantized_tensors().items():
            destination[prefix + name] = tensor
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = ["weight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        try:
            loaded = Int4Linear.from_quantized_tensors(
                state_dict[prefix + "weight"],
                state_dict[prefix + "scales"],
                state_dict[prefix + "zeros"],
                self.group_size,
                state_dict.get(prefix + "bias"),
            )
        except QuantizationError as e:
            error_msgs.append(f"{prefix}: {e}")
            return
        if (loaded.in_features, loaded.out_features) != (self.in_features, self.out_features):
            error_msgs.append(
                f"{prefix}: int4 shape {loaded.out_features}x{loaded.in_features} does not match "
                f"{self.out_features}x{self.in_features}"
            )
            return
        self.weight, self.scales_and_zeros, self.tiled, self.bias = (
            loaded.weight,
            loaded.scales_and_zeros,
            loaded.tiled,
            loaded.bias,
        )

    def _apply(self, fn, recurse=True):
        # The kernel's tiling is for the CPU only: leaving the CPU goes back to plain nibbles first.
        if self.tiled is not None and fn(torch.empty(0, dtype=torch.uint8)).device.type != "cpu":
            self.weight, self.tiled = pack_int4(self.codes()), None
        super()._apply(fn, recurse)
        if self.scales_and_zeros.dtype != KERNEL_DTYPE:  # a model-wide .to(dtype) keeps them in bf16
            self.scales_and_zeros = self.scales_and_zeros.to(KERNEL_DTYPE)
        self._tile()
        return self

    def _kernel_name(self) -> str:
        if self.tiled is not None:
            return "cpu"
        on_cpu = self.weight.device.type == "cpu"
        return "avx2" if on_cpu and self._gemv_fits() and cpu_gemv.load() is not None else "reference"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, kernel={self._kernel_name()}"
        )


QUANTIZED_TYPES = (Int8Linear, Int4Linear)


# --- swapping modules -------------------------------------------------------------------------------------------


def _bits_for(name: str, bits: int, skip: Iterable[str], overrides: Mapping[str, int | None]) -> int | None:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
        return None
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return None if override is None else check_bits(override)
    return bits


def quantized_linear(
    linear: nn.Linear,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> nn.Module:
    """One Linear -> Int8Linear or Int4Linear (an empty one on the meta device when the Linear is on meta).
    `scale_dtype`: of the int8 scales (default: the weight's); int4 scales are always bf16."""
    if check_bits(bits) == 8:
        return Int8Linear.from_linear(linear, scale_dtype)
    return Int4Linear.from_linear(linear, group_size, symmetric)


def quantize_model(
    module: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    skip: Iterable[str] = (),
    overrides: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """Swap every `nn.Linear` of `module` in place for its quantized version; returns the config.json record.

    `skip`: fnmatch patterns of qualified names kept in floating point. `overrides`: pattern -> bits (or None to
    keep float); by default a 4-bit model keeps `lm_head` at 8 bits (DEFAULT_INT4_OVERRIDES), an 8-bit model
    quantizes everything. On the meta device this builds empty quantized modules with the right shapes, which
    is how a saved quantized checkpoint is prepared for loading (`prepare_quantized`).
    """
    record = _record(bits, group_size, symmetric, skip, overrides)
    head = getattr(module, "lm_head", None)
    if head is not None and not isinstance(head, (nn.Linear, *QUANTIZED_TYPES)):
        raise QuantizationError(
            f"lm_head is a {type(head).__name__}, not a Linear: fold it first (checkpoint.fold_norm_head)"
        )
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        layer_bits = _bits_for(name, bits, record["skip"], record["overrides"])
        if layer_bits is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        # Nothing else holds the float Linear, so its weight is freed as soon as the quantized one replaces it.
        setattr(parent, child, quantized_linear(getattr(parent, child), layer_bits, group_size, symmetric))
    return record


def _record(
    bits: int,
    group_size: int,
    symmetric: bool,
    skip: Iterable[str],
    overrides: Mapping[str, int | None] | None,
) -> dict[str, Any]:
    """The config.json `quantization` record; `overrides=None` means the default policy for `bits`."""
    if overrides is None:
        overrides = DEFAULT_INT4_OVERRIDES if check_bits(bits) == 4 else {}
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": check_bits(bits),
        "group_size": check_group_size(group_size),
        "symmetric": bool(symmetric),
        "skip": list(skip),
        "overrides": {pattern: None if b is None else check_bits(b) for pattern, b in overrides.items()},
    }


def check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a config.json `quantization` record written by `quantize_model`; one-line errors."""
    if not isinstance(record, Mapping):
        raise QuantizationError(f"the quantization record must be a JSON object, got {type(record).__name__}")
    if record.get("quant_method") != QUANT_METHOD:
        raise QuantizationError(
            f"unknown quantization method {record.get('quant_method')!r} (expected {QUANT_METHOD!r})"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(
            f"quantized checkpoint format {record.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    return {
        "bits": check_bits(record.get("bits")),
        "group_size": check_group_size(record.get("group_size")),
        "symmetric": bool(record.get("symmetric", False)),
        "skip": tuple(record.get("skip", ())),
        "overrides": dict(record.get("overrides", {})),
    }


def prepare_quantized(module: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Swap the linears of a (meta-device) model for empty quantized ones, as the record says, before loading."""
    quantize_model(module, **check_record(record))
    return module


def quantized_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The portable state dict (int8: weight+scales; int4: weight+scales+zeros), ready for safetensors."""
    return {name: t.detach().contiguous() for name, t in module.state_dict().items()}


def load_quantized_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    record: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a `quantized_state_dict`; with a record, first swap the model's linears (it may be on meta)."""
    if record is not None:
        prepare_quantized(module, record)
    module.load_state_dict(state_dict, strict=strict, assign=True)
    return module


def _normalize_rows_(weight: torch.Tensor) -> torch.Tensor:
    """In place, a few rows at a time: F.normalize(rows.float(), dim=-1) rounded back to weight's dtype, which is
    what `fold_norm_head` computes. A copy of a 125,696-row head would add its size to the peak of a load."""
    for i in range(0, weight.shape[0], _ROW_CHUNK):
        rows = weight[i : i + _ROW_CHUNK]
        rows.copy_(F.normalize(rows.float(), dim=-1))
    return weight


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Give the pages of freed blocks back to the OS (glibc; elsewhere nothing). glibc keeps freed blocks below
    its mmap threshold (which grows to 32 MB) in its heaps, where the small blocks a quantized model keeps pin
    the holes that its temporaries leave; a quantizing load's resident memory then grows well past its weights."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class QuantizingLoader:
    """Puts checkpoint tensors into a model built on the meta device one at a time, so that peak memory stays
    near the quantized size: a drop-in for `checkpoint._assign(model, name, value)`.

    - A float `X.weight` of an `nn.Linear` X is quantized on arrival (`bits` given) and X swapped for the result;
      names in `normalize` get their rows L2-normalised first, in place (Baichuan2's head: fold before
      quantizing), so the loader must be given tensors it may change (`load_weights` reads fresh ones).
    - Parts of a quantized module prepared by `prepare_quantized` are gathered until complete, then it is built.
    - Anything else is assigned as a parameter or buffer.
    Call `finish()` after the last tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        symmetric: bool = False,
        skip: Iterable[str] = (),
        overrides: Mapping[str, int | None] | None = None,
        normalize: Iterable[str] = (),
    ):
        self.model = model
        self.bits = None if bits is None else check_bits(bits)
        self.group_size = check_group_size(group_size)
        self.symmetric = symmetric
        self._record = None if bits is None else _record(bits, group_size, symmetric, skip, overrides)
        self.normalize = set(normalize)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def record(self) -> dict[str, Any] | None:
        """The config.json record of the quantization done while loading (None when `bits` was not given)."""
        return self._record

    def __call__(self, name: str, value: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if isinstance(module, QUANTIZED_TYPES) and attr != "bias":
            self._gather(module_name, module, attr, value)
            return
        if name in self.normalize:
            value = _normalize_rows_(value)  # the loader owns what load_weights hands it
        layer_bits = None
        if isinstance(module, nn.Linear) and attr == "weight" and self._record is not None:
            layer_bits = _bits_for(module_name, self.bits, self._record["skip"], self._record["overrides"])
        if layer_bits is not None:
            quantized = (
                Int8Linear.from_weight(value)
                if layer_bits == 8
                else Int4Linear.from_weight(value, None, self.group_size, self.symmetric)
            )
            if module.bias is not None:  # filled when the bias arrives
                quantized.bias = nn.Parameter(
                    torch.empty_like(module.bias, device="meta"), requires_grad=False
                )
            self._swap(module_name, quantized)
        else:
            # A copy, so that no tensor keeps a memory-mapped checkpoint file (and its pages) alive.
            value = value.clone()
            old = getattr(module, attr)
            if isinstance(old, nn.Parameter):
                setattr(
                    module,
                    attr,
                    nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point()),
                )
            else:
                module.register_buffer(attr, value)

    def _gather(self, module_name: str, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        parts = self.pending.setdefault(module_name, {})
        parts[attr] = value
        need = ("weight", "scales") if isinstance(module, Int8Linear) else ("weight", "scales", "zeros")
        if all(n in parts for n in need):
            del self.pending[module_name]
            if isinstance(module, Int8Linear):
                built = Int8Linear.from_quantized_tensors(parts["weight"], parts["scales"])
            else:
                built = Int4Linear.from_quantized_tensors(
                    parts["weight"], parts["scales"], parts["zeros"], module.group_size
                )
            if (built.in_features, built.out_features) != (module.in_features, module.out_features):
                raise QuantizationError(
                    f"{module_name}: quantized shape {built.out_features}x{built.in_features} "
                    f"does not match the model's {module.out_features}x{module.in_features}"
                )
            built.bias = module.bias
            self._swap(module_name, built)

    def _swap(self, module_name: str, new: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)
        release_freed_memory()  # the temporaries of quantizing it

    def finish(self) -> None:
        if self.pending:
            name, parts = next(iter(self.pending.items()))
            raise QuantizationError(
                f"quantized tensors of {name} are incomplete (only {', '.join(sorted(parts))})"
            )


# --- bitsandbytes NF4 checkpoints -------------------------------------------------------------------------------

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (Dettmers et al. 2023, "QLoRA",
# appendix E; the same table as bitsandbytes.functional.get_4bit_type("nf4")). Checkpoints carry it as
# `quant_map`; this copy is used only where one does not.
# fmt: off
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# fmt: on
_BNB_STATE_KEY = "quant_state.bitsandbytes__"
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Iterable[int],
    blocksize: int = 64,
    quant_map: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """bitsandbytes 4-bit (NF4) -> float, on any device, without bitsandbytes.

    The format (bitsandbytes `functional.quantize_4bit` / `QuantState.as_dict`, checked against bitsandbytes'
    own CPU dequantize_4bit in the tests): the weight flattened row-major is cut into blocks of `blocksize`;
    element i is quant_map[code_i] * absmax[i // blocksize]; two codes per byte, the even element in the HIGH
    nibble. With double quantisation (`compress_statistics`) absmax itself is uint8, 8-bit blockwise quantised
    with the signed dynamic map: absmax = nested_quant_map[a] * nested_absmax[j // nested_blocksize] + offset.
    """
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    device = packed.device
    levels = (torch.tensor(NF4_LEVELS) if quant_map is None else quant_map).to(device, torch.float32)
    if nested_absmax is not None:
        if nested_quant_map is None:
            raise QuantizationError("double-quantised NF4 absmax needs its nested_quant_map")
        idx = torch.arange(absmax.numel(), device=device) // nested_blocksize
        absmax = (
            nested_quant_map.to(device, torch.float32)[absmax.reshape(-1).long()]
            * nested_absmax.to(device, torch.float32).reshape(-1)[idx]
            + offset
        )
    absmax = absmax.reshape(-1).float()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 15], dim=-1).reshape(-1)[:numel].long()
    n_blocks = math.ceil(numel / blocksize)
    if absmax.numel() != n_blocks:
        raise QuantizationError(
            f"NF4 absmax has {absmax.numel()} entries, {n_blocks} blocks of {blocksize} expected"
        )
    values = (
        F.pad(levels[codes], (0, n_blocks * blocksize - numel)).view(n_blocks, blocksize) * absmax[:, None]
    )
    return values.reshape(-1)[:numel].view(shape).to(dtype)


def unpack_bnb_quant_state(tensor: torch.Tensor) -> dict[str, Any]:
    """The JSON that bitsandbytes packs into the uint8 `quant_state.bitsandbytes__nf4` tensor."""
    return json.loads(bytes(tensor.reshape(-1).tolist()).decode("utf-8"))


def dequantize_bnb_4bit(parts: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One bitsandbytes `Linear4bit` weight from its state-dict parts, keyed by the suffix after `X.weight`:
    "" (the packed uint8 data), "absmax", "quant_map", optional "nested_absmax"/"nested_quant_map", and
    "quant_state.bitsandbytes__nf4"."""
    state_keys = [k for k in parts if k.startswith(_BNB_STATE_KEY)]
    if len(state_keys) != 1:
        raise QuantizationError(f"expected one {_BNB_STATE_KEY}<type> entry, found {len(state_keys)}")
    quant_type = state_keys[0].removeprefix(_BNB_STATE_KEY)
    if quant_type != "nf4":
        raise QuantizationError(
            f"bitsandbytes 4-bit type {quant_type!r} has no CPU path here; only nf4 is supported"
        )
    state = unpack_bnb_quant_state(parts[state_keys[0]])
    missing = [k for k in ("", "absmax") if k not in parts]
    nested = "nested_blocksize" in state
    if nested:
        missing += [k for k in ("nested_absmax", "nested_quant_map") if k not in parts]
    if missing:
        raise QuantizationError(
            f"bitsandbytes NF4 weight lacks {', '.join(repr(k or 'weight') for k in missing)}"
        )
    return dequantize_nf4(
        parts[""],
        parts["absmax"],
        state["shape"],
        int(state["blocksize"]),
        parts.get("quant_map"),
        parts.get("nested_absmax") if nested else None,
        parts.get("nested_quant_map") if nested else None,
        int(state.get("nested_blocksize", 256)),
        float(state.get("nested_offset", 0.0)),
        dtype or getattr(torch, state.get("dtype", "float16")),
    )


def _bnb_part(name: str) -> tuple[str, str] | None:
    """`X.weight.absmax` -> ("X.weight", "absmax"); None for names that are not bitsandbytes statistics."""
    for suffix in _BNB_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    base, sep, rest = name.partition("." + _BNB_STATE_KEY)
    if sep:
        return base, _BNB_STATE_KEY + rest
    return None


def dequantize_bnb_stream(
    tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn a bitsandbytes 4-bit checkpoint stream into float weights: `X.weight` is yielded dequantised as
    soon as all its parts have arrived (they may span shards); every other tensor passes through unchanged.
    Only the 4-bit layout is understood: a uint8 `X.weight` is taken to be packed NF4 data."""
    pending: dict[str, dict[str, torch.Tensor]] = {}

    def complete(base: str) -> bool:
        parts = pending[base]
        if "" not in parts or "absmax" not in parts:
            return False
        state_key = next((k for k in parts if k.startswith(_BNB_STATE_KEY)), None)
        if state_key is None:
            return False
        nested = "nested_blocksize" in unpack_bnb_quant_state(parts[state_key])
        return not nested or ("nested_absmax" in parts and "nested_quant_map" in parts)

    for name, tensor in tensors:
        part = _bnb_part(name)
        if part is None and tensor.dtype == torch.uint8 and name.endswith(".weight"):
            part = (name, "")
        if part is None:
            yield name, tensor
            continue
        base, suffix = part
        pending.setdefault(base, {})[suffix] = tensor
        if complete(base):
            yield base, dequantize_bnb_4bit(pending.pop(base), dtype)
    if pending:
        base, parts = next(iter(pending.items()))
        raise QuantizationError(
            f"bitsandbytes 4-bit tensors of {base} are incomplete (only "
            f"{', '.join(repr(k or 'weight') for k in sorted(parts))})"
        )


def read_quantization(hf_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a config.json says about quantized weights: our record (validated), the bitsandbytes 4-bit marker
    {"quant_method": "bitsandbytes", "bits": 4}, or None. Formats with no CPU path fail in one line."""
    record = hf_config.get("quantization")
    if record is not None:
        check_record(record)
        return dict(record)
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise QuantizationError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise QuantizationError(
            f"{method} quantized checkpoints are not supported; load the float model and use quantize(8|4)"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise QuantizationError(
            "bitsandbytes 8-bit (LLM.int8) checkpoints need bitsandbytes on CUDA and have no "
            "CPU path here; load the float model and use quantize(8)"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise QuantizationError("quantization_config says neither load_in_4bit nor load_in_8bit")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise QuantizationError(
            f"bitsandbytes 4-bit type {quant_type!r} has no CPU path here; only nf4 is supported"
        )
    return {"quant_method": "bitsandbytes", "bits": 4, "quant_type": "nf4"}
