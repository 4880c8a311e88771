"""C-Eval / MMLU / CMMLU against training tokens, over the intermediate checkpoints that pretraining writes
(out/checkpoints/step-N, each with trainer_state.pt)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch

STEP_DIR = re.compile(r"step-(\d+)")


def training_tokens(checkpoint: Path) -> int:
    """Tokens seen when `checkpoint` was saved: step x global batch x sequence length from its trainer_state.pt
    (memory-mapped: its optimizer state is not read), else the `tokens` column of the run's loss.csv at the
    step its directory name gives."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / "trainer_state.pt"
    if state_file.is_file():
        state = torch.load(state_file, map_location="cpu", mmap=True, weights_only=False)
        data = state.get("data") or {}
        if "global_batch" in data and "seq_len" in data:
            return int(state["step"]) * int(data["global_batch"]) * int(data["seq_len"])
    match = STEP_DIR.fullmatch(checkpoint.name)
    log = checkpoint.parent.parent / "loss.csv"
    if match and log.is_file():
        step = int(match.group(1))
        with open(log, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if int(row["step"]) == step:
                    return int(row["tokens"])
    raise ValueError(
        f"{checkpoint}: cannot tell how many tokens it was trained on (no trainer_state.pt with the data "
        "settings, and no loss.csv row for its step)"
    )


def plot(points: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """One line per task, score against tokens (billions where they reach them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    largest = max((t for series in points.values() for t, _ in series), default=0)
    scale, unit = (1e9, "B") if largest >= 1e9 else (1e6, "M") if largest >= 1e6 else (1, "")
    for name, series in points.items():
        series = sorted(series)
        ax.plot([t / scale for t, _ in series], [s for _, s in series], marker="o", label=name)
    ax.set_xlabel(f"training tokens ({unit})" if unit else "training tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "accuracy over training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
