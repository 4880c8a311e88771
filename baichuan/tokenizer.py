"""SentencePiece tokenizer of the Baichuan family: encode/decode, special ids, and streaming detokenization.

Layer 1: sentencepiece and the standard library only (the transformers face is baichuan/hf/tokenizer.py).
`encode` is exactly `SentencePieceProcessor.encode`: no BOS/EOS, and text that looks like a special token
(`"<s>"`) is plain text, so user input can never inject control ids. Chat code adds role and control ids itself.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"


def load_sentencepiece(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file (or the tokenizer.model inside a checkpoint directory) with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no SentencePiece tokenizer model at {path}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError) as error:
        # sentencepiece reports a bad file as a C++ "util::Status" dump; name the file instead.
        raise ValueError(f"{path} is not a valid SentencePiece model ({error})") from None
    return processor


class Tokenizer:
    """A Baichuan `tokenizer.model`: ids without BOS/EOS, decoding with byte fallback, special ids."""

    def __init__(self, path: str | os.PathLike):
        self.sp = load_sentencepiece(path)
        self.vocab_size: int = self.sp.get_piece_size()
        self.unk_id: int = self.sp.unk_id()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # The models define no pad piece; the official tokenizer_config.json pads with <unk> (id 0).
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self.special_ids = frozenset(
            i for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id) if i >= 0
        )
        # byte_values[i] is the byte of a byte-fallback piece `<0xAB>`, for the streaming decoder.
        self.byte_values = {
            i: int(self.sp.id_to_piece(i)[3:5], 16) for i in range(self.vocab_size) if self.sp.is_byte(i)
        }

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text as SentencePiece decodes it, as the original (slow) tokenizer does: skipped special tokens are
        dropped, kept ones are written as their piece (`<s>`, `</s>`, `<unk>`), and each stretch between kept
        special tokens is decoded on its own, which drops the dummy-prefix `▁` that encoding adds after them."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        text, run = [], []
        for i in ids:
            if i in self.special_ids:
                text += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)

    def id_to_piece(self, id: int) -> str:
        return self.sp.id_to_piece(id)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.vocab_size


class StreamDecoder:
    """Turns generated ids, fed one at a time, into text deltas whose concatenation is
    `tokenizer.decode(all ids, skip_special_tokens)`.

    A character outside the vocabulary arrives as 2-4 byte-fallback pieces (`<0xF0><0x9F><0x98><0x8A>` for an
    emoji); no delta ever ends inside one, the bytes are held back until the character is complete. A byte that can
    never start or continue a character is emitted at once as U+FFFD, exactly as `decode` renders it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # ids[prefix:read] were already emitted and are decoded again only as context: decoding drops the `▁` of
        # the first piece, so the piece before the new ones decides whether a new "▁word" starts with a space.
        self.prefix = 0
        self.read = 0

    def push(self, id: int) -> str:
        """Add one id; return the text it completes (often "", while a multi-byte character is incomplete)."""
        id = int(id)
        if self.skip_special_tokens and id in self.tokenizer.special_ids:
            # `decode` drops skipped ids before decoding the rest as one stretch. Kept here, they could be all
            # the context before the next id, which would then lose its space as a first piece, and one between
            # byte pieces would keep apart bytes that `decode` joins into one character.
            return ""
        self.ids.append(id)
        if self._ends_mid_character():
            return ""
        return self._emit()

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes to U+FFFD), at the end of generation."""
        return self._emit() if self.read < len(self.ids) else ""

    def _emit(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip_special_tokens)
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def _ends_mid_character(self) -> bool:
        tail = []
        for i in reversed(self.ids[self.read :]):
            if i not in self.tokenizer.byte_values:
                break
            tail.append(self.tokenizer.byte_values[i])
        if not tail:
            return False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(reversed(tail)))
        pending, _ = decoder.getstate()
        return bool(pending)
