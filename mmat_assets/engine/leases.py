"""Leases and atomic writes in a shared store (a local directory or an ``s3://`` prefix).

Paid work (a teacher request, an expensive tool call) is *claimed* before it is done, so
that two builds, a retried run or a run on another machine never pay for it twice. A
claim is a small lease object, one per key, in the store the answers go to:

- **Create** is atomic: locally a file opened with ``O_CREAT | O_EXCL``, on S3 a
  conditional put (``IfNoneMatch="*"``). Exactly one contender gets it.
- **Body**: the holder's id (``host:pid:token``) and its expiry (wall-clock seconds). A live
  holder renews every lease it holds, every third of ``lease_s``, from the one lease
  thread of its process (see :class:`LeaseWorker`); the machines sharing a store need
  clocks that agree to well within that.
- **Takeover**: a lease whose expiry has passed (its holder died), or whose holder is a
  process on this machine, in this PID namespace, that no longer runs (killed, so a rerun
  need not wait out the lease), is replaced by a compare-and-swap on what was read: on S3 a put with ``IfMatch=<etag>``; locally a rename
  over it done under an ``flock`` of the lease folder's guard file, after checking that
  the file still holds what was read. Two processes taking over at once: one wins.
- **Release** is the same compare-and-swap as a delete, so a holder that was too slow and
  lost its lease never removes its successor's. A local lease well within its expiry
  cannot have been taken over (its holder is alive and its clock is ours): it is simply
  unlinked, without the guard and the read.

A renewal that finds the lease gone or changed marks it lost (the holder was paused past
its expiry and someone took over); the work still finishes, it may then have been done
twice, which only a pause longer than ``lease_s`` can cause.

The same module holds the atomic writes the stores use (:func:`atomic_write`,
:func:`atomic_writer`, :func:`create_exclusive`): a unique temporary name in the target's
folder and ``os.replace`` locally; one whole PUT (conditional for create-if-absent) on S3.
Readers never see half a file and two writers never share a temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from upath import UPath

#: Default lease time: a dead holder's claims are taken over this long after its last renewal.
LEASE_S = 30.0
#: Default longest wait for a live holder's answer before the waiter gives up.
WAIT_S = 900.0
#: Waiting polls start this fast and back off to at most ``POLL_MAX_S`` between looks.
POLL_FIRST_S, POLL_MAX_S = 0.02, 1.0
LOCAL_PROTOCOLS = ("", "file", "local")
log = logging.getLogger(__name__)


class LeaseTimeout(TimeoutError):
    """Another holder kept a claim alive past the wait limit without storing an answer."""


def holder_id() -> str:
    """``host:pid:token``: who holds a lease, unique per claimant even within one process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


