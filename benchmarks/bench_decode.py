"""Decode and prefill speed on this CPU, against the memory-bandwidth roofline, transformers and llama.cpp.

    python benchmarks/bench_decode.py                    # ~1.29B Baichuan2-7B-shaped model, bf16 and fp32
    python benchmarks/bench_decode.py --layers 4 --dtypes bf16 --compare ours,roofline   # a quick look
    python benchmarks/bench_decode.py --dtypes bf16,int8,int4    # weight-only int8/int4 vs llama.cpp Q8_0/Q4_0

Batch-1 decoding reads every weight once per token, so its ceiling is (bytes of weights per token) / (memory
bandwidth). The bandwidth is measured in the same run over a 2 GiB fp32 matrix (too big for any cache), on
transparent huge pages where the system offers them (as our loads place the weights, `baichuan.hugepages`): the
faster of the mat-vec `x @ W.T` and a plain `W.sum()` (MKL's sgemv stops short of the memory's rate). Each
implementation runs in its own child process, one after another, on the same randomly initialised checkpoint
(made once with `baichuan init`'s `init_checkpoint` and kept in --dir):

- ours: `baichuan.generate.generate_tokens` (batch 1) and `generate` (batch 8) on `load_model` + `fold_norm_head`
- transformers: `AutoModelForCausalLM.from_pretrained(dir).generate(...)` on our BaichuanForCausalLM, greedy
- llama.cpp: `llama-cpp-python` on a GGUF export of the same weights (`baichuan.convert.gguf`)

Our bf16 runs as `--dtype auto` runs a bf16 checkpoint: where the CPU emulates bf16, fp32 activations over the
bf16 weights (`load_model(bf16_weights=True)`), else bf16 throughout; transformers runs bf16 throughout.
int8 / int4 are our weight-only quantization (`load_model(quantize=8|4)`, activations in the dtype `--dtype auto`
picks on this machine); llama.cpp runs them as Q8_0 / Q4_0, made from the bf16 GGUF by llama.cpp's own quantizer
(`llama_model_quantize`, default rules: for Q4_0 it keeps output.weight at Q6_K, as ours keeps lm_head at int8).

Decode tok/s counts the steps after the first new token (prefill excluded), from a short prompt; prefill tok/s
is the prompt length over the time to the first new token; batch-8 decode is 8·(N−1) / (time(N) − time(1))
with N = --batch-tokens.
Every number is the median of --runs runs (and with --rounds R, the median of R such figures, the
implementations run in turn R times). The table also shows how far llama.cpp's greedy tokens agree with
ours (a check that the export is right before it is timed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DTYPES = {"bf16": "bfloat16", "fp32": "float32", "int8": None, "int4": None}
QUANT_BITS = {"int8": 8, "int4": 4}
LLAMA_CPP_FTYPES = {"int8": "LLAMA_FTYPE_MOSTLY_Q8_0", "int4": "LLAMA_FTYPE_MOSTLY_Q4_0"}
LLAMA_CPP_NAMES = {"bf16": "BF16", "fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
COMPARISONS = ("roofline", "ours", "transformers", "llamacpp")


def _median_runs(fn, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def _batch_rate(run, args) -> float:
    """Total tok/s of batched decoding, `run(n)` being the seconds to generate n tokens per row:
    batch·(N−1) / (time(N) − time(1)), so the prefill and first token drop out."""
    run(2)  # warm up
    first = _median_runs(lambda: run(1), args.runs)
    full = _median_runs(lambda: run(args.batch_tokens), args.runs)
    return args.batch * (args.batch_tokens - 1) / (full - first)


# --- workers (each runs in a child process) --------------------------------------------------------------


def worker_roofline(args) -> dict:
    import torch
    import torch.nn.functional as F

    def gbps(fn, weight: torch.Tensor) -> float:
        fn()  # fault the pages in
        times = []
        for _ in range(args.runs + 2):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return weight.numel() * weight.element_size() / statistics.median(times) / 1e9

    from baichuan import hugepages
    from baichuan.cpu import half_is_emulated

    # On huge pages where the system offers them, as our loads put the weights: the memory's rate at its best.
    weight = hugepages.empty((32768, 16384), torch.float32).normal_()  # 2 GiB
    x = torch.randn(1, weight.shape[1])
    fp32 = gbps(lambda: F.linear(x, weight), weight)
    # MKL's sgemv stops short of what the memory delivers (llama.cpp decodes faster than its rate implies), so
    # the roofline takes the faster of it and a plain streaming reduction over the same matrix.
    stream = gbps(weight.sum, weight)
    half = torch.randn(16384, 16384).bfloat16()  # 512 MiB
    x = x[:, : half.shape[1]].bfloat16()
    bf16 = gbps(lambda: F.linear(x, half), half)
    # Where bf16 is emulated torch's bf16 GEMM is no peak of anything, and slow to time (0.4 GFLOP/s, minutes a
    # round, on an AVX2-only EPYC): our bf16 prefill multiplies in fp32 there.
    bf16_peak = None if half_is_emulated(torch.bfloat16) else matmul_tflops(torch.bfloat16, args.runs)
    return {
        "fp32_matvec_gbps": fp32,
        "stream_gbps": stream,
        "bf16_matvec_gbps": bf16,
        "bf16_peak_tflops": bf16_peak,
        "fp32_peak_tflops": matmul_tflops(torch.float32, args.runs),
    }


def matmul_tflops(dtype, runs: int, n: int = 2048) -> float:
    """torch's n³ matmul rate: the peak a prefill (a GEMM per weight) is held to where this dtype is native."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm up (oneDNN picks and caches its kernel)
    times = []
    for _ in range(runs + 2):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def _torch_dtype(name: str):
    """The activation (and float weight) dtype of a --dtypes entry; quantized ones use what `--dtype auto` picks."""
    import torch

    if DTYPES[name] is not None:
        return getattr(torch, DTYPES[name])
    from baichuan.runtime import pick_dtype

    return pick_dtype("auto", torch.device("cpu"))[0]


