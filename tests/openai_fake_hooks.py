"""Extra hooks on :class:`tests.openai_fake.FakeOpenAI` for stage-level fault tests.

- ``on_receive(index, body) -> bool``: called as a request arrives, before any answer;
  returning True drops the connection unanswered (a test can kill its client here).
- ``answered``: 200 replies actually sent, per body hash. The base server counts
  arrivals; a request whose client died before the reply is received but not answered.
- ``echo_auth``: error bodies quote the ``Authorization`` header back, as a misconfigured
  proxy might, so a test can prove the client scrubs its key from what it records.

It also listens with a real backlog and without Nagle's algorithm. ``socketserver``
listens with a backlog of 5, so a client opening more connections at once has SYNs
dropped and waits out a 1 s retransmit (a spurious connect timeout under a short client
timeout); and ``http.server`` writes headers and body separately, so with Nagle on each
reply can wait ~40 ms for the client's delayed ACK.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar

from tests.openai_fake import FakeOpenAI, _handler

#: The fault name that means "drop the connection without a reply".
DROP = "__drop__"


@dataclass
class HookedFakeOpenAI(FakeOpenAI):
    on_receive: Callable[[int, dict[str, Any]], bool] | None = None
    echo_auth: bool = False
    backlog: int = 256
    nodelay: bool = True
    answered: Counter[str] = field(default_factory=Counter, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        # fault_for and _leave run on the handler thread of one request, in that order.
        self._current = threading.local()

    thread_name: ClassVar[str] = "fake-openai-hooked"

    def _make_server(self) -> ThreadingHTTPServer:
        server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": self.backlog,
                                                          "daemon_threads": True})
        return server(("127.0.0.1", 0), _hooked_handler(self))

    def fault_for(self, index: int, repeat: int, digest: str, body: dict[str, Any]) -> str | None:
        self._current.digest = digest
        if self.on_receive is not None and self.on_receive(index, body):
            return DROP
        return super().fault_for(index, repeat, digest, body)

    def _leave(self, status: int) -> None:
        super()._leave(status)
        digest = getattr(self._current, "digest", None)
        if status == 200 and digest is not None:
            with self._lock:
                self.answered[digest] += 1
        self._current.digest = None


def _hooked_handler(fake: HookedFakeOpenAI) -> type:
    base: Any = _handler(fake)

    class Handler(base):  # type: ignore[misc, valid-type]
        disable_nagle_algorithm = fake.nodelay

        def _answer(self, body: dict[str, Any], fault: str | None) -> int:
            if fault == DROP:
                self.close_connection = True
                return 0  # nothing sent: neither a status nor an answer
            return int(super()._answer(body, fault))

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> int:
            if fake.echo_auth and status >= 400 and isinstance(payload.get("error"), dict):
                sent = self.headers.get("Authorization") or self.headers.get("api-key") or ""
                payload = {"error": {**payload["error"],
                                     "message": f"{payload['error']['message']} (request auth: {sent})"}}
            return int(super()._send(status, payload, headers))

    return Handler


__all__ = ["DROP", "HookedFakeOpenAI"]
