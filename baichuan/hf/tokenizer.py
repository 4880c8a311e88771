"""The transformers face of the tokenizer: `BaichuanTokenizer` (sentencepiece) and `BaichuanTokenizerFast` (Rust).

`BaichuanTokenizer` behaves like the official `tokenization_baichuan.py`: it reads `add_bos_token` and
`add_eos_token` from tokenizer_config.json, its special tokens are `<unk>`, `<s>`, `</s>` (pad `<unk>`), and text
between special tokens is encoded by sentencepiece, which adds its dummy-prefix `▁` to each such stretch.
One bug is not copied: the original decode put a space before every special token that followed text
(`"你好</s>"` came back as `" 你好</s>"`); here both classes decode each stretch as sentencepiece does.

`BaichuanTokenizerFast` runs the same model in `tokenizers`, built from tokenizer.model by
`convert_sentencepiece`, and gives the same ids. transformers' own SpmConverter does not fit Baichuan-7B's model:
* SentencePiece matches user-defined symbols (`\\n`, `０`, `，`, `<reserved_102>`...) in the raw text before NFKC
  and then never merges them. As added tokens they would break the text into pieces that each get a dummy `▁`,
  so they are isolated after normalisation by a pre-tokenizer, and the normalisation rules that would rewrite a
  symbol (`\\n` -> space, `１` -> `1`) are dropped from the charsmap, which sentencepiece recompiles for us.
* The BPE merges are ordered by piece score, the order sentencepiece merges in.

Decoding does not go through the `tokenizers` decoder: its ByteFallback turns a run of byte pieces that is not
valid UTF-8 into one U+FFFD per byte, where sentencepiece replaces only the bytes that start no character
(`<0xA3><0x35>` is "\ufffd5", not "\ufffd\ufffd"). `PieceDecoder` decodes as sentencepiece does.

Encoding does not go through `tokenizers` either where it can be helped: with a tokenizer.model beside it, the
fast tokenizer encodes with our C++ encoder (`baichuan.native_bpe`), which is exactly sentencepiece and several
times faster than the `tokenizers` pipeline above. Added tokens (`<s>`, `</s>`, the role pieces, any the user
adds) are cut out of the text first, leftmost and longest first as the backend's added vocabulary does, and each
stretch between them is encoded on its own, dummy prefix included. Its offsets (`return_offsets_mapping`) are
sentencepiece's pieces' spans, in characters. `encode`, `tokenizer(text)` and batches (shared among the CPUs, or
RAYON_NUM_THREADS threads, one under TOKENIZERS_PARALLELISM=false, as for the backend) take it when the call
asks for nothing it does not give (a text pair, truncation, overflow, special-tokens masks, token type ids,
pre-split words); such calls, and tokenizers built from tokenizer.json alone or where the encoder cannot be
built, use the `tokenizers` backend, which gives the same ids (its offsets differ: the dummy-prefix `▁` counts
in the first piece's span there). Outputs of the native path carry no `tokenizers.Encoding`
(`BatchEncoding.word_ids()` and friends need `native=False`).

Chat content is never parsed for special tokens. `tokenizer(text)` and `encode` keep transformers' convention, as
the original does: `"<s>"`, `"</s>"` and the role pieces in the text become those tokens (the role pieces are
user-defined pieces of the real vocabularies, so even split_special_tokens=True keeps them, as sentencepiece
does). `encode_text` is the path for untrusted text, and `apply_chat_template(tokenize=True)` with our
template (the one installed on loading) returns `ChatFormat.template_ids`, whose message text goes through it: a message
spelling `"<reserved_102>"` is encoded as those characters, never as the user role token.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from transformers import BatchEncoding, SentencePieceBackend, TokenizersBackend
from transformers.tokenization_utils_base import TruncationStrategy
from transformers.utils import PaddingStrategy

from baichuan.native_bpe import Encoder, available_cpus
from baichuan.tokenizer import MODEL_FILE, Tokenizer

TOKENIZER_JSON = "tokenizer.json"
SPACE = "▁"
# How the native path cuts added tokens out of a text: the regex, their ids by text, and the search for any of
# their first characters.
_Cut = tuple[re.Pattern[str] | None, dict[str, int], Any]
_UNSET: Any = object()
# sentencepiece_model.proto: ModelProto.SentencePiece.Type, and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
BPE_MODEL = 2
REGEX_SPECIAL = set(r".^$*+?()[]{}|\/")
CLASS_SPECIAL = set("\\^-[]")  # special inside a character class
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")  # sentencepiece spells byte pieces "<0x%02X>"
# "surrogateescape" decodes each byte that starts no character to its own U+DC80..U+DCFF: all become U+FFFD.
ESCAPED_BYTES = {0xDC80 + byte: "\ufffd" for byte in range(128)}


def convert_sentencepiece(model_file: str | os.PathLike) -> RustTokenizer:
    """A `tokenizers.Tokenizer` giving the ids of `SentencePieceProcessor.encode` for a BPE tokenizer.model."""
    proto = _read_model_proto(model_file)
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    unsupported = {
        "a non-BPE model": trainer.model_type != BPE_MODEL,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
        "escape_whitespaces off": not spec.escape_whitespaces,
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, found in unsupported.items() if found)
        raise NotImplementedError(f"{model_file}: cannot convert a sentencepiece model with {names}")

    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    symbols = [piece.piece for piece in proto.pieces if piece.type == USER_DEFINED]
    # ignore_merges: a word is first looked up whole, which is how an isolated symbol becomes its piece (symbols
    # are never merged from smaller pieces). A word that is itself a normal piece is what sentencepiece makes of
    # it too, for nearly every piece; the words for which the lookup would be wrong (a control, unknown or byte
    # piece, or one of the rare normal pieces sentencepiece spells otherwise) are split by `_spell_out`.
    model = BPE(
        vocab,
        _merges_by_score(proto),
        unk_token=trainer.unk_piece,
        fuse_unk=True,
        byte_fallback=trainer.byte_fallback,
        ignore_merges=bool(symbols),
    )
    tokenizer = RustTokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(_normalizer_steps(spec, symbols))
    steps = []
    if symbols:
        steps.append(pre_tokenizers.Split(Regex(_longest_first(symbols)), behavior="isolated"))
    if not any(SPACE in piece.piece[1:] or " " in piece.piece for piece in proto.pieces):
        # No piece holds a `▁` after its first character, so no merge ever joins the text before a `▁` to the
        # `▁`: cutting before each `▁` changes no id. It gives the BPE short words, which its cache then serves
        # (English words repeat), instead of whole lines. (Metaspace's own replacement is a no-op here: the
        # normalizer has already made every space a `▁`.)
        steps.append(pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True))
    if symbols:
        steps.append(_spell_out(proto, symbols))
    steps = [step for step in steps if step is not None]
    if steps:
        tokenizer.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    specials = [piece.piece for piece in proto.pieces if piece.type in (UNKNOWN, CONTROL)]
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in specials])
    return tokenizer


class PieceDecoder:
    """`SentencePieceProcessor.decode` of ids with no control or unknown piece among them (those are special
    tokens, written verbatim between such stretches): `▁` is a space, the first piece loses its dummy-prefix
    `▁`, and a run of byte pieces is UTF-8 in which each byte that starts no valid character is U+FFFD.

    sentencepiece decodes a byte run one character at a time and, where none starts, writes U+FFFD for that
    one byte and goes on at the next (ProcessBytePieces in src/sentencepiece_processor.cc). Python's
    errors="replace" would give one U+FFFD for a whole truncated sequence (`E4 B8`), so each invalid byte is
    escaped on its own and then replaced. Other pieces are whole characters, so decoding the byte runs
    together with the text between them changes nothing: one `bytes.decode` does the whole stretch."""

    def __init__(self, pieces: Sequence[str], drop_dummy_prefix: bool):
        self.surfaces: list[bytes] = []
        prefixed = []
        for i, piece in enumerate(pieces):
            byte = BYTE_PIECE.fullmatch(piece)
            self.surfaces.append(bytes([int(byte[1], 16)]) if byte else piece.replace(SPACE, " ").encode())
            if drop_dummy_prefix and not byte and piece.startswith(SPACE):
                prefixed.append(i)
        # sentencepiece drops the `▁` of the first piece only; after a byte (text already written) it stays.
        self.prefixed = frozenset(prefixed)

    def __call__(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        if min(ids) < 0 or max(ids) >= len(self.surfaces):
            bad = next(i for i in ids if not 0 <= i < len(self.surfaces))
            raise IndexError(
                f"piece id {bad} is out of range (the vocabulary has {len(self.surfaces)} pieces)"
            )
        data = b"".join([self.surfaces[i] for i in ids])
        if ids[0] in self.prefixed:
            data = data[1:]  # the space that the first piece's `▁` became
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("utf-8", "surrogateescape").translate(ESCAPED_BYTES)


def _read_model_proto(model_file: str | os.PathLike) -> model_pb2.ModelProto:
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"no SentencePiece tokenizer model at {model_file}")
    proto = model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception as error:  # protobuf's DecodeError
            raise ValueError(f"{model_file} is not a valid SentencePiece model ({error})") from None
    return proto


def _merges_by_score(proto: model_pb2.ModelProto) -> list[tuple[str, str]]:
    # SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring normal piece; as a
    # ranked merge list that is every split of every normal piece into two normal pieces, best piece first.
    normal = {piece.piece: (-piece.score, i) for i, piece in enumerate(proto.pieces) if piece.type == NORMAL}
    ranked = []
    for piece, rank in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((rank, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _spell_out(proto: model_pb2.ModelProto, symbols: Sequence[str]) -> pre_tokenizers.Split | None:
    # With ignore_merges, a word that spells a control, unknown or byte piece (a literal "</s>" after "。",
    # encoded with split_special_tokens=True), or a normal piece that sentencepiece's BPE never forms whole, would
    # come out as that piece. Split exactly such words into the pieces sentencepiece spells them with.
    bare = model_pb2.ModelProto()
    bare.CopyFrom(proto)
    bare.normalizer_spec.Clear()
    bare.normalizer_spec.name = "identity"
    bare.normalizer_spec.add_dummy_prefix = False
    bare.normalizer_spec.remove_extra_whitespaces = False
    spelling = spm.SentencePieceProcessor(model_proto=bare.SerializeToString())
    holds_symbol = re.compile("|".join(map(re.escape, symbols))) if symbols else None
    candidates = [
        (i, piece.piece)
        for i, piece in enumerate(proto.pieces)
        # a word never holds a symbol
        if piece.type != USER_DEFINED and not (holds_symbol and holds_symbol.search(piece.piece))
    ]
    spelled = spelling.encode([piece for _, piece in candidates])
    first, later, starts = [], [], set()
    for (i, piece), ids in zip(candidates, spelled, strict=True):
        if ids == [i]:
            continue  # a normal piece that encodes to itself: the whole-word lookup is right
        parts = _piece_texts(spelling, ids)
        starts.add(piece[0])
        for k, part in enumerate(parts):
            # `part`, where the word so far is exactly `parts[:k]` and the rest exactly `parts[k + 1:]`.
            rest = f"{_escape(part)}(?={_escape(''.join(parts[k + 1 :]))}\\z)"
            if k == 0:
                first.append(rest)
            else:
                later.append(f"(?<=\\A{_escape(''.join(parts[:k]))}){rest}")
    if not first:
        return None
    # \G anchors every match where the last one ended (at the start of the word for the first), so the regex
    # engine tries one position per word, and a word not starting like such a piece fails on its first character
    # (an unanchored pattern would be tried at every character of the text).
    start_class = "[" + "".join(_escape(c, CLASS_SPECIAL) for c in sorted(starts)) + "]"
    pattern = f"\\G(?:\\A(?={start_class})(?:{'|'.join(first)})"
    if later:
        pattern += f"|(?!\\A)(?:{'|'.join(later)})"
    return pre_tokenizers.Split(Regex(pattern + ")"), behavior="isolated")


def _piece_texts(processor: spm.SentencePieceProcessor, ids: Sequence[int]) -> list[str]:
    # The text each piece covers; a run of byte pieces covers the characters it spells, which no vocabulary
    # piece matches, so the BPE spells them with the same bytes.
    texts, run = [], b""
    for i in ids:
        if processor.is_byte(i):
            run += bytes([int(processor.id_to_piece(i)[3:5], 16)])
            continue
        if run:
            texts, run = [*texts, run.decode()], b""
        texts.append(processor.id_to_piece(i))
    return texts + [run.decode()] if run else texts


def _longest_first(symbols: Sequence[str]) -> str:
    """A regex matching, at each position, the longest of `symbols` that starts there (sentencepiece's prefix
    matcher), written as a trie: the engine follows one branch per character instead of trying hundreds of
    literals in turn, and the symbols that are single characters form one character class."""
    trie: dict = {}
    for symbol in symbols:
        node = trie
        for char in symbol:
            node = node.setdefault(char, {})
        node[""] = {}  # the end of a symbol

    def branch(node: dict) -> str:
        leaves = sorted(c for c, child in node.items() if c and child.keys() == {""})
        deeper = [_escape(c) + branch(child) for c, child in sorted(node.items()) if c and c not in leaves]
        if len(leaves) > 1:
            deeper.append("[" + "".join(_escape(c, CLASS_SPECIAL) for c in leaves) + "]")
        else:
            deeper += [_escape(c) for c in leaves]
        if not deeper:
            return ""
        body = deeper[0] if len(deeper) == 1 else "(?:" + "|".join(deeper) + ")"
        # Children first, then ending here: a greedy optional group prefers the longer symbol.
        return f"(?:{body})?" if "" in node else body

    return branch(trie)


def _escape(text: str, special: Iterable[str] = REGEX_SPECIAL) -> str:
    return "".join("\\" + c if c in special else c for c in text)


def _normalizer_steps(spec: model_pb2.NormalizerSpec, symbols: Sequence[str]) -> list[normalizers.Normalizer]:
    steps = []
    if spec.precompiled_charsmap:
        rules = spm.SentencePieceNormalizer(normalizer_spec=spec).Decompile()
        # Where a user-defined symbol starts, sentencepiece takes the symbol verbatim before any rule applies.
        starts, first_chars = tuple(symbols), {symbol[0] for symbol in symbols}
        kept = [(src, dst) for src, dst in rules if not (src[0] in first_chars and src.startswith(starts))]
        compiled = model_pb2.NormalizerSpec()
        spm.set_min_log_level(2)  # the charsmap compiler logs its progress to stderr at INFO
        try:
            compiled.ParseFromString(spm.SentencePieceNormalizer(norm_map=kept).serialized_normalizer_spec())
        finally:
            spm.set_min_log_level(0)  # sentencepiece's default; it has no getter to restore from
        rule_of = dict(rules)
        if "\n" in symbols and "\r" in rule_of:
            # tokenizers' Precompiled rewrites a whole grapheme cluster by the rule of its first character, and
            # "\r\n" is one cluster: it would turn into a single space and lose the "\n" symbol.
            steps.append(normalizers.Replace("\r\n", rule_of["\r"] + "\n"))
        steps.append(normalizers.Precompiled(compiled.precompiled_charsmap))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return steps


def _as_special(token: str | AddedToken | None) -> AddedToken | None:
    # Official configs mark the special tokens normalized=True. Matched after normalisation, "<s>" would be looked
    # for as "▁<s>" (the dummy prefix) by the fast tokenizer; the slow one matches them in the raw text.
    return None if token is None else AddedToken(str(token), normalized=False, special=True)


class _BosEosFlagsInConfig:
    """transformers 5 neither saves `add_bos_token`/`add_eos_token` to tokenizer_config.json nor reads them when a
    tokenizer.json sits beside it. Baichuan's configs rely on `add_bos_token: false`, so keep them both ways."""

    add_bos_token: bool
    add_eos_token: bool

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> tuple[str, ...]:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for file in files:
            if str(file).endswith("tokenizer_config.json"):
                with open(file, encoding="utf-8") as f:
                    config = json.load(f)
                config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
                with open(file, "w", encoding="utf-8") as f:
                    f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files

    @classmethod
    def _from_pretrained(
        cls, resolved_vocab_files: dict[str, Any], name_or_path: Any, *args: Any, **kwargs: Any
    ):
        if not any(resolved_vocab_files.get(key) for key in cls.vocab_files_names):
            files = " or ".join(cls.vocab_files_names.values())
            raise FileNotFoundError(f"{name_or_path} has no {files}, which {cls.__name__} is loaded from")
        config_file = resolved_vocab_files.get("tokenizer_config_file")
        if config_file and resolved_vocab_files.get("tokenizer_file"):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            for key in ("add_bos_token", "add_eos_token"):
                if key in config:
                    kwargs.setdefault(key, config[key])
        tokenizer = super()._from_pretrained(resolved_vocab_files, name_or_path, *args, **kwargs)
        vocab = next(
            resolved_vocab_files[key] for key in cls.vocab_files_names if resolved_vocab_files.get(key)
        )
        install_chat_template(tokenizer, Path(vocab).parent)
        return tokenizer


