"""``mmat estimate``: what a build will cost before it starts.

A seeded pilot of N rows, drawn from the foundation tables of every shard, runs the selected
teacher stages (rationales, then reflections) through the real teacher and each shard's own
request cache, so the build that follows reuses every answer the pilot paid for. From the
teacher calls each pilot row recorded, every figure is extrapolated to the whole selection
per stage: requests, prompt and completion tokens, dollars (the teacher's own pricing, which
is its price table) and wall time at the configured concurrency and the account's rate
limits (``stages.teacher_rpm`` / ``teacher_tpm``). Each figure carries a 95% interval, a
bootstrap over the pilot rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl

from mmat_assets.engine.leases import read_whole
from mmat_assets.engine.rationale import Environment

STAGES = ("rationales", "reflections")
#: teacher call kinds that belong to the rationale stage; every other kind is a judge's
RATIONALE_KINDS = {"step"}
DRAWS = 1000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class RowUsage:
    """What one pilot row's requests of one stage took."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0
    #: the row's requests one after another (a row's steps wait for each other)
    seconds: float = 0.0


@dataclass(frozen=True)
class Limits:
    """What bounds the wall time: rows in flight at once, and the account's rate limits."""

    concurrency: int
    rpm: float | None = None
    tpm: float | None = None


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    rows: int
    pilot_rows: int
    requests: Interval
    prompt_tokens: Interval
    completion_tokens: Interval
    usd: Interval
    wall_s: Interval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIGURES = ("requests", "prompt_tokens", "completion_tokens", "usd", "wall_s")


# ----------------------------------------------------------------------- pure parts


def pilot(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows drawn with ``seed``, the same whatever order the shards were read in."""
    ordered = frame.sort("sample_id")
    if n >= ordered.height:
        return ordered
    picked = sorted(random.Random(seed).sample(range(ordered.height), n))
    return ordered[picked]


def row_usage(row: Mapping[str, Any], latency: Callable[[str], float]) -> dict[str, RowUsage]:
    """Per stage, what one stage-output row's recorded teacher calls took."""
    calls = json.loads(row.get("provenance") or "{}").get("teacher_calls", [])
    out: dict[str, RowUsage] = {s: RowUsage() for s in STAGES}
    for call in calls:
        stage = "rationales" if call.get("kind") in RATIONALE_KINDS else "reflections"
        u = out[stage]
        out[stage] = RowUsage(u.requests + 1, u.prompt_tokens + int(call.get("prompt_tokens") or 0),
                              u.completion_tokens + int(call.get("completion_tokens") or 0),
                              u.usd + float(call.get("cost_usd") or 0.0),
                              u.seconds + latency(str(call.get("request_hash") or "")))
    return out


def totals(usages: list[RowUsage], rows: int, limits: Limits) -> dict[str, float]:
    """The whole selection's figures from a sample of rows' usage."""
    scale = rows / max(len(usages), 1)
    out = {"requests": sum(u.requests for u in usages) * scale,
           "prompt_tokens": sum(u.prompt_tokens for u in usages) * scale,
           "completion_tokens": sum(u.completion_tokens for u in usages) * scale,
           "usd": sum(u.usd for u in usages) * scale}
    waits = [sum(u.seconds for u in usages) * scale / limits.concurrency]
    if limits.rpm:
        waits.append(out["requests"] / limits.rpm * 60)
    if limits.tpm:
        waits.append((out["prompt_tokens"] + out["completion_tokens"]) / limits.tpm * 60)
    out["wall_s"] = max(waits)
    return out


def extrapolate(stage: str, usages: list[RowUsage], rows: int, limits: Limits, seed: int = 0,
                draws: int = DRAWS) -> StageEstimate:
    """Point figures and 95% intervals from resampling the pilot rows with replacement."""
    point = totals(usages, rows, limits)
    rng = random.Random(seed)
    boot = [totals(rng.choices(usages, k=len(usages)), rows, limits) for _ in range(draws)] if usages else [point]
    figures = {name: _interval(point[name], sorted(b[name] for b in boot)) for name in FIGURES}
    return StageEstimate(stage, rows, len(usages), **figures)


def _interval(value: float, draws: list[float]) -> Interval:
    low, high = draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]
    return Interval(value, min(low, value), max(high, value))


# ----------------------------------------------------------------------- the pilot


EnvFor = Callable[[str], AbstractContextManager[Environment]]


