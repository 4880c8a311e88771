"""The fused CPU kernels (`csrc/cpu_fused.cpp`) against the modules they stand in for, in every build this CPU
runs: RMSNorm and SwiGLU as one op each, and a whole decoder layer of a decode step as one call (`decode_layer`),
with fp32/bf16 models, fp32/bf16 caches, bf16/int8/int4 products and batches of one and several rows.

fp32 agrees with the modules to float rounding (1e-5); bf16 to a few bf16 ulps (the modules' attention rounds
its probabilities to bf16 in SDPA; ours keeps them in fp32), and greedy decoding in fp32 is identical."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from baichuan import cpu, cpu_gemv, position
from baichuan.config import ROPE
from baichuan.generate import SamplingConfig, generate, generate_tokens
from baichuan.kv_cache import KVCache
from baichuan.model import Baichuan
from baichuan.position import RoPE, _apply_rotary
from baichuan.quant.swap import quantize_model
from tests.conftest import kernel_build, tiny_config


@pytest.fixture(params=cpu.KERNEL_TARGETS)
def build(request, monkeypatch):
    """The compiled module of one target, where this CPU runs it, used by the model's layers and fused path."""
    module = kernel_build(request.param)
    monkeypatch.setattr(cpu_gemv, "load", lambda: module)
    return module


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(weight.dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in units of b's dtype's spacing at b's magnitude."""
    spacing = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
    return ((a.float() - b.float()).abs() / spacing).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 1536), (2, 13)], ids=str)
def test_rms_norm_matches_module(build, dtype, shape):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    weight = (1 + torch.randn(shape[-1], generator=generator) * 0.1).to(dtype)
    got = build.rms_norm(x, weight, 1e-6)
    want = reference_rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:  # the fp32 statistics may differ in their last bit, which moves a rounding at most one ulp
        assert ulps(got, want) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 1, 1536), (2, 13)], ids=str)
