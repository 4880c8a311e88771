"""The Baichuan2 -> Baichuan head migration of the Baichuan2 README, done offline on the checkpoint.

Baichuan2's NormHead normalises each row of `lm_head.weight` on every call. Normalising the rows once, in the
file, gives a plain Baichuan checkpoint with the same logits, which tools without NormHead run as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from baichuan.checkpoint import read_config
from baichuan.convert.formats import DEFAULT_SHARD_BYTES, ConvertError, convert_checkpoint, read_source_config


def normalize_head(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`lm_head.weight` with unit rows (as NormHead computes them, in fp32); every other tensor as it is."""
    if name == "lm_head.weight":
        return torch.nn.functional.normalize(tensor.float(), dim=-1)
    return tensor


def migrate_head(
    model: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """Write `model` (a Baichuan2 checkpoint with NormHead) to `out` with the head normalised offline and
    config.json saying `norm_head: false`; the position encoding is written explicitly, since the clues it was
    read from may include the head."""
    config = read_config(model)
    hf = read_source_config(model)
    if hf.get("quantization") or hf.get("quantization_config"):
        raise ConvertError(f"{model} is quantized; migrate the head of the float checkpoint")
    if not config.norm_head:
        raise ConvertError(f"{model} has no NormHead (a Baichuan-1 style head already): nothing to migrate")
    changes = {"norm_head": False, "position_encoding": config.position}
    convert_checkpoint(model, out, dtype, max_shard_bytes, normalize_head, changes, progress)
