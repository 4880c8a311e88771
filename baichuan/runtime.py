"""Loading a checkpoint for inference: device and dtype choice, NormHead folding, tokenizer and defaults.

The front ends (generate, chat, serve) all start here, so a checkpoint behaves the same in each of them.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from baichuan.chat_format import ChatFormat, load_chat_format
from baichuan.checkpoint import CheckpointError, fold_norm_head, load_model
from baichuan.generate import SamplingConfig
from baichuan.model import Baichuan
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


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (x86) or Arm's BF16 extension: bf16 matmuls run natively rather than emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2+ has bf16
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} asked for, but this torch sees no CUDA GPU")
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
    if cpu_has_native_bf16():
        return torch.bfloat16, "bf16: this CPU computes bf16 natively (AVX512-BF16/AMX)"
    return (
        torch.float32,
        "fp32: this CPU has no native bf16 (no AVX512-BF16/AMX); pass --dtype bf16 to halve memory",
    )


@dataclass
class Loaded:
    model: Baichuan
    tokenizer: Tokenizer
    sampling: SamplingConfig
    chat_format: ChatFormat
    add_bos: bool
    note: str  # what was chosen and why, for the user


def load_for_inference(
    directory: str | os.PathLike, device: str = "auto", dtype: str = "auto", quantize: int | None = None
) -> Loaded:
    """Model (eval, NormHead folded, optionally quantized while loading), tokenizer, the checkpoint's sampling
    defaults and chat format."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    if not (directory / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{directory}: no tokenizer.model (the SentencePiece tokenizer file is missing)"
        )
    target = pick_device(device)
    torch_dtype, why = pick_dtype(dtype, target)
    model = fold_norm_head(load_model(directory, dtype=torch_dtype, device=target, quantize=quantize))
    if model.quantization:
        why += f", weights int{model.quantization['bits']}"
    tokenizer = Tokenizer(directory / "tokenizer.model")
    tokenizer_config = directory / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        sampling=SamplingConfig.from_checkpoint(directory, vocab_size=tokenizer.vocab_size),
        chat_format=load_chat_format(directory),
        add_bos=bool(settings.get("add_bos_token", False)),
        note=f"{target.type}, {why}",
    )
