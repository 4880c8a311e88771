"""results.md: the scores in the layout of the Baichuan READMEs' tables (one row per model, one column per
benchmark, then the C-Eval / MMLU / CMMLU category tables and per-subject accuracies)."""

from __future__ import annotations

import math

from baichuan.eval.tasks import TASKS

# The seed tables' column orders.
DETAIL_COLUMNS = {
    "ceval": ("Average", "Avg(Hard)", "STEM", "Social Sciences", "Humanities", "Other"),
    "mmlu": ("Humanities", "Social Sciences", "STEM", "Other", "Average"),
    "cmmlu": ("Average", "STEM", "Humanities", "Social Sciences", "Other", "China specific"),
}
TITLES = {
    "bbh": "BBH",
    "gsm8k": "GSM8K",
    "math": "MATH",
    "humaneval": "HumanEval",
    "mbpp": "MBPP",
    "flores": "Flores",
}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---:" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def title_of(name: str) -> str:
    return TASKS[name].title if name in TASKS else TITLES.get(name, name)


def markdown(results: dict) -> str:
    model = results.get("model", {})
    label = model.get("name") or "model"
    tasks = results["tasks"]
    lines = [f"# Evaluation of {label}", ""]
    settings = results.get("settings", {})
    facts = [
        f"shots {settings.get('shots') if settings.get('shots') is not None else 'task default'}",
        f"seed {settings.get('seed')}",
        f"chat {'yes' if settings.get('chat') else 'no'}",
        f"dtype {model.get('dtype', '?')}",
        f"quantization {model.get('quantize') or 'none'}",
    ]
    if settings.get("limit") is not None:
        facts.append(f"limit {settings['limit']} per subject")
    if model.get("sha256"):
        facts.append(f"weights sha256 {model['sha256'][:16]}…")
    lines += [", ".join(facts), ""]
    lines += _table(["Model", *map(title_of, tasks)], [[label, *(_cell(t["score"]) for t in tasks.values())]])
    for name, columns in DETAIL_COLUMNS.items():
        if name not in tasks:
            continue
        task = tasks[name]
        values = {**task.get("categories", {}), "Average": task["score"]}
        lines += ["", f"## {title_of(name)}", ""]
        lines += _table(["Model", *columns], [[label, *(_cell(values.get(c)) for c in columns)]])
    for name, task in tasks.items():
        per_subject = task.get("per_subject") or {}
        if len(per_subject) <= 1:
            continue
        lines += ["", f"### {title_of(name)} per subject ({task.get('metric', 'accuracy')})", ""]
        lines += _table(["Subject", "Score"], [[s, _cell(v)] for s, v in per_subject.items()])
    return "\n".join(lines) + "\n"
