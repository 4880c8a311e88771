"""Pretraining: settings from flags or a file, a checkpoint that loads as it is, continued pretraining, and
2 processes (torchrun, gloo, DDP and FSDP2) giving the losses of 1 with the same global batch."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from baichuan.checkpoint import load_model
from baichuan.config import ConfigError
from baichuan.train.pretrain import PretrainConfig, load_config_file, pretrain
from tests.conftest import skip_platform
from tests.train.conftest import run_processes

TINY = dict(layers=2, hidden=64, heads=4, ffn=128, seq_len=32, lr=3e-3, log_every=100)
QUIET = dict(progress=False, tensorboard=False, plot=False, precision="fp32")


def losses(out) -> list[float]:
    with open(out / "loss.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_config_file_yaml_and_toml(tmp_path):
    (tmp_path / "a.yaml").write_text("seq-len: 128\nlayers: 2\nnorm_head: false\n")
    (tmp_path / "a.toml").write_text('seq_len = 128\nlayers = 2\nnorm_head = false\npreset = "baichuan-7b"\n')
    assert load_config_file(tmp_path / "a.yaml") == {"seq_len": 128, "layers": 2, "norm_head": False}
    assert load_config_file(tmp_path / "a.toml")["preset"] == "baichuan-7b"
    (tmp_path / "b.yaml").write_text("sequence_length: 1\n")
    with pytest.raises(ConfigError, match="unknown setting.*sequence_length"):
        load_config_file(tmp_path / "b.yaml")


def test_pretrain_writes_official_checkpoints(tmp_path, data_dir, tokenizer_dir):
    cfg = PretrainConfig(
        data=str(data_dir),
        tokenizer=str(tokenizer_dir),
        out=str(tmp_path),
        max_steps=4,
        batch_size=2,
        save_every=2,
        **TINY,
        **QUIET,
    )
    result = pretrain(cfg, say=lambda _: None)
    step = tmp_path / "checkpoints" / "step-00000004"
    assert result.last_checkpoint == step
    names = {p.name for p in step.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    model = load_model(step)
    # Baichuan2 preset: NormHead and the max-z loss on by default; the vocabulary is the tokenizer's.
    assert model.config.norm_head and model.config.z_loss_weight == 2e-4 and model.config.vocab_size == 4000
    # Continued pretraining from that checkpoint.
    more = PretrainConfig(
        data=str(data_dir),
        init_from=str(step),
        out=str(tmp_path / "more"),
        max_steps=2,
        batch_size=2,
        seq_len=32,
        lr=1e-3,
        **QUIET,
    )
    again = pretrain(more, say=lambda _: None)
    assert (
        len(again.losses) == 2 and again.losses[0] < 7.0
    )  # starts from the trained weights, not ln(4000)=8.3


def run_cli(args: list[str], nproc: int, timeout: int = 120) -> subprocess.CompletedProcess:
    if nproc > 1:
        # --standalone: a rendezvous on a free local port
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command = [*prefix, "-m", "baichuan.cli", *args]
    else:
        command = [sys.executable, "-m", "baichuan.cli", *args]
    return run_processes(command, timeout)


COMMON = [
    "pretrain", "--preset", "baichuan2-7b", "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "128",
    "--seq-len", "32", "--max-steps", "4", "--lr", "3e-3", "--precision", "fp32", "--no-progress",
    "--no-tensorboard", "--no-plot", "--seed", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("one")
    data = ["--data", str(data_dir), "--tokenizer", str(tokenizer_dir)]
    one = run_cli([*COMMON, *data, "--batch-size", "4", "--out", str(out)], nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, data_dir, tokenizer_dir, one_process, strategy):
    data = ["--data", str(data_dir), "--tokenizer", str(tokenizer_dir)]
    two = run_cli(
        [*COMMON, *data, "--batch-size", "2", "--strategy", strategy, "--out", str(tmp_path)], nproc=2
    )
    if "cannot run FSDP2 on CPU" in two.stderr:
        skip_platform(f"torch {torch.__version__} runs FSDP2 only with CUDA")
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"2 rank(s) (128 tokens a step); device cpu, {strategy.upper()}" in two.stderr + two.stdout
    np.testing.assert_allclose(losses(tmp_path), losses(one_process), rtol=1e-5)
    a = load_model(one_process / "checkpoints" / "step-00000004").state_dict()
    b = load_model(tmp_path / "checkpoints" / "step-00000004").state_dict()
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
