"""Swapping a model's `nn.Linear` modules for quantized ones from outside the model (as gpt-fast does): in place
(`quantize_model`), on the meta device before a quantized checkpoint is read (`prepare_quantized`), or tensor by
tensor while a checkpoint streams in (`QuantizingLoader`, the transform hook of `checkpoint.load_weights`).

Baichuan2's NormHead must be folded into a plain Linear (`checkpoint.fold_norm_head`) before quantizing, because
quantizing the raw rows and normalising afterwards is not possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from baichuan.memory import return_free_memory
from baichuan.quant.int4 import Int4Linear
from baichuan.quant.int8 import Int8Linear
from baichuan.quant.spec import (
    DEFAULT_GROUP_SIZE,
    QuantizationError,
    bits_for,
    check_bits,
    check_group_size,
    check_record,
    int8_group_for,
    make_record,
)

QUANTIZED_TYPES = (Int8Linear, Int4Linear)


def quantized_linear(
    linear: nn.Linear,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    int8_group: int | None = None,
) -> nn.Module:
    """One Linear -> Int8Linear or Int4Linear (an empty one on the meta device when the Linear is on meta).
    `scale_dtype`: of the int8 per-row scales (default: the weight's); int8 group scales (`int8_group` columns
    each) and int4 scales are always bf16."""
    if check_bits(bits) == 8:
        return Int8Linear.from_linear(linear, scale_dtype, int8_group)
    return Int4Linear.from_linear(linear, group_size, symmetric)


def quantize_model(
    module: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    skip: Iterable[str] = (),
    overrides: Mapping[str, int | None] | None = None,
    int8_groups: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Swap every `nn.Linear` of `module` in place for its quantized version; returns the config.json record.

    `skip`: fnmatch patterns of qualified names kept in floating point. `overrides`: pattern -> bits (or None to
    keep float); by default `lm_head` is int8 in 8-bit and 4-bit models alike (spec.DEFAULT_HEAD_BITS);
    `overrides={}` quantizes every Linear at `bits`, `{"lm_head": None}` keeps the head float as the original
    quantize(8). `int8_groups`: pattern -> group size of the int8 scales of those layers (others: one a row); by
    default an 8-bit model's head has groups of 32 and a 4-bit one's one scale a row
    (spec.DEFAULT_HEAD_INT8_GROUP). On the meta device this builds empty quantized modules with the right shapes,
    which is how a saved quantized checkpoint is prepared for loading (`prepare_quantized`).
    """
    record = make_record(bits, group_size, symmetric, skip, overrides, int8_groups)
    head = getattr(module, "lm_head", None)
    if head is not None and not isinstance(head, (nn.Linear, *QUANTIZED_TYPES)):
        raise QuantizationError(
            f"lm_head is a {type(head).__name__}, not a Linear: fold it first (checkpoint.fold_norm_head)"
        )
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        layer_bits = bits_for(name, bits, record["skip"], record["overrides"])
        if layer_bits is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        linear = getattr(parent, child)
        int8_group = int8_group_for(name, record["int8_groups"], linear.in_features)
        # Nothing else holds the float Linear, so its weight is freed once the quantized one replaces it (and the
        # next iteration drops `linear`).
        setattr(parent, child, quantized_linear(linear, layer_bits, group_size, symmetric, None, int8_group))
    return record


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


class QuantizingLoader:
    """The transform hook of `checkpoint.load_weights` for a model built on the meta device: it is handed each
    checked tensor and builds the quantized modules from them, so that peak memory stays near the quantized size.

    - A float `X.weight` of an `nn.Linear` X is quantized on arrival (`bits` given) and X swapped for the result.
    - Parts of a quantized module prepared by `prepare_quantized` are gathered until complete, then it is built.
    Both return None: the tensor is in place. Anything else is returned, for the caller to put in place.
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
        int8_groups: Mapping[str, int] | None = None,
    ):
        self.model = model
        self.bits = None if bits is None else check_bits(bits)
        self.group_size = check_group_size(group_size)
        self.symmetric = symmetric
        self._record = (
            None if bits is None else make_record(bits, group_size, symmetric, skip, overrides, int8_groups)
        )
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def record(self) -> dict[str, Any] | None:
        """The config.json record of the quantization done while loading (None when `bits` was not given)."""
        return self._record

    def keeps_float(self, module_name: str) -> bool:
        """Whether the linear `module_name` stays in floating point: not prepared quantized, nor to be quantized
        on arrival."""
        if isinstance(self.model.get_submodule(module_name), QUANTIZED_TYPES):
            return False
        return self._bits_on_arrival(module_name) is None

    def _bits_on_arrival(self, module_name: str) -> int | None:
        """The bits a float linear is quantized to as its weight arrives (None: kept float)."""
        record = self._record
        return (
            None if record is None else bits_for(module_name, self.bits, record["skip"], record["overrides"])
        )

    def __call__(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if isinstance(module, QUANTIZED_TYPES) and attr != "bias":
            self._gather(module_name, module, attr, value)
            return None
        layer_bits = None
        if isinstance(module, nn.Linear) and attr == "weight":
            layer_bits = self._bits_on_arrival(module_name)
        if layer_bits is None:
            return value
        quantized = (
            Int8Linear.from_weight(
                value, None, None, int8_group_for(module_name, self._record["int8_groups"], value.shape[1])
            )
            if layer_bits == 8
            else Int4Linear.from_weight(value, None, self.group_size, self.symmetric)
        )
        if module.bias is not None:  # filled when the bias arrives
            quantized.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"), requires_grad=False)
        self._swap(module_name, quantized)
        return None

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
            if isinstance(module, Int8Linear) and built.group_size != module.group_size:
                raise QuantizationError(
                    f"{module_name}: int8 scales for groups of {built.group_size or 'a whole row'}, where the "
                    f"checkpoint's record says {module.group_size or 'one a row'}"
                )
            built.bias = module.bias
            self._swap(module_name, built)

    def _swap(self, module_name: str, new: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, new)
        return_free_memory()  # the temporaries of quantizing it

    def finish(self) -> None:
        if self.pending:
            name, parts = next(iter(self.pending.items()))
            raise QuantizationError(
                f"quantized tensors of {name} are incomplete (only {', '.join(sorted(parts))})"
            )
