"""Bad input to the real `baichuan` command: one line on stderr, a non-zero exit, never a traceback, and before
the weights are read. Run with -s to see each case's line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from baichuan.config import preset
from baichuan.scaffold import init_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=4096, max_seq_len=256)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("errors") / "tiny"
    init_checkpoint(preset("baichuan2-7b").replace(**TINY), directory, dtype=torch.float32)
    return directory


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_bytes(data)


def thirteen_b_without_weights(directory: Path) -> None:
    """A Baichuan2-13B directory whose weights are a 27 GB sparse file of zeros: reading it would take minutes
    (or fail on its header), so a failure that names the flag proves the flag was checked first."""
    config = preset("baichuan2-13b").to_hf_dict()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").unlink()
    with open(directory / "model.safetensors", "wb") as f:
        f.truncate(27 * 10**9)


def huge_context(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["model_max_length"] = config["max_position_embeddings"] = 10**11
    (directory / "config.json").write_text(json.dumps(config))


@dataclass
class Case:
    args: list  # after `generate -m DIR` (str or bytes)
    damage: Callable[[Path], None] | None = None
    stdin: bytes | None = None
    says: str = ""  # a piece of the expected line
    command: str = "generate"


CASES = {
    "prompt-argv-not-utf8": Case(["-p", b"caf\xe9 au lait"], says="--prompt is not valid UTF-8"),
    "prompt-stdin-not-utf8": Case(
        ["-p", "-"], stdin=b"hello \xff\xfe", says="standard input is not valid UTF-8"
    ),
    "device-tpu": Case(["-p", "hi", "--device", "tpu"], says="unknown device 'tpu'"),
    "dtype-fp8": Case(["-p", "hi", "--dtype", "fp8"], says="unknown dtype"),
    "kv-dtype-int8": Case(["-p", "hi", "--kv-dtype", "int8"], says="unknown KV cache dtype"),
    "quantize-3": Case(["-p", "hi", "--quantize", "3"], says="--quantize takes 8 or 4"),
    "heads-0": Case(
        ["-p", "hi"], edit_json("config.json", lambda c: {**c, "num_attention_heads": 0}), says="config.json"
    ),
    "config-is-a-list": Case(["-p", "hi"], edit_json("config.json", lambda c: [c]), says="got a JSON array"),
    "config-not-json": Case(["-p", "hi"], write("config.json", b"{oops"), says="config.json: not valid JSON"),
    "generation-config-bad-type": Case(
        ["-p", "hi"],
        edit_json("generation_config.json", lambda c: {**c, "temperature": "hot"}),
        says="generation_config.json: temperature must be a number",
    ),
    "generation-config-bad-eos": Case(
        ["-p", "hi"],
        edit_json("generation_config.json", lambda c: {**c, "eos_token_id": "</s>"}),
        says="generation_config.json: eos_token_id must be a token id",
    ),
    "generation-config-broken": Case(
        ["-p", "hi"], write("generation_config.json", b'{"temperature": 0.3,'), says="generation_config.json"
    ),
    "tokenizer-config-broken": Case(
        ["-p", "hi"], write("tokenizer_config.json", b"\x00\xff"), says="tokenizer_config.json"
    ),
    "tokenizer-config-bad-type": Case(
        ["-p", "hi"],
        edit_json("tokenizer_config.json", lambda c: {**c, "add_bos_token": "yes"}),
        says="tokenizer_config.json: add_bos_token must be true or false",
    ),
    "tokenizer-model-broken": Case(
        ["-p", "hi"], write("tokenizer.model", b"not a model"), says="tokenizer.model"
    ),
    "temperature-negative-13b": Case(
        ["-p", "hi", "--temperature", "-1"], thirteen_b_without_weights, says="--temperature must be >= 0"
    ),
    "max-new-tokens-negative": Case(
        ["-p", "hi", "--max-new-tokens", "-5"], says="--max-new-tokens must be >= 0"
    ),
    "prompt-fills-context": Case(["-p", "hello " * 300], says="fills the 256-token context"),
    "kv-cache-beyond-memory": Case(
        ["-p", "hi", "--max-seq-len", str(10**11), "--max-new-tokens", str(10**11 - 100)],
        huge_context,
        says="not enough memory",
    ),
    "chat-kv-cache-beyond-memory": Case(
        ["--max-seq-len", str(10**11)], huge_context, says="not enough memory", command="chat"
    ),
}


def run_cli(args: list, stdin: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "baichuan.cli", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_before_loading(tiny_dir, tmp_path, case):
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir, directory)
    if case.damage is not None:
        case.damage(directory)
    started = time.monotonic()
    out = run_cli([case.command, "-m", str(directory), *case.args], case.stdin)
    elapsed = time.monotonic() - started
    stderr = out.stderr.decode("utf-8", "replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"\n{case.command} {' '.join(map(str, case.args))[:60]} -> {stderr.strip()}")
    assert out.returncode != 0
    assert "Traceback" not in stderr + out.stdout.decode("utf-8", "replace")
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and case.says in lines[0], lines[0]
    assert "tensors" not in stderr  # failed before the weights were read (no progress line)
    assert elapsed < 60


def test_max_new_tokens_beyond_the_context_are_cut_with_a_note(tiny_dir):
    out = run_cli(["generate", "-m", str(tiny_dir), "-p", "hi", "--greedy", "--max-new-tokens", "100000000"])
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    assert "--max-new-tokens 100,000,000 cut to 25" in stderr  # the 256-token context less the prompt


def test_a_context_that_does_not_fit_is_shortened_when_not_fixed(tiny_dir, tmp_path):
    """With a 10^11-position context in config.json and no --max-seq-len, the run picks what fits and says so."""
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir, directory)
    huge_context(directory)
    out = run_cli(["chat", "-m", str(directory), "--greedy"], stdin=b"/exit\n")
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    assert "does not fit" in stderr and "running with --max-seq-len" in stderr, stderr
    assert "Traceback" not in stderr


def test_loading_prints_progress_lines_when_not_a_terminal(tiny_dir):
    out = run_cli(["generate", "-m", str(tiny_dir), "-p", "hi", "--greedy", "--max-new-tokens", "2"])
    stderr = out.stderr.decode()
    assert out.returncode == 0, stderr
    assert "layer 1/2" in stderr and "layer 2/2" in stderr and "tensors read" in stderr
    quantized = run_cli(
        ["generate", "-m", str(tiny_dir), "-p", "hi", "--greedy", "--max-new-tokens", "2", "--quantize", "8"]
    )
    assert quantized.returncode == 0, quantized.stderr.decode()
    assert "quantizing to int8" in quantized.stderr.decode() and "layer 2/2" in quantized.stderr.decode()


def test_chat_repl_refuses_a_line_that_is_not_utf8_and_goes_on():
    """The REPL reads with errors="surrogateescape" (so a bad byte arrives as a surrogate), or a stream may
    raise UnicodeDecodeError: either way one error line, the message is not sent, and the next one is read."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from baichuan import chat as repl
    from baichuan.chat_format import BAICHUAN2
    from baichuan.generate import SamplingConfig

    lines = iter(["caf\udce9", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "/exit"])

    def fake_input(prompt=""):
        line = next(lines)
        if isinstance(line, Exception):
            raise line
        return line

    out = io.StringIO()
    console = Console(file=out, width=200)
    console.input = fake_input
    model = SimpleNamespace(config=preset("baichuan2-7b"))  # never called: nothing is sent
    loaded = SimpleNamespace(model=model, tokenizer=None, chat_format=BAICHUAN2, note="note", kv_dtype=None)
    repl.run(loaded, SamplingConfig(), console=console)
    text = out.getvalue()
    assert "that message is not valid UTF-8 (byte 0xe9 at character 3); it was not sent" in text
    assert "that message is not valid UTF-8 (invalid start byte); it was not sent" in text
    assert text.rstrip().endswith("bye")
