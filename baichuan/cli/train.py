"""The training commands of `baichuan`: train-tokenizer, tokenizer-stats, prepare-data, pretrain.

Each command parses its flags and calls one library function of baichuan/train/, importing it inside the
function so that `--help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import app, friendly, value_errors


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


def _read_lines(paths: list[Path]) -> list[str]:
    """The non-empty lines of text/JSONL/JSON files, in the order prepare-data reads their documents."""
    from baichuan.train.data import iter_documents

    return [line for doc in iter_documents(paths) for line in doc.split("\n") if line.strip()]


def train_tokenizer(
    input: Annotated[
        list[Path], typer.Option("--input", help="Text/JSONL/JSON files or directories (repeat the flag).")
    ],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size (Baichuan-7B: 64000, Baichuan2: 125696).")],
    out: Annotated[Path, typer.Option(help="The tokenizer directory to write.")],
    input_sentence_size: Annotated[
        int, typer.Option(help="Train on a uniform sample of at most this many lines (0: all).")
    ] = 2_000_000,
    threads: Annotated[int | None, typer.Option(help="Trainer threads (default: all cores).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the line sample.")] = 0,
) -> None:
    """Train a SentencePiece BPE tokenizer with the Baichuan settings (split digits, byte fallback, no
    normalisation, no dummy prefix, whitespace-only pieces, pieces up to 32 characters; <unk> <s> </s> at 0-2
    and the original's reserved pieces at 3-392, so the chat roles 195/196 exist) into a directory that
    BaichuanTokenizer and AutoTokenizer load."""
    from baichuan.train.tokenizer import train_tokenizer as train

    console = _console()
    with console.status("reading the input"):
        lines = _read_lines(input)
    threads = threads or os.cpu_count() or 1
    with console.status(f"training on {threads} thread(s)"):
        try:
            trained = train(lines, vocab_size, out, input_sentence_size, threads, seed)
        except RuntimeError as e:  # sentencepiece's own checks: vocab too small for the characters, ...
            raise ValueError(str(e).split("] ")[-1]) from None
    sampled = (
        f"a uniform sample of {trained.sentences_used:,}"
        if trained.sentences_used < trained.sentences_seen - trained.too_long
        else f"all {trained.sentences_used:,}"
    )
    console.print(
        f"trained on {sampled} of {trained.sentences_seen:,} lines"
        + (f" ({trained.too_long:,} over 16 KiB skipped)" if trained.too_long else "")
    )
    note = "" if trained.vocab_size == vocab_size else f" (asked {vocab_size:,}: the text has too few pieces)"
    console.print(f"[green]wrote[/] {out}: {trained.vocab_size:,} pieces{note}")


def tokenizer_stats(
    tokenizer: Annotated[
        list[Path],
        typer.Option(help="Tokenizer directory, tokenizer.model or tokenizer.json (repeat to compare)."),
    ],
    text: Annotated[list[Path], typer.Option(help="Text/JSONL/JSON files or directories (repeat the flag).")],
) -> None:
    """Compare tokenizers on the same text: tokens per character on Chinese and on English lines, UTF-8 bytes
    per token, and encode speed. A line is Chinese when at least half its non-space characters are CJK
    ideographs, English when at least half are ASCII letters; characters are Unicode code points, spaces
    included; lower tokens/char and higher bytes/token mean better compression."""
    from rich.table import Table

    from baichuan.train.tokenizer import load_encoder, tokenizer_stats

    lines = _read_lines(text)
    table = Table(title=f"{len(lines):,} lines of {', '.join(map(str, text))}")
    for column in ("tokenizer", "zh tokens/char", "en tokens/char", "bytes/token", "encode MB/s", "tokens/s"):
        table.add_column(column, justify="left" if column == "tokenizer" else "right")
    stats = None
    for path in tokenizer:
        stats = tokenizer_stats(load_encoder(path), lines)
        table.add_row(
            str(path),
            f"{stats.zh_tokens_per_char:.3f}",
            f"{stats.en_tokens_per_char:.3f}",
            f"{stats.bytes_per_token:.2f}",
            f"{stats.mb_per_s:.2f}",
            f"{stats.tokens_per_s:,.0f}",
        )
    from rich.console import Console

    Console(soft_wrap=True).print(table)
    if stats is not None:
        _console().print(f"{stats.zh_chars:,} Chinese and {stats.en_chars:,} English characters")


def prepare_data(
    input: Annotated[
        list[Path], typer.Option("--input", help="Text/JSONL/JSON files or directories (repeat the flag).")
    ],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory or tokenizer.model.")],
    out: Annotated[Path, typer.Option(help="Directory for train.bin, val.bin, meta.json, skipped.tsv.")],
    workers: Annotated[int | None, typer.Option(help="Tokenising processes (default: all cores).")] = None,
    text_field: Annotated[str, typer.Option(help="The text field of JSONL records.")] = "text",
    max_line_bytes: Annotated[int, typer.Option(help="Skip (and report) longer lines.")] = 1 << 20,
    val_every: Annotated[int, typer.Option(help="Hold out every N-th document in val.bin (0: none).")] = 0,
) -> None:
    """Tokenise text into a memory-mapped token file (EOS after each document) for `baichuan pretrain`.
    Text files hold one document per line, JSONL one record per line, JSON an array of records."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from baichuan.train.data import prepare_data as prepare

    console = _console()
    with Progress(
        TextColumn("[bold]tokenising"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        console=console,
    ) as progress:
        task = progress.add_task("tokenising", total=None, tokens=0)

        def update(done: int, total: int, tokens: int) -> None:
            progress.update(task, completed=done, total=total, tokens=tokens)

        report = prepare(input, tokenizer, out, workers, text_field, max_line_bytes, val_every, update)
    seconds = max(report.seconds, 1e-9)
    console.print(
        f"[green]wrote[/] {out}: {report.documents:,} documents from {report.files} file(s), "
        f"{report.tokens:,} training tokens"
        + (f" + {report.val_tokens:,} held out" if report.val_tokens else "")
        + f" in {report.seconds:.1f}s ({report.bytes / 1e6 / seconds:.1f} MB/s, "
        f"{(report.tokens + report.val_tokens) / seconds:,.0f} tokens/s)"
    )
    if report.skipped:
        counts = ", ".join(f"{n:,} {reason}" for reason, n in report.skipped_by_reason().items())
        console.print(
            f"[yellow]skipped {len(report.skipped):,} line(s)[/]: {counts} (all in {out}/skipped.tsv)"
        )
        shown = [s for s in report.skipped if s.reason != "empty"][:10]
        for s in shown:
            console.print(f"  {s.file}:{s.line}: {s.reason}")


def pretrain(
    config: Annotated[
        Path | None, typer.Option(help="YAML or TOML file of settings; flags override it.")
    ] = None,
    data: Annotated[str | None, typer.Option(help="A `baichuan prepare-data` directory.")] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer directory copied into checkpoints.")
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output directory (default: runs/pretrain).")] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (default: baichuan2-7b).")] = None,
    init_from: Annotated[str | None, typer.Option(help="Continue pretraining this checkpoint.")] = None,
    layers: Annotated[int | None, typer.Option(help="Override the number of layers.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Override the hidden size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Override the attention heads.")] = None,
    ffn: Annotated[int | None, typer.Option(help="Override the MLP size.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Vocabulary size (default: the tokenizer's).")] = None,
    position: Annotated[str | None, typer.Option(help="rope or alibi (default: the preset's).")] = None,
    norm_head: Annotated[
        bool | None, typer.Option(help="NormHead (default: on for Baichuan2 presets).")
    ] = None,
    z_loss_weight: Annotated[
        float | None, typer.Option(help="Max-z loss weight (default: 2e-4 with NormHead).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence (default: 512).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per micro-batch per rank (default: 8).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per step (default: 1).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: 1000).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 3e-4).")] = None,
    min_lr_ratio: Annotated[
        float | None, typer.Option(help="Final lr as a fraction of the peak (default: 0.1).")
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Linear warm-up steps (default: 5% of max-steps).")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay on matrices (default: 0.1).")
    ] = None,
    grad_clip: Annotated[
        float | None, typer.Option(help="Gradient-norm clip, 0 = off (default: 1.0).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the weights and the data order (default: 0).")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 where native), bf16 or fp32.")] = None,
    activation_checkpointing: Annotated[
        bool | None, typer.Option(help="Recompute activations in the backward pass.")
    ] = None,
    max_bad_steps: Annotated[
        int | None, typer.Option(help="Stop after this many bad steps in a row (default: 5).")
    ] = None,
    spike_factor: Annotated[
        float | None, typer.Option(help="Skip steps with loss > factor x running mean, 0 = off (default: 0).")
    ] = None,
    save_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps, 0 = at the end (default: 0).")
    ] = None,
    keep_last: Annotated[int | None, typer.Option(help="Checkpoints kept, 0 = all (default: 3).")] = None,
    resume: Annotated[bool | None, typer.Option(help="Continue from the newest checkpoint in --out.")] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Log line every N steps without a bar (default: 10).")
    ] = None,
    progress: Annotated[bool | None, typer.Option(help="Show a progress bar.")] = None,
    tensorboard: Annotated[bool | None, typer.Option(help="Write TensorBoard scalars.")] = None,
    plot: Annotated[bool | None, typer.Option(help="Write loss.png at the end.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Under torchrun: ddp or fsdp (FSDP2).")] = None,
    deepspeed: Annotated[
        str | None,
        typer.Option(
            help="DeepSpeed ZeRO-2/3 config file (configs/deepspeed/); launch with `deepspeed $(which baichuan) "
            'pretrain ...`. Its "auto" values come from these flags; it may not set an optimizer or scheduler.'
        ),
    ] = None,
) -> None:
    """Pretrain a Baichuan model from a preset (with overrides) or continue an existing checkpoint, on one
    process or under torchrun (DDP/FSDP2). Checkpoints go to OUT/checkpoints/step-N in the official layout;
    the losses to OUT/loss.csv, OUT/tensorboard and OUT/loss.png."""
    from dataclasses import replace

    from baichuan.train.loop import TrainingStopped
    from baichuan.train.pretrain import PretrainConfig, load_config_file
    from baichuan.train.pretrain import pretrain as run

    flags = {k: v for k, v in locals().items() if k in PretrainConfig.__dataclass_fields__ and v is not None}
    settings = load_config_file(config) if config is not None else {}
    cfg = replace(PretrainConfig(), **{**settings, **flags})
    console = _console()
    try:
        result = run(cfg, say=console.print)
    except TrainingStopped as e:
        raise ValueError(str(e)) from None
    if result.last_checkpoint is not None:
        console.print(
            f"[green]done[/]: last checkpoint {result.last_checkpoint}; losses in {cfg.out}/loss.csv"
        )


for _name, _command in (
    ("train-tokenizer", train_tokenizer),
    ("tokenizer-stats", tokenizer_stats),
    ("prepare-data", prepare_data),
    ("pretrain", pretrain),
):
    app.command(_name)(friendly(value_errors(_command)))
