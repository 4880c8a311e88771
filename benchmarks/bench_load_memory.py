"""Peak resident memory of loading a checkpoint, as a ratio to the bytes of its weights.

    python benchmarks/bench_load_memory.py --layers 6          # a ~4.5 GB Baichuan2-7B-shaped checkpoint
    python benchmarks/bench_load_memory.py --preset baichuan2-13b --layers 40 --quantize 4 --skip-float
                                                                # the full 13B shape, loaded as int4
    python benchmarks/bench_load_memory.py --quantize 8,4       # bf16, int8 and int4 side by side

Next to each precision: the memory the Baichuan2 README publishes for it (7B 15.3 / 8.0 / 5.1 GB, 13B 27.5 / 16.1
/ 8.6 GB for bf16 / 8-bit / 4-bit: GPU memory of the loaded model), scaled by this checkpoint's parameters over
the full model's, so a shape with fewer layers can be set against it.

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
# Touch every weight: loaders that memory-map their files only fault pages in when they are read. One element
# per 4 KiB page is enough, and a reduction over the whole tensor would add a widened copy to the peak.
tensors = list(model.parameters()) + list(model.buffers())
with torch.no_grad():
    for p in tensors:
        p.reshape(-1)[:: max(1, 4096 // p.element_size())].float().sum()
generated = []
if kind == "baichuan" and quantize:  # show that the quantized model generates
    from baichuan.generate import SamplingConfig, generate_tokens
    generated = list(generate_tokens(model, [1, 2, 3, 4], SamplingConfig(max_new_tokens=3, eos_ids=())))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in tensors)
print(json.dumps({"extra_rss": (peak - base) * 1024, "weights": weights, "seconds": seconds, "generated": generated}))
"""


# The Baichuan2 README's memory table (GB, model loaded on a GPU), by preset of the same hidden size.
PUBLISHED_GB = {
    "baichuan2-7b": {None: 15.3, 8: 8.0, 4: 5.1},
    "baichuan2-13b": {None: 27.5, 8: 16.1, 4: 8.6},
}


def published_scaled(preset_name: str, layers: int, bits: int | None) -> float | None:
    """The published figure for `bits`, times (this shape's parameters / the full preset's)."""
    from baichuan.config import preset

    figures = PUBLISHED_GB.get(preset_name)
    if not figures or bits not in figures:
        return None
    full = preset(preset_name)
    return figures[bits] * full.replace(n_layers=layers).num_params() / full.num_params()


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
    parser.add_argument(
        "--quantize", default="", help="also load quantizing to these bits: 8, 4 or 8,4 (comma-separated)"
    )
    parser.add_argument(
        "--skip-float", action="store_true", help="skip the bf16 load (too big for this machine)"
    )
    args = parser.parse_args()
    try:
        bits_list = [int(b) for b in args.quantize.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--quantize takes 8, 4 or 8,4, got {args.quantize!r}")
    if any(b not in (8, 4) for b in bits_list):
        parser.error(f"--quantize takes 8, 4 or 8,4, got {args.quantize!r}")

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench-load-"))
    if not (directory / "config.json").exists():
        t = time.perf_counter()
        init_checkpoint(preset(args.preset).replace(n_layers=args.layers), directory)
        print(f"created {directory} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    runs = [("baichuan", None)] * (not args.skip_float) + [("transformers", None)] * args.transformers
    runs += [("baichuan", bits) for bits in bits_list]
    print(
        "| loader | weights in memory GB | peak extra RSS GB | peak ÷ weights | published, scaled GB "
        "| weights ÷ published | load seconds | generated |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, quantize in runs:
        r = measure(kind, directory, quantize)
        label = f"{kind} int{quantize}" if quantize else f"{kind} bf16"
        published = published_scaled(args.preset, args.layers, quantize)
        versus = f"{r['weights'] / 1e9 / published:.2f}x" if published else "–"
        print(
            f"| {label} | {r['weights'] / 1e9:.2f} | {r['extra_rss'] / 1e9:.2f} | "
            f"{r['extra_rss'] / r['weights']:.2f}x | {f'{published:.2f}' if published else '–'} | {versus} "
            f"| {r['seconds']:.1f} | {r['generated'] or ''} |",
            flush=True,
        )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
