"""Leases on a local folder and on S3 (moto): one winner, expiry takeover, renewal, races.

Contenders run as separate processes where the property is about processes (atomic
create, takeover by compare-and-swap), and as threads where a second process adds nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from upath import UPath

from mmat_assets.engine.cache import ResultCache
from mmat_assets.engine.leases import Leases, LeaseStore, LeaseTimeout, lease_store, poll_delays
from tests.moto_s3 import moto_s3

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 4
KEYS = 12
PROC_TIMEOUT_S = 60


# ------------------------------------------------------------------ the two stores


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_s3("leases") as url:
        yield url


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Where the leases live, as plain strings a child process can rebuild the store from."""
    if request.param == "local":
        return {"root": str(tmp_path / "leases"), "endpoint": ""}
    url = request.getfixturevalue("moto_url")
    return {"root": f"s3://leases/{tmp_path.name}", "endpoint": url}


def store_at(root: str, endpoint: str = "") -> LeaseStore:
    return lease_store(UPath(root, endpoint_url=endpoint) if endpoint else Path(root))


def cache_at(root: str, endpoint: str, work: str, **kw: Any) -> ResultCache:
    return ResultCache(UPath(root, endpoint_url=endpoint) if endpoint else root, "teacher", 0, work_dir=work, **kw)


# -------------------------------------------------------- child processes (``python -c``)


def ready_then_go(gate: str) -> None:
    """Say this child is ready, then wait for the parent's go: contenders start together."""
    Path(gate, f"ready.{os.getpid()}").touch()
    deadline = time.monotonic() + PROC_TIMEOUT_S
    while not Path(gate, "go").exists():
        assert time.monotonic() < deadline, "no go from the test"
        time.sleep(0.001)


def contend(root: str, endpoint: str, keys: int, gate: str, out: str, hold_s: float) -> None:
    """Try to acquire every key once, all contenders at once; record what was won."""
    leases = Leases(store_at(root, endpoint), lease_s=30)
    ready_then_go(gate)
    won = [k for k in (f"k{i}" for i in range(keys)) if leases.acquire(k) is not None]
    Path(out).write_text(json.dumps({"holder": leases.holder, "won": won, "taken_over": leases.stats.taken_over}))
    time.sleep(hold_s)  # hold (renewed) so no loser can win after an early release


ELSEWHERE = "other-machine:4242:5ca1ab1e"


def die_holding(root: str, endpoint: str, keys: int, lease_s: float, holder: str | None = None) -> None:
    """Acquire keys, then die without releasing them (as a SIGKILL would). ``holder`` names
    a process on another machine: only the expiry can tell that it died."""
    leases = Leases(store_at(root, endpoint), lease_s=lease_s, holder=holder)
    assert all(leases.acquire(f"k{i}") is not None for i in range(keys))
    os._exit(0)  # no finally, no release, the heartbeat dies with the process


def claim_all(root: str, endpoint: str, work: str, keys: int, gate: str, log: str) -> None:
    """Claim every key through a cache; the computation appends to ``log`` so a test can count."""
    cache = cache_at(root, endpoint, work, lease_s=2)
    ready_then_go(gate)

    def compute(key: str) -> Callable[[], tuple[str, dict[str, str]]]:
        def run() -> tuple[str, dict[str, str]]:
            with open(log, "a") as f:  # one short append per line: atomic on a local file
                f.write(f"{key}\n")
            time.sleep(0.05)  # the paid call
            return key, {"answer": key.upper()}
        return run

    got = {}
    for i in range(keys):
        hit, _ = cache.claim(f"key{i}", compute(f"key{i}"))
        got[f"key{i}"] = (hit or {}).get("answer", f"key{i}".upper())
    cache.close()
    Path(log + f".{os.getpid()}.json").write_text(json.dumps(got))


def spawn(call: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    code = f"from tests.test_leases import *; {call}"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=PROC_TIMEOUT_S)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]


