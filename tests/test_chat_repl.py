"""The terminal chat, driven for real in tmux: type, read the streamed answer, /clear, Ctrl-C, /exit."""

import shutil
import subprocess
import sys
import time
import uuid

import pytest
from safetensors.torch import load_file, save_file

from baichuan.config import preset
from baichuan.scaffold import init_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def wait_for(session, text, count=1, timeout=120.0):
    """Wait until `text` shows `count` times in the pane and its scrollback.

    `-J` joins the lines the terminal wrapped, so a marker split at the right edge still matches."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", session], capture_output=True, text=True
        ).stdout
        if screen.count(text) >= count:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear {count} time(s); screen:\n{screen}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "tiny"
    config = preset("baichuan2-7b").replace(n_layers=2, dim=64, n_heads=4, ffn_dim=128, vocab_size=4096)
    init_checkpoint(config, directory)
    # A zero head row gives </s> logit 0, never in the top 5 of 4096 random logits: answers run until Ctrl-C,
    # whatever the random stream, so the test cannot race an answer that ends by itself.
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"][config.eos_token_id] = 0
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_chat_session_in_tmux(checkpoint):
    session = f"bc-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m baichuan.cli chat --model {checkpoint} --max-new-tokens 4000 --seed 0"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True)
    try:
        wait_for(session, "User:")
        subprocess.run(["tmux", "send-keys", "-t", session, "你好，百川！", "Enter"], check=True)
        wait_for(session, "Baichuan:")
        # A long random answer is streaming: Ctrl-C stops it without leaving the program.
        time.sleep(1.0)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_for(session, "(stopped)")
        # The program is still running: it asks for the next message.
        wait_for(session, "User:", count=2, timeout=30)
        subprocess.run(["tmux", "send-keys", "-t", session, "/clear", "Enter"], check=True)
        wait_for(session, "conversation cleared")
        subprocess.run(
            ["tmux", "send-keys", "-t", session, "line one \\", "Enter", "line two", "Enter"], check=True
        )
        wait_for(session, "Baichuan:", count=2)
        assert "..." in wait_for(session, "line two")
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_for(session, "(stopped)", count=2)
        subprocess.run(["tmux", "send-keys", "-t", session, "/exit", "Enter"], check=True)
        wait_for(session, "bye")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_control_characters_in_an_answer_show_as_symbols():
    """A model's answer reaches the terminal as text: an escape sequence (a byte-fallback token can be ESC) must
    not clear the screen or swallow what follows, as an OSC sequence left open would swallow '(stopped)'."""
    from baichuan.chat import terminal_safe

    assert terminal_safe("a\x1b]0;title\x07b\rc\x00d\x7fe\x9bf") == "a␛]0;title␇b␍c␀d␡e\ufffdf"
    assert terminal_safe("百川\n\tline") == "百川\n\tline"  # newlines, tabs and text pass
