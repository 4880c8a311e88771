"""The fine-tuning commands of `baichuan`: finetune and merge-lora.

Each command parses its flags and calls one library function of baichuan/train/finetune.py, importing it inside
the function so that `--help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import app, friendly, value_errors


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


def finetune(
    model: Annotated[str | None, typer.Option("--model", "-m", help="The base checkpoint directory.")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="A .json/.jsonl file: Baichuan2 conversations, alpaca or OpenAI messages records."),
    ] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="Where the model or adapter goes (default: runs/finetune).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML or TOML file of settings; flags override it.")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer directory (default: the model's; needed where it has none).")
    ] = None,
    format: Annotated[
        str | None, typer.Option(help="auto (default), conversations, alpaca or messages.")
    ] = None,
    strict: Annotated[bool | None, typer.Option(help="Stop on a bad record instead of skipping it.")] = None,
    dry_run: Annotated[
        bool,
        typer.Option(help="Print one example with its masked labels and the length histogram; no training."),
    ] = False,
    model_max_length: Annotated[
        int | None, typer.Option(help="Truncate/pad examples to this many tokens (default: 512).")
    ] = None,
    pack: Annotated[
        bool | None, typer.Option(help="Pack short examples into rows; attention stays within each example.")
    ] = None,
    lora: Annotated[
        bool | None, typer.Option(help="Train a LoRA adapter (peft) instead of all weights.")
    ] = None,
    lora_target: Annotated[
        list[str] | None,
        typer.Option(help="LoRA target (repeat): W_pack (default), o_proj, gate_proj, up_proj, down_proj."),
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default: 8).")] = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (default: 32, the original's).")
    ] = None,
    lora_dropout: Annotated[
        float | None, typer.Option(help="LoRA dropout (default: 0.1, the original's).")
    ] = None,
    quantize: Annotated[
        int | None,
        typer.Option(
            help="QLoRA: LoRA over a quantized base, 8 or 4 (CPU: int8/int4; CUDA: 4 = NF4 via bitsandbytes)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Examples per micro-batch per rank (default: 4).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step (default: 1).")] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Epochs, when --max-steps is not given (default: 1).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: from --epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 2e-5 full, 2e-4 LoRA).")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="constant (default, the original's) or cosine.")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (default: 0).")] = None,
    min_lr_ratio: Annotated[
        float | None, typer.Option(help="Cosine floor as a fraction of --lr (default: 0).")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default: 1e-4).")] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Gradient-norm clip, 0 = off (default: 1.0).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the data order and LoRA init (default: 0).")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto (bf16 where native), bf16, fp32, or fp16 (dynamic loss scaling; prefer bf16)."
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            help="Recompute activations in the backward pass: less memory, more time (default: on with --lora, "
            "off for full fine-tuning)."
        ),
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps, 0 = at the end.")] = None,
    keep_last: Annotated[
        int | None, typer.Option(help="Step checkpoints kept, 0 = all (default: 2).")
    ] = None,
    resume: Annotated[
        bool | None, typer.Option(help="Continue from the newest checkpoint in --output-dir.")
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Log line every N steps without a bar (default: 10).")
    ] = None,
    progress: Annotated[bool | None, typer.Option(help="Show a progress bar.")] = None,
    tensorboard: Annotated[bool | None, typer.Option(help="Write TensorBoard scalars.")] = None,
    plot: Annotated[bool | None, typer.Option(help="Write loss.png at the end.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Under torchrun: ddp or fsdp (FSDP2).")] = None,
    deepspeed: Annotated[
        str | None, typer.Option(help="DeepSpeed ZeRO config file (configs/deepspeed/).")
    ] = None,
) -> None:
    """Fine-tune a checkpoint on chat data: all weights, or a LoRA adapter (--lora), optionally over a
    quantized base (--quantize). Masks follow the original Baichuan2 fine-tune.py (loss on the replies only).
    Writes OUTPUT_DIR: the model in the official layout, or a peft adapter; losses in loss.csv and loss.png."""
    from dataclasses import replace

    from baichuan.train.finetune import FinetuneConfig, load_config_file
    from baichuan.train.loop import TrainingStopped

    flags = {k: v for k, v in locals().items() if k in FinetuneConfig.__dataclass_fields__ and v is not None}
    if "lora_target" in flags:
        flags["lora_target"] = tuple(t for item in flags["lora_target"] for t in item.split(",") if t)
    settings = load_config_file(config) if config is not None else {}
    cfg = replace(FinetuneConfig(), **{**settings, **flags})
    console = _console()
    if dry_run:
        _dry_run(cfg, console)
        return
    from baichuan.train.finetune import finetune as run

    try:
        run(cfg, say=console.print)
    except TrainingStopped as e:
        raise ValueError(str(e)) from None


def _dry_run(cfg, console) -> None:
    from rich.markup import escape

    from baichuan.train.finetune import prepare_data
    from baichuan.train.sft_data import IGNORE_INDEX, length_histogram

    tokenizer, examples, lengths, data = prepare_data(cfg, console.print)
    example = examples[0]
    console.print(f"[bold]{data.format}[/] records: {len(examples):,} usable, {len(data.bad):,} bad")
    console.print(
        "[bold]example 1[/] ([green]green[/]: the tokens learnt, i.e. with a label; the rest -100):"
    )
    roles = {cfg.user_token_id: "<user>", cfg.assistant_token_id: "<assistant>", tokenizer.eos_id: "</s>"}
    parts, run, learnt = [], [], None

    def flush() -> None:
        if run:
            text = escape(tokenizer.decode(run))
            parts.append(f"[green]{text}[/]" if learnt else text)

    for token, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True):
        is_learnt = label != IGNORE_INDEX
        if token in roles or is_learnt != learnt:
            flush()
            run = []
        learnt = is_learnt
        if token in roles:
            parts.append(f"[green]{roles[token]}[/]" if is_learnt else f"[bold]{roles[token]}[/]")
        else:
            run.append(token)
    flush()
    console.print("".join(parts))
    labels = [int(t) for t in example.labels.tolist()]
    console.print(
        f"labels: {sum(t != IGNORE_INDEX for t in labels)} of {len(labels)} positions learnt; -100 elsewhere"
    )
    console.print(f"[bold]token lengths[/] (model_max_length {cfg.model_max_length}):")
    rows = length_histogram(lengths, cfg.model_max_length)
    top = max(n for _, _, n in rows) or 1
    for low, high, n in rows:
        mark = " (truncated)" if low >= cfg.model_max_length else ""
        console.print(f"  {low:>6}-{high:<6} {n:>6} {'#' * round(40 * n / top)}{mark}")
    over = sum(n > cfg.model_max_length for n in lengths)
    console.print(f"{over:,} of {len(lengths):,} longer than {cfg.model_max_length} tokens (truncated)")


def merge_lora(
    model: Annotated[Path, typer.Option("--model", "-m", help="The base checkpoint directory.")],
    lora: Annotated[
        Path, typer.Option(help="The LoRA adapter directory (baichuan finetune --lora, or peft).")
    ],
    out: Annotated[Path, typer.Option(help="The merged checkpoint directory to write.")],
) -> None:
    """Merge a LoRA adapter into its base: a plain checkpoint (official layout) whose logits are base + adapter."""
    from baichuan.train.finetune import merge_lora as merge

    merge(model, lora, out)
    _console().print(f"[green]wrote[/] {out}")


for _name, _command in (("finetune", finetune), ("merge-lora", merge_lora)):
    app.command(_name)(friendly(value_errors(_command)))
