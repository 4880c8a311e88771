"""Peak resident memory of loading a checkpoint, as a ratio to the bytes of its weights.

    python benchmarks/bench_load_memory.py --layers 6          # a ~4.5 GB Baichuan2-7B-shaped checkpoint

Each load runs in a fresh child process that then reads every weight once (memory-mapped loads fault their
pages in only when read) and reports its peak RSS (ru_maxrss) minus the RSS it had after importing torch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
import baichuan
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
kind, directory = sys.argv[1], sys.argv[2]
if kind == "baichuan":
    from baichuan.checkpoint import load_model
    model = load_model(directory, dtype=torch.bfloat16)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
seconds = time.perf_counter() - t
# Touch every weight: loaders that memory-map their files only fault pages in when they are read.
with torch.no_grad():
    for p in model.parameters():
        p.sum()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"extra_rss": (peak - base) * 1024, "weights": weights, "seconds": seconds}))
"""


def measure(kind: str, directory: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(directory)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="baichuan2-7b")
    parser.add_argument("--layers", type=int, default=6, help="layers of the checkpoint (the size knob)")
    parser.add_argument("--dir", type=Path, default=None, help="re-use or create the checkpoint here")
    parser.add_argument("--transformers", action="store_true", help="also measure AutoModelForCausalLM")
    args = parser.parse_args()

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    if not (directory / "config.json").exists():
        t = time.perf_counter()
        init_checkpoint(preset(args.preset).replace(n_layers=args.layers), directory)
        print(f"created {directory} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    kinds = ["baichuan"] + (["transformers"] if args.transformers else [])
    print("| loader | weights GB | peak extra RSS GB | ratio | seconds |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        r = measure(kind, directory)
        print(
            f"| {kind} | {r['weights'] / 1e9:.2f} | {r['extra_rss'] / 1e9:.2f} | {r['extra_rss'] / r['weights']:.2f}x "
            f"| {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
