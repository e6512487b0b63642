"""Reflection stage (SPEC §2.4): cheap deterministic checks first, the teacher's judge after.

Deterministic checks, on every dialogue:

- ``arithmetic`` — every ``a op b ... = c`` in a thought is recomputed; a wrong result is
  fixed by a math reflection that redoes the computation;
- ``conclusion`` — the dialogue's own conclusion must equal the gold answer under
  answer-type-aware normalisation; a wrong conclusion keeps the row out;
- ``unsupported_claim`` — a thought that claims a tool's output before that tool ran (each
  tool declares its claim phrasing, ``Tool.claim_patterns``), or a number that no tool
  returned, the question does not hold and no computation produced. Numbers in the meta
  fields a source declares as ground truth (``Source.ground_truth_meta``) must have come
  back from a tool.

- ``math_gap`` — a numeric answer that no thought computes: where the row's gold rationale
  has the lines that compute it, they are the fix (no judge needed). The fixed dialogue is
  checked again, so a derivation that uses a number no tool returned keeps the row out: a
  reflection never "corrects" a reading the student had no way to see. A teacher that
  leaves a derivation out on purpose says so with a grounding note ending in ``:gap``
  (:data:`GAP_NOTE`); the finding records it (``planted``), and such a row that cannot be
  repaired is kept out.

The teacher's ``math_gap`` and ``cheating`` judges run only where needed: ``math_gap`` when
a numeric answer is never computed in the thoughts and the gold rationale cannot fill the
gap, ``cheating`` when a claim is unsupported or a tool failed. A fix goes in exactly as SPEC §2.4 says: the old final
step continues, a self-doubt turn signals ``reflection``, the corrected thought ends.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmat_assets import protocol
from mmat_assets.contracts import CLAIM_VERBS, JudgeContext, Source, TeacherError, TeacherRequest, Tool
from mmat_assets.engine.answers import NUMBER_IN_TEXT as _NUMBER_IN_TEXT
from mmat_assets.engine.answers import contains_answer, numbers_in, plain_fractions, rationale_lines, to_number

JUDGE_VERSION = "judge-1"
#: The end of a grounding note that says the teacher left the derivation out on purpose.
GAP_NOTE = ":gap"

SELF_DOUBT = {
    "math": ("Wait, I think my reasoning above needs more math. Let me work on it.",
             "Hold on, I should check the calculation above before answering.",
             "Wait, let me redo the arithmetic to be sure.",
             "Let me double-check the numbers in my reasoning."),
    "evidence": ("Wait, I claimed more than the tools actually showed. Let me reconsider.",
                 "Hold on, my reasoning does not really follow from the results I have.",
                 "Wait, I should only rely on what the tools returned. Let me look again."),
}

MATH_GAP_PROMPT = """\
Below is a step-by-step dialogue that answers a question, then its last two rounds again.
Did the reasoning skip a calculation between those rounds? Reply with one JSON object:
{{"reason": "...", "thought": "<the missing derivation, as one reasoning step>" or null}}.

Dialogue:
{dialogue}

Last two rounds:
{last}"""

CHEATING_PROMPT = """\
Below is a step-by-step dialogue about an image, without its final answer. Does the
reasoning really reach its conclusion from what the tools returned, or does it claim
success it did not earn (a tool failed or returned nothing, yet it says it found the
answer)? Reply with one JSON object: {{}} if the reasoning is sound, otherwise
{{"reason": "...", "thought": "<a corrected reasoning step that uses only the evidence>" or null}}.

