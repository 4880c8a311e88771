"""The generation tasks end to end on the real benchmark files: a tiny random model scores near 0 through the
whole pipeline (prompts, batched greedy generation, stop strings, parsing, sandbox, metric), and an oracle that
answers with each dataset's own solution scores 100, which shows that parser, sandbox and metric are honest."""

from __future__ import annotations

from pathlib import Path

import pytest

from baichuan.eval.generative import (
    FLORES_SHOT_LINES,
    GENERATIVE_TASKS,
    MBPP_SHOT_IDS,
    cut_at_stop,
    run_generative_task,
)

# Examples per subject for the tiny model: every task scores at least ~20 completions.
LIMITS = {"bbh": 1, "gsm8k": 24, "math": 4, "humaneval": 20, "mbpp": 20, "flores": 12}
# A random model's tokens never carry an answer or compile into a passing function; BLEU of noise is ~0.
BANDS = {"exact_match": (0.0, 5.0), "pass@1": (0.0, 5.0), "bleu": (0.0, 3.0)}
NEW_TOKENS = 24  # the tiny model's completions are cut here: noise either way, and the test stays fast


@pytest.fixture(scope="module")
def model_generate(loaded):
    """`generate(prompts, max_new_tokens, stop_strings)` over baichuan.generate: batched greedy decoding."""
    from baichuan.generate import SamplingConfig, generate

    tokenizer = loaded.tokenizer
    calls = []

    def run(prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        calls.append((len(prompts), max_new_tokens, tuple(stop)))
        bos = [tokenizer.bos_id] if loaded.add_bos else []
        ids = [bos + tokenizer.encode(p) for p in prompts]
        sampling = SamplingConfig(
            max_new_tokens=min(max_new_tokens, NEW_TOKENS),
            stop_strings=tuple(stop),
            eos_ids=(tokenizer.eos_id,),
            vocab_size=tokenizer.vocab_size,
        )
        out = generate(loaded.model, ids, sampling, tokenizer=tokenizer, pad_id=tokenizer.pad_id)
        return [tokenizer.decode(row, skip_special_tokens=True) for row in out]

    run.calls = calls
    return run


@pytest.mark.parametrize("name", list(GENERATIVE_TASKS))
def test_tiny_random_model_scores_near_zero(model_generate, data_root, name):
    task = GENERATIVE_TASKS[name]
    model_generate.calls.clear()
    seen = []
    result = run_generative_task(
        name,
        model_generate,
        data_root,
        shots=None,
        limit=LIMITS[name],
        batch_size=8,
        chat=False,
        progress=lambda done, total: seen.append((done, total)),
    )
    low, high = BANDS[result["metric"]]
    assert low <= result["score"] <= high, result["score"]
    assert result["n"] >= 20
    assert sum(result["per_subject_n"].values()) == result["n"]
    assert all(low <= v <= high for v in result["per_subject"].values()), result["per_subject"]
    # The model was really asked: batches of at most 8, the task's budget and stop strings, every example once.
    assert all(
        n <= 8 and budget == task.max_new_tokens and stop == task.stop
        for n, budget, stop in model_generate.calls
    )
    assert sum(n for n, _, _ in model_generate.calls) == result["n"]
    assert seen[-1] == (result["n"], result["n"])
    assert any(example["completion"] for example in result["examples"])
    settings = result["settings"]
    assert settings["shots"] == task.shots and settings["max_new_tokens"] == task.max_new_tokens
    assert settings["stop_strings"] == list(task.stop) and settings["prompt_format"] == task.prompt_format
    if result["metric"] == "pass@1":
        assert {"cpu_s", "timeout_s", "memory_bytes", "network"} <= set(settings["sandbox"])


def _oracle(name: str, data_root: Path):
    """A generate that answers every prompt with the dataset's own solution (plus the next exemplar's start,
    which the stop string must cut off)."""
    task = GENERATIVE_TASKS[name]
    targets = {e.prompt: e.target for e in task.read(data_root, task.shots)}
    tail = task.stop[0] + " leftover" if task.stop else ""
    return lambda prompts, max_new_tokens, stop: [targets[p] + tail for p in prompts]


@pytest.mark.parametrize(
    "name,limit", [("gsm8k", None), ("math", None), ("humaneval", 40), ("mbpp", 40), ("flores", None)]
)
def test_oracle_scores_100(data_root, name, limit):
    result = run_generative_task(
        name, _oracle(name, data_root), data_root, shots=None, limit=limit, batch_size=64, chat=False
    )
    assert result["score"] == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in result["per_subject"].values())
    assert result["n"] == {"gsm8k": 1319, "math": 5000, "humaneval": 40, "mbpp": 40, "flores": 2 * 1004}[name]


