"""The C++ BPE encoder (`baichuan.native_bpe`) against sentencepiece: ids and offsets on corpus lines and hard
strings, for the real Baichuan vocabulary, a fixture's, and those `baichuan init` and `train-tokenizer` write;
the model settings sentencepiece's BPE supports; batches and threads; role safety; the fallback."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from baichuan import native_bpe
from baichuan.tokenizer import Tokenizer
from tests.conftest import shared_path

NORMAL, UNUSED, CONTROL, USER_DEFINED, BYTE = 1, 5, 3, 4, 6
HARD_TEXTS = [
    "",
    " ",
    "   ",
    "a  b   c",
    "   leading and trailing   ",
    "\t\n\r\n",
    " \n x\t\ty ",
    "1234567890 3.14159 ０１２３ 2024年11月30日",
    "😊🙃 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd \u0e01\u0e34",  # emoji, astral and rare characters: byte fallback
    "\u0301",  # a lone combining mark
    "e\u0301 \u00e9 \ufb01 Ａｂｃ ＜reserved_102＞ ㍻ ﹏",  # NFKC rewrites these
    "<reserved_102>hi<reserved_103>",
    "<reserved_102<reserved_102>>",
    "<s></s><unk> <0x41> <SEP>",
    "<h1>title</h1>\n<br/>```python\n```",
    "，。！？、：￥《》【】『』---<!---->",
    "\x00\x01\x7f\u200b\u3000\u3000全角空格",
    "    def f(x):\n        return x * 2  # code",
    "天下大势，分久必合，合久必分。",
    "Mixed 中文 and English, 数字123与符号!?",
]


def corpus_lines(per_file: int) -> list[str]:
    """Up to `per_file` lines (line ends kept) or JSON strings of each file of ../shared/data/pretrain_corpus."""
    lines: list[str] = []
    for path in sorted(shared_path("data", "pretrain_corpus").rglob("*")):
        if path.suffix == ".txt":
            texts: Iterator[str] = iter(path.read_bytes().decode("utf-8").splitlines(keepends=True))
        elif path.suffix == ".json":
            texts = _strings(json.loads(path.read_text(encoding="utf-8")))
        else:
            continue
        lines += itertools.islice((t for t in texts if t), per_file)
    return lines


def _strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for child in node.values() if isinstance(node, dict) else node:
            yield from _strings(child)


def encoder(model: bytes) -> native_bpe.Encoder:
    built = native_bpe.Encoder.create(model)
    if built is None:
        pytest.skip(
            "the native tokenizer could not be built here (a C++ compiler and Python headers are needed)"
        )
    return built


def sentencepiece_offsets(processor: spm.SentencePieceProcessor, text: str) -> list[tuple[int, int]]:
    """sentencepiece's piece spans (UTF-8 byte offsets) as character offsets."""
    data = text.encode()
    chars = [len(data[:i].decode(errors="ignore")) for i in range(len(data) + 1)]
    return [(chars[p.begin], chars[p.end]) for p in processor.encode(text, return_type="proto").pieces]


def disagreements(model: bytes, texts: list[str]) -> list[str]:
    """The texts whose ids or offsets differ from sentencepiece's."""
    native = encoder(model)
    reference = spm.SentencePieceProcessor(model_proto=model)
    wrong = []
    for text in texts:
        ids, offsets = native.encode_with_offsets(text)
        expected = reference.encode(text)
        if (
            native.encode(text) != expected
            or ids != expected
            or offsets != sentencepiece_offsets(reference, text)
        ):
            wrong.append(text)
    return wrong


def real_model(name: str = "tokenizer.model") -> bytes:
    return shared_path("data", "baichuan-7b-tokenizer", name).read_bytes()


@pytest.fixture(scope="module")
def init_model() -> bytes:
    from baichuan.scaffold import tokenizer_model

    return tokenizer_model()


@pytest.fixture(scope="module")
def trained_model() -> bytes:
    # train-tokenizer's settings (identity normalisation, no dummy prefix, whitespace-only pieces such as
    # `▁▁▁▁`, split digits, byte fallback, Baichuan's symbols), on text other than init's.
    from baichuan.scaffold import sample_text
    from baichuan.train.tokenizer import sentencepiece_model

    return sentencepiece_model(sample_text(3000, seed=2), 4200, threads=1).model


