"""`baichuan eval` (benchmarks from local files, in the published tables' layout) and `baichuan eval-curve`
(C-Eval/MMLU/CMMLU over the intermediate checkpoints of a pretraining run)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, note
from baichuan.cli.loading import load, prepare
from baichuan.cli.options import Device, Dtype, ModelDir, Quantize

Tasks = Annotated[
    str,
    typer.Option(
        help="Comma-separated tasks. Multiple choice: ceval, mmlu, cmmlu, gaokao, agieval, jec_qa, medqa, medmcqa, "
        "ceval_medical, mmlu_medical, cmmlu_medical. Generation: bbh, gsm8k, math, humaneval, mbpp, flores."
    ),
]
DataDir = Annotated[
    Path,
    typer.Option("--data", help="Data directory laid out like ../shared/data: one folder per benchmark."),
]
Shots = Annotated[
    int | None,
    typer.Option(min=0, help="Few-shot examples per prompt (default: each task's published number, 5)."),
]
Limit = Annotated[
    int | None, typer.Option(min=1, help="Score only the first N questions of each subject (a quick run).")
]
BatchSize = Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")]
ShotSeed = Annotated[
    int,
    typer.Option(
        "--seed",
        help="Seed of the shot order where a task shuffles (C-Eval dev, the pools of Gaokao/AGIEval/...); "
        "recorded in the results.",
    ),
]
Chat = Annotated[
    bool, typer.Option(help="Wrap every prompt as a user message in the model's chat format (chat models).")
]


def _task_list(tasks: str) -> list[str]:
    from baichuan.eval.harness import generative_tasks
    from baichuan.eval.tasks import TASKS

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; name at least one task, e.g. --tasks ceval,mmlu")
    generative = {"bbh", "gsm8k", "math", "humaneval", "mbpp", "flores"}
    unknown = [n for n in names if n not in TASKS and n not in generative]
    if unknown:
        raise UserError(
            f"unknown task {', '.join(unknown)}; choose from {', '.join([*TASKS, *sorted(generative)])}"
        )
    missing = [n for n in names if n in generative and n not in generative_tasks()]
    if missing:
        raise UserError(f"the generation tasks ({', '.join(missing)}) are not available in this installation")
    return list(dict.fromkeys(names))


class TaskProgress:
    """Questions done per task: a bar on a terminal, a line every tenth elsewhere."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        self.tasks: dict[str, int] = {}
        self.shown: dict[str, int] = {}

    def __enter__(self) -> TaskProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
        return self

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.bar is not None:
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=total)
            self.bar.update(self.tasks[name], completed=done, total=total)
            return
        tenth = 10 * done // max(total, 1)
        if self.shown.get(name) != tenth:
            self.shown[name] = tenth
            print(f"{name}: {done}/{total}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _evaluate(model, names, data, shots, limit, batch_size, out, chat, device, dtype, quantize, seed):
    """Load `model` and run `names`; returns the results dict (and writes out/results.*)."""
    from baichuan.eval.harness import Runner, Settings, run_tasks, weights_checksum

    if not data.is_dir():
        raise UserError(f"--data {data} is not a directory")
    prepared = prepare(model, device, dtype, quantize, None)
    if chat and prepared.chat_format is None:
        raise UserError(f"{model} has no chat format; drop --chat")
    note(f"weights sha256 of {model} (cached in {out / 'cache'})")
    checksum = weights_checksum(model, out / "cache" / "checksums.json")
    loaded = load(prepared)
    note(prepared.note)
    quantization = f"int{quantize}" if quantize else None
    if prepared.quantization:
        quantization = f"int{prepared.quantization['bits']} (stored)"
    record = {
        "name": Path(model).resolve().name,
        "path": str(Path(model).resolve()),
        "sha256": checksum["sha256"],
        "weight_files": checksum["files"],
        "dtype": str(prepared.dtype).removeprefix("torch."),
        "quantize": quantization,
        "device": str(prepared.device),
    }
    runner = Runner(loaded.model, loaded.tokenizer, loaded.chat_format, chat, loaded.add_bos)
    settings = Settings(shots=shots, limit=limit, batch_size=batch_size, seed=seed, record=record)
    try:
        with TaskProgress() as progress:
            return run_tasks(runner, names, data, settings, out, progress)
    except ValueError as e:  # a data directory that lacks what a task reads
        raise UserError(str(e)) from None


@app.command("eval")
@friendly
def eval_command(
    model: ModelDir,
    tasks: Tasks = "ceval,mmlu,cmmlu",
    data: DataDir = Path("data"),
    shots: Shots = None,
    limit: Limit = None,
    batch_size: BatchSize = 8,
    out: Annotated[
        Path, typer.Option(help="Output directory: results.json, results.md and the per-subject cache.")
    ] = Path("eval-results"),
    chat: Chat = False,
    seed: ShotSeed = 1234,
    device: Device = "auto",
    dtype: Dtype = "auto",
    quantize: Quantize = None,
) -> None:
    """Score benchmarks as their official scripts do and write OUT/results.json and OUT/results.md. Stopped runs
    resume: finished subjects are read back from OUT/cache when the settings match."""
    names = _task_list(tasks)
    results = _evaluate(
        model, names, data, shots, limit, batch_size, out, chat, device, dtype, quantize, seed
    )
    for name, task in results["tasks"].items():
        print(f"{name}: {task['score']:.2f} ({task.get('metric', 'accuracy')}, n={task.get('n')})")
    note(f"wrote {out / 'results.json'} and {out / 'results.md'}")


@app.command("eval-curve")
@friendly
def eval_curve(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Option(
            "--checkpoints",
            help="Checkpoint directories: --checkpoints A B C (or the flag repeated); a shell glob such as "
            "RUN/checkpoints/step-* works.",
        ),
    ] = None,
    more: Annotated[
        list[Path] | None, typer.Argument(help="More checkpoint directories.", show_default=False)
    ] = None,
    out: Annotated[Path, typer.Option(help="The PNG to write; its results go to a folder beside it.")] = Path(
        "curve.png"
    ),
    tasks: Annotated[
        str, typer.Option(help="Comma-separated multiple-choice tasks to plot.")
    ] = "ceval,mmlu,cmmlu",
    data: DataDir = Path("data"),
    shots: Shots = None,
    limit: Limit = None,
    batch_size: BatchSize = 8,
    seed: ShotSeed = 1234,
    device: Device = "auto",
    dtype: Dtype = "auto",
) -> None:
    """Evaluate every checkpoint and plot the scores against the training tokens it had seen (read from its
    trainer_state.pt, or the run's loss.csv)."""
    from baichuan.eval.curve import plot, training_tokens
    from baichuan.eval.tasks import TASKS

    checkpoints = [*(checkpoints or []), *(more or [])]
    if not checkpoints:
        raise UserError("name the checkpoints: --checkpoints RUN/checkpoints/step-*")
    missing = [str(c) for c in checkpoints if not c.is_dir()]
    if missing:
        raise UserError(f"not a checkpoint directory: {', '.join(missing)}")
    names = _task_list(tasks)
    if any(n not in TASKS for n in names):
        raise UserError("eval-curve plots multiple-choice tasks only (ceval, mmlu, cmmlu, ...)")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file")
    try:
        tokens = {c: training_tokens(c) for c in checkpoints}
    except ValueError as e:
        raise UserError(str(e)) from None
    checkpoints = sorted(checkpoints, key=tokens.__getitem__)
    points: dict[str, list[tuple[int, float]]] = {TASKS[n].title: [] for n in names}
    folder = out.with_suffix("")
    for checkpoint in checkpoints:
        target = folder / checkpoint.resolve().name
        results = _evaluate(
            checkpoint, names, data, shots, limit, batch_size, target, False, device, dtype, None, seed
        )
        for name in names:
            points[TASKS[name].title].append((tokens[checkpoint], results["tasks"][name]["score"]))
        print(
            f"{checkpoint}: {tokens[checkpoint]:,} tokens, "
            + ", ".join(f"{n} {results['tasks'][n]['score']:.2f}" for n in names)
        )
    plot(points, out)
    note(f"wrote {out} (results of each checkpoint under {folder})")
