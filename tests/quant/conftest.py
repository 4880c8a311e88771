"""Shared helpers of the quantization tests: Gaussian layers like the real checkpoints' and the tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baichuan import cpu_gemv
from baichuan.model import Baichuan
from tests.conftest import require_cpu_kernels, tiny_config

HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@pytest.fixture(autouse=True)
def no_amx_prompts(monkeypatch):
    """The routes these tests follow are those of CPUs without AMX, on every CPU: where it has AMX, bf16 rows of 9 to
    768 go to the AMX kernels instead (`cpu.AMX_QUANTIZED_MAX_ROWS`; tests/test_cpu_prompt_amx.py follows them)."""
    monkeypatch.setattr(cpu_gemv, "_amx_quantized_max_rows", lambda: 0)


@pytest.fixture(params=["avx2", "torch"])
def kernels(request, monkeypatch) -> str:
    """Which CPU kernels the quantized layers made in the test use: ours (`cpu_gemv`) or torch's alone."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_gemv, "load", lambda: None)
    else:
        require_cpu_kernels()
    return request.param


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gaussian_linear(in_features: int, out_features: int, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    return linear.to(dtype)


def tiny_model(position: str = "alibi", norm_head: bool = True) -> Baichuan:
    model = Baichuan(tiny_config(position, norm_head))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model.eval()


def input_ids(batch: int = 2, length: int = 40) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(1))