Dialogue:
{dialogue}"""

#: Bounded for the same reason as the step schema (see rationale.THOUGHT_MAX_CHARS).
JUDGE_SCHEMA = {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 200},
                                                 "thought": {"anyOf": [{"type": "string", "maxLength": 200},
                                                                       {"type": "null"}]}},
                "additionalProperties": False}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = rf"\$?\(?-?{_DIGITS}\)?%?"
_RESULT = rf"-?\$?-?{_DIGITS}%?"
_EQUATION = re.compile(rf"(?<![\w.])({_NUMBER}(?:\s*[-+*/×÷]\s*{_NUMBER})+)\s*=\s*({_RESULT})(?![\d/])")
#: A thought claiming what the search returned (the search is the host's, not a plugin's).
RAG_CLAIM = re.compile(rf"\bthe search {CLAIM_VERBS}\b", re.I)

if TYPE_CHECKING:
    from mmat_assets.config import ProjectConfig
    from mmat_assets.plugins import Registry


@dataclass(frozen=True)
class Declarations:
    """What the plugins of a build declare for the claim checks: each tool's claim patterns,
    by the name a teacher calls it, and each source's ground-truth meta fields, by source
    name (the ``source`` column of a row)."""

    claims: Mapping[str, re.Pattern[str]] = field(default_factory=dict)
    ground_truth: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, tools: Mapping[str, type[Tool[Any]] | Tool[Any]],
           sources: Mapping[str, type[Source[Any]] | Source[Any]] | None = None) -> Declarations:
        """From tool and source classes (or instances) by the names a build gives them."""
        claims = {name: re.compile("|".join(t.claim_patterns), re.I) for name, t in tools.items()
                  if t.claim_patterns}
        return cls(claims, {name: tuple(s.ground_truth_meta) for name, s in (sources or {}).items()})

    @classmethod
    def from_registry(cls, registry: Registry, cfg: ProjectConfig | None = None) -> Declarations:
        """Every registered tool and source under its own name and, with ``cfg``, under the
        names the config gives them. Tools count whether or not they run here: a thought
        may not claim the output of a tool that was never offered either."""
        tools = {n: i.cls for n, i in registry.role("tool").items()}
        sources = {n: i.cls for n, i in registry.role("source").items()}
        for name, entry in (cfg.tools.items() if cfg is not None else ()):
            if entry.plugin and entry.plugin in tools:
                tools[name] = tools[entry.plugin]
        for name, scfg in (cfg.sources.items() if cfg is not None else ()):
            if scfg.plugin in sources:
                sources[name] = sources[scfg.plugin]
        return cls.of(tools, sources)  # type: ignore[arg-type]  # registered classes are of their role


@dataclass
class Finding:
    """One check that fired on a dialogue."""

    check: str
    detail: str
    fix: str | None = None
    #: the defect was made on purpose by the teacher (its grounding note says so)
    planted: bool = False


@dataclass
class Verdict:
    """What reflection decided for one dialogue."""

    trajectory: protocol.Trajectory | None
    checks: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    failure: str | None = None
    detail: str = ""
    reflected: bool = False


# --------------------------------------------------------------------- arithmetic


def _evaluate(expr: str) -> float | None:
    clean = expr.replace("×", "*").replace("÷", "/").replace("$", "").replace(",", "").replace("%", "")
    try:
        return _eval(ast.parse(clean, mode="eval").body)
    except (SyntaxError, ZeroDivisionError, ValueError, TypeError, KeyError):
        return None


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError("not arithmetic")


def _close(value: float, shown: str) -> bool:
    """Equal up to the precision the thought wrote (``10 / 3 = 3.33`` is right)."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    target = to_number(shown)
    if target is None:
        return True
    return abs(value - target) <= 0.5 * 10 ** -decimals + 1e-9 or abs(value - target) <= 1e-6 * abs(target)


def check_arithmetic(t: protocol.Trajectory) -> list[Finding]:
    found = []
    for step in t.steps:
        for m in _EQUATION.finditer(step.thought):
            value = _evaluate(m[1])
            if value is not None and not _close(value, m[2]):
                right = f"{value:.2f}".rstrip("0").rstrip(".")
                found.append(Finding("arithmetic", f"{m[1]} = {m[2]} is wrong; it is {right}",
                                     f"Recomputing: {m[1].strip()} = {right}."))
    return found


# ------------------------------------------------------------------ conclusion / claims


def check_conclusion(t: protocol.Trajectory, answer_type: str | None, choices: list[str]) -> Finding | None:
    final = t.steps[-1].thought if t.steps else ""
    if contains_answer(final, t.answer, answer_type, choices):
        return None
    return Finding("conclusion", f"the final thought does not conclude {t.answer!r}: {final[-160:]!r}")


_VALUE = re.compile(rf"\s*({_RESULT})(?:\s*/\s*({_RESULT}))?(?!\s*[-+*/×÷]\s*\$?\d)")


