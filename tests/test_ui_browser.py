"""The Dagster UI in a real browser: materialize the Foundation group and read its metadata.

``dagster dev`` (webserver + daemon) serves a small TabMWP project from a temporary
``DAGSTER_HOME``; headless Debian chromium, driven by Playwright, launches the group's
backfill from the asset graph and checks the row counts the asset pages show against the
stored Parquet tables. Screenshots go to ``$MMAT_TEST_ARTIFACTS`` (default ``.artifacts/ui``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from mmat_assets.cli import ensure_dagster_home
from tests.conftest import REPO, write_project

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUOTA = 2  # rows per TabMWP grade: 16 rows, a few seconds of work
STARTUP_S = 180
MATERIALIZE_S = 600  # the backfill daemon ticks every 30 s: three ticks idle, more on a busy CI machine
UI_S = 60


@dataclass
class Server:
    url: str
    store: Path
    log: Path
    grades: set[int]  # TabMWP subsets: the quota applies to each

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        res = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30)
        res.raise_for_status()
        body = res.json()
        assert "errors" not in body, body
        return body["data"]


@pytest.fixture
def sync_api() -> Any:
    """Playwright's sync API, or a skip (a failure under CI, so the test cannot vanish there)."""
    missing = []
    try:
        from playwright import sync_api as api
    except ImportError:
        missing.append("the playwright package")
    if not CHROMIUM.is_file():
        missing.append(str(CHROMIUM))
    if missing:
        reason = f"browser test needs {' and '.join(missing)} (`make test` installs both)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_until_up(proc: subprocess.Popen[bytes], server: Server) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"dagster dev exited with {proc.returncode}:\n{server.log_tail()}"
        try:
            if httpx.get(f"{server.url}/server_info", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"dagster dev did not answer within {STARTUP_S} s:\n{server.log_tail()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop dagster dev and everything it started (webserver, daemon, code servers, runs)."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # its children do not always follow it
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def dagster_dev(tmp_path: Path, tabmwp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """``dagster dev`` over a fresh 2-shard TabMWP project, on a free port, in its own process group."""
    cfg = write_project(tmp_path, {"tabmwp": {"plugin": "tabmwp", "options": {"path": str(tabmwp_dir)},
                                              "quota": QUOTA}}, shards=2,
                        # one shard per run, so each shard's materialization names its own file
                        foundation={"shards_per_run": 1})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    home = ensure_dagster_home(cfg)  # queued runs (dagster dev starts the daemon), no welcome pop-up
    port = _free_port()
    problems = json.loads((tabmwp_dir / "problems.json").read_text(encoding="utf-8"))
    server = Server(f"http://127.0.0.1:{port}", tmp_path / "store", tmp_path / "dagster_dev.log",
                    {p["grade"] for p in problems.values()})
    env = {**os.environ, "MMAT_CONFIG": str(cfg), "DAGSTER_HOME": str(home)}
    dagster = Path(sys.executable).with_name("dagster")
    with server.log.open("wb") as log:
        proc = subprocess.Popen([str(dagster), "dev", "-f", "definitions.py", "-h", "127.0.0.1", "-p", str(port)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(proc, server)
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def artifacts() -> Path:
    out = Path(os.environ.get("MMAT_TEST_ARTIFACTS") or REPO / ".artifacts" / "ui")
    out.mkdir(parents=True, exist_ok=True)
    (out / "failure.png").unlink(missing_ok=True)
    print(f"screenshots: {out}")
    return out


def _wait_for_backfill(server: Server, backfill_id: str) -> str:
    query = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
        __typename ... on PartitionBackfill { status } } }"""
    deadline = time.monotonic() + MATERIALIZE_S
    status = "unknown"
    while time.monotonic() < deadline:
        status = server.graphql(query, id=backfill_id)["partitionBackfillOrError"]["status"]
        if status in ("COMPLETED_SUCCESS", "COMPLETED"):
            return status
        assert status not in ("FAILED", "CANCELED", "COMPLETED_FAILED", "FAILING", "CANCELING"), \
            f"backfill {backfill_id} ended {status}:\n{server.log_tail()}"
        time.sleep(2)
    pytest.fail(f"backfill {backfill_id} still {status} after {MATERIALIZE_S} s:\n{server.log_tail()}")


def _only_backfill(server: Server) -> str:
    """The id of the one backfill this fresh instance has."""
    query = """{ partitionBackfillsOrError { __typename ... on PartitionBackfills { results { id } } } }"""
    results = server.graphql(query)["partitionBackfillsOrError"]["results"]
    assert len(results) == 1, results
    return results[0]["id"]


def _tile(page: Any, label: str) -> Any:
    """A labelled value of an overview page ("Row count", "Status"): the label and its value."""
    return page.get_by_text(label, exact=True).first.locator("xpath=..")


def _shows(value: object) -> Any:
    """The tile's text is its label and exactly ``value``."""
    return re.compile(rf"^[^\n]+\n\s*{re.escape(str(value))}\s*$")


def test_materialize_foundation_group_from_the_ui(sync_api: Any, dagster_dev: Server, artifacts: Path) -> None:
    expect = sync_api.expect
    expect.set_options(timeout=UI_S * 1000)
    url = dagster_dev.url
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(UI_S * 1000)
        try:
            # The global asset graph, once the code location has loaded.
            page.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
            group = page.get_by_role("button", name=re.compile(r"\bfoundation\b"))
            expect(group).to_be_visible(timeout=STARTUP_S * 1000)
            page.screenshot(path=artifacts / "01-asset-graph.png")

            # Narrow the graph to the Foundation group and materialize all of it.
            group.click()
            page.get_by_role("button", name="more_horiz").click()
            page.get_by_role("menuitem", name=re.compile("Filter to this group")).click()
            expect(page).to_have_url(re.compile(r"group%3A%22foundation%22"))
            expect(page.get_by_role("button", name=re.compile(r"foundation_samples"))).to_be_visible()
            page.screenshot(path=artifacts / "02-foundation-group.png")
            page.get_by_role("button", name=re.compile(r"Materialize all")).click()

            # foundation_samples is partitioned by shard: the dialog asks which; take all.
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text("materialize 3 assets")
            all_partitions = dialog.get_by_role("button", name="All", exact=True)
            if all_partitions.count():
                all_partitions.click()
                expect(dialog).to_contain_text("2 partitions")
            page.screenshot(path=artifacts / "03-launch-dialog.png")
            dialog.get_by_role("button", name=re.compile(r"^Launch")).click()

            toast = page.get_by_text(re.compile(r"Created backfill \w+"))
            expect(toast).to_be_visible()
            backfill = _only_backfill(dagster_dev)  # the notice closes by itself: ask the server
            _wait_for_backfill(dagster_dev, backfill)

            page.goto(f"{url}/runs/b/{backfill}", wait_until="domcontentloaded")
            expect(_tile(page, "Status")).to_have_text(_shows("Succeeded"), use_inner_text=True)
            expect(_tile(page, "Partition selection")).to_have_text(re.compile(r"\n\s*(0\s*1|1\s*0)\s*$"),
                                                                     use_inner_text=True)
            expect(page.get_by_role("link", name="source_samples / tabmwp")).to_be_visible()
            page.screenshot(path=artifacts / "04-backfill.png")

            # The source table: the UI's row count is the stored table's height, the quota per grade.
            source = pl.read_parquet(dagster_dev.store / "tables" / "source_samples" / "tabmwp.parquet")
            assert source.height == QUOTA * len(dagster_dev.grades)
            page.get_by_role("link", name="source_samples / tabmwp").first.click()
            expect(page).to_have_url(re.compile(r"/assets/source_samples/tabmwp"))
            expect(_tile(page, "Row count")).to_have_text(_shows(source.height), use_inner_text=True)
            expect(_tile(page, "Latest materialization").get_by_role("link").first).to_be_visible()
            page.screenshot(path=artifacts / "05-source-samples.png", full_page=True)

            # A shard: the row count shown is that of the Parquet file its path metadata names.
            page.goto(f"{url}/assets/foundation_samples", wait_until="domcontentloaded")
            path_row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="path", exact=True))
            expect(path_row).to_contain_text(".parquet")
            shown = re.search(r"\S+\.parquet", path_row.inner_text())
            assert shown, path_row.inner_text()
            shard_file = Path(shown.group(0))
            assert shard_file.parent == dagster_dev.store / "tables" / "foundation_samples"
            shard = pl.read_parquet(shard_file)
            expect(_tile(page, "Row count")).to_have_text(_shows(shard.height), use_inner_text=True)
            expect(_tile(page, "Latest materialization").get_by_role("link").first).to_be_visible()
            page.screenshot(path=artifacts / "06-foundation-samples.png", full_page=True)
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=artifacts / "failure.png", full_page=True)
            raise
        finally:
            browser.close()

    shards = sorted((dagster_dev.store / "tables" / "foundation_samples").glob("*.parquet"))
    assert [p.stem for p in shards] == ["0", "1"]
    assert sum(pl.read_parquet(p).height for p in shards) == source.height
