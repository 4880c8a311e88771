"""Peak resident memory of loading a checkpoint, as a ratio to the bytes of its weights.

    python benchmarks/bench_load_memory.py --layers 6          # a ~4.5 GB Baichuan2-7B-shaped checkpoint
    python benchmarks/bench_load_memory.py --preset baichuan2-13b --layers 40 --quantize 4 --skip-float
                                                                # the full 13B shape, loaded as int4

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
kind, directory, quantize = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
if kind == "baichuan":
    from baichuan.checkpoint import load_model
    model = load_model(directory, dtype=torch.bfloat16, quantize=quantize)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
seconds = time.perf_counter() - t
# Touch every weight: loaders that memory-map their files only fault pages in when they are read.
tensors = list(model.parameters()) + list(model.buffers())
with torch.no_grad():
    for p in tensors:
        p.sum()
generated = []
if kind == "baichuan" and quantize:  # show that the quantized model generates
    from baichuan.generate import SamplingConfig, generate_tokens
    generated = list(generate_tokens(model, [1, 2, 3, 4], SamplingConfig(max_new_tokens=3, eos_ids=())))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in tensors)
print(json.dumps({"extra_rss": (peak - base) * 1024, "weights": weights, "seconds": seconds, "generated": generated}))
"""


def measure(kind: str, directory: Path, quantize: int | None = None) -> dict:
    args = [sys.executable, "-c", CHILD, kind, str(directory), str(quantize or 0)]
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="baichuan2-7b")
    parser.add_argument("--layers", type=int, default=6, help="layers of the checkpoint (the size knob)")
    parser.add_argument("--dir", type=Path, default=None, help="re-use or create the checkpoint here")
    parser.add_argument("--transformers", action="store_true", help="also measure AutoModelForCausalLM")
    parser.add_argument("--quantize", type=int, choices=(8, 4), help="also load quantizing to 8 or 4 bits")
    parser.add_argument(
        "--skip-float", action="store_true", help="skip the bf16 load (too big for this machine)"
    )
    args = parser.parse_args()

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    if not (directory / "config.json").exists():
        t = time.perf_counter()
        init_checkpoint(preset(args.preset).replace(n_layers=args.layers), directory)
        print(f"created {directory} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    runs = [("baichuan", None)] * (not args.skip_float) + [("transformers", None)] * args.transformers
    runs += [("baichuan", args.quantize)] * bool(args.quantize)
    print("| loader | weights in memory GB | peak extra RSS GB | ratio | load seconds | generated |")
    print("|---|---|---|---|---|---|")
    for kind, quantize in runs:
        r = measure(kind, directory, quantize)
        label = f"{kind} int{quantize}" if quantize else f"{kind} bf16"
        ratio = r["extra_rss"] / r["weights"]
        print(
            f"| {label} | {r['weights'] / 1e9:.2f} | {r['extra_rss'] / 1e9:.2f} | {ratio:.2f}x "
            f"| {r['seconds']:.1f} | {r['generated'] or ''} |",
            flush=True,
        )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
