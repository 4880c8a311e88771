"""The training loop: pretraining, fine-tuning and the benchmarks all call `train`.

What it does, and why:
- AdamW (betas 0.9/0.95, weight decay on matrices only), linear warm-up then cosine decay to `min_lr_ratio`,
  gradient clipping and accumulation: the Baichuan 2 report's recipe.
- bf16 autocast only where the hardware computes bf16 natively (oneDNN's check on CPU, `cuda.is_bf16_supported`
  on GPU); elsewhere bf16 is emulated and slower than fp32, so fp32. The weights and optimizer stay fp32.
- A step whose loss or gradient norm is not finite, or whose loss jumps above `spike_factor` x its running mean,
  is skipped (no optimizer update) and logged; `max_bad_steps` such steps in a row stop the run. The optimizer
  never sees a NaN gradient, so no NaN weight is ever written, and a save refuses non-finite weights anyway.
- Checkpoints every `save_every` steps into `out/checkpoints/step-NNNNNNNN/`: the official layout
  (config.json + model.safetensors + the tokenizer files, so chat/eval/serve run on it as it is) plus
  trainer_state.pt (optimizer, step (the schedule and the data position are functions of it), RNG states and
  the spike detector). The directory is built under a temporary name and renamed into place, so a process
  killed during a save leaves the previous checkpoint as it was; `keep_last` of them are kept.
- `resume=True` continues from the newest complete checkpoint exactly: the weights are saved in fp32 and the
  data order is a function of the step, so the loss trajectory is the uninterrupted one.
- Logs: a rich progress bar (loss, tokens/s, MFU, ETA), `out/loss.csv`, TensorBoard scalars when the
  tensorboard package is installed, `out/loss.png` at the end when matplotlib is.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from baichuan.checkpoint import config_dict, save_checkpoint
from baichuan.config import Config
from baichuan.cpu import half_is_emulated
from baichuan.model import causal_lm_loss

CSV_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "skipped")
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


class Batches(Protocol):
    global_batch: int
    seq_len: int

    def micro_batches(self, step: int) -> list[torch.Tensor]: ...

    def state_dict(self) -> dict: ...


class TrainingStopped(RuntimeError):
    """Too many bad (non-finite or spiking) steps in a row; the message says which and what to try."""


@dataclass
class TrainConfig:
    max_steps: int
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 5% of max_steps, at least 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping (the norm is still computed and logged)
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32
    activation_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    save: bool = True  # False: no checkpoints at all (benchmarks)
    keep_last: int = 3  # 0: keep every checkpoint
    log_every: int = 1
    max_bad_steps: int = 5
    spike_factor: float = 0.0  # 0: off; else skip a step whose loss > factor x running mean (after 20 steps)
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    measure_peak: bool = True  # time a matmul at the start for MFU's denominator

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup()` steps, then cosine decay to lr * min_lr_ratio at max_steps."""
        warmup = self.warmup()
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.max_steps - warmup)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    losses: list[float]  # per step of this run, nan for a skipped step
    skipped: list[int]
    last_checkpoint: Path | None
    precision: str


@dataclass
class WeightsIO:
    """How checkpoints hold the weights when they are not a whole model in the official layout (a LoRA run
    keeps only its adapter). `save(directory, weights)` writes what it wants of the full state dict into the
    checkpoint directory (which exists); `load(directory)` reads it back, and the loop loads that part only."""

    save: Callable[[Path, Mapping[str, torch.Tensor]], None]
    load: Callable[[Path], dict[str, torch.Tensor]]


# --- precision and FLOPs ------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, a sentence saying which and why)."""
    if precision == "fp32":
        return None, "fp32 (asked for)"
    if precision == "fp16":
        # fp16's range is narrow: without loss scaling small gradients flush to zero and large ones overflow,
        # which is how the originals' users got zero or NaN losses. Scaled, an overflow step is skipped.
        return torch.float16, (
            "fp16 autocast with dynamic loss scaling, fp32 weights (asked for). Warning: prefer bf16 where the "
            "hardware has it; a step whose scaled gradients overflow is skipped and the scale lowered"
        )
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = "this GPU"
    else:
        native = not half_is_emulated(torch.bfloat16)
        where = "this CPU"
    if precision == "bf16":
        note = "" if native else f" ({where} only emulates bf16: expect it slower than fp32)"
        return torch.bfloat16, f"bf16 autocast (asked for){note}"
    if precision != "auto":
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {precision!r}")
    if native:
        return torch.bfloat16, f"bf16 autocast, fp32 weights ({where} computes bf16 natively)"
    return None, f"fp32 ({where} only emulates bf16, which would be slower)"


