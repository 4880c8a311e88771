"""The transformers face: Auto classes on official directories, parity with the original, generate."""

import functools
import inspect
import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

import baichuan
from baichuan.hf import BaichuanConfig, BaichuanForCausalLM
from baichuan.hf.model import OUTPUT_CACHE_FIELD
from tests.conftest import VARIANTS, shared_path

ATOL = 1e-4


def official(variant):
    root = shared_path("oracle", "fixtures", variant)
    model = AutoModelForCausalLM.from_pretrained(root / "checkpoint", dtype=torch.float32).eval()
    ref = np.load(root / "reference.npz")
    facts = json.loads((root / "reference.json").read_text())
    return model, ref, facts


def t(a):
    return torch.from_numpy(np.asarray(a))


def test_public_names():
    assert baichuan.BaichuanForCausalLM is BaichuanForCausalLM
    assert baichuan.BaichuanConfig is BaichuanConfig
    config = BaichuanConfig.from_preset("baichuan2-13b")
    assert config.position_encoding == "alibi" and config.norm_head and config.vocab_size == 125_696


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_classes_load_official_directory(variant):
    model, ref, facts = official(variant)
    assert isinstance(model, BaichuanForCausalLM)
    config = AutoConfig.from_pretrained(shared_path("oracle", "fixtures", variant, "checkpoint"))
    assert isinstance(config, BaichuanConfig)
    assert config.position_encoding == ("alibi" if "13b" in variant else "rope")
    assert config.norm_head == variant.startswith("baichuan2")
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.W_pack.weight" in names and "lm_head.weight" in names


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_loss_and_hidden_states_match_original(variant):
    model, ref, facts = official(variant)
    with torch.no_grad():
        out = model(t(ref["input_ids"]), labels=t(ref["labels"]), output_hidden_states=True)
    assert (out.logits - t(ref["logits_full"])).abs().max() < ATOL
    assert out.loss.item() == pytest.approx(facts["loss"]["eval_loss"], abs=1e-4)
    hidden = torch.stack(out.hidden_states)[:, 0]
    assert hidden.shape == ref["hidden_states"].shape
    assert (hidden - t(ref["hidden_states"])).abs().max() < ATOL


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_with_transformers_cache(variant, cache_argument):
    """The cache goes in under transformers' current name (`cache`) or the old one, and comes back in the output
    under the name the installed transformers reads (`generate` feeds it to the next step)."""
    model, ref, _ = official(variant)
    ids = t(ref["input_ids"])
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        steps, past = [out.logits], out[OUTPUT_CACHE_FIELD]
        for i in range(8, ids.shape[1]):
            out = model(ids[:, i : i + 1], use_cache=True, **{cache_argument: past})
            assert out[OUTPUT_CACHE_FIELD] is past
            steps.append(out.logits)
    assert past.get_seq_length() == ids.shape[1]
    assert (torch.cat(steps, 1) - t(ref["logits_incremental_prefill8"])).abs().max() < ATOL


def test_cache_given_twice_is_refused():
    model = BaichuanForCausalLM(
        BaichuanConfig.from_preset(
            "baichuan2-7b",
            num_hidden_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=256,
        )
    )
    first = model(torch.tensor([[1, 2]]), use_cache=True)[OUTPUT_CACHE_FIELD]
    with pytest.raises(ValueError, match="not both"):
        model(torch.tensor([[3]]), cache=first, past_key_values=first)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generate_matches_original(variant):
    model, ref, facts = official(variant)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=24, repetition_penalty=1.0, eos_token_id=2, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(t(ref["prompt_ids"]), generation_config=config)
    assert out.tolist() == ref["greedy_sequences"].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_generate_matches_original(variant):
    model, ref, _ = official(variant)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=12, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        out = model.generate(
            t(ref["padded_input_ids"]),
            attention_mask=t(ref["padded_attention_mask"]),
            generation_config=config,
        )
    assert out.tolist() == ref["padded_generate_sequences"].tolist()


