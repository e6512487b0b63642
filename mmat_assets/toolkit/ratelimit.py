"""Adaptive concurrency for clients of a rate-limited provider (AIMD, plus the provider's headers).

A fixed concurrency is wrong as soon as several runs share one provider account: each run
alone stays under the limit, all of them together storm it, and most of their requests come
back 429. :class:`AdaptiveLimiter` is a concurrency limit that moves like TCP's congestion
window: every success adds ``increase / limit`` (about ``increase`` per window of requests),
every 429 multiplies the limit by ``decrease``, once per window (429s of requests sent before
the last cut are the same congestion event, not a new one). Runs that share nothing but the
provider settle near its limit, because each backs off when the shared budget runs out.

Where the provider says how much budget is left (OpenAI's ``x-ratelimit-remaining-requests``
/ ``-tokens`` with their ``-limit-`` and ``-reset-`` companions), the limiter also stops
growing while the remaining budget is smaller than one more window, and holds new requests
while it is spent, for the time one request's worth refills. A ``Retry-After`` holds new
requests too, not only the one that received it.

The limiter is shared by every event loop and thread of a process: waiters are woken on
their own loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

#: Header names as OpenAI (and Azure OpenAI, Groq, Together, vLLM's proxies...) send them.
REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
LIMIT_REQUESTS = "x-ratelimit-limit-requests"
RESET_REQUESTS = "x-ratelimit-reset-requests"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
LIMIT_TOKENS = "x-ratelimit-limit-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in a reset header: ``"1s"``, ``"6m0s"``, ``"1h2m3.5s"``, ``"20ms"`` or a bare
    number of seconds; None when absent or unreadable."""
    if not text:
        return None
    text = text.strip().lower()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Budget:
    """One of the provider's budgets (requests or tokens) as its headers describe it."""

    remaining: float
    limit: float | None = None
    reset_s: float | None = None

    def refill_s(self, need: float) -> float:
        """How long until ``need`` units are available again (0 when they are now)."""
        short = need - self.remaining
        if short <= 0:
            return 0.0
        if self.reset_s is None:
            return 0.0
        if self.limit is None or self.limit <= self.remaining:
            return self.reset_s  # no rate to scale by: wait for the whole reset
        # The reset is the time to refill everything spent; refilling is linear in time.
        return self.reset_s * min(short / (self.limit - self.remaining), 1.0)


@dataclass(frozen=True)
class RateHeaders:
    requests: Budget | None = None
    tokens: Budget | None = None


def parse_rate_headers(headers: Mapping[str, str] | None) -> RateHeaders:
    """The request and token budgets in a reply's headers (either may be None)."""
    if not headers:
        return RateHeaders()
    lookup = headers if _case_insensitive(headers) else {k.lower(): v for k, v in headers.items()}
    return RateHeaders(_budget(lookup.get, REMAINING_REQUESTS, LIMIT_REQUESTS, RESET_REQUESTS),
                       _budget(lookup.get, REMAINING_TOKENS, LIMIT_TOKENS, RESET_TOKENS))


def _case_insensitive(headers: Mapping[str, str]) -> bool:
    # httpx / aiohttp header maps answer any case; a plain dict does not
    return type(headers).__name__ in {"Headers", "CIMultiDict", "CIMultiDictProxy"}


def _budget(get: Callable[[str], str | None], remaining: str, limit: str, reset: str) -> Budget | None:
    left = _number(get(remaining))
    if left is None:
        return None
    return Budget(max(left, 0.0), _number(get(limit)), parse_duration(get(reset)))


@dataclass
class _Ticket:
    """When the request holding a slot was (last) sent, to tell congestion events apart, and
    whether it holds its slot now (it gives it back while it waits to retry)."""

    sent: float
    held: bool = True


_TICKET: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("ratelimit_ticket", default=None)


