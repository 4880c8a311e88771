"""LoRA adapters in peft's directory format, applied to a model without peft, and quantized linears made
trainable under an adapter.

An adapter directory (what `peft` saves and `baichuan finetune --lora` writes) holds `adapter_config.json` (r,
lora_alpha, target_modules, ...) and `adapter_model.safetensors` with, for each adapted linear `X`,
`base_model.model.X.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); the layer computes
`base(x) + scaling * B(A(x))` with scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora).

`apply_adapter` puts an adapter into a loaded model, layer by layer as each allows: a float linear gets it
merged into its weight (W += scaling * B @ A, computed in fp32), so inference costs nothing more; a quantized
linear, whose codes cannot take a small update, is wrapped by composition (`LoRALinear`), as mlx-lm does.

`TrainableQuantized` wraps a quantized linear (anything with `dequantize(dtype)` and in/out features) for
QLoRA on CPU: the forward runs the quantized kernel as it is, and the backward multiplies the output gradient
by the dequantised weight, made again then and dropped, so no float copy of the weight is kept for backward.

This module knows `nn.Linear`, tensor names and the file format; it imports neither peft nor transformers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter directory that cannot be applied; the message names the file and what is wrong."""


@dataclass
class Adapter:
    directory: Path
    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A (r, in), B (out, r))

    @property
    def scaling(self) -> float:
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """An adapter directory, checked: plain LoRA (no DoRA, no per-module ranks, no extra saved modules)."""
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{directory}: no {ADAPTER_CONFIG} (is this a LoRA adapter directory?)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    unsupported = [
        key
        for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication")
        if config.get(key)
    ]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if unsupported:
        raise AdapterError(f"{config_path}: {', '.join(unsupported)} not supported (plain LoRA only)")
    if (
        not isinstance(config.get("r"), int)
        or config["r"] < 1
        or not isinstance(config.get("lora_alpha"), (int, float))
    ):
        raise AdapterError(f"{config_path}: r and lora_alpha must be numbers (r a positive integer)")
    weights = _read_weights(directory)
    pairs: dict[str, list] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part):
                pairs.setdefault(name[: -len(part)], [None, None])[slot] = tensor
                break
        else:
            raise AdapterError(f"{directory}: unexpected tensor {key!r} (not a LoRA A/B weight)")
    for name, (a, b) in pairs.items():
        if a is None or b is None:
            raise AdapterError(f"{directory}: {name} has only one of lora_A and lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{directory}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair"
            )
    return Adapter(directory, config, {name: (a, b) for name, (a, b) in pairs.items()})


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_WEIGHTS
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))
    path = directory / ADAPTER_WEIGHTS_BIN
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    raise AdapterError(f"{directory}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def delta(adapter: Adapter, name: str) -> torch.Tensor:
    """scaling * B @ A for one module, fp32 (out, in)."""
    a, b = adapter.pairs[name]
    return adapter.scaling * (b.float() @ a.float())


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update, by composition: y = base(x) + scaling * (x @ A.T) @ B.T."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(a, requires_grad=False)  # (r, in)
        self.lora_b = nn.Parameter(b, requires_grad=False)  # (out, r)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (self.scaling * update).to(x.dtype)


def apply_adapter(model: nn.Module, adapter: Adapter | str | os.PathLike) -> list[str]:
    """Put `adapter` into `model` in place (see the module docstring); returns the names of the layers changed.
    Every adapted name must be a linear of the model with the adapter's shapes."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    modules = dict(model.named_modules())
    for name, (a, b) in adapter.pairs.items():
        module = modules.get(name)
        if module is None:
            raise AdapterError(
                f"{adapter.directory}: the model has no layer {name!r} (an adapter of another model?)"
            )
        shape = _features(module)
        if shape != (a.shape[1], b.shape[0]):
            raise AdapterError(
                f"{adapter.directory}: {name} is {shape[0]} -> {shape[1]} in the model, the adapter's is "
                f"{a.shape[1]} -> {b.shape[0]} (an adapter of another model?)"
            )
    for name in adapter.pairs:
        module = modules[name]
        if isinstance(module, nn.Linear) and module.weight.is_floating_point():
            # A new tensor, not an in-place add: a loaded weight may be a read-only memory map of its file.
            weight = module.weight.detach()
            merged = (weight.float() + delta(adapter, name).to(weight.device)).to(weight.dtype)
            module.weight = nn.Parameter(merged, requires_grad=False)
        else:
            a, b = adapter.pairs[name]
            device = next(module.buffers(), a).device
            wrapped = LoRALinear(module, a.float().to(device), b.float().to(device), adapter.scaling)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, wrapped)
    return list(adapter.pairs)


def _features(module: nn.Module) -> tuple[int, int]:
    inner = getattr(module, "quantized", module)
    return (getattr(inner, "in_features", -1), getattr(inner, "out_features", -1))


class _DequantizedMatmul(torch.autograd.Function):
    """y = quantized(x) forward; dx = dy @ W, with W dequantised again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantize(grad.dtype)  # (out, in)
        return grad @ weight, None


class TrainableQuantized(nn.Module):
    """A frozen quantized linear that passes gradients to its input (QLoRA on CPU). `infeatures`/`outfeatures`
    are what peft reads off quantized layers it does not know."""

    def __init__(self, quantized: nn.Module):
        super().__init__()
        self.quantized = quantized
        self.in_features = self.infeatures = quantized.in_features
        self.out_features = self.outfeatures = quantized.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizedMatmul.apply(x, self.quantized)
        return self.quantized(x)

    @property
    def weight(self) -> torch.Tensor:
        """The quantized codes: where peft looks for the layer's device (their integer dtype casts nothing)."""
        return self.quantized.weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized.dequantize(dtype)


def make_quantized_trainable(model: nn.Module, types: tuple[type, ...]) -> int:
    """Wrap every module of `types` (the quantized linears) in `TrainableQuantized`; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, types):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, TrainableQuantized(module))
            count += 1
    return count
