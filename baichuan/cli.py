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


def _sampling(loaded, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy):
    try:
        sampling = loaded.sampling.replace(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        return sampling.replace(do_sample=False) if greedy else sampling
    except ValueError as e:
        raise UserError(str(e)) from None


def _load(model: Path, device: str, dtype: str, quantize: int | None = None):
    from rich.console import Console

    from baichuan.runtime import load_for_inference

    try:
        with Console(stderr=True).status(f"loading {model}"):
            return load_for_inference(model, device, dtype, quantize)
    except ValueError as e:
        raise UserError(str(e)) from None


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
    quantize: Quantize = None,
) -> None:
    """Complete a prompt (or answer it as a chat message with --chat) and stream the text to standard output."""
    from rich.console import Console

    from baichuan.generate import chat as chat_answer
    from baichuan.generate import stream_text

    if prompt == "-":
        prompt = sys.stdin.read()
    loaded = _load(model, device, dtype, quantize)
    Console(stderr=True).print(f"[dim]{loaded.note}[/]")
    sampling = _sampling(loaded, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        try:
            pieces = chat_answer(
                loaded.model,
                loaded.tokenizer,
                messages,
                sampling,
                stream=True,
                chat_format=loaded.chat_format,
            )
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        ids = ([loaded.tokenizer.bos_id] if loaded.add_bos else []) + loaded.tokenizer.encode(prompt)
        if not ids:
            raise UserError("the prompt is empty")
        pieces = stream_text(loaded.model, loaded.tokenizer, ids, sampling)
    for piece in pieces:
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
    quantize: Quantize = None,
) -> None:
    """Chat in the terminal: streaming answers, history, /clear, /exit, Ctrl-C stops an answer."""
    from baichuan import chat as repl

    loaded = _load(model, device, dtype, quantize)
    sampling = _sampling(loaded, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
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

    if quantize not in (None, 8, 4):
        raise UserError(f"--quantize takes 8 or 4, not {quantize}")
    try:
        run(
            model,
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            max_queue=max_queue,
            max_seq_len=max_seq_len,
            quantize=quantize,
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

    from baichuan.checkpoint import load_model, save_model

    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty (pass --force to write into it)")
    console = Console(stderr=True)
    with console.status(f"quantizing {model} to int{bits}"):
        quantized = load_model(model, dtype=parse_dtype(dtype), quantize=bits, group_size=group_size)
        names = (
            "generation_config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        )
        files = {name: (model / name).read_bytes() for name in names if (model / name).is_file()}
        save_model(quantized, out, files=files)
    console.print(f"[green]wrote[/] {out}: int{bits} weights ({quantized.quantization})")


# train-tokenizer, tokenizer-stats, prepare-data, pretrain
from baichuan.cli_train import register as _register_training  # noqa: E402

_register_training(app, friendly)


def main() -> None:
    app(prog_name="baichuan")


if __name__ == "__main__":
    sys.exit(main())
