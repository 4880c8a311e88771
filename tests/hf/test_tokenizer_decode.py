"""Decoding any ids: fast and slow transformers tokenizers and the core `Tokenizer` give sentencepiece's text.

For each tokenizer file in ../shared (the real Baichuan-7B vocabulary, its llama.cpp variant, the three
fixture checkpoints') and one that `baichuan init` trains, 10,000 random id sequences (fixed seed) mix runs of
byte pieces (whole UTF-8 characters, truncated ones, lone continuation bytes, invalid lead bytes before ASCII,
overlong forms, surrogates, random bytes) with normal, `▁`-led, user-defined and reserved pieces (ids 195,
196) and the special ids <unk>, <s>, </s>. All 10,000 agree on every file, with `skip_special_tokens` either
way, and the streaming decoder ends with the same text. `pytest -s` prints a line per file:
    decode agreement: data/baichuan-7b-tokenizer/tokenizer.model fast 10000/10000 fast_skip 10000/10000 ...

What each side means:
* The special ids are <unk>, <s> and </s>: `all_special_ids` and the core `special_ids`; a tokenizer built
  from the model file has no other added token.
* `decode(ids)`: the transformers classes (like the original tokenization_baichuan.py) and the core
  `Tokenizer` write a special token as its piece ("<s>") and decode each stretch between special tokens on its
  own. The reference is `SentencePieceProcessor.decode` of each stretch, with the special pieces between.
* `decode(ids, skip_special_tokens=True)` drops the special ids and decodes what is left as one stretch: the
  reference is `SentencePieceProcessor.decode` of what is left.
* `SentencePieceProcessor.decode(ids)` itself writes a control piece as "", <unk> as " ⁇ ", and keeps the
  bytes on either side of a control piece apart; on ids with no special id it is the reference of both, and
  is counted as "sentencepiece".
"""

import functools
import random
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from transformers import AutoTokenizer

from baichuan.hf.tokenizer import BaichuanTokenizer, BaichuanTokenizerFast
from baichuan.scaffold import train_tokenizer
from baichuan.tokenizer import StreamDecoder, Tokenizer
from tests.conftest import shared_path

SEQUENCES = 10_000
SHARED_FILES = [
    ("data", "baichuan-7b-tokenizer", "tokenizer.model"),
    ("data", "baichuan-7b-tokenizer", "tokenizer-llamacpp.model"),
    ("oracle", "fixtures", "baichuan1_13b", "checkpoint", "tokenizer.model"),
    ("oracle", "fixtures", "baichuan2_7b", "checkpoint", "tokenizer.model"),
    ("oracle", "fixtures", "baichuan2_13b", "checkpoint", "tokenizer.model"),
]
NORMAL, USER_DEFINED = 1, 4  # sentencepiece_model.proto: ModelProto.SentencePiece.Type


class Vocabulary:
    """The kinds of piece in a tokenizer.model, to draw random ids from."""

    def __init__(self, path: Path):
        proto = model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        sp = spm.SentencePieceProcessor(model_file=str(path))
        self.byte = {int(sp.id_to_piece(i)[3:5], 16): i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
        assert len(self.byte) == 256
        types = [(i, piece.piece, piece.type) for i, piece in enumerate(proto.pieces)]
        self.normal = [i for i, _, kind in types if kind == NORMAL]
        self.spaced = [i for i, piece, kind in types if kind == NORMAL and piece.startswith("▁")]
        self.user_defined = [i for i, _, kind in types if kind == USER_DEFINED] or self.normal
        self.special = [sp.unk_id(), sp.bos_id(), sp.eos_id()]


def utf8_char(rng: random.Random) -> bytes:
    lo, hi = rng.choice([(0x20, 0x7E), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)])
    return chr(rng.randint(lo, hi)).encode()


def truncated_char(rng: random.Random) -> bytes:
    char = b""
    while len(char) < 2:
        char = utf8_char(rng)
    return char[: rng.randrange(1, len(char))]


