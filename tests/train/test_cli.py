"""The training commands end to end on tiny inputs: train-tokenizer -> prepare-data -> pretrain (-> resume)
-> tokenizer-stats, the checkpoint then loading in `baichuan generate`; and one clear line for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from baichuan.cli import app
from baichuan.scaffold import sample_text

runner = CliRunner()
COMMANDS = ["train-tokenizer", "tokenizer-stats", "prepare-data", "pretrain"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_main_help_lists_the_training_commands():
    result = runner.invoke(app, ["--help"])
    assert all(command in result.output for command in COMMANDS)


def invoke(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_tokenizer_data_pretrain_resume_generate(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("\n".join(s.replace("\n", " ") for s in sample_text(2000)) + "\n\n\xa0\n")
    (text / "b.jsonl").write_text(json.dumps({"text": "数据 12 data"}) + "\n{bad\n", encoding="utf-8")
    tok = tmp_path / "tok"
    out = invoke(
        [
            "train-tokenizer",
            "--input",
            str(text),
            "--vocab-size",
            "4000",
            "--out",
            str(tok),
            "--input-sentence-size",
            "1000",
        ]
    )
    assert "a uniform sample of 1,000 of 2,001 lines" in out and f"wrote {tok}" in out
    data = tmp_path / "data"
    out = invoke(
        [
            "prepare-data",
            "--input",
            str(text),
            "--tokenizer",
            str(tok),
            "--out",
            str(data),
            "--workers",
            "2",
            "--val-every",
            "20",
        ]
    )
    assert "2,001 documents from 2 file(s)" in out and "held out" in out and "tokens/s" in out
    assert "b.jsonl:2: invalid JSON" in out and "2 empty" in out
    run = tmp_path / "run"
    flags = ["pretrain", "--data", str(data), "--tokenizer", str(tok), "--out", str(run), "--layers", "1", "--hidden", "32",
             "--heads", "2", "--ffn", "64", "--seq-len", "32", "--batch-size", "2", "--save-every", "2", "--log-every", "1",
             "--no-tensorboard", "--no-plot"]  # fmt: skip
    out = invoke([*flags, "--max-steps", "2", "--no-progress"])
    assert "precision: " in out and "step 2/2" in out and "last checkpoint" in out
    out = invoke([*flags, "--max-steps", "4", "--resume", "--progress"])
    assert "resumed from" in out and "(step 2)" in out
    assert len((run / "loss.csv").read_text().splitlines()) == 5
    checkpoint = run / "checkpoints" / "step-00000004"
    out = invoke(
        [
            "generate",
            "-m",
            str(checkpoint),
            "-p",
            "the",
            "--max-new-tokens",
            "3",
            "--greedy",
            "--dtype",
            "fp32",
        ]
    )
    out = invoke(
        ["tokenizer-stats", "--tokenizer", str(tok), "--tokenizer", str(checkpoint), "--text", str(text)]
    )
    assert "lines of" in out and " Chinese and " in out and " English characters" in out


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.toml").write_text('data = "nowhere"\n')
    result = runner.invoke(app, ["pretrain", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 1 and "nowhere" in result.output and "meta.json" in result.output
    result = runner.invoke(app, ["pretrain", "--config", str(tmp_path / "c.toml"), "--strategy", "zero"])
    assert result.exit_code == 1 and "--strategy must be one of ddp, fsdp" in result.output


def test_bad_input_is_one_line(tmp_path):
    result = runner.invoke(
        app,
        [
            "prepare-data",
            "--input",
            str(tmp_path / "none"),
            "--tokenizer",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    (tmp_path / "a.txt").write_text("一二三四五六七八九十" * 50 + "\n")
    result = runner.invoke(
        app,
        [
            "train-tokenizer",
            "--input",
            str(tmp_path / "a.txt"),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 1 and "Vocabulary size is smaller than required_chars" in result.output
