"""int4 weight-only linears: group-wise, w = (q - 8) * scale + zero, two codes per byte (see `spec` for what a
checkpoint holds)."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from baichuan import cpu_gemv
from baichuan.cpu import AVX2_TARGETS, half_is_emulated
from baichuan.quant.kernels import (
    KERNEL_DTYPE,
    ROW_CHUNK,
    cpu_int4_layout,
    cuda_int4_inner_k_tiles,
    cuda_int4_nibble_order,
    int4_matmul_int8,
    prefill_matmul,
    takes_int4_int8,
    tile_int4_cpu,
    tile_int4_cuda,
    untile_int4_cpu,
    untile_int4_cuda,
)
from baichuan.quant.spec import DEFAULT_GROUP_SIZE, QuantizationError, check_group_size

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
# Where the CPU only emulates bf16, products of this many rows (prompts) on torch's int4 tiles are faster as an
# fp32 GEMM on the weight dequantised straight from the tiles; at 128 rows the kernel still wins (measured on a
# 2-core Zen 3, see benchmarks/README.md).
INT4_WIDEN_MIN_ROWS = 256


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
    for i in range(0, out_features, ROW_CHUNK):
        w = weight[i : i + ROW_CHUNK].to(torch.float32, copy=True)  # worked on in place, as in quantize_int8
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
        codes[i : i + ROW_CHUNK] = q.view(q.shape[0], -1)[:, :in_features].to(torch.uint8)
        scales[i : i + ROW_CHUNK], zeros[i : i + ROW_CHUNK] = s, z
    return codes, scales, zeros


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) uint8, column 2j in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) codes 0..15; the inverse of `pack_int4`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def int4pack_mm_safe(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether `aten._weight_int4pack_mm_for_cpu` is known to be safe and exact for this layer shape, whatever the
    rows: unlike the int8 kernel (see `int8pack_mm_safe`), int4mm_kernel.cpp reads activations one value at a
    time and weights with unaligned loads, and takes output columns in blocks of 16 to 64 and whole groups of a
    power of two (its group starts are found with a bit mask). Swept with `benchmarks/kernel_canary_sweep.py`."""
    return out_features % 16 == 0 and group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0


