"""The transformers tokenizers: exact ids against ../shared/oracle, fast == slow, official-layout loading and saving.

Run as a script to measure fast == slow == sentencepiece agreement on the whole pretraining corpus:
    python -m tests.hf.test_tokenizer
"""

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from baichuan.hf.tokenizer import BaichuanTokenizer, BaichuanTokenizerFast
from baichuan.tokenizer import _as_control
from tests.conftest import shared_path

CHAT_VARIANTS = ("baichuan1_13b", "baichuan2_7b", "baichuan2_13b")
MODEL_FILES = [("tokenizer.model", "ids"), ("tokenizer-llamacpp.model", "ids_llamacpp")]
CLASSES = [BaichuanTokenizer, BaichuanTokenizerFast]
HARD_TEXTS = [
    "a\r\nb\r\n\r\n",  # "\r\n" is one grapheme cluster; "\n" is a user-defined symbol
    "，<s>，你好。</s>",  # text that spells control pieces between symbols
    "\n<unk>x",
    "﹤b﹥ ① －－－",  # symbols that only appear after NFKC
    "１\u0301",
    "<|im_start|>",
    # Words that spell a control, unknown or byte piece, alone or before a `▁` (the pre-tokenizer cuts there).
    "，<s> x",
    "，</s>\u2581y",
    "\n<unk>",
    "x <s>",
    "，<0x41>",
    "a  b   c\t d ",
    "  x",
    "\nabc",
]


def model_path(name: str) -> Path:
    return shared_path("data", "baichuan-7b-tokenizer", name)


def checkpoint(variant: str) -> Path:
    return shared_path("oracle", "fixtures", variant, "checkpoint")


