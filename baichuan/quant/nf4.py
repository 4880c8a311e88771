"""Official bitsandbytes 4-bit (NF4) checkpoints, such as `Baichuan2-*-Chat-4bits`, turned back into float
weights as they stream in, on any device and without bitsandbytes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from baichuan.quant.spec import QuantizationError

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