# Each draws a run of byte values: whole characters, and the ways a byte run can fail to be UTF-8.
BYTE_RUNS = [
    utf8_char,
    lambda rng: utf8_char(rng) + utf8_char(rng),
    truncated_char,
    lambda rng: truncated_char(rng) + utf8_char(rng),
    lambda rng: bytes(rng.randint(0x80, 0xBF) for _ in range(rng.randint(1, 3))),  # lone continuation bytes
    lambda rng: bytes([rng.choice([0xC0, 0xC1, *range(0xF5, 0x100)]), rng.randint(0x21, 0x7E)]),  # bad lead
    lambda rng: bytes([rng.randint(0x80, 0xFF), rng.randint(0x21, 0x7E)]),  # "<0xA3><0x35>" and the like
    lambda rng: rng.choice(
        [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
    ),
    lambda rng: bytes(rng.randrange(256) for _ in range(rng.randint(1, 6))),
    lambda rng: b" ",  # a space byte: not the dummy prefix, never dropped
]


def random_ids(rng: random.Random, vocab: Vocabulary) -> list[int]:
    ids: list[int] = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 8, 10])):
        kind = rng.random()
        if kind < 0.45:
            ids += [vocab.byte[b] for b in rng.choice(BYTE_RUNS)(rng)]
        elif kind < 0.65:
            ids.append(rng.choice(vocab.normal))
        elif kind < 0.8:
            ids.append(rng.choice(vocab.spaced))
        elif kind < 0.87:
            ids.append(rng.choice(vocab.user_defined))
        elif kind < 0.93:
            ids.append(rng.choice(vocab.special))
        else:
            ids.append(rng.choice([195, 196]))
    return ids


def reference_decode(sp: spm.SentencePieceProcessor, ids: list[int], special: set[int], skip: bool) -> str:
    if skip:
        return sp.decode([i for i in ids if i not in special])
    text, run = [], []
    for i in ids:
        if i in special:
            text += [sp.decode(run), sp.id_to_piece(i)]
            run = []
        else:
            run.append(i)
    return "".join([*text, sp.decode(run)])


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> str:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip)
    return "".join([decoder.push(i) for i in ids] + [decoder.flush()])


@functools.cache
def load(
    path: Path,
) -> tuple[spm.SentencePieceProcessor, BaichuanTokenizer, BaichuanTokenizerFast, Tokenizer]:
    return (
        spm.SentencePieceProcessor(model_file=str(path)),
        BaichuanTokenizer(vocab_file=str(path), add_bos_token=False),
        BaichuanTokenizerFast(vocab_file=str(path), add_bos_token=False),
        Tokenizer(path),
    )


def agreement(name: str, path: Path) -> Counter:
    """How many of SEQUENCES random id sequences each decoder gets right, plain and with specials skipped."""
    sp, slow, fast, core = load(path)
    special = set(core.special_ids)
    assert set(slow.all_special_ids) == set(fast.all_special_ids) == special
    assert set(slow.added_tokens_decoder) == set(fast.added_tokens_decoder) == special
    vocab, rng = Vocabulary(path), random.Random(f"decode {name}")
    counts: Counter = Counter()
    for _ in range(SEQUENCES):
        ids = random_ids(rng, vocab)
        # sentencepiece's own decode, where it means the same (see the module docstring)
        plain = sp.decode(ids) if not special.intersection(ids) else None
        for skip, mode in ((False, ""), (True, " skip")):
            expected = reference_decode(sp, ids, special, skip)
            counts["fast" + mode] += fast.decode(ids, skip_special_tokens=skip) == expected
            counts["slow" + mode] += slow.decode(ids, skip_special_tokens=skip) == expected
            counts["core" + mode] += core.decode(ids, skip_special_tokens=skip) == expected
            counts["stream" + mode] += stream(core, ids, skip) == expected
            if plain is not None:
                counts["sentencepiece" + mode] += plain == expected
                counts["sentencepiece" + mode + " of"] += 1
            counts["with U+FFFD"] += not skip and "\ufffd" in expected
    return counts


