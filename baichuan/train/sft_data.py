"""Supervised fine-tuning data: three record formats read into one conversation form, tokenised and masked as
the original Baichuan2 `fine-tune/fine-tune.py` does, and dealt out as batches for the training loop.

Formats (a `.json` file holds an array of records, a `.jsonl` file one record per line):
- conversations, the Baichuan2 fine-tuning format: `{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`;
- alpaca: `{"instruction", "input" (optional), "output", "system" (optional), "history" (optional
  [[question, answer], ...])}`; the user message is the instruction, then a newline and the input when there is
  one (LLaMA-Factory's alpaca converter);
- messages, the OpenAI chat format: `{"messages": [{"role": "system"|"user"|"assistant", "content"}]}`, with one
  optional system message first.

A record that cannot be trained on (invalid JSON, a missing or non-string field, an empty turn, an unknown role,
no reply at the end) is a `BadRecord` naming its file and index:
skipped and counted, or with `strict=True` an `SFTDataError` listing them. None is dropped silently.

Masking (`fine-tune.py`'s `SupervisedDataset.preprocessing`, baichuan-inc/Baichuan2 fine-tune/fine-tune.py):
- a human turn is the user token (195) then its text; its labels are EOS at the user token (the previous reply
  ends there) and -100 over the text;
- a reply is the assistant token (196) then its text; labels -100 at the assistant token, the text's ids after;
- EOS ends the input, with EOS as its label; then truncation to `model_max_length`, padding with the pad id
  (labels -100), and `attention_mask = input_ids != pad id`, exactly as the original computes it.
A system text (alpaca/messages) goes first with no role token and no loss, as Baichuan2's chat format puts it;
the user token after it then gets no EOS label, since no reply ends there.

Batches: the examples are visited in a seeded order that depends on the step alone (as `data.PackedBatches`),
so 1 process or N with the same global batch see the same data, and a resumed run continues exactly. Each
micro-batch is cut to its longest row: the dropped columns are padding after every real token, which causal
attention never lets a real token see and whose labels are -100, so the loss is the original's. With `pack`,
several short examples share a row, and a block-diagonal mask keeps each example's attention within itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # the label of a position without loss (torch's cross-entropy default, the original's)
USER_TOKEN_ID, ASSISTANT_TOKEN_ID = 195, 196
FORMATS = ("conversations", "alpaca", "messages")
HUMAN, GPT = "human", "gpt"  # the original's role names


class SFTDataError(ValueError):
    """A data file that cannot be read, or bad records under strict=True; the message names file and index."""


@dataclass
class Conversation:
    """One training record: turns of (HUMAN | GPT, text), ending with GPT."""

    turns: list[tuple[str, str]]
    system: str = ""
    id: str = ""


@dataclass
class BadRecord:
    file: str
    index: int  # 0-based in a JSON array, 1-based line number in a JSONL file
    reason: str
    line: bool = False  # index is a line number

    def __str__(self) -> str:
        return f"{self.file}: {'line' if self.line else 'record'} {self.index}: {self.reason}"


@dataclass
class SFTData:
    conversations: list[Conversation]
    format: str
    bad: list[BadRecord] = field(default_factory=list)


# --- reading -------------------------------------------------------------------------------------------------


def read_sft(path: str | os.PathLike, format: str = "auto", strict: bool = False) -> SFTData:
    """Read a `.json` (array of records) or `.jsonl` (a record per line) file of one of FORMATS ("auto": told by
    the first record's keys). Bad records are listed in `.bad`, or raise SFTDataError with `strict`."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise SFTDataError(f"unknown data format {format!r}; choose auto, {', '.join(FORMATS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such data file: {path}") from None
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    records: list[tuple[int, bool, Any]] = []  # (index, is a line number, record or a BadRecord reason)
    bad: list[BadRecord] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}: not valid JSON ({e})") from None
        records = [(i, False, r) for i, r in enumerate(array)]
    else:  # JSONL, whatever the suffix; a single JSON object is one line of it
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, True, json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(BadRecord(str(path), number, f"invalid JSON ({e.msg} at column {e.colno})", True))
    if format == "auto":
        format = _detect(path, [r for _, _, r in records])
    parse = _PARSERS[format]
    conversations = []
    for index, is_line, record in records:
        try:
            conversations.append(parse(record, str(index)))
        except ValueError as e:
            bad.append(BadRecord(str(path), index, str(e), is_line))
    bad.sort(key=lambda b: b.index)
    if strict and bad:
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        listed = "\n  ".join(map(str, bad[:20]))
        raise SFTDataError(f"{len(bad)} bad record(s) in {path} (strict):\n  {listed}{more}")
    return SFTData(conversations, format, bad)


