"""Paid work exactly once: concurrent ``mmat build`` processes, a killed one, a fresh Dagster home.

Every build is a real ``mmat build`` process on one small TabMWP project (real OCR, two
shards, the ``openai`` teacher against a fake server with latency, in this test process so
it counts every request). A serial build is the reference; then the same project, wiped,
is built again in each scenario and must end with the same tables and JSONL files. Each
build gets its own temporary directory (its local cache files), as a build on another
machine would: what one build paid for reaches the other only through the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import tabmwp_subset, write_project
from tests.openai_fake_hooks import HookedFakeOpenAI

N_PROBLEMS = 8
FOUNDATION_PROBLEMS = 300  # many images: builds at once meet on the same media objects
SHARDS = 2
LATENCY_S = 0.15
LEASE_S = 3.0
SELECT = "*dialogue_files"
BUILD_TIMEOUT_S = 240
MMAT = str(Path(sys.executable).with_name("mmat"))
BUCKET = "mmat-exactly-once"
GOLD = re.compile(r"Correct answer \(do not quote it\): (.*)")


# ---------------------------------------------------------------------- the teacher


def ref(body: dict[str, Any]) -> str:
    """A request's identity as the server sees it (its whole body)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _user_text(body: dict[str, Any]) -> str:
    for m in body["messages"]:
        if m["role"] == "user":
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            return "\n".join(str(p.get("text") or "") for p in parts if p.get("type") == "text")
    return ""


def reply(body: dict[str, Any]) -> str:
    """Step 0 reads the table with OCR; step 1 concludes the gold answer; judges find no fault.

    Step replies carry the request's identity in a field the engine ignores, so a test can
    tell from a stored answer which request it answered."""
    gold = GOLD.search(_user_text(body))
    if gold is None:
        return "{}"
    if not any(m["role"] == "assistant" for m in body["messages"]):
        step: dict[str, Any] = {"thought": "The image is a table; I read it.", "operators": ["ocr"],
                                "next_action": "continue"}
    else:
        step = {"thought": f"The table gives what is needed. So the answer is {gold[1].strip()}.",
                "operators": [], "next_action": "final_answer"}
    return json.dumps({**step, "rag": {"needed": False, "query": None}, "ref": ref(body)})


@dataclass
class Recorder:
    """Arrivals per request identity, and a kill switch for one build (its process group)."""

    arrivals: Counter[str] = field(default_factory=Counter)
    kill_at: int | None = None
    followups: int = 0
    pid: int = 0
    killed: bool = False
    #: at this many second steps, ``term_signal`` to the build's own process only (not its group)
    term_at: int | None = None
    term_signal: int = signal.SIGTERM
    arrived: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, index: int, body: dict[str, Any]) -> bool:
        with self.lock:
            self.arrivals[ref(body)] += 1
            self.arrived.append(time.monotonic())
            # A second step's request proves its sample's first answer is stored (whatever
            # the number of workers): count those.
            self.followups += any(m["role"] == "assistant" for m in body["messages"])
            if self.term_at is not None and self.followups >= self.term_at and self.pid:
                os.kill(self.pid, self.term_signal)  # as `kill PID`, a service manager or a timeout sends it
                self.pid, self.term_at = 0, None
                return False
            if self.kill_at is None or self.followups < self.kill_at or not self.pid:
                return False
            # mid-shard, with this request and others in flight: the build and its worker processes
            os.killpg(self.pid, signal.SIGKILL)
            self.killed, self.pid, self.kill_at = True, 0, None
            return True  # this one goes unanswered

    def phase(self) -> Counter[str]:
        """Arrivals since the last call."""
        with self.lock:
            seen, self.arrivals, self.followups = self.arrivals, Counter(), 0
        return seen


# ------------------------------------------------------------------------- projects


