"""Train a Baichuan-style SentencePiece tokenizer, and compare tokenizers side by side.

The settings are the Baichuan ones (Baichuan 2 report, section 2.2; the trainer_spec inside the released
tokenizer.model): BPE, digits split one by one, byte fallback for anything outside the vocabulary, no text
normalisation (identity), no dummy prefix, whitespace-only pieces allowed (for code indentation), pieces up to
32 characters. The special and reserved pieces sit where the released vocabulary has them: <unk> 0, <s> 1,
</s> 2, then the same 390 user-defined symbols at ids 3..392 (<SEP>, <CLS>, "\\n", "\\t", HTML tags, digits,
punctuation, <reserved_0>..<reserved_299>), so that the chat roles 195/196 are <reserved_102>/<reserved_103>
as in Baichuan-7B/13B and Baichuan2.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# ids 3..92 of the released Baichuan-7B vocabulary (../shared/data/baichuan-7b-tokenizer), then 300 reserved.
_TAGS = ["h2", "br", "strong", "h1", "p", "h5", "h3", "table", "li", "tr", "h4", "tbody", "img", "b", "td"]
BAICHUAN_SYMBOLS: tuple[str, ...] = (
    "<SEP>",
    "<CLS>",
    "\n",
    "\t",
    *(piece for tag in _TAGS for piece in (f"<{tag}>", f"<{tag}/>", f"</{tag}>")),
    *"0123456789",
    *"０１２３４５６７８９",
    *"，。！？、：￥.!?《》【】『』",
    "```",
    "<!--",
    "-->",
    "---",
    "<!DOCTYPE>",
    *(f"<reserved_{i}>" for i in range(300)),
)
USER_TOKEN_ID = 195  # <reserved_102>
ASSISTANT_TOKEN_ID = 196  # <reserved_103>
FIRST_SYMBOL_ID = 3  # after <unk>, <s>, </s>

TOKENIZER_CONFIG = {
    "tokenizer_class": "BaichuanTokenizer",
    "add_bos_token": False,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "clean_up_tokenization_spaces": False,
    "sp_model_kwargs": {},
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
# The Baichuan2-Chat generation_config.json values.
CHAT_GENERATION_CONFIG = {
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "user_token_id": USER_TOKEN_ID,
    "assistant_token_id": ASSISTANT_TOKEN_ID,
    "max_new_tokens": 2048,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.85,
    "repetition_penalty": 1.05,
    "do_sample": True,
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# sentencepiece drops longer sentences (its max_sentence_length flag, in bytes); we count them for the report.
MAX_SENTENCE_BYTES = 16_384


@dataclass
class TrainedTokenizer:
    model: bytes
    vocab_size: int
    sentences_seen: int  # lines offered to the trainer
    sentences_used: int  # lines it trained on: a uniform sample of input_sentence_size when there were more
    too_long: int  # lines over MAX_SENTENCE_BYTES, which sentencepiece skips


def sentencepiece_model(
    sentences: Iterable[str],
    vocab_size: int,
    symbols: Sequence[str] = BAICHUAN_SYMBOLS,
    max_piece_length: int = 32,
    character_coverage: float = 0.9999,
    input_sentence_size: int = 2_000_000,
    threads: int | None = None,
    seed: int = 0,
) -> TrainedTokenizer:
    """A Baichuan-style SentencePiece BPE model trained on `sentences` (empty ones skipped). Memory stays bounded: with more than `input_sentence_size` lines sentencepiece keeps
    a uniform reservoir sample of that many (0: all of them)."""
    import sentencepiece as spm

    counts = {"seen": 0, "too_long": 0}

    def lines() -> Iterator[str]:
        for line in sentences:
            if not line:
                continue
            counts["seen"] += 1
            if len(line.encode("utf-8", "surrogatepass")) > MAX_SENTENCE_BYTES:
                counts["too_long"] += 1
            yield line

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)  # the reservoir sample and shuffle are then reproducible
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        max_sentencepiece_length=max_piece_length,
        max_sentence_length=MAX_SENTENCE_BYTES,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=threads or os.cpu_count() or 1,
        user_defined_symbols=list(symbols),
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    data = model.getvalue()
    kept = counts["seen"] - counts["too_long"]
    used = min(kept, input_sentence_size) if input_sentence_size else kept
    size = spm.SentencePieceProcessor(model_proto=data).vocab_size()
    return TrainedTokenizer(data, size, counts["seen"], used, counts["too_long"])


def tokenizer_files(model: bytes, max_length: int = 4096) -> dict[str, bytes]:
    """The files of a tokenizer directory that BaichuanTokenizer and AutoTokenizer load."""
    return {
        "tokenizer.model": model,
        "tokenizer_config.json": _json(dict(TOKENIZER_CONFIG, model_max_length=max_length)),
        "special_tokens_map.json": _json(SPECIAL_TOKENS_MAP),
    }


def train_tokenizer(
    sentences: Iterable[str],
    vocab_size: int,
    out: str | os.PathLike,
    input_sentence_size: int = 2_000_000,
    threads: int | None = None,
    seed: int = 0,
) -> TrainedTokenizer:
    """Train with the Baichuan settings and write a tokenizer directory (tokenizer.model, tokenizer_config.json,
    special_tokens_map.json) to `out`."""
    trained = sentencepiece_model(
        sentences, vocab_size, input_sentence_size=input_sentence_size, threads=threads, seed=seed
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in tokenizer_files(trained.model).items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, out / name)
    return trained


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


# --- comparing tokenizers ---------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN = re.compile(r"[A-Za-z]")


def language(line: str) -> str | None:
    """'zh' when at least half of the line's non-space characters are CJK ideographs, 'en' when at least half
    are ASCII letters, else None (digits, code, other scripts: counted only in bytes/token and speed)."""
    visible = sum(not c.isspace() for c in line)
    if not visible:
        return None
    if len(_CJK.findall(line)) * 2 >= visible:
        return "zh"
    if len(_LATIN.findall(line)) * 2 >= visible:
        return "en"
    return None


def load_encoder(path: str | os.PathLike) -> Callable[[list[str]], list[list[int]]]:
    """A batch encoder (no BOS/EOS) for a SentencePiece model, a `tokenizers` tokenizer.json, or a directory
    holding either (tokenizer.model preferred, as BaichuanTokenizer reads it)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        elif (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            raise FileNotFoundError(f"{path}: neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}")
    if path.suffix == ".json":
        from tokenizers import Tokenizer as RustTokenizer

        rust = RustTokenizer.from_file(str(path))
        return lambda lines: [e.ids for e in rust.encode_batch(lines, add_special_tokens=False)]
    from baichuan.tokenizer import load_sentencepiece

    sp = load_sentencepiece(path)
    return lambda lines: sp.encode(lines)


@dataclass
class TokenizerStats:
    zh_tokens_per_char: float
    en_tokens_per_char: float
    bytes_per_token: float
    mb_per_s: float
    tokens_per_s: float
    zh_chars: int
    en_chars: int


def tokenizer_stats(encode: Callable[[list[str]], list[list[int]]], lines: list[str]) -> TokenizerStats:
    """Tokens per character over the Chinese lines and over the English lines (see `language`; characters are
    Unicode code points, spaces included), UTF-8 bytes per token over all lines, and encode speed (one batch
    call over all lines, wall clock)."""
    start = time.perf_counter()
    encoded = encode(lines)
    seconds = time.perf_counter() - start
    tokens = {"zh": 0, "en": 0}
    chars = {"zh": 0, "en": 0}
    total_tokens = total_bytes = 0
    for line, ids in zip(lines, encoded, strict=True):
        total_tokens += len(ids)
        total_bytes += len(line.encode("utf-8", "surrogatepass"))
        lang = language(line)
        if lang is not None:
            tokens[lang] += len(ids)
            chars[lang] += len(line)
    nan = float("nan")
    return TokenizerStats(
        zh_tokens_per_char=tokens["zh"] / chars["zh"] if chars["zh"] else nan,
        en_tokens_per_char=tokens["en"] / chars["en"] if chars["en"] else nan,
        bytes_per_token=total_bytes / total_tokens if total_tokens else nan,
        mb_per_s=total_bytes / 1e6 / seconds if seconds else nan,
        tokens_per_s=total_tokens / seconds if seconds else nan,
        zh_chars=chars["zh"],
        en_chars=chars["en"],
    )
