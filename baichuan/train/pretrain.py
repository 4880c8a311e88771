"""Pretraining from scratch or from a checkpoint (continued pretraining): `baichuan pretrain`.

One process on CPU or GPU; under `torchrun` one process per rank with DDP or FSDP2 (gloo on CPU, nccl on GPU).
Every setting is a field of `PretrainConfig`, settable by a flag or a YAML/TOML file (`load_config_file`).
The data are a `baichuan prepare-data` directory; the loop is `baichuan.train.loop.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from baichuan.config import Config, ConfigError, preset
from baichuan.model import Baichuan
from baichuan.train.data import PackedBatches, TokenFile
from baichuan.train.distributed import launcher_ranks, process_group, shard_fsdp2, training_device
from baichuan.train.loop import TrainConfig, TrainResult, train
from baichuan.train.tokenizer import CHAT_GENERATION_CONFIG, TOKENIZER_FILES

# Baichuan 2 report, section 2.4: max-z loss weight 2e-4 (with NormHead).
BAICHUAN2_Z_LOSS = 2e-4
STRATEGIES = ("ddp", "fsdp")


@dataclass
class PretrainConfig:
    # data
    data: str | None = None  # a `baichuan prepare-data` directory
    tokenizer: str | None = None  # copied into every checkpoint (default: --init-from's tokenizer)
    out: str = "runs/pretrain"
    # model: a preset with overrides, or an existing checkpoint
    preset: str = "baichuan2-7b"
    init_from: str | None = None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    ffn: int | None = None
    vocab: int | None = None  # default: the tokenizer's vocabulary
    position: str | None = None
    norm_head: bool | None = None  # default: the preset's (on for Baichuan2)
    z_loss_weight: float | None = None  # default: 2e-4 with NormHead (Baichuan2), else 0
    # batches
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1
    # optimisation
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    activation_checkpointing: bool = False
    max_bad_steps: int = 5
    spike_factor: float = 0.0
    # checkpoints and logs
    save_every: int = 0
    keep_last: int = 3
    resume: bool = False
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    # hardware and scale
    device: str = "auto"
    strategy: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2)
    deepspeed: str | None = None  # a ZeRO-2/3 config file (configs/deepspeed/); launch with `deepspeed`

    def train_config(self) -> TrainConfig:
        names = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file: PretrainConfig field names, '-' or '_'."""
    values = read_settings_file(path)
    known = {f.name for f in fields(PretrainConfig)}
    settings = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return settings


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML (.yaml/.yml) or TOML (.toml) file, unchecked (fine-tuning reads its files too)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ConfigError(f"{path}: reading TOML on Python 3.10 needs the tomli package") from None
        values = tomllib.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path}: reading YAML needs PyYAML (pip install 'baichuan-toolkit[train]')"
            ) from None
        values = yaml.safe_load(text) or {}
    else:
        raise ConfigError(f"{path}: a config file must be .yaml, .yml or .toml")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return values


def model_config(cfg: PretrainConfig, data_vocab: int) -> Config:
    """The preset with the overrides; vocabulary default: the data's tokenizer's."""
    base = preset(cfg.preset)
    overrides = {
        "n_layers": cfg.layers,
        "dim": cfg.hidden,
        "n_heads": cfg.heads,
        "ffn_dim": cfg.ffn,
        "vocab_size": cfg.vocab or data_vocab,
        "position": cfg.position,
        "norm_head": cfg.norm_head,
    }
    config = base.replace(**{k: v for k, v in overrides.items() if v is not None})
    z = (
        cfg.z_loss_weight
        if cfg.z_loss_weight is not None
        else (BAICHUAN2_Z_LOSS if config.norm_head else 0.0)
    )
    return config.replace(z_loss_weight=z, max_seq_len=max(cfg.seq_len, config.max_seq_len))


def build_model(cfg: PretrainConfig, data_vocab: int) -> Baichuan:
    if cfg.init_from:
        from baichuan.checkpoint import load_model

        model = load_model(cfg.init_from, dtype=torch.float32, norm_head=cfg.norm_head)
        with torch.no_grad():  # the loaded weights may be read-only memory maps of the files
            for param in model.parameters():
                param.data = param.data.clone()
        if cfg.z_loss_weight is not None or model.config.norm_head:
            z = cfg.z_loss_weight if cfg.z_loss_weight is not None else BAICHUAN2_Z_LOSS
            model.config = model.config.replace(z_loss_weight=z)
        model.model.config = model.config
    else:
        config = model_config(cfg, data_vocab)
        model = Baichuan(config)
        model.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    if model.config.vocab_size < data_vocab:
        raise ConfigError(
            f"the model's vocabulary ({model.config.vocab_size:,}) is smaller than the data's tokenizer's "
            f"({data_vocab:,}); raise --vocab"
        )
    return model.float().train()


