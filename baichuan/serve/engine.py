"""Continuous batching: one background thread owns the model and runs every request's decode step together.

The running batch is the first `len(rows)` rows of one preallocated KVCache; each row sits at its own position,
so one decode step feeds every active row its last token with `start_pos` = the (B,) tensor of row positions.
Requests join and leave between steps:

* join: a waiting request is prefilled alone (batch 1, at most `prefill_chunk` prompt tokens per round, so a
  long prompt never stalls the running rows for long) into a scratch cache, and its keys/values are copied into
  the next free row. Its first token is sampled with the round's decode step: the trunk runs per request, but
  the output head (most of a small model's weights) runs once per round for decode and prefill rows together.
* leave: a row that finished (terminator, stop string, max_tokens) or was cancelled is replaced by the last row,
  so the batch stays a prefix of the cache and no step computes on holes.

The waiting queue is bounded: `submit` raises QueueFull instead of letting it grow, and the server answers 429.
Tokens become text in this thread (StreamDecoder), and each step's text is handed to the asyncio side with one
`call_soon_threadsafe` per event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from baichuan.generate import (
    SamplingConfig,
    TextStream,
    apply_repetition_penalty,
    greedy_ids,
    process_logits,
    sample_next,
)
from baichuan.kv_cache import KVCache
from baichuan.memory import return_free_memory
from baichuan.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Prompt tokens a scheduling round prefills at most, so a long prompt never stalls the running rows for long.
PREFILL_CHUNK = 512
# Seconds without work after which the engine hands freed memory back to the system (once per idle spell).
IDLE_RELEASE_S = 1.0
# A prefill chunk is padded to a multiple of this many tokens. torch's oneDNN path (bf16 products on CPU) keeps
# state for every product shape it meets: oneDNN's primitive cache (compiled kernels, evicted only past 1,024 of
# them by default) and more besides. Each prompt length not seen before was a new shape, so a server's memory
# crept up for as long as new lengths came (~2 MB each on the soak's 2-layer model, some MB a soak round);
# padded, a chunk of up to 512 tokens has at most 16 shapes. The padding follows the real tokens, which the
# causal mask keeps from seeing it; its keys/values are overwritten by the next chunk or never copied to a row.
PREFILL_BUCKET = 32


class QueueFull(RuntimeError):
    """The waiting queue holds as many requests as it may; try again later."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request finished."""


class GenerationFailed(RuntimeError):
    """The model or the sampler failed on this request (a bug or an exhausted resource, not bad input)."""


@dataclass
class Output:
    """What a request's consumer receives: new text of one choice, and on its last output why it ended."""

    index: int
    text: str
    tokens: int  # completion tokens generated so far, the terminator included
    finish_reason: str | None = None  # "stop" or "length" on the choice's last output
    error: Exception | None = None  # raised by Ticket.outputs()


@dataclass(eq=False)
class Choice:
    """One choice (of a request's n) being generated: its prompt, sampling and text."""

    prompt: list[int]
    sampling: SamplingConfig
    text: TextStream
    index: int
    ticket: Ticket
    generator: torch.Generator | None = None
    prefilled: int = 0  # prompt tokens already in the scratch cache
    generated: int = 0

    @property
    def sample_key(self) -> tuple:
        """Rows with equal keys are sampled in one call (seeded rows each draw from their own generator)."""
        s = self.sampling
        return (s.do_sample, s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.vocab_size)