def install_chat_template(tokenizer: Any, directory: Path) -> None:
    """Give a tokenizer the chat format of the checkpoint beside it (config.json and generation_config.json say
    which and name the role ids), as a `chat_template` unless it has one, with the role pieces made special
    tokens so that the template's text turns back into exactly those ids. The tokenizer keeps the formats behind
    our templates with these role ids: `apply_chat_template` with one of them builds the ids from its format
    (see `_ChatContent`), also where the template was saved with a tokenizer whose model config is elsewhere."""
    from baichuan.chat_format import BAICHUAN2, BAICHUAN_13B, jinja_template, load_chat_format

    try:
        chat_format = load_chat_format(directory)
    except (OSError, ValueError):  # a tokenizer without its model's config: the Baichuan2 format
        generation = directory / "generation_config.json"
        chat_format = BAICHUAN2.with_ids(json.loads(generation.read_text()) if generation.is_file() else None)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in (chat_format.user_id, chat_format.assistant_id)]
    if None in pieces:
        return  # role ids outside this vocabulary: no template can name them
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(p, normalized=False, special=True) for p in pieces]},
        replace_extra_special_tokens=False,
    )
    ids = dict(user_id=chat_format.user_id, assistant_id=chat_format.assistant_id, eos_id=chat_format.eos_id)
    formats = [replace(f, **ids) for f in (BAICHUAN2, BAICHUAN_13B)] + [chat_format]  # the checkpoint's wins
    tokenizer._chat_formats = {jinja_template(f, *pieces, str(tokenizer.eos_token)): f for f in formats}
    if tokenizer.chat_template is None:
        tokenizer.chat_template = jinja_template(chat_format, *pieces, str(tokenizer.eos_token))