def _detect(path: Path, records: list[Any]) -> str:
    for record in records:
        if isinstance(record, dict):
            if "conversations" in record:
                return "conversations"
            if "messages" in record:
                return "messages"
            if "instruction" in record:
                return "alpaca"
            raise SFTDataError(
                f"{path}: cannot tell the format from the first record's keys ({', '.join(map(str, record))}): "
                "expected 'conversations' (Baichuan2), 'instruction' (alpaca) or 'messages' (OpenAI); or pass "
                "the format"
            )
    raise SFTDataError(f"{path}: no JSON object records")


def _text(record: Mapping, key: str, where: str = "", optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        raise ValueError(f"{where}{key!r} is {found}")
    if not value.strip() and not optional:
        raise ValueError(f"{where}{key!r} is empty")
    return value


def _checked(turns: list[tuple[str, str]], system: str, id: str) -> Conversation:
    # Two turns of one role in a row are kept, as the original keeps them (each gets its role token): five of
    # the first 1,000 shared conversations have them.
    if not turns:
        raise ValueError("no turns")
    if turns[-1][0] != GPT:
        raise ValueError("the last turn is the user's: no reply to learn")
    return Conversation(turns, system, id)


def _conversations(record: Any, index: str) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    turns_in = record.get("conversations")
    if not isinstance(turns_in, list):
        raise ValueError("'conversations' is missing or not a list")
    turns = []
    for i, turn in enumerate(turns_in):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = turn.get("from")
        if role not in (HUMAN, GPT):
            raise ValueError(f"turn {i}: 'from' is {role!r}, expected 'human' or 'gpt'")
        turns.append((role, _text(turn, "value", f"turn {i}: ")))
    return _checked(turns, "", str(record.get("id", index)))


def _alpaca(record: Any, index: str) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    instruction = _text(record, "instruction")
    extra = _text(record, "input", optional=True)
    output = _text(record, "output")
    system = _text(record, "system", optional=True)
    turns = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError("'history' is not a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)
        ):
            raise ValueError(f"history {i} is not a [question, answer] pair of non-empty strings")
        turns += [(HUMAN, pair[0]), (GPT, pair[1])]
    turns += [(HUMAN, f"{instruction}\n{extra}" if extra.strip() else instruction), (GPT, output)]
    return _checked(turns, system, str(record.get("id", index)))


_MESSAGE_ROLES = {"user": HUMAN, "assistant": GPT}


def _messages(record: Any, index: str) -> Conversation:
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ValueError("'messages' is missing or not a list")
    system, turns = "", []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        role = message.get("role")
        if role == "system" and i == 0:
            system = _text(message, "content", f"message {i}: ")
            continue
        if role not in _MESSAGE_ROLES:
            allowed = "'system' (first only), 'user' or 'assistant'"
            raise ValueError(f"message {i}: role {role!r} is not {allowed}")
        turns.append((_MESSAGE_ROLES[role], _text(message, "content", f"message {i}: ")))
    return _checked(turns, system, str(record.get("id", index)))


_PARSERS = {"conversations": _conversations, "alpaca": _alpaca, "messages": _messages}


# --- tokenising and masking ----------------------------------------------------------------------------------


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos, pad) of our Tokenizer or of a transformers tokenizer."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_id
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "pad_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad id (the original pads with <unk>, id 0)")
    return int(eos), int(pad)


