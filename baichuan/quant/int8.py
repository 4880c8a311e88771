"""int8 weight-only linears: symmetric per output channel, w = weight * scales[:, None], or per group of G input
columns with bf16 scales (out, in/G), as llama.cpp's Q8_0, for the output head (see `spec` for what a checkpoint
holds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baichuan import cpu_gemv
from baichuan.cpu import INT8_PROMPT_MIN_ROWS, half_is_emulated
from baichuan.quant.kernels import (
    CUDA_INT8_KERNEL_MAX_ROWS,
    KERNEL_DTYPE,
    ROW_CHUNK,
    has_int8_cuda_kernel,
    int8_matmul_int16,
    prefill_matmul,
)
from baichuan.quant.spec import QuantizationError

# Where the CPU only emulates bf16, int8 products of this many rows (prompts) are faster as an fp32 GEMM on the
# widened weight than in torch's bf16 kernel (measured on a 2-core Zen 3, see benchmarks/README.md).
INT8_WIDEN_MIN_ROWS = 128


# Rows of a group-scaled weight dequantized at a time off the CPU kernels' paths (CUDA, no kernel module): fp32
# temporaries of 64 MiB at 4,096 inputs.
GROUPED_TILE_ROWS = 4096
# The group scales' dtype: what the kernel reads (half the bytes of fp32, 1/16 of a byte a weight at G = 32).
GROUP_SCALE_DTYPE = torch.bfloat16


def check_int8_group(in_features: int, group_size: int | None) -> int | None:
    """A group size for int8 scales (None: one scale a row); one-line errors for the rest."""
    if group_size is None:
        return None
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size < 1
        or in_features % group_size
    ):
        raise QuantizationError(
            f"int8 group size must be a positive integer dividing in_features {in_features}, got {group_size!r}"
        )
    return group_size


def quantize_int8(
    weight: torch.Tensor, scale_dtype: torch.dtype | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 codes (out, in) and scales, symmetric: (out,) per output channel, or with
    `group_size` bf16 (out, in / group_size) per group of that many input columns.

    The codes are rounded against the scale as stored (in `scale_dtype`), so a bf16 scale adds no second error.
    With fp32 scales and no groups this is exactly Baichuan-13B's QLinear: round(w / (absmax/127)).
    """
    out_features, in_features = weight.shape
    group = check_int8_group(in_features, group_size) or in_features
    scale_dtype = GROUP_SCALE_DTYPE if group_size else (scale_dtype or weight.dtype)
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(out_features, in_features // group, dtype=scale_dtype, device=weight.device)
    for i in range(0, out_features, ROW_CHUNK):
        # A copy of its own, worked on in place: one fp32 temporary per chunk (quantizing on load is CPU-bound).
        w = weight[i : i + ROW_CHUNK].to(torch.float32, copy=True)
        groups = w.view(len(w), -1, group)
        lo, hi = torch.aminmax(groups, dim=2)
        # tiny keeps all-zero rows finite; it never changes the scale of a non-zero row.
        s = (torch.maximum(-lo, hi) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
        groups.div_(s.float()[:, :, None]).round_().clamp_(-127, 127)
        codes[i : i + ROW_CHUNK] = w.to(torch.int8)
        scales[i : i + ROW_CHUNK] = s
    return codes, scales if group_size else scales.view(out_features)


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
    """y = x @ (weight * scales[:, None]).T, weight int8 (out, in); with `group_size`, bf16 scales (out, in/G), one
    per group of G input columns. CPU: the kernel of `cpu_gemv` (where it `serves` those rows and could be built),
    else `torch._weight_int8pack_mm` in bf16 where `int8pack_mm_safe` says so (per-row scales), else the widened
    weight in a float matmul. CUDA: torch's fused `_weight_int8pack_mm` for decode-sized products (up to
    `CUDA_INT8_KERNEL_MAX_ROWS` rows, per-row scales), the widened weight in a cuBLAS matmul otherwise."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        group_size: int | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = check_int8_group(in_features, group_size)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        scales_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        scales_dtype = dtype if group_size is None else GROUP_SCALE_DTYPE
        self.register_buffer("scales", torch.empty(scales_shape, dtype=scales_dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.use_kernel = True  # False forces the reference path (tests compare the two)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None, group_size: int | None = None
    ) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias, scale_dtype, group_size)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = None,
        group_size: int | None = None,
    ) -> Int8Linear:
        weight = weight.detach()
        if weight.is_meta:  # an empty module with the right shapes, to be filled from a checkpoint
            return cls(
                weight.shape[1],
                weight.shape[0],
                bias is not None,
                scale_dtype or weight.dtype,
                "meta",
                group_size,
            )
        codes, scales = quantize_int8(weight, scale_dtype, group_size)
        return cls.from_quantized_tensors(codes, scales, bias)

    @classmethod
    def from_quantized_tensors(
        cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> Int8Linear:
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise QuantizationError(
                f"int8 weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}"
            )
        out_features, in_features = weight.shape
        group_size = None
        if scales.dim() == 2 and scales.shape[0] == out_features and 0 < scales.shape[1]:
            group_size = in_features // scales.shape[1]
        if not (
            tuple(scales.shape) == (out_features,)
            or (group_size and scales.shape[1] * group_size == in_features)
        ):
            raise QuantizationError(
                f"int8 scales must have shape ({out_features},) or ({out_features}, in_features / group size), "
                f"got {tuple(scales.shape)}"
            )
        module = cls(in_features, out_features, bias is not None, scales.dtype, "meta", group_size)
        module.weight, module.scales = _aligned(weight.contiguous()), scales.contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features).to(dtype)

    def dequantize_rows(self, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of the weight in fp32."""
        codes = self.weight[start : start + count].float()
        scales = self.scales[start : start + count].float()
        if self.group_size is None:
            return codes.mul_(scales[:, None])
        return codes.view(count, -1, self.group_size).mul_(scales[:, :, None]).view(count, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.use_kernel:
            y = self._amx_int8(x)
            if y is None:
                y = self._amx(x)
            if y is None:
                y = self._prompt(x)
            if y is None:
                y = self._gemv(x)
        if y is None:
            y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:  # no torch kernel takes group scales
            return self._grouped_matmul(x)
        if (
            self.use_kernel
            and x.device.type == "cuda"
            and x.numel() <= CUDA_INT8_KERNEL_MAX_ROWS * self.in_features
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and has_int8_cuda_kernel()
        ):
            rows = x.reshape(-1, self.in_features).contiguous()
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        if (
            self.use_kernel
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        ):
            y = self._prefill(x)
            if y is not None:
                return y
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

    def _grouped_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w.T for group scales on any device, prompts included: the weight dequantized `GROUPED_TILE_ROWS`
        rows at a time into one product each, so a large vocabulary's head never has a whole float copy (where a
        gradient must flow to x, which out= products do not record, the whole weight at once)."""
        dtype = torch.float32 if x.device.type == "cpu" and half_is_emulated(x.dtype) else x.dtype
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x.to(dtype), self.dequantize(dtype)).to(x.dtype)
        rows = x.reshape(-1, self.in_features).to(dtype)
        y = torch.empty(rows.shape[0], self.out_features, dtype=dtype, device=x.device)
        for start in range(0, self.out_features, GROUPED_TILE_ROWS):
            tile = self.dequantize_rows(start, min(GROUPED_TILE_ROWS, self.out_features - start)).to(dtype)
            torch.mm(rows, tile.t(), out=y[:, start : start + len(tile)])
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _prefill(self, x: torch.Tensor) -> torch.Tensor | None:
        """Prompts (more rows than `_gemv` takes): the weight dequantized tile by tile by our kernel module into
        one GEMM per tile (`prefill_matmul`), in bf16 for bf16 activations where the CPU has native bf16, else in
        fp32; None where the module is not built, or a gradient must flow (out= products record none)."""
        module = cpu_gemv.load()
        if module is None or (torch.is_grad_enabled() and x.requires_grad):
            return None
        weight, scales = self.weight, self.scales.float().contiguous()
        return prefill_matmul(
            x, self.out_features, lambda start, tile: module.dequantize_int8(weight, scales, start, tile)
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) puts a file's tensor here as it is; aligned, it keeps torch's kernel.
        self.weight = _aligned(self.weight)

    def _amx_int8(self, x: torch.Tensor) -> torch.Tensor | None:
        """A few fp32 or bf16 rows on AMX-INT8 tiles (`cpu_gemv.amx_int8_int16_matmul`, the mat-vec's int16 codes)
        where the CPU has AMX-INT8 and `cpu_gemv.amx_int8_products` takes this many rows: per-row scales, or group
        scales of a multiple of 32 columns (an 8-bit model's head); None elsewhere, or where a gradient must
        flow."""
        if (
            (self.group_size is not None and self.group_size % 32)
            or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.bfloat16)
            or not cpu_gemv.amx_int8_products(
                x.numel() // self.in_features, self.out_features, self.in_features
            )
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return None
        scales = self._kernel_scales()
        return None if scales is None else cpu_gemv.amx_int8_int16_matmul(x, self._buffers["weight"], scales)

    def _amx(self, x: torch.Tensor) -> torch.Tensor | None:
        """bf16 rows on AMX tiles (`cpu_gemv.amx_int8_matmul`) where the CPU has AMX and
        `cpu_gemv.amx_quantized_prompts` takes this many rows, per-row scales only; None elsewhere, or where a
        gradient must flow."""
        if (
            x.dtype is not torch.bfloat16
            or self.group_size is not None
            or x.device.type != "cpu"
            or not cpu_gemv.amx_quantized_prompts(
                x.numel() // self.in_features, self.out_features, self.in_features
            )
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return None
        return cpu_gemv.amx_int8_matmul(x, self._buffers["weight"], self._kernel_scales())

    def _prompt(self, x: torch.Tensor) -> torch.Tensor | None:
        """CPU prompts of `INT8_PROMPT_MIN_ROWS` rows or more through the avx2 build's prompt kernel
        (`kernels.int8_matmul_int16`: the decode kernel's arithmetic, faster from there on); None where it does not
        apply (decode rows return at the first test), or a gradient must flow."""
        if (
            x.numel() < INT8_PROMPT_MIN_ROWS * self.in_features
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return None
        scales = self._kernel_scales()
        if scales is None:
            return None
        return int8_matmul_int16(cpu_gemv.load(), x, self._buffers["weight"], scales)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decode-sized products through the AVX2 kernel (`cpu_gemv`); None where it does not apply."""
        if self.in_features % 16 or not cpu_gemv.serves(x, self.in_features):
            return None
        scales = self._kernel_scales()
        if scales is None:
            return None
        return cpu_gemv.int8_gemv(x, self._buffers["weight"], scales)

    def _kernel_scales(self) -> torch.Tensor | None:
        """The scales as our CPU kernels read them (fp32 per row, or bf16 per group of a size they take), or None."""
        # _buffers: this runs once per layer per token, and Module.__getattr__ costs a microsecond a lookup.
        scales = self._buffers["scales"]
        if self.group_size is not None:
            if self.group_size % 16 or self.group_size > cpu_gemv.INT8_MAX_GROUP:
                return None
            return self._kernel_group_scales(scales)
        return scales if scales.dtype is torch.float32 else scales.float()

    def _kernel_group_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The group scales in bf16, as the kernel reads them: the buffer itself, or where `model.float()` (or the
        like) converted it, a bf16 copy made once per buffer (exact after fp32, which holds every bf16 value)."""
        if scales.dtype is GROUP_SCALE_DTYPE:
            return scales
        cached = self.__dict__.get("_bf16_scales")
        if cached is None or cached[0] is not scales:
            cached = (scales, scales.to(GROUP_SCALE_DTYPE).contiguous())
            self.__dict__["_bf16_scales"] = cached
        return cached[1]

    def extra_repr(self) -> str:
        groups = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8{groups}"
