"""The ablation matrix (the paper's Table 5), pure logic: the held-out split, the training
variants derived from one set of rationales, and the report with bootstrap intervals.

Variants need no new teacher call; each is a view of the same RR trajectories:

- ``untuned``: the student as it is, prompted with the protocol (no training);
- ``rr``: the RR dialogues;
- ``orr``: the ORR one-turn samples;
- ``rr_no_reflection``: RR with every reflection round taken out, the corrected thought
  folded into the step before it (the content stays, the reflecting goes);
- ``rr_no_tools``: RR with no operator turns and no tool results: steps that only called a
  tool go, the others keep their thoughts and get the "nothing selected" user turn.

The held-out split is a seeded ranking of problem ids alone: it never looks at an answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmat_assets import protocol

VARIANTS = ("untuned", "rr", "orr", "rr_no_reflection", "rr_no_tools")
#: The harness mode each variant is evaluated in (untuned: in every mode a variant uses).
MODE_OF = {"rr": "rr", "orr": "orr", "rr_no_reflection": "rr", "rr_no_tools": "rr"}
TRAINED = tuple(v for v in VARIANTS if v != "untuned")


def heldout_split(ids: Iterable[str], n: int, seed: int) -> list[str]:
    """``n`` problem ids chosen by a seeded hash of the id (stable, order-free), sorted."""
    ranked = sorted(set(ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return sorted(ranked[:n])


def modes_of(variant: str, variants: Sequence[str]) -> list[str]:
    """The modes a variant is evaluated in: its own; the untuned student in each mode the
    trained variants use, so every gain has its baseline."""
    if variant != "untuned":
        return [MODE_OF[variant]]
    return sorted({MODE_OF[v] for v in variants if v in MODE_OF}) or ["rr"]


# -------------------------------------------------------------------------- variants


def without_reflection(t: protocol.Trajectory) -> protocol.Trajectory:
    """The trajectory with each reflection step and the step it asked for taken out; the
    corrected thought is folded into the step before the reflection, which then ends."""
    steps: list[protocol.Step] = []
    i = 0
    while i < len(t.steps):
        s = t.steps[i]
        if s.signal == "reflection" and steps and i + 1 < len(t.steps):
            fix = t.steps[i + 1]
            prev = steps[-1]
            steps[-1] = protocol.Step(f"{prev.thought} {fix.thought}", list(prev.operators), prev.rag, fix.signal,
                                      list(prev.results) if fix.signal != "end" else [])
            i += 2
            continue
        steps.append(protocol.Step(s.thought, list(s.operators), s.rag, s.signal, list(s.results)))
        i += 1
    return protocol.Trajectory(t.prompt, steps, t.answer, t.system)


def without_tools(t: protocol.Trajectory) -> protocol.Trajectory:
    """The trajectory with no tool or search call and no result: a step that only called a
    tool goes (its thought announces the call), the others lose their results."""
    steps = [protocol.Step(s.thought, [], None, s.signal, []) for s in t.steps if not (s.operators or s.rag)]
    if not steps or steps[-1].signal != "end":
        return protocol.Trajectory(t.prompt, [], t.answer, t.system)
    return protocol.Trajectory(t.prompt, steps, t.answer, t.system)


def variant_turns(variant: str, rr_turns: list[dict[str, str]], orr_turns: list[dict[str, str]] | None
                  ) -> list[dict[str, str]] | None:
    """One sample's training dialogue in ``variant`` (None: the variant has none for it)."""
    if variant == "rr":
        return rr_turns
    if variant == "orr":
        return orr_turns
    t = protocol.parse_rr(rr_turns)
    fixed = without_reflection(t) if variant == "rr_no_reflection" else without_tools(t)
    return protocol.render_rr(fixed) if fixed.steps else None


# --------------------------------------------------------------------------- scoring


def bootstrap(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
              ) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval (1 - ``alpha``)."""
    if not values:
        return 0.0, 0.0, 0.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo, hi = means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return sum(values) / n, lo, hi


def paired_gain(tuned: Mapping[str, float], base: Mapping[str, float], n_boot: int = 2000,
                seed: int = 0) -> tuple[float, float, float]:
    """Mean score difference on the items both were scored on, with its paired bootstrap interval."""
    shared = sorted(set(tuned) & set(base))
    return bootstrap([tuned[i] - base[i] for i in shared], n_boot, seed)


@dataclass
class Cell:
    """One evaluated variant × seed × mode."""

    variant: str
    seed: int
    mode: str
    scores: dict[str, float]  # item id -> score
    choice: dict[str, bool]  # item id -> multiple choice
    latency_s: float
    tokens_per_s: float | None = None
    steps: int | None = None


def _pct(x: tuple[float, float, float]) -> str:
    return f"{100 * x[0]:.1f} [{100 * x[1]:.1f}, {100 * x[2]:.1f}]"


def report_rows(cells: Sequence[Cell], n_boot: int = 2000) -> list[dict[str, Any]]:
    """One row per cell: accuracy with interval, gain over the untuned student (same mode,
    same seed's items) with interval, by question type, latency, training throughput."""
    base = {(c.mode, c.seed): c for c in cells if c.variant == "untuned"}
    rows = []
    for c in cells:
        vals = [c.scores[i] for i in sorted(c.scores)]
        by_type = {kind: [c.scores[i] for i in sorted(c.scores) if c.choice.get(i) == (kind == "multi_choice")]
                   for kind in ("free_text", "multi_choice")}
        ref = base.get((c.mode, c.seed)) or next((b for (m, _), b in base.items() if m == c.mode), None)
        gain = paired_gain(c.scores, ref.scores, n_boot) if ref is not None and c.variant != "untuned" else None
        rows.append({"variant": c.variant, "seed": c.seed, "mode": c.mode, "items": len(vals),
                     "accuracy": bootstrap(vals, n_boot), "gain": gain,
                     **{k: (bootstrap(v, n_boot) if v else None, len(v)) for k, v in by_type.items()},
                     "latency_s": c.latency_s, "tokens_per_s": c.tokens_per_s, "steps": c.steps})
    return rows


def report_markdown(rows: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """The Table 5 layout: a row per variant × seed × mode, accuracy in percent with 95%
    bootstrap intervals in brackets."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    lines = [header] if header else []
    lines += ["| variant | seed | mode | items | accuracy % [95% CI] | gain over untuned [95% CI] | free text | "
              "multiple choice | latency s/sample | train tokens/s | train steps |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (order.get(r["variant"], 99), r["seed"], r["mode"])):
        gain = "–" if r["gain"] is None else (f"{100 * r['gain'][0]:+.1f} [{100 * r['gain'][1]:+.1f}, "
                                              f"{100 * r['gain'][2]:+.1f}]")
        kinds = [f"{_pct(r[k][0])} (n={r[k][1]})" if r[k][0] else "–" for k in ("free_text", "multi_choice")]
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "–"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['mode']} | {r['items']} | {_pct(r['accuracy'])} | {gain} | "
                     f"{kinds[0]} | {kinds[1]} | {r['latency_s']:.2f} | {tps} | {r.get('steps') or '–'} |")
    return "\n".join(lines)
