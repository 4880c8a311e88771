"""GGUF, llama.cpp's format, both ways: export a checkpoint for llama.cpp, import a GGUF Baichuan model or a
vocabulary-only GGUF into our layout.

The export writes what llama.cpp's `baichuan` architecture reads (src/models/baichuan.cpp and the BAICHUAN case
of src/llama-model.cpp in ggml-org/llama.cpp):
- `W_pack` split into attn_q/attn_k/attn_v; for RoPE, q and k rows permuted from the rotate-half layout of the
  checkpoints to the interleaved pairs of llama.cpp's "normal" RoPE (the inverse of the HF permutation);
- Baichuan2's NormHead folded: `output.weight` holds the normalised rows (llama.cpp has no NormHead);
- the tokenizer's pieces, scores and types, the special ids and the chat template embedded.

llama.cpp picks the position encoding of a Baichuan model from its layer count alone: 32 layers is "7B" and
gets RoPE, 40 layers is "13B" and gets ALiBi (max bias 8, the original slopes), any other count gets neither.
A model whose own encoding differs from that rule would load and compute something else, so the export
refuses it.

Both ways, each tensor is read, converted and written in turn (the output's layout is planned from the input's
headers first), so peak memory is near one tensor: an export's GGUF appears at its path only when complete
(written beside it, then renamed); an import's checkpoint is staged and committed as a save is.
"""

from __future__ import annotations

import base64
import io
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from baichuan.chat_format import jinja_template, load_chat_format
from baichuan.checkpoint import read_config
from baichuan.config import ALIBI, ROPE, Config
from baichuan.convert import spm_proto
from baichuan.convert.formats import (
    ConvertError,
    TensorInfo,
    read_source_config,
    refuse_quantized,
    stream_tensors,
    tensor_infos,
    write_checkpoint,
)
from baichuan.tokenizer import MODEL_FILE

ARCH = "baichuan"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# llama.cpp's n_layer -> model type -> position encoding, for arch baichuan.
LLAMA_CPP_POSITION = {32: ROPE, 40: ALIBI}
ALIBI_MAX_BIAS = 8.0
# Keys of our own, which llama.cpp ignores: they make an import of our export give back the same checkpoint.
KEY_POSITION = "baichuan_toolkit.position_encoding"
KEY_NORMALIZER = "baichuan_toolkit.sentencepiece.normalizer_spec"  # base64 of the serialized spec
KEY_TRAINER = "baichuan_toolkit.sentencepiece.trainer_spec"
READINGS = ("baichuan", "llamacpp")

