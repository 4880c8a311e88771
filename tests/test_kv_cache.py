"""The KV cache's own dtype: stored rounded, handed back in the model's dtype, exact when it is the model's."""

import pytest
import torch

from baichuan.generate import ChatSession, SamplingConfig, generate_tokens
from baichuan.kv_cache import KVCache
from baichuan.model import Baichuan


def model_of(config) -> Baichuan:
    torch.manual_seed(0)
    model = Baichuan(config).eval()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))  # logits spread over ~1 (std)
    return model


def decode_logits(model: Baichuan, ids: torch.Tensor, kv_dtype: torch.dtype, prefill: int = 16):
    """Prefill `prefill` tokens, then feed the rest one at a time; all logits (1, T, V)."""
    cache = KVCache.for_model(model.config, 1, ids.shape[1], kv_dtype)
    with torch.no_grad():
        steps = [model(ids[:, :prefill], 0, cache)]
        steps += [model(ids[:, i : i + 1], i, cache) for i in range(prefill, ids.shape[1])]
    return torch.cat(steps, 1)


def test_stores_its_dtype_and_returns_the_callers():
    cache = KVCache(n_layers=1, batch_size=2, n_heads=2, max_seq_len=8, head_dim=4, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    got_k, got_v = cache.update(0, 0, k, v)
    assert cache.k.dtype == torch.bfloat16 and got_k.dtype == got_v.dtype == torch.float32
    assert torch.equal(got_k, k.to(torch.bfloat16).float())
    # Per-row positions (the server's batch) write through the same rounding.
    got_k, _ = cache.update(0, torch.tensor([3, 5]), k[:, :, :1], v[:, :, :1])
    assert got_k.shape == (2, 2, 6, 4) and torch.equal(got_k[1, :, 5], k[1, :, 0].to(torch.bfloat16).float())


def test_a_cache_in_the_model_dtype_is_exact(tiny):
    model = model_of(tiny)
    ids = torch.randint(0, tiny.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    assert (decode_logits(model, ids, torch.float32) - full).abs().max() < 1e-5


def test_bf16_cache_error_on_an_fp32_model_is_bounded(tiny):
    """The error a bf16 KV cache adds to an fp32 model's logits, 16-token prefill + 48 decode steps. Measured
    (max |difference| / std of the logits): 1.5-1.8% on the four tiny variants, a quarter of what running the
    whole model in bf16 costs on the same models (6.1-7.4%). Bounded here at 5%."""
    model = model_of(tiny)
    ids = torch.randint(0, tiny.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    exact = decode_logits(model, ids, torch.float32)
    rounded = decode_logits(model, ids, torch.bfloat16)
    error = (rounded - exact).abs().max() / exact.std()
    assert 0 < error < 0.05, f"bf16 KV cache error {error:.3%} of the logits' std"


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float32])
def test_generation_allocates_the_cache_in_its_dtype(tiny, kv_dtype):
    model = model_of(tiny)
    sampling = SamplingConfig(max_new_tokens=6, eos_ids=())
    session = ChatSession(model, kv_dtype=kv_dtype)
    tokens = list(session.generate_tokens([5, 6, 7], sampling))
    assert session.cache.k.dtype == kv_dtype
    assert len(tokens) == 6
    if kv_dtype == torch.float32:
        assert tokens == list(generate_tokens(model, [5, 6, 7], sampling))
