"""DeepSpeed ZeRO-2/3 under the one training loop: `baichuan pretrain --deepspeed configs/deepspeed/zero2.json`.

Launched as the original Baichuan READMEs launch their training, one process per GPU:

    deepspeed --num_gpus 8 $(which baichuan) pretrain --deepspeed configs/deepspeed/zero2.json ...
    deepspeed --hostfile=configs/deepspeed/hostfile $(which baichuan) pretrain --deepspeed ...

What is whose, and why:
- The optimizer and the schedule are ours: `loop.build_optimizer`'s AdamW (0.9/0.95, decay on matrices only)
  is handed to `deepspeed.initialize`, and the loop sets its learning rate every step from `TrainConfig.lr_at`,
  exactly as without DeepSpeed. A config with an "optimizer" or "scheduler" section is refused rather than
  half obeyed. The batch sizes, gradient clipping and bf16 come from our flags wherever the file says "auto"
  (the shipped files do); a number in the file that disagrees with a flag is refused with both values.
- DeepSpeed owns the gradients and the update (ZeRO partitions them): `engine.backward`, `engine.step`, its
  clipping and its gradient norm. A step the loop must skip (non-finite or spiking loss) is dropped through
  DeepSpeed's own overflow path: the last micro-batch's loss is made NaN, so the ZeRO optimizer finds non-finite
  gradients, skips the update and clears them, and `was_step_applied()` says so. A non-finite gradient from
  finite losses takes the same path by itself.
- bf16 under DeepSpeed means bf16 weights and activations with fp32 master weights in the ZeRO optimizer (what
  the Baichuan 2 configs do), not autocast; `bf16.enabled: "auto"` follows `--precision` (bf16 where the
  hardware computes it natively). fp16 (loss scaling) is refused: its overflow skips are routine, ours are not.
- A checkpoint is the loop's official-layout directory with DeepSpeed's own files in `deepspeed/` beside it:
  every rank writes its ZeRO partition (`engine.save_checkpoint`), then rank 0 consolidates the fp32 master
  weights from those files (DeepSpeed's `zero_to_fp32`, any stage, no gather on the devices) into
  model.safetensors. So the weights that chat/eval/serve load are the exact fp32 weights a resume continues
  from. The directory is renamed into place only once all of it is written, as without DeepSpeed.
- Without a GPU DeepSpeed runs on its CPU accelerator (gloo): slow, but the same code, so it is tested on CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from baichuan.config import Config
from baichuan.train.loop import STATE_FILE, save_training_checkpoint

STAGES = (2, 3)
TAG = "zero"  # the tag of DeepSpeed's checkpoint inside each step directory
SUBDIR = "deepspeed"
INSTALL = "pip install 'baichuan-toolkit[deepspeed]'"


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config file that does not fit this toolkit's flags; the message names the file and the fix."""