def _derivations(text: str) -> list[tuple[int, float]]:
    """(position, value) of every number a thought computes: a value, or a plain fraction
    ``a/b``, right after ``=`` or ``→``. ``= \\frac{-12}{2} = -6`` computes 12, 2 and 6;
    ``= \\frac{7 - 19}{17 - 15}`` computes nothing: its numbers are inputs."""
    out = []
    for m in re.finditer(r"=|→", text):  # TabMWP writes reductions as "a/b → c/d"
        v = _VALUE.match(text, m.end())
        if v is None:
            continue
        for g in v.groups():
            n = to_number(g) if g else None
            if n is not None:
                out.append((v.start(), round(abs(n), 4)))
    return out


def _derived(t: protocol.Trajectory) -> set[float]:
    """Every number the thoughts compute, anywhere in the dialogue."""
    return {v for step in t.steps for _, v in _derivations(plain_fractions(step.thought))}


def check_claims(t: protocol.Trajectory, question: str, choices: list[str],
                 image_numbers: set[float] | None = None,
                 claims: Mapping[str, re.Pattern[str]] | None = None) -> list[Finding]:
    """Claims no evidence backs. A thought may not claim a tool's output (``claims``: a
    pattern per tool name) before that tool ran. A number in a thought must come from a
    tool result seen before it, the question, or a computation written at or before it.
    ``image_numbers``: numbers the source says the image holds (its ground-truth meta);
    such a number must have come back from a tool, however small, unless the thought
    computed it first."""
    mentions = {**(claims or {}), "rag": RAG_CLAIM}
    found: list[Finding] = []
    called: set[str] = set()
    sources = {round(abs(n), 4) for n in numbers_in(question + " " + " ".join(choices))}
    in_image = image_numbers or set()
    gold = to_number(t.answer)
    # the stated answer is the conclusion check's business, unless it is also an image value
    answer = round(abs(gold), 4) if gold is not None and round(abs(gold), 4) not in in_image else None
    for step in t.steps:
        for tool, pattern in mentions.items():
            if pattern.search(step.thought) and tool not in called:
                found.append(Finding("unsupported_claim", f"the thought cites {tool} output, but {tool} was never run"))
        text = plain_fractions(step.thought)
        computed = _derivations(text)
        for m in _NUMBER_IN_TEXT.finditer(text):  # a fraction written is itself a computation
            n = to_number(m.group().replace(" ", ""))
            if n is None:
                continue
            v = round(abs(n), 4)
            small = v <= 10 and v == int(v) and v not in in_image  # counts and ordinals, not table values
            if v in sources or small or v == answer or any(pos <= m.start() + 2 and d == v for pos, d in computed):
                continue
            found.append(Finding("unsupported_claim", f"the number {n:g} is in no tool result, question or computation"))
        sources |= {v for _, v in computed}
        called |= {o.name for o in step.operators} | ({"rag"} if step.rag is not None else set())
        for r in step.results:
            sources |= {round(abs(n), 4) for n in numbers_in(r.text)}
    return _dedup(found)


def _dedup(found: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in found:
        if f.detail not in seen:
            seen.add(f.detail)
            out.append(f)
    return out


# -------------------------------------------------------------------------- fixing


def insert_reflection(t: protocol.Trajectory, phrase: str, corrected: str) -> protocol.Trajectory:
    """SPEC §2.4: the old final step continues, a self-doubt turn reflects, the fix ends."""
    steps = [protocol.Step(s.thought, list(s.operators), s.rag, s.signal, list(s.results)) for s in t.steps]
    steps[-1].signal, steps[-1].results = "continue", []
    steps.append(protocol.Step(phrase, [], None, "reflection", []))
    steps.append(protocol.Step(corrected, [], None, "end", []))
    return protocol.Trajectory(t.prompt, steps, t.answer, t.system)


def pick_phrase(kind: str, sample_id: str) -> str:
    """A self-doubt phrase from the pool, chosen by the sample id (stable across runs)."""
    pool = SELF_DOUBT[kind]
    return pool[int(sample_id[:8], 16) % len(pool)] if re.fullmatch(r"[0-9a-f]{8,}", sample_id[:8] or "") else pool[0]


def judge_messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are a strict reviewer of reasoning. Reply with JSON only."},
            {"role": "user", "content": prompt}]


