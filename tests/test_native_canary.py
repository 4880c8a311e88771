"""The native CPU kernels the quantized layers may call, run over awkward shapes in a child process.

torch's packed kernels and ours are C++ that trusts its inputs: outside the shapes and alignments it was written
for it reads past a row (wrong outputs) or faults (issue 9: `torch._weight_int8pack_mm` took the interpreter
down on AVX-512 with in_features % 16 != 0). A fault in the test process would end the whole suite with no
message, so the shapes run in a child that prints one line per shape, the shape before the call and the result
after it; when the child dies by a signal, the test fails naming the signal and the shape it was running.

Covered: `Int8Linear` and `Int4Linear` (groups of 32 and the largest of 64-256 dividing in_features) with our AVX2
kernels (`cpu_gemv`) and with torch's alone, fp32 and bf16 activations, bf16 activations that start at an odd
address, int8 weights loaded from a misaligned buffer (as `load_file` of safetensors gives them); and the raw
ops, torch's where `int8pack_mm_safe` / `int4pack_mm_safe` admit them and ours where they take the shape. Shapes:
in_features 8*odd, 16*odd and multiples of 32; out_features 16 and 40; 1-17 rows and the primes 19, 23, 31, 127
and 131 (past `cpu_gemv.MAX_ROWS`). Each output is compared with the float64 product of the dequantised weight,
to the relative error the layer tests allow torch's bf16 kernels (1e-2), or 2.5e-2 for our int4 kernels, which
round activations to int8 per group (prompts in every build, decoding in the avx2 one: up to 1.0e-2 seen with a
single group of 64 and bf16 outputs); one-row over-reads gave 6e-2, NaN or 1e20 where the memory past the row did
not happen to hold zeros.
`benchmarks/kernel_canary_sweep.py` is the wider sweep, per op and per torch x86 kernel, behind these choices.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IN_FEATURES = (8, 24, 40, 104, 120, 136, 16, 48, 80, 112, 144, 208, 32, 64, 96, 128, 256)
OUT_FEATURES = (16, 40)
ROWS = (*range(1, 18), 19, 23, 31, 127, 131)
MISALIGNED_ROWS = (1, 2, 5, 17)
TOLERANCE = 1e-2
INT8_ACTIVATIONS_TOLERANCE = 2.5e-2
TIMEOUT_S = 240


def test_native_kernels_survive_awkward_shapes():
    from baichuan import cpu_gemv

    cpu_gemv.load()  # builds (once per machine) here, so the child only loads it; building runs no kernel
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.test_native_canary"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"the kernel canary ran past {TIMEOUT_S} s; last line: {_last_line(e.stdout)}"
        ) from None
    seconds = time.perf_counter() - start
    lines = done.stdout.splitlines()
    if done.returncode < 0:
        passed = sum(line.endswith(" ok") for line in lines)
        raise AssertionError(
            f"the kernel canary died of {signal.Signals(-done.returncode).name} after {passed} good shapes, "
            f"running: {_last_line(done.stdout)}"
        )
    wrong = [line for line in lines if line.endswith(" WRONG")]
    assert done.returncode == 0 and not wrong, (
        f"the kernel canary exited with {done.returncode}; {len(wrong)} wrong: {wrong[:5]}\n{done.stderr[-2000:]}"
    )
    assert lines and lines[-1].startswith("done "), done.stdout[-500:]
    print(f"{lines[-1]} in {seconds:.1f} s")  # shown with pytest -s


def _last_line(stdout: str | bytes | None) -> str:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    lines = (stdout or "").splitlines()
    return lines[-1] if lines else "(nothing printed)"


# --- the child ----------------------------------------------------------------------------------------------------


class Canary:
    def __init__(self):
        self.shapes = 0
        self.failures = 0

    def check(self, label: str, fn, args: tuple, weight: torch.Tensor, tolerance: float = TOLERANCE) -> None:
        """Print the label, compute fn(x, *rest) for args = (x, *rest), then print how far it is from
        x @ weight.T in float64."""
        print(label, end=" ", flush=True)  # before the call: a fault leaves this as the last line
        with torch.no_grad():
            y = fn(*args)
        exact = args[0].double() @ weight.double().t()
        err = ((y.double() - exact).norm() / exact.norm()).item()
        ok = err < tolerance
        self.shapes += 1
        self.failures += not ok
        print(f"{err:.1e} {'ok' if ok else 'WRONG'}", flush=True)


def _misaligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A copy of t that starts `nbytes` past a 64-byte boundary."""
    buf = torch.empty(t.numel() * t.element_size() + nbytes, dtype=torch.uint8)
    return buf[nbytes:].view(t.dtype).view(t.shape).copy_(t)


def _int4_groups(in_features: int) -> list[int]:
    return [32] + [g for g in (256, 128, 64) if in_features % g == 0][:1]


