"""The `baichuan` command line: real runs on tiny checkpoints, and one clear line for bad input."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from baichuan.checkpoint import load_model, save_model
from baichuan.cli import app

runner = CliRunner()
TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "128", "--vocab", "4096"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = runner.invoke(app, ["init", "--preset", "baichuan2-13b", *TINY, str(directory)])
    assert result.exit_code == 0, result.output
    return directory


def test_init_writes_a_loadable_official_layout(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= names
    model = load_model(tiny_dir)
    assert model.config.position == "alibi" and model.config.norm_head and model.config.n_layers == 2


def test_init_refuses_non_empty_directory(tiny_dir):
    result = runner.invoke(app, ["init", str(tiny_dir)])
    assert result.exit_code == 1
    assert "not empty" in result.output and "Traceback" not in result.output


def test_init_unknown_preset(tmp_path):
    result = runner.invoke(app, ["init", "--preset", "gpt2", str(tmp_path / "x")])
    assert result.exit_code == 1 and "unknown preset" in result.output


def test_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "baichuan.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "init" in out.stdout


def test_generate_streams_text(tiny_dir):
    command = [
        "generate",
        "-m",
        str(tiny_dir),
        "-p",
        "你好",
        "--greedy",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
    ]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, command)
    assert again.stdout == result.stdout  # greedy is deterministic (stderr reports free memory)


def test_generate_chat_mode_and_stdin(tiny_dir):
    result = runner.invoke(
        app,
        ["generate", "-m", str(tiny_dir), "-p", "-", "--chat", "--seed", "3", "--max-new-tokens", "4"],
        input="hello\n",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "tokenizer.model").unlink(), "no tokenizer.model"),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:500]),
            "truncated or corrupt",
        ),
        (
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace('"baichuan"', '"gpt2"')
            ),
            "model_type",
        ),
    ],
    ids=["missing-tokenizer", "truncated-weights", "unknown-model-type"],
)
def test_generate_bad_checkpoint_is_one_clear_line(tiny_dir, tmp_path, damage, message):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    damage(broken)
    result = runner.invoke(app, ["generate", "--model", str(broken), "--prompt", "hi"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_generate_bad_sampling_value(tiny_dir):
    result = runner.invoke(app, ["generate", "-m", str(tiny_dir), "-p", "hi", "--top-p", "1.5"])
    assert result.exit_code == 1 and "--top-p must be in (0, 1]" in result.output


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command_and_quantized_generate(tiny_dir, tmp_path, bits):
    out = tmp_path / f"int{bits}"
    result = runner.invoke(
        app,
        ["quantize", "--model", str(tiny_dir), "--bits", str(bits), "--out", str(out), "--group-size", "32"],
    )
    assert result.exit_code == 0, result.output
    assert f"quantizing {tiny_dir} to int{bits}: layer 1/" in result.output  # progress off a terminal too
    assert load_model(out).quantization["bits"] == bits
    for directory, extra in ((out, []), (tiny_dir, ["--quantize", str(bits)])):
        result = runner.invoke(
            app, ["generate", "-m", str(directory), "-p", "hi", "--greedy", "--max-new-tokens", "4", *extra]
        )
        assert result.exit_code == 0, result.output


def test_quantize_command_rejects_bad_bits(tiny_dir, tmp_path):
    result = runner.invoke(
        app, ["quantize", "-m", str(tiny_dir), "--bits", "3", "--out", str(tmp_path / "q")]
    )
    assert result.exit_code == 1 and "bits" in result.output and "Traceback" not in result.output


def test_serve_command_answers_on_loopback(tiny_dir):
    import json
    import socket
    import time
    import urllib.request

    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baichuan.cli",
            "serve",
            "-m",
            str(tiny_dir),
            "--port",
            str(port),
            "--max-seq-len",
            "256",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                    models = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        assert models["data"][0]["id"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_engine_vllm_needs_vllm_and_a_gpu(tiny_dir):
    import importlib.util

    from baichuan.serve.vllm import vllm_argv

    argv = vllm_argv(tiny_dir, "127.0.0.1", 8001, "key", 4, 256, "tiny", "bf16")
    assert argv[:2] == ["--model", str(tiny_dir)] and "--max-num-seqs" in argv and "bfloat16" in argv
    if importlib.util.find_spec("vllm") is None:
        result = runner.invoke(app, ["serve", "-m", str(tiny_dir), "--engine", "vllm"])
        assert result.exit_code == 1 and "vLLM" in result.output and "Traceback" not in result.output


def _only_single_file(directory) -> bool:
    names = {p.name for p in directory.iterdir()}
    return "model.safetensors" in names and not [
        n for n in names if n.endswith(".index.json") or "-of-" in n or n.startswith(".")
    ]


def _three_shards(model, directory) -> None:
    save_model(model, directory, max_shard_bytes=400_000)  # embeddings | the layers | the head
    assert len(list(directory.glob("model-0000?-of-00003.safetensors"))) == 3


def test_init_force_over_a_sharded_checkpoint_loads_the_new_weights(tiny_dir, tmp_path):
    import torch

    from baichuan.checkpoint import read_config
    from baichuan.scaffold import random_weights

    directory = tmp_path / "model"
    old = load_model(tiny_dir)  # seed 0
    _three_shards(old, directory)
    result = runner.invoke(
        app,
        ["init", "--preset", "baichuan2-13b", *TINY, "--seed", "1", "--force"]
        + ["--tokenizer", str(tiny_dir / "tokenizer.model"), str(directory)],
    )
    assert result.exit_code == 0, result.output
    assert _only_single_file(directory)
    assert (directory / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    expected = dict(random_weights(read_config(directory), torch.bfloat16, seed=1))
    loaded = load_model(directory).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert not torch.equal(loaded["lm_head.weight"], old.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("into", ["another-directory", "itself"])
def test_quantize_force_over_a_sharded_checkpoint_loads_the_new_weights(tiny_dir, tmp_path, into):
    import shutil

    import torch

    source = tmp_path / "source"
    _three_shards(load_model(tiny_dir), source)
    for name in ("tokenizer.model", "generation_config.json"):
        shutil.copy(tiny_dir / name, source / name)
    out = source if into == "itself" else tmp_path / "out"
    if into != "itself":
        old = load_model(tiny_dir)
        with torch.no_grad():
            old.lm_head.weight.add_(1.0)
        _three_shards(old, out)
    expected = load_model(source, dtype=torch.bfloat16, quantize=8, group_size=32).state_dict()
    result = runner.invoke(
        app,
        ["quantize", "-m", str(source), "--bits", "8", "--out", str(out), "--group-size", "32", "--force"],
    )
    assert result.exit_code == 0, result.output
    assert _only_single_file(out)
    assert (out / "tokenizer.model").read_bytes() == (tiny_dir / "tokenizer.model").read_bytes()
    loaded = load_model(out)
    assert loaded.quantization["bits"] == 8
    state = loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