@dataclass(eq=False)
class Ticket:
    """A submitted request (one or more choices): iterate its outputs with `outputs()`, `cancel()` to stop it."""

    n: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating (the engine drops the rows before its next step) and end `outputs()`."""
        if not self.cancelled:
            self.cancelled = True
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

    async def outputs(self) -> AsyncIterator[Output]:
        """Every output of every choice, until each choice has given its last or the ticket is cancelled."""
        open_choices = self.n
        try:
            while open_choices:
                output: Output | None = await self.queue.get()
                if output is None:
                    return
                if output.error is not None:
                    raise output.error
                if output.finish_reason is not None:
                    open_choices -= 1
                yield output
        finally:
            if open_choices:
                self.cancel()


@dataclass
class Stats:
    decode_steps: int = 0
    decoded_tokens: int = 0  # row-steps: the tokens all decode steps produced together
    prefill_tokens: int = 0
    max_running: int = 0
    finished: int = 0
    cancelled: int = 0


class Engine:
    """The scheduler thread. `submit` from any thread with a running event loop; `start`/`stop` around use."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        kv_dtype: torch.dtype | None = None,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        config = model.config
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        # Allocated on start, so that building an app (for its schema, say) costs no memory.
        self.cache: KVCache | None = None
        self.scratch: KVCache | None = None
        self.dtype = weight.dtype
        self.kv_dtype = kv_dtype or weight.dtype  # the caches' own dtype (runtime.pick_kv_dtype)
        self.rows: list[Choice] = []  # the running batch: row i of the cache belongs to rows[i]
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next write per row
        self.last_tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.seen: torch.Tensor | None = None  # (max_batch, V) bool, for repetition penalties
        self.prefilling: Choice | None = None
        self.waiting: deque[Choice] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.stats = Stats()
        self.failure: str | None = None
        self.released = True  # free memory handed back since the last step

    # --- the asyncio side ----------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: SamplingConfig, n: int = 1) -> Ticket:
        """Queue `n` choices for `prompt`. Raises QueueFull when the queue is full and ValueError when the
        prompt and max_new_tokens do not fit a cache row. Call from a coroutine (outputs go to its loop)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token")
        if len(prompt) + sampling.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({sampling.max_new_tokens}) exceeds the "
                f"context of {self.max_seq_len} tokens"
            )
        ticket = Ticket(n=n, loop=asyncio.get_running_loop())
        choices = []
        for index in range(n):
            # n choices with one seed would be n copies: choice i draws from seed + i.
            seed = None if sampling.seed is None else (sampling.seed + index) % 2**64
            generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
            text = TextStream(self.tokenizer, sampling)
            choices.append(Choice(prompt, sampling, text, index, ticket, generator))
        with self.lock:
            if self.stopping or self.failure:
                raise EngineStopped(self.failure or "the engine is stopped")
            if len(self.waiting) + n > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue})"
                )
            self.waiting.extend(choices)
        self.wake.set()
        return ticket

    @property
    def running(self) -> int:
        return len(self.rows) + (self.prefilling is not None)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        if self.thread is not None:
            return
        config = self.model.config
        self.failure = None
        self.cache = KVCache.for_model(config, self.max_batch, self.max_seq_len, self.kv_dtype, self.device)
        self.scratch = KVCache.for_model(config, 1, self.max_seq_len, self.kv_dtype, self.device)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="baichuan-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self.cache = self.scratch = None

    # --- the engine thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    if self.stopping:
                        break
                    idle = not self.waiting and self.prefilling is None and not self.rows
                    if idle:
                        self.wake.clear()
                if idle:
                    # After a second without work, once per idle spell: memory freed by finished requests goes
                    # back to the system, so the server's RSS is what is alive, not the high-water mark of load.
                    if self.wake.wait(timeout=None if self.released else IDLE_RELEASE_S):
                        continue
                    gc.collect()
                    return_free_memory()
                    self.released = True
                    continue
                self.released = False
                try:
                    self._step()
                except Exception as error:  # a failed forward must not take the server down with it
                    log.exception("decode step failed; failing the running requests")
                    running = self.rows + ([self.prefilling] if self.prefilling else [])
                    self.rows, self.prefilling = [], None
                    self._fail(
                        running, GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
                    )
        self._fail_all(EngineStopped("the server is shutting down"))

    def _step(self) -> None:
        """One scheduling round: drop cancelled work, run the trunk for every running row (one decode step)
        and for up to `prefill_chunk` prompt tokens of joining requests, then the output head once for all."""
        self._drop_cancelled()
        hidden = []  # the last hidden state of every row, in row order
        n = len(self.rows)
        if n:
            x = self.model.model(self.last_tokens[:n, None], self.positions[:n], self._first_rows(n))
            self.positions[:n] += 1
            self.stats.decode_steps += 1
            self.stats.decoded_tokens += n
            hidden.append(x[:, -1])
        budget = self.prefill_chunk
        while budget > 0 and self._next_prefill():
            seq = self.prefilling
            try:
                x, used = self._prefill(seq, budget)
            except Exception as error:  # this prompt's failure is not the running rows' failure
                log.exception("prefill failed")
                self.prefilling = None
                self._fail([seq], GenerationFailed(f"prefill failed: {type(error).__name__}: {error}"))
                continue
            budget -= used
            if x is not None:
                hidden.append(x[:, -1])
        if not hidden:
            return
        # The head is most of a step's weights; one call for decode and prefill rows reads them once.
        logits = self.model.lm_head(torch.cat(hidden))  # (rows, V)
        rows = list(range(len(self.rows)))
        tokens, failed = self._sample(logits, rows)
        deliveries: list[tuple[Choice, Output]] = []
        self._advance(tokens, failed, deliveries)
        self._deliver(deliveries)

    def _next_prefill(self) -> bool:
        if self.prefilling is not None:
            return True
        if len(self.rows) >= self.max_batch:
            return False
        with self.lock:
            while self.waiting:
                seq = self.waiting.popleft()
                if seq.ticket.cancelled:
                    self.stats.cancelled += 1
                    continue
                self.prefilling = seq
                return True
        return False

    def _prefill(self, seq: Choice, budget: int) -> tuple[torch.Tensor | None, int]:
        """Run up to `budget` more prompt tokens of `seq` through the trunk into the scratch cache. When the
        prompt is done, the keys/values move into the next free row and the last hidden state is returned."""
        start = seq.prefilled
        chunk = seq.prompt[start : start + budget]
        padded = min(-(-len(chunk) // PREFILL_BUCKET) * PREFILL_BUCKET, self.max_seq_len - start)
        idx = torch.tensor([chunk + [0] * (padded - len(chunk))], dtype=torch.long, device=self.device)
        x = self.model.model(idx, start, self.scratch)[:, : len(chunk)]  # (1, T, D)
        seq.prefilled += len(chunk)
        self.stats.prefill_tokens += len(chunk)
        if seq.prefilled < len(seq.prompt):
            return None, len(chunk)
        self.prefilling = None
        row = len(self.rows)
        length = len(seq.prompt)
        self.cache.k[:, row, :, :length] = self.scratch.k[:, 0, :, :length]
        self.cache.v[:, row, :, :length] = self.scratch.v[:, 0, :, :length]
        self.positions[row] = length
        if seq.sampling.repetition_penalty != 1.0:
            seen = self._seen()
            seen[row] = False
            seen[row, torch.tensor(seq.prompt, device=self.device)] = True
        self.rows.append(seq)
        self.stats.max_running = max(self.stats.max_running, len(self.rows))
        return x, len(chunk)

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, set[int]]:
        """logits (len(rows), V) -> (len(rows),) tokens, each row with its own sampling parameters; and the
        rows whose sampling failed (they are failed alone, the others go on)."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            seq = self.rows[row]
            key = (id(seq),) if seq.generator is not None and not seq.sampling.greedy else seq.sample_key
            groups.setdefault(key, []).append(i)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        failed: set[int] = set()
        for members in groups.values():
            group = [rows[i] for i in members]
            try:
                if len(members) == len(rows):
                    tokens = self._sample_group(logits, group)
                else:
                    index = torch.tensor(members, device=self.device)
                    tokens[index] = self._sample_group(logits[index], group)
            except Exception as error:
                log.exception("sampling failed")
                failed.update(group)
                message = f"sampling failed: {type(error).__name__}: {error}"
                self._fail([self.rows[row] for row in group], GenerationFailed(message))
        return tokens, failed

    def _sample_group(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        seq = self.rows[rows[0]]
        seen = None
        if seq.sampling.repetition_penalty != 1.0:
            seen = self._seen()[torch.tensor(rows, device=self.device)]
        if seq.generator is not None and not seq.sampling.greedy:
            # Exactly `generate`'s draw, so a seed gives the answer it gives there.
            return sample_next(logits, seen, seq.sampling, seq.generator)
        return sample_fast(logits, seen, seq.sampling)

    def _advance(self, tokens: torch.Tensor, failed: set[int], deliveries: list) -> None:
        """Record each row's new token, turn it into text, and retire the rows that finished or failed."""
        done = sorted(failed)
        values = tokens.tolist()
        for row, seq in enumerate(self.rows):
            if row in failed:
                continue
            token = values[row]
            seq.generated += 1
            self.last_tokens[row] = token
            if self.seen is not None and seq.sampling.repetition_penalty != 1.0:
                self.seen[row, token] = True
            text, stopped = seq.text.push(token)
            reason = "stop" if stopped else "length" if seq.generated >= seq.sampling.max_new_tokens else None
            if reason == "length":
                text += seq.text.flush()
            if text or reason:
                deliveries.append((seq, Output(seq.index, text, seq.generated, reason)))
            if reason:
                done.append(row)
                self.stats.finished += 1
        self._remove(done)

    def _drop_cancelled(self) -> None:
        with self.lock:  # cancelled requests must not hold queue places either
            waiting = len(self.waiting)
            self.waiting = deque(seq for seq in self.waiting if not seq.ticket.cancelled)
            self.stats.cancelled += waiting - len(self.waiting)
        gone = [row for row, seq in enumerate(self.rows) if seq.ticket.cancelled]
        self._remove(gone)
        self.stats.cancelled += len(gone)
        if self.prefilling is not None and self.prefilling.ticket.cancelled:
            self.prefilling = None
            self.stats.cancelled += 1

    def _remove(self, rows: list[int]) -> None:
        """Take rows out of the batch, moving the last rows into the holes so the batch stays a prefix."""
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:
                end = int(self.positions[last])
                self.cache.k[:, row, :, :end] = self.cache.k[:, last, :, :end]
                self.cache.v[:, row, :, :end] = self.cache.v[:, last, :, :end]
                self.positions[row] = self.positions[last]
                self.last_tokens[row] = self.last_tokens[last]
                if self.seen is not None:
                    self.seen[row] = self.seen[last]
                self.rows[row] = self.rows[last]
            self.rows.pop()

    def _first_rows(self, n: int) -> KVCache:
        """Rows 0..n-1 of the batch cache as a cache of their own; the model's writes land in the shared one."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.cache.k[:, :n], persistent=False)
        view.register_buffer("v", self.cache.v[:, :n], persistent=False)
        return view

    def _seen(self) -> torch.Tensor:
        if self.seen is None:
            vocab = self.model.config.vocab_size
            self.seen = torch.zeros(self.max_batch, vocab, dtype=torch.bool, device=self.device)
        return self.seen

    def _deliver(self, deliveries: list[tuple[Choice, Output]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, output in deliveries:
            by_loop.setdefault(seq.ticket.loop, []).append((seq.ticket.queue, output))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: its consumers are gone
                pass

    def _fail(self, choices: list[Choice], error: Exception) -> None:
        self._deliver([(seq, Output(seq.index, "", seq.generated, error=error)) for seq in choices])

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            self.failure = str(error)
            waiting = list(self.waiting)
            self.waiting.clear()
        running = self.rows + ([self.prefilling] if self.prefilling else [])
        self.rows, self.prefilling = [], None
        self._fail(running + waiting, error)


def sample_fast(logits: torch.Tensor, seen: torch.Tensor | None, sampling: SamplingConfig) -> torch.Tensor:
    """`generate.sample_next` without its full-vocabulary passes: the same distribution for unseeded rows.

    `sample_next` sorts all V logits for top-p, on every row and step; with top-k on (Baichuan2-Chat: 5) the
    nucleus can only hold top-k candidates, so filtering those k first gives the same tokens for a fraction of
    the work (temperature is monotonic, so it commutes with the top-k choice). The repetition penalty touches
    only the seen ids. Greedy rows give exactly `sample_next`'s tokens; sampled rows draw from the same
    distribution, but not the same random numbers (seeded rows therefore go through `sample_next`).
    """
    if sampling.vocab_size is not None and logits.shape[-1] > sampling.vocab_size:
        logits = logits[:, : sampling.vocab_size]
        seen = None if seen is None else seen[:, : sampling.vocab_size]
    logits = logits.float()
    if seen is not None:
        rows, ids = seen.nonzero(as_tuple=True)
        picked = logits[rows, ids]
        logits = logits.clone()
        logits[rows, ids] = apply_repetition_penalty(
            picked, torch.ones_like(picked, dtype=torch.bool), sampling.repetition_penalty
        )
    if sampling.greedy:
        return greedy_ids(logits)
    if not sampling.top_k:
        return sample_next(logits, None, sampling.replace(repetition_penalty=1.0))
    values, ids = torch.topk(logits, min(sampling.top_k, logits.shape[-1]))  # (B, k)
    scores = process_logits(values, None, sampling.replace(repetition_penalty=1.0, top_k=0))
    choice = torch.multinomial(scores.softmax(dim=-1), 1)  # (B, 1)
    return ids.gather(1, choice).squeeze(1)


def _put_all(batch: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)
