"""Peak memory of `baichuan convert`: each conversion streams tensor by tensor, so its peak should stay within
1.3x the largest shard it reads or writes.

    python benchmarks/bench_convert.py                                   # ~870 MB fp32 model (218M params)
    python benchmarks/bench_convert.py --dim 128 --layers 2 --vocab 4096  # a smoke run
    python benchmarks/bench_convert.py --only GGUF                         # the GGUF rows only

One random Baichuan2-shaped checkpoint (NormHead, so the head migration applies) is written once in --dir, as
fp32 safetensors and as a single pytorch_model.bin. Each conversion then runs alone in a fresh child process,
which reports its resident memory after its imports (the baseline: Python, torch) and its peak (VmHWM, which
counts the pages of memory-mapped files the conversion touched). The table gives the peak above the baseline
as a multiple of the largest shard (input or output file) of that conversion.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONVERSIONS = {
    # name: (source kind, what it runs)
    "bin -> safetensors": "bin",
    "fp32 -> bf16, 100 MB shards": "st",
    "migrate head": "st",
    "-> GGUF f16": "st",
    "-> GGUF q8_0": "st",
    "GGUF f16 -> ours (bf16)": "gguf-f16",
    "GGUF q8_0 -> ours (fp32)": "gguf-q8_0",
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(name: str, source: str, out: str) -> None:
    # What the conversions import lazily is imported before the baseline, so that the peak above it is memory
    # the conversion holds, not code.
    import gguf  # noqa: F401
    import sentencepiece  # noqa: F401
    import torch

    import baichuan.chat_format  # noqa: F401
    import baichuan.model  # noqa: F401
    from baichuan.convert.formats import convert_checkpoint
    from baichuan.convert.gguf import export_gguf, import_gguf
    from baichuan.convert.migrate import migrate_head

    baseline = _status("VmRSS")
    if name == "bin -> safetensors":
        convert_checkpoint(source, out)
    elif name.startswith("fp32 -> bf16"):
        convert_checkpoint(source, out, dtype=torch.bfloat16, max_shard_bytes=100 * 10**6)
    elif name == "migrate head":
        migrate_head(source, out)
    elif name.startswith("-> GGUF"):
        export_gguf(source, out, name.split()[-1], exact=False)
    else:
        import_gguf(source, out, dtype=torch.float32 if name.endswith("(fp32)") else torch.bfloat16)
    print(json.dumps({"baseline": baseline, "peak": _status("VmHWM")}))


def _largest(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return max(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-convert"))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--only", default="", help="run only the conversions whose name contains this text")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    import shutil

    import torch

    from baichuan.checkpoint import load_model
    from baichuan.config import Config
    from baichuan.scaffold import init_checkpoint

    config = Config(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.dim // 64,
        ffn_dim=args.ffn,
        norm_head=True,
        max_seq_len=512,
    )
    st, bin_dir = args.dir / "safetensors", args.dir / "bin"
    if not (st / "config.json").is_file():
        init_checkpoint(config, st, dtype=torch.float32)
    if not (bin_dir / "pytorch_model.bin").is_file():
        bin_dir.mkdir(parents=True, exist_ok=True)
        torch.save(load_model(st).state_dict(), bin_dir / "pytorch_model.bin")
        for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(st / name, bin_dir / name)
    print(f"model: {config.num_params() / 1e6:.0f}M params, fp32 {_largest(st) / 1e6:.0f} MB (one shard)\n")
    print(
        "| conversion | largest shard MB | baseline RSS MB | peak RSS MB | (peak - baseline) / largest shard |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, kind in CONVERSIONS.items():
        if args.only not in name:
            continue
        out = args.dir / ("out.gguf" if name.startswith("-> GGUF") else "out")
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        if kind.startswith("gguf"):  # a GGUF of that type, written once
            source = args.dir / f"source-{kind.removeprefix('gguf-')}.gguf"
            if not source.is_file():
                export = f"-> GGUF {kind.removeprefix('gguf-')}"
                subprocess.run(
                    [sys.executable, __file__, "--child", export, str(st), str(source)], check=True
                )
        else:
            source = {"bin": bin_dir, "st": st}[kind]
        run = subprocess.run(
            [sys.executable, __file__, "--child", name, str(source), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(run.stdout.strip().splitlines()[-1])
        largest = max(_largest(source), _largest(out))
        above = result["peak"] - result["baseline"]
        print(
            f"| {name} | {largest / 1e6:.0f} | {result['baseline'] / 1e6:.0f} | {result['peak'] / 1e6:.0f} | "
            f"{above / largest:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
