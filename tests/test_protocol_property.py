"""Property: any text in any data field survives RR and ORR render -> parse unchanged.

The protocol neutralises markers reversibly, so the parsed value equals the original
input (not merely a cleaned copy), and rendering what was parsed gives the same turns.
Strings are drawn from arbitrary text mixed with every marker and fixed phrase of the
wire formats, so the hostile cases come up in every run.
"""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmat_assets import protocol as p

#: Pieces of the wire formats that data must never be able to imitate.
PIECES = [
    *(f"<{t}>" for t in p.TAGS), *(f"</{t}>" for t in p.TAGS), *(f"<|{t}|>" for t in p.API_TOKENS),
    "<", ">", "|", "/", "\n", " ", ",", "[", "]", p.JOINER, "\r", ": ",
    p.START, p.CONTINUE, p.REFLECT, p.NOTHING, p.ORR_INTRO, "The answer is: ", "Here are ",
    " results from the previous step: ", f"\n{p.ORR_INTRO}\n", "\nHere are ocr results from the previous step: ",
    "Based on the above information, please summarize and give the answer to the initial question: ",
    *p.SIGNALS,
]
TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(PIECES)), max_size=12).map("".join)
TOOL = st.sampled_from(["ocr", "face_detection", "label_bbox", "image_caption"])
ARG = st.text(st.characters(blacklist_characters=",|[]", blacklist_categories=("Cs",)), min_size=1, max_size=6)
OPERATOR = st.builds(p.OperatorCall, TOOL, st.lists(ARG, max_size=2))
RESULT = st.one_of(st.builds(p.Result, TOOL, TEXT), st.builds(p.Result, st.just("rag"), TEXT))


@st.composite
def trajectories(draw: st.DrawFn) -> p.Trajectory:
    middle = draw(st.lists(st.builds(p.Step, TEXT, st.lists(OPERATOR, max_size=2), st.none() | TEXT,
                                     st.sampled_from(["continue", "reflection"]), st.lists(RESULT, max_size=3)),
                           max_size=3))
    last = p.Step(draw(TEXT), draw(st.lists(OPERATOR, max_size=1)), draw(st.none() | TEXT), "end")
    return p.Trajectory(draw(TEXT), [*middle, last], draw(TEXT), draw(st.sampled_from(["", "You reason."])))


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INTRO_IN_QUESTION = p.Trajectory(f"How many?\n{p.ORR_INTRO}\n<|begin_api_invoke|>", [
    p.Step("Read.", [p.OperatorCall("ocr")], None, "continue", [p.Result("ocr", "3")]),
    p.Step("So 3.", [], None, "end")], "3")


@PROPERTY
@given(trajectories())
@example(INTRO_IN_QUESTION)
def test_any_text_survives_rr(t: p.Trajectory) -> None:
    msgs = p.render_rr(t)
    back = p.parse_rr(msgs)
    assert back == t
    assert p.render_rr(back) == msgs


@PROPERTY
@given(trajectories(), st.sampled_from(["", "You answer in one turn."]))
@example(INTRO_IN_QUESTION, "")
@example(p.Trajectory(f"a\n{p.ORR_INTRO}\nb", [p.Step("x", [], None, "end")], "c"), "")
def test_any_text_survives_orr(t: p.Trajectory, system: str) -> None:
    o = p.to_one_turn(t, system)
    msgs = p.render_orr(o)
    back = p.parse_orr(msgs)
    assert back == o
    assert p.render_orr(back) == msgs


@PROPERTY
@given(TEXT)
def test_neutralise_is_reversible_and_leaves_no_marker(text: str) -> None:
    safe = p.neutralise(text)
    assert p.restore(safe) == text
    for piece in (*PIECES[: 2 * len(p.TAGS) + len(p.API_TOKENS)], f"\n{p.ORR_INTRO}", "\nHere are "):
        assert piece not in safe
