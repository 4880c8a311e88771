"""Benchmark scripts the README runs, on a tiny checkpoint: each runs to its end and prints what it promises."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from baichuan.checkpoint import save_model
from baichuan.cpu_gemv import CSRC, SOURCES
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


def test_ab_kernels_builds_a_variant_from_csrc_with_its_own_files_laid_over(tmp_path, monkeypatch):
    """A variant directory holds only the csrc/ files it changes (a source, a header); every source of the build
    then sees them, and the package's files fill in the rest. No compiler runs: the build call is recorded."""
    ab_kernels = benchmark_script("ab_kernels")
    variant = tmp_path / "try"
    variant.mkdir()
    (variant / "cpu_gemv_int8.cpp").write_text("// the variant's int8 source\n")
    (variant / "gemv.h").write_text("// the variant's header\n")
    built = {}

    def load(name, sources, **options):
        tree = Path(sources[0]).parent
        built.update(
            name=name, files={path.name: path.read_text() for path in tree.iterdir()}, sources=sources
        )
        return types.SimpleNamespace(set_single_stream=lambda on: built.update(single_stream=on))

    monkeypatch.setattr(cpp_extension, "load", load)
    ab_kernels.build(variant, "avx2", streamed=True)
    assert built["name"] == "baichuan_ab_try_avx2"
    assert [Path(source).name for source in built["sources"]] == [source.name for source in SOURCES]
    assert built["files"]["cpu_gemv_int8.cpp"] == "// the variant's int8 source\n"
    assert built["files"]["gemv.h"] == "// the variant's header\n"
    assert built["files"]["cpu_gemv_int4.cpp"] == (CSRC / "cpu_gemv_int4.cpp").read_text()
    assert built["files"]["kernels.h"] == (CSRC / "kernels.h").read_text()
    assert built["single_stream"] is True

    (variant / "cpu_gemv_old.cpp").write_text("")
    with pytest.raises(SystemExit, match=r"cpu_gemv_old\.cpp not among the files of .*csrc"):
        ab_kernels.build(variant, "avx2")
    with pytest.raises(SystemExit, match="is not a directory"):
        ab_kernels.build(tmp_path / "absent", "avx2")


def test_ab_kernels_times_the_amx_kernels_batches_take_with_amx():
    """--amx times the kernel a batch of each weight format goes to on an AMX CPU, not the mat-vec."""
    ab_kernels = benchmark_script("ab_kernels")
    calls = []

    def kernel(name):
        return lambda *operands: calls.append((name, len(operands)))

    names = (
        "bf16_gemv",
        "int8_gemv",
        "int4_gemv",
        "amx_bf16_matmul",
        "amx_int8_int16_matmul",
        "amx_int4_matmul",
    )
    module = types.SimpleNamespace(**{name: kernel(name) for name in names})
    x = torch.zeros(8, 64)
    for amx in (False, True):
        ab_kernels.product(module, "bf16", x, (None,), 32, amx)
        ab_kernels.product(module, "int8", x, (None, None), 32, amx)
        ab_kernels.product(module, "int4", x, (None, None), 32, amx)
    assert calls == [
        ("bf16_gemv", 2),
        ("int8_gemv", 3),
        ("int4_gemv", 4),
        ("amx_bf16_matmul", 2),
        ("amx_int8_int16_matmul", 3),
        ("amx_int4_matmul", 4),
    ]