def import_deepspeed():
    """deepspeed, imported quietly (its INFO lines would flood every rank's output), or a one-line error."""
    try:
        import deepspeed
    except ImportError as e:
        raise DeepSpeedConfigError(f"--deepspeed needs the deepspeed package ({INSTALL}): {e}") from None
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def resolve_config(
    path: str | os.PathLike, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float, bf16: bool
) -> tuple[dict, bool]:
    """The config file with our settings filled where it says "auto" (or leaves a key out), checked against
    them where it gives a value. Returns (config for deepspeed.initialize, bf16 on). `bf16` is what
    `--precision` chose; a file's explicit bf16.enabled wins over it (the file is what the user wrote)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"--deepspeed {path}: no such file (see configs/deepspeed/)") from None
    except ValueError as e:
        raise DeepSpeedConfigError(f"--deepspeed {path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"--deepspeed {path}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise DeepSpeedConfigError(
                f"{path}: remove the {section!r} section: the optimizer (AdamW 0.9/0.95) and the schedule (warm-up, "
                "cosine) are the training loop's, set by --lr, --min-lr-ratio, --warmup-steps, --weight-decay"
            )
    if (config.get("fp16") or {}).get("enabled") in (True, "auto"):
        raise DeepSpeedConfigError(
            f"{path}: fp16 is not supported (Baichuan trains in bf16); set fp16.enabled false"
        )
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage not in STAGES:
        raise DeepSpeedConfigError(
            f"{path}: zero_optimization.stage must be 2 or 3 (ZeRO-2/3), not {stage!r}"
        )

    def fill(key: str, ours, flag: str, where: dict = config) -> None:
        value = where.get(key, "auto")
        if value == "auto":
            where[key] = ours
        elif value != ours:
            raise DeepSpeedConfigError(
                f'{path}: {key} is {value!r} but {flag} makes it {ours!r}; make them agree or write "auto"'
            )

    fill("train_micro_batch_size_per_gpu", micro_batch, "--batch-size")
    fill("gradient_accumulation_steps", grad_accum, "--grad-accum")
    fill("train_batch_size", micro_batch * grad_accum * world_size, "--batch-size x --grad-accum x processes")
    fill("gradient_clipping", float(grad_clip), "--grad-clip")
    section = config.setdefault("bf16", {})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = bf16
    config.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own lines would repeat it
    return config, bool(section["enabled"])


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict) -> nn.Module:
    """The DeepSpeed engine of `model`, owning `optimizer` (ours). torch.distributed must be initialized."""
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def precision_note(engine) -> str:
    if engine.bfloat16_enabled():
        return "bf16 weights and activations, fp32 master weights in the ZeRO optimizer (DeepSpeed)"
    return "fp32 (DeepSpeed, bf16 off)"


def step(
    engine,
    micro: Sequence,
    forward_loss: Callable[[object], torch.Tensor],
    judge: Callable[[float, float], str | None],
    mean_across_ranks: Callable[[torch.Tensor], float],
) -> tuple[float, float, str | None]:
    """One optimizer step over this rank's micro-batches: (mean loss over ranks, gradient norm, why it was
    skipped or None). `judge(loss, grad_norm)` decides on the loss before the last backward (see the module
    docstring for how a skip is done)."""
    total, reason = None, None
    for i, batch in enumerate(micro):
        loss = forward_loss(batch) / len(micro)
        total = loss.detach().float() if total is None else total + loss.detach().float()
        if i == len(micro) - 1:
            loss_value = mean_across_ranks(total)
            reason = judge(loss_value, 0.0)
            if reason is not None:
                loss = loss * float("nan")
        engine.backward(loss, scale_wrt_gas=False)  # divided by the micro-batches above, as without DeepSpeed
        engine.step()  # a no-op until the last micro-batch (gradient_accumulation_steps = len(micro))
    norm = engine.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None and reason is None else float("nan")
    if reason is None and not engine.was_step_applied():
        reason = f"non-finite gradient norm {grad_norm} (DeepSpeed skipped the update)"
    return loss_value, grad_norm, reason


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save(
    engine,
    out: Path,
    step: int,
    config: Config,
    trainer_state: dict,
    files: dict[str, bytes] | None,
    keep_last: int,
) -> Path | None:
    """Every rank calls this. Writes out/checkpoints/step-N (official layout + trainer_state.pt + deepspeed/)
    through one temporary directory that all ranks write into (rank 0 names it); returns the path on rank 0."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = out / "checkpoints"
    # Named with rank 0's pid, which the next save checks to clear what a killed save left.
    name = [f".tmp-step-{step:08d}-{os.getpid()}"]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    tmp = root / name[0]
    engine.save_checkpoint(str(tmp / SUBDIR), tag=TAG, save_latest=False)
    if dist.is_initialized():
        dist.barrier()  # every partition is on disk before rank 0 reads them
    if _rank() != 0:
        return None
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(tmp / SUBDIR), tag=TAG)
    trainer_state = {
        **trainer_state,
        "deepspeed": {"world_size": dist.get_world_size() if dist.is_initialized() else 1},
    }
    return save_training_checkpoint(out, step, config, weights, trainer_state, files, keep_last, tmp=tmp)


def load(engine, path: Path) -> dict:
    """Restore the engine (weights, fp32 master weights, optimizer partitions) from a checkpoint's deepspeed/;
    returns the loop's trainer state."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if "deepspeed" not in state or not (path / SUBDIR / TAG).is_dir():
        raise ValueError(
            f"{path} was not written under --deepspeed: resume it without --deepspeed, or start a DeepSpeed run "
            "from its weights with --init-from"
        )
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state["deepspeed"]["world_size"] != world:
        raise ValueError(
            f"{path} holds ZeRO partitions of {state['deepspeed']['world_size']} processes, this run has {world}: "
            "resume with the same number, or start from its weights with --init-from"
        )
    loaded, _ = engine.load_checkpoint(
        str(path / SUBDIR), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise ValueError(f"{path / SUBDIR}: DeepSpeed found no checkpoint to load")
    return state