def run_pilot(foundation: Mapping[str, pl.DataFrame], env_for: EnvFor, stages: set[str], n: int,
              seed: int, limits: Limits) -> list[StageEstimate]:
    """Run ``stages`` on the pilot rows of each shard (in that shard's environment, so its
    request cache keeps the answers) and extrapolate to every row of ``foundation``."""
    from mmat_assets.engine import stages as engine

    frames = [df.with_columns(pl.lit(shard).alias("_shard")) for shard, df in sorted(foundation.items()) if df.height]
    if not frames:
        return []
    everything = pl.concat(frames, how="vertical_relaxed")
    chosen = pilot(everything, n, seed)
    usages: dict[str, list[RowUsage]] = {s: [] for s in STAGES}
    for shard in sorted(set(chosen["_shard"])):
        rows = chosen.filter(pl.col("_shard") == shard).drop("_shard")
        with env_for(shard) as env:
            out = engine.run_rationales(rows, env)
            if "reflections" in stages:
                out = engine.run_reflections(out, env)
            for row in out.iter_rows(named=True):
                for stage, usage in row_usage(row, _latency(env)).items():
                    usages[stage].append(usage)
    return [extrapolate(s, usages[s], everything.height, limits, seed) for s in STAGES if s in stages]


def _latency(env: Environment) -> Callable[[str], float]:
    def latency(key: str) -> float:
        stored = env.request_cache.get(key) if env.request_cache is not None and key else None
        return float((stored or {}).get("latency_s") or 0.0)

    return latency


# ----------------------------------------------------------------------- the project


def estimate_project(config: Path, profile: str, select: str | None, n: int, seed: int,
                     workers: int = 1) -> list[StageEstimate]:
    """``mmat estimate``: the pilot on the project's built foundation tables."""
    from mmat_assets.assets import build_definitions
    from mmat_assets.assets._shared import shard_environment
    from mmat_assets.plugins import load_registry
    from mmat_assets.runner import read_config

    cfg = read_config(config)  # a broken config is one line (BuildError)
    registry = load_registry()
    defs = build_definitions(cfg, profile, registry)
    resources: Mapping[str, Any] = defs.resources or {}
    storage, teacher = resources["storage"], _resolved(resources["teacher"])
    foundation = dict(_foundation_tables(storage))
    if not foundation:
        raise FileNotFoundError("no foundation_samples table is built yet: run "
                                "`mmat build --select 'group:foundation'` first")
    chosen = _stages(defs, select)
    limits = Limits(cfg.stages.concurrency * max(workers, 1), cfg.stages.teacher_rpm, cfg.stages.teacher_tpm)

    def env_for(shard: str) -> AbstractContextManager[Environment]:
        return shard_environment(cfg, registry, storage, teacher, shard)

    return run_pilot(foundation, env_for, chosen, n, seed, limits)


def _resolved(resource: Any) -> Any:
    """The teacher resource with its key read from the environment (outside a Dagster run)."""
    key = getattr(resource, "api_key", None)
    if key is not None and hasattr(key, "get_value"):
        return resource.model_copy(update={"api_key": key.get_value()})
    return resource


def _foundation_tables(storage: Any) -> Iterator[tuple[str, pl.DataFrame]]:
    folder = storage.path("tables", "foundation_samples")
    try:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(".parquet"))
    except FileNotFoundError:
        return
    for path in files:
        yield path.name.removesuffix(".parquet"), pl.read_parquet(read_whole(path))


def _stages(defs: Any, select: str | None) -> set[str]:
    if not select:
        return set(STAGES)
    import dagster as dg

    keys = dg.AssetSelection.from_string(select).resolve(defs.resolve_asset_graph())
    chosen = {k.to_user_string() for k in keys} & set(STAGES)
    if not chosen:
        raise ValueError(f"--select {select!r} selects neither rationales nor reflections")
    return chosen | ({"rationales"} if "reflections" in chosen else set())  # reflections read rationales


def table(estimates: list[StageEstimate]) -> list[list[str]]:
    """Rows of the printed table: stage, then each figure as 'value [low-high]'."""
    out = []
    for e in estimates:
        cells = [f"{e.stage} ({e.pilot_rows} of {e.rows} rows)"]
        for name in FIGURES:
            f = getattr(e, name)
            fmt = "${:,.4f}" if name == "usd" else "{:,.0f} s" if name == "wall_s" else "{:,.0f}"
            cells.append(f"{fmt.format(f.value)} [{fmt.format(f.low)}-{fmt.format(f.high)}]")
        out.append(cells)
    return out


__all__ = ["FIGURES", "Interval", "Limits", "RowUsage", "StageEstimate", "estimate_project", "extrapolate",
           "pilot", "row_usage", "run_pilot", "table", "totals"]
