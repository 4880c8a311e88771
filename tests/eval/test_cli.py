"""`baichuan eval` and `baichuan eval-curve` on a tiny checkpoint: the files they write, and bad input as one line
with exit code 1."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from baichuan.cli import app

cli = CliRunner()


def test_eval_writes_results_with_everything_that_reproduces_them(checkpoint, data_root, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--model", str(checkpoint), "--tasks", "ceval,cmmlu_medical", "--data", str(data_root)]
    args += ["--limit", "1", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--dtype", "fp32"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ceval:" in result.stdout and "cmmlu_medical:" in result.stdout
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    model = results["model"]
    assert len(model["sha256"]) == 64 and "model.safetensors" in model["weight_files"]
    assert model["dtype"] == "float32" and model["quantize"] is None
    ceval = results["tasks"]["ceval"]
    assert ceval["n"] == 52 and ceval["settings"]["shot_seed"] == 1234 and ceval["settings"]["shots"] == 5
    assert "以下是中国关于{title}考试" in ceval["settings"]["prompt_format"]["header"]
    assert (out / "results.md").read_text(encoding="utf-8").startswith("# Evaluation of tiny")
    assert (out / "cache" / "checksums.json").is_file()
    # Run again: every subject comes from the cache, same results.
    again = cli.invoke(app, args)
    assert again.exit_code == 0
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["tasks"] == results["tasks"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "ceval,nosuch"], "unknown task nosuch"),
        (["--tasks", ","], "--tasks is empty"),
        (["--data", "/nonexistent/data"], "is not a directory"),
        (["--quantize", "3"], "--quantize takes 8 or 4"),
    ],
)
def test_bad_input_is_one_line(checkpoint, data_root, tmp_path, flags, message):
    args = ["eval", "--model", str(checkpoint), "--data", str(data_root), "--out", str(tmp_path), *flags]
    result = cli.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_missing_benchmark_folder_is_one_line(checkpoint, tmp_path):
    (tmp_path / "data").mkdir()
    args = ["eval", "--model", str(checkpoint), "--tasks", "mmlu", "--data", str(tmp_path / "data")]
    result = cli.invoke(app, [*args, "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "mmlu is missing" in result.stderr and "Traceback" not in result.output


def test_eval_curve_plots_scores_against_training_tokens(checkpoint, data_root, tmp_path):
    """Two checkpoints as pretraining writes them: one whose trainer_state.pt gives the tokens (step x global
    batch x sequence length), one whose tokens come from the run's loss.csv."""
    run = tmp_path / "run"
    first, second = run / "checkpoints" / "step-00000010", run / "checkpoints" / "step-00000020"
    shutil.copytree(checkpoint, first)
    shutil.copytree(checkpoint, second)
    torch.save(
        {"step": 10, "data": {"seed": 0, "seq_len": 128, "n_windows": 9, "global_batch": 4}},
        first / "trainer_state.pt",
    )
    with open(run / "loss.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "tokens", "loss"])
        writer.writeheader()
        writer.writerows(
            [{"step": 10, "tokens": 5120, "loss": 5.0}, {"step": 20, "tokens": 10240, "loss": 4.0}]
        )

    from baichuan.eval.curve import training_tokens

    assert training_tokens(first) == 10 * 4 * 128
    assert training_tokens(second) == 10240

    png = tmp_path / "curve.png"
    args = ["eval-curve", "--checkpoints", str(second), str(first), "--out", str(png)]  # as a glob lists them
    args += ["--tasks", "ceval_medical", "--data", str(data_root), "--limit", "1", "--device", "cpu"]
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5,120 tokens" in result.stdout and "10,240 tokens" in result.stdout
    assert (tmp_path / "curve" / "step-00000020" / "results.json").is_file()
    assert result.stdout.index("5,120 tokens") < result.stdout.index("10,240 tokens")  # in training order


def test_eval_curve_needs_checkpoints(tmp_path):
    result = cli.invoke(app, ["eval-curve", "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "name the checkpoints" in result.stderr


def test_eval_curve_refuses_a_checkpoint_without_token_counts(checkpoint, tmp_path):
    result = cli.invoke(
        app, ["eval-curve", "--checkpoints", str(checkpoint), "--out", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 1
    assert "cannot tell how many tokens" in result.stderr
