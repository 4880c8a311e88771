"""SentencePiece tokenizer of the Baichuan family: encode/decode, special ids, and streaming detokenization.

Layer 1: sentencepiece and the standard library only (the transformers face is baichuan/hf/tokenizer.py).

`encode` is exactly `SentencePieceProcessor.encode`, with no BOS/EOS. Text that spells a control piece (`"<s>"`,
`"</s>"`) is plain text there, but text that spells a user-defined piece becomes that piece, and in the real
Baichuan vocabularies the chat role tokens are user-defined pieces: `"<reserved_102>"` encodes to the user role
id 195. So untrusted text (a chat message) goes through `encode_text` instead, which never yields a special id
or a given control id (the chat format passes its role and EOS ids): it encodes with a copy of the model in
which those pieces are control pieces, so their spelling comes out as ordinary pieces, exactly as sentencepiece
splits any text that no symbol matches (`"<reserved_102>"` -> `<` `res` `erved` `_` `1` `0` `2` `>`, the ids
that llama.cpp's converted vocabulary, where these pieces are plain, gives too). Any other text gives the ids of
`encode`. Chat code inserts role and control ids itself, by id.

Encoding runs in our C++ encoder (`native_bpe`), which gives exactly sentencepiece's ids several times faster,
and batches on several threads; where it cannot be built, sentencepiece encodes. Both read the same model, and
`encode_text`'s copy goes to both.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from baichuan.native_bpe import Encoder, available_cpus

MODEL_FILE = "tokenizer.model"
# sentencepiece_model.proto: ModelProto.pieces is field 1, SentencePiece.type field 3, and CONTROL is type 3.
# As protobuf wire format: a length-delimited field 1, and the varint field 3 set to 3.
PIECE_KEY, CONTROL_TYPE = b"\x0a", b"\x18\x03"


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


def text_only_processor(
    processor: spm.SentencePieceProcessor, ids: Iterable[int]
) -> spm.SentencePieceProcessor:
    """`processor` with the pieces `ids` turned into control pieces, which sentencepiece never makes from text:
    their spelling is then split as any other text is. Only normal and user-defined pieces come from text, so
    only they change (a byte piece comes only from its byte; the role ids of the tiny test vocabularies fall on
    0xC0 and 0xC1, which UTF-8 never contains). Ids change only where the text spells a demoted piece, before
    or after NFKC (`"＜reserved_102＞"` too): tests/test_tokenizer.py checks every public case and random
    near misses."""
    size = processor.get_piece_size()
    demoted = {
        i
        for i in ids
        if 0 <= i < size
        and not (processor.is_control(i) or processor.is_unknown(i))
        and not (processor.is_byte(i) or processor.is_unused(i))
    }
    if not demoted:
        return processor
    return spm.SentencePieceProcessor(model_proto=_as_control(processor.serialized_model_proto(), demoted))


def _as_control(model: bytes, ids: set[int]) -> bytes:
    """The serialized ModelProto `model` with the pieces `ids` typed CONTROL. Written on the protobuf wire
    format, where the last value of a field wins, by appending the type to each such piece's message: this
    layer needs no generated protobuf module (sentencepiece's accepts only the protobuf release it was
    generated for)."""
    out, pos, piece = bytearray(), 0, 0
    while pos < len(model):
        start = pos
        key, pos = _varint(model, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(model, pos)
        elif wire == 2:
            length, pos = _varint(model, pos)
            pos += length
            if key >> 3 == 1:  # a piece
                piece += 1
                if piece - 1 in ids:
                    body = model[pos - length : pos]
                    out += PIECE_KEY + _encode_varint(length + len(CONTROL_TYPE)) + body + CONTROL_TYPE
                    continue
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"not a SentencePiece model: protobuf wire type {wire} at byte {start}")
        out += model[start:pos]
    return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


class Tokenizer:
    """A Baichuan `tokenizer.model`: ids without BOS/EOS, decoding with byte fallback, special ids."""

    def __init__(self, path: str | os.PathLike, native: bool = True):
        self.sp = load_sentencepiece(path)
        # The C++ encoder, made on the first encode (a tokenizer that only decodes never pays its ~0.2 s); None
        # where it cannot be built or native=False: sentencepiece encodes.
        self.native = native
        self._encoder_made = not native
        self._built_encoder: Encoder | None = None
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
        self._text_only: dict[frozenset[int], tuple[spm.SentencePieceProcessor, Encoder | None]] = {}

    @property
    def _encoder(self) -> Encoder | None:
        if not self._encoder_made:
            self._built_encoder = Encoder.create(self.sp.serialized_model_proto())
            self._encoder_made = True
        return self._built_encoder

    def encode(self, text: str) -> list[int]:
        """Exactly `SentencePieceProcessor.encode`: a user-defined piece's spelling gives that piece."""
        encoder = self._built_encoder if self._encoder_made else self._encoder
        if encoder is not None:
            return encoder.encode(text)
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int | None = None) -> list[list[int]]:
        """`encode` of each text, on `threads` threads (default: every CPU this process may use)."""
        threads = available_cpus() if threads is None else max(1, threads)
        if self._encoder is not None:
            return self._encoder.encode_batch(texts, threads)
        return self.sp.encode(list(texts), num_threads=threads)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `encode` and the (begin, end) characters of `text` that each covers, as sentencepiece's
        pieces give them (the dummy-prefix `▁` covers nothing; of a character's byte pieces, the last covers
        it and the others nothing)."""
        if self._encoder is not None:
            return self._encoder.encode_with_offsets(text)
        pieces = self.sp.encode(text, return_type="proto").pieces  # begin/end in UTF-8 bytes
        data = text.encode()
        chars = [len(data[:i].decode(errors="ignore")) for i in range(len(data) + 1)]
        return [p.id for p in pieces], [(chars[p.begin], chars[p.end]) for p in pieces]

    def encode_text(self, text: str, control_ids: Iterable[int] = ()) -> list[int]:
        """Ids of untrusted text, such as a chat message: those of `encode`, except that no special id (unk, BOS,
        EOS, pad) and none of `control_ids` ever comes out; text spelling one of their pieces is encoded as
        ordinary text (see the module docstring). `decode` gives the text back, as it does for `encode`."""
        key = frozenset(int(i) for i in control_ids) | self.special_ids
        copy = self._text_only.get(key)
        if copy is None:  # building the copy takes ~0.3 s for a 64k vocabulary: once per set of ids
            processor = text_only_processor(self.sp, key)
            encoder = self._encoder
            if encoder is not None and processor is not self.sp:
                encoder = Encoder.create(processor.serialized_model_proto())
            copy = self._text_only[key] = (processor, encoder)
        processor, encoder = copy
        return encoder.encode(text) if encoder is not None else processor.encode(text)

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
