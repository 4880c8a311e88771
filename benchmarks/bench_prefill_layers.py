"""Prompt-sized products of single bf16/int8/int4 layers on the CPU, the paths compared in one process, interleaved
(A, B, C, A, B, C, ...), median milliseconds per product and the rate in prompt tokens per second.

    PYTHONPATH=. python benchmarks/bench_prefill_layers.py                       # the 1.29B layer shapes, 512 rows
    PYTHONPATH=. python benchmarks/bench_prefill_layers.py --rows 128,512 --reps 5
    BAICHUAN_CPU_ISA=avx2 PYTHONPATH=. python benchmarks/bench_prefill_layers.py
    PYTHONPATH=. python benchmarks/bench_prefill_layers.py --paths bf16,int4      # only the paths so named

Paths (bf16 activations, as a bf16 model's prompt has):
  bf16 ours       model.Linear on the bf16 weight (what the bf16 model runs): with the avx2 build where bf16 is
                  emulated, our prompt kernel `bf16_matmul`; with the avx512bf16 build on a CPU with AMX, up to
                  `cpu.AMX_BF16_MAX_ROWS` rows, our AMX kernel `amx_bf16_matmul`; elsewhere torch's GEMM (fp32 on
                  a widened copy where bf16 is emulated).
  bf16 widened    model.Linear with cpu_gemv.BF16_PROMPTS off: torch's fp32 GEMM on a widened copy where bf16 is
                  emulated (the bf16 prompt path before), else torch's bf16 GEMM.
  bf16 torch      F.linear on the bf16 weight: torch's own bf16 GEMM.
  int8 ours       Int8Linear's prompt path: with the avx2 build, `int8_matmul_int16` (the decode kernel's int16
                  activations and integer sums in GEMM blocking); with the AVX-512 ones as int8 dequant+mm.
  int8 dequant+mm Int8Linear's prompt path with kernels.INT8_INT16_PROMPTS off: tiles dequantized by our module,
                  one GEMM of torch's a tile.
  int8 decode kernel / int8 prompt kernel
                  our module's `int8_gemv` and `int8_matmul_int16` called directly, at any row count (where
                  `INT8_PROMPT_MIN_ROWS` should lie; every build has both).
  int8 torch      torch._weight_int8pack_mm (Int8Linear's prompt path before).
  int8 _int_mm    activations quantized to int8 per row, torch._int_mm (oneDNN, VNNI), scaled back: not used by
                  the layers (int8 activations cost accuracy), measured to know what it would give.
  int4 ours       Int4Linear's prompt path: activations quantized to int8 per group and multiplied by the codes
                  (`int4_matmul_int8`: VNNI in the AVX-512 builds, `vpmaddubsw` in the avx2 one).
  int4 dequant+mm Int4Linear's prompt path with kernels.INT4_INT8_ACTIVATIONS off: as int8 ours (where bf16 is
                  emulated and the avx2 build runs, as on a Zen 3: the decode kernel `int4_gemv` instead).
  int4 dequant    the whole weight dequantized by torch ops, then F.linear (Int4Linear's prompt path before).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from baichuan import cpu_gemv
from baichuan.model import Linear
from baichuan.quant import kernels
from baichuan.quant.int4 import Int4Linear
from baichuan.quant.int8 import Int8Linear

SHAPES = ((1536, 1536), (4608, 1536), (4096, 1536), (1536, 4096))  # (out, in) of the 1.29B benchmark model


def int_mm(x: torch.Tensor, codes_t: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    s = xf.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    xq = (xf / s).round_().to(torch.int8)
    return (torch._int_mm(xq, codes_t).float() * s * scales).to(x.dtype)


def switched_off(switch: str, fn, owner=kernels):
    """fn with the boolean owner.<switch> off while it runs."""

    def run():
        setattr(owner, switch, False)
        try:
            return fn()
        finally:
            setattr(owner, switch, True)

    return run


def prompt_kernel(module, x: torch.Tensor, q8: Int8Linear, scales32: torch.Tensor):
    out = torch.empty(x.shape[0], q8.out_features)
    return lambda: module.int8_matmul_int16(x, q8.weight, scales32, out)


def layer_paths(x: torch.Tensor, bf16_layer: Linear, q8: Int8Linear, q4: Int4Linear) -> dict:
    codes_t, scales32 = q8.weight.t(), q8.scales.float()  # (in, out), column-major
    module = cpu_gemv.load()
    ours = {}
    if module is not None:
        ours["int8 decode kernel"] = lambda: module.int8_gemv(x, q8.weight, scales32)
        ours["int8 prompt kernel"] = prompt_kernel(module, x, q8, scales32)
    return {
        "bf16 ours": lambda: bf16_layer(x),
        "bf16 widened": switched_off("BF16_PROMPTS", lambda: bf16_layer(x), owner=cpu_gemv),
        "bf16 torch": lambda: F.linear(x, bf16_layer.weight),
        "int8 ours": lambda: q8(x),
        "int8 dequant+mm": switched_off("INT8_INT16_PROMPTS", lambda: q8(x)),
        **ours,
        "int8 torch": lambda: torch._weight_int8pack_mm(x, q8.weight, q8.scales),
        "int8 _int_mm": lambda: int_mm(x, codes_t, scales32),
        "int4 ours": lambda: q4(x),
        "int4 dequant+mm": switched_off("INT4_INT8_ACTIVATIONS", lambda: q4(x)),
        "int4 dequant": lambda: F.linear(x, q4.dequantize(torch.bfloat16)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="512", help="comma-separated activation row counts")
    p.add_argument("--reps", type=int, default=7, help="rounds of every path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--paths", default=None, help="comma-separated name prefixes of the paths to run (default all)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = cpu_gemv.load()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {module and module.target}"
    )
    torch.manual_seed(0)
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            linear = torch.nn.Linear(in_f, out_f, bias=False)
            torch.nn.init.normal_(linear.weight, 0, 0.02)
            bf16_layer = Linear(in_f, out_f, bias=False).bfloat16()
            bf16_layer.weight.copy_(linear.weight)
            q8 = Int8Linear.from_linear(linear, torch.bfloat16)
            q4 = Int4Linear.from_linear(linear, 128)
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, in_f).bfloat16()
                paths = layer_paths(x, bf16_layer, q8, q4)
                if args.paths:
                    wanted = [w.strip() for w in args.paths.split(",")]
                    paths = {n: f for n, f in paths.items() if any(n.startswith(w) for w in wanted)}
                times = {name: [] for name in paths}
                for _ in range(args.reps + 1):  # the first round warms up and is dropped
                    for name, fn in paths.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                cells = []
                for name, t in times.items():
                    ms = 1e3 * statistics.median(t[1:])
                    cells.append(f"{name} {ms:.2f} ms ({m / ms * 1e3:,.0f} tok/s)")
                print(f"{out_f}x{in_f}, {m} rows: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
