"""Shared fixtures: tiny configs, and access to ../shared (skipped with a message where it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baichuan.config import ALIBI, ROPE, Config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ORACLE = SHARED / "oracle"
DATA = SHARED / "data"
VARIANTS = ("baichuan1_7b", "baichuan1_13b", "baichuan2_7b", "baichuan2_13b")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test where a fresh clone has no ../shared."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (reference data beside the repo) is not available here")
    return path


def tiny_config(position: str = ROPE, norm_head: bool = False, **overrides) -> Config:
    # 10 heads for ALiBi: not a power of two, like the real 13B's 40.
    heads = 10 if position == ALIBI else 4
    dim = 80 if position == ALIBI else 64
    base = Config(
        vocab_size=512,
        dim=dim,
        n_layers=2,
        n_heads=heads,
        ffn_dim=172,
        position=position,
        norm_head=norm_head,
        max_seq_len=256,
    )
    return base.replace(**overrides)


TINY_VARIANTS = [(ROPE, False), (ALIBI, False), (ROPE, True), (ALIBI, True)]
TINY_IDS = ["rope", "alibi", "rope-normhead", "alibi-normhead"]


@pytest.fixture(params=TINY_VARIANTS, ids=TINY_IDS)
def tiny(request) -> Config:
    position, norm_head = request.param
    return tiny_config(position, norm_head)