def public_cases() -> list[dict]:
    path = shared_path("oracle", "tokenizer", "cases_public.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=MODEL_FILES, ids=["nmt_nfkc", "llamacpp"])
def baichuan7b(request) -> tuple[BaichuanTokenizer, BaichuanTokenizerFast, spm.SentencePieceProcessor, str]:
    name, key = request.param
    path = str(model_path(name))
    slow = BaichuanTokenizer(vocab_file=path, add_bos_token=False)
    fast = BaichuanTokenizerFast(vocab_file=path, add_bos_token=False)
    return slow, fast, spm.SentencePieceProcessor(model_file=path), key


def test_public_cases_exact_ids_and_decode(baichuan7b):
    slow, fast, reference, key = baichuan7b
    for case in public_cases():
        for tokenizer in (slow, fast):
            # The cases were made by sentencepiece, which never parses "<s>" in text: split_special_tokens=True.
            ids = tokenizer.encode(case["text"], add_special_tokens=False, split_special_tokens=True)
            assert ids == case[key], (type(tokenizer).__name__, case["text"])
            assert tokenizer.decode(case[key]) == reference.decode(case[key]), case["text"]


def test_special_token_text_is_parsed_by_default_like_the_original(baichuan7b):
    for tokenizer in baichuan7b[:2]:
        ids = tokenizer.encode("<s>你好</s>", add_special_tokens=False)
        assert ids == [1, *tokenizer.encode("你好", add_special_tokens=False), 2]


def test_hard_texts_fast_equals_slow_equals_sentencepiece(baichuan7b):
    slow, fast, reference, _ = baichuan7b
    for text in HARD_TEXTS:
        expected = reference.encode(text)
        assert slow.encode(text, add_special_tokens=False, split_special_tokens=True) == expected, text
        assert fast.encode(text, add_special_tokens=False, split_special_tokens=True) == expected, text
        assert slow.encode(text, add_special_tokens=False) == fast.encode(text, add_special_tokens=False), (
            text
        )


def corpus_texts(per_file: int | None = None) -> Iterator[str]:
    """Lines of the text files (line ends kept, so Gutenberg's "\\r\\n" is tested) and the strings of the JSON
    files of ../shared/data/pretrain_corpus; `per_file` of each when given."""
    for path in sorted(shared_path("data", "pretrain_corpus").rglob("*")):
        if path.suffix == ".json":
            texts = _strings(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".txt":
            texts = path.read_bytes().decode("utf-8").splitlines(keepends=True)
        else:
            continue
        yield from itertools.islice((text for text in texts if text), per_file)


def _strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for child in node.values() if isinstance(node, dict) else node:
            yield from _strings(child)


def agreement(slow, fast, reference, texts: list[str]) -> dict[str, int]:
    fast_ids = fast(texts, add_special_tokens=False)["input_ids"]
    counts = {"texts": len(texts), "fast==slow": 0, "fast==sentencepiece": 0, "decode fast==slow": 0}
    for text, ids in zip(texts, fast_ids, strict=True):
        slow_ids = slow.encode(text, add_special_tokens=False)
        counts["fast==slow"] += ids == slow_ids
        counts["fast==sentencepiece"] += ids == reference.encode(text)
        counts["decode fast==slow"] += fast.decode(ids) == slow.decode(slow_ids)
    return counts


def test_fast_equals_slow_on_a_corpus_sample(baichuan7b):
    texts = list(corpus_texts(per_file=150))
    counts = agreement(*baichuan7b[:3], texts)
    assert counts["texts"] > 3000
    assert set(counts.values()) == {counts["texts"]}, counts


def test_encode_shortcut_gives_the_ids_of_the_transformers_path(baichuan7b):
    # One text with no option skips transformers' batch machinery (BaichuanTokenizerFast.encode); each option
    # below, or a backend left with truncation set by an earlier call, takes the usual path.
    _, fast, reference, _ = baichuan7b
    text = "<s>Hello, 世界\n2023 </s>"
    for special in (False, True):
        for split in (False, True):
            expected = fast(text, add_special_tokens=special, split_special_tokens=split)["input_ids"]
            assert fast.encode(text, add_special_tokens=special, split_special_tokens=split) == expected
    assert fast.encode(text, add_special_tokens=False, split_special_tokens=True) == reference.encode(text)
    assert fast.encode(text, add_special_tokens=False)[0] == 1  # parsed by default, as the original does
    assert (
        fast.encode(text, truncation=True, max_length=3)
        == fast(text, truncation=True, max_length=3)["input_ids"]
    )
    fast([text, text], truncation=True, max_length=2)
    assert fast.backend_tokenizer.truncation is not None
    assert fast.encode(text, add_special_tokens=False) == fast(text, add_special_tokens=False)["input_ids"]
    assert fast.encode(text, return_tensors="pt").shape[0] == 1


def test_small_trained_tokenizer_fast_equals_sentencepiece(tmp_path):
    # `baichuan init`'s tokenizer: only `<reserved_i>` are symbols, so digits, byte-piece spellings and the
    # control pieces can stand alone between them.
    from baichuan.scaffold import tokenizer_model

    path = tmp_path / "tokenizer.model"
    path.write_bytes(tokenizer_model())
    fast = BaichuanTokenizerFast(vocab_file=str(path), add_bos_token=False)
    reference = spm.SentencePieceProcessor(model_file=str(path))
    texts = [*HARD_TEXTS, "<reserved_0><0x41>", "<reserved_1><s><reserved_2></s> <unk>", "<reserved_9>123"]
    texts += list(corpus_texts(per_file=40))
    wrong = [
        t
        for t in texts
        if fast.encode(t, add_special_tokens=False, split_special_tokens=True) != reference.encode(t)
    ]
    assert wrong == []
    ids = fast(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert [i for i, t in zip(ids, texts, strict=True) if fast.decode(i) != reference.decode(i)] == []


def test_every_normal_piece_encodes_to_itself():
    # The fast tokenizer looks a whole stretch between user-defined symbols up in the vocabulary before merging
    # (ignore_merges), which is only right if sentencepiece's BPE also ends in that one piece.
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_path("tokenizer.model").read_bytes())
    proto.normalizer_spec.Clear()
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    normal = [(i, piece.piece) for i, piece in enumerate(proto.pieces) if piece.type == 1]
    assert len(normal) == 63_351
    assert [i for i, piece in normal if bare.encode(piece) != [i]] == []


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("variant", CHAT_VARIANTS)
def test_official_checkpoint_tokenizers(cls, variant):
    tokenizer = cls.from_pretrained(checkpoint(variant))
    chat = json.loads(shared_path("oracle", "fixtures", variant, "reference.json").read_text())["chat"]
    # tokenizer_config.json: add_bos_token false, and special tokens as {"__type": "AddedToken", ...} dicts
    assert not tokenizer.add_bos_token and not tokenizer.add_eos_token
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.vocab_size == len(tokenizer) == chat["tokenizer"]["vocab_size"] == 512
    assert tokenizer.convert_ids_to_tokens([195, 196]) == [
        chat["tokenizer"]["piece_195"],
        chat["tokenizer"]["piece_196"],
    ]
    for text, ids in {**chat["tokenizer"]["encode_examples"], **chat["per_message_token_ids"]}.items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("cls", CLASSES)
def test_bos_and_eos_flags(cls):
    directory = checkpoint("baichuan2_7b")
    hello = cls.from_pretrained(directory).encode("Hello")
    assert cls.from_pretrained(directory, add_bos_token=True).encode("Hello") == [1, *hello]
    both = cls.from_pretrained(directory, add_bos_token=True, add_eos_token=True)
    assert both.encode("Hello") == [1, *hello, 2]
    pair = both("Hello", "Hello", return_special_tokens_mask=True)
    assert pair["input_ids"] == [1, *hello, 2, 1, *hello, 2]
    assert pair["special_tokens_mask"] == [1, *[0] * len(hello), 1, 1, *[0] * len(hello), 1]
    # Without a config the default is the original class's: add a BOS.
    assert cls(vocab_file=str(directory / "tokenizer.model")).encode("Hello") == [1, *hello]


@pytest.mark.parametrize("cls", CLASSES)
def test_decode_with_and_without_special_tokens(cls):
    tokenizer = cls(vocab_file=str(model_path("tokenizer.model")), add_bos_token=True, add_eos_token=True)
    ids = tokenizer.encode("你好㐁🌒")
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids[-8:]] == [
        "<0xE3>",
        "<0x90>",
        "<0x81>",
        "<0xF0>",
        "<0x9F>",
        "<0x8C>",
        "<0x92>",
        "</s>",
    ]
    assert tokenizer.decode(ids) == "<s>你好㐁🌒</s>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好㐁🌒"
    # The original put a stray space before a special token that follows text (" 你好</s>"); not copied.
    assert tokenizer.decode(ids[1:]) == "你好㐁🌒</s>"
    assert tokenizer.decode([[1, 9875], [9875, 2]]) == ["<s>你", "你</s>"]


def test_fast_and_slow_agree_on_added_tokens_and_batches():
    slow, fast = (cls.from_pretrained(checkpoint("baichuan2_13b")) for cls in CLASSES)
    for tokenizer in (slow, fast):
        tokenizer.add_tokens(["<|im_start|>"])
    text = "x<|im_start|>世界\n2023"
    assert slow.encode(text) == fast.encode(text) == [*slow.encode("x"), 512, *slow.encode("世界\n2023")]
    assert slow.decode(slow.encode(text)) == fast.decode(fast.encode(text)) == text
    batch = ["你好", "Hello, who are you?"]
    assert slow(batch, padding=True)["input_ids"] == fast(batch, padding=True)["input_ids"]
    assert fast(batch, padding=True)["input_ids"][0][-1] == fast.pad_token_id == 0


@pytest.mark.parametrize("saver", CLASSES)
def test_save_pretrained_round_trip(saver, tmp_path):
    saver.from_pretrained(checkpoint("baichuan1_13b")).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (
        checkpoint("baichuan1_13b") / "tokenizer.model"
    ).read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BaichuanTokenizer"
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)
    for cls in CLASSES:
        reloaded = cls.from_pretrained(tmp_path)
        assert not reloaded.add_bos_token
        assert reloaded.encode("Hello, who are you?") == [
            394,
            335,
            332,
            340,
            356,
            288,
            343,
            340,
            317,
            334,
            354,
            271,
            393,
        ]
        assert reloaded.model_max_length == 256


