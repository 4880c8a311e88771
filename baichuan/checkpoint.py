"""Official Hugging Face checkpoint directories: read and write them, one tensor at a time.

Reads `config.json` plus `model.safetensors`, `pytorch_model.bin` or their sharded forms with an index. Weights
are streamed into a model built on the meta device and cast to the target dtype tensor by tensor, so a load
never holds two copies of the weights. `.bin` files are read with `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from baichuan.config import Config, ConfigError
from baichuan.model import Baichuan, Linear, NormHead

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Keys the originals keep in their state dicts that are not weights: Baichuan-7B's persistent RoPE buffer.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong and where."""


def read_config(
    directory: str | os.PathLike, position: str | None = None, norm_head: bool | None = None
) -> Config:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a Baichuan model directory?)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return Config.from_hf_dict(hf, position=position, norm_head=norm_head)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a directory in load order, preferring safetensors; checks that shards exist."""
    directory = Path(directory)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            shards = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"{directory}: shard(s) listed in {index_name} are missing: {', '.join(missing)}"
                )
            return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


def iter_tensors(path: Path, mmap: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one weight file. Memory-mapped tensors cost no copy (a float load keeps them
    as its weights); with mmap=False each safetensors tensor is read into memory of its own, so a loader that
    converts and drops every tensor (quantize-on-load) does not keep a whole shard's pages resident."""
    try:
        if path.suffix == ".safetensors" and not mmap:
            yield from _read_safetensors(path)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
            for name in list(state):
                yield name, state.pop(name)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read weights (truncated or corrupt file?): {first_line}"
        ) from None
    except Exception as e:  # unpickling refused by weights_only, and similar
        if type(e).__name__ == "UnpicklingError":
            raise CheckpointError(
                f"{path}: refused to unpickle non-tensor objects (weights_only=True)"
            ) from None
        raise


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    # The format: an 8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, the data.
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            if tensor.numel():
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                if end - start != raw.nbytes or f.readinto(memoryview(raw)) != raw.nbytes:
                    raise CheckpointError(f"{path}: cannot read weights (truncated or corrupt file?): {name}")
            yield name, tensor


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def load_weights(
    model: nn.Module,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    assign: Callable[[str, torch.Tensor], None] | None = None,
    bnb4: bool = False,
    mmap: bool = True,
) -> None:
    """Stream a directory's weights into `model` (which may live on the meta device), casting each float
    tensor. `assign(name, tensor)` puts each one in place (quantize-on-load passes its own); `bnb4` turns
    bitsandbytes NF4 parts back into float weights as they arrive."""
    assign = assign or functools.partial(_assign, model)
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    stream: Iterable[tuple[str, torch.Tensor]] = (
        (name, tensor) for path in weight_files(directory) for name, tensor in iter_tensors(path, mmap)
    )
    if bnb4:  # the parts of one bitsandbytes 4-bit weight may span shards
        from baichuan.quantize import dequantize_bnb_stream

        stream = dequantize_bnb_stream(stream, dtype)
    for name, tensor in stream:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in expected:
            raise CheckpointError(
                f"{directory}: unexpected tensor {name!r} (not a Baichuan weight of this config)"
            )
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{directory}: {name} has shape {tuple(tensor.shape)}, the config expects {tuple(param.shape)}"
            )
        # Integer tensors are quantized codes: never cast them.
        target_dtype = (dtype or tensor.dtype) if tensor.is_floating_point() else param.dtype
        assign(name, tensor.to(device=device, dtype=target_dtype))
        seen.add(name)
        del tensor
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{directory}: weights missing from the checkpoint: {', '.join(missing[:5])}{more}"
        )


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module.register_buffer(attr, value)


def load_model(
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    position: str | None = None,
    norm_head: bool | None = None,
    quantize: int | None = None,
    group_size: int = 128,
) -> Baichuan:
    """Load an official or toolkit checkpoint directory as the plain-PyTorch `Baichuan` model (eval mode).

    `quantize=8|4` quantizes each weight as it is read, so peak memory stays near the quantized size. Our saved
    quantized checkpoints and the official bitsandbytes NF4 ones (dequantized) load as they are."""

    config = read_config(directory, position, norm_head)
    with torch.device("meta"):
        model = Baichuan(config)
    load_into(model, directory, config, dtype, device, quantize, group_size)
    return model.eval()


def load_into(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Config,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: int | None = None,
    group_size: int = 128,
) -> None:
    """Fill a model built on the meta device (the core one or the transformers face: both have the official
    names) from a directory, quantizing on the way when asked or when the checkpoint is quantized. Sets
    `model.quantization` to the config.json record of the quantization (None for a float model)."""
    from baichuan.quantize import (
        QUANT_METHOD,
        QuantizationError,
        QuantizingLoader,
        prepare_quantized,
        read_quantization,
    )

    try:
        stored = read_quantization(json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")))
        ours = stored is not None and stored["quant_method"] == QUANT_METHOD
        if ours and quantize is not None:
            raise QuantizationError(f"already quantized ({stored['bits']} bits); load it without quantize=")
        quantized = quantize is not None or ours
        if quantized:
            fold_norm_head(
                model
            )  # on meta: the head becomes a Linear; float rows are normalised as they arrive
        if ours:
            prepare_quantized(model, stored)
        normalize = ["lm_head.weight"] if config.norm_head and quantized else []
        bnb4 = stored is not None and stored["quant_method"] == "bitsandbytes"
        # A float load keeps the memory-mapped tensors as its weights (no copy); quantizing or dequantizing
        # loads convert every tensor, so they read each one into memory they can free at once.
        loader = (
            QuantizingLoader(model, quantize, group_size, normalize=normalize) if quantized or bnb4 else None
        )
        load_weights(model, directory, dtype, device, assign=loader, bnb4=bnb4, mmap=loader is None)
        if loader is not None:
            loader.finish()
    except QuantizationError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    model.quantization = stored if ours else (loader.record() if loader is not None else None)


def fold_norm_head(model: nn.Module) -> nn.Module:
    """Swap a NormHead for a plain Linear holding the normalised rows: identical logits, no per-call
    normalisation. This is also the Baichuan2 -> Baichuan-1 head migration of the Baichuan2 README."""
    head = model.lm_head
    if isinstance(head, NormHead):
        with torch.no_grad():
            weight = torch.nn.functional.normalize(head.weight.float(), dim=-1).to(head.weight.dtype)
        # The model's own Linear, which keeps its fp32 products where the CPU only emulates bf16.
        linear = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
        model.lm_head = linear
    return model


def save_weights(
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write sharded safetensors (`model-0000x-of-0000y.safetensors`) plus the index, as the hub layout does.

    `tensors` may be a generator: each shard is written as soon as it is full, so a checkpoint larger than
    memory can be produced tensor by tensor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total_size = 0

    def flush() -> None:
        path = directory / f".shard-{len(written) + 1:05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor.detach().contiguous()
        size += nbytes
        total_size += nbytes
    flush()
    total = len(written)
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(written, start=1):
        filename = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        path.replace(directory / filename)
        weight_map.update(dict.fromkeys(names, filename))
    if total > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def save_config(
    config: Config,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    quantization: dict | None = None,
) -> None:
    hf = config.to_hf_dict()
    if quantization:
        hf["quantization"] = quantization
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")


def save_model(model: Baichuan, directory: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Save in the official layout; config.json also states the position encoding and head explicitly."""
    dtype = next(model.parameters()).dtype
    save_config(model.config, directory, dtype, getattr(model, "quantization", None))
    save_weights(model.state_dict(), directory, max_shard_bytes)
