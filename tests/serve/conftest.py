"""The tiny Baichuan2 checkpoint the server tests share, loaded once per test module."""

from __future__ import annotations

import pytest

from baichuan.runtime import load_for_inference
from tests.serve import tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(tiny_checkpoint(tmp_path_factory), device="cpu", dtype="fp32")
