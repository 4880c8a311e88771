"""The tokenizer trainer's Baichuan settings, its output directory, and tokenizer-stats."""

from __future__ import annotations

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from baichuan.train.tokenizer import language, load_encoder, tokenizer_stats, train_tokenizer
from tests.conftest import shared_path


def corpus_lines(n_zh: int = 300, n_en: int = 1500) -> list[str]:
    zh = shared_path("data", "pretrain_corpus", "zh_classic_novels", "三国演义.txt")
    en = shared_path("data", "pretrain_corpus", "tinyshakespeare", "input.txt")
    lines = zh.read_text(encoding="utf-8-sig").splitlines()[:n_zh] + en.read_text().splitlines()[:n_en]
    code = [f"        return f(x{i}) + {i}  # indented code" for i in range(60)]
    return [line for line in lines if line.strip()] + code + ["\tindent 3.14159"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    report = train_tokenizer(corpus_lines(), vocab_size=3000, out=out, input_sentence_size=800, threads=1)
    return out, report


def test_baichuan_settings(trained):
    out, report = trained
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == spec.BPE and spec.split_digits and spec.byte_fallback
    assert spec.allow_whitespace_only_pieces and spec.max_sentencepiece_length == 32
    assert norm.name == "identity" and not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert spec.input_sentence_size == 800 and report.sentences_used == 800 < report.sentences_seen
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert (sp.id_to_piece(195), sp.id_to_piece(196)) == ("<reserved_102>", "<reserved_103>")
    real = spm.SentencePieceProcessor(
        model_file=str(shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model"))
    )
    assert [sp.id_to_piece(i) for i in range(3, 393)] == [real.id_to_piece(i) for i in range(3, 393)]
    assert sp.encode("20231124", out_type=str) == list("20231124")  # digits split
    assert sp.encode("😀", out_type=str) == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback
    assert not sp.encode("hello", out_type=str)[0].startswith("▁")  # no dummy prefix
    assert (
        sp.decode(sp.encode("ＡＢＣ  x")) == "ＡＢＣ  x"
    )  # no normalisation: full-width and double spaces kept
    assert any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in range(sp.vocab_size()))


def test_directory_loads_with_the_tokenizer_classes(trained):
    from transformers import AutoTokenizer

    from baichuan.hf.tokenizer import BaichuanTokenizer, BaichuanTokenizerFast
    from baichuan.tokenizer import Tokenizer

    out, _ = trained
    text = "曹操 said: 12 ships"
    expected = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).encode(text)
    auto = AutoTokenizer.from_pretrained(out)
    assert type(auto) is BaichuanTokenizerFast
    for tokenizer in (auto, BaichuanTokenizer.from_pretrained(out)):
        assert tokenizer.encode(text, add_special_tokens=False) == expected
        assert tokenizer.decode(expected) == text
    assert Tokenizer(out / "tokenizer.model").encode(text) == expected


def test_language_of_a_line():
    assert language("滚滚长江东逝水，浪花淘尽英雄。") == "zh"
    assert language("To be, or not to be: that is the question.") == "en"
    assert language("12345 + 678 = 999") is None and language("   ") is None


def test_stats_compare_the_real_vocabulary(trained):
    out, _ = trained
    lines = corpus_lines(100, 200)
    real = tokenizer_stats(load_encoder(shared_path("data", "baichuan-7b-tokenizer")), lines)
    ours = tokenizer_stats(load_encoder(out), lines)
    assert real.zh_chars == ours.zh_chars > 1000 and real.en_chars == ours.en_chars > 1000
    # The real 64k vocabulary compresses both better than a 3k one trained on 2,000 lines.
    assert (
        real.zh_tokens_per_char < ours.zh_tokens_per_char
        and real.en_tokens_per_char < ours.en_tokens_per_char
    )
    assert 0.3 < real.zh_tokens_per_char < 1.2 and 0.1 < real.en_tokens_per_char < 0.5
    assert real.bytes_per_token > ours.bytes_per_token > 1 and ours.tokens_per_s > 0
