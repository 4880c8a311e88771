"""Official Hugging Face checkpoint directories: read and write them, one tensor at a time.

Reads `config.json` plus `model.safetensors`, `pytorch_model.bin` or their sharded forms with an index. Weights
are streamed into a model built on the meta device and cast to the target dtype tensor by tensor, so a load
never holds two copies of the weights. `.bin` files are read with `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from baichuan import cpu_gemv, hugepages
from baichuan.config import Config, ConfigError
from baichuan.hugepages import HugePageArena, huge_pages_available
from baichuan.memory import HEADROOM, available_memory
from baichuan.model import Baichuan, Linear, NormHead
from baichuan.quant.nf4 import dequantize_bnb_stream
from baichuan.quant.spec import QUANT_METHOD, QuantizationError, read_quantization
from baichuan.quant.swap import QuantizingLoader, prepare_quantized

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Keys the originals keep in their state dicts that are not weights: Baichuan-7B's persistent RoPE buffer.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# What a save owns in a checkpoint directory: config.json and the weights, nothing else. The directory also
# holds what is not ours to replace (the tokenizer, generation_config.json, a README, adapters, logs): a save
# keeps all of that, and writes such a file only when it is handed one (`files=`).
WEIGHT_ENTRIES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX)
_SHARD_NAME = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
# The staging directory of a save in progress: inside the target, so that it is on the same filesystem (even
# when the target is a mount point) and every move into place is a rename. The pid tells an abandoned one.
_STAGING = ".baichuan-save-"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong and where."""


def read_config(
    directory: str | os.PathLike, position: str | None = None, norm_head: bool | None = None
) -> Config:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a Baichuan model directory?)")
    hf = read_json(path)
    try:
        return Config.from_hf_dict(hf, position=position, norm_head=norm_head)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_json(path: Path) -> object:
    """A JSON file, or a CheckpointError that names the file and what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a directory in load order; checks that the shards exist.

    Safetensors is preferred to .bin, as transformers does. Within one format a directory holds a single file or
    an index with its shards. Both, with an index that does not name the single file, is an error naming the
    two: they are different checkpoints (one of them stale), and transformers reads the single file where an
    index-first reader would read the shards, so no choice is safe."""
    directory = Path(directory)
    for single_name, index_name in (
        ("model.safetensors", SAFETENSORS_INDEX),
        ("pytorch_model.bin", BIN_INDEX),
    ):
        single, index = directory / single_name, directory / index_name
        if index.is_file():
            shards = _index_shards(index)
            if single.is_file() and single_name not in shards:
                raise CheckpointError(
                    f"{directory}: {index_name} and {single_name} are two different checkpoints (the index "
                    f"does not name {single_name}); delete the stale one"
                )
            missing = [name for name in shards if not (directory / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"{directory}: shard(s) listed in {index_name} are missing: {', '.join(missing)}"
                )
            return [directory / name for name in shards]
        if single.is_file():
            return [single]
    staged = sorted(p.name for p in directory.glob(f"{_STAGING}*"))
    hint = f"; a save into it is under way or was interrupted ({staged[0]}): save again" if staged else ""
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index){hint}"
    )


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists, in order of first appearance."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise TypeError("weight_map is not a mapping of tensor names to file names")
    except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    return list(dict.fromkeys(weight_map.values()))


