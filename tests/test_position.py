import json
import math

import numpy as np
import pytest
import torch

from baichuan.position import ALiBi, RoPE, alibi_slopes
from tests.conftest import shared_path


def test_alibi_slopes_for_40_heads():
    slopes = alibi_slopes(40)
    assert slopes[:32] == pytest.approx([2 ** (-(i + 1) / 4) for i in range(32)])
    assert slopes[32:] == pytest.approx([2 ** (-(2 * j + 1) / 8) for j in range(8)])


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_13b"])
def test_alibi_slopes_match_original_for_1_to_64_heads(variant):
    ref = json.loads(shared_path("oracle", "fixtures", variant, "reference.json").read_text())
    for n, expected in ref["alibi"]["slopes_n1_to_64"].items():
        assert alibi_slopes(int(n)) == pytest.approx(expected, rel=1e-12), n


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_13b"])
def test_alibi_bias_equals_original_mask_up_to_a_row_constant(variant):
    # The original adds slope*j (absolute); we add slope*(j-i). Softmax cannot tell them apart.
    ref = np.load(shared_path("oracle", "fixtures", variant, "reference.npz"))
    original = torch.tensor(ref["alibi_eval_mask_h10_s8"])  # (10, 8, 8), -inf above the diagonal
    ours = ALiBi(10).bias(torch.arange(8), 8)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    ours = ours.masked_fill(~causal, float("-inf"))
    assert torch.allclose(ours.softmax(-1), original.softmax(-1), atol=1e-6)
    # and its true relative form equals the train-mode mask of Baichuan2-13B exactly
    if variant == "baichuan2_13b":
        train = torch.tensor(ref["alibi_train_mask_h10_s8"])
        assert torch.allclose(ours[causal.expand(10, 8, 8)], train[causal.expand(10, 8, 8)], atol=1e-6)


def test_rope_rotation_is_relative():
    rope = RoPE(16)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(i, j):
        qi, _ = rope.rotate(q, q, torch.tensor([i]))
        _, kj = rope.rotate(k, k, torch.tensor([j]))
        return (qi * kj).sum()

    assert torch.allclose(score(5, 2), score(105, 102), atol=1e-5)


def test_rope_grows_past_max_seq_len_and_keeps_fp32():
    rope = RoPE(8, max_seq_len=4)
    q = torch.randn(1, 1, 10, 8, dtype=torch.bfloat16)
    q2, _ = rope.rotate(q, q, torch.arange(10))
    assert q2.dtype == torch.bfloat16
    assert rope._table[0].shape[0] >= 10 and rope._table[0].dtype == torch.float32
    # position 0 is the identity rotation
    assert torch.equal(q2[..., 0, :], q[..., 0, :])
    assert not math.isnan(q2.float().sum().item())
