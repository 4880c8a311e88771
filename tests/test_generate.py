"""Generation engine: transformers' sampling math, greedy parity with the original, batching, stops, streaming,
chat sessions that re-use the KV cache."""

import functools
import json
import threading

import numpy as np
import pytest
import torch

from baichuan.chat_format import chat_format_for
from baichuan.checkpoint import fold_norm_head, load_model
from baichuan.generate import (
    ChatSession,
    SamplingConfig,
    apply_repetition_penalty,
    chat,
    generate,
    generate_tokens,
    greedy_ids,
    process_logits,
    sample_next,
    stream_text,
)
from baichuan.model import Baichuan
from baichuan.tokenizer import Tokenizer
from tests.conftest import VARIANTS, shared_path, tiny_config

GREEDY = SamplingConfig()  # transformers' defaults: greedy, no repetition penalty


@functools.cache
def fixture_model(variant):
    root = shared_path("oracle", "fixtures", variant)
    model = fold_norm_head(load_model(root / "checkpoint", dtype=torch.float32))
    return model, np.load(root / "reference.npz"), json.loads((root / "reference.json").read_text())


@functools.cache
def fixture_tokenizer(variant):
    return Tokenizer(shared_path("oracle", "fixtures", variant, "checkpoint"))


@functools.cache
def tiny_model(position, norm_head):
    torch.manual_seed(0)
    model = Baichuan(tiny_config(position, norm_head)).eval()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))  # large enough for clear argmaxes
    return model


def run(tokens):
    """Drain a token/text generator; return (items, finish reason)."""
    items = []
    while True:
        try:
            items.append(next(tokens))
        except StopIteration as finished:
            return items, finished.value


# --- SamplingConfig -------------------------------------------------------------------------------------------


def test_sampling_config_from_a_chat_checkpoint():
    sampling = SamplingConfig.from_checkpoint(shared_path("oracle", "fixtures", "baichuan2_7b", "checkpoint"))
    assert sampling == SamplingConfig(
        do_sample=True,
        temperature=0.3,
        top_k=5,
        top_p=0.85,
        repetition_penalty=1.05,
        max_new_tokens=2048,
        eos_ids=(2,),
    )
    b1 = SamplingConfig.from_checkpoint(shared_path("oracle", "fixtures", "baichuan1_13b", "checkpoint"))
    assert b1.repetition_penalty == 1.1
    # A base checkpoint only names its special ids: everything else keeps transformers' defaults.
    base = SamplingConfig.from_checkpoint(shared_path("oracle", "fixtures", "baichuan1_7b", "checkpoint"))
    assert base.greedy and base.top_k == 50 and base.eos_ids == (2,)


def test_sampling_config_overrides():
    sampling = SamplingConfig.from_generation_config({"temperature": 0.3, "eos_token_id": [2, 7]}, top_p=0.5)
    assert (sampling.temperature, sampling.top_p, sampling.eos_ids) == (0.3, 0.5, (2, 7))
    # None keeps the value: optional request fields pass straight through.
    assert sampling.replace(temperature=None, max_new_tokens=3, stop_strings="\n").stop_strings == ("\n",)
    assert sampling.replace(temperature=None).temperature == 0.3
    assert SamplingConfig(do_sample=True, temperature=0).greedy  # OpenAI clients mean greedy by temperature 0
    assert SamplingConfig(stop_ids=[5]).terminators == {2, 5}
    for bad in ({"top_p": 0.0}, {"temperature": -1}, {"repetition_penalty": 0}, {"stop_strings": ("",)}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


# --- sampling math against transformers -----------------------------------------------------------------------


def test_sampling_math_matches_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 64, generator=gen) * 3
    logits[0, :4] = logits[0, 4]  # ties at the top-k boundary are kept, as in transformers
    ids = torch.randint(0, 64, (3, 10), generator=gen)
    seen = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, ids, True)
    sampling = SamplingConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.85, repetition_penalty=1.3)
    expected = logits.clone()
    for processor in (
        lp.RepetitionPenaltyLogitsProcessor(1.3),
        lp.TemperatureLogitsWarper(0.7),
        lp.TopKLogitsWarper(5),
        lp.TopPLogitsWarper(0.85),
    ):
        expected = processor(ids, expected)
    torch.testing.assert_close(process_logits(logits, seen, sampling), expected, rtol=0, atol=0)
    # Greedy decoding applies the penalty only.
    greedy = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(process_logits(logits, seen, SamplingConfig(repetition_penalty=1.3)), greedy)


