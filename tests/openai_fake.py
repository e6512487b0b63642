"""A small OpenAI-compatible chat-completions server for tests.

Runs on a free loopback port in a background thread. It counts requests per body hash
(so a test can prove nothing was sent twice), tracks the most requests in flight at once,
and injects faults on chosen calls: 429 with ``Retry-After``, 500, a reply slower than the
client's timeout, malformed JSON content, a refusal, a content-filter stop, a generic 400.
Faults are picked by a script (per arrival index, or a function of index and body) or on
a seeded fraction of calls, decided per body hash and repeat so the choice does not depend
on thread timing. The reply text comes from a replaceable hook, so tests can script
multi-step dialogues. The ``Authorization`` / ``api-key`` headers are recorded only as
"present" or "absent": the key text is never stored. With a :class:`TokenBucket` as
``rate_limit`` it also behaves like a rate-limited provider: a request finding the bucket
empty gets 429 with ``Retry-After``, and every reply carries OpenAI's
``x-ratelimit-*-requests`` headers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self

#: Fault names understood by the server; ``None`` or ``"ok"`` means answer normally.
FAULTS = ("rate_limit", "server_error", "slow", "malformed", "refusal", "content_filter",
          "bad_request")
Reply = Callable[[dict[str, Any]], str]
Script = Sequence[str | None] | Callable[[int, dict[str, Any]], str | None]


def step_reply(body: dict[str, Any]) -> str:
    """A valid rationale step (SPEC §2.2) that ends the dialogue."""
    return json.dumps({"thought": "The table shows the values needed; the answer follows.",
                       "operators": [], "rag": {"needed": False, "query": None},
                       "next_action": "final_answer"})


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _text_len(body: dict[str, Any]) -> int:
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"text": content or ""}]
        total += sum(len(str(p.get("text") or "")) for p in parts if isinstance(p, dict))
    return total


@dataclass
class TokenBucket:
    """A provider's request limit: ``rate`` requests per second, bursts up to ``burst``.

    Counts what it admitted and refused, and when it admitted the first and last request,
    so a test can measure throughput against the limit at the server.
    """

    rate: float
    burst: int

    admitted: int = field(default=0, init=False)
    refused: int = field(default=0, init=False)
    first_admit: float = field(default=0.0, init=False)
    last_admit: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()

    def take(self) -> tuple[bool, dict[str, str]]:
        """Admit one request or not, with the rate-limit headers of the reply."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            ok = self._tokens >= 1
            if ok:
                self._tokens -= 1
                self.first_admit = self.first_admit or now
                self.last_admit = now
                self.admitted += 1
            else:
                self.refused += 1
            headers = self._headers()
            if not ok:
                wait = (1 - self._tokens) / self.rate
                headers.update({"Retry-After": str(max(1, math.ceil(wait))),
                                "retry-after-ms": str(max(1, round(wait * 1000)))})
            return ok, headers

    def _headers(self) -> dict[str, str]:
        # as OpenAI sends them: the reset is the time until the bucket is full again
        full_in = (self.burst - self._tokens) / self.rate
        return {"x-ratelimit-limit-requests": str(self.burst),
                "x-ratelimit-remaining-requests": str(int(self._tokens)),
                "x-ratelimit-reset-requests": f"{full_in * 1000:.0f}ms"}

    @property
    def share_refused(self) -> float:
        return self.refused / max(self.admitted + self.refused, 1)

    def throughput(self) -> float:
        """Admitted requests per second between the first and the last admission."""
        span = self.last_admit - self.first_admit
        return (self.admitted - 1) / span if span > 0 else 0.0


