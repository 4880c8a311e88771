"""Fixtures of the evaluation tests: a tiny random checkpoint with the real Baichuan vocabulary and a long enough
context for 5-shot prompts, and a runner over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import shared_path


def tiny_eval_checkpoint(directory: Path, preset_name: str = "baichuan2-7b") -> Path:
    """One decoder layer, dim 64, the real 64k vocabulary, 4,096 positions (5-shot C-Eval prompts run to ~2k)."""
    import torch

    from baichuan.config import preset
    from baichuan.scaffold import init_checkpoint

    tokenizer = shared_path("data", "baichuan-7b-tokenizer", "tokenizer.model")
    config = preset(preset_name).replace(
        n_layers=1, dim=64, n_heads=4, ffn_dim=128, vocab_size=64_000, max_seq_len=4096
    )
    return init_checkpoint(config, directory, dtype=torch.float32, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return shared_path("data")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_eval_checkpoint(tmp_path_factory.mktemp("eval-model") / "tiny")


@pytest.fixture(scope="session")
def loaded(checkpoint):
    from baichuan.runtime import load_for_inference

    return load_for_inference(checkpoint, "cpu", "fp32")


@pytest.fixture
def runner(loaded):
    from baichuan.eval.harness import Runner

    return Runner(loaded.model, loaded.tokenizer, loaded.chat_format, False, loaded.add_bos)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the models are tiny and the machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
