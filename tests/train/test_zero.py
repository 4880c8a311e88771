"""DeepSpeed ZeRO-2/3 in the training loop, run for real on DeepSpeed's CPU accelerator (gloo): the shipped
configs resolve against our flags; one process and two (through the `deepspeed` launcher, as the README launches
it) give the losses of the plain loop; a resume continues exactly; the official-layout checkpoint holds the fp32
weights; NaN and spiking steps are skipped with the weights untouched."""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from baichuan.checkpoint import load_model
from baichuan.train.pretrain import PretrainConfig, pretrain
from baichuan.train.zero import DeepSpeedConfigError, resolve_config
from tests.train.conftest import REPO, repo_env, run_processes

CONFIGS = REPO / "configs" / "deepspeed"
TINY = ["--preset", "baichuan2-7b", "--layers", "2", "--hidden", "64", "--heads", "4", "--ffn", "128",
        "--seq-len", "32", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--no-tensorboard",
        "--no-plot", "--seed", "1", "--log-every", "1"]  # fmt: skip


def deepspeed():
    return pytest.importorskip("deepspeed", reason="pip install 'baichuan-toolkit[deepspeed]'")


def losses(out: Path) -> list[float]:
    with open(out / "loss.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_model(path).state_dict().items()}


def assert_same_weights(a: Path, b: Path, rtol=1e-4, atol=1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=rtol, atol=atol, err_msg=name)


# --- the config files: no DeepSpeed needed --------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_configs_take_our_settings(stage):
    config, bf16 = resolve_config(CONFIGS / f"zero{stage}.json", 4, 2, 8, 1.0, bf16=True)
    assert config["zero_optimization"]["stage"] == stage and bf16
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 64 and config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True} and "optimizer" not in config and "scheduler" not in config
    config, bf16 = resolve_config(CONFIGS / f"zero{stage}.json", 4, 2, 8, 0.5, bf16=False)
    assert not bf16 and config["gradient_clipping"] == 0.5
    if stage == 3:  # the official-layout save reads DeepSpeed's files, but a 16-bit model save stays possible
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    "content, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            "train_micro_batch_size_per_gpu is 8 but --batch-size makes it 4",
        ),
        ({"gradient_clipping": 0.3}, "gradient_clipping is 0.3 but --grad-clip makes it 1.0"),
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 1}}, "stage must be 2 or 3"),
    ],
)
def test_config_conflicts_are_refused(tmp_path, content, message):
    config = {"zero_optimization": {"stage": 2}, **content}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    with pytest.raises(DeepSpeedConfigError, match=message):
        resolve_config(tmp_path / "ds.json", 4, 1, 1, 1.0, bf16=False)


def test_missing_deepspeed_is_one_line(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(DeepSpeedConfigError, match=r"needs the deepspeed package \(pip install"):
        pretrain(PretrainConfig(data=str(data_dir), deepspeed=str(CONFIGS / "zero2.json")))


def test_config_file_errors(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="no such file"):
        resolve_config(tmp_path / "none.json", 4, 1, 1, 1.0, bf16=False)
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        resolve_config(tmp_path / "bad.json", 4, 1, 1, 1.0, bf16=False)


def test_hostfile_reads_with_deepspeeds_parser():
    deepspeed()
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(CONFIGS / "hostfile.example"))) == {"node-1": 8, "node-2": 8}


