"""Answer parsers and the MATH normaliser against hand-checked cases."""

from __future__ import annotations

import pytest

from baichuan.eval.answers import (
    bbh_answer,
    code_block,
    gsm8k_answer,
    gsm8k_reference,
    last_boxed,
    math_answer,
    math_equal,
    math_reference,
    normalize_math,
)


@pytest.mark.parametrize(
    "completion,target,expected",
    [
        ("If today is Dec 24 ... that is 12/25/1937. So the answer is (B).", "(B)", "(B)"),
        ("... So the answer is (B) 12/25/1937.", "(B)", "(B)"),
        ("So the answer is B.", "(B)", None),  # an option target needs "(X)"
        ("Thus not ( True ) is False. So the answer is False.", "False", "False"),
        ("So the answer is ] ] >.", "] ] >", "] ] >"),
        ("So the answer is apple banana cherry.\nQ: next", "apple banana cherry", "apple banana cherry"),
        ("So the answer is -60.", "-60", "-60"),
        (
            "the answer is Monsters, Inc.",
            "Monsters, Inc",
            "Monsters, Inc",
        ),  # a free-text target among options
        ("I cannot tell.", "Yes", None),
        ("So the answer is Yes. Later the answer is No.", "Yes", "Yes. Later the answer is No"),
    ],
)
def test_bbh_answer(completion, target, expected):
    assert bbh_answer(completion, target) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        (" Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
        (" 5 + 6 = 11. The answer is 11.", "11"),
        (" It costs $1,234.50 in all, after 3 days.", "3"),  # no marker: the last number
        (" The answer is $1,234.50.", "1234.5"),
        ("#### 1,000", "1000"),
        ("#### 18.00", "18"),
        ("#### -7", "-7"),
        (" The answer is: 0.5", "0.5"),
        (" #### \nThe answer is 42", "42"),  # an empty mark falls through to the next rule
        (" no numbers at all", None),
    ],
)
def test_gsm8k_answer(completion, expected):
    assert gsm8k_answer(completion) == expected


def test_gsm8k_reference():
    assert gsm8k_reference("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_reference("...\n#### 1,600") == "1600"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no final line")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so $\\boxed{2}$ asymptotes", "2"),
        ("$\\boxed{\\frac{1}{2}}$ and then \\boxed{\\dfrac{\\sqrt{3}}{2}}.", "\\dfrac{\\sqrt{3}}{2}"),
        ("\\fbox{7}", "7"),
        ("the answer is $\\boxed 5$.", "5"),
        ("cut \\boxed{\\frac{1}{", None),
        ("nothing boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_math_answer_prefers_minervas_final_line():
    minerva = "so $\\boxed{24}$.\nFinal Answer: The final answer is $24$. I hope it is correct."
    assert math_answer(minerva) == "24"
    assert (
        math_answer("Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct.")
        == "\\frac{2}{3}"
    )
    assert math_answer("Thus $x = \\boxed{-\\frac{2}{3}}$.") == "-\\frac{2}{3}"
    assert math_answer("I do not know.") is None
    assert math_reference("... the answer is $\\boxed{[2,5)}$.") == "[2,5)"


@pytest.mark.parametrize(
    "answer,normal",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac1{72}", "\\frac{1}{72}"),
        ("\\frac{1}2", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("-3/4", "\\frac{-3}{4}"),
        ("x = 5", "5"),
        ("k=3", "3"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("10\\text{ inches}", "10"),
        ("10 \\text{ square feet}", "10"),
        ("5\\text{ cm}^2", "5"),
        ("\\$18.50", "18.50"),
        ("50\\%", "50"),
        ("1,000", "1000"),
        ("(1,234)", "(1,234)"),  # a pair, not a thousands separator
        ("\\sqrt3", "\\sqrt{3}"),
        ("2\\sqrt{3}", "2\\sqrt{3}"),
        (".5", "\\frac{1}{2}"),
        ("\\text{(C)}", "(C)"),
        ("\\textbf{Devon}", "Devon"),
        ("\\{1,2\\}", "\\{1,2\\}"),
        ("5.", "5"),
        ("\\!\\!10", "10"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
        ("10\\ \\text{cm}", "10"),  # a LaTeX space
        ("18\\text{ ways.}", "18"),  # a sentence's period, not a decimal point
        ("(0, .5)", "(0,0.5)"),
        # matrix rows stay apart: "\\" followed by a space is a row break, not a LaTeX space
        ("\\begin{pmatrix} -2 \\\\ -7 \\\\ 13 \\end{pmatrix}", "\\begin{pmatrix}-2\\-7\\13\\end{pmatrix}"),
    ],
)
def test_normalize_math(answer, normal):
    assert normalize_math(answer) == normal


@pytest.mark.parametrize(
    "prediction,reference,equal",
    [
        ("\\frac12", "\\dfrac{1}{2}", True),
        ("x=-\\frac{2}{3}", "-\\frac{2}{3}", True),
        ("[2, 5)", "[2,5)", True),
        ("24\\text{ ways}", "24", True),
        ("2", "3", False),
        ("\\frac{1}{3}", "0.33", False),
        ("(2,5]", "[2,5)", False),
        (
            "\\begin{pmatrix} -2 \\\\ -71 \\\\ 3 \\end{pmatrix}",
            "\\begin{pmatrix} -2 \\\\ -7 \\\\ 13 \\end{pmatrix}",
            False,
        ),
        (None, "1", False),
    ],
)
def test_math_equal(prediction, reference, equal):
    assert math_equal(prediction, reference) is equal


def test_code_block():
    assert code_block("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert code_block("```\nx = 1\n```") == "x = 1\n"
    assert code_block("```py\ny = 2") == "y = 2"  # a block cut by the token budget runs to the end
    assert code_block("    return a + b\n") is None