class _ChatContent:
    """Chat content as text, for both tokenizer classes: `encode_text`, and `apply_chat_template` that builds
    the ids of our templates from their chat format instead of tokenizing the rendered text."""

    _chat_formats: dict[str, Any] = {}  # jinja template -> ChatFormat, set by install_chat_template
    _content_tokenizer: Tokenizer | None = None

    def encode_text(self, text: str, control_ids: Iterable[int] = ()) -> list[int]:
        """Ids of untrusted text, such as a chat message: no BOS/EOS added, and text that spells a special token,
        a role piece or any of `control_ids` is encoded as ordinary text (`baichuan.tokenizer.Tokenizer.encode_text`,
        on the tokenizer.model this tokenizer was loaded from); other text gives the ids of `encode`."""
        forbidden = {*control_ids, *self.all_special_ids}
        if self._content_tokenizer is None:
            vocab_file = getattr(self, "vocab_file", None)
            if vocab_file and os.path.isfile(vocab_file):
                self._content_tokenizer = Tokenizer(vocab_file)
        if self._content_tokenizer is not None:
            return self._content_tokenizer.encode_text(text, forbidden)
        # A fast tokenizer read from tokenizer.json alone: no sentencepiece model to spell such text with.
        ids = self.encode(text, add_special_tokens=False)
        if forbidden.intersection(ids):
            raise ValueError(
                f"{text[:80]!r} spells a special or role token, which this tokenizer can encode as text only "
                f"with the {MODEL_FILE} beside its {TOKENIZER_JSON}"
            )
        return ids

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `apply_chat_template`; with tokenize=True and one of our templates, the ids are
        `ChatFormat.template_ids` (message text through `encode_text`), which are those of the rendered text for
        messages that spell no special or role token. The rendered text (tokenize=False) cannot tell a role
        piece a message spells from the template's own: tokenize it again only for trusted messages."""
        base = super().apply_chat_template  # type: ignore[misc]
        arguments = inspect.signature(base).bind(conversation, *args, **kwargs)
        arguments.apply_defaults()
        a = arguments.arguments
        if not a["tokenize"]:
            return base(conversation, *args, **kwargs)
        chat_format = self._chat_formats.get(self.get_chat_template(a["chat_template"], a["tools"]))
        if chat_format is None:  # a template of the user's: transformers' behaviour
            return base(conversation, *args, **kwargs)
        if a["continue_final_message"] and a["add_generation_prompt"]:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        if a["return_assistant_tokens_mask"]:
            raise NotImplementedError(
                "the Baichuan chat template marks no assistant spans ({% generation %})"
            )
        if not conversation:
            raise ValueError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        conversations = conversation if batched else [conversation]
        rows = [
            chat_format.template_ids(
                self,
                _plain_messages(getattr(c, "messages", c)),
                bool(a["add_generation_prompt"]),
                bool(a["continue_final_message"]),
            )
            for c in conversations
        ]
        max_length = a["max_length"]
        if a["truncation"]:
            limit = max_length or self.model_max_length
            rows = [row[:limit] if self.truncation_side == "right" else row[-limit:] for row in rows]
        if not batched and not a["return_tensors"]:
            rows = rows[0]  # a tensor keeps its batch axis, as the tokenized text does
        encoded = {"input_ids": rows, "attention_mask": _ones_like(rows)}
        out = self.pad(
            encoded, padding=a["padding"], max_length=max_length, return_tensors=a["return_tensors"]
        )
        return out if a["return_dict"] else out["input_ids"]


