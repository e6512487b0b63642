"""The attack list: hostile inputs a user can give ``mmat build``, as data.

Each :class:`Attack` names what it does, writes its project (data, config, plugins) with a
small function, and says what must come of it: rows kept and quarantined at its source,
and the exit code of ``mmat build`` (a subprocess with its own ``$DAGSTER_HOME``, bounded by
a timeout). For every attack that reads its source, rows in = kept + quarantined + dropped
duplicates; an exit other than 0 must name its cause in the output, and an exit of 0 must
come with no cause of failure at all. Attacks that share a ``build`` name are written into
one project and built once (their configs and environments merged), each asserting on its
own source. Adding an attack is one line in :data:`ATTACKS`.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FIXTURES
from tests.openai_fake import FakeOpenAI, _handler, _Server
from tests.test_cli import _run_build, entry_point_plugin

#: Seconds one build may take before the attack counts as a hang.
BUILD_TIMEOUT_S = 120
GOOD_ROWS = 10
TOOLS_OFF = {t: {"enabled": False} for t in ("ocr", "face_detection", "label_bbox", "image_caption")}
KEY_ENV = "MMAT_ATTACK_KEY"


# --------------------------------------------------------------------------- inputs


@dataclass
class Setup:
    """What an attack's input function gets: a folder of its own, its source's name (unique
    in a shared build), and a teacher endpoint that rejects every API key."""

    dir: Path
    name: str
    teacher_url: str


@dataclass
class Project:
    """What an attack puts into ``mmat.yaml`` and the build's environment."""

    sources: dict[str, dict[str, Any]]
    rows_in: dict[str, int] = field(default_factory=dict)  # source -> lines written
    config: dict[str, Any] = field(default_factory=dict)  # further top-level sections
    env: dict[str, str] = field(default_factory=dict)
    select: str = "group:foundation"
    shards: int = 2


Given = Callable[[Setup], Project]


def _good(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "q": f"{prefix}: what is {i} plus one?", "a": str(i + 1)}).encode()
            for i in range(n)]


def _qa_source(path: Path, **options: Any) -> dict[str, Any]:
    return {"plugin": "qa_table", "options": {"path": str(path), "license": "CC0-1.0", **options,
                                              "columns": {"id": "id", "question": "q", "answer": "a",
                                                          "choices": "opts", "image": "img"}}}


def jsonl(*bad: str | bytes, good: int = GOOD_ROWS, **project: Any) -> Given:
    """A qa_table JSONL source: ``good`` clean rows with the ``bad`` lines in the middle."""
    def given(s: Setup) -> Project:
        lines = _good(s.name, good)
        lines[good // 2:good // 2] = [b if isinstance(b, bytes) else b.encode("utf-8", "surrogatepass") for b in bad]
        path = s.dir / f"{s.name}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        return Project({s.name: _qa_source(path, image_root=str(FIXTURES / "qa_table"))},
                       {s.name: len(lines)}, **project)
    return given


def with_(given: Given, make: Callable[[Setup], dict[str, Any]]) -> Given:
    """``given``, and fields of the project computed from the setup (a plugin folder, a URL)."""
    def both(s: Setup) -> Project:
        project = given(s)
        for name, value in make(s).items():
            setattr(project, name, {**getattr(project, name), **value} if isinstance(value, dict) else value)
        return project
    return both


def exits_at_import(s: Setup) -> dict[str, Any]:
    site = entry_point_plugin(s.dir / "site", "exits_at_import", "import sys\nsys.exit(3)\n")
    return {"env": {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}}


def blocked_exits_at_import(s: Setup) -> dict[str, Any]:
    return {"env": {**exits_at_import(s)["env"], "MMAT_BLOCK_PLUGINS": "exits_at_import"}}


def rejecting_teacher(s: Setup) -> dict[str, Any]:
    return {"config": {"teachers": {"openai": {"plugin": "openai", "options": {
        "base_url": s.teacher_url, "api_key_env": KEY_ENV, "max_retries": 0, "timeout_s": 10}}},
        "stages": {"teacher": "openai", "concurrency": 4}, "tools": TOOLS_OFF},
        "env": {KEY_ENV: "sk-attack-wrong-key-0000"}, "select": "*rationales"}


def missing_file(s: Setup) -> Project:
    return Project({s.name: _qa_source(s.dir / "not-there.jsonl")})


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class Attack:
    name: str
    given: Given
    kept: int | None  # rows kept at the attack's source; None: not checked (nothing read)
    quarantined: int | None
    exit: int
    cause: str = ""  # a regex the output must match when exit != 0
    build: str = ""  # attacks with the same build name share one project and one build