def test_real_vocabulary_ids_and_offsets_equal_sentencepiece():
    texts = HARD_TEXTS + corpus_lines(per_file=600)
    assert len(texts) > 3000
    assert disagreements(real_model(), texts) == []


def test_llamacpp_vocabulary_and_fixture():
    texts = HARD_TEXTS + corpus_lines(per_file=100)
    assert disagreements(real_model("tokenizer-llamacpp.model"), texts) == []
    fixture = shared_path("oracle", "fixtures", "baichuan2_7b", "checkpoint", "tokenizer.model").read_bytes()
    assert disagreements(fixture, texts) == []


def test_init_and_train_tokenizer_vocabularies(init_model, trained_model):
    from baichuan.scaffold import sample_text

    texts = HARD_TEXTS + sample_text(300, seed=5) + ["<reserved_0><0x41>", "<reserved_9>123", "  \n    x"]
    texts += corpus_lines(per_file=60)
    for model in (init_model, trained_model):
        assert disagreements(model, texts) == []
    # The whitespace-only pieces hold `▁` after `▁`: words are still cut, before a `▁` after something else.
    assert encoder(trained_model).splits_words


def _set(path: str, value) -> Callable[[model_pb2.ModelProto], None]:
    def change(proto: model_pb2.ModelProto) -> None:
        spec, field = path.split(".")
        setattr(getattr(proto, spec), field, value)

    return change


def _typed(new_type: int, which: Callable[[model_pb2.ModelProto.SentencePiece], bool], share: float = 1.0):
    def change(proto: model_pb2.ModelProto) -> None:
        rng = random.Random(0)
        for piece in proto.pieces:
            if which(piece) and rng.random() < share:
                piece.type = new_type

    return change


def _no_byte_fallback(proto: model_pb2.ModelProto) -> None:
    proto.trainer_spec.byte_fallback = False
    kept = [piece for piece in proto.pieces if piece.type != BYTE]
    del proto.pieces[:]
    proto.pieces.extend(kept)


def _identity(proto: model_pb2.ModelProto) -> None:
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.precompiled_charsmap = b""


