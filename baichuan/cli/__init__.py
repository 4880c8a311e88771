"""The `baichuan` command, one module per command group. Each command imports what it runs inside its function,
so that `--help` stays fast; importing a group's module registers its commands on `app`."""

from __future__ import annotations

import sys

# isort: off
# Importing a group registers its commands, in the order `--help` lists them.
from baichuan.cli import quickstart, scaffold, run, serve, quantize, convert, train, finetune, eval  # noqa: F401

# isort: on
from baichuan.cli.base import UserError, app, friendly, parse_dtype

__all__ = ["UserError", "app", "friendly", "main", "parse_dtype"]


def main() -> None:
    # The deepspeed launcher puts --local_rank=N before the subcommand (`deepspeed $(which baichuan) pretrain
    # ...`); it sets LOCAL_RANK in the environment too, which is what `pretrain` reads.
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank=")]
    app(args=args, prog_name="baichuan")