DEEP = "[" * 100_000 + "]" * 100_000
DUPLICATE_IDS = [json.dumps({"id": "same", "q": "Which picture is this?", "a": "fruit", "img": img}).encode()
                 for img in ("img/apples.png", "img/sky.png")]  # same id and question, different image
NO_ANSWER = [json.dumps({"id": f"e{i}", "q": f"an unanswered question {i}?", "a": ""}) for i in range(6)]

ATTACKS = [
    Attack("lone surrogate", jsonl(b'{"id": "bad", "q": "a lone \\ud800 surrogate?", "a": "1"}'), 10, 1, 0,
           build="bad lines"),
    Attack("raw 0xFF byte", jsonl(b'{"id": "bad", "q": "a raw \xff byte?", "a": "1"}'), 10, 1, 0, build="bad lines"),
    Attack('"choices": 5', jsonl('{"id": "bad", "q": "pick one?", "a": "1", "opts": 5}'), 10, 1, 0,
           build="bad lines"),
    Attack("100,000-deep nesting", jsonl('{"id": "bad", "q": "deep?", "a": "1", "x": ' + DEEP + "}"), 10, 1, 0,
           build="bad lines"),
    Attack("6 of 10 rows without an answer", jsonl(*NO_ANSWER, good=4), 4, 6, 1,
           r"source_samples/6_of_10_rows_without_an_answer: 6 of 10 rows failed \(60%", build="failing sources"),
    Attack("source file missing", missing_file, None, None, 1, r"source_samples/source_file_missing: ",
           build="failing sources"),
    Attack("6 of 10 bad under a 70% limit", jsonl(*NO_ANSWER, good=4, config={"stages": {"max_failure_rate": 0.7}}),
           4, 6, 0, build="tolerated"),
    Attack("broken plugin blocked", with_(jsonl(), blocked_exits_at_import), 10, 0, 0, build="tolerated"),
    Attack("duplicate sample ids", jsonl(*DUPLICATE_IDS, good=0, shards=1), 2, 0, 1,
           r"check failed: foundation_samples:unique_sample_ids"),
    Attack("401 on every row", with_(jsonl(), rejecting_teacher), 10, 0, 1,
           r"rationales: \[0\] the teacher 'openai' rejected the API key: HTTP 401"),
    Attack("plugin calls sys.exit(3) at import", with_(jsonl(), exits_at_import), None, None, 1,
           r"plugin 'exits_at_import' failed to load: SystemExit: it called sys\.exit\(3\).*MMAT_BLOCK_PLUGINS"),
    Attack("selection 'exports/*'", jsonl(select="exports/*"), None, None, 2,
           r"""--select 'exports/\*': no asset is named 'exports/'.*group:export.*key:"exports/\*\""""),
    Attack("selection matching nothing", jsonl(select="group:nosuch"), None, None, 2,
           r"--select 'group:nosuch': it matches no asset"),
    Attack("unbuilt upstream", jsonl(select="+dialogue_files", config={"tools": TOOLS_OFF}), None, None, 1,
           r"reads rationales, source_samples/unbuilt_upstream, which have never been materialized; "
           r"include them: --select '\*dialogue_files'"),
]


# --------------------------------------------------------------------------- running


class RejectingOpenAI(FakeOpenAI):
    """The fake OpenAI server answering every request as OpenAI answers a wrong key."""

    def start(self) -> RejectingOpenAI:
        class Reject(_handler(self)):  # type: ignore[misc]
            def _answer(self, body: dict[str, Any], fault: str | None) -> int:
                return int(self._send(401, {"error": {
                    "message": "Incorrect API key provided: sk-att***0000.", "type": "invalid_request_error",
                    "param": None, "code": "invalid_api_key"}}))

        self._server = _Server(("127.0.0.1", 0), Reject)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self


@dataclass
class Built:
    returncode: int
    output: str
    summary: dict[str, Any] | None
    rows_in: dict[str, int]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _merge(projects: list[Project]) -> Project:
    first = projects[0]
    assert all((p.select, p.shards) == (first.select, first.shards) for p in projects), "one build, one selection"
    merged = Project({}, select=first.select, shards=first.shards)
    for p in projects:
        merged.sources.update(p.sources)
        merged.rows_in.update(p.rows_in)
        merged.env.update(p.env)
        for section, value in p.config.items():
            merged.config[section] = {**merged.config.get(section, {}), **value}
    return merged