def tiny_hf_model(preset: str, hidden: int, heads: int, ffn: int, vocab: int) -> BaichuanForCausalLM:
    """A 2-layer model of a preset's kind (position encoding, head), seeded."""
    config = BaichuanConfig.from_preset(
        preset,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        intermediate_size=ffn,
        vocab_size=vocab,
    )
    torch.manual_seed(0)
    return BaichuanForCausalLM(config)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_hf_model("baichuan2-13b", hidden=80, heads=10, ffn=96, vocab=128).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["position_encoding"] == "alibi" and saved["norm_head"] is True
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def checkpointing_switch(model):
    """What transformers' Trainer switches recomputation on with: `activation_checkpointing_enable` since 5.25 (the
    old `gradient_checkpointing_enable` warns, and goes in v6), before that the old name."""
    return getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable


def test_gradient_checkpointing_enable_as_the_trainer_calls_it():
    """The Trainer passes every_n_layers where the switch takes it: the recompute must switch on and give the same
    gradients."""
    model = tiny_hf_model("baichuan2-7b", hidden=64, heads=4, ffn=96, vocab=128).train()
    ids = torch.randint(0, 128, (2, 9))
    model(ids, labels=ids).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    switch = checkpointing_switch(model)
    switch(**({"every_n_layers": 1} if "every_n_layers" in inspect.signature(switch).parameters else {}))
    assert model.model.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    for a, b in zip(plain, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_checkpointing_refuses_what_it_would_drop():
    """A sparser recompute, or another checkpoint function (transformers 5.25 wraps torch's to offload activations to
    the host), would be silently ignored by the trunk's own recompute: both are refused, and recomputation stays off,
    through the hook transformers calls and through its switch where that takes them."""
    model = tiny_hf_model("baichuan2-7b", hidden=64, heads=4, ffn=96, vocab=128).train()
    with pytest.raises(ValueError, match="every_n_layers=2"):
        model._set_gradient_checkpointing(True, every_n_layers=2)
    offloading = functools.partial(lambda function, *args, **kwargs: function(*args, **kwargs))
    with pytest.raises(ValueError, match="offloading"):
        model._set_gradient_checkpointing(True, gradient_checkpointing_func=offloading)
    switch = checkpointing_switch(model)
    if "offload" in inspect.signature(switch).parameters:
        with pytest.raises(ValueError, match="offloading"):
            switch(offload=True)
    assert not model.model.gradient_checkpointing
    model._set_gradient_checkpointing(
        True, gradient_checkpointing_func=functools.partial(torch.utils.checkpoint.checkpoint)
    )
    assert model.model.gradient_checkpointing


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_7b", "baichuan2_13b"])
def test_model_chat_matches_original_greedy_chat(variant):
    from transformers import AutoTokenizer

    model, ref, facts = official(variant)
    tokenizer = AutoTokenizer.from_pretrained(shared_path("oracle", "fixtures", variant, "checkpoint"))
    case = facts["chat"]["chat_greedy"]
    messages = facts["chat"]["messages"]["multi_turn"]
    if variant == "baichuan1_13b":  # Baichuan-13B-Chat has no system role
        messages = [m for m in messages if m["role"] != "system"]
    greedy = GenerationConfig(do_sample=False, max_new_tokens=case["max_new_tokens"], repetition_penalty=1.0)
    before = model.lm_head.weight.detach().clone()
    answer = model.chat(tokenizer, messages, generation_config=greedy)
    assert answer == case["response"]
    streamed = list(model.chat(tokenizer, messages, stream=True, generation_config=greedy))
    assert streamed[-1] == answer  # the original streams the growing answer
    assert all(b.startswith(a) for a, b in itertools.pairwise(streamed))
    assert torch.equal(model.lm_head.weight, before)  # chat folds a copy of the NormHead, never the weight
    assert not any("_folded" in name for name in model.state_dict())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_save_and_reload_on_the_transformers_face(tmp_path, bits):
    model = tiny_hf_model("baichuan2-7b", hidden=64, heads=4, ffn=128, vocab=256).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        reference = model(ids).logits
    model.save_pretrained(tmp_path / "float")
    on_load = BaichuanForCausalLM.from_pretrained(tmp_path / "float", quantize=bits)
    model.quantize(bits)
    with torch.no_grad():
        quantized = model(ids).logits
        assert torch.equal(on_load(ids).logits, quantized)
    assert (quantized - reference).abs().max() < (0.05 if bits == 8 else 0.5)
    model.save_pretrained(tmp_path / "quantized")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, quantized)
