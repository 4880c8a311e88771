"""Running benchmarks on a loaded model: prompts built from the task rows, letters scored, accuracies averaged
as each benchmark reports them, every subject's result cached in the output directory so that a stopped run
resumes where it was, and the settings that make a score reproducible written next to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baichuan.eval import scoring
from baichuan.eval.tasks import LETTERS, TASKS, Format, Subject, Task, format_for

DEFAULT_SEED = 1234
RESULTS_VERSION = 1


@dataclass
class Runner:
    """A loaded model and how to talk to it: plain prompts (with BOS where tokenizer_config.json asks for one)
    or, with `chat`, each prompt as one user message of the checkpoint's chat format."""

    model: Any
    tokenizer: Any
    chat_format: Any = None
    chat: bool = False
    add_bos: bool = False
    kv_dtype: torch.dtype | None = None
    context: int = 0  # positions a prompt may fill; 0: the model's

    def __post_init__(self) -> None:
        self.context = self.context or self.model.config.max_seq_len

    def ids(self, text: str, room: int = 0) -> list[int]:
        """Prompt ids of `text`, leaving `room` positions free (for generation)."""
        if self.chat:
            return self.chat_format.build(
                self.tokenizer, [{"role": "user", "content": text}], self.context, max(room, 1)
            )
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id, *ids] if self.add_bos else ids

    def letter_ids(self, fmt: Format, letters: str) -> list[int]:
        """The token each letter is as it follows the cue in a shot: the last id of `cue + letter`."""
        return [self.tokenizer.encode(fmt.cue + fmt.letter.format(letter=x))[-1] for x in letters]


@dataclass
class Settings:
    shots: int | None = None  # None: each task's default (5)
    limit: int | None = None  # questions per subject
    batch_size: int = 8
    seed: int | None = DEFAULT_SEED
    share_prefix: bool = True
    record: dict = field(default_factory=dict)  # model checksum, dtype, quantization: into every result file


# --- multiple choice -----------------------------------------------------------------------------------------


