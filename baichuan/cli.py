"""The `baichuan` command. Each command imports its module inside the function, so `--help` stays fast."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

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


@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write the new checkpoint directory.")],
    preset: Annotated[
        str, typer.Option(help="baichuan-7b, baichuan-13b, baichuan2-7b or baichuan2-13b.")
    ] = "baichuan2-7b",
    layers: Annotated[int | None, typer.Option(help="Override the number of layers.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Override the hidden size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Override the number of attention heads.")] = None,
    ffn: Annotated[int | None, typer.Option(help="Override the MLP (intermediate) size.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Override the vocabulary size.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Override the context length.")] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype: bf16, fp16 or fp32.")] = "bf16",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Copy this tokenizer.model instead of training a small one.")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace the checkpoint in a non-empty directory (its other files stay).")
    ] = False,
) -> None:
    """Write a randomly initialised checkpoint (config, weights, tokenizer) in the official layout."""
    from rich.console import Console

    from baichuan.config import preset as get_preset
    from baichuan.scaffold import init_checkpoint

    if directory.exists() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} exists and is not empty (pass --force to write into it)")
    if tokenizer is not None and not tokenizer.is_file():
        raise UserError(f"tokenizer file {tokenizer} does not exist")
    overrides = {
        "n_layers": layers,
        "dim": hidden,
        "n_heads": heads,
        "ffn_dim": ffn,
        "vocab_size": vocab,
        "max_seq_len": max_seq_len,
    }
    config = get_preset(preset).replace(**{k: v for k, v in overrides.items() if v is not None})
    console = Console(stderr=True)
    with console.status(f"writing {config.num_params():,} random parameters to {directory}"):
        init_checkpoint(config, directory, dtype=parse_dtype(dtype), seed=seed, tokenizer=tokenizer)
    console.print(
        f"[green]wrote[/] {directory}: {preset} shape, {config.n_layers} layers, hidden {config.dim}, "
        f"{config.num_params():,} parameters"
    )


ModelDir = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint directory (official or ours).")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")]
Dtype = Annotated[
    str,
    typer.Option(
        help="auto (bf16 where the hardware computes it natively, else fp32/fp16), bf16, fp16, fp32."
    ),
]
MaxNew = Annotated[
    int | None, typer.Option(help="Most tokens to generate [default: generation_config.json's].")
]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature [default: the checkpoint's].")]
TopK = Annotated[int | None, typer.Option(help="Top-k sampling, 0 = off [default: the checkpoint's].")]
TopP = Annotated[float | None, typer.Option(help="Nucleus sampling [default: the checkpoint's].")]
Penalty = Annotated[float | None, typer.Option(help="Repetition penalty [default: the checkpoint's].")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")]
Greedy = Annotated[bool, typer.Option(help="Greedy decoding instead of sampling.")]
Quantize = Annotated[
    int | None, typer.Option(help="Quantize the weights while loading: 8 or 4 bits (weight-only).")
]


KvDtype = Annotated[
    str,
    typer.Option(
        help="KV cache dtype: auto (bf16 on CPU even where compute is fp32; the compute dtype on GPU), bf16, "
        "fp16, fp32."
    ),
]
Context = Annotated[
    int | None,
    typer.Option(
        "--max-seq-len",
        min=2,
        help="Context of this run in positions [default: the model's, shortened to what fits in memory].",
    ),
]

# The shortest context chosen for a chat or a server to fit in memory: below it, refuse instead.
MIN_CONTEXT = 256


def _note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[dim]{message}[/]", highlight=False)


def _sampling(defaults, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy):
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


def _prepare(model: Path, device: str, dtype: str, quantize: int | None, kv_dtype: str):
    """The checkpoint read and checked, all but its weights (runtime.prepare)."""
    from baichuan.runtime import prepare

    if quantize not in (None, 8, 4):
        raise UserError(f"--quantize takes 8 or 4, not {quantize}")
    try:
        return prepare(model, device, dtype, quantize, kv_dtype)
    except ValueError as e:
        raise UserError(str(e)) from None


def _context(prepared, max_seq_len: int | None) -> int:
    """The context of this run: --max-seq-len, at most the model's."""
    context = prepared.config.max_seq_len
    if max_seq_len is not None and max_seq_len > context:
        _note(f"--max-seq-len {max_seq_len:,} is beyond the model's context: using its {context:,}")
    return min(max_seq_len or context, context)


