"""The config.json record and the checks of what is asked: one-line errors."""

from __future__ import annotations

import pytest
from torch import nn

from baichuan.quant.int4 import Int4Linear
from baichuan.quant.spec import QuantizationError, check_bits, read_quantization
from baichuan.quant.swap import (
    quantize_model,
)
from tests.quant.conftest import tiny_model


def test_bad_input_is_one_clear_line():
    for bits in (3, 16, "8", True, None):
        with pytest.raises(QuantizationError, match="unsupported quantization bits") as e:
            check_bits(bits)
        assert "\n" not in str(e.value)
    with pytest.raises(QuantizationError, match="even"):
        Int4Linear.from_linear(nn.Linear(63, 16), group_size=32)
    with pytest.raises(QuantizationError, match="group size"):
        quantize_model(nn.Sequential(nn.Linear(64, 16)), 4, group_size=33)
    with pytest.raises(QuantizationError, match="fold it first"):
        quantize_model(tiny_model("rope", norm_head=True), 8)  # the NormHead must be folded before quantizing
    with pytest.raises(QuantizationError, match="no CPU path"):
        read_quantization({"quantization_config": {"load_in_8bit": True, "quant_method": "bitsandbytes"}})
    with pytest.raises(QuantizationError, match="'fp4' has no CPU path"):
        read_quantization({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}})
    with pytest.raises(QuantizationError, match="not supported"):
        read_quantization({"quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert read_quantization(
        {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}
    ) == {"quant_method": "bitsandbytes", "bits": 4, "quant_type": "nf4"}
    assert read_quantization({"hidden_size": 64}) is None


@pytest.mark.parametrize("key", ["quantization", "quantization_config"])
def test_quantization_record_that_is_not_an_object_is_one_error(key):
    with pytest.raises(QuantizationError, match="must be a JSON object, got list"):
        read_quantization({key: [4]})
