"""`BaichuanTokenizerFast` on the C++ encoder: the same ids as its `tokenizers` backend for every call it takes
(encode, `tokenizer(text)`, batches, padding, tensors, added tokens), sentencepiece's offsets, and role safety."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from baichuan.hf.tokenizer import BaichuanTokenizerFast
from tests.conftest import shared_path
from tests.test_native_bpe import HARD_TEXTS, ROLE_TEXTS, corpus_lines, sentencepiece_offsets

SPECIAL_TEXTS = [
    "a <s> b",
    "<s>",
    "</s></s>x",
    "x<unk>y",
    "<reserved_102>hi<reserved_103>",
    " <s> ",
    "<0xC0>x",
]


def pair(path) -> tuple[BaichuanTokenizerFast, BaichuanTokenizerFast]:
    fast = BaichuanTokenizerFast(vocab_file=str(path), add_bos_token=False)
    if fast._native is None:
        pytest.skip("the native tokenizer could not be built here")
    backend = BaichuanTokenizerFast(vocab_file=str(path), add_bos_token=False, native=False)
    assert backend._native is None
    return fast, backend


@pytest.fixture(scope="module")
def real() -> tuple[BaichuanTokenizerFast, BaichuanTokenizerFast]:
    return pair(shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model"))


@pytest.mark.parametrize("add_bos", [False, True])
def test_encode_and_call_give_the_backends_ids(real, add_bos):
    fast, backend = real
    fast.add_bos_token = backend.add_bos_token = add_bos
    try:
        texts = HARD_TEXTS + SPECIAL_TEXTS + ROLE_TEXTS + corpus_lines(per_file=40)
        for options in ({}, {"add_special_tokens": False}, {"split_special_tokens": True}):
            assert [fast.encode(t, **options) for t in texts] == [backend.encode(t, **options) for t in texts]
            assert fast(texts, **options)["input_ids"] == backend(texts, **options)["input_ids"]
            assert fast(texts[7], **options) == backend(texts[7], **options)
    finally:
        fast.add_bos_token = backend.add_bos_token = False


def test_padding_tensors_and_lengths(real):
    fast, backend = real
    texts = ["你好", "a much longer line of text <s> with a special token", ""]
    for options in (
        {"padding": True, "return_tensors": "pt"},
        {"padding": "max_length", "max_length": 24, "padding_side": "left"},
        {"padding": True, "pad_to_multiple_of": 8, "return_length": True},
    ):
        ours, theirs = fast(texts, **options), backend(texts, **options)
        assert ours.keys() == theirs.keys()
        for key in ours:
            same = ours[key] == theirs[key]
            assert bool(same.all()) if isinstance(same, torch.Tensor) else same, (options, key)
    single = fast("你好", return_tensors="pt")["input_ids"]
    assert (
        single.shape == (1, 2)
        and single.tolist() == backend("你好", return_tensors="pt")["input_ids"].tolist()
    )


def test_offsets_are_sentencepieces(real):
    fast, _ = real
    reference = spm.SentencePieceProcessor(model_file=fast.vocab_file)
    texts = HARD_TEXTS + corpus_lines(per_file=30)
    encoded = fast(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        assert ids == reference.encode(text)
        assert offsets == sentencepiece_offsets(reference, text), text
    # Added tokens cover their own text; BOS covers nothing; padding (0, 0).
    fast.add_bos_token = True
    try:
        out = fast(["a<s>b", "abc def"], return_offsets_mapping=True, padding=True)
    finally:
        fast.add_bos_token = False
    assert out["offset_mapping"][0] == [(0, 0), (0, 1), (1, 4), (4, 5), (0, 0)][: len(out["input_ids"][0])]
    assert out["offset_mapping"][1][0] == (0, 0)


def test_added_tokens_are_cut_out_after_adding_more(real, tmp_path):
    path = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    fast, backend = pair(path)
    for tokenizer in (fast, backend):
        tokenizer.add_tokens(["<tool>", "<tool_call>"])
    texts = ["a<tool_call>b<tool>c", "<tool><tool_call>", "x <tool> y"]
    assert [fast.encode(t) for t in texts] == [backend.encode(t) for t in texts]
    # An added token with lstrip: the backend's path, whose ids stay right.
    from tokenizers import AddedToken

    fast.add_tokens([AddedToken("<gap>", lstrip=True, normalized=False)])
    backend.add_tokens([AddedToken("<gap>", lstrip=True, normalized=False)])
    assert fast._added_token_cut(False) is None
    assert fast.encode("a   <gap> b") == backend.encode("a   <gap> b")


def test_chat_content_never_becomes_a_role_token(real):
    fast, _ = real
    for text in ROLE_TEXTS:
        ids = fast.encode_text(text, [195, 196])
        assert not {195, 196, 0, 1, 2}.intersection(ids), text
        assert fast.decode(ids) == text.replace("＜", "<").replace("＞", ">")


def test_init_tokenizer_through_autotokenizer(tmp_path):
    """`baichuan init`'s tokenizer directory, loaded as transformers users do."""
    import transformers

    import baichuan  # noqa: F401  (registers the Auto classes)
    from baichuan.scaffold import tokenizer_model
    from baichuan.train.tokenizer import tokenizer_files

    for name, content in tokenizer_files(tokenizer_model()).items():
        (tmp_path / name).write_bytes(content)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path)
    backend = transformers.AutoTokenizer.from_pretrained(tmp_path, native=False)
    assert isinstance(fast, BaichuanTokenizerFast) and fast._native is not None
    texts = HARD_TEXTS + SPECIAL_TEXTS + corpus_lines(per_file=20)
    assert [fast.encode(t) for t in texts] == [backend.encode(t) for t in texts]
    assert fast(texts)["input_ids"] == backend(texts)["input_ids"]


def test_pickled_fast_tokenizer_encodes_natively(real):
    import pickle

    fast, backend = real
    copy = pickle.loads(pickle.dumps(fast))
    assert copy._native is not None
    texts = HARD_TEXTS + SPECIAL_TEXTS
    assert [copy.encode(t) for t in texts] == [backend.encode(t) for t in texts]
