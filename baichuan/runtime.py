"""Loading a checkpoint for inference: device and dtype choice, NormHead folding, tokenizer and defaults.

The front ends (generate, chat, serve) all start here, so a checkpoint behaves the same in each of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from baichuan import memory
from baichuan.chat_format import ChatFormat, chat_format_for
from baichuan.checkpoint import (
    CheckpointError,
    bf16_head_beside,
    fold_norm_head,
    load_into,
    read_config,
    read_json,
    weight_files,
)
from baichuan.config import Config
from baichuan.cpu import half_is_emulated
from baichuan.generate import SamplingConfig, read_generation_config
from baichuan.model import Baichuan
from baichuan.quant.spec import (
    QUANT_METHOD,
    QuantizationError,
    bits_for,
    default_int8_groups,
    default_overrides,
    int8_group_for,
    read_quantization,
)
from baichuan.tokenizer import Tokenizer

DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but this torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {requested!r} asked for, but this machine has {torch.cuda.device_count()} GPUs"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {requested!r} asked for, but this torch has no MPS (Apple GPU) support")
    return device


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to run in, and a one-line reason for the user."""
    if requested != "auto":
        try:
            return DTYPE_NAMES[requested.lower()], f"dtype {requested} as requested"
        except KeyError:
            raise ValueError(f"unknown dtype {requested!r}; choose auto, bf16, fp16 or fp32") from None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 on a GPU that supports it"
        return torch.float16, "fp16: this GPU has no bf16"
    if not half_is_emulated(torch.bfloat16):
        return torch.bfloat16, "bf16: this CPU computes bf16 natively (AVX512-BF16/AMX)"
    return (
        torch.float32,
        "fp32: this CPU has no native bf16 (no AVX512-BF16/AMX); pass --dtype bf16 to halve memory",
    )


def keeps_bf16_weights(
    requested: str, dtype: torch.dtype, device: torch.device, stored_dtype: torch.dtype | None
) -> bool:
    """Whether a float checkpoint stored in `stored_dtype` runs as fp32 activations over its linear weights kept
    in bf16 (checkpoint.load_into's bf16_weights): where auto gave fp32 for want of native bf16 and our mat-vec
    widens each weight to fp32. Half the memory of fp32 weights and half the bytes a decoded token reads, for the
    same products; against bf16 activations, no casts around every product and elementwise work in fp32, which
    such a CPU computes natively (benchmarks/README.md)."""
    return (
        requested == "auto"
        and dtype is torch.float32
        and stored_dtype is torch.bfloat16
        and bf16_head_beside(dtype, device)
    )


