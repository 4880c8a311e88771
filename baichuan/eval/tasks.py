"""The multiple-choice benchmarks as rows of data: per task a reader (data directory -> subjects, each with its
few-shot pool and its questions), a prompt format, the answer letters and how the averages are taken.

Every prompt is `header + shots (with answers) + question (without)`, and the score is which answer letter has
the highest next-token logit after it, as the official scripts of C-Eval, MMLU and CMMLU score base models.

The three formats copied character for character (tests/eval/test_prompts.py builds the same strings the way
those scripts do):
- C-Eval: hkust-nlp/ceval code/evaluator_series/evaluators/llama.py @ 802229fee547 (`format_example`,
  `generate_few_shot_prompt`): "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n", then per item
  "{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n". The subject is its Chinese name (the C-Eval
  README and its prompt figure; eval_llama.py passes the file key instead).
- MMLU: hendrycks/test evaluate.py @ 0f23bce36fb9 (`format_subject`, `format_example`, `gen_prompt`):
  "The following are multiple choice questions (with answers) about {format_subject(s)}.\\n\\n" (format_subject
  puts a space before every word, hence two spaces after "about"), items "{q}\\nA. {A}...\\nAnswer: {answer}\\n\\n".
- CMMLU: haonan-li/CMMLU src/mp_utils.py @ 0b27e9f4407441d1 (`format_example`, `gen_prompt`, cot=False):
  "以下是关于{中文科目名}的单项选择题，请直接给出正确答案的选项。\\n\\n", items "题目：{q}\\nA. {A}...\\n答案是：{answer}\\n\\n".

Where the official scripts read CSVs with pandas, we read the file's text as it is: pandas would write an empty
cell as "nan" and an option "1.50" as "1.5".

The other tasks have no official few-shot likelihood script; the prompt chosen for each is stated on its row:
Chinese tasks take the C-Eval layout, English ones the MMLU layout.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baichuan.eval import subjects as tables

LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    text: str
    options: tuple[tuple[str, str], ...]  # (letter, text); empty where the options are part of `text`
    answer: str  # a letter


@dataclass(frozen=True)
class Subject:
    name: str
    title: str  # how the prompt header names it
    categories: tuple[str, ...]
    shots: list[Question]  # the few-shot pool, in the order shots are taken
    questions: list[Question]
    format: Format | None = None  # where it differs from its task's (AGIEval's English tasks, MCMLE)


@dataclass(frozen=True)
class Format:
    """How one item is written: `question_prefix + text + options + cue`, then `letter` and `after` for a
    shot. The scored token of a letter is the last token of `cue + letter` (as it reads in the shots)."""

    header: str  # with {title}
    cue: str
    letter: str = "{letter}"
    after: str = "\n\n"
    option: str = "\n{letter}. {text}"
    question_prefix: str = ""

    def item(self, question: Question, with_answer: bool) -> str:
        text = self.question_prefix + question.text
        text += "".join(self.option.format(letter=k, text=v) for k, v in question.options)
        text += self.cue
        if with_answer:
            text += self.letter.format(letter=question.answer) + self.after
        return text

    def prompt(self, title: str, shots: list[Question], question: Question) -> str:
        head = self.header.format(title=title)
        return head + "".join(self.item(s, True) for s in shots) + self.item(question, False)


CEVAL_FORMAT = Format(
    header="以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n", cue="\n答案："
)
MMLU_FORMAT = Format(
    header="The following are multiple choice questions (with answers) about {title}.\n\n",
    cue="\nAnswer:",
    letter=" {letter}",
)
CMMLU_FORMAT = Format(
    header="以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n",
    cue="\n答案是：",
    question_prefix="题目：",
)
# Questions whose options are written inside the question text (GAOKAO-Bench).
INLINE_ZH_FORMAT = Format(header=CEVAL_FORMAT.header, cue="\n答案：", option="")
AGIEVAL_ZH_FORMAT = Format(
    header="以下是关于{title}的单项选择题，请选出其中的正确答案。\n\n", cue="\n答案：", option="\n{text}"
)
AGIEVAL_EN_FORMAT = Format(
    header="The following are multiple choice questions (with answers) about {title}.\n\n",
    cue="\nAnswer:",
    letter=" {letter}",
    option="\n{text}",
)


@dataclass(frozen=True)
class Task:
    """A multiple-choice benchmark. `read(data_dir, seed)` gives its subjects; `average` is "subjects" (the
    mean of subject accuracies, as C-Eval and CMMLU report) or "questions" (hendrycks' weighted mean)."""

    name: str
    title: str  # column name in results.md
    read: Callable[[Path, int | None], list[Subject]]
    format: Format
    average: str = "subjects"
    category_order: tuple[str, ...] = ()
    hard: tuple[str, ...] = ()  # C-Eval's Avg(Hard)
    shot_source: str = ""  # where shots come from, for the result file
    default_shots: int = 5
    seeded: bool = True  # whether the seed orders the shots (MMLU and CMMLU take dev in file order)


class DataError(ValueError):
    """A data directory that does not hold what a task reads."""


# --- readers -------------------------------------------------------------------------------------------------


def _need(path: Path) -> Path:
    if not path.exists():
        raise DataError(
            f"{path} is missing (the data directory is laid out like ../shared/data; see its README)"
        )
    return path


def _csv_rows(path: Path, header: bool) -> list[list[str]]:
    with open(_need(path), encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


def _option_question(text: str, options: list[str], answer: str) -> Question:
    return Question(text, tuple(zip(LETTERS, options, strict=True)), answer.strip())


def _shuffled(rows: list[Question], seed: int | None) -> list[Question]:
    if seed is None:
        return rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def read_ceval(data_dir: Path, seed: int | None, names: tuple[str, ...] | None = None) -> list[Subject]:
    """C-Eval: shots from dev (the official script takes them in file order; HF users shuffle them unseeded, so a
    seed pins the order and is recorded), scored on val (test has no answers)."""
    root = _need(data_dir / "ceval")
    out = []
    for name in names or sorted(tables.CEVAL):
        title, category = tables.CEVAL[name]
        # id,question,A,B,C,D,answer[,explanation]
        dev = [
            _option_question(r[1], r[2:6], r[6]) for r in _csv_rows(root / "dev" / f"{name}_dev.csv", True)
        ]
        val = [
            _option_question(r[1], r[2:6], r[6]) for r in _csv_rows(root / "val" / f"{name}_val.csv", True)
        ]
        out.append(Subject(name, title, (category,), _shuffled(dev, seed), val))
    return out


def mmlu_title(subject: str) -> str:
    """hendrycks' format_subject: every word preceded by a space."""
    return "".join(" " + word for word in subject.split("_"))


def read_mmlu(data_dir: Path, seed: int | None, names: tuple[str, ...] | None = None) -> list[Subject]:
    """MMLU: headerless CSVs question,A,B,C,D,answer; shots from dev in file order, scored on test."""
    root = _need(data_dir / "mmlu")
    out = []
    for name in names or sorted(tables.MMLU):
        dev = [
            _option_question(r[0], r[1:5], r[5]) for r in _csv_rows(root / "dev" / f"{name}_dev.csv", False)
        ]
        test = [
            _option_question(r[0], r[1:5], r[5]) for r in _csv_rows(root / "test" / f"{name}_test.csv", False)
        ]
        out.append(Subject(name, mmlu_title(name), (tables.MMLU[name],), dev, test))
    return out


def read_cmmlu(data_dir: Path, seed: int | None, names: tuple[str, ...] | None = None) -> list[Subject]:
    """CMMLU: `,Question,A,B,C,D,Answer` with an unnamed index column; shots from dev, scored on test."""
    root = _need(data_dir / "cmmlu")
    out = []
    for name in names or sorted(tables.CMMLU):
        title, categories = tables.CMMLU[name]
        dev = [_option_question(r[1], r[2:6], r[6]) for r in _csv_rows(root / "dev" / f"{name}.csv", True)]
        test = [_option_question(r[1], r[2:6], r[6]) for r in _csv_rows(root / "test" / f"{name}.csv", True)]
        out.append(Subject(name, title, categories, dev, test))
    return out


def _jsonl(path: Path) -> list[dict]:
    with open(_need(path), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _split_pool(
    rows: list[Question], seed: int | None, pool: int = 5
) -> tuple[list[Question], list[Question]]:
    """Tasks without a dev split: the first `pool` questions of a seeded shuffle are the shots, the rest are
    scored (file order when seed is None)."""
    rows = _shuffled(rows, seed)
    return rows[:pool], rows[pool:]


# GAOKAO-Bench single-choice files (the multi-answer English reading/cloze files are left out, as Baichuan did).
GAOKAO_SUBJECTS = {
    "2010-2022_Biology_MCQs": "生物",
    "2010-2022_Chemistry_MCQs": "化学",
    "2010-2022_Chinese_Lang_and_Usage_MCQs": "语文",
    "2010-2022_Chinese_Modern_Lit": "语文",
    "2010-2022_Geography_MCQs": "地理",
    "2010-2022_History_MCQs": "历史",
    "2010-2022_Math_I_MCQs": "数学",
    "2010-2022_Math_II_MCQs": "数学",
    "2010-2022_Physics_MCQs": "物理",
    "2010-2022_Political_Science_MCQs": "政治",
    "2010-2013_English_MCQs": "英语",
}


def read_gaokao(data_dir: Path, seed: int | None) -> list[Subject]:
    """GAOKAO-Bench objective questions with one answer letter in A-D; the options are inline in the question.
    Baichuan re-split these at random: here the first 5 of a seeded shuffle are the shots."""
    root = _need(data_dir / "gaokao_bench" / "Data" / "Objective_Questions")
    out = []
    for stem, title in GAOKAO_SUBJECTS.items():
        items = json.loads(_need(root / f"{stem}.json").read_text(encoding="utf-8"))["example"]
        rows = [
            Question(item["question"].strip(), (), item["answer"][0])
            for item in items
            if len(item["answer"]) == 1 and item["answer"][0] in LETTERS
        ]
        shots, questions = _split_pool(rows, seed)
        out.append(Subject(stem, f"高考{title}", ("Gaokao",), shots, questions))
    return out


# AGIEval v1: Baichuan's "4-option single choice" tasks.
AGIEVAL_ZH = {
    "gaokao-biology": "高考生物",
    "gaokao-chinese": "高考语文",
    "gaokao-english": "高考英语",
    "gaokao-geography": "高考地理",
    "gaokao-history": "高考历史",
    "gaokao-mathqa": "高考数学",
    "logiqa-zh": "逻辑推理",
    "jec-qa-kd": "司法考试",
    "jec-qa-ca": "司法考试",
}
AGIEVAL_EN = {"logiqa-en": "logical reasoning", "sat-math": "SAT math"}


def _agieval_question(row: dict) -> Question | None:
    label = row["label"]
    if isinstance(label, list):
        label = label[0] if len(label) == 1 else None
    if label not in tuple(LETTERS) or len(row["options"]) != 4:
        return None
    text = (row.get("passage") or "") + row["question"]
    return Question(text, tuple(zip(LETTERS, row["options"], strict=True)), label)


def read_agieval(data_dir: Path, seed: int | None) -> list[Subject]:
    """AGIEval v1 4-option single-choice tasks (items with one label among four options); options are kept as
    written ("(A)..."), one per line. Shots: the first 5 of a seeded shuffle of each task."""
    root = _need(data_dir / "agieval" / "data" / "v1")
    out = []
    for name, title in {**AGIEVAL_ZH, **AGIEVAL_EN}.items():
        rows = [q for q in map(_agieval_question, _jsonl(root / f"{name}.jsonl")) if q is not None]
        shots, questions = _split_pool(rows, seed)
        if name in AGIEVAL_EN:
            out.append(Subject(name, title, ("English",), shots, questions, AGIEVAL_EN_FORMAT))
        else:
            out.append(Subject(name, title, ("Chinese",), shots, questions))
    return out


def read_jec_qa(data_dir: Path, seed: int | None) -> list[Subject]:
    """JEC-QA knowledge-driven questions (0_train.json, the only split with answers) with one answer letter;
    shots: the first 5 of a seeded shuffle. (AGIEval's jec-qa-kd/ca are scored under `agieval`.)"""
    rows = []
    for item in _jsonl(data_dir / "jec_qa" / "0_train.json"):
        answer = item.get("answer") or []
        options = item.get("option_list") or {}
        if len(answer) == 1 and sorted(options) == list(LETTERS):
            rows.append(Question(item["statement"].strip(), tuple(sorted(options.items())), answer[0]))
    shots, questions = _split_pool(rows, seed)
    return [Subject("kd", "司法考试", ("JEC-QA",), shots, questions)]


def _medqa_rows(path: Path) -> list[Question]:
    rows = []
    for item in _jsonl(path):
        options = tuple(sorted(item["options"].items()))
        rows.append(Question(item["question"].strip(), options, item["answer_idx"]))
    return rows


def read_medqa(data_dir: Path, seed: int | None) -> list[Subject]:
    """MedQA: USMLE 4-option (jind11 questions/US/4_options), shots from dev in file order, scored on test;
    MCMLE (questions/Mainland/4_options) the same way where present (it is not in ../shared/data)."""
    root = _need(data_dir / "medqa" / "questions")
    out = []
    for name, folder, title in (("usmle", "US", "medicine"), ("mcmle", "Mainland", "医学")):
        base = root / folder / "4_options"
        if folder == "Mainland" and not base.exists():
            continue
        dev = _medqa_rows(base / "phrases_no_exclude_dev.jsonl")
        test = _medqa_rows(base / "phrases_no_exclude_test.jsonl")
        fmt = CEVAL_FORMAT if folder == "Mainland" else None
        out.append(Subject(name, title, (name.upper(),), _shuffled(dev, seed), test, fmt))
    return out


def read_medmcqa(data_dir: Path, seed: int | None) -> list[Subject]:
    """MedMCQA: the official dev.json (opa-opd, cop 1-4) where present, else medagents' 2,816-question subset of
    dev (options A-D, answer_idx). Shots: the first 5 of a seeded shuffle."""
    root = _need(data_dir / "medmcqa")
    rows = []
    if (root / "dev.json").exists():
        for item in _jsonl(root / "dev.json"):
            options = [item[k] for k in ("opa", "opb", "opc", "opd")]
            rows.append(_option_question(item["question"].strip(), options, LETTERS[int(item["cop"]) - 1]))
    else:
        for item in _jsonl(root / "medagents_test.jsonl"):
            rows.append(
                Question(item["question"].strip(), tuple(sorted(item["options"].items())), item["answer_idx"])
            )
    shots, questions = _split_pool(rows, seed)
    return [Subject("dev", "medicine", ("MedMCQA",), shots, questions)]


def _subset(reader, names: tuple[str, ...]):
    return lambda data_dir, seed: reader(data_dir, seed, names)


# --- the table -----------------------------------------------------------------------------------------------

POOL = "the first 5 of the questions shuffled with the seed (the rest are scored)"
CEVAL_CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
MMLU_CATEGORIES = ("Humanities", "Social Sciences", "STEM", "Other")
CMMLU_CATEGORIES = ("STEM", "Humanities", "Social Sciences", "Other", "China specific")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "ceval",
            "C-Eval",
            read_ceval,
            CEVAL_FORMAT,
            "subjects",
            CEVAL_CATEGORIES,
            tables.CEVAL_HARD,
            "dev, shuffled with the seed",
        ),
        Task(
            "mmlu",
            "MMLU",
            read_mmlu,
            MMLU_FORMAT,
            "questions",
            MMLU_CATEGORIES,
            shot_source="dev, file order",
            seeded=False,
        ),
        Task(
            "cmmlu",
            "CMMLU",
            read_cmmlu,
            CMMLU_FORMAT,
            "subjects",
            CMMLU_CATEGORIES,
            shot_source="dev, file order",
            seeded=False,
        ),
        Task("gaokao", "Gaokao", read_gaokao, INLINE_ZH_FORMAT, "questions", shot_source=POOL),
        Task(
            "agieval",
            "AGIEval",
            read_agieval,
            AGIEVAL_ZH_FORMAT,
            "questions",
            shot_source=POOL,
        ),
        Task("jec_qa", "JEC-QA", read_jec_qa, CEVAL_FORMAT, "questions", shot_source=POOL),
        Task(
            "medqa",
            "MedQA",
            read_medqa,
            MMLU_FORMAT,
            "questions",
            shot_source="dev, shuffled with the seed",
        ),
        Task("medmcqa", "MedMCQA", read_medmcqa, MMLU_FORMAT, "questions", shot_source=POOL),
        Task(
            "ceval_medical",
            "C-Eval medical",
            _subset(read_ceval, tables.MEDICAL["ceval"]),
            CEVAL_FORMAT,
            "subjects",
            shot_source="dev, shuffled with the seed",
        ),
        Task(
            "mmlu_medical",
            "MMLU medical",
            _subset(read_mmlu, tables.MEDICAL["mmlu"]),
            MMLU_FORMAT,
            "questions",
            shot_source="dev, file order",
            seeded=False,
        ),
        Task(
            "cmmlu_medical",
            "CMMLU medical",
            _subset(read_cmmlu, tables.MEDICAL["cmmlu"]),
            CMMLU_FORMAT,
            "subjects",
            shot_source="dev, file order",
            seeded=False,
        ),
    )
}


def format_for(task: Task, subject: Subject) -> Format:
    """The format of one subject: its own where it has one, else its task's."""
    return subject.format or task.format