def test_add_and_add_rms_norm_match_torch(build, dtype, shape):
    generator = torch.Generator().manual_seed(1)
    x, residual = ((torch.randn(shape, generator=generator) * 3).to(dtype) for _ in range(2))
    weight = (1 + torch.randn(shape[-1], generator=generator) * 0.1).to(dtype)
    assert torch.equal(build.add(x, residual), x + residual)  # the same rounding of each sum
    added, normed = build.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(added, x + residual)
    want = reference_rms_norm(x + residual, weight, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(normed, want, rtol=2e-6, atol=1e-6)
    else:
        assert ulps(normed, want) <= 1.0


def test_add_kernels_refuse_mismatched_inputs(build):
    x = torch.zeros(2, 32)
    with pytest.raises(RuntimeError, match="same shape and dtype"):
        build.add(x, torch.zeros(2, 16))
    with pytest.raises(RuntimeError, match="same shape and dtype"):
        build.add(x, x.bfloat16())
    with pytest.raises(RuntimeError, match="residual"):
        build.add_rms_norm(x, torch.zeros(3, 32), torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        build.add_rms_norm(x, x, torch.ones(16), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_matches_torch(build, dtype):
    generator = torch.Generator().manual_seed(1)
    gate = (torch.randn(3, 1, 4096, generator=generator) * 4).to(dtype)
    up = torch.randn(3, 1, 4096, generator=generator).to(dtype)
    got = build.silu_mul(gate, up)
    want = F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:
        assert ulps(got, want) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_silu_mul_over_a_prompt_and_the_whole_range(build, dtype):
    """Many rows (the threads split them) and gates where e^-g overflows, underflows or is NaN."""
    generator = torch.Generator().manual_seed(2)
    gate = (torch.randn(67, 4096 + 5, generator=generator) * 30).to(dtype)
    gate[0, :6] = torch.tensor([-100.0, -89.0, 88.0, 100.0, float("inf"), -float("inf")])
    gate[0, 6], gate[1, -1] = float("nan"), float("nan")
    up = torch.randn(67, 4096 + 5, generator=generator).to(dtype)
    got, want = build.silu_mul(gate, up), F.silu(gate) * up
    assert torch.equal(got.isnan(), want.isnan())
    got, want = got.nan_to_num(), want.nan_to_num()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:  # builds with native bf16 round with an instruction that flushes subnormal results (|v| < 1.2e-38) to 0
        got, want = (v.where(v.float().abs() >= torch.finfo(torch.float32).tiny, 0) for v in (got, want))
        assert ulps(got, want) <= 1.0


def reference_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = RoPE(x.shape[-1])._cos_sin(int(positions.max()) + 1, x.device)
    cos, sin = cos[positions], sin[positions]
    if positions.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    return _apply_rotary(x.float(), cos, sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [128, 20], ids=["d128", "d20"])  # 20: half of it not a multiple of 8
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_rope_matches_module(build, dtype, head_dim, per_row):
    """The prompt's queries/keys as the model hands them over: a strided view of the qkv product."""
    B, T, H = 2, 37, 3
    generator = torch.Generator().manual_seed(head_dim)
    qkv = (torch.randn(B, T, 3, H, head_dim, generator=generator) * 3).to(dtype)
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # (B, H, T, D), rows contiguous
    positions = (
        torch.arange(T) + 5 if not per_row else torch.stack([torch.arange(T) + 2, torch.arange(T) + 40])
    )
    cos, sin = RoPE(head_dim)._cos_sin(int(positions.max()) + 1, q.device)
    got = build.rope(q, positions, cos, sin)
    want = reference_rope(q, positions)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # fp32 products summed, perhaps fused: a rounding may move by one ulp
        assert ulps(got, want) <= 1.0
    with pytest.raises(RuntimeError, match="outside the tables"):
        build.rope(q, positions + cos.shape[0], cos, sin)


def test_rope_module_takes_the_kernel_only_without_autograd(build):
    rope = RoPE(64)
    q, k = torch.randn(1, 2, 5, 64, requires_grad=True), torch.randn(1, 2, 5, 64)
    positions = torch.arange(5)
    assert position._fused_rope(q, k, positions) is None
    out_q, _ = rope.rotate(q, k, positions)
    assert out_q.requires_grad  # the modules' ops, which autograd records
    with torch.inference_mode():
        assert position._fused_rope(q.detach(), k, positions) is build.rope
        fused_q, fused_k = rope.rotate(q.detach(), k, positions)
    torch.testing.assert_close(fused_q, out_q.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_k, reference_rope(k, positions), rtol=1e-6, atol=1e-6)


def tiny_model(dtype: torch.dtype, bits: int | None, seed: int = 0) -> Baichuan:
    # dim and ffn_dim multiples of 32 so that the int8 and int4 (group 32) kernels take every product.
    config = tiny_config(ROPE, dim=128, n_heads=4, ffn_dim=192, n_layers=2)
    torch.manual_seed(seed)
    model = Baichuan(config)
    model.init_weights(std=0.1)
    with torch.no_grad():  # norms that are not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype).eval()
    if bits is not None:
        quantize_model(model, bits, group_size=32)
    return model


def decode_both_ways(
    model: Baichuan, rows: int, kv_dtype: torch.dtype, steps: int = 4, per_row: bool = False
):
    """Logits of `steps` decode steps after a 5-token prompt, with the fused path and with the modules'; the
    caches they leave."""
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (rows, 5), generator=generator)
    tokens = torch.randint(0, model.config.vocab_size, (rows, steps), generator=generator)
    results = []
    for fused in (True, False):
        model.model.fused_decode = fused
        cache = KVCache.for_model(model.config, rows, 16, kv_dtype)
        logits = []
        with torch.inference_mode():
            model(prompt, 0, cache)
            for step in range(steps):
                start = torch.full((rows,), 5 + step) if per_row else 5 + step
                if fused:
                    assert model.model._fused_decode(tokens[:, step : step + 1], start, cache) is not None
                logits.append(model(tokens[:, step : step + 1], start, cache).float())
        results.append((torch.cat(logits, 1), cache))
    model.model.fused_decode = True
    return results


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["float", "int8", "int4"])
def test_fused_decode_fp32_matches_modules(build, bits, rows):
    model = tiny_model(torch.float32, bits)
    (fused, fused_cache), (plain, plain_cache) = decode_both_ways(model, rows, torch.float32)
    if bits is None:
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_cache.k, plain_cache.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_cache.v, plain_cache.v, rtol=1e-5, atol=1e-5)
    else:  # the kernels round activations to codes (int16; int8 per group for int4): a last-bit change moves one
        for a, b in ((fused, plain), (fused_cache.k, plain_cache.k), (fused_cache.v, plain_cache.v)):
            assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bits", [None, 8, 4], ids=["bf16", "int8", "int4"])
