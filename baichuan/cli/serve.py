"""`baichuan serve`: the OpenAI-compatible server and its chat page."""

from __future__ import annotations

from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly
from baichuan.cli.loading import MIN_CONTEXT, check_lora, context_of, fit_memory, prepare
from baichuan.cli.options import Device, Dtype, KvDtype, Lora, ModelDir, Quantize

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
    lora: Lora = None,
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
    if engine == "vllm" and lora is not None:
        raise UserError(
            "--lora is for the baichuan engine; merge the adapter first (baichuan merge-lora) for vLLM"
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

    check_lora(lora)
    prepared = prepare(model, device, dtype, quantize, kv_dtype)
    # The engine keeps max_batch rows of the whole context plus one row to prefill into.
    context = context_of(prepared, max_seq_len)
    context = fit_memory(
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
            lora=lora,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
