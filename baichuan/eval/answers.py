"""Answer parsers and normalisers of the generation tasks: what a completion answers, and when two answers agree.

Each parser takes the model's completion (already cut at the task's stop string) and returns the answer as a
string, or None where it finds none; None never equals a reference. The MATH normaliser follows the rules of
Hendrycks et al.'s `is_equiv` (https://github.com/hendrycks/math, `math_equivalence.py`) and Minerva's
`normalize_final_answer` (Lewkowycz et al. 2022, appendix), written out here as tables of rules.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# --- BBH --------------------------------------------------------------------------------------------------------

# The official CoT exemplars end "So the answer is X." (suzgunmirac/BIG-Bench-Hard, cot-prompts/*.txt).
_ANSWER_IS = re.compile(r"the answer is[ \t]*(.*)", re.IGNORECASE)
_OPTION = re.compile(r"\(([A-Z])\)")


def bbh_answer(completion: str, target: str) -> str | None:
    """The text after the first "the answer is", up to the end of its line, without the closing period. Where
    the target is an option such as "(B)", the first "(X)" in that text (so "(B) 12/24/1937." gives "(B)").

    The target only says which kind of answer to look for: a few items of movie_recommendation and ruin_names
    have a free-text target although their siblings have "(X)" ones, and those are compared as text."""
    match = _ANSWER_IS.search(completion)
    if match is None:
        return None
    answer = match.group(1).split("\n", 1)[0].strip()
    if _OPTION.fullmatch(target):
        option = _OPTION.search(answer)
        return f"({option.group(1)})" if option else None
    return answer.removesuffix(".").strip()


# --- GSM8K ------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?|-?[$]?\.\d+")
_FINAL_MARK = re.compile(r"####\s*(.*)")
_GSM8K_ANSWER_IS = re.compile(r"answer is[ \t]*:?[ \t]*(.*)", re.IGNORECASE)


def _canonical_number(text: str) -> str | None:
    """ "$1,234.50" -> "1234.5"; "18." -> "18"; None where `text` holds no number."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    digits = match.group(0).replace(",", "").replace("$", "")
    try:
        value = Decimal(digits)
    except InvalidOperation:
        return None
    # normalize() would write 100 as 1E+2; quantizing to an integer where the value is one keeps plain digits.
    value = value.quantize(Decimal(1)) if value == value.to_integral_value() else value.normalize()
    return str(value)


def gsm8k_reference(answer: str) -> str:
    """The number after "####" in a GSM8K reference answer (openai/grade-school-math, data/*.jsonl)."""
    match = _FINAL_MARK.search(answer)
    number = _canonical_number(match.group(1)) if match else None
    if number is None:
        raise ValueError(f"a GSM8K answer without a final '#### <number>' line: {answer[-80:]!r}")
    return number


def gsm8k_answer(completion: str) -> str | None:
    """The final number of a completion: after "####" (the format of the train-split exemplars), else after
    "the answer is", else the last number in the text."""
    for pattern in (_FINAL_MARK, _GSM8K_ANSWER_IS):
        match = pattern.search(completion)
        if match and (number := _canonical_number(match.group(1))) is not None:
            return number
    numbers = _NUMBER.findall(completion)
    return _canonical_number(numbers[-1]) if numbers else None


# --- MATH -------------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}, or "\\boxed 5") in `text`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    name = "\\boxed" if rest.startswith("\\boxed") else "\\fbox"
    rest = rest[len(name) :]
    if rest.startswith(" "):  # "\boxed 5": the argument runs to the next "$" or the end
        return rest[1:].split("$", 1)[0].strip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the completion was cut inside the box


def math_reference(solution: str) -> str:
    """The answer of a MATH solution: its last boxed expression. Every one of the 5,000 test solutions has one."""
    answer = last_boxed(solution)
    if answer is None:
        raise ValueError(f"a MATH solution without \\boxed{{...}}: {solution[-80:]!r}")
    return answer


# Minerva's exemplars end "Final Answer: The final answer is $X$. I hope it is correct."
_FINAL_ANSWER = re.compile(r"final answer is\s*(.*?)\s*\.?\s*I hope it is correct", re.IGNORECASE | re.DOTALL)


def math_answer(completion: str) -> str | None:
    """The answer of a completion: Minerva's "The final answer is X. I hope it is correct." line, else the last
    \\boxed{...}."""
    match = _FINAL_ANSWER.search(completion)
    if match and match.group(1).strip():
        answer = match.group(1).strip()
        return answer[1:-1] if len(answer) > 1 and answer[0] == answer[-1] == "$" else answer
    return last_boxed(completion)