def report(name: str, counts: Counter) -> str:
    parts = []
    for key in ("fast", "slow", "core", "stream", "sentencepiece"):
        for mode in ("", " skip"):
            total = counts[key + mode + " of"] if key == "sentencepiece" else SEQUENCES
            parts.append(f"{key}{mode.replace(' ', '_')} {counts[key + mode]}/{total}")
    return f"decode agreement: {name} " + " ".join(parts) + f" (with U+FFFD: {counts['with U+FFFD']})"


def check(name: str, path: Path) -> None:
    counts = agreement(name, path)
    print(report(name, counts))
    for key in ("fast", "slow", "core", "stream"):
        assert counts[key] == counts[key + " skip"] == SEQUENCES, report(name, counts)
    for mode in ("", " skip"):
        assert counts["sentencepiece" + mode] == counts["sentencepiece" + mode + " of"] > SEQUENCES // 2
    assert counts["with U+FFFD"] > SEQUENCES // 4  # the byte runs did make invalid UTF-8


@pytest.mark.parametrize("parts", SHARED_FILES, ids=["/".join(p[-3:]) for p in SHARED_FILES])
def test_random_ids_decode_as_sentencepiece_does(parts):
    check("/".join(parts), shared_path(*parts))


def test_random_ids_decode_as_sentencepiece_does_for_a_trained_tokenizer(tmp_path):
    # `baichuan init`'s tokenizer: no dummy prefix, identity normalisation, `▁▁`-style whitespace pieces
    path = tmp_path / "tokenizer.model"
    train_tokenizer(path)
    check("baichuan init tokenizer.model", path)


def test_invalid_lead_byte_then_ascii_byte():
    # Issue 9: a lead byte that starts no character is one U+FFFD, and the valid byte after it is "5".
    sp, slow, fast, core = load(shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model"))
    pieces = ["<0xA3>", "<0x35>", "北"]
    ids = [sp.piece_to_id(piece) for piece in pieces]
    assert sp.decode(ids) == core.decode(ids) == "\ufffd5北"
    for tokenizer in (slow, fast):
        assert tokenizer.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True) == "\ufffd5北"
        assert tokenizer.convert_tokens_to_string(pieces) == "\ufffd5北"
        # A truncated character is one U+FFFD per byte (Python's errors="replace" would give one in all).
        assert (
            tokenizer.decode([sp.piece_to_id(p) for p in ["<0xE4>", "<0xB8>", "<0x35>"]]) == "\ufffd\ufffd5"
        )
        # A space byte first is text, not the dummy prefix.
        assert tokenizer.decode([sp.piece_to_id("<0x20>"), sp.piece_to_id("▁x")]) == "  x"
        with pytest.raises(IndexError):
            tokenizer.decode([64_000])
    decoder = StreamDecoder(core)
    assert [decoder.push(i) for i in ids] == ["\ufffd", "5", "北"]


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_7b"])
def test_auto_tokenizer_of_a_checkpoint_decodes_as_the_slow_one(variant):
    # A checkpoint directory also makes the chat role pieces special tokens (the fixtures' ids 195 and 196 are
    # the byte pieces <0xC0> and <0xC1>): they are written verbatim and split the stretches around them.
    directory = shared_path("oracle", "fixtures", variant, "checkpoint")
    fast = AutoTokenizer.from_pretrained(directory)
    slow = BaichuanTokenizer.from_pretrained(directory)
    assert type(fast) is BaichuanTokenizerFast
    special = set(fast.all_special_ids)
    assert special == set(slow.all_special_ids) == set(fast.added_tokens_decoder) == {0, 1, 2, 195, 196}
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    vocab, rng = Vocabulary(directory / "tokenizer.model"), random.Random(variant)
    for _ in range(2_000):
        ids = random_ids(rng, vocab)
        for skip in (False, True):
            expected = reference_decode(sp, ids, special, skip)
            assert (
                fast.decode(ids, skip_special_tokens=skip)
                == slow.decode(ids, skip_special_tokens=skip)
                == expected
            )
