"""Prompts' causal attention on AMX tiles (`cpu_gemv.causal_attention`, csrc/cpu_attention_amx.cpp) against float64
attention over the same bf16 q, k, v, where this CPU has AMX-BF16; and where the model takes it, on any CPU.

The scores are exact products of bf16 values summed in fp32; softmax's numerators are rounded to bf16 (as torch's
flash kernel rounds them) and the output once more: each output within about two bf16 steps of the values it
averages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baichuan import cpu, cpu_gemv
from baichuan.kv_cache import KVCache
from baichuan.model import Baichuan
from tests.conftest import kernel_build, on_one_thread, require_cpu_kernels, tiny_config


def qkv(B: int, H: int, T: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of one (B, T, 3, H, D) product, as the model's W_pack gives them (rows 3 * H * D values apart)."""
    generator = torch.Generator().manual_seed(seed)
    packed = (torch.randn(B, T, 3, H, D, generator=generator) * 2).bfloat16()
    q, k, v = packed.permute(2, 0, 3, 1, 4)
    return q, k, v


def assert_close_to_exact(y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    B, H, T, D = q.shape
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    exact = exact.transpose(1, 2).reshape(B, T, H * D)
    # each weight rounded to bf16 moves the average by up to 2^-8 of the values' size, the output by 2^-8 of its own
    size = v.double().abs().amax(dim=(2, 3)).repeat_interleave(D, dim=1)[:, None, :]  # (B, 1, H * D) per head
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= exact.abs() * 2.0**-8 + size * 2.0**-7).all()


# T around the 32-query blocks (a last block partly past T), one query, a long prompt; head sizes of one and of
# several 32-value steps; several batch rows and heads.
@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 100, 300])
@pytest.mark.parametrize(("B", "H", "D"), [(1, 1, 32), (2, 3, 64), (1, 2, 128)], ids=str)
def test_matches_exact_attention(amx, B, H, T, D):
    q, k, v = qkv(B, H, T, D, seed=T + D)
    assert_close_to_exact(amx.amx_causal_attention(q, k, v), q, k, v)


def test_keys_and_values_from_a_cache(amx):
    """The model passes a cache's slices: heads max_seq_len rows apart, rows D apart."""
    q, k, v = qkv(1, 4, 70, 64, seed=5)
    cache = KVCache(1, 1, 4, 128, 64, torch.bfloat16)
    keys, values = cache.update(0, 0, k, v)
    assert keys.stride(1) == 128 * 64 and not keys.is_contiguous()
    assert torch.equal(amx.amx_causal_attention(q, keys, values), amx.amx_causal_attention(q, k, v))
    assert_close_to_exact(amx.amx_causal_attention(q.contiguous(), keys, values), q, k, v)


def test_the_bits_do_not_depend_on_the_threads(amx):
    q, k, v = qkv(1, 3, 90, 64, seed=7)
    assert torch.equal(
        on_one_thread(lambda: amx.amx_causal_attention(q, k, v)), amx.amx_causal_attention(q, k, v)
    )


def test_large_scores_stay_finite(amx):
    """Softmax subtracts each row's largest score first: scores in the thousands do not overflow."""
    q, k, v = qkv(1, 2, 50, 32, seed=9)
    q = (q.float() * 40).bfloat16()
    y = amx.amx_causal_attention(q, k, v)
    assert torch.isfinite(y).all()
    assert_close_to_exact(y, q, k, v)


@pytest.mark.parametrize(
    ("q", "k", "message"),
    [
        (torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32), "bf16"),
        (torch.zeros(1, 2, 8, 48).bfloat16(), torch.zeros(1, 2, 8, 48).bfloat16(), "multiple of 32"),
        (torch.zeros(1, 2, 8, 32).bfloat16(), torch.zeros(1, 2, 9, 32).bfloat16(), "one shape"),
        (torch.zeros(2, 8, 32).bfloat16(), torch.zeros(2, 8, 32).bfloat16(), r"\(B, H, T, D\)"),
    ],
)
def test_bad_operands_are_refused_with_a_message(amx, q, k, message):
    with pytest.raises(RuntimeError, match=message):
        amx.amx_causal_attention(q, k, k)


def test_lower_builds_refuse_it_with_a_message():
    module = kernel_build("avx512") if "avx512" in cpu.kernel_targets() else kernel_build("avx2")
    assert not module.amx_ready()
    with pytest.raises(RuntimeError, match="no AMX-BF16"):
        module.amx_causal_attention(*qkv(1, 1, 4, 32))


# --- where the model takes it ---------------------------------------------------------------------------------------


def tiny_bf16_model() -> Baichuan:
    """Two layers of 4 heads of 32 values: head sizes the kernel takes."""
    torch.manual_seed(0)
    model = Baichuan(tiny_config(dim=128, n_heads=4))
    model.init_weights()
    return model.bfloat16().eval()


@pytest.fixture
def attention_calls(monkeypatch):
    """Every call that reaches the kernel, wherever this CPU is (answered by torch's SDPA where it has no AMX):
    the shapes of q."""
    require_cpu_kernels()
    ready = cpu_gemv._amx_ready()
    calls = []

    def spy(q, k, v):
        calls.append(tuple(q.shape))
        if ready:
            return cpu_gemv.load().amx_causal_attention(q, k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    monkeypatch.setattr(cpu_gemv, "_amx_ready", lambda: True)
    monkeypatch.setattr(cpu_gemv, "amx_causal_attention", spy)
    return calls


def test_a_fresh_prompt_takes_the_kernel_and_nothing_else_does(attention_calls):
    model = tiny_bf16_model()
    idx = torch.randint(0, 512, (1, 12))
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, 1, 32, torch.bfloat16)
        model(idx, 0, cache)
        assert attention_calls == [(1, 4, 12, 32)] * 2  # each layer's prompt
        model(idx[:, :1], 12, cache)  # a decode step
        model(idx[:, :3], 13, cache)  # a continuation: queries behind earlier keys
        model(idx, 0, cache, attention_mask=torch.ones(1, 12, dtype=torch.long))  # a mask: SDPA's
    assert len(attention_calls) == 2
    model(idx)  # autograd: never
    assert len(attention_calls) == 2


def test_prompt_logits_match_torchs_attention(amx, monkeypatch):
    model = tiny_bf16_model()
    idx = torch.randint(0, 512, (2, 45))
    with torch.inference_mode():
        ours = model(idx).float()
        monkeypatch.setattr(cpu_gemv, "AMX_ATTENTION", False)
        theirs = model(idx).float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()
