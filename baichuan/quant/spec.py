"""The config.json record of a quantized checkpoint, and the checks of what is asked or found.

What a saved checkpoint holds for a quantized linear `X` (`format_version` 2 of the record):
  int8  X.weight int8 (out, in) and X.scales (out,): w = weight * scales[:, None]. Symmetric per output channel,
        scale = absmax/127, rounded as Baichuan-13B's `QLinear` does, so its int8 values are reproduced exactly.
        Layers the record's `int8_groups` names have a scale per group of G input columns instead (where G divides
        their inputs), X.scales bf16 (out, in/G): w[:, k] = weight[:, k] * scales[:, k // G] (llama.cpp's Q8_0 at
        G = 32).
  int4  X.weight uint8 (out, in/2), column 2j in the low nibble and 2j+1 in the high one, codes q in 0..15, and
        X.scales, X.zeros bf16 (out, ceil(in/group_size)): w = (q - 8) * scale + zero. This is the convention of
        PyTorch's tinygemm int4 kernels, so loading only re-tiles the codes for the CPU kernel.
The record (`make_record`) says which layers hold which format. Version 1 records (no `int8_groups`) still load.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

QUANT_METHOD = "baichuan_weight_only"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # 2 added `int8_groups`
SUPPORTED_BITS = (8, 4)
DEFAULT_GROUP_SIZE = 128
# The output head's default bits for each model bits (None: kept in the float dtype), and its int8 scales' group
# size (None: one scale a row). Its error goes straight into the logits with nothing after it to average it out:
# - an 8-bit model quantizes it to int8 with a bf16 scale per 32 columns, as llama.cpp's Q8_0: on the briefly
#   trained model of benchmarks/bench_accuracy.py the int8 model's KL to the float one is 1.44e-5 with it, 2.54e-5
#   with one scale a row (the head ~95% of it), 6.9e-7 with a float head (benchmarks/README.md). The original
#   quantize(8) keeps the head in float (`overrides={"lm_head": None}` does too), which at the 1.29B shape reads
#   17% more bytes per decoded token (1.29 against 1.11 GB);
# - a 4-bit model keeps it at 8 bits, one scale a row (llama.cpp's Q4_0 likewise keeps output.weight at higher
#   precision), see tests/quant/test_swap.py::test_int4_head_policy.
DEFAULT_HEAD_BITS: dict[int, int | None] = {8: 8, 4: 8}
DEFAULT_HEAD_INT8_GROUP: dict[int, int | None] = {8: 32, 4: None}


def default_overrides(bits: int) -> dict[str, int | None]:
    """The `overrides` a record gets when none are asked for: the head's default bits (DEFAULT_HEAD_BITS)."""
    return {"lm_head": DEFAULT_HEAD_BITS[check_bits(bits)]}


def default_int8_groups(bits: int) -> dict[str, int]:
    """The `int8_groups` a record gets when none are asked for: the head's (DEFAULT_HEAD_INT8_GROUP)."""
    group = DEFAULT_HEAD_INT8_GROUP[check_bits(bits)]
    return {} if group is None else {"lm_head": group}


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


def check_int8_groups(int8_groups: Any) -> dict[str, int]:
    if not isinstance(int8_groups, Mapping) or not all(
        isinstance(pattern, str) and isinstance(g, int) and not isinstance(g, bool) and g > 0
        for pattern, g in int8_groups.items()
    ):
        raise QuantizationError(
            f"int8_groups must map name patterns to positive group sizes, got {int8_groups!r}"
        )
    return dict(int8_groups)


def make_record(
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    skip: Iterable[str] = (),
    overrides: Mapping[str, int | None] | None = None,
    int8_groups: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The config.json `quantization` record; `overrides=None` and `int8_groups=None` mean the default policy for
    `bits`."""
    if overrides is None:
        overrides = default_overrides(bits)
    if int8_groups is None:
        int8_groups = default_int8_groups(bits)
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": check_bits(bits),
        "group_size": check_group_size(group_size),
        "symmetric": bool(symmetric),
        "skip": list(skip),
        "overrides": {pattern: None if b is None else check_bits(b) for pattern, b in overrides.items()},
        "int8_groups": check_int8_groups(int8_groups),
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
    if record.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise QuantizationError(
            f"quantized checkpoint format {record.get('format_version')!r} is not supported "
            f"(this version reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))})"
        )
    return {
        "bits": check_bits(record.get("bits")),
        "group_size": check_group_size(record.get("group_size")),
        "symmetric": bool(record.get("symmetric", False)),
        "skip": tuple(record.get("skip", ())),
        "overrides": dict(record.get("overrides", {})),
        "int8_groups": check_int8_groups(record.get("int8_groups", {})),
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


def int8_group_for(name: str, int8_groups: Mapping[str, int], in_features: int) -> int | None:
    """The group size of the int8 scales of the linear called `name` with `in_features` inputs (None: one scale a
    row, also where the group asked for does not divide the inputs, as in tiny test models)."""
    for pattern, group in int8_groups.items():
        if fnmatch.fnmatchcase(name, pattern):
            return group if in_features % group == 0 else None
    return None


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