def _fit_memory(prepared, *, rows, seq_len, prefill, floor, fixed, shrink, max_batch=None) -> int:
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
        _note(f"memory: ~{estimate.describe()}")
        return seq_len
    free, source = available
    if estimate.total <= free:
        _note(f"memory: ~{estimate.describe()}; {gib(free)} available ({source})")
        return seq_len

    def fits(n: int, rows: int = rows, **changes) -> bool:
        changed = dataclasses.replace(prepared, **changes) if changes else prepared
        return changed.estimate(rows, n, min(prefill, n)).total <= HEADROOM * free

    best = largest(fits, floor, seq_len)
    if best is not None and not fixed:
        _note(
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


class _Progress:
    """Reading the weights, on stderr: a bar on a terminal; elsewhere (a log, a pipe) a plain line as each
    decoder layer starts, so that a load of minutes is never silent."""

    def __init__(self, what: str, n_layers: int):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.what, self.n_layers = what, n_layers
        self.layers: set[str] = set()
        self.bar = None

    def __enter__(self) -> _Progress:
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


def _load(prepared, max_seq_len: int | None = None):
    from baichuan.runtime import load

    what = f"quantizing to int{prepared.quantize}" if prepared.quantize else "loading"
    try:
        with _Progress(f"{what} {prepared.directory}", prepared.config.n_layers) as progress:
            return load(prepared, max_seq_len, progress)
    except ValueError as e:
        raise UserError(str(e)) from None


def _text(value: str, what: str) -> str:
    """Text from argv, refused in one line where it is not UTF-8 (Python keeps such bytes as surrogates)."""
    from baichuan.chat import not_utf8

    problem = not_utf8(value)
    if problem:
        raise UserError(f"{what} is {problem}")
    return value


def _stdin_text() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"the prompt on standard input is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None


@app.command()
@friendly
def generate(
    model: ModelDir,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt; '-' reads it from standard input.")
    ],
    chat: Annotated[
        bool, typer.Option(help="Send the prompt as a user message in the model's chat format.")
    ] = False,
    system: Annotated[str | None, typer.Option(help="A system prompt (with --chat).")] = None,
    max_new_tokens: MaxNew = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: Penalty = None,
    seed: Seed = None,
    greedy: Greedy = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    kv_dtype: KvDtype = "auto",
    quantize: Quantize = None,
    max_seq_len: Context = None,
) -> None:
    """Complete a prompt (or answer it as a chat message with --chat) and stream the text to standard output."""
    from baichuan.generate import SamplingConfig, chat_prompt, stream_text

    # Everything that can be wrong with the input fails here, before the weights are read.
    flags = (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
    _sampling(SamplingConfig(), *flags)
    text = _stdin_text() if prompt == "-" else _text(prompt, "--prompt")
    system = None if system is None else _text(system, "--system")
    prepared = _prepare(model, device, dtype, quantize, kv_dtype)
    sampling = _sampling(prepared.sampling, *flags)
    context = _context(prepared, max_seq_len)
    tokenizer = prepared.tokenizer
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": text}
        ]
        config = prepared.config.replace(max_seq_len=context)
        try:
            ids, sampling = chat_prompt(config, tokenizer, messages, sampling, prepared.chat_format)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        ids = ([tokenizer.bos_id] if prepared.add_bos else []) + tokenizer.encode(text)
        if not ids:
            raise UserError("the prompt is empty")
    room = context - len(ids)
    if room <= 0:
        raise UserError(f"the prompt is {len(ids):,} tokens: it fills the {context:,}-token context")
    if sampling.max_new_tokens > room:
        _note(
            f"--max-new-tokens {sampling.max_new_tokens:,} cut to {room:,}: the prompt's {len(ids):,} tokens "
            f"leave {room:,} of the {context:,}-token context"
        )
        sampling = sampling.replace(max_new_tokens=room)
    length = _fit_memory(
        prepared,
        rows=1,
        seq_len=len(ids) + sampling.max_new_tokens,
        prefill=len(ids),
        floor=len(ids) + min(1, sampling.max_new_tokens),
        fixed=max_seq_len is not None,
        shrink=lambda n: f"--max-new-tokens {n - len(ids)}",
    )
    sampling = sampling.replace(max_new_tokens=length - len(ids))
    _note(prepared.note)
    loaded = _load(prepared, context)
    for piece in stream_text(loaded.model, tokenizer, ids, sampling, kv_dtype=loaded.kv_dtype):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@friendly
