"""The config.json record of a quantized checkpoint, and the checks of what is asked or found.

What a saved checkpoint holds for a quantized linear `X` (`format_version` 1 of the record):
  int8  X.weight int8 (out, in) and X.scales (out,): w = weight * scales[:, None]. Symmetric per output channel,
        scale = absmax/127, rounded as Baichuan-13B's `QLinear` does, so its int8 values are reproduced exactly.
  int4  X.weight uint8 (out, in/2), column 2j in the low nibble and 2j+1 in the high one, codes q in 0..15, and
        X.scales, X.zeros bf16 (out, ceil(in/group_size)): w = (q - 8) * scale + zero. This is the convention of
        PyTorch's tinygemm int4 kernels, so loading only re-tiles the codes for the CPU kernel.
The record (`make_record`) says which layers hold which format.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

QUANT_METHOD = "baichuan_weight_only"
FORMAT_VERSION = 1
SUPPORTED_BITS = (8, 4)
DEFAULT_GROUP_SIZE = 128
# The output head's default bits for each model bits (None: kept in the float dtype). Its error goes straight into
# the logits with nothing after it to average it out:
# - an 8-bit model keeps it in float, as the original quantize(8) does: on the briefly trained 1.29B-shape model
#   of benchmarks/bench_accuracy.py the int8 head is ~95% of the int8 model's KL to the float one (2.7e-5 with it,
#   6.6e-7 without), for 17% more bytes read per decoded token at that shape (1.29 against 1.10 GB);
# - a 4-bit model keeps it at 8 bits (llama.cpp's Q4_0 likewise keeps output.weight at higher precision), see
#   tests/quant/test_swap.py::test_int4_head_policy.
DEFAULT_HEAD_BITS: dict[int, int | None] = {8: None, 4: 8}


def default_overrides(bits: int) -> dict[str, int | None]:
    """The `overrides` a record gets when none are asked for: the head's default bits (DEFAULT_HEAD_BITS)."""
    return {"lm_head": DEFAULT_HEAD_BITS[check_bits(bits)]}


class QuantizationError(ValueError):
    """A quantization request or a quantized checkpoint that cannot be served; the message is one line."""


def check_bits(bits: Any) -> int:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise QuantizationError(f"unsupported quantization bits {bits!r}: choose 8 (int8) or 4 (int4)")
    return int(bits)


def check_group_size(group_size: Any) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise QuantizationError(f"int4 group size must be an even integer >= 2, got {group_size!r}")
    return group_size


def make_record(
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    skip: Iterable[str] = (),
    overrides: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """The config.json `quantization` record; `overrides=None` means the default policy for `bits`."""
    if overrides is None:
        overrides = default_overrides(bits)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": check_bits(bits),
        "group_size": check_group_size(group_size),
        "symmetric": bool(symmetric),
        "skip": list(skip),
        "overrides": {pattern: None if b is None else check_bits(b) for pattern, b in overrides.items()},
    }


def check_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a config.json `quantization` record written by `make_record`; one-line errors. Returns the
    arguments of `swap.quantize_model` that it stands for."""
    if not isinstance(record, Mapping):
        raise QuantizationError(f"the quantization record must be a JSON object, got {type(record).__name__}")
    if record.get("quant_method") != QUANT_METHOD:
        raise QuantizationError(
            f"unknown quantization method {record.get('quant_method')!r} (expected {QUANT_METHOD!r})"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(
            f"quantized checkpoint format {record.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    return {
        "bits": check_bits(record.get("bits")),
        "group_size": check_group_size(record.get("group_size")),
        "symmetric": bool(record.get("symmetric", False)),
        "skip": tuple(record.get("skip", ())),
        "overrides": dict(record.get("overrides", {})),
    }


def bits_for(name: str, bits: int, skip: Iterable[str], overrides: Mapping[str, int | None]) -> int | None:
    """The bits of the linear called `name` under a record's `skip` and `overrides` fnmatch patterns (None:
    kept in floating point)."""
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
        return None
    for pattern, override in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return None if override is None else check_bits(override)
    return bits


def read_quantization(hf_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a config.json says about quantized weights: our record (validated), the bitsandbytes 4-bit marker
    {"quant_method": "bitsandbytes", "bits": 4}, or None. Formats with no CPU path fail in one line."""
    record = hf_config.get("quantization")
    if record is not None:
        check_record(record)
        return dict(record)
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise QuantizationError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise QuantizationError(
            f"{method} quantized checkpoints are not supported; load the float model and use quantize(8|4)"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise QuantizationError(
            "bitsandbytes 8-bit (LLM.int8) checkpoints need bitsandbytes on CUDA and have no "
            "CPU path here; load the float model and use quantize(8)"
        )
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise QuantizationError("quantization_config says neither load_in_4bit nor load_in_8bit")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type != "nf4":
        raise QuantizationError(
            f"bitsandbytes 4-bit type {quant_type!r} has no CPU path here; only nf4 is supported"
        )
    return {"quant_method": "bitsandbytes", "bits": 4, "quant_type": "nf4"}