def together(gate: Path, calls: list[str]) -> None:
    """Run ``calls`` as child processes released at one moment; wait for all of them."""
    gate.mkdir()
    procs = [spawn(c) for c in calls]
    deadline = time.monotonic() + PROC_TIMEOUT_S
    while len(list(gate.glob("ready.*"))) < len(procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child did not start"
        time.sleep(0.01)
    (gate / "go").touch()
    wait_all(procs)


def contend_together(where: dict[str, str], tmp_path: Path) -> list[dict[str, Any]]:
    """What each of ``PROCESSES`` contenders released at once won; every key is won exactly once."""
    outs = [tmp_path / f"won{i}.json" for i in range(PROCESSES)]
    gate = tmp_path / "gate"
    together(gate, [f"contend({where['root']!r}, {where['endpoint']!r}, {KEYS}, {str(gate)!r}, {str(o)!r}, 0.5)"
                    for o in outs])
    results = [json.loads(o.read_text()) for o in outs]
    assert Counter(k for r in results for k in r["won"]) == Counter({f"k{i}": 1 for i in range(KEYS)})
    return results


# ---------------------------------------------------------------------------- tests


def test_two_contenders_one_winner(where: dict[str, str], tmp_path: Path) -> None:
    results = contend_together(where, tmp_path)
    assert all(r["taken_over"] == 0 for r in results)  # nobody expired: no takeover


@pytest.mark.slow
def test_expired_lease_is_taken_over(where: dict[str, str]) -> None:
    # 8 s: long enough that a slow exit of the child on a busy machine leaves k0 live here
    wait_all([spawn(f"die_holding({where['root']!r}, {where['endpoint']!r}, 3, 8.0, {ELSEWHERE!r})")])
    leases = Leases(store_at(**where), lease_s=5)
    assert leases.acquire("k0") is None  # another machine's holder: alive until its lease runs out
    store = store_at(**where)
    expiries = [json.loads(store.read(f"k{i}").data)["expires"] for i in range(3)]  # type: ignore[union-attr]
    time.sleep(max(expiries) - time.time() + 0.1)  # until the last of them has run out
    got = [leases.acquire(f"k{i}") for i in range(3)]
    assert all(g is not None for g in got) and leases.stats.taken_over == 3
    other = Leases(store_at(**where), lease_s=5)
    assert other.acquire("k1") is None  # ours now, and live
    for lease in got:
        leases.release(lease)  # type: ignore[arg-type]
    assert other.acquire("k1") is not None  # released: free again
    other.close()
    leases.close()


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(where: dict[str, str]) -> None:
    wait_all([spawn(f"die_holding({where['root']!r}, {where['endpoint']!r}, 2, 600.0)")])
    leases = Leases(store_at(**where), lease_s=5)
    got = [leases.acquire(f"k{i}") for i in range(2)]  # no wait for the 600 s lease
    assert all(g is not None for g in got) and leases.stats.taken_over == 2
    leases.close()


def test_renewal_keeps_a_lease_alive(where: dict[str, str]) -> None:
    # 1.5 s: a renewal on a busy machine's moto server can take a good part of a second
    holder = Leases(store_at(**where), lease_s=1.5)
    lease = holder.acquire("k")
    assert lease is not None
    rival = Leases(store_at(**where), lease_s=1.5)
    deadline = time.monotonic() + 4.0  # more than two lease times
    while time.monotonic() < deadline:
        assert rival.acquire("k") is None, "a renewed lease was taken over"
        time.sleep(0.1)
    assert holder.stats.renewed >= 3 and holder.stats.lost == 0
    holder.release(lease)
    assert rival.acquire("k") is not None
    rival.close()


def test_takeover_race_has_one_winner(where: dict[str, str], tmp_path: Path) -> None:
    # Leave an expired lease on every key, then let several processes take them over at once.
    wait_all([spawn(f"die_holding({where['root']!r}, {where['endpoint']!r}, {KEYS}, 0.2, {ELSEWHERE!r})")])
    time.sleep(0.3)
    results = contend_together(where, tmp_path)
    assert sum(r["taken_over"] for r in results) == KEYS  # each won by taking the dead one's over


def test_a_lost_lease_never_removes_its_successor(tmp_path: Path) -> None:
    slow = Leases(store_at(str(tmp_path)), lease_s=0.2)
    lease = slow.acquire("k")
    assert lease is not None
    slow._stop.set()  # the holder stalls: no more renewals
    time.sleep(0.3)
    fast = Leases(store_at(str(tmp_path)), lease_s=30)
    assert fast.acquire("k") is not None and fast.stats.taken_over == 1
    slow.release(lease)  # the stalled holder wakes up and releases what it thinks it holds
    assert Leases(store_at(str(tmp_path)), lease_s=30).acquire("k") is None  # the successor's stands
    fast.close()


def test_waiting_is_bounded() -> None:
    delays = poll_delays(0.3)
    slept = 0.0
    with pytest.raises(LeaseTimeout):
        for d in delays:
            time.sleep(d)
            slept += d
    assert 0.25 <= slept <= 0.6


def test_threads_of_one_process_compute_once(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "store", "tools", 0, work_dir=tmp_path / "w", lease_s=5)
    runs = Counter[str]()
    lock = threading.Lock()

    def work() -> tuple[str, dict[str, str]]:
        with lock:
            runs["k"] += 1
        time.sleep(0.2)
        return "computed", {"v": "1"}

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cache.claim("k", work))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert runs["k"] == 1
    assert sorted(r[1] or r[0]["v"] for r in results) == ["1", "1", "1", "computed"]
    assert cache.stats.misses == 1 and cache.stats.hits == 3
    cache.close()