def _read_per_token(model) -> int:
    """Bytes a decode step reads: every weight except the embedding table, of which it reads one row."""
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name:
            total += t[0].numel() * t.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def _prompt(n: int, vocab: int, seed: int, rows: int = 1) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, n), generator=generator).tolist()


def worker_ours(args) -> dict:
    import torch

    from baichuan.checkpoint import fold_norm_head, load_model
    from baichuan.generate import SamplingConfig, generate, generate_tokens
    from baichuan.runtime import keeps_bf16_weights, pick_dtype

    dtype = _torch_dtype(args.dtype)
    bits = QUANT_BITS.get(args.dtype)
    # bf16 weights run as `--dtype auto` runs a bf16 checkpoint: where bf16 is emulated, fp32 activations over them.
    auto = pick_dtype("auto", torch.device("cpu"))[0]
    bf16_weights = args.dtype == "bf16" and keeps_bf16_weights(
        "auto", auto, torch.device("cpu"), torch.bfloat16
    )
    if bf16_weights:
        dtype = auto
    model = fold_norm_head(
        load_model(
            args.checkpoint, dtype=dtype, quantize=bits, group_size=args.group_size, bf16_weights=bf16_weights
        )
    )
    vocab = model.config.vocab_size
    decode_prompt = _prompt(args.decode_prompt, vocab, 1)[0]
    from baichuan import cpu_gemv

    # Which build of our CPU kernels ran (BAICHUAN_CPU_ISA=avx2 forces the AVX2 one), or torch's alone.
    build = cpu_gemv.load()
    if build is None:
        kernels = "torch"
    elif bits:
        kernels = f"{build.target} {getattr(build, f'int{bits}_activations')}-activation"
    else:
        kernels = f"{build.target} bf16 mat-vec"
    result: dict = {
        "read_bytes": _read_per_token(model),
        "activations": str(dtype).removeprefix("torch."),
        "kernels": kernels,
    }

    def timed(prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        sampling = SamplingConfig(max_new_tokens=new_tokens, eos_ids=())
        tokens, stamps = [], [time.perf_counter()]
        for token in generate_tokens(model, prompt, sampling):
            tokens.append(token)
            stamps.append(time.perf_counter())
        return tokens, stamps

    timed(decode_prompt, 4)  # warm up
    decode, tokens = [], []
    for _ in range(args.runs):
        tokens, stamps = timed(decode_prompt, args.new_tokens)
        decode.append((args.new_tokens - 1) / (stamps[-1] - stamps[1]))
    result["decode"] = statistics.median(decode)
    result["tokens"] = tokens
    with torch.inference_mode():
        logits = model(torch.tensor([decode_prompt]), last_only=True)[0, -1].float()
    np_path = Path(args.out_dir) / f"ours-{args.dtype}.pt"
    torch.save(logits, np_path)
    result["logits"] = str(np_path)

    if args.prefill:
        prefill_prompt = _prompt(args.prefill, vocab, 2)[0]
        timed(prefill_prompt[:64], 1)

        def prefill() -> float:
            _, stamps = timed(prefill_prompt, 1)
            return args.prefill / (stamps[1] - stamps[0])

        result["prefill"] = _median_runs(prefill, args.runs)

    if args.batch > 1:
        prompts = _prompt(args.decode_prompt, vocab, 3, rows=args.batch)

        def run(n: int) -> float:
            t = time.perf_counter()
            generate(model, prompts, SamplingConfig(max_new_tokens=n, eos_ids=()))
            return time.perf_counter() - t

        result["batch"] = _batch_rate(run, args)
    return result


def worker_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    import baichuan  # noqa: F401  (registers the Auto classes)

    quantize = (
        {"quantize": QUANT_BITS[args.dtype], "group_size": args.group_size}
        if args.dtype in QUANT_BITS
        else {}
    )
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=_torch_dtype(args.dtype), **quantize)
    model.eval()
    vocab = model.config.vocab_size

    class Stamps(BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):  # called with the prompt first, then with each new token
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def config(n: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )

    def timed(prompt: list[list[int]], n: int, stream: bool = True) -> list[float]:
        ids = torch.tensor(prompt)
        streamer = Stamps() if stream else None
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config(n), streamer=streamer
            )
        return [t, *streamer.stamps[1:]] if stream else [t, time.perf_counter()]

    decode_prompt = _prompt(args.decode_prompt, vocab, 1)
    timed(decode_prompt, 4)
    result = {
        "decode": _median_runs(
            lambda: (args.new_tokens - 1) / (lambda s: s[-1] - s[1])(timed(decode_prompt, args.new_tokens)),
            args.runs,
        )
    }
    if args.prefill:
        prefill_prompt = _prompt(args.prefill, vocab, 2)
        result["prefill"] = _median_runs(
            lambda: args.prefill / (lambda s: s[1] - s[0])(timed(prefill_prompt, 1)), args.runs
        )
    if args.batch > 1:
        prompts = _prompt(args.decode_prompt, vocab, 3, rows=args.batch)

        def run(n: int) -> float:
            s = timed(prompts, n, stream=False)
            return s[1] - s[0]

        result["batch"] = _batch_rate(run, args)
    return result