def subject_prompts(
    runner: Runner, task: Task, subject: Subject, shots: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each question's prompt and the shots it got: as many as asked for while the prompt fits the
    context, fewer where it does not (the last ones go, as in hendrycks; CMMLU drops the longest); a question
    that does not fit even alone keeps its last `context` tokens."""
    fmt = format_for(task, subject)
    prompts, used = [], []
    for question in subject.questions:
        for k in range(min(shots, len(subject.shots)), -1, -1):
            ids = runner.ids(fmt.prompt(subject.title, subject.shots[:k], question))
            if len(ids) <= runner.context:
                break
        prompts.append(ids[-runner.context :])
        used.append(k)
    return prompts, used


def score_subject(
    runner: Runner,
    task: Task,
    subject: Subject,
    settings: Settings,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """One subject: the predicted letter of every question and the accuracy."""
    shots = task.default_shots if settings.shots is None else settings.shots
    fmt = format_for(task, subject)
    letters = LETTERS
    choice_ids = runner.letter_ids(fmt, letters)
    prompts, used = subject_prompts(runner, task, subject, shots)
    predictions = [""] * len(prompts)
    # Questions with the same number of shots share a prefix; a group each.
    for k in sorted(set(used)):
        rows = [i for i, u in enumerate(used) if u == k]
        logits = scoring.score_choices(
            runner.model,
            [prompts[i] for i in rows],
            choice_ids,
            settings.batch_size,
            share_prefix=settings.share_prefix,
            pad_id=runner.tokenizer.pad_id,
            progress=progress,
        )
        for i, best in zip(rows, logits.argmax(dim=1).tolist(), strict=True):
            predictions[i] = letters[best]
    answers = [q.answer for q in subject.questions]
    correct = sum(p == a for p, a in zip(predictions, answers, strict=True))
    return {
        "accuracy": 100.0 * correct / max(len(answers), 1),
        "n": len(answers),
        "correct": correct,
        "shots": shots,
        "fewer_shots": sum(u < min(shots, len(subject.shots)) for u in used),
        "predictions": "".join(predictions),
    }


def averages(
    task: Task, subjects: Sequence[Subject], results: dict[str, dict]
) -> tuple[float | None, dict[str, float | None]]:
    """The task's score and its category averages, as the benchmark reports them."""

    def mean(names: list[str]) -> float | None:
        names = [n for n in names if n in results]
        if not names:
            return None  # no subject of this category was run (JSON has no NaN)
        if task.average == "questions":
            return (
                100.0
                * sum(results[n]["correct"] for n in names)
                / max(sum(results[n]["n"] for n in names), 1)
            )
        return sum(results[n]["accuracy"] for n in names) / len(names)

    names = [s.name for s in subjects]
    categories = {}
    for category in task.category_order:
        categories[category] = mean([s.name for s in subjects if category in s.categories])
    if task.hard:
        categories["Avg(Hard)"] = mean([n for n in names if n in task.hard])
    return mean(names), categories


def _fingerprint(task: Task, subject: Subject, settings: Settings, runner: Runner) -> dict:
    return {
        "version": RESULTS_VERSION,
        "task": task.name,
        "subject": subject.name,
        "shots": task.default_shots if settings.shots is None else settings.shots,
        "limit": settings.limit,
        "seed": settings.seed if task.seeded else None,
        "chat": runner.chat,
        "context": runner.context,
        "record": settings.record,
    }


def run_mc_task(
    runner: Runner,
    task: Task,
    data_dir: Path,
    settings: Settings,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """A multiple-choice task end to end. Each subject's result is written to `cache_dir/<task>/<subject>.json`
    with the settings it was computed under, and read back instead of recomputed when they match."""
    subjects = task.read(Path(data_dir), settings.seed)
    if settings.limit is not None:
        subjects = [dataclasses.replace(s, questions=s.questions[: settings.limit]) for s in subjects]
    total = sum(len(s.questions) for s in subjects)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    results: dict[str, dict] = {}
    for subject in subjects:
        key = _fingerprint(task, subject, settings, runner)
        path = None if cache_dir is None else Path(cache_dir) / task.name / f"{subject.name}.json"
        cached = _read_json(path)
        if cached is not None and cached.get("settings") == key:
            result = cached["result"]
            step(result["n"])
        else:
            result = score_subject(runner, task, subject, settings, step)
            if path is not None:
                _write_json(path, {"settings": key, "result": result})
        results[subject.name] = result
    score, categories = averages(task, subjects, results)
    shots = task.default_shots if settings.shots is None else settings.shots
    return {
        "metric": "accuracy",
        "score": score,
        "n": sum(r["n"] for r in results.values()),
        "per_subject": {name: r["accuracy"] for name, r in results.items()},
        "categories": categories,
        "settings": {
            "shots": shots,
            "shot_source": task.shot_source,
            "shot_seed": settings.seed if task.seeded else None,
            "limit_per_subject": settings.limit,
            "prompt_format": {"header": task.format.header, "item": _describe(task.format)},
            "scoring": "argmax of next-token logits of the letters A-D (last token of cue + letter)",
            "average": "mean over subjects" if task.average == "subjects" else "mean over questions",
            "questions_with_fewer_shots": sum(r["fewer_shots"] for r in results.values()),
            "chat": runner.chat,
        },
    }


def _describe(fmt: Format) -> str:
    return (
        fmt.question_prefix
        + "{question}"
        + "".join(fmt.option.format(letter=x, text="{" + x + "}") for x in LETTERS)
        + fmt.cue
        + fmt.letter.format(letter="{answer}")
        + fmt.after
    )


# --- generation ----------------------------------------------------------------------------------------------


def make_generate(runner: Runner, batch_size: int) -> Callable[[list[str], int, list[str]], list[str]]:
    """`generate(prompts, max_new_tokens, stop_strings) -> completions`, greedy and batched, for the generation
    tasks: each completion is cut before the first stop string, and ends at EOS (or the chat format's end)."""
    from baichuan.generate import SamplingConfig, generate

    eos = (runner.tokenizer.eos_id,)
    if runner.chat:
        eos = tuple(dict.fromkeys(eos + tuple(runner.chat_format.stop_ids)))

    def generate_texts(prompts: list[str], max_new_tokens: int, stop_strings: list[str]) -> list[str]:
        sampling = SamplingConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_ids=eos, stop_strings=tuple(stop_strings)
        )
        room = max_new_tokens
        keep = max(runner.context - room, 1)
        texts = []
        for start in range(0, len(prompts), batch_size):
            ids = [runner.ids(p, room)[-keep:] for p in prompts[start : start + batch_size]]
            new = generate(
                runner.model,
                ids,
                sampling,
                tokenizer=runner.tokenizer if stop_strings else None,
                pad_id=runner.tokenizer.pad_id,
                kv_dtype=runner.kv_dtype,
            )
            for row in new:
                text = runner.tokenizer.decode([t for t in row if t not in eos], skip_special_tokens=True)
                for stop in stop_strings:
                    text = text.split(stop, 1)[0]
                texts.append(text)
        return texts

    return generate_texts


def generative_tasks() -> dict:
    """The generation tasks (BBH, GSM8K, MATH, HumanEval, MBPP, Flores), imported only when asked for."""
    try:
        from baichuan.eval.generative import GENERATIVE_TASKS
    except ImportError:
        return {}
    return dict(GENERATIVE_TASKS)


def run_generative(
    runner: Runner,
    name: str,
    data_dir: Path,
    settings: Settings,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """A generation task through baichuan.eval.generative, cached whole under `cache_dir/<name>.json`."""
    from baichuan.eval.generative import run_generative_task

    key = {
        "version": RESULTS_VERSION,
        "task": name,
        "shots": settings.shots,
        "limit": settings.limit,
        "chat": runner.chat,
        "context": runner.context,
        "record": settings.record,
    }
    path = None if cache_dir is None else Path(cache_dir) / f"{name}.json"
    cached = _read_json(path) if path is not None else None
    if cached is not None and cached.get("settings") == key:
        return cached["result"]
    result = run_generative_task(
        name,
        make_generate(runner, settings.batch_size),
        Path(data_dir),
        shots=settings.shots,
        limit=settings.limit,
        batch_size=settings.batch_size,
        chat=runner.chat,
        progress=progress,
    )
    result.setdefault("settings", {})["chat"] = runner.chat
    if path is not None:
        _write_json(path, {"settings": key, "result": result})
    return result


def task_names() -> list[str]:
    return [*TASKS, *generative_tasks()]


def run_tasks(
    runner: Runner,
    names: Sequence[str],
    data_dir: Path,
    settings: Settings,
    out: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Every task of `names`; with `out`, per-subject results are cached under out/cache and the results are
    written to out/results.json and out/results.md."""
    unknown = [n for n in names if n not in TASKS and n not in generative_tasks()]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(task_names())}")
    cache = None if out is None else Path(out) / "cache"
    tasks = {}
    for name in names:
        report = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        if name in TASKS:
            tasks[name] = run_mc_task(runner, TASKS[name], data_dir, settings, cache, report)
        else:
            tasks[name] = run_generative(runner, name, data_dir, settings, cache, report)
        tasks[name]["settings"].update(settings.record)
    results = {
        "version": RESULTS_VERSION,
        "model": settings.record,
        "settings": {
            "shots": settings.shots,
            "limit": settings.limit,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "chat": runner.chat,
            "context": runner.context,
        },
        "tasks": tasks,
    }
    if out is not None:
        from baichuan.eval.report import markdown

        Path(out).mkdir(parents=True, exist_ok=True)
        _write_json(Path(out) / "results.json", results)
        (Path(out) / "results.md").write_text(markdown(results), encoding="utf-8")
    return results


# --- files ---------------------------------------------------------------------------------------------------


def _read_json(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a file cut short by a killed run: computed again
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: Any) -> None:
    """Written whole or not at all (a temporary file renamed), so a killed run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def weights_checksum(directory: Path, cache_file: Path | None = None) -> dict:
    """sha256 of every weight file of a checkpoint (read in 1 MiB blocks) and one over them all. Each file's sum
    is cached in `cache_file` under its path, size and modification time, so the next run reads no weights."""
    from baichuan.checkpoint import weight_files

    files = sorted({p.resolve() for p in weight_files(directory)})
    index = [p for p in (Path(directory) / n for n in ("model.safetensors.index.json",)) if p.is_file()]
    cache = _read_json(cache_file) or {}
    sums = {}
    for path in [*index, *files]:
        stat = path.stat()
        key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            cache[key] = digest.hexdigest()
        sums[path.name] = cache[key]
    if cache_file is not None:
        _write_json(cache_file, cache)
    total = hashlib.sha256("".join(f"{name}:{s}\n" for name, s in sorted(sums.items())).encode()).hexdigest()
    return {"sha256": total, "files": sums}