def _threads() -> int:
    # The backend's switches for its threads (TOKENIZERS_PARALLELISM, RAYON_NUM_THREADS), honoured for ours too.
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("false", "0", "off", "no"):
        return 1
    rayon = os.environ.get("RAYON_NUM_THREADS", "")
    return int(rayon) if rayon.isdigit() and int(rayon) > 0 else available_cpus()


def _plain_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    plain = []
    for i, message in enumerate(messages):
        message = dict(message)
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(
                f"message {i}: the Baichuan chat template takes text content, got {type(content)}"
            )
        plain.append({"role": message["role"], "content": content})
    return plain


def _ones_like(rows: list[Any]) -> list[Any]:
    return [_ones_like(row) if isinstance(row, list) else 1 for row in rows]


class BaichuanTokenizer(_ChatContent, _BosEosFlagsInConfig, SentencePieceBackend):
    """The official Baichuan slow tokenizer: sentencepiece encodes, special tokens are parsed from the text."""

    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        if vocab_file is None:
            raise FileNotFoundError(f"BaichuanTokenizer needs vocab_file, the path of a {MODEL_FILE}")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no SentencePiece tokenizer model at {vocab_file}")
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:  # special and added tokens are not sentencepiece pieces
                text += [self.sp_model.decode(run), token]
                run = []
            else:
                run.append(token)
        text.append(self.sp_model.decode(run))
        return "".join(text)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            ids += bos + token_ids_1 + eos
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        first = len(self.build_inputs_with_special_tokens(token_ids_0))
        second = len(self.build_inputs_with_special_tokens(token_ids_1)) if token_ids_1 is not None else 0
        return [0] * first + [1] * second


