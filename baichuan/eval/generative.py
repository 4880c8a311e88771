"""The generation tasks: BBH, GSM8K, MATH, HumanEval, MBPP and Flores-101, each a row of data.

A task is a reader of its official files that builds each example's prompt (the few-shot exemplars and the
query), the stop strings and token budget of its greedy completion, a parser of the completion, and a metric.
`run_generative_task` does the rest the same way for all of them: batches the prompts (longest first), cuts each
completion at its stop string, parses, scores per subject, and records the settings that reproduce the score.

The data directory is laid out like ../shared/data (see its README), one folder per benchmark, official names.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from baichuan.eval import answers, sandbox

Generate = Callable[[list[str], int, list[str]], list[str]]


@dataclass(frozen=True)
class Example:
    subject: str
    prompt: str
    reference: str  # what the parsed answer is compared with: an answer, test code, or a translation
    target: str  # the dataset's own completion (worked solution, canonical code): what a perfect model writes


@dataclass(frozen=True)
class Scored:
    per_subject: dict[str, float]  # 0-100
    correct: list[bool] | None  # per example, where the metric is per example (not BLEU)


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    shots: int  # the published setting; `run_generative_task(shots=...)` may ask for fewer
    max_shots: int
    max_new_tokens: int
    stop: tuple[str, ...]
    prompt_format: str  # how a prompt is built, in words, for the result file
    read: Callable[[Path, int], list[Example]]  # (data_dir, shots) -> examples, in file order
    parse: Callable[[str, Example], str | None]  # (completion cut at the stop string, example) -> prediction
    score: Callable[[list[Example], list[str | None], sandbox.Limits], Scored]
    aggregate: Literal["micro", "macro"]  # the task's score: over all examples, or the mean of its subjects
    # Stop strings where prompts are in the chat format (None: `stop`).
    chat_stop: tuple[str, ...] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # more settings for the result file
    # Settings known only at run time (sandbox limits, library versions); raises ImportError, before any
    # generation, where a library the metric needs is missing.
    run_notes: Callable[[sandbox.Limits], dict[str, Any]] = lambda limits: {}


# --- reading ----------------------------------------------------------------------------------------------------


def _need(path: Path, task: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the {task} task reads it (lay the data out as ../shared/data)"
        )
    return path


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _check_shots(task: str, shots: int, max_shots: int) -> None:
    if not 0 <= shots <= max_shots:
        raise ValueError(f"{task} has {max_shots} few-shot exemplars; --shots {shots} is not possible")


# --- metrics ----------------------------------------------------------------------------------------------------


def _per_subject(examples: Sequence[Example], correct: Sequence[bool]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for example, ok in zip(examples, correct, strict=True):
        hits = totals.setdefault(example.subject, [0, 0])
        hits[0] += int(ok)
        hits[1] += 1
    return {subject: 100.0 * hit / n for subject, (hit, n) in totals.items()}


def _accuracy(equal: Callable[[str | None, str], bool]):
    def score(examples: list[Example], predictions: list[str | None], limits: sandbox.Limits) -> Scored:
        correct = [equal(p, e.reference) for e, p in zip(examples, predictions, strict=True)]
        return Scored(_per_subject(examples, correct), correct)

    return score


def _exact(prediction: str | None, reference: str) -> bool:
    return prediction is not None and prediction == reference


def _pass_at_1(examples: list[Example], programs: list[str | None], limits: sandbox.Limits) -> Scored:
    """Greedy pass@1: the one completion of each problem passes its tests in the sandbox."""
    outcomes = sandbox.run_many([p or "raise SystemExit(1)" for p in programs], limits)
    correct = [program is not None and o.passed for program, o in zip(programs, outcomes, strict=True)]
    return Scored(_per_subject(examples, correct), correct)


def _sandbox_notes(limits: sandbox.Limits) -> dict[str, Any]:
    return {"sandbox": sandbox.describe(limits)}


def _bleu_notes(limits: sandbox.Limits) -> dict[str, Any]:
    try:
        import sacrebleu
    except ImportError:
        raise ImportError(
            "the flores task scores BLEU with sacrebleu: pip install 'baichuan-toolkit[eval]'"
        ) from None
    return {"sacrebleu": sacrebleu.__version__}


def _bleu(examples: list[Example], predictions: list[str | None], limits: sandbox.Limits) -> Scored:
    """Corpus BLEU per direction (sacrebleu's defaults), with the tokenizer of the target language."""
    import sacrebleu

    per_subject = {}
    for subject in dict.fromkeys(e.subject for e in examples):
        rows = [
            (p or "", e.reference) for e, p in zip(examples, predictions, strict=True) if e.subject == subject
        ]
        hypotheses, references = zip(*rows, strict=True)
        tokenize = _FLORES_TOKENIZE[subject.split("-")[1]]
        per_subject[subject] = sacrebleu.corpus_bleu(
            list(hypotheses), [list(references)], tokenize=tokenize
        ).score
    return Scored(per_subject, None)


# --- BBH --------------------------------------------------------------------------------------------------------

_BBH_QUERY = "Q: {input}\nA: Let's think step by step.\n"


def _bbh_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("bbh", shots, 3)
    root = _need(data_dir / "bbh", "bbh")
    examples = []
    for path in sorted(_need(root / "bbh", "bbh").glob("*.json")):
        subject = path.stem
        # cot-prompts/<task>.txt: a canary line, "-----", the task description, then three "Q: ... A: Let's think
        # step by step. ... So the answer is X." blocks separated by blank lines.
        text = _need(root / "cot-prompts" / f"{subject}.txt", "bbh").read_text(encoding="utf-8")
        description, *blocks = text.split("-----\n", 1)[1].strip().split("\n\nQ: ")
        if len(blocks) != 3:
            raise ValueError(
                f"{root / 'cot-prompts' / subject}.txt: expected 3 exemplars, found {len(blocks)}"
            )
        prefix = "\n\n".join([description] + ["Q: " + b for b in blocks[:shots]]) + "\n\n"
        for row in json.loads(path.read_text(encoding="utf-8"))["examples"]:
            prompt = prefix + _BBH_QUERY.format(input=row["input"])
            examples.append(Example(subject, prompt, row["target"], f"So the answer is {row['target']}."))
    return examples


BBH = Task(
    name="bbh",
    metric="exact_match",
    shots=3,
    max_shots=3,
    max_new_tokens=512,
    stop=("\n\nQ:",),
    prompt_format=(
        "the official cot-prompts/<task>.txt of suzgunmirac/BIG-Bench-Hard (task description and the first "
        "`shots` of its 3 'Q: ... A: Let's think step by step. ... So the answer is X.' blocks, blank-line "
        "separated), then '\\n\\nQ: {input}\\nA: Let\\'s think step by step.\\n'; answer: the text after the first "
        "'the answer is' up to the end of its line, without the final period, and the first '(X)' in it where "
        "the target is an option; exact match; score: mean of the 27 task accuracies"
    ),
    read=_bbh_read,
    parse=lambda completion, example: answers.bbh_answer(completion, example.reference),
    score=_accuracy(_exact),
    aggregate="macro",
)


# --- GSM8K ------------------------------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # the <<48/2=24>> calculator annotations of the reference solutions


def _gsm8k_solution(answer: str) -> str:
    return _CALCULATOR.sub("", answer)


def _gsm8k_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("gsm8k", shots, 8)
    root = _need(data_dir / "gsm8k" / "grade_school_math" / "data", "gsm8k")
    exemplars = list(itertools.islice(_jsonl(_need(root / "train.jsonl", "gsm8k")), shots))
    prefix = "".join(
        f"Question: {r['question']}\nAnswer: {_gsm8k_solution(r['answer'])}\n\n" for r in exemplars
    )
    return [
        Example(
            "gsm8k",
            prefix + f"Question: {row['question']}\nAnswer:",
            answers.gsm8k_reference(row["answer"]),
            " " + _gsm8k_solution(row["answer"]),
        )
        for row in _jsonl(_need(root / "test.jsonl", "gsm8k"))
    ]


GSM8K = Task(
    name="gsm8k",
    metric="exact_match",
    shots=4,
    max_shots=8,
    max_new_tokens=512,
    stop=("\n\nQuestion:", "\nQuestion:"),
    prompt_format=(
        "'Question: {question}\\nAnswer: {answer}\\n\\n' for the first `shots` problems of train.jsonl, the "
        "reference answer with its <<...>> calculator annotations removed (so it ends '#### <number>'), then "
        "'Question: {question}\\nAnswer:'; answer: the number after '####', else after 'the answer is', else the "
        "last number (commas and $ dropped), compared as a decimal number"
    ),
    read=_gsm8k_read,
    parse=lambda completion, example: answers.gsm8k_answer(completion),
    score=_accuracy(_exact),
    aggregate="micro",
)


# --- MATH -------------------------------------------------------------------------------------------------------

# The 4-shot prompt of Minerva (Lewkowycz et al. 2022, "Solving Quantitative Reasoning Problems with Language
# Models", appendix): four problems of the MATH train split with Minerva's closing line, the exemplars that
# lm-evaluation-harness' minerva_math and OpenCompass prompt with. Retyped here with the paper's LaTeX: a public
# copy of lm-eval's minerva_math/utils.py differs in two details of whitespace and escaping (a single backslash
# at the two align row breaks, a line break before "find" in the fourth problem). The train split is not in
# ../shared/data.
MINERVA_EXEMPLARS = (
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
        "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives "
        "$x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\n"
        "Final Answer: The final answer is $[2,5)$. I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
        "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
        "times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
        "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
        "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
        "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
        "Final Answer: The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
        "$(x, y)$ where $x$ and $y$ are both nonzero, find $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
        "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
        "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
)


def _math_block(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def _math_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("math", shots, len(MINERVA_EXEMPLARS))
    prefix = "".join(f"{_math_block(p)} {s}\n\n" for p, s in MINERVA_EXEMPLARS[:shots])
    # math/test.json is JSON Lines despite its name: the 5,000 test problems with their original fields.
    return [
        Example(
            row["type"],
            prefix + _math_block(row["problem"]),
            answers.math_reference(row["solution"]),
            " " + row["solution"],
        )
        for row in _jsonl(_need(data_dir / "math" / "test.json", "math"))
    ]


MATH = Task(
    name="math",
    metric="exact_match",
    shots=4,
    max_shots=4,
    max_new_tokens=512,
    stop=("\n\nProblem:", "\nProblem:"),
    prompt_format=(
        "Minerva's 4 exemplars (MINERVA_EXEMPLARS) as 'Problem:\\n{problem}\\n\\nSolution: {solution}\\n\\n', "
        "each solution ending 'Final Answer: The final answer is $X$. I hope it is correct.', then "
        "'Problem:\\n{problem}\\n\\nSolution:'; answer: Minerva's final-answer line, else the last \\boxed{}; "
        "reference: the last \\boxed{} of the solution; equal after answers.normalize_math (Hendrycks' "
        "strip_string rules and Minerva's unit words); score over all problems, per type"
    ),
    read=_math_read,
    parse=lambda completion, example: answers.math_answer(completion),
    score=_accuracy(answers.math_equal),
    aggregate="micro",
)


# --- HumanEval --------------------------------------------------------------------------------------------------


def _humaneval_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("humaneval", shots, 0)
    path = _need(data_dir / "humaneval" / "data" / "HumanEval.jsonl.gz", "humaneval")
    return [
        Example(
            "humaneval",
            row["prompt"],
            f"{row['test']}\n\ncheck({row['entry_point']})\n",
            row["canonical_solution"],
        )
        for row in _jsonl(path)
    ]


def _humaneval_program(completion: str, example: Example) -> str:
    """The prompt, then the completion, then the tests. Where the completion holds a fenced block that defines
    the function itself (a chat model's answer), that block follows the prompt instead: it starts at column 0
    after the prompt's stub, whose docstring `pass` closes, and its definition replaces the stub."""
    entry = re.search(r"check\((\w+)\)\n$", example.reference).group(1)
    block = answers.code_block(completion)
    if block is not None and re.search(rf"^def {re.escape(entry)}\(", block, re.MULTILINE):
        return f"{example.prompt}\n    pass\n\n{block}\n\n{example.reference}"
    return f"{example.prompt}{completion}\n\n{example.reference}"


HUMANEVAL = Task(
    name="humaneval",
    metric="pass@1",
    shots=0,
    max_shots=0,
    max_new_tokens=512,
    # The stop sequences of the Codex paper (Chen et al. 2021): a new top-level statement ends the
    # function body. A chat model answers a whole fenced function, which they would cut: it stops at EOS only.
    stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
    chat_stop=(),
    prompt_format=(
        "the problem's prompt as it is (signature and docstring); program: prompt + completion (or, for a "
        "completion with a fenced block that defines the entry point, prompt + '    pass' + that block) + the "
        "problem's test + 'check(<entry_point>)', run in the sandbox; greedy pass@1"
    ),
    read=_humaneval_read,
    parse=_humaneval_program,
    score=_pass_at_1,
    aggregate="micro",
    run_notes=_sandbox_notes,
)


# --- MBPP -------------------------------------------------------------------------------------------------------

# google-research/mbpp README: task ids 11-510 are the test split and 1-10 the prompt pool; Austin et al. 2021
# used tasks 2, 3 and 4 as the three exemplars, and so do the common harnesses.
MBPP_TEST_IDS = range(11, 511)
MBPP_SHOT_IDS = (2, 3, 4)


def _mbpp_text(text: str) -> str:
    return text.replace("\r\n", "\n")  # the code and setup fields of mbpp.jsonl use Windows line ends


def _mbpp_query(row: dict) -> str:
    tests = "\n".join(_mbpp_text(t) for t in row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def _mbpp_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("mbpp", shots, len(MBPP_SHOT_IDS))
    rows = {row["task_id"]: row for row in _jsonl(_need(data_dir / "mbpp" / "mbpp.jsonl", "mbpp"))}
    prefix = "".join(
        f"{_mbpp_query(rows[i])}{_mbpp_text(rows[i]['code']).strip()}\n[DONE]\n\n"
        for i in MBPP_SHOT_IDS[:shots]
    )
    examples = []
    for task_id in MBPP_TEST_IDS:
        row = rows[task_id]
        # The setup code (task 367 builds trees with the solution's class) runs after the solution.
        tests = "\n".join([_mbpp_text(row["test_setup_code"])] + [_mbpp_text(t) for t in row["test_list"]])
        examples.append(Example("mbpp", prefix + _mbpp_query(row), tests + "\n", _mbpp_text(row["code"])))
    return examples


def _mbpp_program(completion: str, example: Example) -> str:
    code = answers.code_block(completion)
    code = (completion if code is None else code).replace("[BEGIN]", "").replace("[DONE]", "")
    return f"{code}\n\n{example.reference}"


MBPP = Task(
    name="mbpp",
    metric="pass@1",
    shots=3,
    max_shots=3,
    max_new_tokens=512,
    stop=("[DONE]",),
    prompt_format=(
        "Austin et al.'s format: 'You are an expert Python programmer, and here is your task: {text} Your code "
        "should pass these tests:\\n\\n{3 asserts}\\n[BEGIN]\\n{code}\\n[DONE]\\n\\n' for tasks 2, 3, 4, then the "
        "query up to '[BEGIN]\\n'; test split: tasks 11-510; program: the completion (its fenced block where it "
        "has one) + test_setup_code + the 3 asserts, run in the sandbox; greedy pass@1"
    ),
    read=_mbpp_read,
    parse=_mbpp_program,
    score=_pass_at_1,
    aggregate="micro",
    run_notes=_sandbox_notes,
)


# --- Flores-101 -------------------------------------------------------------------------------------------------

_FLORES_LANGUAGES = {"en": ("eng", "English"), "zh": ("zho_simpl", "Chinese")}
_FLORES_TOKENIZE = {"en": "13a", "zh": "zh"}  # sacrebleu's tokenizer for each target language
FLORES_DIRECTIONS = ("zh-en", "en-zh")
# Only devtest is available (../shared/data README): its first 8 sentences are the exemplars of every prompt, and
# lines 9-1012 are scored, so no scored sentence is ever its own exemplar.
FLORES_SHOT_LINES = 8


def _flores_read(data_dir: Path, shots: int) -> list[Example]:
    _check_shots("flores", shots, FLORES_SHOT_LINES)
    root = _need(data_dir / "flores101" / "flores101_dataset" / "devtest", "flores")
    lines = {
        code: _need(root / f"{name}.devtest", "flores").read_text(encoding="utf-8").splitlines()
        for code, (name, _) in _FLORES_LANGUAGES.items()
    }
    if len(set(map(len, lines.values()))) != 1:
        raise ValueError(f"{root}: the devtest files must be aligned line by line, their lengths differ")
    examples = []
    for direction in FLORES_DIRECTIONS:
        src, tgt = direction.split("-")
        src_name, tgt_name = _FLORES_LANGUAGES[src][1], _FLORES_LANGUAGES[tgt][1]
        prefix = "".join(
            f"{src_name}: {lines[src][i]}\n{tgt_name}: {lines[tgt][i]}\n\n" for i in range(shots)
        )
        for i in range(FLORES_SHOT_LINES, len(lines[src])):
            prompt = prefix + f"{src_name}: {lines[src][i]}\n{tgt_name}:"
            examples.append(Example(direction, prompt, lines[tgt][i], " " + lines[tgt][i]))
    return examples


FLORES = Task(
    name="flores",
    metric="bleu",
    shots=8,
    max_shots=FLORES_SHOT_LINES,
    max_new_tokens=256,
    stop=("\n",),
    prompt_format=(
        "'{Source}: {sentence}\\n{Target}: {translation}\\n\\n' for devtest lines 1-`shots` (Chinese/English), "
        "then '{Source}: {sentence}\\n{Target}:'; scored: devtest lines 9-1012; translation: the completion's "
        "first line, stripped; corpus BLEU per direction (sacrebleu, tokenizer 'zh' into Chinese, '13a' into "
        "English); score: mean of the directions"
    ),
    read=_flores_read,
    parse=lambda completion, example: completion.strip(),
    score=_bleu,
    aggregate="macro",
    notes={"directions": list(FLORES_DIRECTIONS), "tokenize": _FLORES_TOKENIZE},
    run_notes=_bleu_notes,
)


GENERATIVE_TASKS: dict[str, Task] = {task.name: task for task in (BBH, GSM8K, MATH, HUMANEVAL, MBPP, FLORES)}


# --- running ----------------------------------------------------------------------------------------------------


def cut_at_stop(completion: str, stop: Sequence[str]) -> str:
    """The completion up to its first stop string (a generate callable may return the stop string and more)."""
    ends = [i for s in stop if (i := completion.find(s)) >= 0]
    return completion[: min(ends)] if ends else completion


def _first_per_subject(examples: list[Example], limit: int | None) -> list[Example]:
    if limit is None:
        return examples
    seen: dict[str, int] = {}
    kept = []
    for example in examples:
        if seen.get(example.subject, 0) < limit:
            seen[example.subject] = seen.get(example.subject, 0) + 1
            kept.append(example)
    return kept


def run_generative_task(
    name: str,
    generate: Generate,
    data_dir: Path,
    *,
    shots: int | None,
    limit: int | None,
    batch_size: int,
    chat: bool,
    progress: Callable[[int, int], None] | None = None,
    limits: sandbox.Limits = sandbox.Limits(),
) -> dict:
    """Run one generation task: `generate(prompts, max_new_tokens, stop_strings)` gives greedy completions for
    batches of at most `batch_size` prompts. `shots`: None for the task's published setting. `limit`: the first
    N examples of each subject (of each BBH task, MATH type, Flores direction). `chat`: the caller's `generate`
    wraps prompts in the chat format itself; here it is recorded, and it picks the task's chat stop strings
    (HumanEval has none: its stops would cut a chat model's fenced answer). `limits`: of the code sandbox."""
    if name not in GENERATIVE_TASKS:
        raise ValueError(f"unknown generation task {name!r}; choose from {', '.join(GENERATIVE_TASKS)}")
    task = GENERATIVE_TASKS[name]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    shots = task.shots if shots is None else shots
    run_notes = task.run_notes(limits)
    examples = _first_per_subject(task.read(Path(data_dir), shots), limit)
    stop = task.chat_stop if chat and task.chat_stop is not None else task.stop

    # Longest prompts first: a batch holds prompts of similar length, and the largest batch shows any memory
    # shortage at once rather than at the end.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))
    completions: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outputs = generate([examples[i].prompt for i in batch], task.max_new_tokens, list(stop))
        if len(outputs) != len(batch):
            raise ValueError(f"generate returned {len(outputs)} completions for {len(batch)} prompts")
        for i, output in zip(batch, outputs, strict=True):
            completions[i] = cut_at_stop(output, stop)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))

    predictions = [task.parse(c, e) for c, e in zip(completions, examples, strict=True)]
    scored = task.score(examples, predictions, limits)
    if task.aggregate == "micro" and scored.correct is not None:
        score = 100.0 * sum(scored.correct) / max(len(examples), 1)
    else:
        score = sum(scored.per_subject.values()) / max(len(scored.per_subject), 1)
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.subject] = counts.get(example.subject, 0) + 1

    settings: dict[str, Any] = {
        "shots": shots,
        "prompt_format": task.prompt_format,
        "stop_strings": list(stop),
        "max_new_tokens": task.max_new_tokens,
        "decoding": "greedy",
        "chat": chat,
        "limit_per_subject": limit,
        "aggregate": "mean over examples" if task.aggregate == "micro" else "mean over subjects",
        "first_prompt": examples[0].prompt if examples else None,
        **task.notes,
        **run_notes,
    }
    return {
        "score": score,
        "metric": task.metric,
        "per_subject": scored.per_subject,
        "per_subject_n": counts,
        "n": len(examples),
        "settings": settings,
        "examples": [
            {
                "subject": e.subject,
                "completion": c[:2000],
                # A code task's prediction is the whole program, and its reference the tests: left out.
                "prediction": None if task.metric == "pass@1" else p,
                "reference": None if task.metric == "pass@1" else e.reference,
                "correct": None if scored.correct is None else scored.correct[i],
            }
            for i, (e, c, p) in enumerate(zip(examples[:3], completions[:3], predictions[:3], strict=True))
        ],
    }
