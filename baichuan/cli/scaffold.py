"""`baichuan init`: a random checkpoint in the official layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, parse_dtype


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the new checkpoint directory.")],
    preset: Annotated[
        str, typer.Option(help="baichuan-7b, baichuan-13b, baichuan2-7b or baichuan2-13b.")
    ] = "baichuan2-7b",
    layers: Annotated[int | None, typer.Option(help="Override the number of layers.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Override the hidden size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Override the number of attention heads.")] = None,
    ffn: Annotated[int | None, typer.Option(help="Override the MLP (intermediate) size.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Override the vocabulary size.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Override the context length.")] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype: bf16, fp16 or fp32.")] = "bf16",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Copy this tokenizer.model instead of training a small one.")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace the checkpoint in a non-empty directory (its other files stay).")
    ] = False,
) -> None:
    """Write a randomly initialised checkpoint (config, weights, tokenizer) in the official layout."""
    from rich.console import Console

    from baichuan.config import preset as get_preset
    from baichuan.scaffold import init_checkpoint

    if directory.exists() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} exists and is not empty (pass --force to write into it)")
    if tokenizer is not None and not tokenizer.is_file():
        raise UserError(f"tokenizer file {tokenizer} does not exist")
    overrides = {
        "n_layers": layers,
        "dim": hidden,
        "n_heads": heads,
        "ffn_dim": ffn,
        "vocab_size": vocab,
        "max_seq_len": max_seq_len,
    }
    config = get_preset(preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    console = Console(stderr=True)
    with console.status(f"writing {config.num_params():,} random parameters to {directory}"):
        init_checkpoint(config, directory, dtype=parse_dtype(dtype), seed=seed, tokenizer=tokenizer)
    console.print(
        f"[green]wrote[/] {directory}: {preset} shape, {config.n_layers} layers, hidden {config.dim}, "
        f"{config.num_params():,} parameters"
    )