# Plain substitutions, in order (Hendrycks' strip_string, then Minerva's SUBSTITUTIONS).
_REPLACE = [
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("\\tfrac", "\\frac"),
    ("\\dfrac", "\\frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
    ("$", ""),
    ("\\%", ""),
    ("%", ""),
    ("\\;", ""),
    ("\\,", ""),
    ("{,}", ""),
    ("\\dots", ""),
    ("\\ldots", ""),
    ("\\cdots", ""),
]
# Words that name a unit or the kind of thing counted (Minerva's REMOVED_EXPRESSIONS, the word entries): removed
# where they stand as a word, so "5 inches" and "5" agree.
_UNIT_WORDS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "inch", "ft", "hours", "hour", "km", "units",
    "sue", "points", "feet", "minutes", "minute", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "seconds", "days", "miles", "mile", "yards",
    "unit", "sq", "cubic", "centimeters", "liters", "grams",
)  # fmt: skip
_UNITS = re.compile(r"\\(?:text|mbox|mathrm)\{\s*(?:" + "|".join(_UNIT_WORDS) + r")\s*\}(?:\^\d)?|\b(?:" +
                    "|".join(_UNIT_WORDS) + r")\b(?:\^\d)?")  # fmt: skip
# A LaTeX space "\ ", but not a row break "\\" followed by a space: matrix rows must stay apart.
_BARE_DECIMAL = re.compile(r"(?<![\w}])\.(?=\d)")  # ".5" -> "0.5", but not the period of "18 ways."
_LATEX_SPACE = re.compile(r"(?<!\\)\\ ")
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf|boxed|overline)\{([^{}]*)\}")
_SHORT_LHS = re.compile(r"^[A-Za-z]\w?\s*=")  # "x = 5", "k=3": the answer is the right-hand side
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
# \frac12 or \frac1{72}: one character or one brace group per argument, as Hendrycks' _fix_fracs reads them.
_FRAC_SHORT = re.compile(r"\\frac(\w|\{[^{}]*\})(\w|\{[^{}]*\})")
_A_SLASH_B = re.compile(r"^(-?\d+)/(\d+)$")


def normalize_math(answer: str) -> str:
    """A MATH answer in one spelling, so that equal answers compare equal as strings:
    "\\dfrac12" -> "\\frac{1}{2}", "x = 5" -> "5", "10\\text{ inches}" -> "10", "1,000" -> "1000",
    "0.5" -> "\\frac{1}{2}", "3/4" -> "\\frac{3}{4}", "\\left( 1, 2 \\right)" -> "(1,2)", "90^\\circ" -> "90"."""
    text = answer.strip()
    text = _UNITS.sub("", text)
    text = _LATEX_SPACE.sub("", text)
    for old, new in _REPLACE:
        text = text.replace(old, new)
    if _THOUSANDS.fullmatch(text):  # "1,000" but not the pair "(1,234)"
        text = text.replace(",", "")
    # \text{...} and friends keep their content once the unit words are gone: "\text{(C)}" -> "(C)".
    while (stripped := _TEXT_COMMANDS.sub(r"\1", text)) != text:
        text = stripped
    text = _BARE_DECIMAL.sub("0.", text.strip())
    if _SHORT_LHS.match(text) and text.count("=") == 1:
        text = text.split("=", 1)[1]
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    if match := _A_SLASH_B.match(text):
        text = f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}"
    text = text.removesuffix(".")
    return text


def _fix_fracs(text: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}, \\frac{1}2 -> \\frac{1}{2}."""

    def braced(match: re.Match) -> str:
        a, b = (g if g.startswith("{") else "{" + g + "}" for g in match.groups())
        return f"\\frac{a}{b}"

    return _FRAC_SHORT.sub(braced, text)


def math_equal(prediction: str | None, reference: str) -> bool:
    """Equal after `normalize_math` (as Hendrycks' is_equiv: string equality of the normalised forms)."""
    return prediction is not None and normalize_math(prediction) == normalize_math(reference)


# --- code -------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def code_block(completion: str) -> str | None:
    """The code of the first fenced block of a completion (chat models answer in markdown), or None."""
    match = _FENCE.search(completion)
    return match.group(1) if match else None
