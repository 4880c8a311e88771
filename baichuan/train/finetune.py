"""Supervised fine-tuning: `baichuan finetune`. Full fine-tuning, LoRA through peft, and QLoRA (LoRA over a
quantized base: bitsandbytes NF4 on CUDA, this toolkit's int8/int4 on CPU), on the one training loop.

The recipe defaults are those of the original `fine-tune/fine-tune.py` and the command of the Baichuan2 README:
AdamW with betas 0.9/0.98, eps 1e-8, weight decay 1e-4, lr 2e-5 for full fine-tuning (2e-4 for LoRA, whose
few parameters start at zero), a constant schedule without warm-up (cosine selectable), clipping at 1.0,
model_max_length 512, LoRA on W_pack. The data and its masks: `sft_data`.

Outputs in `output_dir`: a full fine-tune writes a checkpoint in the official layout (the base's dtype, its
tokenizer and generation config); a LoRA run writes a peft adapter directory (adapter_config.json names the
base) that `peft.AutoPeftModelForCausalLM`, `baichuan chat --lora` and `baichuan merge-lora` load. Step
checkpoints for `resume` go to output_dir/checkpoints, the losses to loss.csv and loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from baichuan.checkpoint import config_dict, load_model, read_json, save_checkpoint
from baichuan.config import ConfigError
from baichuan.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, make_quantized_trainable
from baichuan.train.distributed import launcher_ranks, process_group, shard_fsdp2, training_device
from baichuan.train.loop import TrainConfig, TrainResult, WeightsIO, load_training_checkpoint, train
from baichuan.train.sft_data import IGNORE_INDEX, SFTBatches, read_sft, tokenize_all

LORA_TARGETS = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")  # the linears of every layer
FULL_LR, LORA_LR = 2e-5, 2e-4
SCHEDULES = ("constant", "cosine")
STRATEGIES = ("ddp", "fsdp")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class FinetuneConfig:
    # inputs and outputs
    model: str | None = None  # the base checkpoint directory
    data: str | None = None  # a .json/.jsonl file of conversations, alpaca or OpenAI messages records
    output_dir: str = "runs/finetune"
    tokenizer: str | None = None  # default: the model directory's
    format: str = "auto"  # auto | conversations | alpaca | messages
    strict: bool = False  # a bad record stops the run instead of being skipped
    model_max_length: int = 512
    pack: bool = False
    user_token_id: int = 195
    assistant_token_id: int = 196
    # method
    lora: bool = False
    lora_target: tuple[str, ...] = ("W_pack",)
    lora_r: int = 8
    lora_alpha: float = 32.0  # the original's
    lora_dropout: float = 0.1  # the original's
    quantize: int | None = None  # LoRA over a quantized base: 8 or 4 (CPU: int8/int4; CUDA: 4 = NF4)
    # batches and schedule
    batch_size: int = 4  # examples per micro-batch per rank
    grad_accum: int = 1
    epochs: float = 1.0  # used when max_steps is not given
    max_steps: int | None = None
    lr: float | None = None  # default: 2e-5 full, 2e-4 LoRA
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine schedule's floor
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 | fp16 (with loss scaling, and a warning)
    # None: on for LoRA, off for full fine-tuning. LoRA's frozen base has no gradients or Adam states, so the
    # activations are most of what is left (as LLaMA-Factory, we recompute them); a full fine-tune's memory is
    # mostly weights, gradients and Adam states, where recomputing costs a third more time for a fifth less.
    gradient_checkpointing: bool | None = None
    max_bad_steps: int = 5
    # checkpoints and logs
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    # hardware and scale
    device: str = "auto"
    strategy: str = "ddp"
    deepspeed: str | None = None

    def train_config(self, max_steps: int) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        values.update(
            max_steps=max_steps,
            lr=self.learning_rate(),
            min_lr_ratio=1.0 if self.schedule == "constant" else self.min_lr_ratio,
            activation_checkpointing=self.checkpointing(),
        )
        return TrainConfig(**values)

    def checkpointing(self) -> bool:
        return self.lora if self.gradient_checkpointing is None else self.gradient_checkpointing

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.lora else FULL_LR)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a YAML or TOML file: FinetuneConfig field names, with '-' or '_'."""
    from baichuan.train.pretrain import read_settings_file

    values = read_settings_file(path)
    known = {f.name for f in fields(FinetuneConfig)}
    settings = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if isinstance(settings.get("lora_target"), (list, str)):
        target = settings["lora_target"]
        settings["lora_target"] = tuple(target.split(",") if isinstance(target, str) else target)
    return settings


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_weight: float = 0.0) -> torch.Tensor:
    """The SUM over labelled positions of next-token cross entropy, plus Baichuan2's max-z term over the same
    positions (padding and prompts weigh nothing). `SFTBatches` scales it to the mean over the global batch's
    labelled tokens, which the original's per-micro-batch mean equals for one micro-batch on one process; it
    also keeps 2 processes equal to 1, and accumulation equal to a larger batch."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    flat = shift_logits.reshape(-1, shift_logits.shape[-1])
    loss = F.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss_weight:
        kept = shift_labels.reshape(-1) != IGNORE_INDEX
        loss = loss + z_loss_weight * flat[kept].max(dim=-1).values.pow(2).sum()
    return loss


def check_lora_targets(model: nn.Module | None, targets: tuple[str, ...]) -> None:
    """Every target must name linears of the model (None: of any Baichuan); the error lists those that exist."""
    linears = list(LORA_TARGETS)
    if model is not None:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.startswith("model.layers.")}
        linears = [n for n in LORA_TARGETS if n in names]
    unknown = [t for t in targets if t not in linears]
    if not targets or unknown:
        fused = (
            " (q, k and v are fused in W_pack)"
            if any(t in ("q_proj", "k_proj", "v_proj") for t in unknown)
            else ""
        )
        raise ConfigError(
            f"unknown LoRA target(s) {', '.join(unknown) or '(none given)'}{fused}: this model's linear layers "
            f"are {', '.join(linears)}"
        )


# --- tokenizer and data -------------------------------------------------------------------------------------


def tokenizer_dir(cfg: FinetuneConfig) -> Path:
    directory = Path(cfg.tokenizer or cfg.model)
    model_file = directory / "tokenizer.model" if directory.is_dir() else directory
    if not model_file.is_file():
        if cfg.tokenizer:
            raise ConfigError(f"--tokenizer {cfg.tokenizer}: no tokenizer.model there")
        raise ConfigError(
            f"{cfg.model} has no tokenizer.model (a `baichuan pretrain` run given no --tokenizer writes none): "
            "pass --tokenizer DIR, the tokenizer directory the model was trained with"
        )
    return model_file.parent


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    from baichuan.train.tokenizer import CHAT_GENERATION_CONFIG

    files = {
        name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()
    }
    files["generation_config.json"] = (json.dumps(CHAT_GENERATION_CONFIG, indent=2) + "\n").encode()
    return files


# --- the model ----------------------------------------------------------------------------------------------


def build_model(
    cfg: FinetuneConfig, device: torch.device, say: Callable[[str], None]
) -> tuple[nn.Module, Any]:
    """The base model to train, with LoRA injected when asked (then also the peft LoraConfig)."""
    from baichuan.checkpoint import fold_norm_head

    if cfg.quantize is not None and not cfg.lora:
        raise ConfigError(
            "--quantize trains LoRA over a quantized base: add --lora (full fine-tuning needs floats)"
        )
    if cfg.quantize not in (None, 8, 4):
        raise ConfigError(f"--quantize takes 8 or 4, not {cfg.quantize}")
    if cfg.quantize is not None and device.type == "cuda" and cfg.quantize != 4:
        raise ConfigError("on CUDA, QLoRA is 4-bit NF4 (bitsandbytes): use --quantize 4")
    model = load_model(cfg.model, dtype=torch.float32)
    if not cfg.lora:
        with torch.no_grad():  # the loaded weights may be read-only memory maps of the files
            for param in model.parameters():
                param.data = param.data.clone()
        return model.to(device).train(), None
    check_lora_targets(model, tuple(cfg.lora_target))
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.quantize is not None:
        fold_norm_head(model)  # quantizing needs the plain head (the head is frozen under LoRA anyway)
        if device.type == "cuda":
            _quantize_nf4(model, device)
        else:
            from baichuan.quant.swap import QUANTIZED_TYPES, quantize_model

            record = quantize_model(model, cfg.quantize)
            n = make_quantized_trainable(model, QUANTIZED_TYPES)
            say(
                f"base quantized to int{record['bits']} ({n} linears; gradients through the dequantised weights)"
            )
    model = model.to(device)
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target),
    )
    if cfg.quantize is not None and device.type != "cuda":
        from peft.tuners.lora.layer import Linear as PeftLinear

        from baichuan.lora import TrainableQuantized

        lora_config._register_custom_module({TrainableQuantized: PeftLinear})
    get_peft_model(model, lora_config)  # injects the adapters into `model` in place; the loop trains `model`
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(
        f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {', '.join(cfg.lora_target)}: {trainable:,} trainable "
        f"of {total:,} parameters"
    )
    return model.train(), lora_config


def store_frozen_base(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Under LoRA, the frozen float linears (the base, the head) stored in the autocast dtype; returns how many.

    Autocast casts every fp32 weight to its dtype in each forward and keeps the cast for the backward, so an fp32
    base costs its fp32 copy plus a half-precision one for the whole step. Stored already cast, the products are
    the same (the same rounding, done once) and the base costs half of its fp32 size. A NormHead is folded first
    (its frozen rows normalised once, as inference does). Embeddings and norms stay fp32: autocast computes them
    in fp32, and they are small: they are copied out of the checkpoint's memory map, whose pages, read once for
    the cast, would otherwise stay resident for the whole run. `dtype` None (fp32 training): nothing changes."""
    from baichuan.checkpoint import fold_norm_head

    if dtype is None:
        return 0
    if not model.lm_head.weight.requires_grad:
        fold_norm_head(model)
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, nn.Linear)
            and isinstance(weight, nn.Parameter)
            and not weight.requires_grad
            and weight.is_floating_point()
            and weight.dtype != dtype
        ):
            module.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
            count += 1
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad and param.dtype != dtype:
                param.data = param.data.clone()
    return count


