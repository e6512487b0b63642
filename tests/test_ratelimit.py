"""The adaptive concurrency limiter: AIMD on 429s, the provider's rate-limit headers, and slots
shared by several event loops."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from mmat_assets.toolkit.ratelimit import AdaptiveLimiter, Budget, parse_duration, parse_rate_headers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------- headers


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02),
                                                ("1h2m3.5s", 3723.5), ("0.25", 0.25), ("59.001s", 59.001)])
def test_reset_durations_in_the_providers_format(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "soon", "5x", "1s junk"])
def test_unreadable_durations_are_none(text: str | None) -> None:
    assert parse_duration(text) is None


def test_rate_headers_any_case_and_missing_ones() -> None:
    rates = parse_rate_headers({"X-RateLimit-Remaining-Requests": "7", "x-ratelimit-limit-requests": "10",
                                "x-ratelimit-reset-requests": "3s", "x-ratelimit-remaining-tokens": "oops"})
    assert rates.requests == Budget(7, 10, 3.0)
    assert rates.tokens is None
    assert parse_rate_headers({}).requests is None and parse_rate_headers(None).tokens is None


def test_refill_time_is_linear_in_what_was_spent() -> None:
    # 10 per 60 s, all spent: one request's worth is back after 6 s
    assert Budget(0, 10, 60.0).refill_s(1) == pytest.approx(6.0)
    assert Budget(3, 10, 42.0).refill_s(1) == 0.0
    assert Budget(0, None, 5.0).refill_s(1) == 5.0  # no limit known: the whole reset


# ----------------------------------------------------------------------- AIMD


def test_a_429_halves_the_limit_once_per_window_and_successes_grow_it_back() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(16, minimum=2, clock=clock)

    async def burst_of_429s() -> None:
        async def one() -> None:
            async with limiter.slot():
                await asyncio.sleep(0)
                clock.now += 0.01
                limiter.throttled()
        await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(burst_of_429s())
    # eight 429s of requests sent together are one congestion event
    assert limiter.limit == 8 and limiter.cuts == 1
    for _ in range(8):
        limiter.succeeded()
    assert 8.9 < limiter.limit < 9.1  # about one more per window of successes
    for _ in range(1000):
        limiter.succeeded()
    assert limiter.limit == 16  # never above the maximum


def test_a_429_after_the_cut_cuts_again_down_to_the_minimum() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(16, minimum=3, clock=clock)

    async def sequential() -> None:
        for _ in range(6):
            async with limiter.slot():
                clock.now += 1
                limiter.throttled()

    asyncio.run(sequential())
    assert limiter.limit == 3 and limiter.cuts == 6


def test_retry_after_pauses_new_requests() -> None:
    limiter = AdaptiveLimiter(4)

    async def main() -> float:
        async with limiter.slot():
            limiter.throttled(retry_after_s=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with limiter.slot():
            return loop.time() - started

    assert asyncio.run(main()) >= 0.25
    assert limiter.pauses == 1


def test_a_spent_request_budget_pauses_for_one_requests_refill_and_stops_growth() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(8, initial=4, clock=clock)
    limiter.succeeded({"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "100",
                       "x-ratelimit-reset-requests": "20s"})
    assert limiter.paused_for() == pytest.approx(0.2)
    assert limiter.limit == 4  # nearly spent: no growth
    limiter.succeeded({"x-ratelimit-remaining-requests": "50", "x-ratelimit-limit-requests": "100"})
    assert limiter.limit == 4.25


def test_a_spent_token_budget_pauses_for_one_requests_tokens() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(8, clock=clock)
    for _ in range(200):
        limiter.succeeded(tokens=1000)  # learns about 1,000 tokens per request
    limiter.succeeded({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-tokens": "100000",
                       "x-ratelimit-reset-tokens": "60s"}, tokens=1000)
    assert limiter.paused_for() == pytest.approx(0.6, rel=0.05)


def test_pauses_are_capped() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(8, max_pause_s=5, clock=clock)
    limiter.throttled(retry_after_s=3600)
    assert limiter.paused_for() == 5


# ----------------------------------------------------------------------- slots


def test_no_more_in_flight_than_the_limit_and_waiters_run_when_it_grows() -> None:
    limiter = AdaptiveLimiter(4, initial=2)
    peak = 0

    async def main() -> None:
        async def one() -> None:
            nonlocal peak
            async with limiter.slot():
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.01)
        await asyncio.gather(*(one() for _ in range(10)))

    asyncio.run(main())
    assert peak == 2 and limiter.in_flight == 0


def test_a_cancelled_waiter_passes_its_wake_up_on() -> None:
    limiter = AdaptiveLimiter(1)

    async def main() -> list[str]:
        done: list[str] = []
        await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        second = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        limiter.release()  # wakes `waiting`...
        waiting.cancel()  # ...which leaves before it runs: `second` must get the slot
        await asyncio.wait_for(second, 1)
        done.append("second")
        return done

    assert asyncio.run(main()) == ["second"]
    assert limiter.in_flight == 1


def test_one_limit_shared_by_event_loops_in_several_threads() -> None:
    limiter = AdaptiveLimiter(3)
    peak, lock = 0, threading.Lock()

    async def loop_body() -> None:
        async def one() -> None:
            nonlocal peak
            async with limiter.slot():
                with lock:
                    peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.005)
        await asyncio.gather(*(one() for _ in range(20)))

    threads = [threading.Thread(target=asyncio.run, args=(loop_body(),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads)
    assert peak == 3 and limiter.in_flight == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(4, minimum=5)
    with pytest.raises(ValueError):
        AdaptiveLimiter(4, decrease=1.5)


# ----------------------------------------------------------------------- several runs, one provider

RUNS, CONCURRENCY, PER_RUN = 3, 16, 60
RATE, BURST, LATENCY_S = 50.0, 10, 0.2


def _run_teachers(fake: Any, **options: Any) -> list[str]:
    """RUNS teachers, each on its own thread and event loop as separate runs are, sharing
    nothing but the provider; the failure reasons of their requests."""
    from mmat_assets.contracts import TeacherError, TeacherRequest
    from mmat_plugins.teachers_openai import OpenAITeacher

    failures: list[str] = []

    async def run(index: int) -> None:
        teacher = OpenAITeacher({"base_url": fake.base_url, "api_key": "sk-test-ratelimit", "concurrency": CONCURRENCY,
                                 "max_retries": 10, "timeout_s": 10, **options})

        async def one(i: int) -> None:
            request = TeacherRequest(kind="step", prompt_version="t1", json_schema=None,
                                     messages=[{"role": "user", "content": f"run {index} question {i}"}])
            try:
                await teacher.acomplete(request)
            except TeacherError as exc:
                failures.append(exc.reason)
        await asyncio.gather(*(one(i) for i in range(PER_RUN)))
        await teacher.aclose()

    def thread(index: int) -> None:
        try:
            asyncio.run(run(index))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            failures.append(f"crashed: {exc!r}")

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(RUNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return failures


def test_parallel_runs_settle_near_the_providers_limit_instead_of_storming_it() -> None:
    from tests.openai_fake import FakeOpenAI, TokenBucket

    bucket = TokenBucket(rate=RATE, burst=BURST)
    # Unadapted, the runs offer RUNS * CONCURRENCY / LATENCY_S = 240 requests/s to a limit of 50.
    with FakeOpenAI(latency_s=LATENCY_S, rate_limit=bucket) as fake:
        failures = _run_teachers(fake, adaptive_concurrency=True)
    assert failures == []
    assert bucket.admitted == RUNS * PER_RUN
    # Unadapted, 9 requests in 10 are refused (measured: 0.91); the first window alone costs
    # RUNS * CONCURRENCY - BURST = 38 refusals, about a fifth of the requests here.
    assert bucket.share_refused < 0.3, (bucket.refused, bucket.admitted)
    assert bucket.throughput() >= 0.6 * RATE, bucket.throughput()
