"""Between the flags and the weights: sampling settings, the checkpoint checked before it is read, the context
and memory fitted, loading with progress, and text from argv/stdin refused where it is not UTF-8."""

from __future__ import annotations

import sys
from pathlib import Path

from baichuan.cli.base import UserError, note

# The shortest context chosen for a chat or a server to fit in memory: below it, refuse instead.
MIN_CONTEXT = 256


def sampling_flags(defaults, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy):
    """The sampling flags over `defaults` (the checkpoint's). Called once over plain defaults first, so that a
    bad flag fails before anything is read, and its message names the flag."""
    try:
        sampling = defaults.replace(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        return sampling.replace(do_sample=False) if greedy else sampling
    except ValueError as e:
        message = str(e)
        flag = message.split(" ", 1)[0]
        if flag in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            message = "--" + flag.replace("_", "-") + message[len(flag) :]
        raise UserError(message) from None


def prepare(model: Path, device: str, dtype: str, quantize: int | None, kv_dtype: str):
    """The checkpoint read and checked, all but its weights (runtime.prepare)."""
    from baichuan.runtime import prepare as prepare_run

    if quantize not in (None, 8, 4):
        raise UserError(f"--quantize takes 8 or 4, not {quantize}")
    try:
        return prepare_run(model, device, dtype, quantize, kv_dtype)
    except ValueError as e:
        raise UserError(str(e)) from None


def context_of(prepared, max_seq_len: int | None) -> int:
    """The context of this run: --max-seq-len, at most the model's."""
    context = prepared.config.max_seq_len
    if max_seq_len is not None and max_seq_len > context:
        note(f"--max-seq-len {max_seq_len:,} is beyond the model's context: using its {context:,}")
    return min(max_seq_len or context, context)


def fit_memory(prepared, *, rows, seq_len, prefill, floor, fixed, shrink, max_batch=None) -> int:
    """Check, before loading, that weights + KV cache (`rows` x `seq_len`) + activations fit in the memory
    available. Returns `seq_len`, or where it does not fit and the user did not fix it, the largest length
    >= `floor` that fits, said in one line. Otherwise refuses with the numbers and the flags that would fit;
    `shrink(n)` is the flag asking for n positions, `max_batch` (serve) adds --max-batch to the choices."""
    import dataclasses

    import torch

    from baichuan.memory import HEADROOM, gib, largest

    estimate = prepared.estimate(rows, seq_len, prefill)
    available = prepared.available_memory()
    if available is None:
        note(f"memory: ~{estimate.describe()}")
        return seq_len
    free, source = available
    if estimate.total <= free:
        note(f"memory: ~{estimate.describe()}; {gib(free)} available ({source})")
        return seq_len

    def fits(n: int, rows: int = rows, **changes) -> bool:
        changed = dataclasses.replace(prepared, **changes) if changes else prepared
        return changed.estimate(rows, n, min(prefill, n)).total <= HEADROOM * free

    best = largest(fits, floor, seq_len)
    if best is not None and not fixed:
        note(
            f"memory: ~{estimate.describe()} does not fit in the {gib(free)} available ({source}): running "
            f"with {shrink(best)} (~{gib(prepared.estimate(rows, best, min(prefill, best)).total)})"
        )
        return best
    choices = [shrink(best)] if best is not None else []
    if max_batch is not None and max_batch > 1:
        batch = largest(lambda b: fits(seq_len, rows=b + 1), 1, max_batch - 1)
        if batch is not None:
            choices.append(f"--max-batch {batch}")
    if prepared.kv_dtype.itemsize > 2 and fits(seq_len, kv_dtype=torch.bfloat16):
        choices.append("--kv-dtype bf16")
    if prepared.quantize is None and prepared.quantization is None:
        bits = next((b for b in (8, 4) if fits(seq_len, quantize=b)), None)
        n = None if bits else largest(lambda n: fits(n, quantize=4), floor, seq_len)
        if bits is not None:
            choices.append(f"--quantize {bits}")
        elif n is not None and n > 1.25 * (best or 0):  # only where the weights are what does not fit
            choices.append(f"--quantize 4 {shrink(n)}")
    advice = (
        f"; any of these would fit: {', '.join(choices)}"
        if choices
        else f"; the weights alone need {gib(estimate.weights)}: nothing fits"
    )
    raise UserError(
        f"not enough memory: this run needs ~{estimate.describe()}, {gib(free)} is available ({source})"
        + advice
    )


class Progress:
    """Reading the weights, on stderr: a bar on a terminal; elsewhere (a log, a pipe) a plain line as each
    decoder layer starts, so that a load of minutes is never silent."""

    def __init__(self, what: str, n_layers: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.what, self.n_layers = what, n_layers
        self.layers: set[str] = set()
        self.bar = None

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tensors"),
            )
            self.bar = Progress(*columns, TimeElapsedColumn(), console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=None)
        return self

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)
            return
        parts = name.split(".")
        layer = parts[2] if parts[:2] == ["model", "layers"] and len(parts) > 2 else None
        if layer is not None and layer not in self.layers:
            self.layers.add(layer)
            line = f"{self.what}: layer {len(self.layers)}/{self.n_layers} ({done}/{total} tensors)"
            print(line, file=sys.stderr, flush=True)
        if done == total:
            print(f"{self.what}: {total}/{total} tensors read", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def load(prepared, max_seq_len: int | None = None):
    from baichuan.runtime import load as load_run

    what = f"quantizing to int{prepared.quantize}" if prepared.quantize else "loading"
    try:
        with Progress(f"{what} {prepared.directory}", prepared.config.n_layers) as progress:
            return load_run(prepared, max_seq_len, progress)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_lora(lora: Path | None):
    """The adapter read and checked before the weights (its fit to the model is checked when applied)."""
    if lora is None:
        return None
    from baichuan.lora import read_adapter

    try:
        return read_adapter(lora)
    except ValueError as e:
        raise UserError(str(e)) from None


def apply_lora(loaded, adapter) -> None:
    if adapter is None:
        return
    from baichuan.lora import apply_adapter

    try:
        apply_adapter(loaded.model, adapter)
    except ValueError as e:
        raise UserError(str(e)) from None
    note(f"LoRA adapter {adapter.directory} applied ({len(adapter.pairs)} layers)")


def text_arg(value: str, what: str) -> str:
    """Text from argv, refused in one line where it is not UTF-8 (Python keeps such bytes as surrogates)."""
    from baichuan.chat import not_utf8

    problem = not_utf8(value)
    if problem:
        raise UserError(f"{what} is {problem}")
    return value


def stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"the prompt on standard input is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None
