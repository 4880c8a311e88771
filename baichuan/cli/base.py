"""The `baichuan` app, and what every command shares: user errors as one red line, dtype names."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

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

            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
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


def note(message: str) -> None:
    """A dim line on stderr: what a command decided for the user (a shortened context, a cut length)."""
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[dim]{message}[/]", highlight=False)


def value_errors(command: Callable) -> Callable:
    """ValueError from the library (bad data, bad settings) as the CLI's user error."""

    @wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ValueError as e:
            raise UserError(str(e)) from None

    return run
