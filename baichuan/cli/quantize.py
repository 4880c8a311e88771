"""`baichuan quantize`: an int8/int4 checkpoint written shard by shard."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, parse_dtype
from baichuan.cli.loading import Progress
from baichuan.cli.options import ModelDir


@app.command()
@friendly
def quantize(
    model: ModelDir,
    bits: Annotated[
        int,
        typer.Option(
            help="8 (per-channel int8, lm_head with a scale per 32 columns) or 4 (group-wise int4, lm_head int8)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write the quantized checkpoint directory.")],
    group_size: Annotated[
        int, typer.Option(help="int4 group size (32, 64, 128 or 256 use the fast CPU kernel).")
    ] = 128,
    dtype: Annotated[
        str,
        typer.Option(help="dtype of the float parts (embeddings, norms, int8 scales; int4 scales are bf16)."),
    ] = "bf16",
    force: Annotated[
        bool, typer.Option(help="Replace the checkpoint in a non-empty directory (its other files stay).")
    ] = False,
) -> None:
    """Quantize a checkpoint shard by shard (peak memory near the quantized size) and save it, with the
    quantization recorded in config.json; it then loads anywhere this toolkit does. With --force the new
    checkpoint replaces the one in --out (which may be --model itself) as a whole; other files there are kept."""
    from rich.console import Console

    from baichuan.checkpoint import load_model, read_config, save_model

    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty (pass --force to write into it)")
    console = Console(stderr=True)
    n_layers = read_config(model).n_layers
    with Progress(f"quantizing {model} to int{bits}", n_layers) as progress:
        quantized = load_model(
            model, dtype=parse_dtype(dtype), quantize=bits, group_size=group_size, progress=progress
        )
    names = (
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    )
    files = {name: (model / name).read_bytes() for name in names if (model / name).is_file()}
    with console.status(f"writing {out}"):
        save_model(quantized, out, files=files)
    console.print(f"[green]wrote[/] {out}: int{bits} weights ({quantized.quantization})")