def dialogue_text(t: protocol.Trajectory, with_answer: bool = True) -> str:
    msgs = protocol.render_rr(t)
    if not with_answer:
        msgs = msgs[:-2]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in msgs if m["role"] != "system")


def math_gap_request(t: protocol.Trajectory) -> TeacherRequest:
    msgs = protocol.render_rr(t)
    last = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in msgs[-6:-2])
    prompt = MATH_GAP_PROMPT.format(dialogue=dialogue_text(t), last=last)
    return TeacherRequest("judge", judge_messages(prompt), JUDGE_VERSION, JUDGE_SCHEMA, {"temperature": 0},
                          JudgeContext(check="math_gap"))


def cheating_request(t: protocol.Trajectory) -> TeacherRequest:
    prompt = CHEATING_PROMPT.format(dialogue=dialogue_text(t, with_answer=False))
    return TeacherRequest("judge", judge_messages(prompt), JUDGE_VERSION, JUDGE_SCHEMA, {"temperature": 0},
                          JudgeContext(check="cheating"))


def parse_judge(content: str) -> dict[str, Any]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return {"reason": "unparseable judge reply"}
    return data if isinstance(data, dict) else {"reason": "judge reply is not an object"}


def gold_derivation(rationale: str | None, answer: str) -> str | None:
    """The lines of a gold rationale that compute ``answer`` (a continuation line ``= ...``
    joined to the line it continues), each ending a sentence; None when it has none."""
    gold = to_number(answer)
    if not rationale or gold is None:
        return None
    lines = rationale_lines(rationale)
    target = round(abs(gold), 4)
    found = [ln for ln in lines if any(v == target for _, v in _derivations(plain_fractions(ln)))]
    return " ".join(ln if ln[-1] in ".!?" else f"{ln}." for ln in found) or None


def check_math_gap(t: protocol.Trajectory, sample: Mapping[str, Any]) -> Finding | None:
    """A numeric answer no thought computes, filled from the gold rationale where it can be
    (``fix`` None: only a judge can fill it)."""
    if not needs_math_gap(t, sample.get("answer_type")):
        return None
    planted = str(sample.get("grounding") or "").endswith(GAP_NOTE)
    fix = gold_derivation(sample.get("rationale"), t.answer)
    detail = f"the answer {t.answer} is stated but no thought computes it" + \
        ("; the gold rationale's derivation fills the gap" if fix else "")
    return Finding("math_gap", detail, fix, planted)


def needs_math_gap(t: protocol.Trajectory, answer_type: str | None) -> bool:
    """A numeric answer that no thought computes (no ``= answer``) may hide a skipped step."""
    gold = to_number(t.answer)
    if answer_type != "number" or gold is None:
        return False
    return round(abs(gold), 4) not in _derived(t)


def image_numbers(sample: Mapping[str, Any], fields: Iterable[str]) -> set[float]:
    """The numbers in the row's ground-truth meta ``fields`` (text fields only)."""
    meta = sample.get("meta") or "{}"
    meta = json.loads(meta) if isinstance(meta, str) else meta
    texts = [meta.get(f) for f in fields] if isinstance(meta, dict) else []
    return {round(abs(n), 4) for text in texts if isinstance(text, str) for n in numbers_in(text)}


def deterministic(t: protocol.Trajectory, sample: Mapping[str, Any], tool_errors: int,
                  declared: Declarations | None = None) -> tuple[list[Finding], list[str]]:
    """Run the cheap checks; return findings and which LLM checks are needed. ``declared``:
    the claim patterns and ground-truth fields of the build's plugins (none: not checked)."""
    declared = declared or Declarations()
    choices = list(sample.get("choices") or [])
    fields = declared.ground_truth.get(str(sample.get("source")), ())
    findings = check_arithmetic(t) + check_claims(t, sample["question"], choices, image_numbers(sample, fields),
                                                  declared.claims)
    conclusion = check_conclusion(t, sample.get("answer_type"), choices)
    if conclusion:
        findings.append(conclusion)
    llm = []
    gap = check_math_gap(t, sample)
    if gap is not None and gap.fix:
        findings.append(gap)
    elif gap is not None:
        llm.append("math_gap")
    if any(f.check == "unsupported_claim" for f in findings) or tool_errors:
        llm.append("cheating")
    return findings, llm


