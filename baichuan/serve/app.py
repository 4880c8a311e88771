"""`baichuan serve`: an OpenAI-compatible HTTP server over the continuous-batching engine, and a chat page.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with SSE streaming), GET /health,
and GET / for the chat page. Defaults come from the checkpoint's generation_config.json, and a chat prompt is
built by the same ChatFormat as `generate.chat`, so a greedy answer here is `model.chat`'s answer. Where
`model.chat` would drop old rounds to make room for max_new_tokens, the server instead shortens the default
max_tokens to what the context has left, and answers 400 when the messages alone do not fit: an API client
should learn that its history is too long rather than get an answer to a silently truncated one.

The page is one static HTML file over this same API, not Gradio: it needs no extra dependency (Gradio is a
large one with its own server and queue), loads nothing from the network, and every answer it shows has gone
through the public endpoints, streaming and cancellation included, so it is also a live check of the API.

Every request passes three doors, pure ASGI middleware that answer before FastAPI reads the body: the Host
check (a page on another site that rebinds its DNS name to 127.0.0.1 still has the browser send that name as
Host, so a local server answers only its own names), the API key (401 without reading the body; the page, /health
and the schema stay open), and the body-size limit (413 on Content-Length, or as soon as a streamed body passes
it). Prompts are tokenized in a worker thread: SentencePiece releases the GIL, so a long prompt does not stall
other requests' streams.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from baichuan.chat_format import ChatFormat, Message
from baichuan.generate import SamplingConfig
from baichuan.runtime import Loaded
from baichuan.serve import protocol as p
from baichuan.serve.engine import Engine, EngineStopped, GenerationFailed, Output, QueueFull, Ticket
from baichuan.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# An upper bound on the context in ChatFormat.build: large enough that nothing is ever truncated.
NO_TRUNCATION = 1 << 40
# Below this, logits / temperature can overflow float32 (5e-324 is a valid JSON float); greedy is the limit.
MIN_TEMPERATURE = 1e-5
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
# A prompt the context can hold is far smaller (4,096 tokens of text, even JSON-escaped, is well under 1 MiB);
# the margin is for long histories and larger contexts.
MAX_REQUEST_BYTES = 4 << 20
# Names that always mean this machine: a DNS-rebinding page cannot make the browser send them as Host.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


class APIError(Exception):
    """An error the client gets as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        # A message may quote the request (a dict key, say), and JSON may carry lone surrogates that UTF-8 cannot
        # encode: written as `\udXXX` escapes, they cannot make the error answer itself fail.
        message, param = (
            None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")
            for text in (message, param)
        )
        self.detail = p.ErrorDetail(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        body = p.ErrorResponse(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Serving:
    """What the routes need: the engine and the checkpoint's tokenizer, chat format and defaults."""

    engine: Engine
    tokenizer: Tokenizer
    chat_format: ChatFormat
    defaults: SamplingConfig
    model_name: str
    add_bos: bool = False

    @property
    def context(self) -> int:
        return self.engine.max_seq_len


# --- translation: OpenAI requests -> prompt ids and sampling --------------------------------------------------


def check_request(body: p.SamplingFields, serving: Serving) -> None:
    """404 for another model; 400 for fields that would change the answer in ways we cannot honour."""
    if body.model != serving.model_name:
        raise APIError(
            404,
            f"The model `{body.model}` does not exist; this server serves `{serving.model_name}`",
            param="model",
            code="model_not_found",
        )
    unsupported = {
        "logprobs": bool(body.logprobs),
        "logit_bias": bool(body.logit_bias),
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
    }
    if isinstance(body, p.ChatCompletionRequest):
        unsupported["tools"] = bool(body.tools)
        unsupported["top_logprobs"] = body.top_logprobs is not None
        fmt = body.response_format
        unsupported["response_format"] = fmt is not None and fmt != {"type": "text"}
    else:
        unsupported["echo"] = body.echo
        unsupported["suffix"] = bool(body.suffix)
        unsupported["best_of"] = (body.best_of or 1) > 1
    for name, used in unsupported.items():
        if used:
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise APIError(400, f"{name} is not supported by this server{hint}", param=name)
    if body.n > serving.engine.max_batch:
        raise APIError(400, f"n must be at most {serving.engine.max_batch} on this server", param="n")


def chat_prompt(serving: Serving, body: p.ChatCompletionRequest) -> list[int]:
    messages: list[Message] = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        if content is None:
            if message.role != "assistant":
                raise APIError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
            content = ""
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    try:
        return serving.chat_format.build(serving.tokenizer, messages, NO_TRUNCATION, 0)
    except ValueError as error:  # e.g. a system message where the format has none
        raise APIError(400, str(error), param="messages") from None


def completion_prompt(serving: Serving, body: p.CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(
                400, "send one prompt per request (a batch of prompts is not supported)", param="prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = ([serving.tokenizer.bos_id] if serving.add_bos else []) + serving.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        vocab = serving.engine.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    return ids


def sampling_for(
    serving: Serving, body: p.SamplingFields, prompt_len: int, extra_eos: Sequence[int] = ()
) -> SamplingConfig:
    """The checkpoint's defaults with the request's overrides; max_tokens checked against the context."""
    context = serving.context
    if prompt_len >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; the prompt is {prompt_len} tokens, "
            "leaving no room for an answer",
            param="messages" if isinstance(body, p.ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if requested is not None and prompt_len + requested > context:
        raise APIError(
            400,
            f"max_tokens is too large: the prompt is {prompt_len} tokens and the context {context}, so at most "
            f"{context - prompt_len} tokens can be generated",
            param="max_tokens",
            code="context_length_exceeded",
        )
    max_new = requested or min(serving.defaults.max_new_tokens, context - prompt_len)
    do_sample = serving.defaults.do_sample
    if body.temperature is not None:
        # OpenAI's meaning: temperature 0 is greedy, anything else samples.
        do_sample = body.temperature >= MIN_TEMPERATURE
    if body.top_p == 0:
        do_sample = False  # an empty nucleus keeps only the most likely token
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stop is not None and any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    try:
        return serving.defaults.replace(
            do_sample=do_sample,
            max_new_tokens=max_new,
            temperature=body.temperature if do_sample else None,
            top_p=body.top_p or None,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop_strings=tuple(stop) if stop is not None else None,
            eos_ids=tuple(dict.fromkeys(serving.defaults.eos_ids + tuple(extra_eos))),
        )
    except ValueError as error:
        raise APIError(400, str(error)) from None


def submit(serving: Serving, prompt: list[int], sampling: SamplingConfig, n: int) -> Ticket:
    try:
        return serving.engine.submit(prompt, sampling, n)
    except QueueFull as error:
        raise APIError(
            429, f"The server is busy: {error}", type="rate_limit_exceeded", code="queue_full"
        ) from None
    except EngineStopped as error:
        raise APIError(503, str(error), type="server_error", code="engine_unavailable") from None
    except ValueError as error:
        raise APIError(400, str(error), code="context_length_exceeded") from None


# --- responses ------------------------------------------------------------------------------------------------


async def cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    """Cancel the generation when the client goes away (the body is already read, so the next ASGI message
    is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.cancel()
            return


async def watched_outputs(request: Request, ticket: Ticket) -> AsyncIterator[Output]:
    watcher = asyncio.create_task(cancel_on_disconnect(request, ticket))
    try:
        async for output in ticket.outputs():
            yield output
    finally:
        watcher.cancel()
        ticket.cancel()  # a no-op once every choice has finished


def engine_error(error: Exception) -> APIError:
    if isinstance(error, EngineStopped):
        return APIError(503, str(error), type="server_error", code="engine_unavailable")
    return APIError(500, str(error), type="server_error", code="generation_failed")


async def collect(request: Request, ticket: Ticket, n: int) -> tuple[list[str], list[str], int]:
    """Texts and finish reasons of the n choices, and the completion tokens of them all."""
    texts, reasons, tokens = [""] * n, ["length"] * n, [0] * n
    try:
        async for output in watched_outputs(request, ticket):
            texts[output.index] += output.text
            tokens[output.index] = output.tokens
            if output.finish_reason:
                reasons[output.index] = output.finish_reason
    except (EngineStopped, GenerationFailed) as error:
        raise engine_error(error) from None
    return texts, reasons, sum(tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> p.Usage:
    return p.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def sse(data: BaseModel) -> str:
    return f"data: {data.model_dump_json()}\n\n"


async def event_stream(
    request: Request, ticket: Ticket, chunks: Any, include_usage: bool, prompt_tokens: int
) -> AsyncIterator[str]:
    """SSE over a ticket: `chunks(output)` turns each engine output into chunk models; ends with [DONE]."""
    tokens: dict[int, int] = {}
    try:
        for chunk in chunks(None):
            yield sse(chunk)
        async for output in watched_outputs(request, ticket):
            tokens[output.index] = output.tokens
            for chunk in chunks(output):
                yield sse(chunk)
        if include_usage:
            yield sse(chunks.final(usage(prompt_tokens, sum(tokens.values()))))
    except (EngineStopped, GenerationFailed) as error:
        yield sse(p.ErrorResponse(error=engine_error(error).detail))
    yield "data: [DONE]\n\n"


class ChatChunks:
    """Engine outputs -> chat.completion.chunk objects: a role chunk first, then text, then the finish."""

    def __init__(self, model: str, n: int):
        self.model, self.n = model, n
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(self, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def __call__(self, output: Output | None) -> list[p.ChatCompletionChunk]:
        if output is None:
            delta = p.Delta(role="assistant", content="")
            return [self.chunk([p.ChatChunkChoice(index=i, delta=delta)]) for i in range(self.n)]
        chunks = []
        if output.text:
            delta = p.Delta(content=output.text)
            chunks.append(self.chunk([p.ChatChunkChoice(index=output.index, delta=delta)]))
        if output.finish_reason:
            choice = p.ChatChunkChoice(
                index=output.index, delta=p.Delta(), finish_reason=output.finish_reason
            )
            chunks.append(self.chunk([choice]))
        return chunks

    def final(self, totals: p.Usage) -> p.ChatCompletionChunk:
        return self.chunk([], totals)


class CompletionChunks:
    """Engine outputs -> text_completion chunks."""

    def __init__(self, model: str):
        self.model = model
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(self, choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> p.Completion:
        return p.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def __call__(self, output: Output | None) -> list[p.Completion]:
        if output is None or not (output.text or output.finish_reason):
            return []
        choice = p.CompletionChoice(index=output.index, text=output.text, finish_reason=output.finish_reason)
        return [self.chunk([choice])]

    def final(self, totals: p.Usage) -> p.Completion:
        return self.chunk([], totals)


# --- routes ---------------------------------------------------------------------------------------------------


def serving_of(request: Request) -> Serving:
    return request.app.state.serving


# Only documents the scheme in the OpenAPI schema: BearerAuth checks the key before the body is read.
bearer = HTTPBearer(auto_error=False, description="Needed when the server was started with --api-key.")


api = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=ERROR_RESPONSES)


@api.get("/models", response_model=p.ModelList)
async def list_models(request: Request) -> p.ModelList:
    return p.ModelList(data=[p.ModelCard(id=serving_of(request).model_name)])


@api.get("/models/{model_id:path}", response_model=p.ModelCard)
async def get_model(model_id: str, request: Request) -> p.ModelCard:
    name = serving_of(request).model_name
    if model_id != name:
        raise APIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
    return p.ModelCard(id=name)


@api.post("/chat/completions", response_model=p.ChatCompletion, responses=STREAM_RESPONSE)
async def chat_completions(body: p.ChatCompletionRequest, request: Request):
    serving = serving_of(request)
    check_request(body, serving)
    prompt = await run_in_threadpool(chat_prompt, serving, body)  # off the event loop
    sampling = sampling_for(serving, body, len(prompt), serving.chat_format.stop_ids)
    ticket = submit(serving, prompt, sampling, body.n)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = ChatChunks(body.model, body.n)
        stream = event_stream(request, ticket, chunks, include_usage, len(prompt))
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    texts, reasons, completion_tokens = await collect(request, ticket, body.n)
    choices = [
        p.ChatChoice(index=i, message=p.AssistantMessage(content=text), finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return p.ChatCompletion(model=body.model, choices=choices, usage=usage(len(prompt), completion_tokens))


@api.post("/completions", response_model=p.Completion, responses=STREAM_RESPONSE)
async def completions(body: p.CompletionRequest, request: Request):
    serving = serving_of(request)
    check_request(body, serving)
    prompt = await run_in_threadpool(completion_prompt, serving, body)  # off the event loop
    sampling = sampling_for(serving, body, len(prompt))
    ticket = submit(serving, prompt, sampling, body.n)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = event_stream(request, ticket, CompletionChunks(body.model), include_usage, len(prompt))
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    texts, reasons, completion_tokens = await collect(request, ticket, body.n)
    choices = [
        p.CompletionChoice(index=i, text=text, finish_reason=reason)
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
    ]
    return p.Completion(model=body.model, choices=choices, usage=usage(len(prompt), completion_tokens))


async def health(request: Request) -> p.Health:
    engine = serving_of(request).engine
    return p.Health(running=engine.running, waiting=engine.queued)


async def chat_page() -> HTMLResponse:
    page = resources.files("baichuan.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


# --- errors ---------------------------------------------------------------------------------------------------


async def api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI answers 422 with its own shape; OpenAI answers 400 with one message naming the parameter."""
    problems = error.errors() or [{"loc": (), "msg": "invalid request", "type": ""}]
    if problems[0].get("type") == "json_invalid":
        return APIError(
            400, "We could not parse the JSON body of your request.", code="invalid_json"
        ).response()
    locs = [[str(part) for part in problem.get("loc", ()) if part != "body"] for problem in problems]
    # A union field fails once per member, at `field.<member type>`: name the field they share, and tell the
    # problem of the member the value was meant for, not "Input should be a valid string" from the others.
    param = ".".join(os.path.commonprefix(locs) or locs[0]) or None
    told = next((i for i, problem in enumerate(problems) if not problem.get("type", "").endswith("_type")), 0)
    where = ".".join(locs[told])
    # "Value error, " is pydantic's prefix for a validator's ValueError.
    what = problems[told]["msg"].removeprefix("Value error, ")
    message = f"{where}: {what}" if where else what
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return APIError(400, message, param=param).response()


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found" if error.status_code == 404 else None
    return APIError(error.status_code, str(error.detail), code=kind).response()


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return APIError(
        500, "The server had an error while processing your request.", type="server_error"
    ).response()


# --- the doors: pure ASGI, so they answer before FastAPI reads (or parses) the body ---------------------------


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def host_name(value: str) -> str:
    """A Host header or --allowed-hosts entry as the lowercased name without its port: `[::1]:8000` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    name = host_name(host)
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """400 unless the Host header names this server. DNS rebinding points a page's own domain at 127.0.0.1, so the
    page can reach a local server as same-origin; the browser still sends the page's domain as Host."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.allowed = frozenset(host_name(name) for name in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            value = (header(scope, b"host") or b"").decode("latin-1")
            if host_name(value) not in self.allowed:
                names = ", ".join(sorted(self.allowed))
                message = (
                    f"The Host header {value!r} does not name this server (it answers to {names}; "
                    "start it with --allowed-hosts to add a name)"
                )
                await APIError(400, message, code="invalid_host").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """401 without `Authorization: Bearer KEY`, before the body is read, on every path but the public ones."""

    def __init__(self, app: ASGIApp, api_key: str, public: Sequence[str]):
        self.app, self.key, self.public = app, api_key.encode(), frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            scheme, _, given = (header(scope, b"authorization") or b"").partition(b" ")
            # Constant time, so the key cannot be guessed from response timings.
            if not (hmac.compare_digest(given.strip(), self.key) and scheme.lower() == b"bearer"):
                message = "Incorrect or missing API key (send Authorization: Bearer KEY)"
                await APIError(401, message, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_bytes`: at once when Content-Length says so, without reading it; for a chunked
    body, as soon as the bytes received pass the limit. The app then receives a disconnect and whatever it
    answers to that is dropped, so nothing more is read or buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self) -> JSONResponse:
        message = f"The request body is larger than this server accepts ({self.max_bytes:,} bytes)"
        return APIError(413, message, code="request_too_large").response()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and not length.isdigit():
            await APIError(400, "Invalid Content-Length header").response()(scope, receive, send)
            return
        if length is not None and int(length) > self.max_bytes:
            await self.too_large()(scope, receive, send)
            return
        received, started, refused = 0, False, False

        async def counted_receive() -> ASGIMessage:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self.too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: ASGIMessage) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # after a 413 the client has its answer; the app's error at the cut is not news
                raise


def check_api_key(api_key: str | None) -> None:
    """An empty key is a mistake (an unset variable, say), not a wish for an open server: refuse it."""
    if api_key is not None and not api_key.strip():
        raise ValueError(
            "the API key is empty (--api-key or BAICHUAN_API_KEY): give a key, or leave both unset to serve "
            "without one"
        )


def allowed_hosts_for(bind_host: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host names `run` answers to (None: any). Bound to one address: the loopback names, that address and
    `extra`. Bound to every interface (0.0.0.0, ::): any name unless `extra` lists some, since the server cannot
    know the names it is reached by (such a server needs an API key; `run` warns without one). "*": any."""
    every_interface = host_name(bind_host) in ("0.0.0.0", "::", "")
    if "*" in extra or (every_interface and not extra):
        return None
    bound = [] if every_interface else [host_name(bind_host)]
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *bound, *(host_name(name) for name in extra)]))


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if api_key is not None or is_loopback(host):
        return None
    return (
        f"WARNING: serving on {host} without an API key: anyone who can reach this port can use the model. "
        "Set --api-key (or BAICHUAN_API_KEY), or bind 127.0.0.1."
    )


# --- the app --------------------------------------------------------------------------------------------------


def create_app(
    loaded: Loaded,
    *,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    prefill_chunk: int = 512,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The server app over a loaded checkpoint; the engine thread runs while the app's lifespan does.
    `allowed_hosts`: the Host names answered (see HostCheck); None answers any, for in-process use (`run` passes
    `allowed_hosts_for` its address)."""
    check_api_key(api_key)
    if max_request_bytes < 1:
        raise ValueError("max_request_bytes must be at least 1")
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        max_seq_len=max_seq_len,
        prefill_chunk=prefill_chunk,
        kv_dtype=loaded.kv_dtype,
    )
    serving = Serving(
        engine=engine,
        tokenizer=loaded.tokenizer,
        chat_format=loaded.chat_format,
        defaults=loaded.sampling,
        model_name=model_name,
        add_bos=loaded.add_bos,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="baichuan-toolkit",
        description="An OpenAI-compatible API for a Baichuan checkpoint, with continuous batching.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.serving = serving
    app.include_router(api)
    app.add_api_route("/health", health, methods=["GET"], response_model=p.Health)
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    # The last one added runs first: the Host check, then the key, then the body size.
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if api_key is not None:
        docs = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
        app.add_middleware(BearerAuth, api_key=api_key, public=["/", "/health", *filter(None, docs)])
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    return app


def run(
    model_dir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_seq_len: int | None = None,
    quantize: int | None = None,
    kv_dtype: str | None = None,
    model_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    open_browser: bool = False,
    log_level: str = "info",
    max_request_bytes: int = MAX_REQUEST_BYTES,
    allowed_hosts: Sequence[str] = (),
    lora: str | os.PathLike | None = None,
) -> None:
    """Load the checkpoint and serve it until interrupted. `threads`: torch's intra-op threads (its default is
    one per core; fewer can be faster on a machine shared with other work). `open_browser`: open the chat page
    once the server listens (`baichuan web`). `allowed_hosts`: Host names to answer besides the defaults of
    `allowed_hosts_for` ("*": any). Progress goes to stderr line by line, a terminal or not."""
    import torch
    import uvicorn

    from baichuan.runtime import load_for_inference

    check_api_key(api_key)  # before minutes of loading
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"loading {model_dir} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    # Quantized while loading, shard by shard; kv_dtype: see runtime.pick_kv_dtype.
    loaded = load_for_inference(model_dir, device, dtype, quantize, kv_dtype)
    if lora is not None:  # `lora`: a LoRA adapter directory, merged into the float layers (baichuan.lora)
        from baichuan.lora import apply_adapter

        apply_adapter(loaded.model, lora)
    print(f"loaded in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    name = model_name or Path(model_dir).resolve().name
    hosts = allowed_hosts_for(host, allowed_hosts)
    app = create_app(
        loaded,
        model_name=name,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_seq_len=max_seq_len,
        max_request_bytes=max_request_bytes,
        allowed_hosts=hosts,
    )
    engine = app.state.serving.engine
    config = loaded.model.config
    cache_bytes = 2 * config.n_layers * config.dim * engine.max_seq_len * (max_batch + 1)
    cache_bytes *= engine.kv_dtype.itemsize
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(
        f"serving {name} ({loaded.note}) at {url}: {max_batch} rows x {engine.max_seq_len} positions "
        f"({cache_bytes / 2**30:.2f} GiB of KV cache), {max_queue} may wait; "
        f"bodies up to {max_request_bytes:,} bytes; Host {', '.join(hosts) if hosts else 'any'}"
        + ("" if api_key else "; no API key"),
        file=sys.stderr,
        flush=True,
    )
    warning = exposure_warning(host, api_key)
    if warning:  # last, where it is seen
        print(warning, file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    if open_browser:
        threading.Thread(target=_open_when_started, args=(server, url), daemon=True).start()
    server.run()


def _open_when_started(server, url: str, timeout: float = 600.0) -> None:
    import webbrowser

    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    if server.started:
        webbrowser.open(url)