def _pid_namespace() -> str:
    """This process's PID namespace ("" where there is no /proc): pids mean the same only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    """Whether no process ``pid`` runs here (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def is_local(path: Path | UPath) -> bool:
    return not isinstance(path, UPath) or path.protocol in LOCAL_PROTOCOLS


def read_whole(path: Path | UPath) -> bytes:
    """The whole file in one read: on S3 one GET. A file handle there reads in ranges pinned to
    the version it opened and fails ("no longer exists") when another process replaces the
    object meanwhile, and a path's info may come from a listing cached before it existed."""
    if isinstance(path, UPath) and not is_local(path):
        return bytes(path.fs.cat_file(path.path))
    return path.read_bytes()


# ------------------------------------------------------------------- atomic writes


def _temp_name(path: Path | UPath) -> str:
    return f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # unique: writers never share one


def atomic_write(path: Path | UPath, data: bytes) -> None:
    """Write ``path`` whole: a unique temporary file and ``os.replace`` locally, one PUT on S3."""
    with atomic_writer(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_writer(path: Path | UPath, encoding: str | None = None) -> Iterator[IO[Any]]:
    """A file that becomes ``path`` only when the block ends without an error (binary, or
    text in ``encoding``).

    Locally it is a temporary file in the same folder, renamed over ``path``; remotely a
    buffer sent as one PUT, so an error half-way never leaves a partial object behind.
    """
    with _atomic_binary(path) as raw:
        if encoding is None:
            yield raw
            return
        text = io.TextIOWrapper(raw, encoding=encoding)
        try:
            yield text
            text.flush()
        finally:
            text.detach()  # the binary file is closed (and renamed) by its own block


@contextlib.contextmanager
def _atomic_binary(path: Path | UPath) -> Iterator[IO[bytes]]:
    if not is_local(path):
        buf = io.BytesIO()
        yield buf
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        return
    target = Path(path.path if isinstance(path, UPath) else path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(_temp_name(target))
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_exclusive(path: Path | UPath, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True if this call created it.

    Locally the bytes go to a unique temporary file first and are linked into place
    (``link`` fails if the name exists), so the object appears whole; on S3 a conditional
    put (``IfNoneMatch="*"``).
    """
    if not is_local(path):
        assert isinstance(path, UPath)  # a plain Path is always local
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.fs.pipe_file(path.path, data, mode="create")
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True
    target = Path(path.path if isinstance(path, UPath) else path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(_temp_name(target))
    tmp.write_bytes(data)
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing) for the block: one process at a time
    on this machine; the lock goes with the process if it dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 call failed only because its condition (If-Match / If-None-Match) did not hold."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        code = str(getattr(seen, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# -------------------------------------------------------------------- lease stores


@dataclass(frozen=True)
class Stored:
    """A lease object as read: its bytes, its version tag and when it was last written."""

    data: bytes
    etag: str
    modified: float


class LeaseStore(ABC):
    """One object per key with atomic create, compare-and-swap replace and delete."""

    #: calls go over the network (async callers run them in a thread)
    remote: bool = False

    @abstractmethod
    def create(self, key: str, data: bytes) -> str | None:
        """Create the key's object; its etag, or None if it exists."""

    @abstractmethod
    def read(self, key: str) -> Stored | None:
        """The key's object, or None if there is none."""

    @abstractmethod
    def replace(self, key: str, etag: str, data: bytes) -> str | None:
        """Overwrite the object if it still has ``etag``; the new etag, or None."""

    @abstractmethod
    def delete(self, key: str, etag: str) -> bool:
        """Delete the object if it still has ``etag``."""

    def delete_own(self, key: str, etag: str) -> bool:
        """Delete a live lease of ours that nobody can have taken over (its expiry is well
        ahead); by default the same compare-and-swap as :meth:`delete`."""
        return self.delete(key, etag)

    def move_own(self, key: str, etag: str, data: bytes, target: str) -> bool:
        """Turn a live lease of ours (as for :meth:`delete_own`) into the object ``target``
        (a path in the same store) holding ``data``, atomically; False if this store cannot
        (the default), and then nothing changed."""
        return False

    def close(self) -> None:
        """Free what the store holds open (nothing by default)."""


class LocalLeaseStore(LeaseStore):
    """Lease files in a local folder; the etag of a file is its content.

    Plain ``os`` calls on string paths: a claim is on the path of every paid request, and
    pathlib objects would cost more than the system calls themselves.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)
        self._guard_path = os.path.join(self.folder, ".guard")
        self._guard_fd: int | None = None
        self._threads = threading.Lock()  # flock excludes processes; threads share our descriptor

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key + ".lease")

    def create(self, key: str, data: bytes) -> str | None:
        try:
            fd = os.open(self._path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        except FileNotFoundError:  # the folder is made on first use, not for every open cache
            os.makedirs(self.folder, exist_ok=True)
            return self.create(key, data)
        try:
            os.write(fd, data)  # one small write; a reader that sees it empty judges by mtime
        finally:
            os.close(fd)
        return data.decode()

    def read(self, key: str) -> Stored | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data, modified = os.read(fd, 1 << 16), os.fstat(fd).st_mtime
        finally:
            os.close(fd)
        return Stored(data, data.decode(errors="replace"), modified)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        # Compare-and-swap must not interleave with another's: one flock per folder, on a
        # descriptor kept open (opening it per call would cost more than the swap itself).
        with self._threads:
            if self._guard_fd is None:
                self._guard_fd = os.open(self._guard_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._guard_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._guard_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._threads:
            if self._guard_fd is not None:
                os.close(self._guard_fd)
                self._guard_fd = None

    def replace(self, key: str, etag: str, data: bytes) -> str | None:
        with self._guard():
            current = self.read(key)
            if current is None or current.etag != etag:
                return None
            path = self._path(key)
            tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # the name never vanishes: creators keep failing meanwhile
        return data.decode()

    def delete(self, key: str, etag: str) -> bool:
        with self._guard():
            current = self.read(key)
            if current is None or current.etag != etag:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
        return True

    def delete_own(self, key: str, etag: str) -> bool:
        # No guard and no read: a takeover needs the lease expired, and this one is not.
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def move_own(self, key: str, etag: str, data: bytes, target: str) -> bool:
        # The lease file is ours until it expires: fill it with the answer, then rename it into
        # place. Meanwhile a reader sees a body it cannot parse and judges it live by its
        # mtime; a creator still finds the name taken; the answer appears whole. Overwritten,
        # not truncated first: ext4 flushes a file truncated to zero when it is closed.
        path = self._path(key)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
            if len(data) < len(etag.encode()):  # the etag of a local lease is its body
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        try:
            os.replace(path, target)
        except FileNotFoundError:  # the target's folder is made on first use
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
        return True


class S3LeaseStore(LeaseStore):
    """Lease objects under an ``s3://`` prefix, through the prefix's own s3fs filesystem."""

    remote = True

    def __init__(self, prefix: UPath) -> None:
        self.prefix = prefix
        self.fs: Any = prefix.fs
        bucket, _, key = prefix.path.partition("/")
        self.bucket, self.base = bucket, key.rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.base}/{key}.lease" if self.base else f"{key}.lease"

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    def create(self, key: str, data: bytes) -> str | None:
        try:
            return str(self._call("put_object", Key=self._key(key), Body=data, IfNoneMatch="*")["ETag"])
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise

    def read(self, key: str) -> Stored | None:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, self._get, self._key(key))
        except FileNotFoundError:
            return None

    async def _get(self, key: str) -> Stored:
        resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return Stored(data, str(resp["ETag"]), resp["LastModified"].timestamp())

    def replace(self, key: str, etag: str, data: bytes) -> str | None:
        try:
            return str(self._call("put_object", Key=self._key(key), Body=data, IfMatch=etag)["ETag"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _precondition_failed(exc):
                return None
            raise

    def delete(self, key: str, etag: str) -> bool:
        try:
            self._call("delete_object", Key=self._key(key), IfMatch=etag)
        except FileNotFoundError:
            return False
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise
        return True


def lease_store(folder: Path | UPath) -> LeaseStore:
    """The lease store for a local folder or an ``s3://`` prefix."""
    if is_local(folder):
        return LocalLeaseStore(Path(folder.path if isinstance(folder, UPath) else folder))
    assert isinstance(folder, UPath)  # a plain Path is always local
    if folder.protocol not in ("s3", "s3a"):
        raise ValueError(f"leases need a local folder or s3:// (conditional writes), not {folder.protocol}://")
    return S3LeaseStore(folder)


# -------------------------------------------------------------------------- leases


@dataclass
class Lease:
    """A claim this process holds: the key, the object's current etag, and its expiry."""

    key: str
    etag: str
    expires: float
    lost: bool = False
    #: given up already (by :meth:`Leases.release_as`): a later release does nothing
    released: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class LeaseStats:
    """Counters of one :class:`Leases`."""

    acquired: int = 0
    taken_over: int = 0
    busy: int = 0
    renewed: int = 0
    lost: int = 0


class Leases:
    """Claims on keys in one :class:`LeaseStore`, renewed by a heartbeat while held."""

    def __init__(self, store: LeaseStore, lease_s: float = LEASE_S, holder: str | None = None) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store, self.lease_s = store, lease_s
        self.holder = holder or holder_id()
        #: lets a process on this machine see that we died; none for a holder named from outside
        self.pidns = _pid_namespace() if holder is None else ""
        self.stats = LeaseStats()
        self._held: dict[str, Lease] = {}
        #: keys some thread of ours is creating a lease for right now (not yet in _held)
        self._creating: Counter[str] = Counter()
        self._lock = threading.Lock()
        #: set: no more renewals (closed, or a test stalling the holder)
        self._stop = threading.Event()
        #: when the lease thread renews our leases next (time.monotonic())
        self.next_beat = 0.0
        # The body is the same but for the expiry: format it once (a claim writes one per request).
        self._head = '{"holder": %s, "pidns": %s, "expires": ' % (json.dumps(self.holder), json.dumps(self.pidns))

    def _body(self) -> tuple[bytes, float]:
        expires = time.time() + self.lease_s
        return f"{self._head}{expires!r}}}".encode(), expires

    def _judge(self, stored: Stored) -> tuple[str, float]:
        """(holder, expiry) of a lease as read; one still being written counts from its mtime,
        and one whose holder is a dead process on this machine has expired already."""
        try:
            body = json.loads(stored.data)
            holder, expires = str(body["holder"]), float(body["expires"])
        except (ValueError, KeyError, TypeError):
            return "", stored.modified + self.lease_s
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        here = self.pidns and body.get("pidns") == self.pidns and host == socket.gethostname()
        if here and pid.isdigit() and int(pid) != os.getpid() and _gone(int(pid)):
            return holder, 0.0
        return holder, expires

    def acquire(self, key: str) -> Lease | None:
        """The lease on ``key`` if free or expired (created or taken over), else None."""
        data, expires = self._body()
        with self._lock:
            self._creating[key] += 1
        try:
            etag = self.store.create(key, data)
            if etag is None:
                etag = self._take_over(key, data)
        except BaseException:
            with self._lock:
                self._creating[key] -= 1
            raise
        with self._lock:
            self._creating[key] -= 1
            if etag is None:
                self.stats.busy += 1
                return None
            lease = Lease(key, etag, expires)
            self._held[key] = lease
            self.stats.acquired += 1
        lease_worker().watch(self)
        return lease

    def _take_over(self, key: str, data: bytes) -> str | None:
        current = self.store.read(key)
        if current is None:  # released between our create and our read: one more try
            return self.store.create(key, data)
        holder, expires = self._judge(current)
        if holder == self.holder:  # held by another thread of ours (registered, or still between
            # its create and registering it), or our own create went through though its reply was lost
            with self._lock:
                sibling = key in self._held or self._creating[key] > 1
            return None if sibling else current.etag
        if time.time() <= expires:
            return None
        etag = self.store.replace(key, current.etag, data)
        if etag is not None:
            self.stats.taken_over += 1
        return etag

    def release(self, lease: Lease) -> None:
        """Give the claim up (its answer is stored, or the work failed and others may try)."""
        with lease.lock:
            with self._lock:
                self._held.pop(lease.key, None)
            if lease.lost or lease.released:
                return
            lease.released = True
            if self._fresh(lease):
                self.store.delete_own(lease.key, lease.etag)
            else:  # near or past its expiry: someone may have taken it over
                self.store.delete(lease.key, lease.etag)

    def release_as(self, lease: Lease, data: bytes, target: str) -> bool:
        """Release ``lease`` by turning its object into ``target`` holding ``data`` (an
        answer): one rename, where writing ``target`` and deleting the lease would take a
        create, a rename and an unlink. False, with nothing released, where the store cannot
        (see :meth:`LeaseStore.move_own`) or the lease is near its expiry: the caller then
        writes ``target`` itself and calls :meth:`release`."""
        with lease.lock:
            if lease.lost or lease.released or not self._fresh(lease):
                return False
            if not self.store.move_own(lease.key, lease.etag, data, target):
                return False
            lease.released = True
            with self._lock:
                self._held.pop(lease.key, None)
        return True

    def _fresh(self, lease: Lease) -> bool:
        """Well within its expiry: nobody can have taken it over (the caller holds its lock,
        so no renewal is under way)."""
        return time.time() < lease.expires - self.lease_s / 3

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def renew(self) -> None:
        """Push every held lease's expiry forward (the heartbeat calls this)."""
        with self._lock:
            leases = list(self._held.values())
        for lease in leases:
            with lease.lock:
                if lease.lost or self._held.get(lease.key) is not lease:
                    continue  # released meanwhile
                data, expires = self._body()
                etag = self.store.replace(lease.key, lease.etag, data)
                if etag is None:
                    lease.lost = True
                    self.stats.lost += 1
                else:
                    lease.etag, lease.expires = etag, expires
                    self.stats.renewed += 1

    def beat(self) -> None:
        """One heartbeat (the lease thread calls it when ``next_beat`` is due)."""
        if self._stop.is_set():
            return
        try:
            self.renew()
        except Exception:  # a storage hiccup: the next beat tries again, well before expiry
            log.debug("lease renewal failed", exc_info=True)

    def close(self) -> None:
        """Stop renewing and release whatever is still held."""
        self._stop.set()
        lease_worker().forget(self)
        with self._lock:
            leases = list(self._held.values())
        for lease in leases:
            with contextlib.suppress(OSError):
                self.release(lease)
        self.store.close()


class LeaseWorker:
    """The one lease thread of a process: it renews the held leases of every open
    :class:`Leases` when their beat is due (one thread, however many caches and leases).
    Renewals over the network (S3) go to a few helper threads, one store at a time each, so
    a slow store never delays another's beat past its expiry. Started on first use; a
    forked child gets a fresh one."""

    #: helper threads for remote renewals
    REMOTE_THREADS = 8

    def __init__(self) -> None:
        self._owners: weakref.WeakSet[Leases] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote: Any = None  # a ThreadPoolExecutor once a remote store is held
        self._beating: set[int] = set()  # ids of the Leases a helper renews right now

    def watch(self, leases: Leases) -> None:
        """Renew ``leases``' held leases from now on."""
        with self._lock:
            if leases in self._owners:
                return
            leases.next_beat = time.monotonic() + leases.lease_s / 3
            self._owners.add(leases)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mmat-leases", daemon=True)
                self._thread.start()
        self._wake.set()  # its wait may end after this one's first beat is due

    def forget(self, leases: Leases) -> None:
        with self._lock:
            self._owners.discard(leases)

    def _run(self) -> None:
        while True:
            with self._lock:
                due = min((o.next_beat for o in self._owners), default=time.monotonic() + 60.0)
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            with self._lock:
                now = time.monotonic()
                owners = [o for o in self._owners if o.next_beat <= now and id(o) not in self._beating]
                for owner in owners:
                    owner.next_beat = now + owner.lease_s / 3
            for owner in owners:
                try:
                    self._beat_remote(owner) if owner.store.remote else owner.beat()
                except Exception:  # at interpreter exit the helpers take no more work
                    log.debug("lease heartbeat failed", exc_info=True)
            del owners  # while waiting, hold no Leases alive that nobody else does

    def _beat_remote(self, owner: Leases) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._remote is None:
            self._remote = ThreadPoolExecutor(self.REMOTE_THREADS, thread_name_prefix="mmat-lease-renew")
        with self._lock:
            self._beating.add(id(owner))

        def beat() -> None:
            try:
                owner.beat()
            finally:
                with self._lock:
                    self._beating.discard(id(owner))

        self._remote.submit(beat)


_worker: LeaseWorker | None = None
_worker_lock = threading.Lock()


def lease_worker() -> LeaseWorker:
    """This process's lease thread (created on first use)."""
    global _worker
    if _worker is None:
        with _worker_lock:
            if _worker is None:
                _worker = LeaseWorker()
    return _worker


def _forget_worker() -> None:
    global _worker
    _worker = None  # the parent's thread does not exist in a forked child


os.register_at_fork(after_in_child=_forget_worker)


def poll_delays(wait_s: float) -> Iterator[float]:
    """Sleeps between looks at a busy claim, backing off; LeaseTimeout once ``wait_s`` is spent."""
    deadline = time.monotonic() + wait_s
    delay = POLL_FIRST_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LeaseTimeout(f"no answer within {wait_s:.0f} s while another process held the claim")
        yield min(delay, left)
        delay = min(delay * 1.5, POLL_MAX_S)


__all__ = [
    "LEASE_S",
    "WAIT_S",
    "Lease",
    "LeaseStats",
    "LeaseStore",
    "LeaseTimeout",
    "LeaseWorker",
    "Leases",
    "LocalLeaseStore",
    "S3LeaseStore",
    "atomic_write",
    "atomic_writer",
    "create_exclusive",
    "exclusive_lock",
    "holder_id",
    "lease_store",
    "lease_worker",
    "poll_delays",
    "read_whole",
]
