"""Shared fixtures: tiny configs, access to ../shared, and the rule that CI skips nothing it could run.

Outside CI a test whose data (../shared), tool (tmux, Chromium) or test dependency is missing skips with its reason
(`-rs` prints them). Under CI=true every such skip is a failure with that reason: CI must prove what the README
claims. Only `skip_platform` skips stay skips there: they name hardware or a library version the test cannot
run on (an int4 kernel that this torch lacks, a CPU without AVX2), which no install step can provide.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baichuan.config import ALIBI, ROPE, Config
from baichuan.quant.int4 import Int4Linear

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ORACLE = SHARED / "oracle"
DATA = SHARED / "data"
VARIANTS = ("baichuan1_7b", "baichuan1_13b", "baichuan2_7b", "baichuan2_13b")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")
NOT_ON_THIS_PLATFORM = "not on this platform: "


def skip_platform(reason: str) -> None:
    """Skip, even in CI: the machine or the installed library version cannot run this test at all."""
    pytest.skip(NOT_ON_THIS_PLATFORM + reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `cuda` is a platform skip where torch sees no CUDA GPU."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            skip_platform("needs a CUDA GPU (run `pytest -m cuda` on a machine with one)")


def require_cpu_kernels() -> None:
    """Skip unless our AVX2 kernels (baichuan.cpu_gemv) are built and usable here; only a CPU without AVX2 excuses
    them in CI, not a missing compiler or a failed build."""
    from baichuan import cpu, cpu_gemv

    if cpu_gemv.load() is not None:
        return
    if not cpu.has_avx2():
        skip_platform("this CPU has no AVX2, which the kernels of baichuan.cpu_gemv need")
    pytest.skip(
        f"the AVX2 kernels of baichuan.cpu_gemv are unavailable ({cpu_gemv.ENV_SWITCH}=0, or their build failed: "
        "a C++ compiler such as g++ is needed)"
    )


def run_with_avx2(code: str) -> list[str]:
    """Python `code` in a child process with our avx2 kernel build forced (it widens each bf16 weight to fp32, on
    any CPU that runs it); the words it printed."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "BAICHUAN_CPU_ISA": "avx2"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def kernel_build(target: str):
    """The compiled kernel module of one target (`cpu.KERNEL_TARGETS`), where this CPU runs it; a platform skip
    where it cannot."""
    from baichuan import cpu, cpu_gemv

    require_cpu_kernels()
    if target not in cpu.kernel_targets():
        skip_platform(f"this CPU cannot run the {target} kernels (it runs {cpu.kernel_targets()})")
    module = cpu_gemv.load_target(target)
    assert module is not None and module.target == target
    return module


def _ci_skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """The reason of a skip that CI must not accept, or None."""
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    return None if reason.startswith(NOT_ON_THIS_PLATFORM) else reason


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (reason := _ci_skip_reason(report)) is not None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
    return report


_skipped_modules: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # A failed collection would stop the whole run, so a module skipped under CI fails the session at its end.
    report = yield
    if (reason := _ci_skip_reason(report)) is not None:
        _skipped_modules.append(f"{report.nodeid}: {reason}")
    return report


def pytest_terminal_summary(terminalreporter):
    for line in _skipped_modules:
        terminalreporter.write_line(
            f"FAILED (skipped under CI=true, where every test must run) {line}", red=True
        )


def pytest_sessionfinish(session, exitstatus):
    if _skipped_modules and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test where a fresh clone has no ../shared (a failure in CI)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (reference data beside the repo) is not available here")
    return path


@pytest.fixture(scope="module")
def amx():
    """The avx512bf16 build, where this CPU has AMX-BF16 and lets this process use the tiles."""
    module = kernel_build("avx512bf16")
    if not module.amx_ready():
        skip_platform("this CPU has no AMX-BF16 (or the kernel refuses the tiles)")
    return module


@pytest.fixture(scope="module")
def amx_int8(amx):
    """The avx512bf16 build, where this CPU has AMX-INT8 as well."""
    if not amx.amx_int8_ready():
        skip_platform("this CPU has no AMX-INT8")
    return amx


def on_one_thread(fn):
    """fn() computed with torch (and so our kernels' parallel_for) on a single thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def random_bf16_linear(generator: torch.Generator, in_features: int = 64, out_features: int = 48):
    """A bf16 `model.Linear` with a bias, weights and bias drawn from N(0, 1)."""
    from baichuan.model import Linear

    linear = Linear(in_features, out_features, bias=True).bfloat16()
    with torch.no_grad():
        linear.weight.normal_(generator=generator)
        linear.bias.normal_(generator=generator)
    return linear


def tiny_config(position: str = ROPE, norm_head: bool = False, **overrides) -> Config:
    # 10 heads for ALiBi: not a power of two, like the real 13B's 40.
    heads = 10 if position == ALIBI else 4
    dim = 80 if position == ALIBI else 64
    base = Config(
        vocab_size=512,
        dim=dim,
        n_layers=2,
        n_heads=heads,
        ffn_dim=172,
        position=position,
        norm_head=norm_head,
        max_seq_len=256,
    )
    return base.replace(**overrides)


TINY_VARIANTS = [(ROPE, False), (ALIBI, False), (ROPE, True), (ALIBI, True)]
TINY_IDS = ["rope", "alibi", "rope-normhead", "alibi-normhead"]


@pytest.fixture(params=TINY_VARIANTS, ids=TINY_IDS)
def tiny(request) -> Config:
    position, norm_head = request.param
    return tiny_config(position, norm_head)


def real_vocabulary_checkpoint(directory: Path, preset_name: str = "baichuan2-7b") -> Path:
    """A tiny random checkpoint of `preset_name`'s variant (so its chat format) whose tokenizer is the real 64k
    Baichuan vocabulary, where the role ids 195/196 are the user-defined pieces <reserved_102>/<reserved_103>."""
    import torch

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    tokenizer = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    config = preset(preset_name).replace(
        n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=64_000, max_seq_len=256
    )
    return init_checkpoint(config, directory, dtype=torch.float32, tokenizer=tokenizer)


# --- int4 products of int8-quantized activations (the avx2 kernels' and the prompt kernel's arithmetic) ---


def int8_activations(x: torch.Tensor, group_size: int):
    """The kernel's activation quantizing, op for op in fp32: xq = round(x * (127 / amax)), scale amax / 127."""
    xf = x.float().view(x.shape[0], -1, group_size)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    return torch.round(xf * inv), amax / 127  # (M, K/G, G) integers, (M, K/G, 1)


def int8_reference(x: torch.Tensor, layer: Int4Linear) -> torch.Tensor:
    """float64 of exactly the kernel's arithmetic: sum_g xs * (scale * dot(q, xq) + (zero - 8 scale) * sum(xq))."""
    xq, xs = int8_activations(x, layer.group_size)
    packed = layer.weight
    # (N, K/G, G) codes 0..15
    codes = torch.stack([packed & 15, packed >> 4], -1).view(packed.shape[0], -1, layer.group_size)
    sz = layer.scales_and_zeros.float()  # (K/G, N, 2)
    scale, c = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]  # fp32, as the kernel forms them
    dot = torch.einsum("mgk,ngk->mgn", xq.double(), codes.double())
    per_group = scale.double() * dot + c.double() * xq.double().sum(-1, keepdim=True)
    return (xs.double() * per_group).sum(1)