__all__ = ["Declarations", "Finding", "Verdict", "TeacherError", "deterministic", "insert_reflection", "pick_phrase",
           "math_gap_request", "cheating_request", "parse_judge"]


# ---------------------------------------------------------------------- orchestration


async def reflect(sample: Mapping[str, Any], t: protocol.Trajectory, tool_errors: int, env: Any,
                  calls: list[dict[str, Any]]) -> Verdict:
    """Decide one dialogue: pass, fix with a reflection, or keep out with a reason."""
    from mmat_assets.engine.rationale import ask

    declared = env.declarations if env.declarations is not None else Declarations.of(env.tools)
    findings, llm = deterministic(t, sample, tool_errors, declared)
    verdict = Verdict(t, sorted({f.check for f in findings}), findings)
    if any(f.check == "conclusion" for f in findings):
        return _fail(verdict, "wrong_answer", next(f.detail for f in findings if f.check == "conclusion"))
    math_fixes = [f.fix for f in findings if f.fix]
    evidence_fix: str | None = None
    judged_sound = False
    for check in llm:
        request = math_gap_request(t) if check == "math_gap" else cheating_request(t)
        try:
            reply, record = await ask(env, request)
        except TeacherError as exc:
            if exc.reason == "unsupported":
                continue  # this teacher cannot judge: the deterministic verdict stands
            return _fail(verdict, f"teacher_{exc.reason}", str(exc))
        calls.append(record)
        data = parse_judge(reply.content)
        if check == "math_gap" and data.get("thought"):
            verdict.checks.append("math_gap")
            math_fixes.append(str(data["thought"]))
        elif check == "cheating":
            if not data.get("reason"):
                judged_sound = True
                continue
            verdict.checks.append("cheating")
            if not data.get("thought"):
                return _fail(verdict, "cheating", str(data["reason"]))
            evidence_fix = str(data["thought"])
    if not judged_sound and evidence_fix is None:
        if tool_errors:  # the root cause: claims then lack evidence because a tool failed
            return _fail(verdict, "tool_error", f"{tool_errors} tool call(s) failed")
        if any(f.check == "unsupported_claim" for f in findings):
            return _fail(verdict, "unsupported_claim",
                         "; ".join(f.detail for f in findings if f.check == "unsupported_claim")[:500])
    fixes = ([evidence_fix] if evidence_fix else []) + math_fixes
    if fixes:
        kind = "evidence" if evidence_fix else "math"
        corrected = " ".join(fixes) + f" So the answer is {t.answer}."
        verdict.trajectory = insert_reflection(t, pick_phrase(kind, str(sample["sample_id"])), corrected)
        verdict.reflected = True
        unseen = _new_claims(verdict.trajectory, sample, findings, declared)
        if unseen:
            return _fail(verdict, "unsupported_claim", "the fix: " + "; ".join(f.detail for f in unseen)[:500])
    if not verdict.reflected and any(f.planted for f in findings):
        return _fail(verdict, "unrepaired_gap", "a derivation left out on purpose was not filled")
    if not verdict.reflected and str(sample.get("grounding") or "").endswith(GAP_NOTE):
        verdict.findings.append(Finding("math_gap", "the derivation left out on purpose was not found missing",
                                        planted=True))
        return _fail(verdict, "unrepaired_gap", "a derivation left out on purpose was not filled")
    verdict.checks = sorted(set(verdict.checks))
    return verdict


def _new_claims(fixed: protocol.Trajectory, sample: Mapping[str, Any], before: list[Finding],
                declared: Declarations) -> list[Finding]:
    """Unsupported claims or wrong arithmetic the fix brought in (a gold derivation may use a
    value the tools never returned: such a row stays out)."""
    known = {f.detail for f in before}
    fields = declared.ground_truth.get(str(sample.get("source")), ())
    after = check_arithmetic(fixed) + check_claims(fixed, sample["question"], list(sample.get("choices") or []),
                                                   image_numbers(sample, fields), declared.claims)
    return [f for f in after if f.detail not in known]


def _fail(verdict: Verdict, reason: str, detail: str) -> Verdict:
    verdict.failure, verdict.detail = reason, detail
    verdict.checks = sorted(set(verdict.checks))
    return verdict
