"""One C-Eval, one MMLU and one CMMLU prompt, equal character for character to what the official scripts build.

The expected strings are built here the way those scripts build them, from DataFrames read as they read them
(pandas, same arguments):
- C-Eval: hkust-nlp/ceval code/evaluator_series/evaluators/llama.py @ 802229fee547c3a0807b44e5df88581790f9ee88,
  `generate_few_shot_prompt` + `format_example(include_answer=False)` (k=5, cot=False), with the subject's
  Chinese name from subject_mapping.json (the C-Eval README's prompt) and the dev rows in file order or in
  our recorded seeded order.
- MMLU: hendrycks/test evaluate.py @ 0f23bce36fb9d6a6dd13d0d84f3f244821d9e646 (`gen_prompt(dev_df, subject, 5)` +
  `format_example(test_df, i, include_answer=False)`); evaluate_hf.py @ 82d60d25 builds the same.
- CMMLU: haonan-li/CMMLU src/mp_utils.py @ 0b27e9f4407441d16f5b3abc208f8080f204f1ec (`gen_prompt(dev_df, subject,
  prompt_end, num_few_shot=5, tokenizer=None)` with `prompt_end = format_example(test_df, i, subject,
  include_answer=False)`), the subject's Chinese name from src/categories.py name_en2zh.
"""

# ruff: noqa: UP032  (.format calls kept as the official scripts write them)

from __future__ import annotations

import random

import pytest

from baichuan.eval.tasks import TASKS

pd = pytest.importorskip("pandas")  # installed with lm-eval ([test]); the official scripts read CSVs with it
CHOICES = ["A", "B", "C", "D"]


def ceval_official(dev_df, val_row, subject_zh: str) -> str:
    def format_example(line, include_answer=True):
        example = line["question"]
        for choice in CHOICES:
            example += f"\n{choice}. {line[f'{choice}']}"
        if include_answer:
            example += "\n答案：" + line["answer"] + "\n\n"
        else:
            example += "\n答案："
        return example

    prompt = f"以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n\n"
    for i in range(5):
        prompt += format_example(dev_df.iloc[i, :])
    return prompt + format_example(val_row, include_answer=False)


def mmlu_official(dev_df, test_df, idx: int, subject: str) -> str:
    def format_subject(subject):
        return "".join(" " + entry for entry in subject.split("_"))

    def format_example(df, idx, include_answer=True):
        prompt = df.iloc[idx, 0]
        k = df.shape[1] - 2
        for j in range(k):
            prompt += "\n{}. {}".format(CHOICES[j], df.iloc[idx, j + 1])
        prompt += "\nAnswer:"
        if include_answer:
            prompt += " {}\n\n".format(df.iloc[idx, k + 1])
        return prompt

    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(
        format_subject(subject)
    )
    for i in range(5):
        prompt += format_example(dev_df, i)
    return prompt + format_example(test_df, idx, include_answer=False)


def cmmlu_official(dev_df, test_df, idx: int, subject_zh: str) -> str:
    def format_example(df, idx, include_answer=True):
        prompt = "题目：" + df.iloc[idx, 0]
        k = df.shape[1] - 2
        for j in range(k):
            prompt += "\n{}. {}".format(CHOICES[j], df.iloc[idx, j + 1])
        prompt += "\n答案是："
        if include_answer:
            prompt += "{}\n\n".format(df.iloc[idx, k + 1])
        return prompt

    prompt = "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n".format(subject_zh)
    for i in range(5):
        prompt += format_example(dev_df, i)
    return prompt + format_example(test_df, idx, include_answer=False)


def ours(task: str, data_root, subject: str, idx: int, seed) -> str:
    from baichuan.eval.tasks import format_for

    t = TASKS[task]
    (s,) = [s for s in t.read(data_root, seed) if s.name == subject]
    return format_for(t, s).prompt(s.title, s.shots[:5], s.questions[idx])


@pytest.mark.parametrize("seed", [None, 1234], ids=["file-order", "seed-1234"])
def test_ceval_prompt_is_the_official_one(data_root, seed):
    dev_df = pd.read_csv(data_root / "ceval" / "dev" / "computer_network_dev.csv")
    val_df = pd.read_csv(data_root / "ceval" / "val" / "computer_network_val.csv")
    if seed is not None:  # the recorded shot order: random.Random(seed).shuffle of the dev rows
        order = list(range(len(dev_df)))
        random.Random(seed).shuffle(order)
        dev_df = dev_df.iloc[order]
    expected = ceval_official(dev_df, val_df.iloc[3], "计算机网络")
    assert ours("ceval", data_root, "computer_network", 3, seed) == expected
    assert expected.startswith("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n")
    assert expected.endswith("\n答案：")


def test_mmlu_prompt_is_the_official_one(data_root):
    dev_df = pd.read_csv(data_root / "mmlu" / "dev" / "college_medicine_dev.csv", header=None)[:5]
    test_df = pd.read_csv(data_root / "mmlu" / "test" / "college_medicine_test.csv", header=None)
    expected = mmlu_official(dev_df, test_df, 7, "college_medicine")
    assert ours("mmlu", data_root, "college_medicine", 7, 1234) == expected
    # format_subject's leading space: two spaces after "about", as the official prompt has them
    assert expected.startswith(
        "The following are multiple choice questions (with answers) about  college medicine."
    )


def test_cmmlu_prompt_is_the_official_one(data_root):
    path = ("dev", "test")
    dev_df, test_df = (
        pd.read_csv(data_root / "cmmlu" / p / "agronomy.csv", header=0, index_col=0) for p in path
    )
    expected = cmmlu_official(dev_df, test_df, 0, "农学")
    assert ours("cmmlu", data_root, "agronomy", 0, 1234) == expected
    assert "题目：在农业生产中被当作极其重要的劳动对象发挥作用" in expected


def test_letter_tokens_are_the_ones_the_shots_teach(runner):
    """The scored id of a letter is the token it is after the cue, as in the shots: 'A' after "答案：", '▁A'
    after "Answer:" (this tokenizer's dummy prefix makes a bare encode('A') '▁A' in both)."""
    from baichuan.eval.tasks import CEVAL_FORMAT, MMLU_FORMAT

    tok = runner.tokenizer
    zh, en = runner.letter_ids(CEVAL_FORMAT, "AB"), runner.letter_ids(MMLU_FORMAT, "AB")
    assert [tok.id_to_piece(i) for i in zh] == ["A", "B"]
    assert [tok.id_to_piece(i) for i in en] == ["▁A", "▁B"]
    shot = tok.encode("答案：B\n\n")
    assert zh[1] in shot


def test_each_agieval_task_gets_the_layout_of_its_language(data_root):
    from baichuan.eval.tasks import format_for

    task = TASKS["agieval"]
    prompts = {
        s.name: format_for(task, s).prompt(s.title, s.shots[:5], s.questions[0])
        for s in task.read(data_root, 1234)
    }
    assert prompts["logiqa-en"].startswith(
        "The following are multiple choice questions (with answers) about logical"
    )
    assert prompts["logiqa-en"].endswith("\nAnswer:") and "\n(A)" in prompts["logiqa-en"]
    assert prompts["logiqa-zh"].startswith("以下是关于逻辑推理的单项选择题，请选出其中的正确答案。\n\n")
    assert prompts["logiqa-zh"].endswith("\n答案：")