def worker_llamacpp(args) -> dict:
    import numpy as np
    import torch
    from llama_cpp import Llama

    from baichuan.checkpoint import read_config
    from baichuan.convert.gguf import export_gguf, llama_cpp_position

    float_name = "bf16" if args.dtype in QUANT_BITS else args.dtype
    float_path = Path(args.checkpoint) / f"model-{float_name}.gguf"
    result: dict = {}
    config = read_config(args.checkpoint)
    if not float_path.is_file():
        t = time.perf_counter()
        # exact=False: a shape llama.cpp runs with another position encoding still times right (see same_function)
        export_gguf(args.checkpoint, float_path, LLAMA_CPP_NAMES[float_name].lower(), exact=False)
        result["export_s"] = time.perf_counter() - t
    path = float_path
    if args.dtype in QUANT_BITS:
        path = Path(args.checkpoint) / f"model-{LLAMA_CPP_NAMES[args.dtype]}.gguf"
        if not path.is_file():
            t = time.perf_counter()
            llama_cpp_quantize(float_path, path, args.dtype, args.threads)
            result["quantize_s"] = time.perf_counter() - t
    result["file_bytes"] = path.stat().st_size
    result["same_function"] = llama_cpp_position(config.n_layers) == config.position

    n_ctx = max(args.prefill, args.decode_prompt + args.new_tokens) + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=max(args.prefill, 64),
        n_ubatch=max(args.prefill, 64),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )

    def last_logits() -> np.ndarray:
        # Without logits_all, llama-cpp-python keeps no scores: read the context's last row directly.
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(config.vocab_size,))

    def timed(prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        llm.reset()
        stamps = [time.perf_counter()]
        llm.eval(prompt)
        tokens = []
        for _ in range(n):
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            stamps.append(time.perf_counter())
            if len(tokens) < n:
                llm.eval([token])
        return tokens, stamps

    decode_prompt = _prompt(args.decode_prompt, config.vocab_size, 1)[0]
    timed(decode_prompt, 4)
    decode = []
    for _ in range(args.runs):
        tokens, stamps = timed(decode_prompt, args.new_tokens)
        decode.append((args.new_tokens - 1) / (stamps[-1] - stamps[1]))
    result["decode"] = statistics.median(decode)
    result["tokens"] = tokens
    llm.reset()
    llm.eval(decode_prompt)
    logits_path = Path(args.out_dir) / f"llamacpp-{args.dtype}.pt"
    torch.save(torch.from_numpy(last_logits().astype(np.float32)), logits_path)
    result["logits"] = str(logits_path)
    if args.prefill:
        prefill_prompt = _prompt(args.prefill, config.vocab_size, 2)[0]
        timed(prefill_prompt[:64], 1)
        result["prefill"] = _median_runs(
            lambda: args.prefill / (lambda s: s[1] - s[0])(timed(prefill_prompt, 1)[1]), args.runs
        )
    return result


def llama_cpp_quantize(source: Path, target: Path, dtype: str, threads: int) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs), with its default per-tensor rules."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[dtype])
    params.nthread = threads
    partial = target.with_suffix(".partial")
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
    if status != 0:
        raise RuntimeError(
            f"llama_model_quantize({source.name} -> {LLAMA_CPP_NAMES[dtype]}) returned {status}"
        )
    partial.replace(target)