class BaichuanTokenizerFast(_ChatContent, _BosEosFlagsInConfig, TokenizersBackend):
    """`BaichuanTokenizer` in `tokenizers`: the same ids, built from tokenizer.model or read from tokenizer.json."""

    vocab_files_names = {"vocab_file": MODEL_FILE, "tokenizer_file": TOKENIZER_JSON}
    slow_tokenizer_class = BaichuanTokenizer
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_file: str | None = None,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        native: bool = True,
        **kwargs: Any,
    ):
        if tokenizer_file is None or not os.path.isfile(tokenizer_file):
            tokenizer_file = None
            if kwargs.get("tokenizer_object") is None:
                if vocab_file is None:
                    raise FileNotFoundError(
                        f"BaichuanTokenizerFast needs a {MODEL_FILE} or a {TOKENIZER_JSON}"
                    )
                kwargs["tokenizer_object"] = convert_sentencepiece(vocab_file)
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_file=tokenizer_file,
            unk_token=_as_special(unk_token),
            bos_token=_as_special(bos_token),
            eos_token=_as_special(eos_token),
            pad_token=_as_special(pad_token),
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        pieces = [""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            pieces[i] = piece
        # Whether the first piece's `▁` is dropped is the backend decoder's rule (its Strip step, there when
        # the model adds a dummy prefix): ask it, which also covers a tokenizer.json not written here.
        decoder = self._tokenizer.decoder
        drop_dummy_prefix = decoder is not None and decoder.decode([SPACE + "a"]) == "a"
        self._decode_pieces = PieceDecoder(pieces, drop_dummy_prefix)
        # The C++ encoder of the tokenizer.model this was built from (None: the backend encodes).
        self._native: Encoder | None = None
        self._native_cuts: dict[bool, _Cut | None] = {}
        if native and vocab_file and os.path.isfile(vocab_file):
            with open(vocab_file, "rb") as f:
                self._native = Encoder.create(f.read())

    def _added_token_cut(self, split_special_tokens: bool) -> _Cut | None:
        """The regex that cuts the added tokens out of a text (None: there are none to cut), their ids and their
        first characters, or None where the native path cannot encode as the backend does (an added token with
        lstrip, rstrip, single_word or normalized set)."""
        if split_special_tokens not in self._native_cuts:
            added = self._tokenizer.get_added_tokens_decoder()
            plain = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added.values())
            cut = None
            if plain:
                # split_special_tokens=True leaves special tokens in the text, as the backend does.
                ids = {t.content: i for i, t in added.items() if not (split_special_tokens and t.special)}
                # An alternation tries its branches in order: longest first gives the leftmost-longest match.
                pattern = "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True))
                firsts = "".join(sorted({re.escape(t[0]) for t in ids if t}))
                cut = (
                    re.compile(pattern) if ids else None,
                    ids,
                    re.compile(f"[{firsts}]").search if firsts else None,
                )
            self._native_cuts[split_special_tokens] = cut
        return self._native_cuts[split_special_tokens]

    def _native_stretches(self, text: str, split_special_tokens: bool) -> list[str | tuple[int, int]] | None:
        """`text` as the stretches to encode, with the (id, length) of each added token between them; None where
        the native path does not apply."""
        cut = self._added_token_cut(split_special_tokens)
        if cut is None:
            return None
        pattern, ids, holds_first = cut
        if pattern is None or holds_first(text) is None:  # much faster than the whole pattern
            return [text] if text else []
        parts: list[str | tuple[int, int]] = []
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                parts.append(text[at : match.start()])
            parts.append((ids[match.group()], match.end() - match.start()))
            at = match.end()
        if at < len(text):
            parts.append(text[at:])
        return parts

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one text (BOS and EOS, as the flags say)."""
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        return bos, eos

    def _native_batch(
        self, texts: Sequence[str], add_special_tokens: bool, split_special_tokens: bool, offsets: bool
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]]] | None:
        """Ids (and character offsets) of each text through the C++ encoder; None where it does not apply."""
        encoder = self._native
        if encoder is None:
            return None
        split = [self._native_stretches(text, split_special_tokens) for text in texts]
        if any(parts is None for parts in split):
            return None
        bos, eos = self._special_tokens() if add_special_tokens else ([], [])
        all_ids: list[list[int]] = []
        all_offsets: list[list[tuple[int, int]]] = []
        if offsets:
            for parts in split:
                ids, spans, at = list(bos), [(0, 0)] * len(bos), 0
                for part in parts or ():
                    if isinstance(part, tuple):  # an added token: its own text
                        ids.append(part[0])
                        spans.append((at, at + part[1]))
                        at += part[1]
                        continue
                    part_ids, part_spans = encoder.encode_with_offsets(part)
                    ids += part_ids
                    spans += [(at + b, at + e) for b, e in part_spans]
                    at += len(part)
                all_ids.append(ids + eos)
                all_offsets.append(spans + [(0, 0)] * len(eos))
            return all_ids, all_offsets
        stretches = [part for parts in split for part in parts or () if isinstance(part, str)]
        threads = _threads() if len(stretches) > 1 else 1
        encoded = iter(
            encoder.encode_batch(stretches, threads) if threads > 1 else map(encoder.encode, stretches)
        )
        for parts in split:
            ids = list(bos)
            for part in parts or ():
                if isinstance(part, tuple):
                    ids.append(part[0])
                else:
                    ids += next(encoded)
            all_ids.append(ids + eos if eos else ids)
        return all_ids, all_offsets

    def _add_tokens(self, new_tokens: list[str | AddedToken], special_tokens: bool = False) -> int:
        # A token matched after normalisation would be looked for with the dummy-prefix `▁` in front of it; match
        # new tokens in the raw text, as the slow tokenizer does.
        new_tokens = [
            AddedToken(t, normalized=False, special=special_tokens) if isinstance(t, str) else t
            for t in new_tokens
        ]
        self._native_cuts = {}  # the added tokens change: cut anew
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def encode(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding: Any = False,
        truncation: Any = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: Any = None,
        **kwargs: Any,
    ) -> Any:
        # One text with no option is the common call (data preparation, the server). transformers turns it into a
        # batch of one, asks the backend for offsets and token strings, and builds a BatchEncoding only to return
        # its ids: more work than encoding a line. Here the C++ encoder (without it, the backend) encodes it
        # without offsets, with the settings transformers would use (no truncation or padding, special tokens
        # split or not), so the ids are the same. Any other call (or, for the backend, one left with truncation
        # or padding set) takes the usual path.
        native = self._native
        if (
            native is not None
            and isinstance(text, str)
            and text_pair is None
            and padding is False
            and truncation is None
            and max_length is None
            and not stride
            and return_tensors is None
            and kwargs.keys() <= {"split_special_tokens"}
        ):
            # The C++ encoder: what transformers' path gives with no truncation or padding, whatever the backend
            # was left with by an earlier call.
            split = bool(kwargs.get("split_special_tokens", self.split_special_tokens))
            cut = self._native_cuts.get(split, _UNSET)
            if cut is _UNSET:
                cut = self._added_token_cut(split)
            if cut is not None:
                if cut[0] is None or cut[2](text) is None:  # no added token in the text: one C call
                    ids = native.encode(text)
                    if add_special_tokens and (self.add_bos_token or self.add_eos_token):
                        bos, eos = self._special_tokens()
                        ids = bos + ids + eos
                else:
                    ids = self._native_batch([text], add_special_tokens, split, offsets=False)[0][0]  # type: ignore[index]
                if len(ids) > self.model_max_length:
                    self._eventual_warn_about_too_long_sequence(ids, None, True)
                return ids
        backend = self._tokenizer
        if (
            isinstance(text, str)
            and text_pair is None
            and padding is False
            and truncation is None
            and max_length is None
            and not stride
            and return_tensors is None
            and kwargs.keys() <= {"split_special_tokens"}
            and backend.truncation is None
            and backend.padding is None
        ):
            split = bool(kwargs.get("split_special_tokens", self.split_special_tokens))
            if backend.encode_special_tokens != split:
                backend.encode_special_tokens = split
            ids = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
            self._eventual_warn_about_too_long_sequence(ids, None, True)
            return ids
        return super().encode(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            stride=stride,
            padding_side=padding_side,
            return_tensors=return_tensors,
            **kwargs,
        )

    def _encode_plus(
        self,
        text: Any,
        text_pair: Any = None,
        add_special_tokens: bool = True,
        padding_strategy: Any = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: Any = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: Any = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        split_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        # `tokenizer(text)` and `tokenizer([texts])`: the C++ encoder, where the call asks only for ids,
        # attention masks, offsets, lengths, padding and tensors (see the module docstring).
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        # One text with tensors keeps its batch axis, as in the backend's path.
        batched = batched or return_tensors is not None
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        native = None
        if (
            self._native is not None
            and text_pair is None
            and not is_split_into_words
            and truncation_strategy == TruncationStrategy.DO_NOT_TRUNCATE
            and not (return_overflowing_tokens or return_special_tokens_mask or return_token_type_ids)
            and not kwargs
            and all(isinstance(t, str) for t in texts)
        ):
            native = self._native_batch(
                texts, add_special_tokens, bool(split_special_tokens), offsets=return_offsets_mapping
            )
        if native is None:
            return super()._encode_plus(
                text,
                text_pair=text_pair,
                add_special_tokens=add_special_tokens,
                padding_strategy=padding_strategy,
                truncation_strategy=truncation_strategy,
                max_length=max_length,
                stride=stride,
                is_split_into_words=is_split_into_words,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_tensors=return_tensors,
                return_token_type_ids=return_token_type_ids,
                return_attention_mask=return_attention_mask,
                return_overflowing_tokens=return_overflowing_tokens,
                return_special_tokens_mask=return_special_tokens_mask,
                return_offsets_mapping=return_offsets_mapping,
                return_length=return_length,
                verbose=verbose,
                split_special_tokens=split_special_tokens,
            )
        ids, offsets = native
        for row in ids:
            self._eventual_warn_about_too_long_sequence(row, max_length, verbose)
        encoded: dict[str, Any] = {"input_ids": ids}
        if not batched:
            encoded = {key: value[0] for key, value in encoded.items()}
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        padded = self.pad(
            encoded,
            padding=padding_strategy,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            verbose=verbose,
        )
        rows = padded["input_ids"] if batched else [padded["input_ids"]]
        if return_length:  # after padding, as the backend counts
            padded["length"] = [len(row) for row in rows]  # a list for one text too, as there
        if return_offsets_mapping:  # padding positions get (0, 0), as the backend gives them
            left = (padding_side or self.padding_side) == "left"
            offsets = [
                [(0, 0)] * (len(row) - len(spans)) + spans
                if left
                else spans + [(0, 0)] * (len(row) - len(spans))
                for row, spans in zip(rows, offsets, strict=True)
            ]
            padded["offset_mapping"] = offsets if batched else offsets[0]
        return BatchEncoding(dict(padded), tensor_type=return_tensors)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        # The base class would extract a vocabulary and merges for a generic converter; __init__ builds the
        # backend itself, from tokenizer.json when there is one, else from tokenizer.model.
        return kwargs

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        # Like the slow tokenizer: special tokens are dropped first when skipped, then each stretch between the
        # remaining special (or added) tokens is decoded on its own, as sentencepiece decodes it, which drops
        # the dummy-prefix space that encoding put after a special token.
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            skipped = set(self.all_special_ids)
            ids = [i for i in ids if i not in skipped]
        verbatim = self.added_tokens_decoder
        text, run = [], []
        for i in ids:
            if i in verbatim:
                text += [self._decode_pieces(run), verbatim[i].content]
                run = []
            else:
                run.append(i)
        text.append(self._decode_pieces(run))
        return "".join(text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # The base class runs the backend's decoder, whose ByteFallback differs from sentencepiece's.
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _save_pretrained(
        self, save_directory: str | os.PathLike, file_names: tuple[str, ...], *args: Any, **kwargs: Any
    ):
        # transformers 5 writes only tokenizer.json for a fast tokenizer; keep the official layout loadable by the
        # slow tokenizer and by the original code too.
        file_names = super()._save_pretrained(save_directory, file_names, *args, **kwargs)
        if self.can_save_slow_tokenizer:
            file_names += self.save_vocabulary(
                str(save_directory), filename_prefix=kwargs.get("filename_prefix")
            )
        return file_names
