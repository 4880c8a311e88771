"""Runs untrusted Python (generated code and its tests) in a separate process with limits.

Each program runs as `python -I -B` (isolated: no user site, no PYTHON* variables; no .pyc written) in a fresh
temporary directory, in its own process group, with:
- a CPU-time limit (RLIMIT_CPU: SIGXCPU, then SIGKILL a second later), which a busy machine does not shorten,
  and a wall-clock limit for programs that wait rather than compute: at the deadline the whole process group is
  killed (SIGKILL);
- a memory limit: RLIMIT_AS, soft and hard, so an allocation past it raises MemoryError in the child;
- an output limit: stdout and stderr go to one file capped by RLIMIT_FSIZE (a write past it fails);
- no network, in two layers. Where the kernel allows unprivileged user namespaces, the child runs under
  `unshare -rn`: a network namespace of its own that holds only a loopback device, which is down, so no address
  outside the process is reachable. In every case an audit hook (PEP 578), installed before the program runs,
  refuses every `socket.*` event and process creation (os.system, exec, fork, spawn, subprocess). The hook alone
  guards against accidents, not against code written to escape (ctypes can go around it); the namespace is the
  wall, and `describe` says which layers a run had;
- the same hook refuses signals to other processes (os.kill) and, outside the working directory, opening files
  for writing and removing, renaming or changing them. Reading is not limited: the program runs as the
  evaluating user and sees what that user sees.

The limits are set in the child by a short guard script before the program is read, rather than in a
`preexec_fn`, which is unsafe in a threaded parent (programs run from a thread pool).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout"]


@dataclass(frozen=True)
class Limits:
    # HumanEval's check_correctness gives 3 s of wall clock. CPU time is the fairer measure on a machine busy
    # with the model (MBPP task 123's reference solution needs 3 s of CPU, which took 13 s of wall clock on a
    # loaded 2-core machine); the wall-clock limit only catches programs that sleep or block.
    cpu_s: int = 10
    timeout_s: float = 60.0
    memory_bytes: int = 1 << 30  # address space of the child (RLIMIT_AS)
    output_bytes: int = 64 << 10  # stdout + stderr (RLIMIT_FSIZE)
    # "auto": a network namespace where `unshare -rn` works, plus the audit hook; "hook": the audit hook only.
    network: Literal["auto", "hook"] = "auto"


@dataclass(frozen=True)
class Outcome:
    status: Status
    returncode: int | None  # None after the wall-clock timeout; -24 (SIGXCPU) or -9 past the CPU limit
    output: str  # the start of stdout + stderr, at most output_bytes
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The audit events refused in the child: every socket operation, starting another process (a program could
# otherwise reach the network through curl, or escape the time limit by a detached child), and signalling one
# (such as the evaluation that runs it: HumanEval's reliability_guard disables os.kill for the same reason).
_BLOCKED_EVENTS = (
    "socket.",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "os.kill",
    "os.killpg",
)
# Events that change the file system -> how many of their first arguments are paths. They, and opening a file
# for writing, are refused outside the working directory: the program runs as the evaluating user, and a
# generated `shutil.rmtree(os.path.expanduser("~"))` must not get far.
_PATH_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "shutil.rmtree": 1,
    "os.mkdir": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.truncate": 1,
    "os.utime": 1,
    "os.rename": 2,
    "os.link": 2,
    "os.symlink": 2,
}

# Run as `python -I -B -c GUARD <cpu> <memory> <output> <program>`: limits, then the hook, then the program.
_GUARD = f"""\
import os, resource, sys
cpu, memory, output, program = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def refuse(event, args, blocked={_BLOCKED_EVENTS!r}, path_events={_PATH_EVENTS!r},
           home=os.path.realpath(os.getcwd()), write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND,
           realpath=os.path.realpath, fsdecode=os.fsdecode, sep=os.sep):
    if event.startswith(blocked):
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if mode is not None else bool(flags & write_flags)
        paths = [path] if writes else []
    else:
        paths = args[: path_events.get(event, 0)]
    for path in paths:
        if isinstance(path, int) or path is None:  # an open descriptor
            continue
        full = realpath(fsdecode(path))
        if full != home and not full.startswith(home + sep):
            raise PermissionError(f"sandbox: {{event}} of {{full}} outside the working directory is not allowed")

sys.addaudithook(refuse)
del os, resource, refuse, cpu, memory, output
sys.argv = [program]
import runpy
runpy.run_path(program, run_name="__main__")
"""


@functools.cache
def network_namespace() -> tuple[str, ...]:
    """The command prefix that gives a child no network (`unshare -rn`), or () where this kernel or container
    does not allow an unprivileged network namespace (then only the audit hook guards the network)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def describe(limits: Limits) -> dict:
    """The sandbox settings of a run, for its result file."""
    namespace = limits.network == "auto" and bool(network_namespace())
    return {
        "cpu_s": limits.cpu_s,
        "timeout_s": limits.timeout_s,
        "memory_bytes": limits.memory_bytes,
        "output_bytes": limits.output_bytes,
        "network": ("network namespace (unshare -rn) + " if namespace else "")
        + "audit hook refusing socket.* and process creation",
        "python": f"{sys.executable} -I -B",
    }


def run_python(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a Python program under `limits`; passed means it exited with status 0 in time (a
    timeout is one past either time limit)."""
    prefix = network_namespace() if limits.network == "auto" else ()
    with tempfile.TemporaryDirectory(prefix="baichuan-sandbox-") as tmp:
        work = Path(tmp, "work")
        work.mkdir()
        program = work / "program.py"
        program.write_text(source, encoding="utf-8")
        command = [*prefix, sys.executable, "-I", "-B", "-c", _GUARD]
        command += [str(limits.cpu_s), str(limits.memory_bytes), str(limits.output_bytes), str(program)]
        env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        # One thread per program: they run many at a time, and a BLAS library that starts a pool per core
        # (numpy's OpenBLAS) reserves address space per thread, which the memory limit would refuse.
        env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
        output_path = Path(tmp, "output.txt")
        start = time.monotonic()
        with open(output_path, "wb") as output:
            proc = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so that a timeout kills all it started
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                # The leader is not reaped yet, so the group id is still ours to kill.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        seconds = time.monotonic() - start
        with open(output_path, "rb") as f:
            text = f.read(limits.output_bytes).decode("utf-8", errors="replace")
    if returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status: Status = "timeout"
    else:
        status = "passed" if returncode == 0 else "failed"
    return Outcome(status, returncode, text, seconds)


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """`run_python` over many programs, `workers` at a time (default: the CPU count), results in order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda source: run_python(source, limits), sources))
