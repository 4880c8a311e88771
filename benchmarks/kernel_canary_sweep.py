"""Which shapes crash, or give wrong numbers in, the native CPU kernels that the quantized layers may call.

    python benchmarks/kernel_canary_sweep.py                      # every op, under each of torch's x86 kernels
    python benchmarks/kernel_canary_sweep.py --ops int8_bf16 --capabilities avx2

Runs torch's `_weight_int8pack_mm` (bf16 and fp32 activations, also with misaligned activation and weight
buffers), `aten._weight_int4pack_mm_for_cpu` (bf16, on its own tiling) and our AVX2 kernels (`cpu_gemv`, int8 and
int4 with groups of 32-256) over awkward shapes: in_features 8*odd, 16*odd and multiples of 32, 1-17 and a few
prime row counts. Each result is compared with the float64 product of the dequantised weights: the Frobenius
norm of the error over that of |x| @ |w|.T (the scale rounding errors follow, so an output that cancels to near
zero does not count as wrong), at most 2^-8 for torch's bf16 outputs (their rounding, 2^-9, twice) and 1e-4 for
fp32 ones and ours (int16 activations). Correct results stay below 1e-3 and 1e-5; the over-reads give 6e-3 and
up, or pass unseen where the memory past a row happens to hold zeros.

The cases of one op run in a forked child of a worker process that has imported torch once; when the child dies
by a signal, the case it had started is recorded as a crash and a fresh child resumes after it, so a sweep with
hundreds of crashing shapes still takes seconds. torch's x86 kernels are chosen per process with
ATEN_CPU_CAPABILITY (avx512, avx2, default), so one AVX-512 machine sweeps the AVX2 kernels too. Threads are
pinned to one: the faults come from loads within a tile of rows, not from how tiles are shared out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

ROWS = (*range(1, 18), 19, 23, 31, 127, 131)
OPS = ("int8_bf16", "int8_fp32", "int8_bf16_misaligned", "int4_bf16", "gemv_int8", "gemv_int4")
CAPABILITIES = ("avx512", "avx2", "default")
# The ops that ATEN_CPU_CAPABILITY changes; ours are compiled for AVX2 once.
TORCH_OPS = {"int8_bf16", "int8_fp32", "int8_bf16_misaligned", "int4_bf16"}


def cases(op: str) -> list[tuple[int, ...]]:
    """(in_features, rows, out_features, activation offset, weight offset, group size) per case."""
    if op in ("int8_bf16", "int8_fp32"):
        return [(k, m, n, 0, 0, 0) for k in range(8, 273, 8) for m in ROWS for n in (16, 24, 40, 64)]
    if op == "int8_bf16_misaligned":  # offsets in elements: bf16 activations (2 bytes), int8 weights (1 byte)
        return [
            (k, m, 24, a, b, 0)
            for k in (16, 48, 64, 112, 128, 256)
            for m in (1, 2, 3, 5, 17)
            for a, b in ((1, 0), (8, 0), (16, 0), (0, 1), (0, 8))
        ]
    if op == "int4_bf16":  # out_features not a multiple of 16 too: torch must refuse them, not crash
        return [
            (k, m, n, a, 0, g)
            for g in (32, 64, 128, 256)
            for k in (g, 2 * g, 3 * g)
            for m in ROWS
            for n in (16, 24, 48, 64, 80, 176)
            for a in ((0, 1) if m in (1, 2, 5) else (0,))
        ]
    if op == "gemv_int8":  # the kernel takes in_features % 16 == 0 and refuses (raises for) the rest
        ks = (8, 24, 120, *range(16, 273, 16))
        return [(k, m, n, 0, 0, 0) for k in ks for m in ROWS for n in (1, 3, 16, 67)]
    if op == "gemv_int4":
        return [
            (k, m, n, 0, 0, g)
            for g in (32, 64, 96, 128, 160, 256)
            for k in (g, 2 * g, 3 * g)
            for m in ROWS
            for n in (1, 3, 16, 67)
        ]
    raise ValueError(op)


def run_case(op: str, case: tuple[int, ...]) -> str:
    """'ok <err>', 'wrong <err>' or 'error <message>' for one case."""
    import torch

    k, m, n, a_off, b_off, g = case
    gen = torch.Generator().manual_seed(k * 1000 + m * 10 + n)
    x = torch.randn(m, k, generator=gen)
    try:
        if op.startswith("int8") or op == "gemv_int8":
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            scales = torch.rand(n, generator=gen) * 0.01 + 1e-3
            if op == "gemv_int8":
                from baichuan import cpu_gemv

                y, tol = cpu_gemv.load().int8_gemv(x, w, scales), 1e-4
            else:
                dtype = torch.float32 if op == "int8_fp32" else torch.bfloat16
                x = _at_offset(x.to(dtype), a_off)
                w = _at_offset(w, b_off)
                scales = scales.to(dtype)
                y, tol = torch._weight_int8pack_mm(x, w, scales), 2**-8 if dtype == torch.bfloat16 else 1e-4
            w = w.double() * scales.double()[:, None]
        else:
            codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
            sz = torch.stack(
                [torch.rand(k // g, n, generator=gen) * 0.01, torch.randn(k // g, n, generator=gen) * 0.01],
                -1,
            )
            sz = sz.to(torch.bfloat16).contiguous()
            scale, zero = (sz[..., i].double().t().repeat_interleave(g, 1) for i in (0, 1))  # (n, k) each
            w = (codes.double() - 8) * scale + zero
            if op == "gemv_int4":
                from baichuan import cpu_gemv

                packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
                y, tol = cpu_gemv.load().int4_gemv(x, packed, sz, g), 1e-4
            else:
                tiled = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                x = _at_offset(x.to(torch.bfloat16), a_off)
                y, tol = torch.ops.aten._weight_int4pack_mm_for_cpu(x, tiled, g, sz), 2**-8
    except RuntimeError as e:
        return "error " + str(e).splitlines()[0][:80].replace(" ", "_")
    err = error(y, x, w)
    return f"{'ok' if err < tol else 'wrong'} {err:.1e}"


def error(y, x, w) -> float:
    """|y - x @ w.T| relative to |x| @ |w|.T (Frobenius norms, float64): the scale that rounding errors are
    proportional to. Relative to |x @ w.T| instead, a single output that cancels to near zero would fail."""
    x, w = x.double(), w.double()
    return ((y.double() - x @ w.t()).norm() / (x.abs() @ w.abs().t()).norm()).item()


def _at_offset(t, offset: int):
    """t copied into a fresh buffer `offset` elements past its (64-byte aligned) start."""
    if not offset:
        return t
    import torch

    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    return buf[offset:].view(t.shape).copy_(t)


def worker(op: str) -> None:
    """Run the cases of `op` in forked children, a fresh one after each crash; JSON results on stdout."""
    import torch

    torch.set_num_threads(1)
    if op == "int4_bf16" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        print(json.dumps({"capability": None, "results": {}, "skipped": "this torch has no CPU int4 op"}))
        return
    if op.startswith("gemv"):
        from baichuan import cpu_gemv

        if cpu_gemv.load() is None:
            print(json.dumps({"capability": None, "results": {}, "skipped": "no AVX2 kernels"}))
            return
    all_cases = cases(op)
    results: dict[int, str] = {}
    start = 0
    while start < len(all_cases):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            for i in range(start, len(all_cases)):
                os.write(write_fd, f"S {i}\n".encode())
                os.write(write_fd, f"R {i} {run_case(op, all_cases[i])}\n".encode())
            os._exit(0)
        os.close(write_fd)
        started = None
        with os.fdopen(read_fd) as lines:
            for line in lines:
                tag, i, *rest = line.split()
                if tag == "S":
                    started = int(i)
                else:
                    results[int(i)] = " ".join(rest)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and started is not None and started not in results:
            results[started] = f"crash {signal.Signals(os.WTERMSIG(status)).name}"
            start = started + 1
        elif os.WIFSIGNALED(status) or os.WEXITSTATUS(status):
            raise SystemExit(f"{op}: a child failed outside any case (status {status})")
        else:
            break
    capability = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"capability": capability, "results": {str(i): r for i, r in results.items()}}))


def summarize(op: str, results: dict[str, str]) -> list[str]:
    """One line per (outcome, in_features, offsets, group): the row counts and out_features it happened at."""
    all_cases = cases(op)
    groups: dict[tuple, tuple[set, set]] = defaultdict(lambda: (set(), set()))
    counts: dict[str, int] = defaultdict(int)
    for i, result in results.items():
        outcome = result.split()[0] if not result.startswith("error") else result
        counts[result.split()[0]] += 1
        if outcome == "ok":
            continue
        k, m, n, a_off, b_off, g = all_cases[int(i)]
        rows, outs = groups[(outcome, k, a_off, b_off, g)]
        rows.add(m)
        outs.add(n)
    errors = {
        o: [float(r.split()[1]) for r in results.values() if r.split()[0] == o] for o in ("ok", "wrong")
    }
    spread = (f", largest ok error {max(errors['ok']):.1e}" if errors["ok"] else "") + (
        f", smallest wrong error {min(errors['wrong']):.1e}" if errors["wrong"] else ""
    )
    lines = [f"  {dict(counts)}{spread}"]
    for (outcome, k, a_off, b_off, g), (rows, outs) in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1:])
    ):
        where = (
            f"in={k}"
            + (f" group={g}" if g else "")
            + (f" x+{a_off}" if a_off else "")
            + (f" w+{b_off}" if b_off else "")
        )
        lines.append(f"  {outcome:<10} {where:<24} rows {_ranges(rows)}  out {sorted(outs)}")
    return lines


def _ranges(values: set[int]) -> str:
    values, parts = sorted(values), []
    while values:
        lo = hi = values.pop(0)
        while values and values[0] == hi + 1:
            hi = values.pop(0)
        parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return ",".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    for op in args.ops:
        for capability in args.capabilities if op in TORCH_OPS else args.capabilities[:1]:
            env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--worker", op], env=env, capture_output=True, text=True
            )
            if done.returncode:
                print(f"{op} [{capability}]: worker failed\n{done.stderr[-2000:]}")
                continue
            report = json.loads(done.stdout.splitlines()[-1])
            if "skipped" in report:
                print(f"{op} [ATEN_CPU_CAPABILITY={capability}]: skipped, {report['skipped']}")
                continue
            seconds = time.perf_counter() - t0
            print(f"{op} [ATEN_CPU_CAPABILITY={capability} -> {report['capability']}] {seconds:.1f} s")
            print("\n".join(summarize(op, report["results"])), flush=True)


if __name__ == "__main__":
    main()