def test_claims_across_processes_compute_each_key_once(where: dict[str, str], tmp_path: Path) -> None:
    """Separate work dirs, as on separate machines: answers travel through the store."""
    log = tmp_path / "computed.log"
    gate = tmp_path / "gate"
    together(gate, [f"claim_all({where['root']!r}, {where['endpoint']!r}, {str(tmp_path / f'w{i}')!r}, "
                    f"{KEYS}, {str(gate)!r}, {str(log)!r})" for i in range(PROCESSES)])
    computed = Counter(log.read_text().split())
    assert computed == Counter({f"key{i}": 1 for i in range(KEYS)})  # paid once, whoever paid
    answers = [json.loads(p.read_text()) for p in tmp_path.glob("computed.log.*.json")]
    assert len(answers) == PROCESSES
    assert all(a == {f"key{i}": f"KEY{i}" for i in range(KEYS)} for a in answers)  # all got every answer
    late = cache_at(where["root"], where["endpoint"], str(tmp_path / "late"))
    assert all(late.get(f"key{i}") == {"answer": f"KEY{i}"} for i in range(KEYS))  # in the segments
    late.close()
    if not where["endpoint"]:  # every answer object was folded into a segment and removed
        assert list((Path(where["root"]) / "teacher" / "0" / "answers").glob("*.json")) == []


def test_one_thread_renews_the_leases_of_every_holder(tmp_path: Path) -> None:
    holders = [Leases(store_at(str(tmp_path / f"store{i}")), lease_s=1.0) for i in range(3)]
    held = [h.acquire("k") for h in holders]
    assert all(lease is not None for lease in held)
    threads = [t for t in threading.enumerate() if t.name == "mmat-leases"]
    assert len(threads) == 1, [t.name for t in threads]  # not one per holder (nor per lease)
    rivals = [Leases(store_at(str(tmp_path / f"store{i}")), lease_s=1.0) for i in range(3)]
    deadline = time.monotonic() + 2.2  # more than two lease times
    while time.monotonic() < deadline:
        assert all(r.acquire("k") is None for r in rivals), "a renewed lease was taken over"
        time.sleep(0.1)
    assert all(h.stats.renewed >= 2 and h.stats.lost == 0 for h in holders)
    for h in holders + rivals:
        h.close()


def test_a_claim_on_a_local_root_creates_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease file itself becomes the answer object: one create per paid request, not a
    lease plus a temporary answer file (each create is a journal write on a busy disk)."""
    cache = cache_at(str(tmp_path / "store"), "", str(tmp_path / "w"))
    cache.claim("warm", lambda: ("r", {"v": "warm"}))  # folders made on first use are not per claim
    creates: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_CREAT:
            creates.append(str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", counting_open)
    assert cache.claim("k", lambda: ("computed", {"v": "1"})) == (None, "computed")
    monkeypatch.undo()
    assert len(creates) == 1 and creates[0].endswith("k.lease"), creates
    shard = tmp_path / "store" / "teacher" / "0"
    assert json.loads((shard / "answers" / "k.json").read_text()) == {"v": "1"}  # published whole
    assert not list(shard.rglob("*.lease")) and not list(shard.rglob("*.tmp"))  # released, nothing left
    other = cache_at(str(tmp_path / "store"), "", str(tmp_path / "elsewhere"))
    assert other.claim("k", lambda: pytest.fail("paid twice")) == ({"v": "1"}, None)  # type: ignore[arg-type, return-value]
    other.close()
    cache.close()