@pytest.mark.parametrize("top_k", [5, 50, 0])
def test_top_p_after_top_k_sorts_only_the_kept_and_still_matches_transformers(top_k):
    """After top_k only the finite logits are sorted (a full 125,696 sort cost milliseconds a step); the result is
    transformers' to the bit (ties: the next test)."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(3, 125_696, generator=gen) * (1 + trial % 4)
        warpers = [lp.TemperatureLogitsWarper(0.3)] + ([lp.TopKLogitsWarper(top_k)] if top_k else [])
        expected = logits.clone()
        for processor in (*warpers, lp.TopPLogitsWarper(0.85)):
            expected = processor(None, expected)
        sampling = SamplingConfig(do_sample=True, temperature=0.3, top_k=top_k, top_p=0.85)
        torch.testing.assert_close(process_logits(logits, None, sampling), expected, rtol=0, atol=0)


def test_top_p_cuts_as_many_tied_logits_as_transformers():
    """Where equal logits straddle the top-p cut, which of them go depends on the sort's order of ties, and
    transformers' (torch.sort, unstable) is no more defined than ours: the same number go."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(1, 125_696, generator=torch.Generator().manual_seed(0)) - 30
    logits[0, 100] = 2.0
    logits[0, [7, 500, 9000, 70_000]] = 1.0  # ties at the top-k boundary, kept together: 5 logits
    # Softmax mass: 0.40 for 2.0, 0.15 for each 1.0; ascending, the ties' cumulative 0.15, 0.30, 0.45, 0.60:
    # top_p 0.5 cuts the first three of the four.
    sampling = SamplingConfig(do_sample=True, top_k=4, top_p=0.5)
    expected = lp.TopPLogitsWarper(0.5)(None, lp.TopKLogitsWarper(4)(None, logits.clone()))
    got = process_logits(logits, None, sampling)
    assert torch.isfinite(got).sum() == torch.isfinite(expected).sum() == 2
    assert torch.isfinite(got[0, 100]) and torch.isfinite(expected[0, 100])


def test_sampling_among_the_kept_draws_from_the_same_distribution():
    """With few logits kept (top_k), the draw is made among them alone: every draw is a kept id, and the
    frequencies follow the probabilities of the full softmax."""
    logits = torch.randn(2, 4000, generator=torch.Generator().manual_seed(2)) * 2
    sampling = SamplingConfig(do_sample=True, temperature=0.7, top_k=6, top_p=0.95)
    expected = process_logits(logits, None, sampling).softmax(-1)
    generator = torch.Generator().manual_seed(5)
    draws = torch.stack([sample_next(logits, None, sampling, generator) for _ in range(4000)])  # (4000, 2)
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=4000).double() / len(draws)
        assert set(draws[:, row].tolist()) <= set(expected[row].nonzero().flatten().tolist())
        assert (counts - expected[row].double()).abs().max() < 0.03  # ~4 standard errors at 4000 draws