def test_fused_decode_bf16_matches_modules(build, bits, rows):
    """bf16 roundings differ (~1% of the logits' norm after a few steps of a random model), so the fused path is
    held to the modules' own distance from the same weights computed in fp32."""
    model = tiny_model(torch.bfloat16, bits)
    (fused, fused_cache), (plain, plain_cache) = decode_both_ways(model, rows, torch.bfloat16)
    (exact, _), _ = decode_both_ways(copy.deepcopy(model).float(), rows, torch.float32)

    def error(logits: torch.Tensor) -> float:
        return ((logits - exact).norm() / exact.norm()).item()

    assert error(fused) <= 1.15 * error(plain)
    # The int4 kernels also round activations to int8 per group (as llama.cpp's Q4_0 x Q8_0): both paths then sit
    # ~3% from fp32 and ~2.2% from each other (Sapphire Rapids, native bf16 in the modules' products).
    apart = 0.03 if bits == 4 else 0.02
    assert ((fused - plain).norm() / plain.norm()).item() < apart
    k_error = (fused_cache.k.float() - plain_cache.k.float()).abs().max()
    assert k_error <= 0.02 * plain_cache.k.float().abs().max()


def test_fused_decode_fp32_model_bf16_cache_and_per_row_positions(build):
    model = tiny_model(torch.float32, None)
    (fused, fused_cache), (plain, plain_cache) = decode_both_ways(model, 2, torch.bfloat16, per_row=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_cache.k, plain_cache.k) or ulps(fused_cache.k, plain_cache.k) <= 1.0


@pytest.mark.parametrize("bits", [None, 8], ids=["float", "int8"])
def test_greedy_fp32_identical(build, bits):
    model = tiny_model(torch.float32, bits, seed=3)
    sampling = SamplingConfig(max_new_tokens=24, eos_ids=())
    outputs = []
    for fused in (True, False):
        model.model.fused_decode = fused
        single = list(generate_tokens(model, [5, 17, 99, 3], sampling))
        batch = generate(model, [[5, 17, 99, 3], [8, 1, 2, 200]], sampling)
        outputs.append((single, batch))
    assert outputs[0] == outputs[1]
    assert outputs[0][1][0] == outputs[0][0]


def test_fused_path_steps_aside(build):
    """Hooks, autograd, ALiBi and LoRA-like wrappers keep the modules' forwards."""
    model = tiny_model(torch.float32, None)
    cache = KVCache.for_model(model.config, 1, 16, torch.float32)
    token = torch.tensor([[7]])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), 0, cache)
        assert model.model._fused_decode(token, 3, cache) is not None
        handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *args: None)
        assert model.model._fused_decode(token, 3, cache) is None
        handle.remove()
    assert torch.is_grad_enabled()
    seen = []
    model.model.layers[1].mlp.up_proj.register_forward_hook(
        lambda m, args, out: seen.append(out.requires_grad)
    )
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    assert model(token, 3, cache).requires_grad
    assert seen == [True]  # the modules ran, recording autograd

    alibi = Baichuan(tiny_config("alibi")).eval()
    cache = KVCache.for_model(alibi.config, 1, 16, torch.float32)
    with torch.no_grad():
        alibi(torch.tensor([[1, 2, 3]]), 0, cache)
        assert alibi.model._fused_decode(token, 3, cache) is None