@dataclass
class Project:
    base: Path
    config: Path
    server: HookedFakeOpenAI
    recorder: Recorder

    @property
    def store(self) -> Path:
        return self.config.parent / "store"

    def wipe(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)
        self.recorder.phase()

    def start(self, tag: str, profile: str = "local", env: dict[str, str] | None = None,
              args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        """A build process with its own temporary directory; the Dagster home is shared and
        not created yet (each scenario gets a fresh one named after it)."""
        tmp = self.base / "tmp" / tag
        tmp.mkdir(parents=True)
        env = {**os.environ, "DAGSTER_HOME": str(self.base / "homes" / tag.split("-")[0]), "TMPDIR": str(tmp),
               "COLUMNS": "200", **(env or {})}
        return subprocess.Popen([MMAT, "build", "--config", str(self.config), "--select", SELECT, "--profile", profile,
                                 "--json", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group: a kill takes its workers too


def finish(proc: subprocess.Popen[str], timeout: float = BUILD_TIMEOUT_S) -> tuple[int, dict[str, Any], str]:
    """Wait for a build (killing its process group past ``timeout``): rc, --json summary, output tail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and its workers, which hold the pipes too
        out, err = proc.communicate()
    try:
        summary = json.loads(out)
    except ValueError:
        summary = {}
    return proc.returncode, summary, (out + err)[-4000:]


def write_config(dest: Path, base_url: str, n_problems: int = N_PROBLEMS) -> Path:
    tabmwp_subset(dest / "tabmwp", n_problems)
    return write_project(
        dest, {"tabmwp": {"plugin": "tabmwp", "options": {"path": "tabmwp"}}}, shards=SHARDS,
        tools={t: {"enabled": False} for t in ("label_bbox", "face_detection", "image_caption")},
        teachers={"fake": {"plugin": "openai", "options": {
            "base_url": base_url, "model": "fake-teacher", "concurrency": 4, "timeout_s": 30, "max_retries": 0}}},
        stages={"teacher": "fake", "concurrency": 4, "max_steps": 3, "lease_s": LEASE_S},
        # the prod profile (S3, for the moto builds) beside the local one
        profiles={"local": {"root": "store"},
                  "prod": {"root": f"s3://{BUCKET}/run", "endpoint_url_env": "MMAT_S3_ENDPOINT_URL"}})


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    base = tmp_path_factory.mktemp("exactly_once")
    recorder = Recorder()
    with HookedFakeOpenAI(reply=reply, latency_s=LATENCY_S, on_receive=recorder) as server:
        (base / "proj").mkdir()
        yield Project(base, write_config(base / "proj", server.base_url), server, recorder)


@dataclass
class Reference:
    files: dict[str, bytes]
    requests: Counter[str]


@pytest.fixture(scope="module")
def reference(project: Project) -> Reference:
    """One build on its own: what every scenario must end with, and the requests it sends."""
    project.wipe()
    rc, summary, log = finish(project.start("serial"))
    assert rc == 0 and summary.get("failed") == 0, log
    requests = project.recorder.phase()
    assert requests and set(requests.values()) == {1}, requests  # nothing sent twice within a build
    return Reference(outputs(project.store), requests)


def outputs(store: Path) -> dict[str, bytes]:
    """Every table, JSON document and JSONL file the build wrote, by relative path."""
    out = {}
    for sub in ("tables", "datasets"):
        for path in sorted((store / sub).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(store))] = path.read_bytes()
    return out


def without_cached_flags(data: bytes) -> pl.DataFrame:
    """A stage table without whether each teacher call was paid by this build or read from
    the cache: which of two concurrent builds paid is a fact of the run, not of the data."""
    import io

    df = pl.read_parquet(io.BytesIO(data))

    def strip(prov: str | None) -> str | None:
        if prov is None:
            return None
        p = json.loads(prov)
        p["teacher_calls"] = [{k: v for k, v in c.items() if k != "cached"} for c in p.get("teacher_calls", [])]
        return json.dumps(p, sort_keys=True)

    if "provenance" in df.columns:
        df = df.with_columns(pl.col("provenance").map_elements(strip, return_dtype=pl.String))
    return df


def assert_same_outputs(ref: Reference, store: Path) -> None:
    got = outputs(store)
    assert sorted(got) == sorted(ref.files)
    differ = [name for name in got if got[name] != ref.files[name]]
    for name in differ:
        assert name.endswith(".parquet"), f"{name} differs from the serial build's"
        assert without_cached_flags(got[name]).equals(without_cached_flags(ref.files[name])), name
    jsonl = [n for n in got if n.endswith(".jsonl")]
    assert jsonl and not set(jsonl) & set(differ)  # the dialogue files byte for byte


# ---------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_two_builds_at_once_pay_for_every_request_once(project: Project, reference: Reference) -> None:
    project.wipe()
    procs = [project.start(f"pair-{i}") for i in range(2)]  # same moment, same fresh Dagster home
    results = [finish(p) for p in procs]
    for rc, summary, log in results:
        assert rc == 0 and summary.get("failed") == 0, log
    requests = project.recorder.phase()
    assert requests == reference.requests  # exactly one build's requests, each once
    assert_same_outputs(reference, project.store)
    assert not list(project.store.rglob("*.lease")) and not list(project.store.rglob("*.tmp"))


@pytest.mark.slow
def test_foundation_builds_at_once_keep_every_row(tmp_path: Path) -> None:
    """Three foundation builds of one project at once, on many images: each build reads every
    row and stores every image, whoever stores an image first; the media store stays whole."""
    n = FOUNDATION_PROBLEMS
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", n)  # no teacher is asked here
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([MMAT, "build", "--config", str(config), "--select", "group:foundation", "--json"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(3)]
    for rc, summary, log in [finish(p) for p in procs]:
        assert rc == 0 and summary.get("failed") == 0, log
        rows = {a["asset"]: a["rows"] for a in summary["assets"]}
        assert rows["source_samples/tabmwp"] == n and rows["quarantine/source/tabmwp"] == 0, rows  # this build's own
    store = tmp_path / "store"
    kept = sum(pl.read_parquet(p).height for p in (store / "tables" / "foundation_samples").glob("*.parquet"))
    quarantined = pl.read_parquet(store / "tables" / "quarantine" / "source" / "tabmwp.parquet")
    assert kept == n and quarantined.height == 0, quarantined["detail"].to_list()[:3]
    media = [p for p in (store / "media").rglob("*") if p.is_file()]
    assert {p.suffix for p in media} == {".png"}  # no temporary file left behind
    for path in media:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, path
    images = {img["sha256"] for p in (store / "tables" / "foundation_samples").glob("*.parquet")
              for imgs in pl.read_parquet(p)["images"].to_list() for img in imgs}
    assert images == {p.stem for p in media}


@pytest.mark.slow
def test_a_killed_build_is_taken_over_without_repeating_answers(project: Project, reference: Reference) -> None:
    project.wipe()
    project.recorder.kill_at = 3  # at the third second step: answers stored, other requests in flight
    proc = project.start("killed")
    project.recorder.pid = proc.pid
    rc, _, log = finish(proc)
    assert project.recorder.killed and rc == -signal.SIGKILL, log
    before = project.recorder.phase()
    leases = list((project.store / "cache").rglob("*.lease"))
    assert leases, "the killed build held no leases"
    stored = answered_refs(project.store)
    assert stored and stored <= set(before)

    started = time.monotonic()
    rc, summary, log = finish(project.start("rerun"))
    assert rc == 0 and summary.get("failed") == 0, log
    assert time.monotonic() - started < BUILD_TIMEOUT_S
    after = project.recorder.phase()
    assert not stored & set(after)  # no answered request was sent again
    assert set(before) | set(after) == set(reference.requests)  # the rest: sent by the rerun
    assert set(after.values()) == {1}
    assert not list(project.store.rglob("*.lease"))  # the dead holder's leases were taken over and released
    assert_same_outputs(reference, project.store)


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, 2), (signal.SIGKILL, 2), (signal.SIGTERM, 1)],
                         ids=["SIGTERM", "SIGKILL", "SIGTERM-in-process"])
@pytest.mark.slow
def test_a_stopped_build_stops_its_workers_and_the_rerun_resumes(project: Project, reference: Reference,
                                                                 sig: int, workers: int) -> None:
    # SIGTERM is handled: the build interrupts its workers and waits for them. SIGKILL cannot
    # be: each worker sees its parent gone within half a second and interrupts itself. With
    # one process the interrupt lands inside a Dagster step, which catches it: still a stop
    # (143), not a failed step (1).
    project.wipe()
    project.recorder.term_at, project.recorder.term_signal = 3, sig  # mid-shard, requests still to send
    tag = f"{signal.Signals(sig).name.lower()}-{workers}"
    proc = project.start(tag, args=("--workers", str(workers)))
    project.recorder.pid = proc.pid
    exit_time: list[float] = []

    def watch() -> None:  # when the build's own process ends (its pipes may stay open longer)
        while proc.poll() is None:
            time.sleep(0.02)
        exit_time.append(time.monotonic())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc, _, log = finish(proc)
    watcher.join(10)
    exited = exit_time[0] + (0 if sig == signal.SIGTERM else 1.0)  # the workers' watch: every 0.5 s
    if sig == signal.SIGTERM:
        assert rc == 143, log  # 128 + SIGTERM, as the shell reports a terminated command
        assert "stopped by SIGTERM" in log and "Traceback" not in log, log
    else:
        assert rc == -signal.SIGKILL, log
    time.sleep(3 * LATENCY_S + 2)  # a request a stray worker was about to send would arrive by now
    with project.recorder.lock:
        late = [t for t in project.recorder.arrived if t > exited]
    assert not late, f"{len(late)} request(s) reached the teacher after the build had exited"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no process of the build's group is left
    before, stored = project.recorder.phase(), answered_refs(project.store)

    rc, summary, log = finish(project.start(f"{tag}-rerun"))
    assert rc == 0 and summary.get("failed") == 0, log
    after = project.recorder.phase()
    assert not stored & set(after)  # what the stopped build had stored is not asked again
    assert set(before) | set(after) == set(reference.requests)
    assert_same_outputs(reference, project.store)


def answered_refs(store: Path) -> set[str]:
    """The requests whose answers a build stored and published (step replies name them)."""
    refs = set()
    for path in (store / "cache" / "teacher").rglob("answers/*.json"):
        content = json.loads(path.read_text())["content"]
        with_ref = json.loads(content) if content.startswith("{") else {}
        if "ref" in with_ref:
            refs.add(with_ref["ref"])
    return refs


@pytest.fixture
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free port, and the variables a prod build needs to reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "MMAT_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    boto3.client("s3", endpoint_url=env["MMAT_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()


@pytest.mark.slow
def test_two_prod_builds_at_once_on_s3_pay_for_every_request_once(
        project: Project, reference: Reference, s3_env: dict[str, str]) -> None:
    """The prod profile: tables, media, caches, leases and answers all on S3 (moto)."""
    import boto3

    project.wipe()
    procs = [project.start(f"s3pair-{i}", "prod", s3_env) for i in range(2)]
    for rc, summary, log in [finish(p) for p in procs]:
        assert rc == 0 and summary.get("failed") == 0, log
    requests = project.recorder.phase()
    assert set(requests.values()) == {1} and len(requests) == len(reference.requests)  # one build's, once each
    s3 = boto3.client("s3", endpoint_url=s3_env["MMAT_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert [k for k in keys if k.startswith("run/cache/teacher/")]  # the caches were on S3
    assert not [k for k in keys if k.endswith(".lease")]  # every claim released
    jsonl = {k.rsplit("/", 1)[-1]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()
             for k in keys if k.endswith(".jsonl")}
    local = {name.rsplit("/", 1)[-1]: data for name, data in reference.files.items() if name.endswith(".jsonl")}
    assert sorted(jsonl) == sorted(local)
    for name, data in jsonl.items():  # the same dialogues; image URIs point into S3 instead of the folder
        assert data.decode().replace(f"s3://{BUCKET}/run/", "") == local[name].decode().replace(
            str(project.store) + "/", ""), name


def test_a_request_names_its_images_by_content() -> None:
    """Machines read one image from different local paths: the request (and its claim) is one."""
    from mmat_assets.contracts import TeacherRequest

    def request(path: str, sha: str) -> TeacherRequest:
        parts = [{"type": "image", "path": path, "sha256": sha}, {"type": "text", "text": "Question: 1 + 1?"}]
        return TeacherRequest("step", [{"role": "user", "content": parts}], "p1", None, {})

    here, there = request("/tmp/a/x.png", "ab" * 32), request("/var/cache/y.png", "ab" * 32)
    assert here.fingerprint("m") == there.fingerprint("m")
    assert here.fingerprint("m") != request("/tmp/a/x.png", "cd" * 32).fingerprint("m")