class AdaptiveLimiter:
    """A concurrency limit between ``minimum`` and ``maximum`` that adapts to a provider.

    Use ``async with limiter.slot():`` around each request and report how it went with
    :meth:`succeeded` or :meth:`throttled` (from inside the slot, so a 429 is matched with
    the time its request was sent). Thread-safe; usable from several event loops at once.
    """

    def __init__(self, maximum: int, *, minimum: int = 1, initial: float | None = None,
                 decrease: float = 0.5, increase: float = 1.0, max_pause_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= maximum ({maximum})")
        if not 0 < decrease < 1 or increase <= 0:
            raise ValueError("decrease must be in (0, 1) and increase positive")
        self.minimum, self.maximum = minimum, maximum
        self.decrease, self.increase, self.max_pause_s = decrease, increase, max_pause_s
        self._limit = float(min(max(initial if initial is not None else maximum, minimum), maximum))
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._paused_until = 0.0
        self._last_cut = -math.inf
        self._tokens_per_request = 0.0
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        #: how often the limit was cut, and requests held by a pause: for logs and tests
        self.cuts = 0
        self.pauses = 0

    # ------------------------------------------------------------------ state

    @property
    def limit(self) -> float:
        return self._limit

    @property
    def capacity(self) -> int:
        """Requests allowed in flight now."""
        return max(int(self._limit), self.minimum)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def paused_for(self) -> float:
        """Seconds until new requests may go out again (0 when they may now)."""
        return max(self._paused_until - self._clock(), 0.0)

    # ------------------------------------------------------------------ slots

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        ticket = _Ticket(self._clock())
        token = _TICKET.set(ticket)
        try:
            yield
        finally:
            _TICKET.reset(token)
            if ticket.held:
                self.release()

    async def requeue(self, delay_s: float) -> None:
        """Wait ``delay_s`` before a retry without holding a slot, then queue for one again.

        A retry that kept its slot would go out whatever the limit has become: after a burst
        of 429s every refused request would come back at once and storm the provider again.
        Call it inside :meth:`slot`; outside one it only sleeps.
        """
        ticket = _TICKET.get()
        if ticket is None or not ticket.held:
            await asyncio.sleep(delay_s)
            return
        ticket.held = False
        self.release()
        await asyncio.sleep(delay_s)
        await self.acquire()
        ticket.held, ticket.sent = True, self._clock()

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                wait = self._paused_until - self._clock()
                if wait <= 0 and self._in_flight < self.capacity:
                    self._in_flight += 1
                    return
                future: asyncio.Future[None] | None = None
                if wait <= 0:
                    future = loop.create_future()
                    self._waiters.append((loop, future))
            if future is None:
                await asyncio.sleep(wait)
                continue
            try:
                await future
            except asyncio.CancelledError:
                self._abandon(loop, future)
                raise

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self._wake()

    def _abandon(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
        with self._lock:
            try:
                self._waiters.remove((loop, future))
                return
            except ValueError:
                pass  # already woken: hand the wake-up on, or a free slot stays unused
        self._wake()

    def _wake(self) -> None:
        """Wake as many waiters as there are free slots; each re-checks on its own loop."""
        with self._lock:
            free = self.capacity - self._in_flight
            woken = []
            while free > 0 and self._waiters:
                woken.append(self._waiters.popleft())
                free -= 1
        for loop, future in woken:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop is closed; its waiter is gone with it
                self._wake()

    # ------------------------------------------------------------------ feedback

    def succeeded(self, headers: Mapping[str, str] | None = None, tokens: int = 0) -> None:
        """A request was answered: grow the limit unless the provider says it is nearly spent."""
        rates = parse_rate_headers(headers)
        with self._lock:
            if tokens > 0:
                # a running mean of tokens per request: what "one request's worth" of tokens is
                self._tokens_per_request += (tokens - self._tokens_per_request) * 0.1
            if not self._near_limit(rates):
                self._limit = min(self._limit + self.increase / max(self._limit, 1.0), float(self.maximum))
            self._pause_if_spent(rates)
        self._wake()

    def throttled(self, retry_after_s: float | None = None, headers: Mapping[str, str] | None = None) -> None:
        """A request was refused with 429: cut the limit (once per window) and pause."""
        now = self._clock()
        ticket = _TICKET.get()
        with self._lock:
            # Requests sent before the last cut saw the old limit: their 429 is that event.
            if ticket is None or ticket.sent >= self._last_cut:
                self._limit = max(self._limit * self.decrease, float(self.minimum))
                self._last_cut = now
                self.cuts += 1
            if retry_after_s is not None and retry_after_s > 0:
                self._hold(now + min(retry_after_s, self.max_pause_s))
            self._pause_if_spent(parse_rate_headers(headers))
        if ticket is not None:
            ticket.sent = now  # the retry that follows is a new send

    def _near_limit(self, rates: RateHeaders) -> bool:
        window = self._limit + 1
        if rates.requests is not None and rates.requests.remaining < window:
            return True
        need = self._tokens_per_request * window
        return rates.tokens is not None and need > 0 and rates.tokens.remaining < need

    def _pause_if_spent(self, rates: RateHeaders) -> None:
        waits = []
        if rates.requests is not None:
            waits.append(rates.requests.refill_s(1.0))
        if rates.tokens is not None and self._tokens_per_request > 0:
            waits.append(rates.tokens.refill_s(self._tokens_per_request))
        elif rates.tokens is not None:
            waits.append(rates.tokens.refill_s(1.0))
        wait = min(max(waits, default=0.0), self.max_pause_s)
        if wait > 0:
            self._hold(self._clock() + wait)

    def _hold(self, until: float) -> None:
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = ["AdaptiveLimiter", "Budget", "RateHeaders", "parse_duration", "parse_rate_headers"]
