"""`baichuan convert`: GGUF both ways, the Baichuan2 -> Baichuan head migration, and format changes (.bin ->
safetensors, dtype, shards). Each conversion streams tensor by tensor and writes atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, parse_dtype, value_errors

TARGETS = ("gguf", "safetensors")


@app.command()
@friendly
@value_errors
def convert(
    file: Annotated[
        Path | None, typer.Argument(help="The file to import, with --from.", show_default=False)
    ] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Checkpoint directory to convert (official or ours).")
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            help="gguf (one file for llama.cpp) or safetensors (a checkpoint directory: the format "
            "change from .bin, with --dtype and --shard-size)."
        ),
    ] = None,
    type: Annotated[str, typer.Option(help="GGUF tensor type: f32, f16, bf16, q8_0 or q4_0.")] = "f16",
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Import FILE of this format (gguf) into a checkpoint directory."),
    ] = None,
    migrate_head: Annotated[
        bool,
        typer.Option(
            help="Baichuan2 -> Baichuan: normalise lm_head.weight once, in the file, so that the "
            "checkpoint runs as a plain Baichuan model (same logits) in tools without NormHead."
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write: a .gguf file for --to gguf, else a directory.")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="bf16, fp16 or fp32 for the float weights written (default: as they are; for an "
            "import the GGUF's float type, fp32 for quantized files)."
        ),
    ] = None,
    shard_size: Annotated[
        str, typer.Option(help="Largest safetensors shard written, e.g. 2GB, 500MB, 1.5GiB.")
    ] = "2GiB",
    reading: Annotated[
        str,
        typer.Option(
            help="How to read the vocabulary of a GGUF that did not come from this toolkit: baichuan "
            "(the original tokenizer's NFKC normalisation and user-defined symbols) or llamacpp (as llama.cpp "
            "tokenizes it)."
        ),
    ] = "baichuan",
    force: Annotated[
        bool, typer.Option(help="Replace what is at --out (other files in a directory stay).")
    ] = False,
) -> None:
    """Convert a checkpoint. One of: --to gguf (llama.cpp), --to safetensors (format, dtype, shards),
    --migrate-head (Baichuan2 -> Baichuan), --from gguf FILE (import a GGUF model or vocabulary)."""
    from rich.console import Console

    actions = [name for name, on in (("--to", to), ("--migrate-head", migrate_head), ("--from", from_)) if on]
    if len(actions) != 1:
        raise UserError("give exactly one of --to gguf|safetensors, --migrate-head, --from gguf FILE")
    if out is None:
        raise UserError("--out is required: where to write the result")
    if to is not None and to not in TARGETS:
        raise UserError(f"--to takes gguf or safetensors, not {to!r}")
    if from_ is not None and from_ != "gguf":
        raise UserError(f"--from takes gguf, not {from_!r}")
    if from_ is not None and (file is None or not file.is_file()):
        raise UserError(f"--from gguf needs the GGUF file to import: {file or 'none given'} is not a file")
    if from_ is None and file is not None:
        raise UserError(f"unexpected argument {file} (a file is only taken with --from gguf)")
    if from_ is None and model is None:
        raise UserError("--model is required: the checkpoint directory to convert")
    if model is not None and not model.is_dir():
        raise UserError(f"--model {model} is not a directory")
    if to == "gguf" and out.is_dir():
        raise UserError(f"--out {out} is a directory; --to gguf writes one file (e.g. {out / 'model.gguf'})")
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise UserError(
            f"{out} exists{'' if out.is_file() else ' and is not empty'} (pass --force to replace it)"
        )
    torch_dtype = parse_dtype(dtype) if dtype is not None else None

    from baichuan.cli.loading import Progress
    from baichuan.convert.formats import parse_size

    console = Console(stderr=True)
    max_shard = parse_size(shard_size)
    if from_ is not None:
        from baichuan.convert.gguf import gguf_block_count, import_gguf

        with Progress(f"importing {file}", gguf_block_count(file)) as progress:
            import_gguf(file, out, torch_dtype, reading, progress)
        console.print(f"[green]wrote[/] {out} (from {file})")
        return
    from baichuan.checkpoint import read_config

    n_layers = read_config(model).n_layers
    if to == "gguf":
        from baichuan.convert.gguf import export_gguf

        if dtype is not None:
            raise UserError("--dtype is for checkpoint directories; a GGUF's tensor type is --type")
        with Progress(f"writing {out} ({type})", n_layers) as progress:
            export_gguf(model, out, type, progress)
        console.print(f"[green]wrote[/] {out}: {type}, {out.stat().st_size / 1e6:,.1f} MB")
    elif migrate_head:
        from baichuan.convert.migrate import migrate_head as migrate

        with Progress(f"migrating the head of {model}", n_layers) as progress:
            migrate(model, out, torch_dtype, max_shard, progress)
        console.print(f"[green]wrote[/] {out}: the head normalised, config.json norm_head false")
    else:
        from baichuan.convert.formats import convert_checkpoint

        with Progress(f"converting {model}", n_layers) as progress:
            convert_checkpoint(model, out, torch_dtype, max_shard, progress=progress)
        console.print(f"[green]wrote[/] {out} (safetensors)")