def median_of_rounds(runs: list[dict]) -> dict:
    """One worker's results over the rounds: each number the median of the rounds that gave it, the rest (token
    lists, paths, names) from the first round that did not fail."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    merged = dict(good[0])
    for key, value in merged.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(r[key] for r in good if isinstance(r.get(key), (int, float)))
    return merged


WORKERS = {
    "roofline": worker_roofline,
    "ours": worker_ours,
    "transformers": worker_transformers,
    "llamacpp": worker_llamacpp,
}


# --- the driver -----------------------------------------------------------------------------------------


def run_worker(kind: str, args, dtype: str) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--dtype", dtype, "--checkpoint", str(args.dir)]
    command += ["--out-dir", args.out_dir, "--runs", str(args.runs), "--threads", str(args.threads)]
    command += ["--new-tokens", str(args.new_tokens), "--decode-prompt", str(args.decode_prompt)]
    command += [
        "--prefill",
        str(args.prefill),
        "--batch",
        str(args.batch),
        "--batch-tokens",
        str(args.batch_tokens),
        "--group-size",
        str(args.group_size),
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    t = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        error = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  {kind} {dtype}: failed: {error}", file=sys.stderr)
        return {"error": error}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {kind} {dtype}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return result


def weight_bytes(config, itemsize: int) -> int:
    """Bytes of weights one decode step reads: every Linear (lm_head included) and one embedding row."""
    d, f = config.dim, config.ffn_dim
    return itemsize * (config.n_layers * (4 * d * d + 3 * d * f + 2 * d) + config.vocab_size * d + 2 * d)


def prefill_flops_per_token(config, prompt: int) -> float:
    """Multiply-adds ×2 per prompt token: every Linear (lm_head on the last token only, as the prefill computes
    it) and attention's two products over the causal prompt (on average half of it per token)."""
    d, f = config.dim, config.ffn_dim
    linear = config.n_layers * (4 * d * d + 3 * d * f)
    attention = config.n_layers * 2 * d * (prompt + 1) / 2
    return 2 * (linear + attention + config.vocab_size * d / prompt)


def cpu_name() -> str:
    from baichuan.cpu import cpuinfo_field

    if name := cpuinfo_field("model name"):
        return name
    import platform

    return platform.processor() or "unknown CPU"


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def percent(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.0%}"