_NAMES = {  # ours -> GGUF, per layer (W_pack is split apart)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConvertError("GGUF needs the gguf package: pip install 'baichuan-toolkit[convert]'") from None
    return gguf


def llama_cpp_position(n_layers: int) -> str | None:
    """The position encoding llama.cpp gives a Baichuan GGUF of `n_layers` layers (None: neither)."""
    return LLAMA_CPP_POSITION.get(n_layers)


def check_llama_cpp(config: Config) -> None:
    """Refuse a model that llama.cpp would run with another position encoding than its own."""
    theirs = llama_cpp_position(config.n_layers)
    if theirs != config.position:
        runs = f"with {theirs.upper()}" if theirs else "with no position encoding at all"
        raise ConvertError(
            f"llama.cpp runs a {config.n_layers}-layer Baichuan {runs} (it gives RoPE to 32-layer and ALiBi to "
            f"40-layer models only); this model uses {config.position.upper()}, so the GGUF would compute "
            "something else: not written"
        )


def _interleave_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Rows of each head go from (first halves, second halves) to interleaved pairs (x0, x_half, x1, ...).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(name: str) -> list[str]:
    """The GGUF tensor names one of our tensors becomes (W_pack: three)."""
    if name in _GLOBAL:
        return [_GLOBAL[name]]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 4:
        raise ConvertError(f"unexpected tensor {name!r}: not a Baichuan weight")
    i, rest = parts[2], ".".join(parts[3:])
    if rest == "self_attn.W_pack.weight":
        return [f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight", f"blk.{i}.attn_v.weight"]
    if rest not in _NAMES:
        raise ConvertError(f"unexpected tensor {name!r}: not a Baichuan weight")
    return [f"blk.{i}.{_NAMES[rest]}"]


def _qtype(gguf, type: str, shape: tuple[int, ...]):
    """The GGML type of one tensor: norms stay F32 (as llama.cpp keeps them); a matrix whose rows do not fill
    whole quantization blocks falls back to F16, as llama.cpp's converter does."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or type == "f32":
        return Q.F32
    qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def _encode(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return tensor.float().contiguous().numpy()
    if qtype == Q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(tensor.float().contiguous().numpy(), qtype)


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * shape[-1] // block * size


def _file_type(gguf, type: str):
    F = gguf.LlamaFileType
    return {
        "f32": F.ALL_F32,
        "f16": F.MOSTLY_F16,
        "bf16": F.MOSTLY_BF16,
        "q8_0": F.MOSTLY_Q8_0,
        "q4_0": F.MOSTLY_Q4_0,
    }[type]


def export_gguf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    type: str = "f16",
    progress: Callable[[str, int, int], None] | None = None,
    exact: bool = True,
) -> Path:
    """Write checkpoint directory `model` as one GGUF file `out` that llama.cpp runs as this model computes.
    `exact=False` writes a model llama.cpp would run with another position encoding too (only a speed
    benchmark wants that: the file's outputs are not this model's)."""
    gguf = _gguf()
    if type not in TYPES:
        raise ConvertError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    model, out = Path(model), Path(out)
    config = read_config(model)
    refuse_quantized(model, read_source_config(model), "a GGUF export")
    if exact:
        check_llama_cpp(config)
    tokenizer_path = model / MODEL_FILE
    if not tokenizer_path.is_file():
        raise ConvertError(f"{model} has no {MODEL_FILE}: llama.cpp needs the vocabulary inside the GGUF")
    proto = spm_proto.parse(tokenizer_path.read_bytes())
    if len(proto.pieces) > config.vocab_size:
        raise ConvertError(
            f"{tokenizer_path} has {len(proto.pieces)} pieces, more than the model's {config.vocab_size} rows"
        )
    sources = tensor_infos(model)

    plan: list[tuple[str, tuple[int, ...], object]] = []  # (GGUF name, shape, GGML type) in write order
    for info in sources:
        names = gguf_names(info.name)
        shape = (info.shape[0] // len(names), *info.shape[1:])
        plan += [(name, shape, _qtype(gguf, type, shape)) for name in names]

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        _add_hparams(writer, gguf, config, type)
        _add_tokenizer(writer, gguf, proto, config, model)
        Q = gguf.GGMLQuantizationType
        for name, shape, qtype in plan:  # the header first: names, shapes, types and sizes of all tensors
            nbytes = _nbytes(gguf, shape, qtype)
            if qtype in (Q.F32, Q.F16):
                writer.add_tensor_info(
                    name, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16), nbytes
                )
            elif qtype == Q.BF16:  # written as the int16 bits of the bf16 values
                writer.add_tensor_info(name, shape, np.dtype(np.int16), nbytes, qtype)
            else:  # block formats: bytes, their shape in bytes
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        steps = iter(plan)
        done = 0
        for name, tensor in stream_tensors(model):
            for part in _export_tensor(name, tensor, config):
                _, shape, qtype = next(steps)
                writer.write_tensor_data(_encode(gguf, part, qtype))
            done += 1
            if progress is not None:
                progress(name, done, len(sources))
        writer.close()
        with open(tmp, "rb+") as f:  # on disk before it takes the name
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _export_tensor(name: str, tensor: torch.Tensor, config: Config) -> list[torch.Tensor]:
    if name == "lm_head.weight" and config.norm_head:  # fold NormHead: the rows it normalises on every call
        return [torch.nn.functional.normalize(tensor.float(), dim=-1)]
    if name.endswith("self_attn.W_pack.weight"):
        q, k, v = tensor.chunk(3, dim=0)
        if config.position == ROPE:
            q, k = _interleave_rope(q, config.n_heads), _interleave_rope(k, config.n_heads)
        return [q, k, v]
    return [tensor]


def _add_hparams(writer, gguf, config: Config, type: str) -> None:
    writer.add_name("baichuan")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)  # llama.cpp asserts n_rot == head size for baichuan
    if config.position == ROPE:
        writer.add_rope_freq_base(config.rope_base)
    else:
        writer.add_max_alibi_bias(ALIBI_MAX_BIAS)
    writer.add_string(KEY_POSITION, config.position)
    writer.add_file_type(_file_type(gguf, type))
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer, gguf, proto: spm_proto.ModelProto, config: Config, model: Path) -> None:
    pieces = list(proto.pieces)
    pieces += [
        spm_proto.Piece(f"[PAD{i}]", -10000.0, spm_proto.UNUSED)
        for i in range(len(pieces), config.vocab_size)
    ]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece.encode("utf-8") for p in pieces])
    writer.add_token_scores([p.score for p in pieces])
    writer.add_token_types([p.type for p in pieces])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    unk = next((i for i, p in enumerate(pieces) if p.type == spm_proto.UNKNOWN), None)
    if unk is not None:
        writer.add_unk_token_id(unk)
    writer.add_add_bos_token(False)  # Baichuan prompts and chat formats carry no BOS
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(spm_proto.spec_value(proto.normalizer_spec, 3, 1)))
    writer.add_string(KEY_NORMALIZER, base64.b64encode(proto.normalizer_spec).decode())
    writer.add_string(KEY_TRAINER, base64.b64encode(proto.trainer_spec).decode())
    chat = load_chat_format(model)
    ids = (chat.user_id, chat.assistant_id, chat.eos_id)
    if all(0 <= i < len(proto.pieces) for i in ids):
        user, assistant, eos = (pieces[i].piece for i in ids)
        writer.add_chat_template(jinja_template(chat, user, assistant, eos))


# --- import ------------------------------------------------------------------------------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # as gguf's reader; version 1 had 32-bit counts
_ALIGNMENT = 32  # general.alignment when the file does not say
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_SCALARS = {
    0: np.dtype("u1"),
    1: np.dtype("i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
# An import decodes a tensor this many values at a time, so that no tensor exists whole in fp32 on the way.
_CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # row-major, as torch has it (a GGUF lists the dimensions the other way round)
    type: int  # gguf.GGMLQuantizationType
    offset: int  # of its data, from the start of the file


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, object]  # key -> str, int, float, bool or a list of them
    tensors: dict[str, GGUFTensor]


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The key-value fields and the tensor table of a GGUF file (little-endian, version 2 or 3), without its
    tensor data. Values become plain Python ones, so that a vocabulary of 125,696 pieces costs its strings
    only (gguf's GGUFReader keeps several numpy arrays per piece, on a memory map held open)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return _parse_header(view, path)
    except (ValueError, OSError, struct.error, UnicodeDecodeError, IndexError) as e:
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"{path}: not a readable GGUF file ({e})") from None


def _parse_header(view: mmap.mmap, path: Path) -> GGUFHeader:
    pos = 0

    def take(dtype: np.dtype, count: int = 1) -> list:
        nonlocal pos
        if pos + dtype.itemsize * count > len(view):
            raise ConvertError(f"{path}: not a readable GGUF file (its header is cut short)")
        values = np.frombuffer(view, dtype, count, pos).tolist()
        pos += dtype.itemsize * count
        return values

    def string() -> str:  # the most frequent value by far (every vocabulary piece): struct, not numpy
        nonlocal pos
        (n,) = _U64.unpack_from(view, pos)
        pos += 8
        if pos + n > len(view):
            raise ConvertError(f"{path}: not a readable GGUF file (its header is cut short)")
        text = view[pos : pos + n].decode("utf-8")
        pos += n
        return text

    def value(kind: int) -> object:
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            (item,) = take(_SCALARS[4])
            (count,) = take(_SCALARS[10])
            if item in _SCALARS:
                return take(_SCALARS[item], count)
            return [value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ConvertError(f"{path}: not a readable GGUF file (unknown value type {kind})")
        return take(_SCALARS[kind])[0]

    if view[:4] != _MAGIC:
        raise ConvertError(f"{path}: not a GGUF file (no GGUF magic)")
    pos = 4
    (version,) = take(_SCALARS[4])
    if version & 0xFFFF == 0:
        raise ConvertError(f"{path}: a big-endian GGUF, which this import does not read")
    if version not in _VERSIONS:
        raise ConvertError(f"{path}: GGUF version {version}; this import reads versions 2 and 3")
    n_tensors, n_fields = take(_SCALARS[10], 2)
    fields = {}
    for _ in range(n_fields):
        key = string()
        (kind,) = take(_SCALARS[4])
        fields[key] = value(kind)
    table = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = take(_SCALARS[4])
        dims = take(_SCALARS[10], n_dims)
        kind, offset = take(_SCALARS[4])[0], take(_SCALARS[10])[0]
        table.append((name, tuple(reversed(dims)), kind, offset))
    alignment = fields.get("general.alignment", _ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ConvertError(f"{path}: general.alignment {alignment!r} is not a power of two")
    start = -(-pos // alignment) * alignment
    tensors = {name: GGUFTensor(name, shape, kind, start + offset) for name, shape, kind, offset in table}
    if len(tensors) != len(table):
        raise ConvertError(f"{path}: a tensor name appears twice")
    return GGUFHeader(fields, tensors)


def gguf_block_count(path: str | os.PathLike) -> int:
    """The layer count a GGUF file states (0 for a vocabulary-only file, or one that cannot be read)."""
    try:
        return int(read_gguf_header(path).fields.get(f"{ARCH}.block_count", 0))
    except (ConvertError, TypeError):
        return 0


def import_gguf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    reading: str = "baichuan",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write a GGUF Baichuan model as a checkpoint directory (config.json, safetensors, tokenizer files), or a
    vocabulary-only GGUF as a tokenizer directory. Quantized tensors are dequantized; `dtype` defaults to the
    file's float type (fp32 for quantized files).

    A GGUF keeps a tokenizer's pieces but not its normaliser settings. Our exports record them; for others
    `reading` chooses: "baichuan" reads the vocabulary as the original Baichuan tokenizer is built (NFKC
    normalisation, a dummy prefix, and the score-0 pieces before the byte pieces as user-defined symbols, where
    SentencePiece's trainer puts them); "llamacpp" reads it as llama.cpp does (no normalisation, pieces as
    typed).

    The weights stream: each checkpoint tensor is made alone (W_pack from its three GGUF parts), decoded from
    plain reads of the file a chunk of rows at a time, written to its safetensors file and dropped before the
    next, so peak memory is about the largest output tensor, whatever the file's size."""
    gguf = _gguf()
    path, out = Path(path), Path(out)
    if reading not in READINGS:
        raise ConvertError(f"unknown tokenizer reading {reading!r}; choose one of {', '.join(READINGS)}")
    header = read_gguf_header(path)
    fields = header.fields
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise ConvertError(f"{path}: architecture {arch!r}, not a Baichuan GGUF ('{ARCH}')")
    if fields.get("tokenizer.ggml.model") != "llama":
        raise ConvertError(f"{path}: no SentencePiece ('llama') vocabulary inside")
    tokenizer = _tokenizer_model(fields, reading)
    files = _tokenizer_files(fields, tokenizer)
    if (
        not header.tensors
    ):  # vocabulary only: the tokenizer files, each replaced atomically; a checkpoint there stays
        out.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            tmp = out / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(content)
            os.replace(tmp, out / name)
        return out

    config = _config(fields, path)
    float_types = {
        gguf.GGMLQuantizationType.F16: torch.float16,
        gguf.GGMLQuantizationType.BF16: torch.bfloat16,
    }
    if dtype is None:
        kinds = {float_types.get(t.type, torch.float32) for t in header.tensors.values() if len(t.shape) > 1}
        dtype = kinds.pop() if len(kinds) == 1 else torch.float32
    infos = [TensorInfo(name, shape, dtype) for name, shape in checkpoint_shapes(config)]
    # Every tensor is found and checked before anything is written.
    parts = {info.name: _sources(gguf, header, info, path) for info in infos}
    # llama.cpp's converter (BaichuanModel in convert_hf_to_gguf.py) permutes the q and k rows of every Baichuan
    # model, 13B's ALiBi ones too, where the permutation changes no score (q and k move alike); our export
    # permutes them for RoPE only. Undone wherever done, the checkpoint gets the original rows back.
    permuted = config.position == ROPE or KEY_POSITION not in fields
    del header, fields  # the vocabulary's strings: not held while the weights are written

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        with open(path, "rb") as f:
            for info in infos:
                sources = parts[info.name]
                tensor = torch.empty(info.shape, dtype=info.dtype)
                rows = tensor.view(len(sources), -1, info.shape[-1])  # (parts, rows, cols); a norm: (1, 1, d)
                for i, source in enumerate(sources):
                    qk = len(sources) == 3 and i < 2  # q and k of W_pack
                    _decode_into(gguf, f, source, rows[i], config.n_heads if qk and permuted else None, path)
                del rows
                yield info.name, tensor
                del tensor  # not held while the next one is made

    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    files["generation_config.json"] = _json(
        {
            "pad_token_id": config.pad_token_id,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
        }
    )
    write_checkpoint(out, hf, infos, tensors(), files=files, progress=progress)
    return out


def _sources(gguf, header: GGUFHeader, info: TensorInfo, path: Path) -> list[GGUFTensor]:
    """The GGUF tensors that make checkpoint tensor `info`, checked: present, of its shape, of a type gguf
    decodes, their data inside the file."""
    names = gguf_names(info.name)
    shape = (info.shape[0] // len(names), *info.shape[1:])
    size = path.stat().st_size
    sources = []
    for name in names:
        t = header.tensors.get(name)
        if t is None:
            raise ConvertError(f"{path}: tensor {name} is missing")
        if t.shape != shape:
            raise ConvertError(
                f"{path}: tensor {name} has shape {list(t.shape)}; the header's sizes give {list(shape)}"
            )
        try:
            kind = gguf.GGMLQuantizationType(t.type)
        except ValueError:
            raise ConvertError(f"{path}: tensor {name} has an unknown GGML type {t.type}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        if shape[-1] % block:
            raise ConvertError(f"{path}: tensor {name}: rows of {shape[-1]} do not fill {kind.name} blocks")
        try:  # one block of zeros: does this gguf decode the type?
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
        except NotImplementedError:
            raise ConvertError(
                f"{path}: tensor {name} is {kind.name}, which gguf cannot dequantize"
            ) from None
        if t.offset + math.prod(shape) // block * type_size > size:
            raise ConvertError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        sources.append(t)
    return sources


def _decode_into(gguf, f: BinaryIO, t: GGUFTensor, rows: torch.Tensor, heads: int | None, path: Path) -> None:
    """Decode GGUF tensor `t` into `rows` (rows, cols), a chunk of rows at a time. The file is read with plain
    reads, not through a memory map: the pages of a map, once read, count as this process's memory until it is
    unmapped, so a map would keep the whole file resident by the end. With `heads`, q/k rows go back from
    llama.cpp's interleaved RoPE pairs to the checkpoints' rotate-half layout (the inverse of
    `_interleave_rope`), which moves rows within a head only: chunks are whole heads."""
    n_rows, cols = rows.shape
    kind = gguf.GGMLQuantizationType(t.type)
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    row_bytes = cols // block * type_size
    step = max(1, _CHUNK_VALUES // cols)
    head_rows = n_rows // heads if heads else 1
    step = max(head_rows, step // head_rows * head_rows)
    buffer = np.empty(min(step, n_rows) * row_bytes, dtype=np.uint8)
    for start in range(0, n_rows, step):
        n = min(step, n_rows - start)
        raw = buffer[: n * row_bytes]
        f.seek(t.offset + start * row_bytes)
        if f.readinto(memoryview(raw)) != raw.nbytes:
            raise ConvertError(f"{path}: tensor {t.name} is cut short (truncated file?)")
        if kind == gguf.GGMLQuantizationType.F32:
            values = torch.from_numpy(raw.view(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            values = torch.from_numpy(raw.view(np.float16))
        elif kind == gguf.GGMLQuantizationType.BF16:
            values = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        else:
            values = torch.from_numpy(gguf.quants.dequantize(raw.reshape(n, row_bytes), kind))
        values = values.view(n, cols)
        target = rows[start : start + n]
        if heads:  # (heads, pairs, 2, cols) -> (heads, 2, pairs, cols)
            values = values.view(n // head_rows, head_rows // 2, 2, cols).transpose(1, 2)
            target = target.view(n // head_rows, 2, head_rows // 2, cols)
        target.copy_(values)  # the cast to the output dtype too


def checkpoint_shapes(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a Baichuan checkpoint, in the model's state-dict order (without building the model, which
    costs memory of its own)."""
    d, f, v = config.dim, config.ffn_dim, config.vocab_size
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.W_pack.weight", (3 * d, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    return shapes + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def _config(fields: dict, path: Path) -> Config:
    def key(name, default=None):
        value = fields.get(f"{ARCH}.{name}", default)
        if value is None:
            raise ConvertError(f"{path}: GGUF key {ARCH}.{name} is missing")
        return value

    n_layers = int(key("block_count"))
    position = fields.get(KEY_POSITION) or llama_cpp_position(n_layers)
    if position is None:
        raise ConvertError(
            f"{path}: a {n_layers}-layer Baichuan GGUF runs in llama.cpp with no position encoding, which no "
            "Baichuan model has; its position encoding cannot be known"
        )
    n_heads = int(key("attention.head_count"))
    if int(key("attention.head_count_kv", n_heads)) != n_heads:
        raise ConvertError(f"{path}: grouped-query attention is not a Baichuan model")
    tokens = fields.get("tokenizer.ggml.tokens")
    return Config(
        vocab_size=int(fields.get(f"{ARCH}.vocab_size", len(tokens))),
        dim=int(key("embedding_length")),
        n_layers=n_layers,
        n_heads=n_heads,
        ffn_dim=int(key("feed_forward_length")),
        position=position,
        norm_head=False,
        max_seq_len=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_base=float(fields.get(f"{ARCH}.rope.freq_base", 10_000.0)),
        pad_token_id=int(fields.get("tokenizer.ggml.padding_token_id", 0)),
        bos_token_id=int(fields.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(fields.get("tokenizer.ggml.eos_token_id", 2)),
    )


def _tokenizer_model(fields: dict, reading: str) -> bytes:
    """A SentencePiece model file holding the GGUF's vocabulary (padding pieces past the tokenizer dropped)."""
    tokens = fields.get("tokenizer.ggml.tokens")
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = fields.get("tokenizer.ggml.token_type") or [spm_proto.NORMAL] * len(tokens)
    pieces = [spm_proto.Piece(t, float(s), int(k)) for t, s, k in zip(tokens, scores, types, strict=True)]
    while pieces and pieces[-1].type == spm_proto.UNUSED and pieces[-1].piece.startswith("[PAD"):
        pieces.pop()
    normalizer, trainer = fields.get(KEY_NORMALIZER), fields.get(KEY_TRAINER)
    if normalizer is not None and trainer is not None:  # our own export: the settings it came with
        proto = spm_proto.ModelProto(pieces, base64.b64decode(trainer), base64.b64decode(normalizer))
        return spm_proto.serialize(proto)
    dummy_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    if reading == "baichuan":
        first_byte = next((i for i, p in enumerate(pieces) if p.type == spm_proto.BYTE), len(pieces))
        for p in pieces[:first_byte]:
            if p.type == spm_proto.NORMAL and p.score == 0.0:
                p.type = spm_proto.USER_DEFINED
    rule = "nmt_nfkc" if reading == "baichuan" else "identity"
    normalizer = spm_proto.set_fields(_normalizer_spec(rule), {3: int(dummy_prefix), 4: 0, 5: 1})

    def special(key: str, kind: int) -> int:
        value = fields.get(key)
        if value is not None:
            return int(value)
        return next((i for i, p in enumerate(pieces) if p.type == kind), -1)

    trainer_fields = {
        3: spm_proto.BPE,
        4: len(pieces),
        35: int(any(p.type == spm_proto.BYTE for p in pieces)),
        40: special("tokenizer.ggml.unknown_token_id", spm_proto.UNKNOWN),
        41: special("tokenizer.ggml.bos_token_id", -1),
        42: special("tokenizer.ggml.eos_token_id", -1),
        43: 2**64 - 1,  # pad_id -1: Baichuan's pad is <unk>, not a piece of its own
    }
    trainer = spm_proto.set_fields(b"", trainer_fields)
    return spm_proto.serialize(spm_proto.ModelProto(pieces, trainer, normalizer))


def _normalizer_spec(rule: str) -> bytes:
    """SentencePiece's own normaliser spec for `rule` (its precompiled character map included), taken from a
    throwaway model its trainer builds in a few milliseconds: the map exists nowhere else in the package."""
    if rule == "identity":
        return spm_proto.set_fields(b"", {1: b"identity"})
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b c"]),
        model_writer=model,
        model_type="char",
        vocab_size=8,
        hard_vocab_limit=False,
        normalization_rule_name=rule,
        minloglevel=2,
    )
    return spm_proto.parse(model.getvalue()).normalizer_spec


def _tokenizer_files(fields: dict, tokenizer: bytes) -> dict[str, bytes]:
    def piece(key: str, fallback: str) -> str:
        i = fields.get(key)
        tokens = fields.get("tokenizer.ggml.tokens")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else fallback

    special = {
        "bos_token": piece("tokenizer.ggml.bos_token_id", "<s>"),
        "eos_token": piece("tokenizer.ggml.eos_token_id", "</s>"),
        "unk_token": piece("tokenizer.ggml.unknown_token_id", "<unk>"),
        "pad_token": piece("tokenizer.ggml.padding_token_id", "<unk>"),
    }
    config = {
        "tokenizer_class": "BaichuanTokenizer",
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        **special,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
        "model_max_length": int(fields.get(f"{ARCH}.context_length", 4096)),
    }
    template = fields.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {
        MODEL_FILE: tokenizer,
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json(special),
    }


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
