"""`baichuan generate` and `baichuan chat`: text from a checkpoint, once or as a conversation."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from baichuan.cli.base import UserError, app, friendly, note
from baichuan.cli.loading import (
    MIN_CONTEXT,
    apply_lora,
    check_lora,
    context_of,
    fit_memory,
    load,
    prepare,
    sampling_flags,
    stdin_text,
    text_arg,
)
from baichuan.cli.options import (
    Context,
    Device,
    Dtype,
    Greedy,
    KvDtype,
    Lora,
    MaxNew,
    ModelDir,
    Penalty,
    Quantize,
    Seed,
    Temperature,
    TopK,
    TopP,
)


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
    lora: Lora = None,
) -> None:
    """Complete a prompt (or answer it as a chat message with --chat) and stream the text to standard output."""
    from baichuan.chat import terminal_safe
    from baichuan.generate import SamplingConfig, chat_prompt, stream_text

    # Everything that can be wrong with the input fails here, before the weights are read.
    flags = (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
    sampling_flags(SamplingConfig(), *flags)
    text = stdin_text() if prompt == "-" else text_arg(prompt, "--prompt")
    system = None if system is None else text_arg(system, "--system")
    adapter = check_lora(lora)
    prepared = prepare(model, device, dtype, quantize, kv_dtype)
    sampling = sampling_flags(prepared.sampling, *flags)
    context = context_of(prepared, max_seq_len)
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
        note(
            f"--max-new-tokens {sampling.max_new_tokens:,} cut to {room:,}: the prompt's {len(ids):,} tokens "
            f"leave {room:,} of the {context:,}-token context"
        )
        sampling = sampling.replace(max_new_tokens=room)
    length = fit_memory(
        prepared,
        rows=1,
        seq_len=len(ids) + sampling.max_new_tokens,
        prefill=len(ids),
        floor=len(ids) + min(1, sampling.max_new_tokens),
        fixed=max_seq_len is not None,
        shrink=lambda n: f"--max-new-tokens {n - len(ids)}",
    )
    sampling = sampling.replace(max_new_tokens=length - len(ids))
    note(prepared.note)
    loaded = load(prepared, context)
    apply_lora(loaded, adapter)
    on_terminal = sys.stdout.isatty()  # a pipe or a file gets the text as generated
    for piece in stream_text(loaded.model, tokenizer, ids, sampling, kv_dtype=loaded.kv_dtype):
        sys.stdout.write(terminal_safe(piece) if on_terminal else piece)
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
    lora: Lora = None,
) -> None:
    """Chat in the terminal: streaming answers, history, /clear, /exit, Ctrl-C stops an answer."""
    from baichuan import chat as repl
    from baichuan.generate import SamplingConfig

    flags = (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, greedy)
    sampling_flags(SamplingConfig(), *flags)
    system = None if system is None else text_arg(system, "--system")
    adapter = check_lora(lora)
    prepared = prepare(model, device, dtype, quantize, kv_dtype)
    sampling = sampling_flags(prepared.sampling, *flags)
    # The session keeps one cache row of the whole context, and a pasted text may be prefilled at once.
    context = context_of(prepared, max_seq_len)
    context = fit_memory(
        prepared,
        rows=1,
        seq_len=context,
        prefill=context,
        floor=min(MIN_CONTEXT, context),
        fixed=max_seq_len is not None,
        shrink=lambda n: f"--max-seq-len {n}",
    )
    if sampling.max_new_tokens >= context:
        note(
            f"--max-new-tokens {sampling.max_new_tokens:,} cut to {context - 1:,}: the context is {context:,}"
        )
        sampling = sampling.replace(max_new_tokens=context - 1)
    loaded = load(prepared, context)
    apply_lora(loaded, adapter)
    # Bytes that are not UTF-8 come in as surrogates instead of an exception, and the REPL refuses that message.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    repl.run(loaded, sampling, system)
