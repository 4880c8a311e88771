"""`baichuan init`: a randomly initialised checkpoint directory, with a tokenizer, in the official layout.

Used by tests, benchmarks and anyone pretraining from scratch. The tokenizer is either copied from a given
`tokenizer.model` or trained here (SentencePiece BPE with byte fallback and split digits, like the originals)
on a small built-in text sample, so that the directory is complete without downloading anything.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from baichuan.checkpoint import config_dict, save_checkpoint
from baichuan.config import Config
from baichuan.model import Baichuan, init_weights
from baichuan.train.tokenizer import (
    CHAT_GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    sentencepiece_model,
)

# Ids 3..392 of the real vocabulary are reserved user-defined symbols; 195/196 are the chat roles among them.
N_RESERVED = 390

_ENGLISH = """the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no what up out who them some could more into
time only new other may then two first any these like now my over such our man me even most made after also did many
before must through back years where much your way well down should because each just those people how too little
state good very make world still own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take three model language token
"""


def sample_text(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Mixed English/Chinese/digit/code lines for training a small tokenizer; deterministic."""
    zen = _ENGLISH.split()
    rng = random.Random(seed)
    common_cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    punctuation = "，。！？：；“”（）、"
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(rng.choice(zen) for _ in range(rng.randint(5, 20))))
        elif kind == 1:
            lines.append(
                "".join(rng.choice(common_cjk + list(punctuation)) for _ in range(rng.randint(8, 40)))
            )
        elif kind == 2:
            lines.append(f"{rng.randint(0, 10**6)} + {rng.randint(0, 999)} = {rng.random():.4f}")
        else:
            lines.append(f"    def f_{i}(x):\n        return x * {rng.randint(2, 9)}  # {rng.choice(zen)}")
    return lines


def train_tokenizer(path: str | os.PathLike, vocab_size: int = 4000, lines: list[str] | None = None) -> int:
    """Train a Baichuan-style SentencePiece BPE model at `path`; returns its vocabulary size."""
    model = tokenizer_model(vocab_size, lines)
    Path(path).write_bytes(model)
    return _vocab_size(model)


def tokenizer_model(vocab_size: int = 4000, lines: list[str] | None = None) -> bytes:
    """A Baichuan-style SentencePiece BPE model, trained on `lines` (default: `sample_text()`) by the trainer of
    `baichuan train-tokenizer`. Its reserved pieces are the 390 `<reserved_i>` at ids 3..392 (so 195/196 are
    `<reserved_192>`/`<reserved_193>`) and its pieces at most 16 characters long, as `init` always made them:
    the tests' tiny checkpoints keep their exact ids."""
    lines = lines if lines is not None else sample_text()
    reserved = [f"<reserved_{i}>" for i in range(N_RESERVED)]
    return sentencepiece_model(
        lines,
        vocab_size,
        symbols=reserved,
        max_piece_length=16,
        character_coverage=0.9995,
        input_sentence_size=0,
    ).model


def _vocab_size(model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model).vocab_size()


def random_weights(
    config: Config, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Randomly initialised weights, one block at a time, so even a 13B checkpoint is made in little memory."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Baichuan(config)
    blocks = [("model.embed_tokens", model.model.embed_tokens)]
    blocks += [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    blocks += [("model.norm", model.model.norm), ("lm_head", model.lm_head)]
    for prefix, block in blocks:
        block.to_empty(device="cpu")
        init_weights(block, generator=generator)
        for name, tensor in block.state_dict().items():
            yield f"{prefix}.{name}", tensor.to(dtype)
        block.to("meta")


def init_checkpoint(
    config: Config,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_vocab: int = 4000,
) -> Path:
    """Write config.json, generation_config.json, safetensors weights and tokenizer files to `directory`.

    They are written together, in place of any checkpoint there, as `save_checkpoint` does: a failed or killed
    init leaves the previous directory as it was."""
    if tokenizer is not None:
        tokenizer_bytes = Path(tokenizer).read_bytes()
    else:
        tokenizer_bytes = tokenizer_model(min(tokenizer_vocab, config.vocab_size))
        trained = _vocab_size(tokenizer_bytes)
        if trained > config.vocab_size:
            raise ValueError(
                f"tokenizer has {trained} pieces but the model vocabulary is {config.vocab_size}"
            )
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    files = {
        "tokenizer.model": tokenizer_bytes,
        "tokenizer_config.json": _json(dict(TOKENIZER_CONFIG, model_max_length=config.max_seq_len)),
        "special_tokens_map.json": _json(special),
        "generation_config.json": _json(CHAT_GENERATION_CONFIG),
    }
    save_checkpoint(directory, config_dict(config, dtype), random_weights(config, dtype, seed), files=files)
    return Path(directory)


def _json(value: dict) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()