def _as_conversation(conversation: Conversation | Mapping | Sequence) -> Conversation:
    if isinstance(conversation, Conversation):
        return conversation
    if isinstance(conversation, Mapping):
        conversation = conversation["conversations"]
    return Conversation([(turn["from"], turn["value"]) for turn in conversation])


def encode_conversation(
    tokenizer: Any,
    conversation: Conversation | Mapping | Sequence,
    user_token_id: int = USER_TOKEN_ID,
    assistant_token_id: int = ASSISTANT_TOKEN_ID,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation, neither truncated nor padded (see the module docstring)."""
    conversation = _as_conversation(conversation)
    eos, _ = _special_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    if conversation.system:
        system_ids = tokenizer.encode(conversation.system)
        input_ids += system_ids
        labels += [IGNORE_INDEX] * len(system_ids)
    previous = None
    for role, text in conversation.turns:
        value_ids = tokenizer.encode(text)
        if role == HUMAN:
            # EOS is the label of the user token: the reply before it ends there. The first turn's label is
            # never used (nothing precedes it); the original writes EOS there too, and so do we, but not after
            # a system text, where no reply ends.
            first_after_system = previous is None and conversation.system
            input_ids += [user_token_id] + value_ids
            labels += [IGNORE_INDEX if first_after_system else eos] + [IGNORE_INDEX] * len(value_ids)
        else:
            input_ids += [assistant_token_id] + value_ids
            labels += [IGNORE_INDEX] + value_ids
        previous = role
    input_ids.append(eos)
    labels.append(eos)
    return input_ids, labels


def tokenize_conversation(
    tokenizer: Any,
    conversation: Conversation | Mapping | Sequence,
    model_max_length: int,
    user_token_id: int = USER_TOKEN_ID,
    assistant_token_id: int = ASSISTANT_TOKEN_ID,
) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` (LongTensor) and `attention_mask` (BoolTensor), each `model_max_length` long, for one
    record of the conversations format (`{"conversations": [...]}`, its list of turns, or a `Conversation`):
    the preprocessing of the original `fine-tune.py`. `tokenizer`: our `Tokenizer` or a transformers one."""
    _, pad = _special_ids(tokenizer)
    input_ids, labels = encode_conversation(tokenizer, conversation, user_token_id, assistant_token_id)
    input_ids = input_ids[:model_max_length]
    labels = labels[:model_max_length]
    input_ids += [pad] * (model_max_length - len(input_ids))
    labels += [IGNORE_INDEX] * (model_max_length - len(labels))
    ids = torch.tensor(input_ids, dtype=torch.long)
    return {"input_ids": ids, "labels": torch.tensor(labels, dtype=torch.long), "attention_mask": ids.ne(pad)}


@dataclass
class Example:
    input_ids: np.ndarray  # int64, truncated to the sequence length, unpadded
    labels: np.ndarray


def tokenize_all(
    tokenizer: Any,
    conversations: Iterable[Conversation],
    model_max_length: int,
    user_token_id: int = USER_TOKEN_ID,
    assistant_token_id: int = ASSISTANT_TOKEN_ID,
) -> tuple[list[Example], list[int]]:
    """The truncated examples, and each conversation's full length in tokens (for the histogram)."""
    examples, lengths = [], []
    for conversation in conversations:
        ids, labels = encode_conversation(tokenizer, conversation, user_token_id, assistant_token_id)
        lengths.append(len(ids))
        examples.append(
            Example(
                np.asarray(ids[:model_max_length], dtype=np.int64),
                np.asarray(labels[:model_max_length], dtype=np.int64),
            )
        )
    return examples, lengths


def length_histogram(
    lengths: Sequence[int], model_max_length: int, bins: int = 10
) -> list[tuple[int, int, int]]:
    """(low, high, count) rows of token lengths, in equal bins up to the longest; for --dry-run."""
    if not lengths:
        return []
    top = max(lengths)
    width = max(1, -(-top // bins))
    counts = np.bincount(np.asarray(lengths) // width, minlength=bins)
    return [(i * width, (i + 1) * width - 1, int(n)) for i, n in enumerate(counts) if n or i < bins]


def pack_examples(examples: Sequence[Example], seq_len: int, seed: int = 0) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most seq_len: first fit over a seeded shuffle (the
    rows differ with the seed, and then stay fixed for the run)."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(examples))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(int(i))
                room[r] -= n
                break
        else:
            rows.append([int(i)])
            room.append(seq_len - n)
    return rows


class SFTBatches:
    """Micro-batches of examples (or packed rows of them) for `loop.train`: dicts of input_ids and labels (B, T),
    plus `attention_mask` where needed: (B, T) where a real token is the pad id (the original masks it as a
    key), or (B, T, T) for packed rows (each token sees its own example only)."""

    def __init__(
        self,
        examples: Sequence[Example],
        seq_len: int,
        micro_batch: int,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        pad_id: int = 0,
        pack: bool = False,
    ):
        if not examples:
            raise ValueError("no examples to train on")
        self.examples, self.seq_len, self.seed, self.pad_id = examples, seq_len, seed, pad_id
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.world_size, self.rank, self.pack = world_size, rank, pack
        self.rows = pack_examples(examples, seq_len, seed) if pack else [[i] for i in range(len(examples))]
        # Labelled positions per example after the shift (its first label is never a target).
        self.n_labels = [int((e.labels[1:] != IGNORE_INDEX).sum()) for e in examples]
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.n_rows // self.global_batch))

    def row(self, sample: int) -> list[int]:
        epoch, i = divmod(sample, self.n_rows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return self.rows[int(self._perm[1][i])]

    def collate(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        parts = [[self.examples[i] for i in row] for row in rows]
        width = max(sum(len(e.input_ids) for e in part) for part in parts)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros((len(rows), width), dtype=np.int64)  # 0: padding, k: the k-th example of the row
        for b, part in enumerate(parts):
            at = 0
            for k, example in enumerate(part, start=1):
                n = len(example.input_ids)
                ids[b, at : at + n] = example.input_ids
                labels[b, at : at + n] = example.labels
                if self.pack:
                    # An example's first label would be predicted from the previous example's last token.
                    labels[b, at] = IGNORE_INDEX
                segments[b, at : at + n] = k
                at += n
        batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if self.pack:
            seg = torch.from_numpy(segments)
            batch["attention_mask"] = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        else:
            # The original's attention_mask is input_ids != pad: it also hides a real <unk> (the pad id) as a key.
            # Where the mask only marks trailing padding, causal attention gives the same real-token outputs
            # without it, and keeps SDPA's fast path.
            real = ids != self.pad_id
            if not np.array_equal(~real, segments == 0):
                batch["attention_mask"] = torch.from_numpy(real)
        return batch

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global step `step`. Each carries `loss_scale`, so that the loop's loss
        (a mean over micro-batches and ranks) of a summed token loss is the mean over every labelled token of
        the global batch: the same for any split into ranks and accumulation steps."""
        start = step * self.global_batch
        total = sum(self.n_labels[i] for g in range(start, start + self.global_batch) for i in self.row(g))
        scale = torch.tensor(self.grad_accum * self.world_size / max(total, 1), dtype=torch.float32)
        first = start + self.rank * self.micro_batch * self.grad_accum
        batches = []
        for m in range(self.grad_accum):
            batch = self.collate(
                [self.row(first + m * self.micro_batch + j) for j in range(self.micro_batch)]
            )
            batch["loss_scale"] = scale
            batches.append(batch)
        return batches

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_rows": self.n_rows,
            "global_batch": self.global_batch,
            "pack": self.pack,
        }
