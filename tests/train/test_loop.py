"""The training loop: it learns, resumes exactly, survives a kill during a save, and never saves NaN."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from baichuan.checkpoint import load_model
from baichuan.model import Baichuan, causal_lm_loss
from baichuan.train.data import PackedBatches
from baichuan.train.loop import (
    TrainConfig,
    TrainingStopped,
    checkpoint_dirs,
    resolve_precision,
    save_training_checkpoint,
    train,
)
from tests.conftest import tiny_config
from tests.train.conftest import REPO, repo_env

QUIET = dict(progress=False, tensorboard=False, plot=False, measure_peak=False, precision="fp32")


def tiny_model(seed: int = 0, **overrides) -> Baichuan:
    model = Baichuan(tiny_config(**overrides))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def random_batches(
    seed: int = 0, micro: int = 2, accum: int = 1, world: int = 1, rank: int = 0
) -> PackedBatches:
    tokens = np.random.default_rng(123).integers(3, 512, size=20_000).astype(np.uint16)
    return PackedBatches(tokens, 32, micro, accum, world, rank, seed)


class OneBatch:
    """The same batch at every step."""

    global_batch, seq_len = 4, 32

    def __init__(self):
        self.ids = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))

    def micro_batches(self, step):
        return [self.ids]

    def state_dict(self):
        return {"one": "batch"}


@pytest.mark.parametrize("norm_head", [False, True], ids=["plain-head", "normhead"])
def test_tiny_model_overfits_one_batch(tmp_path, norm_head):
    model = tiny_model(norm_head=norm_head)
    config = TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5, **QUIET)
    result = train(model, OneBatch(), config, tmp_path, say=lambda _: None)
    assert result.losses[0] > 5.5  # ln(512) = 6.2 at initialisation
    assert result.losses[-1] < 0.5, result.losses[-10:]
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step-00000060"


def test_log_files(tmp_path):
    config = TrainConfig(max_steps=3, lr=1e-3, **dict(QUIET, plot=True))
    lines = []
    train(tiny_model(), OneBatch(), config, tmp_path, say=lines.append)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,tokens,loss,lr,grad_norm,tokens_per_s,mfu,skipped"
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert lines[0] == "precision: fp32 (asked for)"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("matplotlib is not installed" in line for line in lines)
    else:
        assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_precision_says_which():
    dtype, note = resolve_precision("auto", torch.device("cpu"))
    from baichuan.cpu import half_is_emulated

    if half_is_emulated(torch.bfloat16):
        assert dtype is None and "emulates bf16" in note
    else:
        assert dtype is torch.bfloat16 and "natively" in note


def test_schedule_warmup_then_cosine():
    config = TrainConfig(max_steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert config.lr_at(0) == pytest.approx(0.1) and config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(60) == pytest.approx(0.55)  # half way down the cosine
    assert config.lr_at(110) == pytest.approx(0.1)


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    """8 steps straight vs 6 steps (checkpoint at 4), interrupted, then resumed from step 4: the same losses."""
    config = TrainConfig(max_steps=8, lr=3e-3, save_every=4, keep_last=0, **QUIET)
    full = train(tiny_model(), random_batches(), config, tmp_path / "full", say=lambda _: None).losses

    def interrupt(step, loss):
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_model(), random_batches(), config, tmp_path / "cut", say=lambda _: None, on_step=interrupt)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "cut")] == [4]
    # A different initialisation: everything must come from the checkpoint.
    resumed = train(
        tiny_model(seed=9), random_batches(), config, tmp_path / "cut", resume=True, say=lambda _: None
    )
    assert len(resumed.losses) == 4
    np.testing.assert_allclose(resumed.losses, full[4:], rtol=1e-6, atol=0)
    rows = (tmp_path / "cut" / "loss.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(i) for i in range(1, 9)]  # no duplicate of steps 5-6
    final = load_model(tmp_path / "cut" / "checkpoints" / "step-00000008")
    reference = load_model(tmp_path / "full" / "checkpoints" / "step-00000008")
    for (name, a), (_, b) in zip(final.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_refuses_other_data(tmp_path):
    config = TrainConfig(max_steps=2, save_every=2, **QUIET)
    train(tiny_model(), random_batches(), config, tmp_path, say=lambda _: None)
    with pytest.raises(ValueError, match="do not match"):
        train(
            tiny_model(),
            random_batches(seed=5),
            config.__class__(max_steps=4, **QUIET),
            tmp_path,
            resume=True,
        )


def nan_at(bad_steps: set[int]):
    """A loss function that returns NaN on the given (1-based) steps."""
    calls = {"step": 0}

    def loss_fn(logits, ids):
        calls["step"] += 1
        loss = causal_lm_loss(logits, ids)
        return loss * float("nan") if calls["step"] in bad_steps else loss

    return loss_fn


def test_nan_step_is_skipped_and_never_saved(tmp_path):
    lines = []
    config = TrainConfig(max_steps=5, lr=1e-3, save_every=1, keep_last=0, **QUIET)
    model = tiny_model()
    result = train(model, OneBatch(), config, tmp_path, loss_fn=nan_at({3}), say=lines.append)
    assert result.skipped == [3] and math.isnan(result.losses[2])
    assert all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 2)
    assert any(line.startswith("step 3: skipped (non-finite loss") for line in lines)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for _, path in checkpoint_dirs(tmp_path):
        assert all(torch.isfinite(t).all() for t in load_model(path).state_dict().values())
    csv_rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert csv_rows[3].endswith(",1") and csv_rows[4].endswith(",0")


def test_bad_steps_in_a_row_stop_the_run(tmp_path):
    config = TrainConfig(max_steps=10, lr=1e-3, save_every=1, keep_last=0, max_bad_steps=3, **QUIET)
    with pytest.raises(TrainingStopped, match="3 bad steps in a row"):
        train(tiny_model(), OneBatch(), config, tmp_path, loss_fn=nan_at({3, 4, 5, 6}), say=lambda _: None)
    # Saves go on through bad steps (they hold the last good weights); the stopping step saves nothing.
    saved = checkpoint_dirs(tmp_path)
    assert [s for s, _ in saved] == [1, 2, 3, 4]
    for _, path in saved:
        assert all(torch.isfinite(t).all() for t in load_model(path).state_dict().values())


def test_a_save_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    weights = dict(model.state_dict())
    weights["lm_head.weight"] = weights["lm_head.weight"].clone()
    weights["lm_head.weight"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite weights.*lm_head.weight"):
        save_training_checkpoint(tmp_path, 1, model.config, weights, {})
    assert checkpoint_dirs(tmp_path) == []


CHILD = """
import sys, time
from pathlib import Path
import torch
from baichuan.train import loop
from tests.train.test_loop import QUIET, random_batches, tiny_model