def flops_per_token(config: Config, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward, as the PaLM paper counts them (appendix B): 6 per
    weight of every matmul (embeddings excluded, the output head included) plus the attention products,
    12 * layers * hidden * seq_len. Recomputation under activation checkpointing is not model FLOPs."""
    d, f, L, V = config.dim, config.ffn_dim, config.n_layers, config.vocab_size
    matmul_params = L * (4 * d * d + 3 * d * f) + V * d
    return 6 * matmul_params + 12 * L * d * seq_len


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0, n: int = 2048) -> float:
    """FLOP/s of the best square matmul in `dtype` here, n x n at most: the denominator of MFU, measured, not a
    datasheet's. It takes about `seconds` on any hardware: the size doubles from 256 while three products of the
    next size, as predicted from this one's, fit in half the budget. A dtype the CPU only emulates is slow (bf16
    on a Zen 3: one 2048^3 product took 78 s, and the three a measurement needs held up every bf16 run by 4
    minutes); there it stays small."""
    # Its own generator: drawing from the global one would change a resumed run's dropout after its RNG restore.
    generator = torch.Generator(device=device).manual_seed(0)

    def operands(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(size, size, device=device, generator=generator).to(dtype) for _ in range(2))

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    deadline = time.perf_counter() + seconds
    size = min(n, 256)
    a, b = operands(size)
    once = min(timed(a, b) for _ in range(2))  # the first call may pay a library's start-up
    while 2 * size <= n and 3 * 8 * once <= seconds / 2:
        size *= 2
        a, b = operands(size)
        once = timed(a, b)
    best = float("inf")
    for i in range(1000):
        best = min(best, timed(a, b))
        if i >= 2 and time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


# --- distributed helpers -------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _mean_across_ranks(value: torch.Tensor) -> float:
    if _distributed():
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def unwrap(model: nn.Module) -> nn.Module:
    """The Baichuan inside a DDP wrapper or a DeepSpeed engine (FSDP2 shards the model in place; no wrapper)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or _is_deepspeed(model):
        return model.module
    return model


def _is_deepspeed(model: nn.Module) -> bool:
    """A DeepSpeed engine (built by train/zero.py), told by its class so that deepspeed is not imported here."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__)


def _is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole (unsharded) model and optimizer state on CPU, for rank 0 to save. Every rank must call it."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    module = unwrap(model)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}, optimizer.state_dict()


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim: dict, strict: bool = True
) -> None:
    """`strict=False`: `weights` is part of the model (the trainable parameters of a LoRA run)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim, options=options)
        return
    result = unwrap(model).load_state_dict(weights, strict=strict)
    if result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights the model does not have: {', '.join(result.unexpected_keys[:5])}"
        )
    optimizer.load_state_dict(optim)