def chat(
    model: ModelDir,
    system: Annotated[str | None, typer.Option(help="A system prompt (Baichuan2 chat models).")] = None,
    max_new_tokens: MaxNew = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    repetition_penalty: Penalty = None,
    seed: Seed = None,
    greedy: Greedy = False,
    device: Device = "auto",
    dtype: Dtype = "auto",
    kv_dtype: KvDtype = "auto",
    quantize: Quantize = None,
    max_seq_len: Context = None,
) -> None:
    """Chat in the terminal: streaming answers, history, /clear, /exit, Ctrl-C stops an answer."""
    from baichuan import chat as repl
    from baichuan.generate import SamplingConfig

    flags = (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
    _sampling(SamplingConfig(), *flags)
    system = None if system is None else _text(system, "--system")
    prepared = _prepare(model, device, dtype, quantize, kv_dtype)
    sampling = _sampling(prepared.sampling, *flags)
    # The session keeps one cache row of the whole context, and a pasted text may be prefilled at once.
    context = _context(prepared, max_seq_len)
    context = _fit_memory(
        prepared,
        rows=1,
        seq_len=context,
        prefill=context,
        floor=min(MIN_CONTEXT, context),
        fixed=max_seq_len is not None,
        shrink=lambda n: f"--max-seq-len {n}",
    )
    if sampling.max_new_tokens >= context:
        _note(
            f"--max-new-tokens {sampling.max_new_tokens:,} cut to {context - 1:,}: the context is {context:,}"
        )
        sampling = sampling.replace(max_new_tokens=context - 1)
    loaded = _load(prepared, context)
    # Bytes that are not UTF-8 come in as surrogates instead of an exception, and the REPL refuses that message.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    repl.run(loaded, sampling, system)


Host = Annotated[
    str,
    typer.Option(
        help="Address to bind. 127.0.0.1 keeps the server local; 0.0.0.0 exposes it: set --api-key (without one "
        "the server starts, with a warning on stderr)."
    ),
]
Port = Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar="BAICHUAN_API_KEY",
        show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1 routes (the variable keeps it out of `ps`). An empty "
        "key is an error, not an open server.",
    ),
]
MaxBatch = Annotated[int, typer.Option(min=1, help="Requests decoded together (rows of the KV cache).")]
MaxQueue = Annotated[int, typer.Option(min=1, help="Requests that may wait for a row; beyond that HTTP 429.")]
MaxSeqLen = Annotated[
    int | None, typer.Option(min=2, help="Positions per cache row (default: the model's context length).")
]
ModelName = Annotated[
    str | None, typer.Option(help="The model id clients send (default: the directory name).")
]
Threads = Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: one per core).")]
MaxRequestBytes = Annotated[
    int, typer.Option(min=1, help="Largest request body in bytes; larger ones get 413 before they are read.")
]
AllowedHosts = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated names the Host header may carry, besides localhost, 127.0.0.1, ::1 and the --host "
        "address (a guard against DNS rebinding); '*' allows any. Bound to 0.0.0.0 or ::, any is the default."
    ),
]


@app.command()
@friendly
def serve(
    model: ModelDir,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    max_batch: MaxBatch = 8,
    max_queue: MaxQueue = 64,
    max_seq_len: MaxSeqLen = None,
    quantize: Quantize = None,
    kv_dtype: KvDtype = "auto",
    model_name: ModelName = None,
    threads: Threads = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the chat page in a browser.")] = False,
    max_request_bytes: MaxRequestBytes = 4 << 20,
    allowed_hosts: AllowedHosts = None,
    engine: Annotated[
        str, typer.Option(help="baichuan (this toolkit) or vllm (vLLM's server; needs vLLM and a GPU).")
    ] = "baichuan",
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) with continuous
    batching, and a web chat page at / (streaming answers, history, stop, sampling controls)."""
    import os

    # click reads an empty variable as unset, which would serve without the key its owner meant to set.
    if api_key is None and os.environ.get("BAICHUAN_API_KEY") == "":
        api_key = ""
    if api_key is not None and not api_key.strip():
        raise UserError(
            "the API key is empty (--api-key or BAICHUAN_API_KEY): give a key, or unset it to serve without one"
        )
    if engine == "vllm":
        from baichuan.serve.vllm import run_vllm, vllm_argv

        try:
            run_vllm(vllm_argv(model, host, port, api_key, max_batch, max_seq_len, model_name, dtype))
        except ValueError as e:
            raise UserError(str(e)) from None
        return
    if engine != "baichuan":
        raise UserError(f"unknown engine {engine!r}; choose baichuan or vllm")
    from baichuan.serve.app import run
    from baichuan.serve.engine import PREFILL_CHUNK

    prepared = _prepare(model, device, dtype, quantize, kv_dtype)
    # The engine keeps max_batch rows of the whole context plus one row to prefill into.
    context = _context(prepared, max_seq_len)
    context = _fit_memory(
        prepared,
        rows=max_batch + 1,
        seq_len=context,
        prefill=PREFILL_CHUNK,
        floor=min(MIN_CONTEXT, context),
        fixed=max_seq_len is not None,
        shrink=lambda n: f"--max-seq-len {n}",
        max_batch=max_batch,
    )
    try:
        run(
            model,
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            max_seq_len=context,
            quantize=quantize,
            kv_dtype=kv_dtype,
            model_name=model_name,
            device=device,
            dtype=dtype,
            threads=threads,
            open_browser=open_browser,
            max_request_bytes=max_request_bytes,
            allowed_hosts=[name for name in (allowed_hosts or "").split(",") if name.strip()],
        )
    except ValueError as e:
        raise UserError(str(e)) from None


@app.command()
@friendly
def quantize(
    model: ModelDir,
    bits: Annotated[int, typer.Option(help="8 (per-channel int8) or 4 (group-wise int4).")],
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
    with _Progress(f"quantizing {model} to int{bits}", n_layers) as progress:
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


# train-tokenizer, tokenizer-stats, prepare-data, pretrain
from baichuan.cli_train import register as _register_training  # noqa: E402

_register_training(app, friendly)


def main() -> None:
    app(prog_name="baichuan")


if __name__ == "__main__":
    sys.exit(main())
