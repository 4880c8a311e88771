"""Tiny checkpoints for the conversion tests. llama.cpp gives a Baichuan model RoPE at 32 layers and ALiBi at
40, so the GGUF ones have those depths (at width 64/96 they are still small and fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baichuan.config import ALIBI, ROPE, Config
from baichuan.scaffold import init_checkpoint, tokenizer_model

# Row lengths are multiples of 32, the Q8_0/Q4_0 block; ALiBi has 12 heads, not a power of two (as 13B's 40).
LLAMA_CPP_SHAPES = {
    ROPE: dict(n_layers=32, dim=64, n_heads=4, ffn_dim=128),
    ALIBI: dict(n_layers=40, dim=96, n_heads=12, ffn_dim=128),
}
VARIANTS = [(ROPE, False), (ALIBI, False), (ROPE, True), (ALIBI, True)]
VARIANT_IDS = ["rope", "alibi", "rope-normhead", "alibi-normhead"]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """`baichuan init`'s small tokenizer (4,000 pieces), trained once."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(tokenizer_model(4000))
    return path


def llama_cpp_config(position: str, norm_head: bool) -> Config:
    return Config(
        vocab_size=4096, position=position, norm_head=norm_head, max_seq_len=128, **LLAMA_CPP_SHAPES[position]
    )


@pytest.fixture(scope="session", params=VARIANTS, ids=VARIANT_IDS)
def llama_cpp_model(request, tmp_path_factory, tokenizer_file) -> Path:
    """A random fp32 checkpoint of a shape llama.cpp runs with the model's own position encoding."""
    position, norm_head = request.param
    directory = tmp_path_factory.mktemp("model") / f"{position}-{norm_head}"
    seed = VARIANTS.index(request.param)
    return init_checkpoint(
        llama_cpp_config(position, norm_head),
        directory,
        dtype=torch.float32,
        seed=seed,
        tokenizer=tokenizer_file,
    )


def logits(directory: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from baichuan.checkpoint import load_model

    model = load_model(directory, dtype=dtype)
    with torch.no_grad():
        return model(ids).float()


def sample_ids(vocab: int = 4000, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