SETTINGS = {
    "no dummy prefix": _set("normalizer_spec.add_dummy_prefix", False),
    "remove_extra_whitespaces": _set("normalizer_spec.remove_extra_whitespaces", True),
    "treat_whitespace_as_suffix": _set("trainer_spec.treat_whitespace_as_suffix", True),
    "no escape_whitespaces": _set("normalizer_spec.escape_whitespaces", False),
    "identity normalisation": _identity,
    "no byte fallback (unknown runs merge)": _no_byte_fallback,
    # sentencepiece splits an unused piece back into the pair it was last found from
    "unused pieces": _typed(UNUSED, lambda p: p.type == NORMAL and len(p.piece) > 1, share=0.2),
    "role pieces as control (encode_text's copy)": _typed(
        CONTROL, lambda p: p.piece.startswith("<reserved_")
    ),
    # text spelling a control or unused single character is unknown (byte fallback), yet merges into longer pieces
    "characters as control": _typed(CONTROL, lambda p: p.type == NORMAL and len(p.piece) == 1, share=0.1),
    "characters as unused": _typed(UNUSED, lambda p: p.type == NORMAL and len(p.piece) == 1, share=0.1),
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_model_settings(setting):
    proto = model_pb2.ModelProto()
    proto.ParseFromString(real_model())
    SETTINGS[setting](proto)
    assert disagreements(proto.SerializeToString(), HARD_TEXTS + corpus_lines(per_file=40)) == []


def test_batches_equal_single_texts_on_any_number_of_threads():
    native = encoder(real_model())
    texts = HARD_TEXTS + corpus_lines(per_file=200)
    single = [native.encode(text) for text in texts]
    assert native.encode_batch(texts, threads=1) == single
    assert native.encode_batch(texts, threads=2) == single
    assert native.encode_batch(texts, threads=7) == single  # more threads than cores
    assert native.encode_batch(texts[:5], threads=100_000) == single[:5]  # capped
    assert native.encode_batch([], threads=2) == []
    assert native.encode_batch(("a", "b"), threads=2) == [native.encode("a"), native.encode("b")]
    with pytest.raises(TypeError):
        native.encode_batch(["a", 1], threads=2)


def test_the_core_tokenizer_encodes_natively():
    path = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    tokenizer, reference = Tokenizer(path), Tokenizer(path, native=False)
    if tokenizer._encoder is None:
        pytest.skip("the native tokenizer could not be built here")
    assert reference._encoder is None
    texts = HARD_TEXTS + corpus_lines(per_file=50)
    assert [tokenizer.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, threads=2) == reference.encode_batch(texts, threads=2)
    assert [tokenizer.encode_with_offsets(t) for t in texts] == [
        reference.encode_with_offsets(t) for t in texts
    ]


ROLE_TEXTS = [
    "<reserved_102>",
    "<reserved_103>",
    "user says <reserved_102> then <reserved_103>assistant",
    "＜reserved_102＞",  # NFKC makes this the role piece's spelling
    "<reserved_102<reserved_103>>",
    "<reserved_1020> <reserved_10> <reserved_102 > < reserved_103>",
    "</s><s><unk>",
]


def _near_misses(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    parts = [
        "<",
        ">",
        "＜",
        "＞",
        "reserved_",
        "102",
        "103",
        "192",
        "193",
        "_",
        " ",
        "\n",
        "你",
        "<s>",
        "</s>",
    ]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(count)]


@pytest.mark.parametrize("vocabulary", ["real", "init"])
def test_user_text_never_yields_role_or_special_ids(vocabulary, init_model, tmp_path):
    if vocabulary == "real":
        path = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    else:  # init's tokenizer: its 195/196 are <reserved_192>/<reserved_193>
        path = tmp_path / "tokenizer.model"
        path.write_bytes(init_model)
    tokenizer, reference = Tokenizer(path), Tokenizer(path, native=False)
    if tokenizer._encoder is None:
        pytest.skip("the native tokenizer could not be built here")
    roles = [195, 196]
    spelled = [tokenizer.id_to_piece(i) for i in roles]
    texts = ROLE_TEXTS + [f"x{spelled[0]}y{spelled[1]}z", *spelled] + _near_misses(0, 300)
    forbidden = {*roles, *tokenizer.special_ids}
    for text in texts:
        ids = tokenizer.encode_text(text, roles)
        assert not forbidden.intersection(ids), text
        assert ids == reference.encode_text(text, roles), text
    # `encode` keeps sentencepiece's convention: the role piece's spelling is the role piece.
    assert tokenizer.encode(spelled[0]) == reference.encode(spelled[0])
    assert roles[0] in tokenizer.encode(spelled[0])


def test_without_a_compiler_sentencepiece_encodes(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native_bpe.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="native tokenizer could not be built"):
            assert native_bpe.load() is None
        path = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
        tokenizer = Tokenizer(path)
        assert tokenizer._encoder is None
        assert tokenizer.encode("你好 world") == spm.SentencePieceProcessor(model_file=str(path)).encode(
            "你好 world"
        )
        assert tokenizer.encode_batch(["a", "b c"], threads=2) == [
            tokenizer.encode("a"),
            tokenizer.encode("b c"),
        ]
    finally:
        native_bpe.load.cache_clear()


def test_a_unigram_model_is_left_to_sentencepiece():
    proto = model_pb2.ModelProto()
    proto.ParseFromString(real_model())
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.UNIGRAM
    if native_bpe.load() is None:
        pytest.skip("the native tokenizer could not be built here")
    assert native_bpe.Encoder.create(proto.SerializeToString()) is None
    assert native_bpe.Encoder.create(b"\x0a\xff") is None  # not a model at all


def test_tokenizers_pickle_with_their_encoder():
    """A tokenizer goes to worker processes (DataLoader, datasets.map) by pickle: the encoder goes as its model."""
    import pickle

    path = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    tokenizer = Tokenizer(path)
    texts = [*HARD_TEXTS, *ROLE_TEXTS]
    expected = [tokenizer.encode(t) for t in texts], [tokenizer.encode_text(t, [195, 196]) for t in texts]
    copy = pickle.loads(pickle.dumps(tokenizer))
    if copy._encoder is None:
        pytest.skip("the native tokenizer could not be built here")
    assert ([copy.encode(t) for t in texts], [copy.encode_text(t, [195, 196]) for t in texts]) == expected