def checkpoint_files(cfg: PretrainConfig) -> dict[str, bytes]:
    """The tokenizer (and a generation_config.json) that go into every checkpoint."""
    source = cfg.tokenizer or cfg.init_from
    files: dict[str, bytes] = {}
    if source:
        directory = Path(source)
        if directory.is_file():  # a bare tokenizer.model
            files["tokenizer.model"] = directory.read_bytes()
            directory = directory.parent
        for name in TOKENIZER_FILES:
            if (directory / name).is_file() and name not in files:
                files[name] = (directory / name).read_bytes()
    files["generation_config.json"] = (json.dumps(CHAT_GENERATION_CONFIG, indent=2) + "\n").encode()
    return files


def _deepspeed_engine(cfg: PretrainConfig, model: Baichuan, world: int, device: torch.device, say):
    """The model under DeepSpeed ZeRO (see train/zero.py): our AdamW handed over, the config's "auto" values
    filled from the flags; the config used is written to OUT/deepspeed.json."""
    from baichuan.train import zero
    from baichuan.train.loop import build_optimizer, resolve_precision

    bf16 = resolve_precision(cfg.precision, device)[0] is torch.bfloat16
    config, _ = zero.resolve_config(cfg.deepspeed, cfg.batch_size, cfg.grad_accum, world, cfg.grad_clip, bf16)
    if dist.get_rank() == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "deepspeed.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    stage = config["zero_optimization"]["stage"]
    where = "" if device.type == "cuda" else " on its CPU accelerator (gloo): slow; ZeRO is made for GPUs"
    say(f"DeepSpeed ZeRO-{stage} from {cfg.deepspeed}{where}; the config used is in {cfg.out}/deepspeed.json")
    return zero.initialize(model, build_optimizer(model, cfg.train_config()), config)


def pretrain(cfg: PretrainConfig, say=print) -> TrainResult:
    """Run a pretraining job as configured. Under torchrun (WORLD_SIZE > 1) each rank calls this."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {cfg.strategy!r}")
    if not cfg.data:
        raise ConfigError("--data is required: a directory written by `baichuan prepare-data`")
    world, rank, local_rank = dataclasses.astuple(launcher_ranks())
    device = training_device(cfg.device, local_rank)
    if cfg.deepspeed:
        from baichuan.train import zero

        zero.import_deepspeed()  # not installed: one line now, before anything is loaded
    with process_group(device, world, bool(cfg.deepspeed)):
        tokens = TokenFile.open(cfg.data)
        batches = PackedBatches(
            tokens.tokens, cfg.seq_len, cfg.batch_size, cfg.grad_accum, world, rank, cfg.seed
        )
        model = build_model(cfg, tokens.vocab_size).to(device)
        if rank == 0:
            c = model.config
            say(
                f"model: {c.n_layers} layers, hidden {c.dim}, {c.n_heads} heads, FFN {c.ffn_dim}, vocab "
                f"{c.vocab_size:,}, {c.position}, NormHead {'on' if c.norm_head else 'off'}, z-loss "
                f"{c.z_loss_weight:g}: {c.num_params() / 1e6:,.1f} M parameters"
                + (f" (from {cfg.init_from})" if cfg.init_from else "")
            )
            say(
                f"data: {len(tokens.tokens):,} tokens, {batches.n_windows:,} windows of {cfg.seq_len}; global "
                f"batch {batches.global_batch} = {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} "
                f"rank(s) ({batches.global_batch * cfg.seq_len:,} tokens a step); device {device}"
                + (f", {cfg.strategy.upper()}" if world > 1 and not cfg.deepspeed else "")
            )
        if cfg.deepspeed:
            model = _deepspeed_engine(cfg, model, world, device, say if rank == 0 else lambda _: None)
        elif world > 1 and cfg.strategy == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        elif world > 1:
            shard_fsdp2(model, device)
        return train(
            model,
            batches,
            cfg.train_config(),
            cfg.out,
            resume=cfg.resume,
            files=checkpoint_files(cfg),
            device=device,
            say=say,
        )