def _layers(canary: Canary, kernels: str) -> None:
    from baichuan.quant.int4 import Int4Linear
    from baichuan.quant.int8 import Int8Linear

    for in_features in IN_FEATURES:
        for out_features in OUT_FEATURES:
            linear = torch.nn.Linear(in_features, out_features, bias=False)
            with torch.no_grad():
                linear.weight.normal_(
                    0, 0.02, generator=torch.Generator().manual_seed(in_features + out_features)
                )
            int8 = Int8Linear.from_linear(linear)
            loaded = Int8Linear(in_features, out_features, device="meta")  # as from a safetensors file
            loaded.load_state_dict(
                {"weight": _misaligned(int8.weight, 8), "scales": int8.scales}, assign=True
            )
            modules = [(f"int8 {kernels}", int8)]
            modules += [
                (f"int4 g{g} {kernels}", Int4Linear.from_linear(linear, g)) for g in _int4_groups(in_features)
            ]
            # ours round int4 activations to int8 per group
            int4_tolerance = INT8_ACTIVATIONS_TOLERANCE if kernels != "torch" else TOLERANCE
            weights = [
                (
                    label,
                    m,
                    m.dequantize(torch.float64),
                    int4_tolerance if isinstance(m, Int4Linear) else TOLERANCE,
                )
                for label, m in modules
            ]
            for rows in ROWS:
                x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
                shape = f"in={in_features} out={out_features} rows={rows}"
                for label, module, w, tolerance in weights:
                    for dtype in (torch.float32, torch.bfloat16):
                        canary.check(
                            f"{label} {str(dtype)[6:]} {shape}", module, (x.to(dtype),), w, tolerance
                        )
                if rows in MISALIGNED_ROWS:
                    xb = _misaligned(x.bfloat16(), 2)
                    for label, module, w, tolerance in weights:
                        canary.check(f"{label} bf16@+2B {shape}", module, (xb,), w, tolerance)
                    canary.check(f"int8 {kernels} weight@+8B {shape}", loaded, (xb,), weights[0][2])


def _raw_ops(canary: Canary) -> None:
    """The ops themselves, where the predicates and our kernels' own checks admit them."""
    from baichuan import cpu_gemv
    from baichuan.quant.int4 import int4pack_mm_safe, pack_int4, quantize_int4
    from baichuan.quant.int8 import int8pack_mm_safe, quantize_int8
    from baichuan.quant.kernels import KERNEL_DTYPE, cpu_int4_layout

    compiled = cpu_gemv.load()
    int8pack_mm = getattr(torch, "_weight_int8pack_mm", None)
    int4pack_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    for in_features in IN_FEATURES:
        for out_features in OUT_FEATURES:
            gen = torch.Generator().manual_seed(in_features * out_features)
            weight = torch.randn(out_features, in_features, generator=gen) * 0.02
            codes8, scales8 = quantize_int8(weight)
            sb = scales8.to(KERNEL_DTYPE)
            w8, w8b = codes8.double() * scales8.double()[:, None], codes8.double() * sb.double()[:, None]
            int4 = []
            for g in _int4_groups(in_features):
                if in_features % g:
                    continue
                codes4, s, z = quantize_int4(weight, g, scale_dtype=KERNEL_DTYPE)
                scale, zero = (t.double().repeat_interleave(g, 1) for t in (s, z))  # (out, in) each
                w4 = (codes4.double() - 8) * scale + zero
                sz = torch.stack([s.t(), z.t()], -1).contiguous()
                torch_safe = int4pack_mm_safe(in_features, out_features, g) and cpu_int4_layout() is not None
                tiled = (
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.int(), 1)
                    if torch_safe
                    else None
                )
                int4.append((g, pack_int4(codes4), tiled, sz, w4))
            for rows in ROWS:
                x = torch.randn(rows, in_features, generator=gen)
                xb = x.to(KERNEL_DTYPE)
                shape = f"in={in_features} out={out_features} rows={rows}"
                if int8pack_mm_safe(xb, codes8):
                    canary.check(
                        f"torch._weight_int8pack_mm bf16 {shape}", int8pack_mm, (xb, codes8, sb), w8b
                    )
                if compiled is not None and in_features % 16 == 0:
                    canary.check(
                        f"cpu_gemv.int8_gemv fp32 {shape}", compiled.int8_gemv, (x, codes8, scales8), w8
                    )
                for g, packed, tiled, sz, w4 in int4:
                    if tiled is not None:
                        label = f"aten._weight_int4pack_mm_for_cpu g{g} bf16 {shape}"
                        canary.check(label, int4pack_mm, (xb, tiled, g, sz), w4)
                    if compiled is not None:
                        canary.check(
                            f"cpu_gemv.int4_gemv g{g} fp32 {shape}",
                            compiled.int4_gemv,
                            (x, packed, sz, g),
                            w4,
                            INT8_ACTIVATIONS_TOLERANCE,
                        )


def main() -> int:
    from baichuan import cpu_gemv

    # One thread: the faults come from loads within one tile of rows, whichever thread runs it, and these tiny
    # products on threads that wait for each other ran 9x slower on a shared 2-core machine (37.6 s against 4.2).
    torch.set_num_threads(1)
    canary = Canary()
    start = time.perf_counter()
    print(f"# torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}", flush=True)
    kernel_sets = ["avx2", "torch"] if cpu_gemv.load() is not None else ["torch"]
    load = cpu_gemv.load
    for kernels in kernel_sets:
        if kernels == "torch":  # as the `kernels` fixture of tests/quant/conftest.py does
            cpu_gemv.load = lambda: None
        try:
            _layers(canary, kernels)
        finally:
            cpu_gemv.load = load
    _raw_ops(canary)
    print(
        f"done {canary.shapes} shapes, {canary.failures} wrong, {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 1 if canary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