def test_top_p_keeps_at_least_one_token_and_penalty_signs():
    logits = torch.tensor([[10.0, 0.0, -1.0, -2.0]])
    assert torch.isfinite(process_logits(logits, None, SamplingConfig(do_sample=True, top_p=1e-6))).sum() == 1
    seen = torch.tensor([[True, False, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[5.0, 0.0, -2.0, -2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_ids_pick_what_argmax_picks(dtype):
    """Ties (common in bf16) go to the first index, a NaN wins, a row of -inf gives 0: as argmax does."""
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3, 8):
        logits = (torch.randint(-20, 20, (rows, 5000), generator=generator) / 4).to(dtype)
        logits[0, [7, 4000]] = float("nan")
        logits[-1] = float("-inf") if rows > 1 else logits[-1]
        assert torch.equal(greedy_ids(logits), logits.argmax(-1))
        assert torch.equal(greedy_ids(logits[1:]), logits[1:].argmax(-1))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    logits = torch.randn(2, 100, generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(do_sample=True, temperature=1.5, top_k=0)
    draws = [sample_next(logits, None, sampling, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    top1 = SamplingConfig(do_sample=True, top_k=1)
    assert torch.equal(sample_next(logits, None, top1), logits.argmax(-1))
    model = tiny_model("rope", False)
    seeded = SamplingConfig(do_sample=True, temperature=2.0, top_k=0, max_new_tokens=8, seed=3, eos_ids=())
    assert list(generate_tokens(model, [1, 5, 9], seeded)) == list(generate_tokens(model, [1, 5, 9], seeded))


# --- parity with the original's greedy generate ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_original(variant):
    model, ref, meta = fixture_model(variant)
    prompt = ref["prompt_ids"][0].tolist()
    tokens, reason = run(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=24)))
    assert tokens == ref["greedy_sequences"][0, len(prompt) :].tolist()
    assert reason == ("stop" if meta["greedy"]["stopped_on_eos"] else "length")
    if "greedy_sequences_no_eos" in ref.files:  # baichuan2_7b stops on EOS after 15 tokens
        no_eos = SamplingConfig(max_new_tokens=24, eos_ids=())
        assert (
            list(generate_tokens(model, prompt, no_eos))
            == ref["greedy_sequences_no_eos"][0, len(prompt) :].tolist()
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_matches_original(variant):
    model, ref, _ = fixture_model(variant)
    ids, mask = ref["padded_input_ids"], ref["padded_attention_mask"]
    prompts = [row[m == 1].tolist() for row, m in zip(ids, mask, strict=True)]
    assert len(prompts[0]) != len(prompts[1])
    new = generate(model, prompts, SamplingConfig(max_new_tokens=12, eos_ids=()))
    assert new == ref["padded_generate_sequences"][:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("variant", ["baichuan1_13b", "baichuan2_7b", "baichuan2_13b"])
def test_chat_greedy_matches_original(variant):
    """`model.chat()` with a greedy config and 16 new tokens: prompt building and generation together."""
    model, _, meta = fixture_model(variant)
    recorded = meta["chat"]["chat_greedy"]
    messages = meta["chat"]["messages"]["multi_turn"]
    if recorded["messages"] == "multi_turn without system":
        messages = messages[1:]
    tokenizer = fixture_tokenizer(variant)
    generation_config = json.loads(
        (shared_path("oracle", "fixtures", variant, "checkpoint") / "generation_config.json").read_text()
    )
    chat_format = chat_format_for(model.config, generation_config)
    assert chat_format.build(tokenizer.encode, messages, 256, 16) == recorded["input_ids"]
    sampling = SamplingConfig(max_new_tokens=16)
    assert list(generate_tokens(model, recorded["input_ids"], sampling)) == recorded["output_new_ids"]
    expected_text = tokenizer.decode(recorded["output_new_ids"], skip_special_tokens=True)
    assert chat(model, tokenizer, messages, sampling, chat_format=chat_format) == expected_text


# --- batching ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "position,norm_head",
    [("rope", False), ("alibi", False), ("rope", True), ("alibi", True)],
    ids=["rope", "alibi", "rope-normhead", "alibi-normhead"],
)
def test_batch_equals_each_prompt_alone(position, norm_head):
    model = tiny_model(position, norm_head)
    prompts = [[1, 17, 300, 45, 9, 200, 3], [1, 88], [0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 500, 9, 9, 9, 9, 10]]
    # Pad id 0 appears in a prompt and the penalty is on: padding must be neither attended nor penalised.
    sampling = SamplingConfig(max_new_tokens=10, repetition_penalty=1.3, eos_ids=())
    batched = generate(model, prompts, sampling)
    alone = [list(generate_tokens(model, p, sampling)) for p in prompts]
    assert batched == alone
    assert all(len(row) == 10 for row in batched)


def test_batch_rows_stop_on_their_own():
    model = tiny_model("alibi", True)
    prompts = [[1, 17, 300, 45], [1, 88, 7]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=8, eos_ids=()))
    stop = free[0][2]  # make row 0 stop at its third token
    stopped = generate(model, prompts, SamplingConfig(max_new_tokens=8, eos_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


# --- stopping --------------------------------------------------------------------------------------------------


def test_stops_on_eos_stop_ids_max_new_tokens_and_cancel():
    model = tiny_model("rope", True)
    free, reason = run(generate_tokens(model, [1, 2, 3], SamplingConfig(max_new_tokens=6, eos_ids=())))
    assert len(free) == 6 and reason == "length"
    tokens, reason = run(
        generate_tokens(model, [1, 2, 3], SamplingConfig(max_new_tokens=6, eos_ids=(free[3],)))
    )
    assert tokens == free[: free.index(free[3]) + 1] and reason == "stop"
    tokens, reason = run(
        generate_tokens(model, [1, 2, 3], SamplingConfig(max_new_tokens=6, eos_ids=(), stop_ids=(free[1],)))
    )
    assert tokens == free[: free.index(free[1]) + 1] and reason == "stop"
    assert run(generate_tokens(model, [1], SamplingConfig(max_new_tokens=0))) == ([], "length")

    cancel = threading.Event()
    tokens = []
    stream = generate_tokens(model, [1, 2, 3], SamplingConfig(max_new_tokens=6, eos_ids=()), cancel=cancel)
    for token in stream:
        tokens.append(token)
        if len(tokens) == 2:
            cancel.set()
    assert tokens == free[:2]
    cancel.clear()
    cancel.set()
    assert generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=6), cancel=cancel) == [[]]
    with pytest.raises(ValueError, match="empty"):
        list(generate_tokens(model, [], GREEDY))


def test_stop_strings_end_the_text_before_the_stop_string():
    model, _, _ = fixture_model("baichuan2_13b")
    tokenizer = fixture_tokenizer("baichuan2_13b")
    prompt = [195, *tokenizer.encode("Hello, who are you?"), 196]
    sampling = SamplingConfig(max_new_tokens=16, eos_ids=())
    tokens = list(generate_tokens(model, prompt, sampling))
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(stream_text(model, tokenizer, prompt, sampling)) == full
    stop = full[5:7]  # a stop string that completes mid-answer
    pieces, reason = run(
        stream_text(model, tokenizer, prompt, sampling.replace(stop_strings=(stop, "never seen")))
    )
    assert "".join(pieces) == full[: full.index(stop)] and reason == "stop"
    assert all(stop not in piece for piece in pieces)
    # The token generator stops on the token that completes the stop string.
    stopped, reason = run(
        generate_tokens(model, prompt, sampling.replace(stop_strings=(stop,)), tokenizer=tokenizer)
    )
    assert (
        reason == "stop" and stop in tokenizer.decode(stopped) and stop not in tokenizer.decode(stopped[:-1])
    )
    with pytest.raises(ValueError, match="tokenizer"):
        list(generate_tokens(model, prompt, sampling.replace(stop_strings=("x",))))


def test_stream_text_never_splits_a_character_and_hides_eos():
    model, _, _ = fixture_model("baichuan2_7b")
    tokenizer = fixture_tokenizer("baichuan2_7b")
    sampling = SamplingConfig(max_new_tokens=24)
    prompt = [1, 328, 384, 353, 219, 207, 297, 389]  # the greedy fixture: ends on EOS, byte pieces on the way
    tokens = list(generate_tokens(model, prompt, sampling))
    assert tokens[-1] == 2
    pieces, reason = run(stream_text(model, tokenizer, prompt, sampling))
    assert "".join(pieces) == tokenizer.decode(tokens[:-1], skip_special_tokens=True) and reason == "stop"
    assert "</s>" not in "".join(pieces)


# --- chat sessions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position,norm_head", [("rope", True), ("alibi", False)])
def test_chat_session_prefills_only_the_new_suffix(position, norm_head):
    model = tiny_model(position, norm_head)
    session = ChatSession(model)
    sampling = SamplingConfig(max_new_tokens=5, eos_ids=(), repetition_penalty=1.1)
    first = [195, 10, 11, 12, 196]
    answer = list(session.generate_tokens(first, sampling))
    assert session.last_prefill == len(first)
    assert session.cached_ids == first + answer[:-1]  # the last sampled token was never fed back
    second = first + answer + [195, 20, 21, 196]
    again = list(session.generate_tokens(second, sampling))
    assert session.last_prefill == len(second) - len(first + answer[:-1])
    assert again == list(generate_tokens(model, second, sampling))  # same as without the cache
    # An edited history re-uses the cache up to the first difference.
    edited = first[:3] + [99, 196]
    assert list(session.generate_tokens(edited, sampling)) == list(generate_tokens(model, edited, sampling))
    assert session.last_prefill == 2
    # The same prompt again still runs its last token (its logits choose the first answer token).
    list(session.generate_tokens(edited, sampling))
    assert session.last_prefill == 1


def test_chat_session_grows_its_cache_and_survives_abandoned_streams():
    model = tiny_model("rope", False)
    session = ChatSession(model)
    sampling = SamplingConfig(max_new_tokens=200, eos_ids=())
    prompt = list(range(3, 203))  # 200 + 200 > 256 positions: the answer is cut to the context left
    stream = session.generate_tokens(prompt, sampling)
    with pytest.warns(UserWarning, match="max_new_tokens 200 cut to 56"):
        head = [next(stream) for _ in range(3)]
    stream.close()  # abandoned mid-answer
    assert session.cached_ids == prompt + head[:2]
    longer = prompt + head + [7] * 20
    assert list(session.generate_tokens(longer, sampling.replace(max_new_tokens=4))) == list(
        generate_tokens(model, longer, sampling.replace(max_new_tokens=4))
    )
    assert session.last_prefill == len(longer) - len(prompt) - 2
    assert session.cache.max_seq_len >= len(longer) + 4


def test_chat_session_chat_turns():
    model, _, meta = fixture_model("baichuan2_13b")
    tokenizer = fixture_tokenizer("baichuan2_13b")
    session = ChatSession(model, tokenizer, sampling=SamplingConfig(max_new_tokens=8))
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    answer = session.chat(messages)
    assert answer == chat(model, tokenizer, messages, SamplingConfig(max_new_tokens=8))
    first_prompt = session.chat_format.build(tokenizer.encode, messages, 256, 8)
    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Tell me more about it."},
    ]
    streamed = "".join(session.chat(messages, stream=True))
    # At least the first prompt came from the cache. (Random weights answer with stray bytes, whose text does not
    # re-encode to the sampled ids, so the re-use may stop at the start of the answer.)
    second_prompt = session.chat_format.build(tokenizer.encode, messages, 256, 8)
    assert second_prompt[: len(first_prompt)] == first_prompt
    assert session.last_prefill <= len(second_prompt) - len(first_prompt)
    assert streamed == chat(model, tokenizer, messages, SamplingConfig(max_new_tokens=8))


# --- the context and bad settings -------------------------------------------------------------------------------


def test_max_new_tokens_are_cut_to_the_context_with_a_warning():
    model = tiny_model("rope", False)  # 256 positions
    sampling = SamplingConfig(max_new_tokens=10**8, eos_ids=())  # would be a 10^8-position cache
    with pytest.warns(UserWarning, match="max_new_tokens 100000000 cut to 246"):
        tokens, reason = run(generate_tokens(model, list(range(3, 13)), sampling))
    assert len(tokens) == 246 and reason == "length"
    with pytest.warns(UserWarning, match="cut to 236"):
        rows = generate(model, [list(range(3, 23)), [5]], sampling)
    assert [len(r) for r in rows] == [236, 236]
    with pytest.raises(ValueError, match="fills the model's context of 256 tokens"):
        next(generate_tokens(model, [5] * 256, sampling))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("top_k", 5.5, "top_k must be an integer"),
        ("do_sample", "yes", "do_sample must be true or false"),
        ("max_new_tokens", None, None),  # absent: the default
        ("eos_token_id", [2, "x"], "eos_token_id must be a token id or a list of them"),
        ("stop_strings", [3], "stop_strings must be strings"),
    ],
)
def test_generation_config_types(field, value, message):
    if message is None:
        assert SamplingConfig.from_generation_config({field: value}).max_new_tokens == 512
        return
    with pytest.raises(ValueError, match=message):
        SamplingConfig.from_generation_config({field: value})


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"temperature": 0.3,', "not valid JSON"),
        ("[1, 2]", "expected a JSON object of settings, got list"),
        ('{"temperature": "hot"}', "temperature must be a number"),
        ('{"user_token_id": "195"}', "user_token_id must be an integer token id"),
    ],
)
def test_a_bad_generation_config_file_is_named(tmp_path, text, message):
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        SamplingConfig.from_checkpoint(tmp_path)
