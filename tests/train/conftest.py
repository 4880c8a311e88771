"""Fixtures of the training tests: a small tokenizer directory and a prepared token directory."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def repo_env() -> dict[str, str]:
    """The environment for child processes: this checkout's `baichuan` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it for several processes; see one_thread below
    return env


def run_processes(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`command` (a launcher and its workers, or one process) with this checkout first on the path, in a session
    of its own. Past `timeout` the whole session is killed, not just the launcher (whose orphaned workers would
    otherwise run on beside the rest of the suite), and the test fails with what was still alive and where it
    waited, and the end of its output."""
    with subprocess.Popen(
        command, env=repo_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            alive = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,etime,wchan:24,args", "-g", str(process.pid)],
                capture_output=True, text=True,
            ).stdout  # fmt: skip
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(
                f"still running after {timeout:g} s: {' '.join(command)}\nprocesses:\n{alive}\n"
                f"stderr (end):\n{stderr[-3000:]}\nstdout (end):\n{stdout[-1000:]}"
            )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """`baichuan init`'s small tokenizer (4,000 pieces, trained on built-in text) as a tokenizer directory."""
    from baichuan.scaffold import tokenizer_model
    from baichuan.train.tokenizer import tokenizer_files

    directory = tmp_path_factory.mktemp("tokenizer")
    for name, content in tokenizer_files(tokenizer_model()).items():
        (directory / name).write_bytes(content)
    return directory


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A prepared token directory of generated English/Chinese/number lines (about 60k tokens)."""
    from baichuan.scaffold import sample_text
    from baichuan.train.data import prepare_data

    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    (root / "text" / "sample.txt").write_text(
        "\n".join(line.replace("\n", " ") for line in sample_text(3000, seed=1)) + "\n", encoding="utf-8"
    )
    prepare_data([root / "text"], tokenizer_dir, root / "data", workers=1)
    return root / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on a busy 2-core machine two threads waiting on each other
    cost 50x (0.8 s instead of 15 ms a step)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