def parity(ours: dict, other: dict) -> str:
    import torch

    if "tokens" not in ours or "tokens" not in other:
        return "–"
    a, b = ours["tokens"], other["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    la, lb = torch.load(ours["logits"]), torch.load(other["logits"])
    rel = float((la - lb).abs().max() / la.abs().max())
    return f"first {same}/{len(a)} greedy tokens equal; max |Δlogit| {rel:.1%} of max |logit|"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shape = parser.add_argument_group(
        "model shape (defaults: the 1,292,207,616-parameter model of ANCHORS.md; ignored for an existing --dir)"
    )
    shape.add_argument("--layers", type=int, default=32)
    shape.add_argument("--hidden", type=int, default=1536)
    shape.add_argument("--heads", type=int, default=12)
    shape.add_argument("--ffn", type=int, default=4096)
    shape.add_argument("--vocab", type=int, default=125_696)
    parser.add_argument(
        "--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32, int8, int4 (weight-only)"
    )
    parser.add_argument(
        "--compare", default=",".join(COMPARISONS), help=f"comma-separated subset of {', '.join(COMPARISONS)}"
    )
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every implementation this many times in turn (A, B, A, B, ...) and take each figure's median "
        "over the rounds: on a machine whose speed drifts, the drift then reaches every ratio alike",
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run")
    parser.add_argument("--decode-prompt", type=int, default=16, help="prompt length of the decode runs")
    parser.add_argument(
        "--prefill", type=int, default=512, help="prompt length of the prefill runs (0: skip)"
    )
    parser.add_argument("--batch", type=int, default=8, help="batch of the batched decode runs (1: skip)")
    parser.add_argument("--batch-tokens", type=int, default=16, help="tokens generated per batched run")
    parser.add_argument(
        "--group-size", type=int, default=128, help="group size of our int4 (llama.cpp Q4_0: 32)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (torch: default)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="re-use or create the checkpoint here")
    # internal: one measurement in a child process
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import torch

    from baichuan.checkpoint import read_config
    from baichuan.config import Config
    from baichuan.cpu import half_is_emulated
    from baichuan.scaffold import init_checkpoint

    if args.dir is None:
        args.dir = Path(tempfile.gettempdir()) / (
            f"baichuan-bench-{args.layers}x{args.hidden}x{args.heads}x{args.ffn}x{args.vocab}"
        )
    config = (
        read_config(args.dir)
        if (args.dir / "config.json").is_file()
        else Config(
            vocab_size=args.vocab,
            dim=args.hidden,
            n_layers=args.layers,
            n_heads=args.heads,
            ffn_dim=args.ffn,
            norm_head=args.vocab == 125_696,
        )
    )
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    for name in compare:
        if name not in COMPARISONS:
            parser.error(f"unknown comparison {name!r}; choose from {', '.join(COMPARISONS)}")
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not (args.dir / "config.json").is_file():
        t = time.perf_counter()
        init_checkpoint(config, args.dir, torch.bfloat16)
        print(f"  created {args.dir} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    scratch = tempfile.TemporaryDirectory()
    args.out_dir = scratch.name
    load_before = os.getloadavg()[0]

    rounds: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        if "roofline" in compare:
            rounds.setdefault(("roofline", "fp32"), []).append(run_worker("roofline", args, "fp32"))
        for dtype in dtypes:
            for name in ("ours", "transformers", "llamacpp"):
                if name in compare:
                    rounds.setdefault((name, dtype), []).append(run_worker(name, args, dtype))
    results = {key: median_of_rounds(runs) for key, runs in rounds.items()}
    roofline = results.pop(("roofline", "fp32"), {})

    bandwidth = max(roofline.get("fp32_matvec_gbps", 0), roofline.get("stream_gbps", 0)) or None
    print(
        f"\n**{cpu_name()}**, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads;"
    )
    print(
        f"model {config.n_layers} layers × {config.dim} hidden, {config.n_heads} heads, FFN {config.ffn_dim}, "
        f"vocab {config.vocab_size:,}"
        f" = {config.num_params():,} parameters; decode: {args.decode_prompt}-token prompt + {args.new_tokens} "
        f"new tokens; prefill: {args.prefill} tokens; median of {args.runs}"
        + (f", then of {args.rounds} rounds taken in turn." if args.rounds > 1 else ".")
    )
    if roofline:
        print(
            f"Memory bandwidth {bandwidth:.1f} GB/s (the roofline's: the faster of an fp32 mat-vec over 2 GiB, "
            f"{roofline['fp32_matvec_gbps']:.1f} GB/s, and a sum over it, {roofline['stream_gbps']:.1f} GB/s); "
            f"torch bf16 mat-vec (512 MiB) {roofline['bf16_matvec_gbps']:.1f} GB/s."
        )
    peaks = [roofline.get(key) for key in ("bf16_peak_tflops", "fp32_peak_tflops") if roofline.get(key)]
    if peaks:
        bf16_peak = roofline.get("bf16_peak_tflops")
        print(
            "Matmul peak (torch, 2048³): bf16 "
            + (f"{bf16_peak:.2f} TFLOP/s" if bf16_peak else "not timed")
            + f", fp32 {roofline['fp32_peak_tflops']:.2f} TFLOP/s; bf16 is "
            + ("emulated here." if half_is_emulated(torch.bfloat16) else "native here.")
        )
    print(f"Load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}.\n")

    names = {
        "ours": "baichuan `generate_tokens` / `generate`",
        "transformers": "transformers `generate` on our model",
        "llamacpp": "llama.cpp (llama-cpp-python)",
    }
    print(
        "| implementation | weights | decode tok/s, batch 1 | of roofline | ours ÷ it | ours ÷ our bf16 | "
        f"prefill tok/s ({args.prefill}) | ours ÷ it | decode batch {args.batch}, total tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    our_bf16 = results.get(("ours", "bf16"), {}).get("decode")
    for dtype in dtypes:
        best = results.get(("ours", dtype), {})
        read = best.get("read_bytes") or (
            weight_bytes(config, {"bf16": 2, "fp32": 4}[dtype]) if dtype in ("bf16", "fp32") else None
        )
        ceiling = bandwidth * 1e9 / read if bandwidth and read else None
        if ceiling:
            print(
                f"| roofline: {read / 1e9:.2f} GB/token ÷ {bandwidth:.1f} GB/s | {dtype} | {ceiling:.2f} | 100% "
                "| | | | | |"
            )
        for key in ("ours", "transformers", "llamacpp"):
            r = results.get((key, dtype))
            if r is None:
                continue
            label = dtype
            if key == "llamacpp":
                label = LLAMA_CPP_NAMES[dtype]
            elif dtype in QUANT_BITS and key == "ours" and "activations" in r:
                label = f"{dtype} ({r['activations']} model, {r.get('kernels', '?')} kernels)"
            elif dtype == "bf16" and key == "ours" and "kernels" in r:
                label = f"{dtype} ({r.get('activations', '?')} activations, {r['kernels']} kernels)"
            if "error" in r:
                print(f"| {names[key]} | {label} | failed: {r['error'][:80]} | | | | | | |")
                continue
            ours_row = key == "ours"
            print(
                f"| {names[key]} | {label} | {fmt(r.get('decode'), 2)} | "
                f"{percent(r.get('decode'), ceiling)} | "
                f"{'' if ours_row else ratio(best.get('decode'), r.get('decode'))} | "
                f"{ratio(r.get('decode'), our_bf16) if ours_row else ''} | {fmt(r.get('prefill'))} | "
                f"{'' if ours_row else ratio(best.get('prefill'), r.get('prefill'))} | {fmt(r.get('batch'))} |"
            )
            if ours_row and r.get("prefill") and peaks:
                peak = max(peaks)
                tflops = r["prefill"] * prefill_flops_per_token(config, args.prefill) / 1e12
                notes.append(
                    f"ours {dtype} prefill: {tflops:.2f} TFLOP/s in its products, {tflops / peak:.0%} of the "
                    f"faster matmul peak ({peak:.2f} TFLOP/s)."
                )
            if key == "llamacpp":
                check = parity(best, r)
                if not r.get("same_function"):
                    check += " (llama.cpp picks RoPE/ALiBi by layer count: not this model's function)"
                size = f" GGUF {r['file_bytes'] / 1e9:.2f} GB" if "file_bytes" in r else ""
                notes.append(f"llama.cpp {LLAMA_CPP_NAMES[dtype]} vs ours {dtype}:{size}; {check}.")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
