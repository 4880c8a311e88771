"""The generation engine the front ends share: sampling, prefill + decode over a preallocated KV cache, text
streaming, and chat sessions that re-use the cache of the previous turn.

Sampling follows transformers (RepetitionPenaltyLogitsProcessor, then Temperature, TopK and TopP warpers), so a
checkpoint's generation_config.json means here what it means in `model.generate`. Generators that produce
tokens or text *return* why they stopped ("stop", "length" or "cancelled"; `StopIteration.value`, or the value
of `yield from`).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from baichuan.chat_format import ChatFormat, Message, chat_format_for, context_length
from baichuan.kv_cache import KVCache
from baichuan.memory import keep_freed_memory
from baichuan.tokenizer import StreamDecoder

FinishReason = Literal["stop", "length", "cancelled"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


# SamplingConfig field -> (check, what the value must be)
_FIELD_TYPES = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (_is_number, "a number"),
    "top_k": (_is_int, "an integer"),
    "top_p": (_is_number, "a number"),
    "repetition_penalty": (_is_number, "a number"),
    "max_new_tokens": (_is_int, "an integer"),
    "seed": (lambda v: v is None or _is_int(v), "an integer"),
    "eos_ids": (lambda v: all(map(_is_int, v)), "integer token ids"),
    "stop_ids": (lambda v: all(map(_is_int, v)), "integer token ids"),
    "stop_strings": (lambda v: all(isinstance(x, str) for x in v), "strings"),
    "vocab_size": (lambda v: v is None or _is_int(v), "an integer"),
}


@dataclass(frozen=True)
class SamplingConfig:
    """What to generate and when to stop. Defaults are transformers' GenerationConfig defaults."""

    do_sample: bool = False  # False (or temperature 0): greedy
    temperature: float = 1.0
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applies to greedy decoding too, as in transformers
    max_new_tokens: int = 512
    seed: int | None = None  # None: torch's global RNG
    eos_ids: tuple[int, ...] = (2,)
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    # Sample only ids below this: the tokenizer's size, where a model's vocabulary is padded beyond it.
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("eos_ids", "stop_ids", "stop_strings"):
            value = getattr(self, name)
            if not isinstance(value, (int, str, list, tuple)):
                raise ValueError(f"{name} must be a value or a list of them, got {value!r}")
            object.__setattr__(self, name, (value,) if isinstance(value, (int, str)) else tuple(value))
        # A hand-edited generation_config.json can hold anything JSON can: name the wrong value here rather
        # than fail with a TypeError in the middle of sampling.
        for name, (ok, kind) in _FIELD_TYPES.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {kind}, got {getattr(self, name)!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def terminators(self) -> frozenset[int]:
        return frozenset(self.eos_ids + self.stop_ids)

    def replace(self, **overrides: Any) -> SamplingConfig:
        """Per-call overrides; None means "keep" (so optional request fields can be passed straight through)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_generation_config(
        cls, generation_config: Mapping[str, Any] | Any, **overrides: Any
    ) -> SamplingConfig:
        """From a generation_config.json dict or a transformers GenerationConfig; absent or None keys keep the
        defaults. Baichuan2-Chat's gives do_sample, temperature 0.3, top_k 5, top_p 0.85, penalty 1.05, 2048."""
        get = (
            generation_config.get
            if isinstance(generation_config, Mapping)
            else (lambda key: getattr(generation_config, key, None))
        )
        values = {f.name: get(f.name) for f in fields(cls) if f.name not in ("eos_ids", "stop_ids")}
        eos = get("eos_token_id")
        if eos is not None and not all(map(_is_int, eos if isinstance(eos, list) else [eos])):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
        values["eos_ids"] = [eos] if isinstance(eos, int) else eos
        return cls().replace(**values).replace(**overrides)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **overrides: Any) -> SamplingConfig:
        """From a directory's generation_config.json (defaults where there is none); a bad file is a
        ValueError that names it."""
        path = Path(directory) / "generation_config.json"
        generation_config = read_generation_config(path) if path.is_file() else {}
        try:
            return cls.from_generation_config(generation_config, **overrides)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def read_generation_config(path: Path) -> dict[str, Any]:
    """A generation_config.json as a dict, or a ValueError naming the file and what is wrong."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(value).__name__}")
    for key in ("user_token_id", "assistant_token_id", "pad_token_id", "bos_token_id"):
        if value.get(key) is not None and not _is_int(value[key]):
            raise ValueError(f"{path}: {key} must be an integer token id, got {value[key]!r}")
    return value


def fit_to_context(sampling: SamplingConfig, prompt_len: int, context: int) -> SamplingConfig:
    """`sampling` with max_new_tokens cut to the positions the context has left after the prompt, with a
    warning when it had to be cut (a ValueError when nothing is left). Generating past the context would
    only give what the model was never trained on, and a huge request would end in the allocator."""
    room = context - prompt_len
    if sampling.max_new_tokens <= room:
        return sampling
    if room <= 0:
        raise ValueError(
            f"the prompt ({prompt_len} tokens) fills the model's context of {context} tokens: "
            "no room to generate"
        )
    warnings.warn(
        f"max_new_tokens {sampling.max_new_tokens} cut to {room}: the prompt's {prompt_len} tokens leave "
        f"{room} of the {context}-token context",
        stacklevel=3,
    )
    return sampling.replace(max_new_tokens=room)


# --- sampling math --------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: for tokens already in the sequence (seen, (B, V) bool),
    divide positive logits by the penalty and multiply negative ones."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k logits (and any tied with the k-th), as transformers' TopKLogitsWarper."""
    top_k = min(max(top_k, 1), logits.shape[-1])
    kth = torch.topk(logits, top_k)[0][..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def kept_candidates(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, ids) of the finite scores of each row, largest first (-inf where a row has fewer than the most),
    where they are at most an eighth of the vocabulary, as after top_k; None where they are more."""
    kept = int((scores > float("-inf")).sum(-1).max())
    if 8 * kept > scores.shape[-1]:
        return None
    return torch.topk(scores, max(kept, 1), dim=-1, sorted=True)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
    always keeping the most likely token.

    After top_k (the Baichuan chat default keeps 5) nearly every logit is -inf already, with no mass: then only
    the finite ones are sorted. With the draw among them too (`sample_next`), a chat step's sampling went from
    6.9-8.2 to 2.6-2.7 ms on a 2-core Emerald Rapids, run alone: it had been a fifth of an int4 decode step of
    the 1.29B benchmark model."""
    candidates = kept_candidates(logits)
    if candidates is not None:
        # Ascending: the tail of the full ascending sort (the -inf padding weighs nothing, as its head does).
        sorted_logits, sorted_indices = candidates[0].flip(-1), candidates[1].flip(-1)
    else:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = logits.new_zeros(logits.shape, dtype=torch.bool).scatter_(-1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def greedy_ids(scores: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B,) the index of each row's largest score, the first one on ties, NaN winning (as argmax). On the
    CPU `max(dim).indices` finds it ~4x as fast as `argmax`: 0.4 against 1.9 ms for 8 rows of a 125,696
    vocabulary in bf16 (Xeon, 2 threads), where a batch-8 int8 step of the 1.29B model takes ~70 ms."""
    return scores.max(dim=-1).indices


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
    """(B, V) float logits -> the scores sampling draws from, in transformers' processor order."""
    if sampling.vocab_size is not None and logits.shape[-1] > sampling.vocab_size:
        logits = logits.clone()
        logits[..., sampling.vocab_size :] = float("-inf")
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    if sampling.top_k:
        logits = apply_top_k(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = apply_top_p(logits, sampling.top_p)
    return logits


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    if (
        sampling.greedy
        and (seen is None or sampling.repetition_penalty == 1.0)
        and (sampling.vocab_size is None or logits.shape[-1] <= sampling.vocab_size)
    ):
        return greedy_ids(logits)  # widening to fp32 is exact and changes no comparison: skip the copy
    scores = process_logits(logits.float(), seen, sampling)
    if sampling.greedy:
        return greedy_ids(scores)
    candidates = kept_candidates(scores)
    if candidates is not None:
        # Drawn among the kept alone (the same distribution): torch.multinomial over a 125,696 vocabulary took
        # ~3 ms a step on a 2-core CPU, most of a chat step's sampling.
        top_scores, top_ids = candidates
        choice = torch.multinomial(top_scores.softmax(dim=-1), 1, generator=generator)
        return top_ids.gather(-1, choice).squeeze(-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- the decode loop ------------------------------------------------------------------------------------------


def _decode_steps(
    model: nn.Module,
    prompt: torch.Tensor,
    mask: torch.Tensor | None,
    sampling: SamplingConfig,
    cache: KVCache,
    start: int = 0,
    fed: list[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Prefill prompt[:, start:] (the cache already holds positions 0..start-1), then yield the (B,) sampled
    tokens of each step, feeding each back in. `mask` (B, L + max_new_tokens) marks left padding with 0.
    `fed` (one row only) tracks the ids whose keys/values the cache holds, even when the loop is abandoned."""
    B, L = prompt.shape
    device = prompt.device
    if device.type == "cpu":
        keep_freed_memory()
    generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
    seen = None
    if sampling.repetition_penalty != 1.0:
        # Padding must not be penalised, or a batched row would differ from the same prompt alone.
        real = torch.ones_like(prompt) if mask is None else mask[:, :L].long()
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.long, device=device)
        seen = seen.scatter_add_(1, prompt, real).bool()
    if fed is not None:
        del fed[start:]
    logits = model(prompt[:, start:], start, cache, None if mask is None else mask[:, :L], last_only=True)
    if fed is not None:
        fed.extend(prompt[0, start:].tolist())
    rows = torch.arange(B, device=device)
    for step in range(sampling.max_new_tokens):
        token = sample_next(logits[:, -1], seen, sampling, generator)  # (B,)
        yield token
        if step == sampling.max_new_tokens - 1:
            return
        if seen is not None:
            seen[rows, token] = True
        pos = L + step
        logits = model(
            token[:, None], pos, cache, None if mask is None else mask[:, : pos + 1], last_only=True
        )
        if fed is not None:
            fed.append(int(token[0]))


class _StopStrings:
    """Notices a stop string in the generated text by decoding only a window of the newest tokens."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]):
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer to read the generated text")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        # A token is at least a quarter of a character (byte fallback), so this window holds any stop string.
        self.window = 4 * max(map(len, self.stop_strings)) + 4

    def hit(self, generated: Sequence[int]) -> bool:
        text = self.tokenizer.decode(list(generated[-self.window :]))
        return any(s in text for s in self.stop_strings)


def _row(
    steps: Iterator[torch.Tensor],
    sampling: SamplingConfig,
    cancel: threading.Event | None,
    stop_strings: _StopStrings | None,
) -> Generator[int, None, FinishReason]:
    """One sequence's tokens from the step loop, up to and including the one that ends it."""
    terminators = sampling.terminators
    generated: list[int] = []
    try:
        while True:
            if cancel is not None and cancel.is_set():
                return "cancelled"
            try:
                token = int(next(steps)[0])
            except StopIteration:
                return "length"
            generated.append(token)
            yield token
            if token in terminators or (stop_strings is not None and stop_strings.hit(generated)):
                return "stop"
    finally:
        steps.close()


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = model.model.embed_tokens.weight
    return weight.dtype, weight.device


def _as_prompt(prompt_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: generation needs at least one token")
    return prompt


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    sampling: SamplingConfig | None = None,
    *,
    cancel: threading.Event | None = None,
    tokenizer: Any = None,
    session: ChatSession | None = None,
    kv_dtype: torch.dtype | None = None,
) -> Generator[int, None, FinishReason]:
    """Yield new token ids one step at a time, the terminating EOS/stop id included (as transformers puts it
    in the sequence). Stops on EOS or a stop id, a stop string (needs `tokenizer`), max_new_tokens (cut to
    the context left, with a warning), or when `cancel` is set (checked before every forward). With a
    `session`, re-uses its KV cache. `kv_dtype`: of the KV cache (default: the model's dtype)."""
    sampling = sampling or SamplingConfig()
    if session is not None:
        return (yield from session.generate_tokens(prompt_ids, sampling, cancel=cancel, tokenizer=tokenizer))
    stop_strings = _StopStrings(tokenizer, sampling.stop_strings) if sampling.stop_strings else None
    dtype, device = _model_dtype_device(model)
    prompt = _as_prompt(prompt_ids, device)
    sampling = fit_to_context(sampling, prompt.shape[1], context_length(model.config))
    length = prompt.shape[1] + sampling.max_new_tokens
    cache = KVCache.for_model(model.config, 1, length, kv_dtype or dtype, device)
    return (
        yield from _row(_decode_steps(model, prompt, None, sampling, cache), sampling, cancel, stop_strings)
    )


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    *,
    cancel: threading.Event | None = None,
    tokenizer: Any = None,
    pad_id: int | None = None,
    kv_dtype: torch.dtype | None = None,
) -> list[list[int]]:
    """Batched generation: prompts of different lengths are LEFT padded and masked, so each row is what the
    prompt would give alone (exactly so for greedy decoding). Returns each row's new tokens, ending with its
    terminator when it stopped on one. max_new_tokens is cut to the context the longest prompt leaves."""
    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    dtype, device = _model_dtype_device(model)
    sampling = fit_to_context(sampling, max(map(len, prompts)), context_length(model.config))
    B, L, N = len(prompts), max(map(len, prompts)), sampling.max_new_tokens
    pad_id = model.config.pad_token_id if pad_id is None else pad_id
    prompt = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.ones(B, L + N, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        prompt[i, L - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[i, : L - len(ids)] = 0
    if bool(mask.all()):
        mask = None  # no padding: keep the plain causal path
    cache = KVCache.for_model(model.config, B, L + N, kv_dtype or dtype, device)
    watches = (
        [_StopStrings(tokenizer, sampling.stop_strings) for _ in prompts] if sampling.stop_strings else None
    )

    out = torch.empty(B, N, dtype=torch.long, device=device)  # preallocated; rows are cut at their end below
    lengths = [N] * B
    terminators = torch.tensor(sorted(sampling.terminators), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = _decode_steps(model, prompt, mask, sampling, cache)
    try:
        for step in range(N):
            if cancel is not None and cancel.is_set():
                lengths = [min(n, step) for n in lengths]
                break
            token = next(steps)
            out[:, step] = token
            ended = torch.isin(token, terminators) & ~done
            if watches is not None:
                for i in range(B):
                    if not done[i] and watches[i].hit(out[i, : step + 1].tolist()):
                        ended[i] = True
            for i in ended.nonzero().flatten().tolist():
                lengths[i] = step + 1
            done |= ended
            if bool(done.all()):
                break
    finally:
        steps.close()
    return [out[i, : lengths[i]].tolist() for i in range(B)]


# --- text ----------------------------------------------------------------------------------------------------


class TextStream:
    """Generated ids -> text deltas: no split multi-byte characters (the tokenizer's StreamDecoder), no
    terminator text, and nothing from a stop string on, withheld while one may still be forming."""

    def __init__(self, tokenizer: Any, sampling: SamplingConfig):
        self.decoder = StreamDecoder(tokenizer)
        self.terminators = sampling.terminators
        self.stops = sampling.stop_strings
        self.text = ""
        self.shown = 0

    def push(self, token: int) -> tuple[str, bool]:
        """The text `token` makes showable, and whether it completed a stop string (or is a terminator)."""
        if token in self.terminators:
            return self.flush(), True
        self.text += self.decoder.push(token)
        cut = self._stop_at()
        if cut >= 0:
            return self._show(cut), True
        return self._show(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        """Whatever is still held back, when generation ends without a stop string."""
        self.text += self.decoder.flush()
        cut = self._stop_at()
        return self._show(len(self.text) if cut < 0 else cut)

    def _show(self, end: int) -> str:
        if end <= self.shown:
            return ""
        delta, self.shown = self.text[self.shown : end], end
        return delta

    def _stop_at(self) -> int:
        # A stop string cannot start before `shown`: its beginning would have been held back.
        found = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        return min(found, default=-1)

    def _held_back(self) -> int:
        """How many trailing characters might be the start of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def stream_text(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[int] | torch.Tensor,
    sampling: SamplingConfig | None = None,
    *,
    cancel: threading.Event | None = None,
    session: ChatSession | None = None,
    kv_dtype: torch.dtype | None = None,
) -> Generator[str, None, FinishReason]:
    """Yield text deltas of the generated tokens (see `TextStream`); returns why generation ended."""
    sampling = sampling or SamplingConfig()
    tokens = generate_tokens(
        model, prompt_ids, sampling, cancel=cancel, tokenizer=tokenizer, session=session, kv_dtype=kv_dtype
    )
    text = TextStream(tokenizer, sampling)
    reason: FinishReason = "length"
    try:
        while True:
            try:
                token = next(tokens)
            except StopIteration as finished:
                reason = finished.value
                break
            delta, stopped = text.push(token)
            if delta:
                yield delta
            if stopped and token not in sampling.terminators:
                return "stop"  # a stop string; after a terminator the generator ends and says why
    finally:
        tokens.close()
    tail = text.flush()
    if tail:
        yield tail
    return reason


# --- chat ----------------------------------------------------------------------------------------------------


class ChatSession:
    """A conversation that keeps its KV cache between turns. It remembers which ids the cache holds; a new
    prompt that starts with them (the previous prompt + answer, then the next question) prefills only the new
    suffix. Anything else (an edited or truncated history) is re-used up to the first differing token."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        chat_format: ChatFormat | None = None,
        sampling: SamplingConfig | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format or chat_format_for(model.config)
        self.sampling = sampling or SamplingConfig()
        self.kv_dtype = kv_dtype  # None: the model's dtype
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # the ids whose keys/values the cache holds, in order
        self.last_prefill = 0  # how many prompt tokens the last call had to run through the model

    def reset(self) -> None:
        self.cache, self.cached_ids, self.last_prefill = None, [], 0

    @torch.inference_mode()
    def generate_tokens(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        sampling: SamplingConfig | None = None,
        *,
        cancel: threading.Event | None = None,
        tokenizer: Any = None,
    ) -> Generator[int, None, FinishReason]:
        sampling = sampling or self.sampling
        tokenizer = tokenizer or self.tokenizer
        stop_strings = _StopStrings(tokenizer, sampling.stop_strings) if sampling.stop_strings else None
        dtype, device = _model_dtype_device(self.model)
        prompt = _as_prompt(prompt_ids, device)
        sampling = fit_to_context(sampling, prompt.shape[1], context_length(self.model.config))
        ids = prompt[0].tolist()
        start = _common_prefix(ids, self.cached_ids)
        start = min(start, len(ids) - 1)  # the last prompt token must run again: its logits pick the answer
        self._reserve(len(ids) + sampling.max_new_tokens, start, self.kv_dtype or dtype, device)
        self.last_prefill = len(ids) - start
        steps = _decode_steps(self.model, prompt, None, sampling, self.cache, start, fed=self.cached_ids)
        return (yield from _row(steps, sampling, cancel, stop_strings))

    def chat(
        self,
        messages: Sequence[Message],
        sampling: SamplingConfig | None = None,
        stream: bool = False,
        *,
        cancel: threading.Event | None = None,
    ) -> str | Iterator[str]:
        return chat(
            self.model,
            self.tokenizer,
            messages,
            sampling or self.sampling,
            stream,
            chat_format=self.chat_format,
            cancel=cancel,
            session=self,
        )

    def _reserve(self, length: int, keep: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make the cache hold `length` positions, keeping the first `keep` (grown, never shrunk)."""
        if self.cache is not None and self.cache.max_seq_len >= length:
            return
        size = max(length, context_length(self.model.config))
        grown = KVCache.for_model(self.model.config, 1, size, dtype, device)
        if self.cache is not None and keep:
            grown.k[:, :, :, :keep] = self.cache.k[:, :, :, :keep]
            grown.v[:, :, :, :keep] = self.cache.v[:, :, :, :keep]
        del self.cached_ids[keep:]
        self.cache = grown


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def chat(
    model: nn.Module,
    tokenizer: Any,
    messages: Sequence[Message],
    sampling: SamplingConfig | None = None,
    stream: bool = False,
    *,
    chat_format: ChatFormat | None = None,
    cancel: threading.Event | None = None,
    session: ChatSession | None = None,
    kv_dtype: torch.dtype | None = None,
) -> str | Iterator[str]:
    """The answer to `messages` as text, or an iterator of text deltas with stream=True. The prompt budget
    leaves room for sampling.max_new_tokens, as the originals' `model.chat` does; EOS ends the answer."""
    prompt, sampling = chat_prompt(model.config, tokenizer, messages, sampling, chat_format)
    pieces = stream_text(
        model, tokenizer, prompt, sampling, cancel=cancel, session=session, kv_dtype=kv_dtype
    )
    return pieces if stream else "".join(pieces)


def chat_prompt(
    config: Any,
    tokenizer: Any,
    messages: Sequence[Message],
    sampling: SamplingConfig | None = None,
    chat_format: ChatFormat | None = None,
) -> tuple[list[int], SamplingConfig]:
    """What `chat` feeds the model: the prompt ids of `messages` within the context of `config`, and the
    sampling that also stops on the format's end-of-answer ids. Needs no weights, so a front end can check
    the prompt before loading them."""
    sampling = sampling or SamplingConfig()
    chat_format = chat_format or chat_format_for(config)
    sampling = sampling.replace(eos_ids=tuple(dict.fromkeys(sampling.eos_ids + chat_format.stop_ids)))
    prompt = chat_format.build(tokenizer, messages, context_length(config), sampling.max_new_tokens)
    return prompt, sampling