def test_bbh_oracle_scores_100_but_where_the_data_contradicts_itself(data_root):
    # causal_judgement holds two questions twice, once with the target "Yes" and once with "No": no model, the
    # oracle included, answers both copies right (185/187). Every other task scores 100.
    result = run_generative_task("bbh", _oracle("bbh", data_root), data_root, shots=None, limit=None,
                                 batch_size=512, chat=False)  # fmt: skip
    assert result["n"] == 6511 and len(result["per_subject"]) == 27
    assert result["per_subject"].pop("causal_judgement") == pytest.approx(100 * 185 / 187)
    assert all(v == 100.0 for v in result["per_subject"].values())


def test_a_wrong_answer_scores_0(data_root):
    wrong = lambda prompts, n, stop: ["So the answer is (Z).\n#### -1\n\\boxed{-1}"] * len(prompts)  # noqa: E731
    for name in ("bbh", "gsm8k", "math"):
        result = run_generative_task(name, wrong, data_root, shots=None, limit=3, batch_size=8, chat=False)
        assert result["score"] == 0.0, name


def test_bbh_prompt_is_the_official_cot_prompt_then_the_question(data_root):
    official = (data_root / "bbh" / "cot-prompts" / "date_understanding.txt").read_text(encoding="utf-8")
    example = next(e for e in GENERATIVE_TASKS["bbh"].read(data_root, 3) if e.subject == "date_understanding")
    body = official.split("-----\n", 1)[1].strip()
    assert example.prompt.startswith(
        body + "\n\nQ: Today is Christmas Eve of 1937. What is the date tomorrow"
    )
    assert example.prompt.endswith("\nA: Let's think step by step.\n")
    assert example.prompt.count("So the answer is") == 3
    one_shot = [e for e in GENERATIVE_TASKS["bbh"].read(data_root, 1) if e.subject == "date_understanding"][0]
    assert one_shot.prompt.count("So the answer is") == 1


def test_gsm8k_shots_are_the_first_train_problems_without_calculator_marks(data_root):
    example = GENERATIVE_TASKS["gsm8k"].read(data_root, 4)[0]
    assert example.prompt.startswith("Question: Natalia sold clips to 48 of her friends in April")
    assert example.prompt.count("Question: ") == 5 and example.prompt.count("####") == 4
    assert "<<" not in example.prompt
    assert example.prompt.endswith("\nAnswer:") and example.reference == "18"


def test_mbpp_uses_tasks_2_3_4_as_shots_and_11_to_510_as_test(data_root):
    examples = GENERATIVE_TASKS["mbpp"].read(data_root, 3)
    assert len(examples) == 500 and MBPP_SHOT_IDS == (2, 3, 4)
    prompt = examples[0].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and "\r" not in prompt
    assert (
        "def similar_elements" in prompt and "def is_not_prime" in prompt and "heap_queue_largest" in prompt
    )
    assert prompt.endswith(
        "Your code should pass these tests:\n\n" + examples[0].reference.strip() + "\n[BEGIN]\n"
    )


