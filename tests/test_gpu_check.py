"""The CPU rehearsal of benchmarks/gpu_check.sh: its report driver runs every section on tiny shapes and writes
the results file with every expected line, the GPU ones marked unmeasured (issue 16)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BENCHMARKS, benchmark_script, skip_platform


def gpu_report():
    return benchmark_script("gpu_report")


def test_script_parses():
    for script in ("gpu_check.sh", "gpu_check_deepspeed.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(BENCHMARKS / script)]).returncode == 0, script


def test_rehearsal_writes_every_line(tmp_path, monkeypatch):
    pytest.importorskip("openai")  # the handoff section asks `baichuan serve` through the real client
    from baichuan import cpu_gemv

    # torch's CPU kernels only: this checks the report, not our kernels (whose build would dominate its time).
    monkeypatch.setattr(cpu_gemv, "load", lambda: None)
    report = gpu_report()
    results = tmp_path / "results.txt"
    # All sections but cuda_tests, which in a rehearsal only collects tests/quant/test_cuda.py (10 s of imports).
    sections = [name for name in report.SECTIONS if name != "cuda_tests"]
    report.main([str(results), "--rehearse", "--in-process", "--only", ",".join(sections)])
    lines = results.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#") and "CPU REHEARSAL" in lines[0]
    found = dict(line.split(": ", 1) for line in lines if not line.startswith("#"))
    assert list(found) == report.EXPECTED_KEYS
    broken = {k: v for k, v in found.items() if "failed" in v or "ran past" in v or "did not report" in v}
    assert not broken, broken
    assert (
        found["decode.bf16.batch1"].startswith(report.UNMEASURED) and "tok/s" in found["decode.bf16.batch1"]
    )
    assert found["memory.baichuan2-7b.int4"].startswith(f"GPU after load {report.UNMEASURED}")
    assert "published 5.1 (5.1) GB" in found["memory.baichuan2-7b.int4"]
    assert found["vllm.refusal_quantized"].startswith("refused: vLLM cannot load")
    assert found["vllm.refusal_handoff_checkpoint"].startswith("accepted")
    assert "answered the openai client" in found["vllm.handoff_answers"]
    assert found["tests.pytest_cuda"] == "not measured: not run: left out by --only"
    assert all(found[k] == report.UNMEASURED for k in report.GOAL_KEYS)


def test_a_failing_section_costs_only_its_lines(tmp_path):
    report = gpu_report()
    results = tmp_path / "results.txt"
    # Without --rehearse and without CUDA, the GPU sections fail; env still reports.
    import torch

    if torch.cuda.is_available():
        skip_platform("this machine has CUDA: the sections would measure instead of failing")
    report.main([str(results), "--in-process", "--only", "env,bandwidth"])
    found = dict(line.split(": ", 1) for line in results.read_text().splitlines() if not line.startswith("#"))
    assert list(found) == report.EXPECTED_KEYS
    assert found["env.gpu"] == "none"
    assert found["bandwidth.hbm"].startswith("not measured: section bandwidth failed: RuntimeError: no CUDA")
    assert found["layers.rows1"] == "not measured: not run: left out by --only"
    assert found["goal.bf16_batch1_roofline"].startswith("not measured")