# --- checkpoints ---------------------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under out/checkpoints, oldest first. A directory is complete once renamed to
    step-N, which happens after all its files are written and fsynced."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_training_checkpoint(
    out: Path,
    step: int,
    config: Config,
    weights: Mapping[str, torch.Tensor],
    trainer_state: dict,
    files: Mapping[str, bytes] | None = None,
    keep_last: int = 0,
    save_weights: Callable[[Path, Mapping[str, torch.Tensor]], None] | None = None,
    tmp: Path | None = None,
) -> Path:
    """Write out/checkpoints/step-{step}: built as a hidden temporary directory (weights and config.json by
    `save_checkpoint`, then trainer_state.pt, all fsynced), then renamed into place in one step."""
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"refusing to save non-finite weights at step {step}: {', '.join(bad[:5])}")
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    final = root / f"step-{step:08d}"
    if tmp is None:  # else: it holds part of this checkpoint already (DeepSpeed's files, from every rank)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
    if save_weights is None:
        save_checkpoint(tmp, config_dict(config, torch.float32), dict(weights), files=files)
    else:
        tmp.mkdir()
        save_weights(tmp, weights)
    _write_state(tmp / STATE_FILE, trainer_state)
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it whole
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for _, path in checkpoint_dirs(out)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _write_state(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned(root: Path) -> None:
    """Temporary directories of saves whose process is gone (killed during a save)."""
    for path in root.glob(".*-step-*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_training_checkpoint(
    path: Path, load_weights: Callable[[Path], dict[str, torch.Tensor]] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    from baichuan.checkpoint import weight_files

    weights: dict[str, torch.Tensor] = {}
    if load_weights is not None:
        weights = load_weights(path)
    for file in weight_files(path) if load_weights is None else []:
        weights.update(load_file(str(file)))
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return weights, state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- logs ------------------------------------------------------------------------------------------------------


class _Logs:
    """loss.csv, TensorBoard and the progress bar, on rank 0 only."""

    def __init__(self, out: Path, config: TrainConfig, start_step: int, say: Callable[[str], None]):
        self.out, self.config, self.say = out, config, say
        self.csv_path = out / "loss.csv"
        rows = []
        if start_step and self.csv_path.is_file():  # a resumed run drops the rows after its checkpoint
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.csv_file = open(self.csv_path, "w", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS)
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.csv_file.flush()
        self.tb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                say(
                    "TensorBoard scalars off: the tensorboard package is not installed (pip install "
                    "'baichuan-toolkit[train]')"
                )
        self.progress = None
        if config.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("train", total=config.max_steps, completed=start_step, info="")
            self.progress.start()

    def step(self, row: dict) -> None:
        self.csv.writerow(row)
        self.csv_file.flush()
        step = row["step"]
        if self.tb is not None and not row["skipped"]:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if row[key] != "" and math.isfinite(float(row[key])):
                    self.tb.add_scalar(f"train/{key}", float(row[key]), step)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] != "" else "n/a"
        info = f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s  MFU {mfu}  {_memory()}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step % self.config.log_every == 0 or step == self.config.max_steps:
            self.say(f"step {step}/{self.config.max_steps}  {info}  lr {row['lr']:.3g}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.csv_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.config.plot:
            plot_losses(self.csv_path, self.out / "loss.png", self.say)


def plot_losses(csv_path: Path, png: Path, say: Callable[[str], None] = print) -> bool:
    """loss.csv -> a loss-curve PNG; says so and returns False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("no loss.png: matplotlib is not installed (pip install 'baichuan-toolkit[train]')")
        return False
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["skipped"] in ("0", "False", "")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


# --- the loop ------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linears, embeddings, the head) and none on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def train(
    model: nn.Module,
    batches: Batches,
    config: TrainConfig,
    out: str | os.PathLike,
    resume: bool = False,
    files: Mapping[str, bytes] | None = None,
    device: torch.device | str | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    say: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    weights_io: WeightsIO | None = None,
) -> TrainResult:
    """Train `model` (a Baichuan, possibly wrapped in DDP or sharded by FSDP2) on `batches` for
    `config.max_steps` steps, writing checkpoints and logs under `out`. `files` (name -> bytes: the tokenizer)
    go into every checkpoint. `loss_fn(logits, ids)` defaults to next-token cross entropy plus the model
    config's max-z loss. `on_step(step, loss)` is called after each step (tests use it). A micro-batch is a
    (B, T) tensor of ids, which are also the labels, or a mapping of `input_ids`, `labels` (-100: no loss) and an
    optional `attention_mask` (fine-tuning). `weights_io`: checkpoints hold part of the weights (LoRA)."""
    out = Path(out)
    main = _rank() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    say = say or print
    speak = say if main else (lambda _: None)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    base = unwrap(model)
    model_config: Config = base.config
    loss_fn = loss_fn or (lambda logits, ids: causal_lm_loss(logits, ids, model_config.z_loss_weight))
    engine = _is_deepspeed(model)  # DeepSpeed owns the optimizer step: train/zero.py does its part
    if engine:
        from baichuan.train import zero

        if weights_io is not None:
            raise ValueError("DeepSpeed checkpoints hold the whole model; weights_io does not go with it")
        autocast_dtype, precision_note = None, zero.precision_note(model)  # DeepSpeed casts the weights
    else:
        autocast_dtype, precision_note = resolve_precision(config.precision, device)
    compute_dtype = torch.bfloat16 if engine and model.bfloat16_enabled() else autocast_dtype or torch.float32
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype is torch.float16 and not engine else None
    speak(f"precision: {precision_note}")
    if config.activation_checkpointing:
        base.model.gradient_checkpointing = True

    optimizer = model.optimizer if engine else build_optimizer(model, config)  # DeepSpeed's wraps ours
    start_step, bad_in_row, ema, ema_steps = 0, 0, 0.0, 0
    found = checkpoint_dirs(out) if resume else []
    if resume and not found:
        speak(f"--resume: no checkpoint under {out / 'checkpoints'}; starting from step 0")
    if found:
        step, path = found[-1]
        if engine:
            state = zero.load(model, path)
        else:
            weights, state = load_training_checkpoint(path, weights_io and weights_io.load)
        if state["data"] != batches.state_dict():
            raise ValueError(
                f"{path}: the data do not match the checkpoint's ({state['data']} vs {batches.state_dict()}); "
                "resume with the same data, seed, sequence length and global batch"
            )
        if not engine:
            if "deepspeed" in state:
                raise ValueError(
                    f"{path} was written under --deepspeed (the optimizer state is in DeepSpeed's partitions): "
                    "resume it with --deepspeed, or start from its weights with --init-from"
                )
            load_full_state(model, optimizer, weights, state["optimizer"], strict=weights_io is None)
        _set_rng_state(state["rng"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, bad_in_row = state["step"], state["bad_in_row"]
        ema, ema_steps = state["loss_ema"], state["loss_ema_steps"]
        speak(f"resumed from {path} (step {start_step})")
    else:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
    if start_step >= config.max_steps:
        speak(f"nothing to do: the checkpoint is at step {start_step}, max_steps is {config.max_steps}")

    world = dist.get_world_size() if _distributed() else 1
    tokens_per_step = batches.global_batch * batches.seq_len
    flops_token = flops_per_token(model_config, batches.seq_len)
    peak = None
    if config.measure_peak:
        peak = matmul_peak(compute_dtype, device) * world  # each rank measures its share
        speak(f"matmul peak for MFU: {peak / 1e9:,.1f} GFLOP/s ({str(compute_dtype)[6:]})")
    logs = _Logs(out, config, start_step, speak) if main else None
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    losses, skipped, last = [], [], None

    def judge(loss_value: float, grad_norm: float) -> str | None:
        """Why a step is skipped (a non-finite loss or gradient norm, or a loss spike), or None."""
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            return f"non-finite loss {loss_value} / grad norm {grad_norm}"
        if config.spike_factor and ema_steps >= 20 and loss_value > config.spike_factor * ema:
            return f"loss spike {loss_value:.4f} > {config.spike_factor:g} x running mean {ema:.4f}"
        return None

    model.train()
    try:
        for step in range(start_step, config.max_steps):
            t0 = time.perf_counter()
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = batches.micro_batches(step)
            if engine:
                loss_value, grad_norm, reason = zero.step(
                    model,
                    [_to_device(b, device) for b in micro],
                    lambda batch: _forward_loss(model, batch, loss_fn),
                    judge,
                    _mean_across_ranks,
                )
            else:
                total = torch.zeros((), device=device)
                for i, ids in enumerate(micro):
                    ids = _to_device(ids, device)
                    with _no_sync(model, last_micro=i == len(micro) - 1):
                        with autocast:
                            loss = _forward_loss(model, ids, loss_fn) / len(micro)
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    total += loss.detach().float()
                loss_value = _mean_across_ranks(total)
                if scaler is not None:
                    scaler.unscale_(optimizer)
                clip = config.grad_clip if config.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                reason = judge(loss_value, grad_norm)
            # An overflow of fp16's scaled gradients is routine while the scale settles: skipped, not a bad step.
            overflow = scaler is not None and math.isfinite(loss_value) and not math.isfinite(grad_norm)
            if reason is None:
                if scaler is not None:
                    scaler.step(optimizer)
                elif not engine:
                    optimizer.step()
                bad_in_row = 0
                ema = loss_value if ema_steps == 0 else 0.95 * ema + 0.05 * loss_value
                ema_steps += 1
            elif overflow:
                skipped.append(step + 1)
                speak(
                    f"step {step + 1}: skipped (fp16 overflow); loss scale lowered to {scaler.get_scale() / 2:g}"
                )
            else:
                bad_in_row += 1
                skipped.append(step + 1)
                speak(f"step {step + 1}: skipped ({reason}); {bad_in_row} bad step(s) in a row")
            if scaler is not None:
                scaler.update()
            if not engine:
                optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            losses.append(loss_value if reason is None else float("nan"))
            if logs is not None:
                # Fine-tuning rows are cut to each micro-batch's longest: count the tokens computed.
                rate = sum(_n_tokens(b) for b in micro) * world / seconds
                logs.step(
                    {
                        "step": step + 1,
                        "tokens": (step + 1) * tokens_per_step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": rate,
                        "mfu": rate * flops_token / peak if peak else "",
                        "skipped": int(reason is not None),
                    }
                )
            if on_step is not None:
                on_step(step + 1, loss_value)
            if bad_in_row >= config.max_bad_steps:
                raise TrainingStopped(
                    f"stopped at step {step + 1}: {bad_in_row} bad steps in a row (last: {reason}). The weights "
                    "are those of the last good step; lower --lr, raise --warmup-steps or check the data, then "
                    "--resume from the last checkpoint"
                )
            done = step + 1 == config.max_steps
            if config.save and ((config.save_every and (step + 1) % config.save_every == 0) or done):
                weights, optim = ({}, None) if engine else full_state(model, optimizer)
                state = {
                    "step": step + 1,
                    "optimizer": optim,
                    "rng": _rng_state(),
                    "data": batches.state_dict(),
                    "bad_in_row": bad_in_row,
                    "loss_ema": ema,
                    "loss_ema_steps": ema_steps,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "train_config": asdict(config),
                }
                if engine:  # every rank writes its ZeRO partition
                    last = zero.save(model, out, step + 1, model_config, state, files, config.keep_last)
                elif main:
                    last = save_training_checkpoint(
                        out,
                        step + 1,
                        model_config,
                        weights,
                        state,
                        files,
                        config.keep_last,
                        weights_io and weights_io.save,
                    )
                if _distributed():
                    dist.barrier()  # nobody runs ahead (or exits) while rank 0 writes
    finally:
        if logs is not None:
            logs.close()
    return TrainResult(losses, skipped, last, precision_note)


def _n_tokens(batch) -> int:
    return (batch["input_ids"] if isinstance(batch, Mapping) else batch).numel()


def _memory() -> str:
    """Peak memory so far: the GPU's allocations, or the process's peak resident set on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    try:
        import resource

        return f"mem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"  # KiB on Linux
    except (ImportError, OSError):
        return ""


def _to_device(batch, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _forward_loss(model: nn.Module, batch, loss_fn) -> torch.Tensor:
    if isinstance(batch, Mapping):
        loss = loss_fn(model(batch["input_ids"], attention_mask=batch.get("attention_mask")), batch["labels"])
        # loss_scale: the micro-batch's share of the step's loss, when its parts weigh unequally (a token
        # mean over the whole global batch, whose micro-batches hold different numbers of labelled tokens).
        return loss * batch["loss_scale"] if "loss_scale" in batch else loss
    return loss_fn(model(batch), batch)


def _no_sync(model: nn.Module, last_micro: bool):
    """Gradient accumulation under DDP/FSDP2: synchronise gradients only on the last micro-batch."""
    if last_micro:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def paused():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return paused()
    return contextlib.nullcontext()