out = Path(sys.argv[1])
write_state = loop._write_state

def slow_write(path, state):  # the save of step 4 stops half way: weights written, state not yet
    if state["step"] == 4:
        (out / "saving").write_text("4")
        time.sleep(120)
    write_state(path, state)

loop._write_state = slow_write
config = loop.TrainConfig(max_steps=6, lr=3e-3, save_every=2, keep_last=0, **QUIET)
loop.train(tiny_model(), random_batches(), config, out, say=lambda _: None)
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(out)], env=repo_env(), cwd=REPO
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "saving").exists():
            assert child.poll() is None, "the child exited before saving step 4"
            assert time.monotonic() < deadline, "the child never reached the save of step 4"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert [s for s, _ in checkpoint_dirs(out)] == [2]
    assert any(p.name.startswith(".tmp-step-00000004") for p in (out / "checkpoints").iterdir())
    model = load_model(out / "checkpoints" / "step-00000002")  # loadable, in the official layout
    assert model.config.n_layers == 2
    # Resuming continues from step 2 and clears the abandoned half-save.
    config = TrainConfig(max_steps=6, lr=3e-3, save_every=2, keep_last=0, **QUIET)
    result = train(tiny_model(), random_batches(), config, out, resume=True, say=lambda _: None)
    assert len(result.losses) == 4
    assert [s for s, _ in checkpoint_dirs(out)] == [2, 4, 6]
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_keep_last(tmp_path):
    config = TrainConfig(max_steps=5, save_every=1, keep_last=2, **QUIET)
    train(tiny_model(), OneBatch(), config, tmp_path, say=lambda _: None)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [4, 5]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    config = TrainConfig(max_steps=3, lr=3e-3, **QUIET)
    big = train(tiny_model(), random_batches(micro=4), config, tmp_path / "a", say=lambda _: None).losses
    accum = train(tiny_model(), random_batches(micro=2, accum=2), config, tmp_path / "b", say=lambda _: None)
    np.testing.assert_allclose(accum.losses, big, rtol=1e-5)


def spike_at(step: int, factor: float = 20.0):
    """A loss function that multiplies the loss by `factor` on the given (1-based) step."""
    calls = {"step": 0}

    def loss_fn(logits, ids):
        calls["step"] += 1
        loss = causal_lm_loss(logits, ids)
        return loss * factor if calls["step"] == step else loss

    return loss_fn