def test_launcher_rank_flag_is_dropped(tmp_path):
    """`deepspeed $(which baichuan) pretrain` runs `baichuan --local_rank=N pretrain ...`."""
    out = subprocess.run(
        [sys.executable, "-m", "baichuan.cli", "--local_rank=0", "pretrain", "--help"],
        env=repo_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--deepspeed" in out.stdout, out.stderr


# --- real runs on DeepSpeed's CPU accelerator -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`baichuan ARGS` in one process, or under the deepspeed launcher as the README has it:
    `deepspeed --num_gpus N $(which baichuan) ARGS` (DeepSpeed's CPU accelerator takes "gpus" as processes)."""
    if nproc == 1:
        command = [sys.executable, "-m", "baichuan.cli", *args]
    else:
        script = Path(sys.executable).with_name("baichuan")
        if not script.is_file():
            pytest.fail(f"{script} is missing: install the project (pip install -e .)")
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
        command = [*launcher, "--master_port", str(free_port()), str(script), *args]
    return run_processes(command, timeout)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_dir, tokenizer_dir):
    """The loop without DeepSpeed: 4 steps of a global batch of 4, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("plain")
    cfg = PretrainConfig(
        data=str(data_dir), tokenizer=str(tokenizer_dir), out=str(out), layers=2, hidden=64, heads=4, ffn=128,
        seq_len=32, lr=3e-3, precision="fp32", progress=False, tensorboard=False, plot=False, seed=1,
        max_steps=4, batch_size=4, save_every=2, keep_last=0,
    )  # fmt: skip
    pretrain(cfg, say=lambda _: None)
    return out


def test_zero2_one_process_equals_the_plain_loop_and_resumes_exactly(
    tmp_path, plain, data_dir, tokenizer_dir
):
    deepspeed()
    data = ["--data", str(data_dir), "--tokenizer", str(tokenizer_dir)]
    args = [
        "pretrain",
        *TINY,
        *data,
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--save-every",
        "2",
        "--keep-last",
        "0",
    ]
    out = tmp_path / "z2"
    done = run([*args, "--deepspeed", str(CONFIGS / "zero2.json"), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "DeepSpeed ZeRO-2 from" in said and "precision: fp32 (DeepSpeed, bf16 off)" in said
    np.testing.assert_allclose(losses(out), losses(plain), rtol=1e-5)
    step4 = out / "checkpoints" / "step-00000004"
    assert (step4 / "deepspeed" / "zero").is_dir() and (step4 / "model.safetensors").is_file()
    assert_same_weights(plain / "checkpoints" / "step-00000004", step4)
    assert json.loads((out / "deepspeed.json").read_text())["train_batch_size"] == 4
    # Resume from step 2 (step 4 removed, as if the run had died there): the same steps 3-4 and weights.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    again = run([*args, "--deepspeed", str(CONFIGS / "zero2.json"), "--out", str(cut), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    np.testing.assert_allclose(losses(cut), losses(out), rtol=1e-6)
    assert_same_weights(step4, cut / "checkpoints" / "step-00000004", rtol=1e-6, atol=1e-7)
    # A DeepSpeed checkpoint cannot be resumed without DeepSpeed (the optimizer state is in its partitions).
    plain_resume = run([*args, "--out", str(cut), "--resume", "--max-steps", "6"])
    assert plain_resume.returncode == 1 and "Traceback" not in plain_resume.stderr


def test_zero3_two_processes_under_the_launcher_equal_one(tmp_path, plain, data_dir, tokenizer_dir):
    deepspeed()
    data = ["--data", str(data_dir), "--tokenizer", str(tokenizer_dir)]
    args = ["pretrain", *TINY, *data, "--max-steps", "4", "--batch-size", "2", "--save-every", "2"]
    done = run([*args, "--deepspeed", str(CONFIGS / "zero3.json"), "--out", str(tmp_path)], nproc=2)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    said = done.stdout + done.stderr
    assert "DeepSpeed ZeRO-3 from" in said and "global batch 4 = 2 x 1 accumulation x 2 rank(s)" in said
    np.testing.assert_allclose(losses(tmp_path), losses(plain), rtol=1e-5)
    assert_same_weights(plain / "checkpoints" / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    shards = sorted(
        p.name for p in (tmp_path / "checkpoints" / "step-00000004" / "deepspeed" / "zero").iterdir()
    )
    assert sum(name.endswith("optim_states.pt") for name in shards) == 2  # each rank wrote its partition


CHILD = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from baichuan.train import loop, zero
from tests.train.test_loop import QUIET, OneBatch, nan_at, spike_at, tiny_model

os.environ.setdefault("LOCAL_RANK", "0")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
out = Path(sys.argv[1])


def engine(config):
    model = tiny_model()
    return zero.initialize(model, loop.build_optimizer(model, config), ds_config)


def run(name, config, loss_fn):
    model, snapshots, lines = engine(config), {}, []

    def snapshot(step, loss):
        import deepspeed

        params = list(model.module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # whole weights under ZeRO-3 too
            snapshots[step] = [p.detach().clone() for p in params]

    try:
        result = loop.train(model, OneBatch(), config, out / name, loss_fn=loss_fn, say=lines.append,
                            on_step=snapshot)
        skipped, stopped = result.skipped, None
    except loop.TrainingStopped as e:
        skipped, stopped = None, str(e)
    same = {s: all(torch.equal(a, b) for a, b in zip(snapshots[s - 1], snapshots[s]))
            for s in snapshots if s - 1 in snapshots}
    finite = all(torch.isfinite(p).all().item() for ps in snapshots.values() for p in ps)
    rows = (out / name / "loss.csv").read_text().splitlines()[1:]
    return {"skipped": skipped, "stopped": stopped, "unchanged": [s for s, v in same.items() if v],
            "finite": finite, "csv_skipped": [int(r.split(",")[0]) for r in rows if r.endswith(",1")],
            "lines": [l for l in lines if "skipped" in l]}


quiet = dict(QUIET, save=False)
report = {}
for stage in (2, 3):  # one process for both: DeepSpeed takes long to import
    ds_config, _ = zero.resolve_config(f"configs/deepspeed/zero{stage}.json", 4, 1, 1, 1.0, bf16=False)
    report[stage] = {
        "nan": run(f"nan{stage}", loop.TrainConfig(max_steps=5, lr=1e-3, **quiet), nan_at({3})),
        "spike": run(
            f"spike{stage}", loop.TrainConfig(max_steps=24, lr=1e-4, spike_factor=3.0, **quiet), spike_at(23)
        ),
        "stop": run(
            f"stop{stage}", loop.TrainConfig(max_steps=8, lr=1e-3, max_bad_steps=3, **quiet), nan_at({3, 4, 5})
        ),
    }
print("REPORT " + json.dumps(report))
"""


def test_bad_steps_are_skipped_under_zero(tmp_path):
    """A NaN loss and a loss spike: the step is skipped through DeepSpeed's overflow path, logged, the weights
    are finite and unchanged by it; three bad steps in a row stop the run. ZeRO-2 and ZeRO-3."""
    deepspeed()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path)],
        env=repo_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    for stage in ("2", "3"):
        check_bad_steps(**report[stage])


def check_bad_steps(nan: dict, spike: dict, stop: dict) -> None:
    assert nan["skipped"] == [3] and nan["csv_skipped"] == [3] and nan["unchanged"] == [3] and nan["finite"]
    assert nan["lines"][0].startswith("step 3: skipped (non-finite loss nan")
    assert spike["skipped"] == [23] and spike["csv_skipped"] == [23] and spike["unchanged"] == [23]
    assert spike["lines"][0].startswith("step 23: skipped (loss spike") and spike["finite"]
    assert stop["stopped"].startswith("stopped at step 5: 3 bad steps in a row") and stop["finite"]
    assert stop["csv_skipped"] == [3, 4, 5]