def iter_tensors(
    path: Path,
    mmap: bool = True,
    empty: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from one weight file. Memory-mapped tensors cost no copy; with mmap=False each tensor
    is read into (or copied to) memory of its own, so a loader that converts and drops every tensor
    (quantize-on-load) does not keep a whole shard's pages resident, and no tensor it keeps holds the file open.
    `empty(name, shape, dtype)` gives the memory a safetensors tensor is read into (mmap=False; default
    `torch.empty`), for example huge pages (`hugepages.HugePageArena`)."""
    try:
        if path.suffix == ".safetensors" and not mmap:
            yield from _read_safetensors(path, empty or _torch_empty)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            zipped = _is_zip(path)  # torch.load maps only zip archives; legacy files are read whole
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
            for name in list(state):
                tensor = state.pop(name)
                yield name, tensor.clone() if zipped and not mmap else tensor
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


def _torch_empty(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _read_safetensors(
    path: Path, empty: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    with open(path, "rb") as f:
        data_start, entries = _safetensors_header(f, path)
        for name, (dtype, shape, start) in entries.items():
            tensor = empty(name, tuple(shape), dtype)
            if tensor.numel():
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                f.seek(data_start + start)
                if f.readinto(memoryview(raw)) != raw.nbytes:
                    raise CheckpointError(f"{path}: cannot read weights (truncated or corrupt file?): {name}")
            yield name, tensor
            del tensor  # not held while the next one is read


def _safetensors_header(f: BinaryIO, path: Path) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int]]]:
    """Read and check the header of an open safetensors file: where the data starts, and each tensor's dtype,
    shape and data offset. Every way it can be wrong is a CheckpointError naming the file, so that a corrupt
    file never reaches torch.empty (MemoryError) or a dict lookup (KeyError)."""

    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt safetensors file: {what}")

    # The format: an 8-byte little-endian header length, a JSON header of dtype/shape/byte offsets, the data.
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
        raise corrupt(f"header length {header_len} runs past the end of the {size}-byte file")
    try:
        header = json.loads(f.read(header_len))
    except ValueError as e:  # not UTF-8, or not JSON
        raise corrupt(f"the header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise corrupt(f"the header is a JSON {type(header).__name__}, not an object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _naturals(info.get("shape"))
            and _naturals(info.get("data_offsets"), length=2)
        ):
            raise corrupt(f"tensor {name!r} is not {{dtype, shape, data_offsets}}: {json.dumps(info)[:100]}")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise corrupt(f"tensor {name!r} has dtype {info['dtype']!r}, which this reader does not know")
        start, end = info["data_offsets"]
        if not start <= end <= data_size:
            raise corrupt(
                f"tensor {name!r} has data offsets [{start}, {end}] outside the {data_size} data bytes"
            )
        nbytes = math.prod(info["shape"]) * dtype.itemsize
        if end - start != nbytes:
            raise corrupt(
                f"tensor {name!r} of shape {info['shape']} needs {nbytes} bytes, its offsets hold {end - start}"
            )
        entries[name] = (dtype, info["shape"], start)
    return data_start, entries


def _naturals(value: object, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of the given length)."""
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(type(n) is int and n >= 0 for n in value)
    )


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"


def load_weights(
    model: nn.Module,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    transform: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
    bnb4: bool = False,
    mmap: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    keep_bf16: Collection[str] = (),
    arena: HugePageArena | None = None,
) -> None:
    """Stream a directory's weights into `model` (which may live on the meta device): each tensor's name and
    shape are checked against the model, float tensors cast to `dtype` (but those named in `keep_bf16` that are
    stored in bf16 stay so), and each is put in place.

    With an `arena` and mmap=False, the large tensors kept as stored are read straight onto its huge pages.

    `transform(name, tensor)` stands between the check and the placing (quantize-on-load and folding the head
    give one, see `load_into`): it returns the tensor to put in place, changed or not, or None where it has used
    the tensor itself (a quantized module built from it and swapped in). With mmap=False it may change the
    tensor in place. `bnb4` reads bitsandbytes NF4 files: their parts become float weights as they arrive.
    `progress(name, done, total)` hears of each tensor read."""
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()

    def target_dtype(name: str, stored: torch.dtype) -> torch.dtype:
        if stored is torch.bfloat16 and name in keep_bf16:
            return stored
        # Integer tensors are quantized codes: never cast them.
        return (dtype or stored) if stored.is_floating_point else expected[name].dtype

    def empty(name: str, shape: tuple[int, ...], stored: torch.dtype) -> torch.Tensor:
        if arena is not None and name in expected and target_dtype(name, stored) is stored:
            return arena.empty(shape, stored)
        return torch.empty(shape, dtype=stored)

    stream: Iterable[tuple[str, torch.Tensor]] = (
        (name, tensor) for path in weight_files(directory) for name, tensor in iter_tensors(path, mmap, empty)
    )
    if bnb4:  # the parts of one bitsandbytes 4-bit weight may span shards
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
        tensor = tensor.to(device=device, dtype=target_dtype(name, tensor.dtype))
        if transform is not None:
            tensor = transform(name, tensor)
        if tensor is not None:
            _assign(model, name, tensor)
        seen.add(name)
        del tensor
        if progress is not None:
            progress(name, len(seen), len(expected))
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
        requires_grad = old.requires_grad and value.is_floating_point()
        setattr(module, attr, nn.Parameter(value, requires_grad=requires_grad))
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
    progress: Callable[[str, int, int], None] | None = None,
    bf16_weights: bool = False,
    huge_pages: bool = True,
) -> Baichuan:
    """Load an official or toolkit checkpoint directory as the plain-PyTorch `Baichuan` model (eval mode).

    `quantize=8|4` quantizes each weight as it is read, so peak memory stays near the quantized size. Our saved
    quantized checkpoints and the official bitsandbytes NF4 ones (dequantized) load as they are.
    `bf16_weights`: fp32 activations over linear weights kept in their stored bf16 (see `load_into`).
    `huge_pages`: on the CPU, weights on transparent huge pages where the system offers them (see `load_into`)."""

    config = read_config(directory, position, norm_head)
    with torch.device("meta"):
        model = Baichuan(config)
    load_into(
        model, directory, config, dtype, device, quantize, group_size, progress, bf16_weights, huge_pages
    )
    return model.eval()


