"""The dialogue protocol: RR (multi-turn Rationale and Reflection) and ORR (one turn).

SPEC §2.3 and §2.5 fix the wire formats; this module renders a :class:`Trajectory` into
them and parses them back, and ``parse(render(t)) == t`` for every trajectory.

Tool and retrieval text is data, never protocol: before it is placed in a turn, every
protocol marker in it (``<SIGNAL>``, ``</THOUGHT>``, ``<|end_result_of_api|>``, ...) is
neutralised by a word joiner (U+2060) after its ``<``, so no OCR text or web snippet can
close a block, end a dialogue or fake a tool call. The phrases that open a block at a line
start (RR's ``Here are ...`` results, ORR's ``Use the following API outputs ...`` intro) get
the joiner after the line break. The escape is reversible (existing joiners are doubled),
so parsing gives back the exact text, whatever a question, thought, answer or tool output
holds.

Operator syntax inside ``<OPERATOR>``: comma-separated calls, each ``name`` or
``name[arg1|arg2]`` for tools that take object names (``label_bbox[cat|dog]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PROMPT_VERSION = "rr-1"

TAGS = ("THOUGHT", "OPERATOR", "RAG", "SIGNAL", "ANSWER")
API_TOKENS = ("begin_api_invoke", "end_api_invoke", "begin_result_of_api", "end_result_of_api")
SIGNALS = ("continue", "end", "reflection")
JOINER = "\u2060"
_MARKER = r"(?:/?(?:%s)>|\|(?:%s)\|>)" % ("|".join(TAGS), "|".join(API_TOKENS))
_ESCAPE = re.compile(r"<(%s*)(?=%s)" % (JOINER, _MARKER))
_UNESCAPE = re.compile(r"<%s(%s*)(?=%s)" % (JOINER, JOINER, _MARKER))

START = "Please start your reasoning."
CONTINUE = "Please continue your reasoning."
REFLECT = "Please make a reflection."
NOTHING = "No additional operator or rag results were selected in the previous step."
RESULTS = "Here are {tool} results from the previous step: {result}"
SUMMARY = "Based on the above information, please summarize and give the answer to the initial question: {prompt}"
ORR_INTRO = "Use the following API outputs to help answer the question:"
ORR_BLOCK = "<|begin_api_invoke|>{tool}<|end_api_invoke|><|begin_result_of_api|>{result}<|end_result_of_api|>"
ORR_ANSWER = "The answer is: {answer}"
# An RR result block and ORR's tool outputs each open a line with a fixed phrase; the same
# phrase at a line start inside data is marked too, so no question or output can open either.
_LINE_MARKER = "(?:%s|%s)" % (re.escape("Here are "), re.escape(ORR_INTRO))
_ESCAPE_LINE = re.compile(r"\n(%s*)(?=%s)" % (JOINER, _LINE_MARKER))
_UNESCAPE_LINE = re.compile(r"\n%s(%s*)(?=%s)" % (JOINER, JOINER, _LINE_MARKER))


def neutralise(text: str) -> str:
    """Make protocol markers inside data inert (reversibly)."""
    text = _ESCAPE.sub(lambda m: "<" + JOINER + m.group(1), text)
    return _ESCAPE_LINE.sub(lambda m: "\n" + JOINER + m.group(1), text)


def restore(text: str) -> str:
    """Undo :func:`neutralise`."""
    text = _UNESCAPE_LINE.sub(lambda m: "\n" + m.group(1), text)
    return _UNESCAPE.sub(lambda m: "<" + m.group(1), text)


# --------------------------------------------------------------------------- model


@dataclass
class OperatorCall:
    """One operator the teacher asked for, with its arguments (object names)."""

    name: str
    args: list[str] = field(default_factory=list)

    def render(self) -> str:
        return f"{self.name}[{'|'.join(self.args)}]" if self.args else self.name


@dataclass
class Result:
    """Text returned to the model after a step: one block per tool run or search."""

    tool: str  # operator name, or "rag"
    text: str


@dataclass
class Step:
    """One assistant turn and what the environment answered to it."""

    thought: str
    operators: list[OperatorCall] = field(default_factory=list)
    rag: str | None = None
    signal: str = "continue"
    results: list[Result] = field(default_factory=list)


@dataclass
class Trajectory:
    """A whole reasoning dialogue about one question (RR's structure)."""

    prompt: str  # question, options and style constraint as the model sees them
    steps: list[Step]
    answer: str
    system: str = ""


def question_prompt(question: str, choices: list[str] | None = None, style: str | None = None) -> str:
    """The question as every turn quotes it: text, lettered options, style constraint."""
    parts = [question.strip()]
    if choices:
        parts.append("Options: " + " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)))
    if style:
        parts.append(style)
    return "\n".join(parts)


# ------------------------------------------------------------------------------- RR


def render_step(step: Step) -> str:
    out = f"<THOUGHT>{neutralise(step.thought)}</THOUGHT>"
    if step.operators:
        out += f"<OPERATOR>{', '.join(neutralise(o.render()) for o in step.operators)}</OPERATOR>"
    if step.rag is not None:
        out += f"<RAG>{neutralise(step.rag)}</RAG>"
    return out + f"<SIGNAL>{step.signal}</SIGNAL>"


def render_feedback(step: Step, next_is_reflection: bool = False) -> str:
    """The user turn after a step that did not end the dialogue."""
    tail = REFLECT if step.signal == "reflection" else CONTINUE
    if not step.results:
        return f"{NOTHING} {tail}"
    blocks = [RESULTS.format(tool=neutralise(r.tool), result=neutralise(r.text)) for r in step.results]
    return "\n".join(blocks) + f" {tail}"


def render_rr(t: Trajectory) -> list[dict[str, str]]:
    """RR messages: system, question, (assistant step, user feedback)*, summary, answer."""
    msgs = [{"role": "system", "content": t.system}] if t.system else []
    msgs.append({"role": "user", "content": f"{neutralise(t.prompt)} {START}"})
    for step in t.steps:
        msgs.append({"role": "assistant", "content": render_step(step)})
        if step.signal != "end":
            msgs.append({"role": "user", "content": render_feedback(step)})
    msgs.append({"role": "user", "content": SUMMARY.format(prompt=neutralise(t.prompt))})
    msgs.append({"role": "assistant", "content": neutralise(t.answer)})
    return msgs


_STEP = re.compile(
    r"^<THOUGHT>(?P<thought>.*?)</THOUGHT>"
    r"(?:<OPERATOR>(?P<ops>.*?)</OPERATOR>)?"
    r"(?:<RAG>(?P<rag>.*?)</RAG>)?"
    r"<SIGNAL>(?P<signal>continue|end|reflection)</SIGNAL>$",
    re.S,
)
_RESULT_BLOCK = re.compile(r"^Here are (?P<tool>[^\n]+?) results from the previous step: ", re.M)


class ProtocolError(ValueError):
    """Text that does not follow the RR/ORR format."""


def parse_step(text: str) -> Step:
    m = _STEP.match(text.strip())
    if not m:
        raise ProtocolError(f"not a protocol step: {text[:200]!r}")
    ops = [_parse_operator(o) for o in _split_ops(m["ops"])] if m["ops"] is not None else []
    rag = restore(m["rag"]) if m["rag"] is not None else None
    return Step(restore(m["thought"]), ops, rag, m["signal"])


def _split_ops(text: str) -> list[str]:
    return [o.strip() for o in text.split(",") if o.strip()]


def _parse_operator(text: str) -> OperatorCall:
    text = restore(text)
    m = re.fullmatch(r"([A-Za-z_][\w.-]*)(?:\[(.*)\])?", text.strip(), re.S)
    if not m:
        raise ProtocolError(f"bad operator: {text!r}")
    return OperatorCall(m[1], m[2].split("|") if m[2] else [])


def parse_feedback(text: str) -> list[Result]:
    """Tool results from a user turn (empty when nothing was called)."""
    body = text
    for tail in (CONTINUE, REFLECT):
        if body.endswith(" " + tail):
            body = body[: -len(tail) - 1]
            break
    else:
        raise ProtocolError(f"feedback turn without its closing request: {text[-80:]!r}")
    if body == NOTHING:
        return []
    # Blocks are joined by "\n" and open a line with the fixed phrase; in data the same
    # phrase at a line start was marked by neutralise(), so only real blocks match here.
    starts = list(_RESULT_BLOCK.finditer(body))
    if not starts or starts[0].start() != 0:
        raise ProtocolError(f"unrecognised feedback: {text[:120]!r}")
    return _blocks(body, starts)


def _blocks(body: str, starts: list[re.Match[str]]) -> list[Result]:
    out = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() - 1 if i + 1 < len(starts) else len(body)
        out.append(Result(restore(m["tool"]), restore(body[m.end():end])))
    return out


def parse_rr(messages: list[dict[str, Any]]) -> Trajectory:
    """Inverse of :func:`render_rr`."""
    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
    if len(msgs) < 3 or msgs[0]["role"] != "user" or not msgs[0]["content"].endswith(" " + START):
        raise ProtocolError("RR dialogue must open with the question and the start request")
    prompt = restore(msgs[0]["content"][: -len(START) - 1])
    answer = restore(_expect(msgs[-1], "assistant"))
    if _expect(msgs[-2], "user") != SUMMARY.format(prompt=neutralise(prompt)):
        raise ProtocolError("RR dialogue must close with the summary request")
    steps = _parse_steps(msgs[1:-2])
    return Trajectory(prompt, steps, answer, system)


def _expect(msg: dict[str, Any], role: str) -> str:
    if msg.get("role") != role:
        raise ProtocolError(f"expected a {role} turn, got {msg.get('role')!r}")
    return str(msg["content"])


def _parse_steps(body: list[dict[str, Any]]) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(body):
        step = parse_step(_expect(body[i], "assistant"))
        i += 1
        if step.signal != "end":
            if i >= len(body):
                raise ProtocolError("a step that does not end must be answered")
            step.results = parse_feedback(_expect(body[i], "user"))
            i += 1
        steps.append(step)
    if not steps or steps[-1].signal != "end":
        raise ProtocolError("the last step must carry <SIGNAL>end</SIGNAL>")
    return steps


# ------------------------------------------------------------------------------ ORR


@dataclass
class OneTurn:
    """ORR's structure: question, tool outputs, joined thought, answer."""

    prompt: str
    tool_outputs: list[Result]
    thought: str
    answer: str
    system: str = ""


def to_one_turn(t: Trajectory, system: str = "") -> OneTurn:
    """Compress RR to ORR: every tool output (RAG left out), every thought joined."""
    outputs = [r for s in t.steps for r in s.results if r.tool != "rag"]
    thought = " ".join(s.thought.strip() for s in t.steps if s.thought.strip())
    return OneTurn(t.prompt, outputs, thought, t.answer, system)


def render_orr(o: OneTurn) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": o.system}] if o.system else []
    user = neutralise(o.prompt)
    if o.tool_outputs:
        blocks = "".join(ORR_BLOCK.format(tool=neutralise(r.tool), result=neutralise(r.text)) for r in o.tool_outputs)
        user += f"\n{ORR_INTRO}\n{blocks}"
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": f"<THOUGHT>{neutralise(o.thought)}</THOUGHT>"
                 f"<ANSWER>{ORR_ANSWER.format(answer=neutralise(o.answer))}</ANSWER>"})
    return msgs


