"""The memory estimate `generate`, `chat` and `serve` print before loading, next to the measured peak.

    python benchmarks/bench_memory_estimate.py DIR [DIR ...] [--flags "--dtype fp32" --flags "--quantize 4"]

For each checkpoint directory and each set of extra flags, runs `baichuan generate -m DIR -p PROMPT --greedy
--max-new-tokens 32 FLAGS` in a child process, reads the estimate from its "memory: ~X GiB" line, and measures
its peak RSS (the child's ru_maxrss, from wait4) and the peak of its anonymous memory (RssAnon, sampled every 10 ms from
/proc). The difference between the two is file pages: memory-mapped weights and torch's shared libraries,
which the kernel can drop under pressure. Make shapes with e.g.

    baichuan init --preset baichuan2-7b --layers 8 --hidden 1024 --heads 8 --ffn 2816 DIR
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, how are you today?"


def rss_anon(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^RssAnon:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else None


def measure(directory: str, flags: list[str]) -> tuple[float, float, float]:
    """(estimate, peak RSS, peak anonymous RSS) in GiB."""
    command = [sys.executable, "-m", "baichuan.cli", "generate", "-m", directory, "-p", PROMPT]
    command += ["--greedy", "--max-new-tokens", "32", *flags]
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak_anon = 0
        while True:
            done, status, usage = os.wait4(child.pid, os.WNOHANG)  # the rusage of this child alone
            if done:
                break
            peak_anon = max(peak_anon, rss_anon(child.pid) or 0)
            time.sleep(0.01)
        log.seek(0)
        stderr = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    found = re.search(r"^memory: ~([\d.]+) GiB", stderr, re.M)
    if found is None:
        raise SystemExit(f"no memory line in:\n{stderr}")
    return float(found.group(1)), usage.ru_maxrss / 2**20, peak_anon / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="+")
    parser.add_argument("--flags", action="append", default=None, help="extra generate flags, one run each")
    args = parser.parse_args()
    print(f"{'checkpoint':<24} {'flags':<16} {'estimate':>9} {'peak RSS':>9} {'peak anon':>10}")
    for directory in args.directories:
        for flags in args.flags or [""]:
            estimate, peak, anon = measure(directory, flags.split())
            name = Path(directory).name
            print(f"{name:<24} {flags.strip() or '-':<16} {estimate:>8.2f}G {peak:>8.2f}G {anon:>9.2f}G")


if __name__ == "__main__":
    main()
