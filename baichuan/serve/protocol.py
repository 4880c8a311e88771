"""The OpenAI API as pydantic models: what `/v1/chat/completions`, `/v1/completions` and `/v1/models` accept and
answer (https://platform.openai.com/docs/api-reference). Only the schema lives here; app.py routes and translates.

Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change the answer in a way we
cannot honour (logprobs, tools, penalties other than repetition_penalty) are rejected in app.py with a 400 rather
than silently dropped. `top_k` and `repetition_penalty` are the usual extensions (vLLM's), sent with the openai
client's `extra_body`.

JSON can escape a lone surrogate ("\\ud800"): a valid Python string, but not Unicode that UTF-8 (or the tokenizer)
can encode. Every request string passes `Unicode`, so such text is a 400 naming its field, not a 500 later.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_RANGE = {"ge": -(2**63), "le": 2**64 - 1}  # what torch.Generator.manual_seed accepts


def valid_unicode(value: Any) -> Any:
    """`value` unchanged if every string in it (list items and dict keys included) is valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"contains a lone surrogate (\\u{ord(value[error.start]):04x} at character {error.start}), "
                "which is not valid Unicode"
            ) from None
    elif isinstance(value, list):
        for item in value:
            valid_unicode(item)
    elif isinstance(value, dict):
        for key in value:
            valid_unicode(key)
    return value


# Applied to a field's whole type, after the union resolves, so the error names the field and not a union member.
Unicode = AfterValidator(valid_unicode)

FinishReason = Literal["stop", "length"]
MaxTokens = Annotated[int, Field(ge=1, le=2**31 - 1)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None


class RequestModel(BaseModel):
    """A request body: unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "baichuan-toolkit"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(RequestModel):
    include_usage: bool = False


class TextPart(RequestModel):
    type: Literal["text"]
    text: Annotated[str, Unicode]


class ChatMessage(RequestModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    # A string, or a list of text parts; assistant messages may carry null content (tool calls elsewhere).
    content: Annotated[str | list[TextPart] | None, Unicode] = None
    name: Annotated[str | None, Unicode] = None


class SamplingFields(RequestModel):
    """The sampling fields both endpoints share; None means the checkpoint's generation_config.json value."""

    model: Annotated[str, Unicode]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None
    stop: Annotated[Stop, Unicode] = None
    seed: Annotated[int, Field(**SEED_RANGE)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values (see the module docstring).
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logprobs: Any = None
    logit_bias: Annotated[dict[str, float] | None, Unicode] = None
    user: Annotated[str | None, Unicode] = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # the newer name of max_tokens
    top_logprobs: Any = None
    tools: Any = None
    response_format: Any = None


class CompletionRequest(SamplingFields):
    # Text, token ids, or a batch of one of either.
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], Unicode]
    echo: bool = False
    suffix: Annotated[str | None, Unicode] = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    running: int
    waiting: int