class Int4Linear(nn.Module):
    """Group-wise int4 weights: w = (q - 8) * scale + zero, scales and zeros in bf16 whatever the model's dtype.
    CPU: the AVX2 kernel of `cpu_gemv` on the plain nibbles (`cpu_gemv.serves` says for how many rows, and past
    them: dequantise and matmul); where it cannot be built, `aten._weight_int4pack_mm_for_cpu` in bf16 on its own tiling
    when the shape allows (out % 16 == 0, group size 32..256 dividing in); otherwise dequantise and matmul.
    CUDA: torch's tinygemm kernel (`aten._weight_int4pack_mm`) on its own tiling where the shape allows (out % 8 == 0,
    group size 32..256, in % 32 == 0), else dequantise and matmul.

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
        self.cuda_tiles: int | None = (
            None  # on CUDA: the tinygemm inner_k_tiles `weight` is tiled in, or None
        )
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
        return cpu_int4_layout() if fits else None

    def _tile(self) -> None:
        if self.tiled is None and self.weight.device.type == "cpu" and self._cpu_kernel_layout():
            self._set_codes(unpack_int4(self.weight))
        self._tile_cuda()

    def _tile_cuda(self) -> None:
        """Plain nibbles on a CUDA device -> tinygemm's tiling, where its kernel takes this shape."""
        device = self.weight.device
        if self.cuda_tiles is not None or device.type != "cuda":
            return
        tiles = cuda_int4_inner_k_tiles(self.in_features, self.out_features, self.group_size)
        swap = None if tiles is None else cuda_int4_nibble_order(device)
        if swap is not None:
            self.weight, self.cuda_tiles = tile_int4_cuda(self.weight, tiles, swap), tiles

    def _set_codes(self, codes: torch.Tensor) -> None:
        """Keep (out, in) codes in the kernel's tiling where it applies, else as plain nibbles."""
        self.tiled = self._cpu_kernel_layout() if codes.device.type == "cpu" else None
        self.weight = pack_int4(codes) if self.tiled is None else tile_int4_cpu(codes)
        self.cuda_tiles = None
        self._tile_cuda()

    def codes(self) -> torch.Tensor:
        """The (out, in) codes 0..15, whatever layout `weight` is kept in."""
        if self.cuda_tiles is not None:
            return untile_int4_cuda(self.weight, self.in_features, self.group_size)
        if self.tiled is None:
            return unpack_int4(self.weight)
        chunks = [
            untile_int4_cpu(self.weight[i : i + ROW_CHUNK], *self.tiled)
            for i in range(0, self.out_features, ROW_CHUNK)
        ]
        return torch.cat(chunks)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The portable format: weight (plain nibbles), scales, zeros."""
        if self.weight.is_meta:
            weight = torch.empty_like(self.weight)
        else:
            plain = self.tiled is None and self.cuda_tiles is None
            weight = self.weight if plain else pack_int4(self.codes())
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
        y = None
        if self.use_kernel:
            y = self._amx(x)
            if y is None:
                y = self._gemv(x)
        if y is None:
            y = self._matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _amx(self, x: torch.Tensor) -> torch.Tensor | None:
        """bf16 rows on AMX tiles (`cpu_gemv.amx_int4_matmul`, on the plain nibbles) where the CPU has AMX and
        `cpu_gemv.amx_quantized_prompts` takes this many rows; None elsewhere, or where a gradient must flow."""
        if (
            x.dtype is not torch.bfloat16
            or x.device.type != "cpu"
            or self.tiled is not None
            or self.cuda_tiles is not None
            or not self._gemv_fits()
            or not cpu_gemv.amx_quantized_prompts(
                x.numel() // self.in_features, self.out_features, self.in_features
            )
            or (torch.is_grad_enabled() and x.requires_grad)
        ):
            return None
        buffers = self._buffers
        return cpu_gemv.amx_int4_matmul(x, buffers["weight"], buffers["scales_and_zeros"], self.group_size)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decode-sized products through the AVX2 kernel (`cpu_gemv`); None where it does not apply."""
        # Prompts too where bf16 is emulated: faster there than torch's kernel and than widening
        # (benchmarks/README.md), except those the avx2 build's int4 x int8 product takes (`_prefill`).
        long_prompts = half_is_emulated(KERNEL_DTYPE) and not self._avx2_int8_prompt(x)
        max_rows = sys.maxsize if long_prompts else cpu_gemv.MAX_ROWS
        if (
            self.tiled is not None
            or self.cuda_tiles is not None
            or not self._gemv_fits()
            or not cpu_gemv.serves(x, self.in_features, max_rows)
        ):
            return None
        buffers = self._buffers
        return cpu_gemv.int4_gemv(x, buffers["weight"], buffers["scales_and_zeros"], self.group_size)

    def _avx2_int8_prompt(self, x: torch.Tensor) -> bool:
        """Whether x is a prompt (more rows than `cpu_gemv.MAX_ROWS`) that the avx2 build's `int4_matmul_int8`
        takes. The AVX-512 builds' prompts keep their routes where bf16 is emulated (decode kernel), as before."""
        if x.numel() <= cpu_gemv.MAX_ROWS * self.in_features:
            return False
        module = cpu_gemv.load()
        return (
            module is not None
            and module.target in AVX2_TARGETS
            and takes_int4_int8(module, x, self.out_features)
        )

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and self.cuda_tiles is not None:  # tinygemm computes in bf16, as the CPU kernel
            rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
            y = torch.ops.aten._weight_int4pack_mm(rows, self.weight, self.group_size, self.scales_and_zeros)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        y = self._prefill(x) if self.use_kernel else None
        if y is not None:
            return y
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

    def _prefill(self, x: torch.Tensor) -> torch.Tensor | None:
        """Prompts (more rows than `_gemv` takes) on the plain nibbles: bf16 or fp32 activations (outputs a multiple
        of 16) quantized to int8 and multiplied in int8 by our kernel module (`int4_matmul_int8`: VNNI in the AVX-512
        builds, `vpmaddubsw` in the avx2 one); others dequantized tile by tile into one GEMM per tile
        (`prefill_matmul`), in bf16 for bf16 activations where the CPU has native bf16, else in fp32; None where
        neither applies."""
        if (
            x.device.type != "cpu"
            or self.tiled is not None
            or self.cuda_tiles is not None
            or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or not self._gemv_fits()
            or (torch.is_grad_enabled() and x.requires_grad)  # out= products record no gradient
        ):
            return None
        module = cpu_gemv.load()
        if module is None:
            return None
        weight, scales_and_zeros, group_size = self.weight, self.scales_and_zeros, self.group_size
        y = int4_matmul_int8(module, x, weight, scales_and_zeros, group_size)
        if y is not None:
            return y
        return prefill_matmul(
            x,
            self.out_features,
            lambda start, tile: module.dequantize_int4(weight, scales_and_zeros, group_size, start, tile),
        )

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
        self.weight, self.scales_and_zeros, self.tiled, self.cuda_tiles, self.bias = (
            loaded.weight,
            loaded.scales_and_zeros,
            loaded.tiled,
            loaded.cuda_tiles,
            loaded.bias,
        )

    def _apply(self, fn, recurse=True):
        # The kernels' tilings are for one kind of device: leaving it goes back to plain nibbles first.
        to = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device)).device.type
        if self.tiled is not None and to != "cpu":
            self.weight, self.tiled = pack_int4(self.codes()), None
        if self.cuda_tiles is not None and to != "cuda":
            self.weight, self.cuda_tiles = pack_int4(self.codes()), None
        super()._apply(fn, recurse)
        if self.scales_and_zeros.dtype != KERNEL_DTYPE:  # a model-wide .to(dtype) keeps them in bf16
            self.scales_and_zeros = self.scales_and_zeros.to(KERNEL_DTYPE)
        self._tile()
        return self

    def _kernel_name(self) -> str:
        if self.tiled is not None:
            return "cpu"
        if self.cuda_tiles is not None:
            return "tinygemm"
        on_cpu = self.weight.device.type == "cpu"
        return "avx2" if on_cpu and self._gemv_fits() and cpu_gemv.load() is not None else "reference"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, kernel={self._kernel_name()}"
        )