def test_flores_shots_are_held_out_of_the_scored_lines(data_root):
    examples = GENERATIVE_TASKS["flores"].read(data_root, 8)
    eng = (data_root / "flores101" / "flores101_dataset" / "devtest" / "eng.devtest").read_text().splitlines()
    scored = {e.reference for e in examples if e.subject == "zh-en"}
    assert scored == set(eng[FLORES_SHOT_LINES:]) and not scored & set(eng[:FLORES_SHOT_LINES])
    assert examples[0].prompt.count("\nEnglish:") == 9 and examples[0].prompt.startswith("Chinese: ")
    assert [e.subject for e in examples[:: len(examples) // 2]] == ["zh-en", "en-zh"]


def test_math_prompt_is_minerva_4_shot(data_root):
    example = GENERATIVE_TASKS["math"].read(data_root, 4)[0]
    assert example.prompt.startswith("Problem:\nFind the domain of the expression")
    assert example.prompt.count("I hope it is correct.") == 4
    assert example.prompt.endswith("\n\nSolution:") and example.reference == "2"


def test_humaneval_chat_answer_in_a_fenced_block_is_run_as_a_whole_function(data_root):
    task = GENERATIVE_TASKS["humaneval"]
    example = task.read(data_root, 0)[0]
    assert task.chat_stop == ()
    solution = example.prompt[example.prompt.index("def ") :] + example.target
    answer = (
        f"Here is the function:\n```python\nfrom typing import List\n\n{solution}\n```\nIt loops over pairs."
    )
    chat = lambda prompts, n, stop: [answer] * len(prompts)  # noqa: E731
    result = run_generative_task("humaneval", chat, data_root, shots=None, limit=1, batch_size=1, chat=True)
    assert result["score"] == 100.0 and result["settings"]["stop_strings"] == []


def test_shots_and_limit_are_checked(data_root):
    with pytest.raises(ValueError, match="3 few-shot exemplars"):
        run_generative_task("mbpp", None, data_root, shots=4, limit=1, batch_size=1, chat=False)
    with pytest.raises(ValueError, match="limit"):
        run_generative_task("gsm8k", None, data_root, shots=None, limit=0, batch_size=1, chat=False)
    with pytest.raises(ValueError, match="unknown generation task 'gsm9k'; choose from bbh, gsm8k"):
        run_generative_task("gsm9k", None, data_root, shots=None, limit=1, batch_size=1, chat=False)
    with pytest.raises(FileNotFoundError, match="gsm8k"):
        run_generative_task(
            "gsm8k", None, Path("/nonexistent"), shots=None, limit=1, batch_size=1, chat=False
        )


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("a\n\nQ: b\nQuestion:", ["\nQuestion:", "\n\nQ:"]) == "a"
    assert cut_at_stop("no stop here", ["[DONE]"]) == "no stop here"
    assert cut_at_stop("x", []) == "x"


def test_flores_bleu_tokenizes_chinese_targets_by_character(data_root):
    # A Chinese translation that differs from the reference only in spaces is the same translation: BLEU with
    # sacrebleu's "zh" tokenizer scores it ~99, where "13a" (whitespace words) would give ~38.
    targets = {e.prompt: e.target for e in GENERATIVE_TASKS["flores"].read(data_root, 8)}

    def unspaced(prompts, max_new_tokens, stop):
        return [targets[p].replace(" ", "") if p.endswith("Chinese:") else targets[p] for p in prompts]

    result = run_generative_task(
        "flores", unspaced, data_root, shots=None, limit=None, batch_size=256, chat=False
    )
    assert result["per_subject"]["en-zh"] > 95.0 and result["per_subject"]["zh-en"] == pytest.approx(100.0)
    assert result["settings"]["tokenize"] == {"en": "13a", "zh": "zh"}
    assert result["settings"]["directions"] == ["zh-en", "en-zh"]
    assert result["settings"]["sacrebleu"] == __import__("sacrebleu").__version__