@dataclass
class FakeOpenAI:
    """The server and everything it saw. Use as a context manager or call start/stop."""

    reply: Reply = step_reply
    latency_s: float = 0.0
    fault_rate: float = 0.0
    faults: Sequence[str] = ("rate_limit", "server_error")
    seed: int = 0
    script: Script | None = None
    retry_after: str = "1"
    slow_s: float = 2.0
    #: ``response_format`` types answered with HTTP 400, as a server without them would.
    reject_formats: set[str] = field(default_factory=set)
    usage: tuple[int, int] | None = None
    #: a provider's rate limit; None: no limit and no rate-limit headers
    rate_limit: TokenBucket | None = None

    counts: Counter[str] = field(default_factory=Counter, init=False)
    bodies: list[dict[str, Any]] = field(default_factory=list, init=False)
    auth: list[str] = field(default_factory=list, init=False)
    #: which header carried credentials per request: "authorization", "api-key" or "" (none)
    auth_headers: list[str] = field(default_factory=list, init=False)
    paths: list[str] = field(default_factory=list, init=False)
    statuses: list[int] = field(default_factory=list, init=False)
    in_flight: int = field(default=0, init=False)
    max_in_flight: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    #: name of the thread that serves; a subclass names its own
    thread_name: ClassVar[str] = "fake-openai"

    def start(self) -> Self:
        self._server = self._make_server()
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name=self.thread_name)
        self._thread.start()
        return self

    def _make_server(self) -> ThreadingHTTPServer:
        """The listening server: a subclass with a handler or backlog of its own overrides this."""
        return _Server(("127.0.0.1", 0), _handler(self))

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a slow fault
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ bookkeeping

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _arrive(self, raw: bytes, body: dict[str, Any], auth: str, path: str) -> tuple[int, int, str]:
        """Record a request; return its arrival index, its repeat number and its hash."""
        digest = body_hash(raw)
        with self._lock:
            index = len(self.bodies)
            self.bodies.append(body)
            self.auth.append(auth)
            self.paths.append(path)
            repeat = self.counts[digest]
            self.counts[digest] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return index, repeat, digest

    def _leave(self, status: int) -> None:
        with self._lock:
            self.in_flight -= 1

    def _record(self, status: int) -> None:
        # before the reply is written: a client that has its answer must see it counted
        with self._lock:
            self.statuses.append(status)

    def fault_for(self, index: int, repeat: int, digest: str, body: dict[str, Any]) -> str | None:
        """The fault to inject on this call, if any."""
        if self.script is not None:
            if callable(self.script):
                return self.script(index, body)
            return self.script[index] if index < len(self.script) else None
        if self.fault_rate <= 0 or not self.faults:
            return None
        rng = random.Random(f"{self.seed}:{digest}:{repeat}")
        return rng.choice(list(self.faults)) if rng.random() < self.fault_rate else None

    def sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # ------------------------------------------------------------------ answers

    def completion(self, body: dict[str, Any], content: str | None,
                   **message: Any) -> dict[str, Any]:
        text = content or ""
        prompt, completion = self.usage or (max(1, _text_len(body) // 4), max(1, len(text) // 4))
        finish = message.pop("finish_reason", "stop")
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
            "model": body.get("model") or "fake",
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content, **message}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }


class _Server(ThreadingHTTPServer):
    # the default listen backlog of 5 drops connections when a client opens many at once
    request_queue_size = 256
    daemon_threads = True


def _error(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out as separate writes: without this each reply waits ~40 ms
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            else:
                self._send(404, _error("not found", "invalid_request_error"))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
                self._send(404, _error("not found", "invalid_request_error"))
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._send(400, _error("body is not JSON", "invalid_request_error"))
                return
            present = self.headers.get("Authorization") or self.headers.get("api-key")
            index, repeat, digest = fake._arrive(raw, body, "present" if present else "absent",
                                                self.path)
            with fake._lock:
                fake.auth_headers.append(",".join(h for h in ("authorization", "api-key") if self.headers.get(h)))
            self._counted = True
            status = 500
            try:
                status = self._answer(body, fake.fault_for(index, repeat, digest, body))
            finally:
                fake._leave(status)

        def _answer(self, body: dict[str, Any], fault: str | None) -> int:
            limits: dict[str, str] = {}
            if fake.rate_limit is not None:
                admitted, limits = fake.rate_limit.take()
                if not admitted:  # refused at once, as a provider's edge does
                    return self._send(429, _error("Rate limit reached for requests", "requests"), limits)
            fake.sleep(fake.latency_s)
            fmt = (body.get("response_format") or {}).get("type")
            if fmt in fake.reject_formats:
                return self._send(400, _error(f"Invalid parameter: 'response_format' of type "
                                              f"'{fmt}' is not supported with this model.",
                                              "invalid_request_error", "response_format"))
            if fault == "rate_limit":
                return self._send(429, _error("Rate limit reached", "requests"),
                                  {"Retry-After": fake.retry_after})
            if fault == "server_error":
                return self._send(500, _error("The server had an error", "server_error"))
            if fault == "bad_request":
                return self._send(400, _error("Bad request", "invalid_request_error"))
            if fault == "slow":
                fake.sleep(fake.slow_s)
            return self._send(200, self._completion(body, fault), limits)

        def _completion(self, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
            if fault == "malformed":
                return fake.completion(body, 'Sure! {"thought": "unterminated, "operators": [')
            if fault == "refusal":
                return fake.completion(body, None, refusal="I'm sorry, I can't help with that.")
            if fault == "content_filter":
                return fake.completion(body, "", finish_reason="content_filter")
            return fake.completion(body, fake.reply(body))

        def _send(self, status: int, payload: dict[str, Any],
                  headers: dict[str, str] | None = None) -> int:
            data = json.dumps(payload).encode()
            if getattr(self, "_counted", False):
                fake._record(status)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left; that is the point of a slow fault
            return status

    return Handler


__all__ = ["FAULTS", "FakeOpenAI", "TokenBucket", "body_hash", "step_reply"]