_ORR_OUT = re.compile(r"^<THOUGHT>(?P<thought>.*?)</THOUGHT><ANSWER>The answer is: (?P<answer>.*?)</ANSWER>$", re.S)
_ORR_BLOCK = re.compile(
    r"<\|begin_api_invoke\|>(?P<tool>.*?)<\|end_api_invoke\|><\|begin_result_of_api\|>(?P<result>.*?)<\|end_result_of_api\|>",
    re.S,
)


def parse_orr(messages: list[dict[str, Any]]) -> OneTurn:
    """Inverse of :func:`render_orr`."""
    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
    if len(msgs) != 2:
        raise ProtocolError("ORR is one user turn and one assistant turn")
    user, out = _expect(msgs[0], "user"), _expect(msgs[1], "assistant")
    prompt, outputs = user, []
    marker = f"\n{ORR_INTRO}\n"
    if marker in user:
        prompt, blocks = user.split(marker, 1)
        outputs = [Result(restore(m["tool"]), restore(m["result"])) for m in _ORR_BLOCK.finditer(blocks)]
        if _ORR_BLOCK.sub("", blocks):
            raise ProtocolError("text outside the API blocks")
    m = _ORR_OUT.match(out)
    if not m:
        raise ProtocolError(f"not an ORR answer: {out[:200]!r}")
    return OneTurn(restore(prompt), outputs, restore(m["thought"]), restore(m["answer"]), system)


def parse_orr_answer(text: str) -> str | None:
    """The answer inside ``<ANSWER>`` of a model's ORR reply (lenient: for evaluation)."""
    m = re.search(r"<ANSWER>\s*(?:The answer is:\s*)?(.*?)\s*(?:</ANSWER>|$)", text, re.S)
    return m[1].strip() if m else None
