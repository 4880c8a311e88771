"""The `baichuan` command. Each command imports its module inside the function, so `--help` stays fast."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="baichuan-toolkit: run, chat with, quantize and train Baichuan models (Baichuan-7B/13B, Baichuan2-7B/13B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """baichuan-toolkit: run, chat with, quantize and train Baichuan models."""


class UserError(Exception):
    """Bad input that deserves one clear line, not a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from baichuan.checkpoint import CheckpointError
    from baichuan.config import ConfigError

    return (UserError, CheckpointError, ConfigError, FileNotFoundError)


def friendly(command: Callable) -> Callable:
    """Turn the errors a user can fix into one red line and exit code 1."""

    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _user_errors() as e:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(1) from None

    return run


DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def parse_dtype(name: str):
    import torch

    try:
        return getattr(torch, DTYPES[name.lower()])
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose bf16, fp16 or fp32") from None


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
    force: Annotated[bool, typer.Option(help="Write into a non-empty directory.")] = False,
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


def main() -> None:
    app(prog_name="baichuan")


if __name__ == "__main__":
    sys.exit(main())
