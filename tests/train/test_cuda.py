"""Training on CUDA (`pytest -m cuda`; platform skips without a GPU): QLoRA over bitsandbytes NF4 learns, and a
bf16 fine-tuning run gives losses close to the fp32 run on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train.test_finetune import base, data, run  # noqa: F401  (fixtures)

pytestmark = pytest.mark.cuda


def test_qlora_nf4_on_cuda_learns(tmp_path, base, data):  # noqa: F811
    curve = run(
        base, data, tmp_path, lora=True, quantize=4, max_steps=6, lr=2e-2, device="cuda", precision="bf16"
    )
    assert all(np.isfinite(curve)) and min(curve[-2:]) < curve[0]


def test_full_finetune_on_cuda_follows_the_cpu(tmp_path, base, data):  # noqa: F811
    cpu = run(base, data, tmp_path / "cpu", max_steps=4, lr=1e-3, device="cpu")
    gpu = run(base, data, tmp_path / "gpu", max_steps=4, lr=1e-3, device="cuda", precision="fp32")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3)