def pick_kv_dtype(requested: str | None, device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The KV cache's dtype, a setting of its own, and a note for the user ("" when it is the compute dtype).

    auto: 16 bits on a CPU even where compute runs in fp32, because there the cache is plain memory the
    machine may not have (Baichuan2-7B's 4,096 positions: 2 GiB a row in bf16, 4 in fp32) and bf16 adds an
    error far below sampling noise (tests/test_kv_cache.py bounds it); on a GPU the compute dtype, which is
    already 16-bit. None (library use): the compute dtype."""
    if requested is None:
        return dtype, ""
    if requested == "auto":
        chosen = torch.bfloat16 if device.type == "cpu" and dtype.itemsize > 2 else dtype
    else:
        try:
            chosen = DTYPE_NAMES[requested.lower()]
        except KeyError:
            raise ValueError(
                f"unknown KV cache dtype {requested!r}; choose auto, bf16, fp16 or fp32"
            ) from None
    return chosen, ("" if chosen == dtype else f"KV cache {str(chosen).removeprefix('torch.')}")


@dataclass
class Loaded:
    model: Baichuan
    tokenizer: Tokenizer
    sampling: SamplingConfig
    chat_format: ChatFormat
    add_bos: bool
    note: str  # what was chosen and why, for the user
    kv_dtype: torch.dtype | None = None  # of the KV caches the front ends allocate; None: the model's dtype


@dataclass
class Prepared:
    """A checkpoint directory read and checked, all but its weights: what a front end needs to validate its
    input and to size its memory before the slow part."""

    directory: Path
    config: Config
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    quantize: int | None  # quantize while loading (8 or 4)
    quantization: dict | None  # the checkpoint's own record (already quantized), or None
    stored_dtype: torch.dtype | None  # config.json's torch_dtype, where it names one
    tokenizer: Tokenizer
    sampling: SamplingConfig
    chat_format: ChatFormat
    add_bos: bool
    note: str
    # fp32 activations over the linear weights as stored in bf16 (checkpoint.load_into), where auto picked fp32
    bf16_weights: bool = False

    def estimate(
        self, rows: int, seq_len: int, prefill: int, config: Config | None = None
    ) -> memory.Estimate:
        """Memory of a run with `rows` KV cache rows of `seq_len` positions and a `prefill`-token forward."""
        record = self.quantization or {}
        bits = self.quantize or record.get("bits")
        # The record's patterns decide the head's bits; a model quantized as it loads gets the default policy.
        overrides = record.get("overrides", default_overrides(bits) if bits else {})
        head_bits = bits_for("lm_head", bits, record.get("skip", ()), overrides) if bits else None
        emulated = self.dtype.itemsize == 2 and half_is_emulated(self.dtype)
        bf16_head = bits and self.stored_dtype is torch.bfloat16 and bf16_head_beside(self.dtype, self.device)
        return memory.estimate(
            config or self.config,
            dtype_bytes=self.dtype.itemsize,
            kv_bytes=self.kv_dtype.itemsize,
            rows=rows,
            seq_len=seq_len,
            prefill=prefill,
            bits=bits,
            group_size=record.get("group_size", 128),
            head_bits=head_bits,
            head_bytes=2 if bf16_head else None,
            head_int8_group=self._head_int8_group(bits) if head_bits == 8 else None,
            upcast=self.device.type == "cpu" and (bits is not None or emulated),
            stored_bytes=None if self.stored_dtype is None else self.stored_dtype.itemsize,
            quantized_on_load=self.quantize is not None,
            runtime=memory.RUNTIME_BYTES if self.device.type == "cpu" else 0,
            linear_bytes=2 if self.bf16_weights else None,
        )

    def _head_int8_group(self, bits: int) -> int | None:
        """The group size of an int8 head's scales: a stored record's (none in format 1), or the default's for a
        model quantized as it loads."""
        record = self.quantization or {}
        groups = record.get("int8_groups", {} if self.quantization else default_int8_groups(bits))
        return int8_group_for("lm_head", groups, self.config.dim)

    def available_memory(self) -> tuple[int, str] | None:
        """Free memory where the weights and caches will live: the GPU's, or this process's share of RAM."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free, f"free on {self.device}"
        if self.device.type == "cpu":
            return memory.available_memory()
        return None


def prepare(
    directory: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    quantize: int | None = None,
    kv_dtype: str | None = None,
) -> Prepared:
    """Read and check everything but the weights: the device and dtypes asked for, config.json (and a stored
    quantization record), that the weight files exist, the tokenizer, generation_config.json and
    tokenizer_config.json. Every problem is a CheckpointError or ValueError naming the file and what is wrong."""
    target = pick_device(device)
    torch_dtype, why = pick_dtype(dtype, target)
    cache_dtype, kv_why = pick_kv_dtype(kv_dtype, target, torch_dtype)
    if quantize not in (None, 8, 4):
        raise ValueError(f"quantize takes 8 or 4 bits, not {quantize}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    config = read_config(directory)
    config_path = directory / "config.json"
    hf = read_json(config_path)
    try:
        stored = read_quantization(hf)
    except QuantizationError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    if stored is not None and stored["quant_method"] == QUANT_METHOD and quantize is not None:
        raise ValueError(
            f"{directory} is already quantized ({stored['bits']} bits); load it without quantizing"
        )
    weight_files(directory)  # that they exist; reading them is the slow part
    if not (directory / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{directory}: no tokenizer.model (the SentencePiece tokenizer file is missing)"
        )
    try:
        tokenizer = Tokenizer(directory / "tokenizer.model")
    except (ValueError, OSError) as e:
        raise CheckpointError(str(e)) from None
    generation_path = directory / "generation_config.json"
    try:
        generation = read_generation_config(generation_path) if generation_path.is_file() else None
        sampling = SamplingConfig.from_checkpoint(directory, vocab_size=tokenizer.vocab_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    add_bos = _add_bos(directory / "tokenizer_config.json")
    try:
        chat_format = chat_format_for(hf, generation)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{generation_path}: {e}") from None
    stored_dtype = DTYPE_NAMES.get(str(hf.get("torch_dtype")))
    bf16_weights = (
        quantize is None and stored is None and keeps_bf16_weights(dtype, torch_dtype, target, stored_dtype)
    )
    if bf16_weights:
        why = "fp32 activations over the bf16 weights as stored: this CPU has no native bf16 (no AVX512-BF16/AMX)"
    if stored is not None and stored["quant_method"] != "bitsandbytes":
        why += f", weights int{stored['bits']}"
    elif quantize is not None:
        why += f", weights int{quantize}"
    return Prepared(
        directory=directory,
        config=config,
        device=target,
        dtype=torch_dtype,
        kv_dtype=cache_dtype,
        quantize=quantize,
        quantization=stored if stored is not None and stored["quant_method"] == QUANT_METHOD else None,
        stored_dtype=stored_dtype,
        tokenizer=tokenizer,
        sampling=sampling,
        chat_format=chat_format,
        add_bos=add_bos,
        note=f"{target.type}, {why}" + (f", {kv_why}" if kv_why else ""),
        bf16_weights=bf16_weights,
    )


def _add_bos(path: Path) -> bool:
    if not path.is_file():
        return False
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got {type(settings).__name__}")
    add_bos = settings.get("add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise CheckpointError(f"{path}: add_bos_token must be true or false, got {add_bos!r}")
    return add_bos


def load(
    prepared: Prepared,
    max_seq_len: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Loaded:
    """Read the weights of a prepared checkpoint (eval mode, NormHead folded, quantized while loading when
    asked). `max_seq_len`: a shorter context than the checkpoint's, for every cache and prompt budget of this
    run. `progress(name, done, total)` hears of each tensor read."""
    config = prepared.config
    if max_seq_len is not None:
        config = config.replace(max_seq_len=min(max_seq_len, config.max_seq_len))
    with torch.device("meta"):
        model = Baichuan(config)
    load_into(
        model,
        prepared.directory,
        config,
        prepared.dtype,
        prepared.device,
        prepared.quantize,
        progress=progress,
        bf16_weights=prepared.bf16_weights,
    )
    return Loaded(
        model=fold_norm_head(model.eval()),
        tokenizer=prepared.tokenizer,
        sampling=prepared.sampling,
        chat_format=prepared.chat_format,
        add_bos=prepared.add_bos,
        note=prepared.note,
        kv_dtype=prepared.kv_dtype,
    )


def load_for_inference(
    directory: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    quantize: int | None = None,
    kv_dtype: str | None = None,
    max_seq_len: int | None = None,
) -> Loaded:
    """Model (eval, NormHead folded, optionally quantized while loading), tokenizer, the checkpoint's sampling
    defaults and chat format. `kv_dtype` auto|bf16|fp16|fp32 (see `pick_kv_dtype`; None: the model's)."""
    return load(prepare(directory, device, dtype, quantize, kv_dtype), max_seq_len)
