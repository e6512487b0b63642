"""Answer-type-aware normalisation and comparison (numbers, fractions, units, yes/no, letters).

Used by the reflection checks (does the dialogue's conclusion match the gold answer?), by
evaluation (is a prediction right?) and by benchmarks and judges, so all of them judge
answers the same way.
"""

from __future__ import annotations

import re
from fractions import Fraction

#: A standalone number in free text (``$1,234.50``, ``-3``, ``45%``, ``.5``).
NUMBER_IN_TEXT = _NUM = re.compile(r"(?<![\w.,])(?:-\s?)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|(?<![\w.])\.\d+")
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_RATIO = re.compile(rf"(?<![\w.,/])(?:({_INT})\s+)?({_INT})\s*/\s*({_INT})(?![\w.])")
_FRACTION = re.compile(r"^\s*([-+]?\d+)\s*/\s*(\d+)\s*$")
_MIXED = re.compile(r"^\s*([-+]?\d+)\s+(\d+)\s*/\s*(\d+)\s*$")
_LATEX_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_LATEX_MIXED = re.compile(r"(\d)\\frac")  # 4\frac{4}{5} is the mixed number 4 4/5
_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_WORDS = re.compile(r"[^a-z0-9 ]+")


def plain_fractions(text: str) -> str:
    """LaTeX fractions as plain ``a/b`` (mixed numbers keep their space: ``4 4/5``)."""
    return _LATEX_FRAC.sub(r"\1/\2", _LATEX_MIXED.sub(r"\1 \\frac", text))


def to_number(text: str) -> float | None:
    """A number from ``$1,234.50``, ``45%``, ``3/4``, ``2 1/2``, ``\\frac{3}{4}``; else None."""
    s = plain_fractions(str(text)).strip().rstrip(".")
    s = re.sub(r"^[^\d+\-.]*(?=[-+]?[\d.])", "", s)  # leading currency or unit words
    if m := _MIXED.match(s):
        whole, num, den = int(m[1]), int(m[2]), int(m[3])
        return float(whole + (-1 if whole < 0 else 1) * Fraction(num, den)) if den else None
    if m := _FRACTION.match(s):
        return float(Fraction(int(m[1]), int(m[2]))) if int(m[2]) else None
    m = re.fullmatch(r"\s*([-+]?)\$?\s*((?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?)\s*(%|[a-zA-Z ]{0,20})\s*", s)
    if not m or not m[2] or m[2] == ".":
        return None
    return float((m[1] or "") + m[2].replace(",", ""))


def numbers_in(text: str, ratios: bool = True) -> list[float]:
    """Every standalone number in free text (not digits inside words like ``x1``); with
    ``ratios``, also the values of fractions and mixed numbers (``2 1/2`` adds 2.5)."""
    text = plain_fractions(text)
    out = [v for m in _NUM.finditer(text) if (v := to_number(m.group().replace(" ", ""))) is not None]
    for m in _RATIO.finditer(text) if ratios else ():
        whole, num, den = (int(g.replace(",", "")) if g else 0 for g in m.groups())
        if den:
            out.append(whole + num / den)
            if m[1]:
                out.append(num / den)
    return out


def normalise_text(text: str) -> str:
    """Lower case, punctuation and articles dropped, white space folded: text to compare."""
    t = _WORDS.sub(" ", str(text).lower())
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return " ".join(t.split())


def letter_of(answer: str, choices: list[str]) -> str | None:
    """The option letter an answer names: ``B``, ``(B)``, or the option's own text."""
    if m := _LETTER.match(answer.strip()):
        return m[1].upper()
    norm = normalise_text(answer)
    for i, c in enumerate(choices):
        if normalise_text(c) == norm:
            return chr(65 + i)
    return None


def same_answer(pred: str, gold: str, answer_type: str | None = None, choices: list[str] | None = None) -> bool:
    """Whether ``pred`` says the same as ``gold`` for this answer type."""
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred:
        return False
    choices = list(choices or [])
    if choices and (answer_type == "option" or letter_of(gold, choices)):
        lp, lg = letter_of(pred, choices), letter_of(gold, choices)
        if lp is not None and lg is not None:
            return lp == lg
    gn, pn = to_number(gold), to_number(pred)
    if gn is not None and pn is not None:
        return abs(gn - pn) <= 1e-6 * max(1.0, abs(gn)) or round(pn, 2) == round(gn, 2)
    if answer_type == "yes_no" or normalise_text(gold) in ("yes", "no"):
        return normalise_text(pred).split()[:1] == normalise_text(gold).split()[:1]
    return normalise_text(pred) == normalise_text(gold)


def conclusion_of(text: str) -> str:
    """What a piece of reasoning concludes: the words after its last "answer is", else its
    last sentence."""
    found = list(re.finditer(r"answer is\s*:?\s*", text, re.I))
    if found:
        rest = text[found[-1].end():].strip().split("\n", 1)[0]
        return rest[:-1].strip() if rest.endswith(".") else rest  # "Mr. Nakamura." keeps its "Mr."
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n", text.strip()) if s.strip()]
    return sentences[-1].strip() if sentences else text.strip()


def contains_answer(text: str, gold: str, answer_type: str | None = None, choices: list[str] | None = None) -> bool:
    """Whether reasoning text concludes the gold answer (not merely mentions it)."""
    tail = conclusion_of(text)
    candidates = [tail]
    if m := re.search(r"(?:\bis|\bare|=|:)\s*([^=:]+?)\s*\.?$", tail, re.I):
        candidates.append(m[1])
    numbers = numbers_in(tail)
    if to_number(gold) is not None and numbers:
        candidates.append(f"{numbers[-1]:g}")
    if any(same_answer(c, gold, answer_type, choices) for c in candidates):
        return True
    # a text answer stated inside the concluding sentence ("The function is nonlinear.")
    return to_number(gold) is None and f" {normalise_text(gold)} " in f" {normalise_text(tail)} "


def rationale_lines(rationale: str) -> list[str]:
    """A worked solution's non-empty lines, a continuation line (``= ...`` or ``→ ...``)
    joined to the line it continues."""
    out: list[str] = []
    for ln in (x.strip() for x in rationale.splitlines()):
        if ln and out and ln[0] in "=→":
            out[-1] = f"{out[-1]} {ln}"
        elif ln:
            out.append(ln)
    return out


__all__ = [
    "NUMBER_IN_TEXT",
    "conclusion_of",
    "contains_answer",
    "letter_of",
    "normalise_text",
    "numbers_in",
    "plain_fractions",
    "rationale_lines",
    "same_answer",
    "to_number",
]