def _build(attacks: list[Attack], root: Path, teacher_url: str) -> Built:
    projects = []
    for attack in attacks:
        folder = root / _slug(attack.name)
        folder.mkdir()
        projects.append(attack.given(Setup(folder, _slug(attack.name), teacher_url)))
    project = _merge(projects)
    config = {"sources": project.sources, "foundation": {"shards": project.shards, "seed": 7},
              "profiles": {"local": {"root": str(root / "store")}}, **project.config}
    path = root / "mmat.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    # One shard at a time: a rejected key then stops the build before the next shard starts
    # (with --workers N, the N shards already running each see the rejection).
    out = _run_build(path, root / "home", "--select", project.select, "--json", "--workers", "1",
                     env=project.env, timeout=BUILD_TIMEOUT_S)
    try:
        summary = json.loads(out.stdout) if out.stdout.strip() else None
    except ValueError:
        summary = None
    return Built(out.returncode, out.stdout + out.stderr, summary, project.rows_in)


@pytest.fixture(scope="module")
def teacher() -> Iterator[RejectingOpenAI]:
    with RejectingOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, teacher: RejectingOpenAI) -> Callable[[str], Built]:
    done: dict[str, Built] = {}

    def get(build: str) -> Built:
        if build not in done:
            group = [a for a in ATTACKS if (a.build or a.name) == build]
            done[build] = _build(group, tmp_path_factory.mktemp(_slug(build)), teacher.base_url)
        return done[build]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack(attack: Attack, built: Callable[[str], Built]) -> None:
    b = built(attack.build or attack.name)
    assert b.returncode == attack.exit, b.output[-4000:]
    assert "Traceback" not in b.output, b.output[-4000:]  # a reason a person reads, not a stack
    if attack.exit:
        assert re.search(attack.cause, b.output, re.S), b.output[-4000:]
    else:
        assert b.summary is not None and b.summary["causes"] == [], b.output[-4000:]
    name = _slug(attack.name)
    assets = {a["asset"]: a for a in (b.summary or {}).get("assets", [])}
    source = assets.get(f"source_samples/{name}")
    if attack.kept is not None:
        assert source is not None, b.output[-4000:]
        counts = source["counts"]
        assert (source["rows"], counts["rows_quarantined"]) == (attack.kept, attack.quarantined), counts
    if source is not None and name in b.rows_in:  # nothing lost: every line is kept, quarantined or dropped
        counts = source["counts"]
        dropped = sum(v for k, v in counts.items() if k.startswith("rows_dropped"))  # duplicates (and quota)
        assert b.rows_in[name] == source["rows"] + counts["rows_quarantined"] + dropped, counts


@pytest.mark.slow
def test_a_rejected_key_stops_the_build_after_the_requests_in_flight(
        built: Callable[[str], Built], teacher: RejectingOpenAI) -> None:
    """401 on every row: one readable line, not a failure per row; the other shard never starts."""
    b = built("401 on every row")
    assert b.summary is not None, b.output[-4000:]
    assert 0 < teacher.total <= 4 < GOOD_ROWS  # at most the requests in flight (concurrency 4), no retries
    assert len(re.findall(r"rejected the API key", "\n".join(b.summary["causes"]))) == 1, b.summary["causes"]
    status = {a["asset"]: a["status"] for a in b.summary["assets"]}
    assert status["rationales"] == "failed" and status["foundation_samples"] == "partly skipped", status
    assert "sk-attack-wrong-key" not in b.output


def test_the_rationale_engine_stops_a_shard_at_the_first_rejected_key(tmp_path: Path) -> None:
    """Without a build around it: the rows in flight end, no further row is sent."""
    from mmat_assets.contracts import TeacherError
    from mmat_assets.engine import stages
    from mmat_assets.engine.rationale import TeacherRejected
    from tests.stage_fakes import ScriptedTeacher, environment, samples

    teacher = ScriptedTeacher(lambda ctx: TeacherError("auth", "HTTP 401 from http://x/v1: bad key"))
    env = environment(teacher, {}, tmp_path, concurrency=2)
    rows = samples(tmp_path, [{"question": f"q{i}", "answer": "1"} for i in range(20)])
    with pytest.raises(TeacherRejected, match=r"^the teacher '\w+' rejected the API key: HTTP 401 from http://x/v1"):
        stages.run_rationales(rows, env)
    assert 1 <= len(teacher.calls) <= 2