def load_into(
    model: nn.Module,
    directory: str | os.PathLike,
    config: Config,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: int | None = None,
    group_size: int = 128,
    progress: Callable[[str, int, int], None] | None = None,
    bf16_weights: bool = False,
    huge_pages: bool = True,
) -> None:
    """Fill a model built on the meta device (the core one or the transformers face: both have the official
    names) from a directory, quantizing on the way when asked or when the checkpoint is quantized. Sets
    `model.quantization` to the config.json record of the quantization (None for a float model).

    `bf16_weights` (a float load in fp32, where `bf16_head_beside` holds): the linear layers' weights stored in
    bf16 stay so, the rest (embeddings, norms, activations) is fp32, and the NormHead is folded on the way. Our
    mat-vec widens each weight to fp32, so the products are those of the fp32 weights at half the bytes read,
    and the elementwise work stays in fp32, which such a CPU computes natively (inference only: the weights
    are memory-mapped and the folded head is not the trainable NormHead).

    `huge_pages` (a CPU load, where `hugepages.huge_pages_available`): the large weights end on transparent huge
    pages, where a decode step streams them faster. A float load then reads its tensors onto them instead of
    mapping the files, where they fit in the memory free (else it maps them as before); what a load converts or
    quantizes moves there at its end."""
    try:
        stored = read_quantization(json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")))
        ours = stored is not None and stored["quant_method"] == QUANT_METHOD
        if ours and quantize is not None:
            raise QuantizationError(f"already quantized ({stored['bits']} bits); load it without quantize=")
        quantized = quantize is not None or ours
        bnb4 = stored is not None and stored["quant_method"] == "bitsandbytes"
        transform = loader = None
        keep_bf16: tuple[str, ...] = ()
        on_cpu = torch.device(device).type == "cpu"
        arena = HugePageArena() if huge_pages and on_cpu and huge_pages_available() else None
        # A float load reads its tensors onto huge pages where they fit in memory (else it maps the files);
        # quantizing and dequantizing loads read each one into memory they can free at once.
        read_into_memory = quantized or bnb4 or (arena is not None and _fits_in_memory(directory))
        if quantized:
            # The head is folded on meta (a Linear) and its float rows normalised as they arrive: quantizing
            # needs the normalised rows, and no whole float head is ever held next to the quantized one.
            fold_norm_head(model)
            if ours:
                prepare_quantized(model, stored)
            loader = QuantizingLoader(model, quantize, group_size)
            fold = config.norm_head and not ours
            if loader.keeps_float("lm_head") and bf16_head_beside(dtype, device):
                keep_bf16 = ("lm_head.weight",)

            def transform(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
                if fold and name == "lm_head.weight":
                    normalize_rows_(tensor)  # load_weights reads it into memory of its own (mmap=False)
                return loader(name, tensor)

        elif bf16_weights and bf16_head_beside(dtype, device):
            fold = isinstance(model.lm_head, NormHead)
            fold_norm_head(model)  # on meta, as above; the rows are normalised as they arrive
            keep_bf16 = tuple(
                f"{name}.weight" for name, module in model.named_modules() if type(module) is Linear
            )

            def transform(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
                if not fold or name != "lm_head.weight":
                    return tensor
                # A memory-mapped tensor is the file's: normalised in a copy.
                return normalize_rows_(tensor if read_into_memory else tensor.clone())

        load_weights(
            model,
            directory,
            dtype,
            device,
            transform=transform,
            bnb4=bnb4,
            mmap=not read_into_memory,
            progress=progress,
            keep_bf16=keep_bf16,
            arena=None if quantized or bnb4 else arena,
        )
        if loader is not None:
            loader.finish()
        if arena is not None and read_into_memory:
            # What was converted or quantized: moved once the load is over, when no float tensor it was made
            # from is held beside it (each module as it is built would add its size to the peak of a load).
            arena.adopt(model)
    except QuantizationError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    model.quantization = stored if ours else (loader.record() if loader is not None else None)


def _fits_in_memory(directory: str | os.PathLike) -> bool:
    """Whether the checkpoint's files fit in the memory this process may still take (with its headroom)."""
    free = available_memory()
    stored = sum(path.stat().st_size for path in weight_files(directory))
    return free is None or stored <= free[0] * HEADROOM


def bf16_head_beside(dtype: torch.dtype | None, device: torch.device | str) -> bool:
    """Whether a model in `dtype` on `device` keeps weights stored in bf16 as they are stored: a quantized
    model's float head, and a float model's linear layers where asked (`load_into`'s bf16_weights). The head is
    the largest weight a decoded token reads, and where our bf16 mat-vec widens each weight to fp32
    (`cpu_gemv.widens_fp32_rows`) a bf16 weight gives fp32 activations the products of its fp32 copy at half the
    bytes (benchmarks/README.md: the int8 and bf16 decodes of a Zen 3)."""
    return dtype is torch.float32 and torch.device(device).type == "cpu" and cpu_gemv.widens_fp32_rows()


# Rows normalised at a time: fp32 temporaries of a few MB, never a copy of a whole 125,696-row head.
_NORMALIZE_ROWS = 1024


def normalize_rows_(weight: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row in place, a few rows at a time: F.normalize(rows.float(), dim=-1) rounded back to
    weight's dtype, which is what Baichuan2's NormHead computes. A copy of a 125,696-row head would add its
    size to the peak of a load."""
    for i in range(0, weight.shape[0], _NORMALIZE_ROWS):
        rows = weight[i : i + _NORMALIZE_ROWS]
        rows.copy_(torch.nn.functional.normalize(rows.float(), dim=-1))
    return weight


def fold_norm_head(model: nn.Module) -> nn.Module:
    """Swap a NormHead for a plain Linear holding the normalised rows: identical logits, no per-call
    normalisation. This is also the Baichuan2 -> Baichuan-1 head migration of the Baichuan2 README."""
    head = model.lm_head
    if isinstance(head, NormHead):
        with torch.no_grad():
            weight = normalize_rows_(hugepages.clone(head.weight.detach()))
        # The model's own Linear, which keeps its fp32 products where the CPU only emulates bf16.
        linear = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=head.weight.requires_grad)
        model.lm_head = linear
    return model


def save_checkpoint(
    directory: str | os.PathLike,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    max_shard_bytes: int = 2 * 1024**3,
    files: Mapping[str, bytes] | None = None,
) -> None:
    """Write a complete checkpoint into `directory`, in place of whatever checkpoint is there.

    `config` is the config.json dict (see `config_dict`). The weights become `model.safetensors`, or shards
    (`model-0000x-of-0000y.safetensors`) plus the index when they pass `max_shard_bytes`, as the hub layout has
    them. `tensors` may be a generator: each shard is written as soon as it is full, so a checkpoint larger than
    memory can be produced tensor by tensor. `files` (name -> content) are written along, e.g. the tokenizer.

    The save owns config.json, model.safetensors, pytorch_model.bin, both index files, every file named like a
    shard and every .safetensors/.bin file an index there names: it removes those it does not write. Everything
    else in the directory is kept as it is.

    Everything is written and fsynced in a staging directory first, so a save that fails or is killed while
    writing leaves the previous checkpoint as it was (a later save removes the staging directory a killed one
    left). Only a crash during the final renames can leave the directory refusing to load, never loading a mix
    of old and new (see `_commit`). Files get the mode open() gives under the umask (0644 under 022), whatever
    mode the installed safetensors writes them with."""
    for name in files or {}:
        if Path(name).name != name or name.startswith(".") or _owned_names(name):
            raise ValueError(f"files= may not hold {name!r}: it is a path, hidden, or a name the save owns")
    with staged_checkpoint(directory) as staging:
        write_synced(staging / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        for name, content in (files or {}).items():
            write_synced(staging / name, content)
        mode = stat.S_IMODE((staging / "config.json").stat().st_mode)  # what open() gives under this umask
        _write_weights(tensors, staging, max_shard_bytes, mode)


@contextlib.contextmanager
def staged_checkpoint(directory: str | os.PathLike) -> Iterator[Path]:
    """Replace the checkpoint in `directory` as `save_checkpoint` does, with files the caller writes: yields an
    empty staging directory inside `directory`, to fill with config.json, the weights and their entry point
    (`model.safetensors` or the index), and other files, each fsynced (`write_synced`). When the block ends
    without error the staging directory's contents replace the checkpoint there (`_commit`); when it raises,
    the staging directory is removed and `directory` is as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(directory)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-", dir=directory))
    try:
        yield staging
        entry = next((name for name in WEIGHT_ENTRIES if (staging / name).is_file()), None)
        if entry is None:
            raise CheckpointError(f"{staging}: no weights were written (none of {', '.join(WEIGHT_ENTRIES)})")
        _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Should a rename fail from here on, the staging directory stays: it holds the complete new checkpoint.
    _commit(staging, directory, entry)
    staging.rmdir()


def _write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    staging: Path,
    max_shard_bytes: int,
    mode: int,
) -> str:
    """Write the weight files into `staging`; returns the name of their entry point (the index or the file)."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total_size = 0

    def flush() -> None:
        path = staging / f"shard-{len(written) + 1:05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        os.chmod(path, mode)  # safetensors 0.4 creates files as open() does, recent versions with mode 0600
        _fsync(path)
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
    if total == 1:
        written[0][0].rename(staging / "model.safetensors")
        return "model.safetensors"
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(written, start=1):
        filename = f"model-{i:05d}-of-{total:05d}.safetensors"
        path.rename(staging / filename)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_synced(staging / SAFETENSORS_INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return SAFETENSORS_INDEX


def _commit(staging: Path, directory: Path, entry: str) -> None:
    """Move a complete, fsynced checkpoint from `staging` into `directory`, removing the stale files it owns.

    A directory of several files cannot change in one atomic step (renaming a directory over a non-empty one
    fails on Linux, and swapping directories would lose the files we keep), so the order is chosen for what a
    reader (`weight_files`, or transformers) sees at each instant: first the old entry points (index files and
    single weight files) go, so that no reader can take new shards through the old index or new weights with
    the old config.json; then the new shards, config.json and files move in; the new entry point last, the
    instant from which the directory loads the new checkpoint; then the old shards are deleted. The window
    between the first unlink and the last rename is a few metadata operations after all the writing: a crash
    inside it leaves a directory that refuses to load (no weights found, naming the staging directory, which
    holds the complete new checkpoint), never one that loads a mix of the two."""
    new = {p.name for p in staging.iterdir()}
    stale = _owned_files(directory) - new
    for name in WEIGHT_ENTRIES:
        (directory / name).unlink(missing_ok=True)
    for name in sorted(new, key=lambda name: name == entry):  # the entry point last
        os.replace(staging / name, directory / name)
    for name in stale:
        (directory / name).unlink(missing_ok=True)
    _fsync(directory)


def _owned_names(name: str) -> bool:
    return name == "config.json" or name in WEIGHT_ENTRIES or _SHARD_NAME.fullmatch(name) is not None


def _owned_files(directory: Path) -> set[str]:
    """The files in `directory` that a save replaces or removes (see `save_checkpoint`)."""
    owned = {p.name for p in directory.iterdir() if _owned_names(p.name)}
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (directory / index_name).is_file():
            try:
                shards = _index_shards(directory / index_name)
            except CheckpointError:
                continue  # a broken index names nothing; it is removed itself
            # Only plain weight-file names: an index never makes a save delete the tokenizer or a file elsewhere.
            owned |= {s for s in shards if Path(s).name == s and s.endswith((".safetensors", ".bin"))}
    return {name for name in owned if (directory / name).is_file()}


def _remove_abandoned_staging(directory: Path) -> None:
    """Remove the staging directories that killed saves left (their process is gone)."""
    for path in directory.glob(f"{_STAGING}*"):
        pid = path.name.removeprefix(_STAGING).split("-")[0]
        if path.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def write_synced(path: Path, content: bytes) -> None:
    """Write `content` to `path` and fsync it (a file of a staged checkpoint)."""
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory cannot be opened on some platforms (Windows): nothing to sync there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_dict(config: Config, dtype: torch.dtype | None = None, quantization: dict | None = None) -> dict:
    """The config.json we save: the official fields, plus the position encoding and head stated explicitly."""
    hf = config.to_hf_dict()
    if quantization:
        hf["quantization"] = quantization
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


def save_model(
    model: Baichuan,
    directory: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
    files: Mapping[str, bytes] | None = None,
) -> None:
    """Save in the official layout, replacing any checkpoint in `directory` (see `save_checkpoint`)."""
    dtype = next(model.parameters()).dtype
    config = config_dict(model.config, dtype, getattr(model, "quantization", None))
    save_checkpoint(directory, config, model.state_dict(), max_shard_bytes, files)
