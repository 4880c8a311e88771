"""Benchmark scripts the README runs, on a tiny checkpoint: each runs to its end and prints what it promises."""

from __future__ import annotations

import re
import sys

import torch

from baichuan.checkpoint import save_model
from baichuan.model import Baichuan
from tests.conftest import benchmark_script, tiny_config


def test_profile_decode_alternates_steps_and_products(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    save_model(Baichuan(tiny_config(ffn_dim=176)), tmp_path)
    argv = ["profile_decode.py", "--dir", str(tmp_path), "--quantize", "8", "--tokens", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    benchmark_script("profile_decode").main()
    out = capsys.readouterr().out
    assert re.search(
        r"^8 weights, fp32 activations \(fused layers where they apply\): [\d.]+ tok/s$", out, re.M
    )
    assert re.search(r"^\| 176x64 \| 4 \| [\d.]+ \| [\d.]+ \|$", out, re.M)  # gate and up of 2 layers
    assert re.search(r"^\| 512x64 \| 1 \| ", out, re.M)  # the head
    assert re.search(
        r"alternated with fused steps \(3 rounds\): [\d.]+ ms a pass against [\d.]+ ms a step \(medians\); "
        r"outside the products -?[\d.]+% of a step \(median of the rounds; quartiles -?[\d.]+% to -?[\d.]+%\)",
        out,
    )
    assert re.search(r"^PyTorch operations dispatched by one decode step: [\d,]+$", out, re.M)
