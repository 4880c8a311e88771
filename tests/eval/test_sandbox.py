"""The code sandbox: it passes a correct program and fails a wrong one, refuses the network (a server in this
process hears nothing), kills an infinite loop, a sleeper and a memory bomb, caps output, and runs in a fresh
temporary directory that is gone afterwards."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from baichuan.eval.sandbox import Limits, describe, network_namespace, run_many, run_python
from tests.conftest import skip_platform


def test_correct_program_passes_and_wrong_one_fails():
    good = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n"
    outcome = run_python(good)
    assert outcome.passed and outcome.returncode == 0 and outcome.output == "ok\n"
    wrong = run_python(good.replace("a + b", "a - b"))
    assert wrong.status == "failed" and wrong.returncode == 1 and "AssertionError" in wrong.output
    crash = run_python("def f(:\n")
    assert crash.status == "failed" and "SyntaxError" in crash.output


@pytest.fixture
def listener():
    """A TCP server on this machine's loopback that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def _connect(port: int) -> str:
    return (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
    )


@pytest.mark.parametrize("network", ["auto", "hook"])
def test_network_is_refused(listener, network):
    port, accepted = listener
    # The server is reachable from here: the test would see a leak.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
        probe.sendall(b"here")
    deadline = time.monotonic() + 5
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert accepted == [b"here"]

    outcome = run_python(_connect(port), Limits(network=network))
    assert outcome.status == "failed"
    assert "PermissionError: sandbox: socket." in outcome.output
    dns = run_python("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n")
    assert dns.status == "failed" and "sandbox: socket." in dns.output
    time.sleep(0.5)
    assert accepted == [b"here"]


def test_network_namespace_alone_refuses_the_network(listener):
    """The kernel layer without the audit hook: a plain interpreter under `unshare -rn` reaches nothing."""
    prefix = network_namespace()
    if not prefix:
        skip_platform(
            "unprivileged network namespaces (unshare -rn) are not allowed here; the hook stands alone"
        )
    port, accepted = listener
    code = _connect(port)
    run = subprocess.run(
        [*prefix, sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30
    )
    assert run.returncode != 0 and ("OSError" in run.stderr or "Error" in run.stderr)
    time.sleep(0.5)
    assert accepted == []
    assert describe(Limits())["network"].startswith("network namespace (unshare -rn)")


def test_process_creation_is_refused():
    outcome = run_python("import subprocess\nsubprocess.run(['true'])\n")
    assert outcome.status == "failed" and "sandbox: subprocess.Popen is not allowed" in outcome.output
    outcome = run_python("import os\nos.system('true')\n")
    assert outcome.status == "failed" and "sandbox: os.system is not allowed" in outcome.output


def test_signals_to_other_processes_are_refused():
    outcome = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n")
    assert outcome.status == "failed" and "sandbox: os.kill is not allowed" in outcome.output


def test_file_system_changes_outside_the_working_directory_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os\nos.remove({str(victim)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/new.txt', 'w')",
        "import os\nos.chdir('..')\nopen('escaped.txt', 'w')",
    ):
        outcome = run_python(code + "\n")
        assert (
            outcome.status == "failed" and "outside the working directory is not allowed" in outcome.output
        ), code
    assert victim.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    # Inside it, a program may write, rename and remove as it likes, and read anything.
    inside = (
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.mkdir('d')\n"
        f"os.remove('b.txt')\ntempfile.NamedTemporaryFile().write(b'x')\nprint(open({str(victim)!r}).read())\n"
    )
    outcome = run_python(inside)
    assert outcome.passed and outcome.output == "precious\n", outcome.output


def test_infinite_loop_is_killed_at_the_cpu_limit():
    start = time.monotonic()
    outcome = run_python("while True:\n    pass\n", Limits(cpu_s=1, timeout_s=60))
    assert outcome.status == "timeout" and outcome.returncode is not None and outcome.returncode < 0
    assert time.monotonic() - start < 30  # 1 s of CPU; the rest is waiting for a busy machine


def test_a_loop_that_ignores_sigxcpu_is_killed_at_the_hard_limit():
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n"
    outcome = run_python(code, Limits(cpu_s=1, timeout_s=60))
    assert outcome.status == "timeout" and outcome.returncode == -9


def test_a_sleeper_is_killed_at_the_wall_clock_limit():
    start = time.monotonic()
    outcome = run_python("import time\ntime.sleep(60)\n", Limits(timeout_s=1))
    assert outcome.status == "timeout" and outcome.returncode is None
    assert time.monotonic() - start < 10


def test_memory_bomb_fails_at_the_memory_limit():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"
    start = time.monotonic()
    outcome = run_python(bomb, Limits(memory_bytes=256 << 20))
    assert outcome.status == "failed" and "MemoryError" in outcome.output
    assert time.monotonic() - start < 30
    one_big = run_python("x = bytearray(8 << 30)\n", Limits(memory_bytes=256 << 20))
    assert one_big.status == "failed" and "MemoryError" in one_big.output


def test_output_is_capped():
    outcome = run_python("while True:\n    print('x' * 1000)\n", Limits(output_bytes=4096))
    assert outcome.status == "failed" and len(outcome.output) == 4096


def test_runs_in_a_fresh_temporary_directory_that_is_removed():
    code = "import os\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\nopen('left.txt', 'w').write('x')\n"
    first, second = run_many([code, code], workers=2)
    cwd, listing = first.output.splitlines()
    assert first.passed and "baichuan-sandbox-" in cwd and listing == "['program.py']"
    assert second.passed and second.output.splitlines()[0] != cwd  # each program its own directory
    assert not Path(cwd).exists() and not Path(second.output.splitlines()[0]).exists()


def test_run_many_keeps_order():
    outcomes = run_many([f"raise SystemExit({i % 2})" for i in range(6)], workers=3)
    assert [o.passed for o in outcomes] == [True, False] * 3


def test_numpy_imports_under_the_default_limits():
    # One BLAS thread per program: a pool per core would reserve more address space than RLIMIT_AS allows on
    # a many-core machine.
    outcome = run_python(
        "import numpy as np\nassert np.arange(4).sum() == 6\nimport os\nprint(os.environ['OPENBLAS_NUM_THREADS'])\n"
    )
    assert outcome.passed and outcome.output == "1\n"