def test_nan_and_spike_steps_leave_the_weights_unchanged(tmp_path):
    model, snapshots, lines = tiny_model(), {}, []

    def snapshot(step, loss):
        snapshots[step] = [p.detach().clone() for p in model.parameters()]

    calls = {"step": 0}

    def loss_fn(logits, ids):  # NaN on step 3, 20 x the loss on step 23
        calls["step"] += 1
        loss = causal_lm_loss(logits, ids)
        return {3: loss * float("nan"), 23: loss * 20}.get(calls["step"], loss)

    config = TrainConfig(max_steps=24, lr=1e-4, spike_factor=3.0, save=False, **QUIET)
    result = train(model, OneBatch(), config, tmp_path, loss_fn=loss_fn, say=lines.append, on_step=snapshot)
    assert result.skipped == [3, 23]
    unchanged = [s for s in range(2, 25) if all(map(torch.equal, snapshots[s - 1], snapshots[s]))]
    assert unchanged == [3, 23]  # every other step moved the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skipped = [line for line in lines if "skipped" in line]
    assert skipped[0].startswith("step 3: skipped (non-finite loss nan")
    assert skipped[1].startswith("step 23: skipped (loss spike") and "x running mean" in skipped[1]
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows if r.split(",")[-1] == "1"] == [3, 23]


def test_tensorboard_scalars_and_loss_png(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'baichuan-toolkit[train]'")
    pytest.importorskip("matplotlib", reason="pip install 'baichuan-toolkit[train]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(max_steps=4, lr=1e-3, **dict(QUIET, tensorboard=True, plot=True))
    result = train(tiny_model(), OneBatch(), config, tmp_path, loss_fn=nan_at({2}), say=lambda _: None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(
        events.Tags()["scalars"]
    )
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 3, 4]  # the skipped step is not plotted
    np.testing.assert_allclose([e.value for e in loss], [result.losses[i] for i in (0, 2, 3)], rtol=1e-6)
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 400 and height >= 200


def test_activation_checkpointing_recomputes_and_changes_nothing(tmp_path):
    config = TrainConfig(max_steps=3, lr=3e-3, save=False, **QUIET)
    plain = train(tiny_model(), random_batches(), config, tmp_path / "a", say=lambda _: None).losses
    model, calls = tiny_model(), []
    layer = model.model.layers[0]
    forward = layer.forward

    def counted(*args, **kwargs):  # module hooks do not fire when torch's checkpoint recomputes: count here
        calls.append(1)
        return forward(*args, **kwargs)

    layer.forward = counted
    config.activation_checkpointing = True
    recomputed = train(model, random_batches(), config, tmp_path / "b", say=lambda _: None).losses
    assert len(calls) == 6  # 3 steps, each a forward and its recomputation in the backward pass
    np.testing.assert_allclose(recomputed, plain, rtol=1e-5)


def test_flops_per_token_counts_the_matmul_weights():
    """6 FLOPs per matmul weight (all but the embeddings and norms) plus the attention products (PaLM, app. B)."""
    from baichuan.config import preset
    from baichuan.train.loop import flops_per_token

    c = preset("baichuan2-7b")
    matmul_weights = c.num_params() - c.vocab_size * c.dim - (2 * c.n_layers + 1) * c.dim
    assert matmul_weights == 7_505_973_248 - 125_696 * 4096 - 65 * 4096
    assert flops_per_token(c, 4096) == 6 * matmul_weights + 12 * 32 * 4096 * 4096


def test_mfu_is_logged_against_a_measured_peak(tmp_path):
    config = TrainConfig(max_steps=2, lr=1e-3, save=False, **dict(QUIET, measure_peak=True))
    lines = []
    train(tiny_model(), OneBatch(), config, tmp_path, say=lines.append)
    assert any(line.startswith("matmul peak for MFU: ") and "(float32)" in line for line in lines)
    rows = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    mfu = [float(row.split(",")[6]) for row in rows]
    assert all(0 < m < 1 for m in mfu), mfu  # a tiny model on one thread: well below the peak, never above


@pytest.mark.parametrize("per_256", [1e-5, 0.05], ids=["fast", "emulated"])
def test_matmul_peak_sizes_its_products_to_the_time_it_has(monkeypatch, per_256):
    """The peak measurement grows its products from 256 while three of the next size fit in half its budget: up to
    n where products are fast, and no further than 256 where one of 256 already takes 1/20 of it (bf16 on a CPU
    that emulates it, where a single 2048^3 product took 78 s). A stand-in for torch.mm that takes per_256 * (size
    / 256)^3 seconds records the sizes it is given."""
    from baichuan.train import loop

    sizes = []
    clock = [0.0]

    def mm(a: torch.Tensor, b: torch.Tensor) -> None:
        sizes.append(a.shape[0])
        clock[0] += per_256 * (a.shape[0] / 256) ** 3

    monkeypatch.setattr(loop.torch, "mm", mm)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    peak = loop.matmul_peak(torch.float32, torch.device("cpu"), seconds=1.0, n=2048)
    assert max(sizes) == (2048 if per_256 == 1e-5 else 256)
    assert peak == pytest.approx(2 * 256**3 / per_256)  # every size runs at the same rate here
    assert clock[0] < 2.0  # the budget, give or take the last product
