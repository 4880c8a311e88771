"""The measurements of benchmarks/gpu_check.sh, written as one results file (issue 16).

    python benchmarks/gpu_report.py RESULTS [--rehearse] [--budget-s 330] [--only SECTION,...]

Each section runs in a child process of its own with a time limit (`--in-process` runs them here, for the test),
so a hang, an out-of-memory or a missing package costs that section's lines only: they read
"not measured: <reason>". Every key of `EXPECTED_KEYS` is always written, in that order.

`--rehearse` runs every section on the CPU with tiny shapes: the code paths, the vLLM refusal checks and the
`openai` client (against `baichuan serve`, standing in for vLLM) are exercised, and every line that needs a GPU
reads "unmeasured (no CUDA)" followed by what the rehearsal computed. Numbers from a rehearsal are not results.

Sections and what they write:
- env: the GPU, torch, and which of vllm / bitsandbytes / deepspeed / flash_attn / openai are importable.
- bandwidth: HBM bandwidth from a device-to-device copy (read + write), and the best bf16 matmul.
- layers: one 4096 -> 11008 layer (Baichuan2-7B's gate/up) at 1, 8 and 512 rows: bf16, int8 through torch's
  fused `_weight_int8pack_mm`, int8 widened for cuBLAS, int8 under torch.compile, int4 through tinygemm.
- decode_bf16 / decode_int8 / decode_int4: a random Baichuan2-7B-shaped model built on the GPU (quantized in
  place), prefill tok/s of one 512-token prompt, decode tok/s at batch 1 and 8 with our KV cache (eager), each
  beside the HBM roofline: measured bandwidth / bytes read per step (weights but the embedding table, plus the
  KV cache).
- memory: GPU memory after building Baichuan2-7B, Baichuan2-13B and Baichuan-13B in bf16 / int8 / int4 (weights
  made on the GPU, head folded, quantized in place), beside the bytes our formats need and the published table.
- train: tokens/s and MFU of a ~1B model (dim 2048, 16 layers, 64,000 vocabulary) in `baichuan.train.loop`
  for one minute, bf16 autocast, against the measured bf16 matmul peak and H200's datasheet 989 TFLOP/s.
- cuda_tests: `pytest -m cuda` on the test files that have CUDA tests.
- vllm: `vllm_refusal` on a quantized directory and on the handoff checkpoint; `baichuan serve --engine vllm` on a
  random Baichuan2-7B-shaped checkpoint of 2 layers, asked by the `openai` client (completion and chat), its
  greedy completion compared with ours on the same weights, and vLLM's decode tok/s at batch 1 and 8 beside ours.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

PRECISIONS = {"bf16": None, "int8": 8, "int4": 4}
MODELS = ("baichuan2-7b", "baichuan2-13b", "baichuan-13b")
# GB after loading, bf16 / 8-bit / 4-bit: the Baichuan2 README
# (https://github.com/baichuan-inc/Baichuan2/blob/main/README_EN.md, "Quantization"), its Chinese draft, and
# the Baichuan-13B README (https://github.com/baichuan-inc/Baichuan-13B, "Quantization").
PUBLISHED_GB = {
    "baichuan2-7b": {"bf16": "15.3 (Chinese draft 14.0)", "int8": "8.0 (8.0)", "int4": "5.1 (5.1)"},
    "baichuan2-13b": {"bf16": "27.5 (Chinese draft 25.9)", "int8": "16.1 (14.2)", "int4": "8.6 (8.6)"},
    "baichuan-13b": {"bf16": "26.0", "int8": "15.8", "int4": "9.7"},
}
# The goal "at or below the published table" takes the published README's figures. The Chinese draft's bf16 ones
# look like GiB of the weights alone (Baichuan2-7B: 15.01 GB = 13.98 GiB), so each line gives GB and GiB.
PUBLISHED_README_GB = {
    "baichuan2-7b": {"bf16": 15.3, "int8": 8.0, "int4": 5.1},
    "baichuan2-13b": {"bf16": 27.5, "int8": 16.1, "int4": 8.6},
    "baichuan-13b": {"bf16": 26.0, "int8": 15.8, "int4": 9.7},
}
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 SXM datasheet, dense (without sparsity)
UNMEASURED = "unmeasured (no CUDA)"

SECTION_KEYS = {
    "env": ["env.gpu", "env.torch", "env.packages"],
    "bandwidth": ["bandwidth.hbm", "bandwidth.matmul_bf16"],
    "layers": ["layers.rows1", "layers.rows8", "layers.rows512"],
    **{
        f"decode_{p}": [f"decode.{p}.prefill", f"decode.{p}.batch1", f"decode.{p}.batch8"]
        + (["decode.cuda_graphs"] if p == "bf16" else [])
        for p in PRECISIONS
    },
    "memory": [f"memory.{m}.{p}" for m in MODELS for p in PRECISIONS],
    "train": ["train.mfu_1b"],
    "cuda_tests": ["tests.pytest_cuda"],
    "vllm": [
        "vllm.refusal_quantized",
        "vllm.refusal_handoff_checkpoint",
        "vllm.handoff_answers",
        "vllm.handoff_vs_ours",
        "vllm.decode_batch1",
        "vllm.decode_batch8",
        "vllm.decode_int8_int4",
    ],
}
GOAL_KEYS = [
    "goal.bf16_batch1_roofline",
    "goal.int4_vs_bf16",
    "goal.memory_vs_published",
    "goal.vllm_answers",
]
EXPECTED_KEYS = [key for keys in SECTION_KEYS.values() for key in keys] + GOAL_KEYS
# Seconds each section may take on the GPU machine; the whole report also stops at --budget-s.
TIMEOUTS = {
    "env": 30,
    "bandwidth": 30,
    "decode_bf16": 75,
    "decode_int4": 75,
    "decode_int8": 75,
    "memory": 90,
    "layers": 75,
    "train": 110,
    "cuda_tests": 90,
    "vllm": 200,
}
RESULT = "RESULT "  # a child's stdout line carrying one result as JSON
REPO = Path(__file__).resolve().parents[1]


class Report:
    """What one section found: `put(key, text, gpu=True)`; a GPU line of a rehearsal is marked unmeasured."""

    def __init__(self, rehearse: bool, sink, vllm_site: str | None = None):
        self.rehearse, self.sink, self.vllm_site = rehearse, sink, vllm_site

    def put(self, key: str, text: str, gpu: bool = True, **values) -> None:
        if self.rehearse and gpu:
            text = f"{UNMEASURED}; rehearsed on cpu with tiny shapes: {text}"
        self.sink({"key": key, "text": text, "values": values})


def dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on the GPU; fp32 in a rehearsal, as CPUs without native bf16 emulate it slowly."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def device_for(rehearse: bool) -> torch.device:
    if rehearse:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (use --rehearse on a machine without one)")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeat` calls after `warmup` ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- sections --------------------------------------------------------------------------------------------------


def section_env(report: Report) -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    report.put("env.gpu", gpu, gpu=False)
    report.put("env.torch", f"{torch.__version__} (CUDA {torch.version.cuda})", gpu=False)
    found = []
    for name in ("vllm", "bitsandbytes", "deepspeed", "flash_attn", "openai", "fastapi", "triton"):
        if importlib.util.find_spec(name) is None:
            found.append(f"{name} absent")
        else:
            from importlib.metadata import PackageNotFoundError, version

            try:
                found.append(f"{name} {version(name.replace('_', '-'))}")
            except PackageNotFoundError:
                found.append(f"{name} present")
    report.put("env.packages", ", ".join(found), gpu=False)


def hbm_bandwidth(device: torch.device, rehearse: bool) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    n = (1 << 20) if rehearse else (2 << 30)  # elements of 2 bytes: 2 MiB or 4 GiB
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * src.nbytes / seconds


def section_bandwidth(report: Report) -> None:
    from baichuan.train.loop import matmul_peak

    device = device_for(report.rehearse)
    bandwidth = hbm_bandwidth(device, report.rehearse)
    report.put("bandwidth.hbm", f"{bandwidth / 1e9:,.1f} GB/s (copy, read + write)", bytes_per_s=bandwidth)
    n = 256 if report.rehearse else 8192
    peak = matmul_peak(torch.bfloat16, device, seconds=0.2 if report.rehearse else 2.0, n=n)
    report.put(
        "bandwidth.matmul_bf16", f"{peak / 1e12:,.1f} TFLOP/s (best square product up to {n})", flops=peak
    )


def section_layers(report: Report) -> None:
    from torch import nn

    from baichuan.quant.int4 import Int4Linear
    from baichuan.quant.int8 import Int8Linear

    device = device_for(report.rehearse)
    k, n = (256, 512) if report.rehearse else (4096, 11008)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype_for(device))
    int8, int4 = Int8Linear.from_linear(linear).to(device), Int4Linear.from_linear(linear).to(device)
    int8_ref = Int8Linear.from_linear(linear).to(device)
    int8_ref.use_kernel = False
    compiled = None
    if device.type == "cuda":
        # The gpt-fast form (int8 widened inside the product) under torch.compile: one fused Triton kernel.
        compiled = torch.compile(lambda x, w, s: torch.nn.functional.linear(x, w.to(x.dtype)) * s)
    for rows in (1, 8, 512):
        x = torch.randn(rows, k, device=device, dtype=dtype_for(device))
        parts = []
        with torch.inference_mode():
            for name, layer in (
                ("bf16", linear),
                ("int8 kernel path", int8),
                ("int8 widened", int8_ref),
                ("int4 " + int4._kernel_name(), int4),
            ):
                parts.append(f"{name} {timed(functools.partial(layer, x), device) * 1e6:,.1f} us")
            if compiled is not None:
                try:
                    call = functools.partial(compiled, x, int8.weight, int8.scales.to(torch.bfloat16))
                    us = timed(call, device) * 1e6
                    parts.append(f"int8 compiled {us:,.1f} us")
                except Exception as e:  # Triton missing or failing: the other lines still count
                    parts.append(f"int8 compiled failed ({type(e).__name__})")
        report.put(f"layers.rows{rows}", f"{k}->{n}: " + " | ".join(parts))


def build_model(config, bits: int | None, device: torch.device, dtype: torch.dtype | None = None):
    """A random model made straight on `device` in `dtype` (default `dtype_for`), head folded, quantized in place
    when `bits`."""
    from baichuan.checkpoint import fold_norm_head
    from baichuan.model import Baichuan
    from baichuan.quant.swap import quantize_model

    with torch.device("meta"):
        model = Baichuan(config)
    model = model.to(dtype or dtype_for(device)).to_empty(device=device)
    model.init_weights(generator=torch.Generator(device).manual_seed(0))
    fold_norm_head(model)
    if bits is not None:
        quantize_model(model, bits)
    return model.eval()


def tensor_bytes(model) -> int:
    """Bytes of the weights as held (kernel tilings included; a state_dict would untile them)."""
    return sum(t.nbytes for t in [*model.parameters(), *model.buffers()])


def read_bytes_per_step(model, config, batch: int, positions: int, kv_bytes: int = 2) -> int:
    """Bytes a decode step reads: every weight but the embedding table (only B rows of it), plus the cache."""
    weights = tensor_bytes(model) - model.model.embed_tokens.weight.nbytes
    cache = batch * config.n_layers * 2 * positions * config.dim * kv_bytes
    return weights + cache


def decode_rates(model, config, device, batch: int, prompt: int, steps: int) -> tuple[float, float]:
    """(prefill tok/s of a batch x prompt, decode tok/s of `steps` greedy steps after it) with our KV cache."""
    from baichuan.kv_cache import KVCache

    cache = KVCache.for_model(config, batch, prompt + steps + 4, dtype_for(device), device)
    ids = torch.randint(3, config.vocab_size, (batch, prompt), device=device)
    with torch.inference_mode():
        model(ids, 0, cache, last_only=True)  # warm-up
        sync(device)
        start = time.perf_counter()
        logits = model(ids, 0, cache, last_only=True)
        sync(device)
        prefill = batch * prompt / (time.perf_counter() - start)
        token = logits[:, -1].argmax(-1)
        for i in range(3):  # warm-up steps
            token = model(token[:, None], prompt + i, cache, last_only=True)[:, -1].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for i in range(3, steps):
            token = model(token[:, None], prompt + i, cache, last_only=True)[:, -1].argmax(-1)
        sync(device)
        decode = batch * (steps - 3) / (time.perf_counter() - start)
    return prefill, decode


def section_decode(report: Report, precision: str) -> None:
    from baichuan.config import preset

    device = device_for(report.rehearse)
    config = preset("baichuan2-7b")
    prompt, steps = 512, 64
    if report.rehearse:
        config = config.replace(n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=512)
        prompt, steps = 16, 6
    model = build_model(config, PRECISIONS[precision], device)
    bandwidth = hbm_bandwidth(device, report.rehearse)
    prefill, _ = decode_rates(model, config, device, 1, prompt, 4)
    report.put(f"decode.{precision}.prefill", f"{prefill:,.0f} tok/s (1 x {prompt} tokens)", tok_s=prefill)
    for batch in (1, 8):
        _, rate = decode_rates(model, config, device, batch, prompt, steps)
        roofline = batch * bandwidth / read_bytes_per_step(model, config, batch, prompt + steps // 2)
        report.put(
            f"decode.{precision}.batch{batch}",
            f"{rate:,.1f} tok/s | HBM roofline {roofline:,.1f} tok/s ({100 * rate / roofline:.0f}%) | "
            f"{prompt}-token prompt, {steps} steps, eager",
            tok_s=rate,
            roofline=roofline,
        )
    if precision == "bf16":
        report.put(
            "decode.cuda_graphs",
            "not built: a CUDA-graph (or reduce-overhead) decode step needs fixed shapes, and ours slices the "
            "KV cache to the current length and takes positions as Python ints (model.py, kv_cache.py)",
            gpu=False,
        )


def section_memory(report: Report) -> None:
    from baichuan.config import preset
    from baichuan.memory import weight_bytes
    from baichuan.quant.spec import DEFAULT_GROUP_SIZE, DEFAULT_HEAD_BITS

    device = device_for(report.rehearse)
    for name in MODELS:
        config = preset(name)
        for precision, bits in PRECISIONS.items():
            head_bits = DEFAULT_HEAD_BITS[bits] if bits else None
            need = weight_bytes(config, 2, bits, DEFAULT_GROUP_SIZE, head_bits)
            tiny = dict(n_layers=1, dim=128, n_heads=4, ffn_dim=256, vocab_size=1024)
            build = config.replace(**tiny) if report.rehearse else config
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            model = build_model(build, bits, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                allocated = torch.cuda.memory_allocated() - base
                free, total = torch.cuda.mem_get_info()
                measured = (
                    f"GPU after load {allocated / 1e9:.2f} GB = {allocated / 2**30:.2f} GiB allocated "
                    f"({(total - free) / 1e9:.2f} GB in use on "
                    f"the device, CUDA context included; peak while quantizing "
                    f"{(torch.cuda.max_memory_allocated() - base) / 1e9:.2f} GB)"
                )
                ok = allocated / 1e9 <= PUBLISHED_README_GB[name][precision]
            else:
                allocated = tensor_bytes(model)
                measured = (
                    f"GPU after load {UNMEASURED} (tiny rehearsal: {allocated / 1e6:.2f} MB of tensors)"
                )
                ok = None
            del model
            report.put(
                f"memory.{name}.{precision}",
                f"{measured} | our format needs {need / 1e9:.2f} GB = {need / 2**30:.2f} GiB (computed) | "
                f"published {PUBLISHED_GB[name][precision]} GB",
                gpu=False,
                within_published=ok,
            )


class _TimeUp(Exception):
    pass


def section_train(report: Report) -> None:
    from baichuan.config import Config
    from baichuan.train.loop import TrainConfig, flops_per_token, matmul_peak, train

    device = device_for(report.rehearse)
    if report.rehearse:
        config = Config(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=64)
        batch, seq, seconds = 2, 64, 1.0
    else:
        config = Config(vocab_size=64_000, dim=2048, n_layers=16, n_heads=16, ffn_dim=5504, max_seq_len=2048)
        batch, seq, seconds = 8, 2048, 60.0
    model = build_model(config, None, device, torch.float32).train()  # fp32 weights, bf16 autocast
    batches = [torch.randint(3, config.vocab_size, (batch, seq), device=device) for _ in range(4)]

    class Fixed:
        global_batch, seq_len = batch, seq

        def micro_batches(self, step):
            return [batches[step % len(batches)]]

        def state_dict(self):
            return {}

    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) > 3 and stamps[-1] - stamps[3] > seconds:
            raise _TimeUp

    cfg = TrainConfig(
        max_steps=100_000, lr=3e-4, precision="bf16" if device.type == "cuda" else "auto", progress=False,
        tensorboard=False, plot=False, measure_peak=False, save=False,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out, contextlib.suppress(_TimeUp):
        train(model, Fixed(), cfg, out, device=device, say=lambda _: None, on_step=on_step)
    steps = len(stamps) - 4  # the first 3 steps are warm-up
    rate = steps * batch * seq / (stamps[-1] - stamps[3])
    flops = rate * flops_per_token(config, seq)
    peak = matmul_peak(torch.bfloat16, device, seconds=0.5 if report.rehearse else 2.0)
    datasheet = (
        f", {100 * flops / H200_BF16_DENSE_FLOPS:.1f}% of the datasheet's 989"
        if device.type == "cuda"
        else ""
    )
    report.put(
        "train.mfu_1b",
        f"{config.num_params() / 1e9:.2f}B params, {batch} x {seq} tokens a step, {steps} steps in "
        f"{stamps[-1] - stamps[3]:.0f} s: {rate:,.0f} tok/s, MFU {100 * flops / peak:.1f}% of the measured bf16 "
        f"matmul ({peak / 1e12:,.1f} TFLOP/s){datasheet}; goal >= 55% (Baichuan 2 report: 58.3% on A800s)",
        mfu=flops / peak,
    )


def section_cuda_tests(report: Report) -> None:
    files = ["tests/quant/test_cuda.py", "tests/train/test_cuda.py"]
    # The project's addopts already hold -q: one more (-qq) would drop the "N passed" line this reports.
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", *files]
    if report.rehearse:  # only collection, -qq's "file: count" lines: the tests themselves skip without CUDA
        command += ["-q", "--collect-only"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUTS["cuda_tests"] - 5, cwd=REPO
    )
    lines = done.stdout.strip().splitlines() or ["(no output)"]
    outcomes = re.compile(r"\d+ (passed|failed|errors?|skipped)")
    summary = next((line.strip("= ") for line in reversed(lines) if outcomes.search(line)), lines[-1])
    if report.rehearse:  # -q --collect-only prints "file: count" per file
        counts = [int(line.rsplit(": ", 1)[1]) for line in lines if line.rsplit(": ", 1)[-1].isdigit()]
        summary = f"{sum(counts)} CUDA tests collected in {len(counts)} files"
    report.put("tests.pytest_cuda", f"exit {done.returncode}: {summary} ({' '.join(command[1:])})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, process: subprocess.Popen, seconds: float) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"the server did not answer in {seconds:.0f} s")


def section_vllm(report: Report) -> None:
    from baichuan.checkpoint import fold_norm_head, load_model, save_model
    from baichuan.config import preset
    from baichuan.generate import SamplingConfig, generate
    from baichuan.model import Baichuan
    from baichuan.quant.swap import quantize_model
    from baichuan.scaffold import init_checkpoint
    from baichuan.serve.vllm import vllm_refusal
    from baichuan.tokenizer import Tokenizer

    device = device_for(report.rehearse)
    work = Path(tempfile.mkdtemp(prefix="gpu-report-vllm-"))
    # The handoff checkpoint: Baichuan2-7B's width, vocabulary and NormHead (what vLLM's guesses expect) in 2
    # layers; the rehearsal's is a tiny ALiBi model, which vLLM's guesses fit as well.
    if report.rehearse:
        config = preset("baichuan2-13b").replace(
            n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=4096, norm_head=False, max_seq_len=256
        )
    else:
        config = preset("baichuan2-7b").replace(n_layers=2, max_seq_len=1024)
    # A quantized directory (our int8 format): vLLM must be refused it whatever its shape, so a tiny one does.
    quantized = Baichuan(config.replace(n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=512))
    quantized.init_weights()
    fold_norm_head(quantized)
    quantized.quantization = quantize_model(quantized, 8)
    save_model(quantized, work / "int8")
    del quantized
    refusal = vllm_refusal(work / "int8")
    report.put("vllm.refusal_quantized", f"refused: {refusal}" if refusal else "NOT refused", gpu=False)
    report.put(
        "vllm.decode_int8_int4",
        "not measured: vLLM cannot load this toolkit's int8/int4 format (refused above), so there is no vLLM "
        "figure on the same quantized weights",
        gpu=False,
    )

    engine = "baichuan" if report.rehearse else "vllm"
    env = dict(os.environ)
    # gpu_check.sh installs vLLM, and the torch it pins, in a folder of its own.
    if report.vllm_site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [report.vllm_site, os.environ.get("PYTHONPATH")]))
    if report.rehearse:  # torch's CPU kernels: building ours in the server would dominate a rehearsal
        from baichuan import cpu_gemv

        env[cpu_gemv.ENV_SWITCH] = "0"
    elif not report.vllm_site and importlib.util.find_spec("vllm") is None:
        raise RuntimeError("vllm is not installed on this machine (see env.packages)")
    if importlib.util.find_spec("openai") is None:
        raise RuntimeError("the openai client is not installed (see env.packages)")
    handoff = init_checkpoint(config, work / "handoff", dtype=torch.bfloat16)
    refusal = vllm_refusal(handoff)
    report.put(
        "vllm.refusal_handoff_checkpoint",
        f"refused: {refusal}" if refusal else "accepted (vLLM's RoPE/ALiBi and NormHead guesses fit it)",
        gpu=False,
    )
    import openai

    port = free_port()
    command = [sys.executable, "-m", "baichuan.cli", "serve", "-m", str(handoff), "--engine", engine]
    command += ["--port", str(port), "--model-name", "handoff", "--max-batch", "8"]
    command += ["--max-seq-len", str(config.max_seq_len)]
    command += ["--dtype", "bf16"] if engine == "vllm" else ["--device", "cpu"]
    log = open(work / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, server, 60 if report.rehearse else 150)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
        prompt = "The quick brown fox"
        completion = client.completions.create(model="handoff", prompt=prompt, max_tokens=16, temperature=0)
        chat = client.chat.completions.create(
            model="handoff", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
        )
        theirs = completion.choices[0].text
        report.put(
            "vllm.handoff_answers",
            f"{engine} answered the openai client: completion {theirs!r}, chat "
            f"{chat.choices[0].message.content!r}",
            answered=True,
        )
        tokenizer = Tokenizer(handoff / "tokenizer.model")
        model = load_model(handoff, dtype=dtype_for(device), device=device)
        ours_ids = generate(
            model, [tokenizer.encode(prompt)], SamplingConfig(temperature=0, max_new_tokens=16)
        )[0]
        ours = tokenizer.decode(ours_ids)
        same = len(os.path.commonprefix([theirs, ours]))
        report.put(
            "vllm.handoff_vs_ours",
            f"greedy completion {'identical' if theirs == ours else 'differs'}: {engine} {theirs!r}, ours "
            f"{ours!r} (random weights: a near-tie may split them; the first {same} characters agree)",
        )
        steps = 8 if report.rehearse else 64
        for batch in (1, 8):
            _, ours_rate = decode_rates(model, model.config, device, batch, 32, steps)

            def ask() -> int:
                answer = client.completions.create(
                    model="handoff",
                    prompt=prompt,
                    max_tokens=steps,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                return answer.usage.completion_tokens

            from concurrent.futures import ThreadPoolExecutor

            start = time.perf_counter()
            with ThreadPoolExecutor(batch) as pool:
                tokens = sum(pool.map(lambda _: ask(), range(batch)))
            rate = tokens / (time.perf_counter() - start)
            report.put(
                f"vllm.decode_batch{batch}",
                f"{engine} {rate:,.1f} tok/s through its server ({batch} concurrent requests of {steps} tokens) | ours "
                f"{ours_rate:,.1f} tok/s in-process, same 2-layer checkpoint",
            )
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


SECTIONS = {
    "env": section_env,
    "bandwidth": section_bandwidth,
    "decode_bf16": lambda report: section_decode(report, "bf16"),
    "decode_int4": lambda report: section_decode(report, "int4"),
    "decode_int8": lambda report: section_decode(report, "int8"),
    "memory": section_memory,
    "layers": section_layers,
    "train": section_train,
    "cuda_tests": section_cuda_tests,
    "vllm": section_vllm,
}


# --- the driver ------------------------------------------------------------------------------------------------


def run_child(
    name: str, rehearse: bool, timeout: float, vllm_site: str | None
) -> tuple[list[dict], str | None]:
    """Run one section in a child process; (its results, why it stopped early or None)."""
    command = [sys.executable, __file__, "--section", name] + (["--rehearse"] if rehearse else [])
    command += ["--vllm-site", vllm_site] if vllm_site else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if rehearse:  # torch's CPU kernels: a build of ours (minutes) would eat a rehearsal's time boxes
        from baichuan import cpu_gemv

        env[cpu_gemv.ENV_SWITCH] = "0"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, stderr, failure = done.stdout, done.stderr, None
        if done.returncode:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            failure = f"section {name} failed: {lines[-1] if lines else f'exit status {done.returncode}'}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = f"section {name} ran past its {timeout:.0f} s"
    results = [json.loads(line[len(RESULT) :]) for line in stdout.splitlines() if line.startswith(RESULT)]
    return results, failure


def run_here(name: str, rehearse: bool) -> tuple[list[dict], str | None]:
    results: list[dict] = []
    try:
        SECTIONS[name](Report(rehearse, results.append))
    except Exception as e:
        return (
            results,
            f"section {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        )
    return results, None


def goals(found: dict[str, dict], rehearse: bool) -> dict[str, str]:
    if rehearse:
        return {key: UNMEASURED for key in GOAL_KEYS}

    def value(key: str, name: str):
        return found.get(key, {}).get("values", {}).get(name)

    out = {}
    rate, roofline = value("decode.bf16.batch1", "tok_s"), value("decode.bf16.batch1", "roofline")
    out["goal.bf16_batch1_roofline"] = (
        f"{'MET' if rate / roofline >= 0.85 else 'NOT MET'}: {100 * rate / roofline:.0f}% (goal >= 85%)"
        if rate and roofline
        else "not measured: no decode.bf16.batch1 figure"
    )
    bf16, int4 = rate, value("decode.int4.batch1", "tok_s")
    out["goal.int4_vs_bf16"] = (
        f"{'MET' if int4 / bf16 >= 2 else 'NOT MET'}: int4 {int4 / bf16:.2f}x bf16 at batch 1 (goal >= 2x)"
        if int4 and bf16
        else "not measured: no decode.int4.batch1 or decode.bf16.batch1 figure"
    )
    checks = {k: value(k, "within_published") for k in SECTION_KEYS["memory"]}
    known = {k: v for k, v in checks.items() if v is not None}
    over = [k.removeprefix("memory.") for k, v in known.items() if not v]
    out["goal.memory_vs_published"] = (
        (f"MET for all {len(known)}" if not over else f"NOT MET for {', '.join(over)}")
        + f" (of {len(checks)}; allocated GB against the published README's figures)"
        if known
        else "not measured: no GPU memory figures"
    )
    answered = value("vllm.handoff_answers", "answered")
    out["goal.vllm_answers"] = "MET" if answered else "not measured or NOT MET: see vllm.handoff_answers"
    return out


def drive(
    results_path: Path,
    rehearse: bool,
    budget: float,
    only: list[str] | None,
    in_process: bool,
    vllm_site: str | None = None,
) -> None:
    start = time.monotonic()
    found: dict[str, dict] = {}
    reasons: dict[str, str] = {}
    for name in SECTIONS:
        if only and name not in only:
            reason = "not run: left out by --only"
        else:
            left = budget - (time.monotonic() - start)
            timeout = min(TIMEOUTS[name], left)
            if timeout < 10:
                reason = f"the report's time budget of {budget:.0f} s was spent"
            else:
                results, reason = (
                    run_here(name, rehearse) if in_process else run_child(name, rehearse, timeout, vllm_site)
                )
                found.update({r["key"]: r for r in results})
                print(f"{name}: {len(results)} lines in {time.monotonic() - start:.0f} s", flush=True)
        for key in SECTION_KEYS[name]:
            reasons.setdefault(key, reason or f"section {name} did not report it")
    lines = [
        f"# benchmarks/gpu_check.sh results, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        + (" -- CPU REHEARSAL: no line below is a GPU measurement" if rehearse else ""),
        f"# python {sys.version.split()[0]}, torch {torch.__version__}; {time.monotonic() - start:.0f} s",
    ]
    for key in EXPECTED_KEYS[: -len(GOAL_KEYS)]:
        text = found[key]["text"] if key in found else f"not measured: {reasons[key]}"
        lines.append(f"{key}: {text}")
    lines += [f"{key}: {text}" for key, text in goals(found, rehearse).items()]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {results_path} ({len(lines) - 2} lines)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", type=Path, help="the results file to write")
    parser.add_argument(
        "--rehearse", action="store_true", help="CPU, tiny shapes; GPU lines marked unmeasured"
    )
    parser.add_argument("--budget-s", type=float, default=330.0, help="seconds for all sections together")
    parser.add_argument("--only", help="comma-separated sections (the others' lines say so)")
    parser.add_argument("--in-process", action="store_true", help="no child processes (tests)")
    parser.add_argument(
        "--vllm-site", help="a folder holding vLLM and its own torch, for the vLLM server only"
    )
    parser.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:  # a child: results on stdout, one JSON object a line
        emit = lambda r: print(RESULT + json.dumps(r), flush=True)  # noqa: E731
        SECTIONS[args.section](Report(args.rehearse, emit, args.vllm_site))
        return
    if args.results is None:
        parser.error("give the results file to write")
    only = args.only.split(",") if args.only else None
    drive(args.results, args.rehearse, args.budget_s, only, args.in_process, args.vllm_site)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