def _quantize_nf4(model: nn.Module, device: torch.device) -> None:
    """Every linear of the decoder layers as a bitsandbytes NF4 Linear4bit (QLoRA's base), bf16 compute."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "--quantize 4 on CUDA needs bitsandbytes (pip install 'baichuan-toolkit[nf4]')"
        ) from None
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data.clone(), requires_grad=False, quant_type="nf4"
            )
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer.to(device))


def adapter_io(lora_config: Any, base: str) -> WeightsIO:
    """Checkpoints of a LoRA run hold the adapter only, in peft's directory format."""

    def save(directory: Path, weights: Mapping[str, torch.Tensor]) -> None:
        save_adapter(directory, lora_config, base, weights)

    def load(directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return {_runtime_name(k): v for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}

    return WeightsIO(save, load)


def _runtime_name(saved: str) -> str:
    """base_model.model.X.lora_A.weight -> X.lora_A.default.weight (peft's name inside the model)."""
    name = saved.removeprefix(PEFT_PREFIX)
    stem, _, last = name.rpartition(".")
    return f"{stem}.default.{last}"


def save_adapter(directory: Path, lora_config: Any, base: str, weights: Mapping[str, torch.Tensor]) -> None:
    """adapter_config.json (naming the base directory, task CAUSAL_LM) and adapter_model.safetensors."""
    from safetensors.torch import save_file

    adapter = {
        PEFT_PREFIX + k.replace(".default.", "."): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in weights.items()
        if ".lora_A." in k or ".lora_B." in k
    }
    config = dataclasses.replace(
        lora_config,
        base_model_name_or_path=str(Path(base).resolve()),
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    config._custom_modules = None  # an in-process registration, not part of the saved config
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(adapter, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


# --- the run ------------------------------------------------------------------------------------------------


def prepare_data(cfg: FinetuneConfig, say: Callable[[str], None] = print):
    """(tokenizer, examples, full lengths, the SFTData read) on this process."""
    from baichuan.tokenizer import Tokenizer

    if not cfg.data:
        raise ConfigError("--data is required: a .json or .jsonl file of conversations")
    tokenizer = Tokenizer(tokenizer_dir(cfg))
    data = read_sft(cfg.data, cfg.format, cfg.strict)
    if data.bad:
        say(f"skipped {len(data.bad)} bad record(s) of {cfg.data} (--strict stops on them):")
        for bad in data.bad[:10]:
            say(f"  {bad}")
        if len(data.bad) > 10:
            say(f"  ... and {len(data.bad) - 10} more")
    if not data.conversations:
        raise ConfigError(f"{cfg.data}: no usable record")
    examples, lengths = tokenize_all(
        tokenizer, data.conversations, cfg.model_max_length, cfg.user_token_id, cfg.assistant_token_id
    )
    return tokenizer, examples, lengths, data


def finetune(cfg: FinetuneConfig, say: Callable[[str], None] = print) -> TrainResult:
    """Run a fine-tuning job as configured. Under torchrun (WORLD_SIZE > 1) each rank calls this."""
    if not cfg.model:
        raise ConfigError("--model is required: the base checkpoint directory")
    if not Path(cfg.model).is_dir():
        raise ConfigError(f"--model {cfg.model} is not a directory")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {cfg.schedule!r}")
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {cfg.strategy!r}")
    if cfg.precision == "fp16" and cfg.deepspeed:
        raise ConfigError(
            "--precision fp16 is not offered with --deepspeed (its overflow skips); use bf16 or fp32"
        )
    if cfg.lora:
        check_lora_targets(None, tuple(cfg.lora_target))  # before minutes of loading
    if cfg.deepspeed and cfg.lora:
        raise ConfigError(
            "--deepspeed is for full fine-tuning (its checkpoints hold the whole model); a LoRA run's few trainable "
            "weights need no ZeRO: use torchrun with --strategy ddp"
        )
    if cfg.deepspeed:
        from baichuan.train import zero

        zero.import_deepspeed()  # not installed: one line now, before anything is loaded
    world, rank, local_rank = dataclasses.astuple(launcher_ranks())
    device = training_device(cfg.device, local_rank)
    speak = say if rank == 0 else (lambda _: None)
    with process_group(device, world, bool(cfg.deepspeed)):
        tokenizer, examples, lengths, data = prepare_data(cfg, speak)
        batches = SFTBatches(
            examples,
            cfg.model_max_length,
            cfg.batch_size,
            cfg.grad_accum,
            world,
            rank,
            cfg.seed,
            tokenizer.pad_id,
            cfg.pack,
        )
        max_steps = cfg.max_steps or max(1, round(cfg.epochs * batches.steps_per_epoch()))
        torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn when injected
        model, lora_config = build_model(cfg, device, speak)
        if cfg.lora and not (world > 1 and cfg.strategy == "fsdp"):  # FSDP2 shards one dtype per module
            from baichuan.train.loop import resolve_precision

            dtype = resolve_precision(cfg.precision, device)[0]
            if n := store_frozen_base(model, dtype):
                speak(f"frozen base stored in {str(dtype)[6:]}, the autocast dtype ({n} linears)")
        c = model.config
        truncated = sum(n > cfg.model_max_length for n in lengths)
        speak(
            f"data: {len(examples):,} {data.format} records ({truncated:,} truncated to {cfg.model_max_length})"
            + (f" packed into {batches.n_rows:,} rows" if cfg.pack else "")
            + f"; global batch {batches.global_batch} = {cfg.batch_size} x {cfg.grad_accum} accumulation x "
            f"{world} rank(s); {max_steps} steps ({max_steps / batches.steps_per_epoch():.2f} epochs); "
            f"{'LoRA' if cfg.lora else 'full'} fine-tuning of {c.num_params() / 1e6:,.1f} M parameters, lr "
            f"{cfg.learning_rate():g} {cfg.schedule}, gradient checkpointing {'on' if cfg.checkpointing() else 'off'}; "
            f"device {device}" + (f", {cfg.strategy.upper()}" if world > 1 and not cfg.deepspeed else "")
        )
        if cfg.deepspeed:
            model = _deepspeed_engine(cfg, model, max_steps, world, device, speak)
        elif world > 1 and cfg.strategy == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        elif world > 1:
            shard_fsdp2(model, device)
        out = Path(cfg.output_dir)
        z = c.z_loss_weight
        result = train(
            model,
            batches,
            cfg.train_config(max_steps),
            out,
            resume=cfg.resume,
            files=tokenizer_files(tokenizer_dir(cfg)),
            device=device,
            loss_fn=lambda logits, labels: sft_loss(logits, labels, z),
            say=say,
            weights_io=adapter_io(lora_config, cfg.model) if cfg.lora else None,
        )
        if rank == 0 and result.last_checkpoint is not None:
            write_output(cfg, result.last_checkpoint, out)
            speak(f"wrote {'the adapter' if cfg.lora else 'the fine-tuned model'} to {out}")
        return result


def _deepspeed_engine(
    cfg: FinetuneConfig, model: nn.Module, max_steps: int, world: int, device, say
) -> nn.Module:
    """The model under DeepSpeed ZeRO, as `baichuan pretrain --deepspeed` does it (train/zero.py): our AdamW
    handed over, the config's "auto" values from the flags, the config used written to OUTPUT_DIR/deepspeed.json."""
    from baichuan.train import zero
    from baichuan.train.loop import build_optimizer, resolve_precision

    bf16 = resolve_precision(cfg.precision, device)[0] is torch.bfloat16
    config, _ = zero.resolve_config(cfg.deepspeed, cfg.batch_size, cfg.grad_accum, world, cfg.grad_clip, bf16)
    if dist.get_rank() == 0:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "deepspeed.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
    stage = config["zero_optimization"]["stage"]
    say(f"DeepSpeed ZeRO-{stage} from {cfg.deepspeed}; the config used is in {cfg.output_dir}/deepspeed.json")
    return zero.initialize(model, build_optimizer(model, cfg.train_config(max_steps)), config)


def write_output(cfg: FinetuneConfig, checkpoint: Path, out: Path) -> None:
    """The final output from the last step checkpoint: the adapter files, or the model in the base's dtype."""
    if cfg.lora:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(checkpoint / name, out / name)
        return
    weights, _ = load_training_checkpoint(checkpoint)
    base = read_json(Path(cfg.model) / "config.json")
    dtype = (
        getattr(torch, str(base.get("torch_dtype", "float32")), torch.float32)
        if isinstance(base, dict)
        else torch.float32
    )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = torch.float32
    from baichuan.checkpoint import read_config

    config = read_config(checkpoint)
    files = tokenizer_files(tokenizer_dir(cfg))
    save_checkpoint(
        out, config_dict(config, dtype), ((k, v.to(dtype)) for k, v in weights.items()), files=files
    )


def merge_lora(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A plain checkpoint of `base` with `adapter` merged into its weights (W += scaling * B @ A), in the base's
    dtype, with its tokenizer and generation config: its logits are those of base + adapter."""
    from baichuan.checkpoint import save_model
    from baichuan.lora import apply_adapter, read_adapter

    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise ConfigError("--out must not be the base model's directory")
    adapter = read_adapter(adapter)
    model = load_model(base)
    apply_adapter(model, adapter)
    files = {
        name: (base / name).read_bytes()
        for name in (*TOKENIZER_FILES, "generation_config.json")
        if (base / name).is_file()
    }
    save_model(model, out, files=files)
    return out