@pytest.mark.parametrize("cls", CLASSES)
def test_missing_tokenizer_model(cls, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no tokenizer.model"):
        cls.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        cls(vocab_file=str(tmp_path / "tokenizer.model"))


def test_text_only_copy_is_what_protobuf_writes():
    # baichuan/tokenizer.py edits the model on the protobuf wire format (it cannot rely on sentencepiece's
    # generated module, which accepts one protobuf release): the result must parse to the same model as
    # protobuf's own edit, every other piece and field untouched.
    for name, _ in MODEL_FILES:
        processor = spm.SentencePieceProcessor(model_file=str(model_path(name)))
        ids = {3, 5, 195, 196, processor.get_piece_size() - 1}
        edited, expected = model_pb2.ModelProto(), model_pb2.ModelProto()
        edited.ParseFromString(_as_control(processor.serialized_model_proto(), ids))
        expected.ParseFromString(processor.serialized_model_proto())
        for i in ids:
            expected.pieces[i].type = model_pb2.ModelProto.SentencePiece.CONTROL
        assert edited == expected, name


def main() -> None:
    """Agreement on the whole corpus, for both vocabulary files."""
    for name, _ in MODEL_FILES:
        path = str(model_path(name))
        slow = BaichuanTokenizer(vocab_file=path, add_bos_token=False)
        fast = BaichuanTokenizerFast(vocab_file=path, add_bos_token=False)
        counts = agreement(slow, fast, spm.SentencePieceProcessor(model_file=path), list(corpus_texts()))
        rates = {
            key: f"{value}/{counts['texts']} = {value / counts['texts']:.6f}" for key, value in counts.items()
        }
        print(name, json.dumps(rates, indent=1), file=sys.stdout)


if __name__ == "__main__":
    main()
