"""Checkpoint directories converted tensor by tensor: `.bin` -> safetensors, a dtype change, resharding.

Peak memory stays near the largest single tensor (plus, for a `.bin` shard, the pages of that shard that the
memory map has read): the layout of every output file is planned from the source's headers before any data is
read, so each safetensors file is written header first and then one tensor at a time, never held whole. The
output directory changes atomically, as `checkpoint.save_checkpoint` does it: everything is written in a
staging directory inside the target and moved into place at the end by the same commit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from baichuan.checkpoint import (
    IGNORED_SUFFIXES,
    SAFETENSORS_INDEX,
    iter_tensors,
    read_json,
    staged_checkpoint,
    weight_files,
    write_synced,
)

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Files of a checkpoint directory that travel with its weights into a converted directory.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_SAFETENSORS_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAFETENSORS_DTYPES = {v: k for k, v in _SAFETENSORS_NAMES.items()}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do instead."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for size in self.shape:
            n *= size
        return n


def tensor_infos(directory: str | os.PathLike) -> list[TensorInfo]:
    """Name, shape and dtype of every weight of a checkpoint directory, in file order, read from the headers
    (safetensors) or from a memory map that touches no data (.bin)."""
    infos = []
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    infos.append(
                        TensorInfo(name, tuple(part.get_shape()), _SAFETENSORS_DTYPES[part.get_dtype()])
                    )
        else:
            for name, tensor in iter_tensors(path):
                infos.append(TensorInfo(name, tuple(tensor.shape), tensor.dtype))
                del tensor
    return [info for info in infos if not info.name.endswith(IGNORED_SUFFIXES)]


def stream_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights in the order of `tensor_infos`, each read into memory of its own (safetensors) so that a
    converter that drops every tensor keeps no shard resident."""
    for path in weight_files(directory):
        for name, tensor in iter_tensors(path, mmap=False):
            if not name.endswith(IGNORED_SUFFIXES):
                yield name, tensor
            del tensor  # not held while the next one is read


def read_source_config(directory: str | os.PathLike) -> dict:
    config = read_json(Path(directory) / "config.json")
    if not isinstance(config, dict):
        raise ConvertError(f"{directory}/config.json: not a JSON object")
    return config


def refuse_quantized(directory: str | os.PathLike, config: dict, what: str) -> None:
    if config.get("quantization") or config.get("quantization_config"):
        raise ConvertError(f"{directory} is quantized; {what} needs a float checkpoint")


# --- writing -----------------------------------------------------------------------------------------------


def write_safetensors(
    path: Path, infos: list[TensorInfo], tensors: Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Write one safetensors file whose layout `infos` gives, pulling exactly those tensors (in that order)
    from `tensors`: the header first, then each tensor's bytes as it arrives."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {
            "dtype": _SAFETENSORS_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for info in infos:
            name, tensor = next(tensors)
            if name != info.name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise RuntimeError(f"conversion plan out of step at {info.name} (got {name})")
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor
        f.flush()
        os.fsync(f.fileno())


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Cut the tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def write_checkpoint(
    out: str | os.PathLike,
    config: dict,
    infos: list[TensorInfo],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    files: dict[str, bytes] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Write a checkpoint directory (config.json, safetensors weights in the hub's shard layout, `files`)
    atomically, as a save does (`checkpoint.staged_checkpoint`), streaming `tensors`, which must come in the
    order and with the shapes/dtypes of `infos`."""
    shards = plan_shards(infos, max_shard_bytes)
    total = len(infos)
    counted = _counted(iter(tensors), total, progress)
    with staged_checkpoint(out) as staging:
        write_synced(staging / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        for name, content in (files or {}).items():
            write_synced(staging / name, content)
        if len(shards) == 1:
            write_safetensors(staging / "model.safetensors", shards[0], counted)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(staging / filename, shard, counted)
                weight_map.update(dict.fromkeys((info.name for info in shard), filename))
            index = {"metadata": {"total_size": sum(i.nbytes for i in infos)}, "weight_map": weight_map}
            write_synced(staging / SAFETENSORS_INDEX, (json.dumps(index, indent=2) + "\n").encode())


def _counted(tensors: Iterator, total: int, progress: Callable[[str, int, int], None] | None) -> Iterator:
    for done, (name, tensor) in enumerate(tensors, start=1):
        yield name, tensor
        del tensor  # not held while the next one is made
        if progress is not None:
            progress(name, done, total)


def companion_files(directory: str | os.PathLike) -> dict[str, bytes]:
    directory = Path(directory)
    return {name: (directory / name).read_bytes() for name in COMPANION_FILES if (directory / name).is_file()}


# --- the conversion ------------------------------------------------------------------------------------------


def convert_checkpoint(
    model: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    config_changes: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Rewrite checkpoint `model` as safetensors in `out` (which may be `model` itself): float weights cast to
    `dtype` (None keeps each one's), shards of at most `max_shard_bytes`, `transform(name, tensor)` applied to
    each float tensor in fp32 before the cast, config.json updated with `config_changes`. The tokenizer and
    generation files come along."""
    config = read_source_config(model)
    if dtype is not None:
        refuse_quantized(model, config, "a dtype change")
    sources = tensor_infos(model)

    def target(info: TensorInfo) -> torch.dtype:
        return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype

    infos = [TensorInfo(info.name, info.shape, target(info)) for info in sources]
    kept_dtype = {info.dtype for info in infos if info.dtype.is_floating_point}
    config = dict(config, **(config_changes or {}))
    if len(kept_dtype) == 1:
        config["torch_dtype"] = str(next(iter(kept_dtype))).removeprefix("torch.")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for (name, tensor), info in zip(stream_tensors(model), infos, strict=True):
            if transform is not None and tensor.is_floating_point():
                tensor = transform(name, tensor.float())
            yield name, tensor.to(info.dtype)
            del tensor  # not held while the next one is read

    write_checkpoint(out, config, infos, tensors(), max_shard_bytes, companion_files(model), progress)


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000000' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    value = text.strip().lower().replace(" ", "")
    number = value.rstrip("kmgib")
    unit = value[len(number) :]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ConvertError(f"cannot read the size {text!r}; write it like 2GB, 500MB or 1.5GiB") from None
    if size <= 0:
        raise ConvertError(f"the shard size must be positive, got {text!r}")
    return size
