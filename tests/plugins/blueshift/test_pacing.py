"""Pacing: even spacing under the budget, multiplicative back-off on 429, the circuit."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from blueshift.pacing import (
    MAX_RETRY_AFTER_SECONDS,
    AdaptiveRateLimiter,
    CircuitBreaker,
    backoff_delay,
    retry_after_seconds,
)


class FakeClock:
    """A clock whose sleeps take exactly as long as asked, recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_slots_are_spaced_one_over_rate():
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(10.0, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(5):
        limiter.acquire()
        sent.append(clock.now)
    assert sent == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


class StarvedClock(FakeClock):
    """Sleeps take as long as asked, but the first one overruns by ``starved`` seconds."""

    def __init__(self, starved: float) -> None:
        super().__init__()
        self.starved = starved

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds + self.starved)
        self.starved = 0.0


def test_a_thread_woken_late_takes_a_new_slot_instead_of_bursting():
    clock = StarvedClock(starved=0.9)
    limiter = AdaptiveRateLimiter(10.0, clock=clock, sleep=clock.sleep)
    sent = []
    for _ in range(4):
        limiter.acquire()
        sent.append(round(clock.now, 3))
    # The second request's slot (0.1) passed while the process was starved until 1.0: it goes at
    # 1.0 and the next ones keep their spacing, instead of two requests at 1.0.
    assert sent == [0.0, 1.0, 1.1, 1.2]


def _send_times(rate: float, phase: float, seconds: float) -> list[float]:
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(rate, clock=clock, sleep=clock.sleep)
    limiter.set_phase(phase)
    times = []
    while clock.now < seconds:
        limiter.acquire()
        times.append(clock.now)
    return [t for t in times if t < seconds]


@pytest.mark.parametrize("tasks", [2, 3, 4, 6])
def test_phased_shares_hold_every_clock_second_to_the_budget(tasks):
    """Shares of a budget of 50 that do not divide a second (12.5/s: 12 or 13 a second each) still
    add up to at most 50 in every clock second when each task takes its rank's phase."""
    budget = 50.0
    times = [t for rank in range(tasks) for t in _send_times(budget / tasks, rank / tasks, seconds=4.0)]
    per_second = Counter(math.floor(t + 1e-9) for t in times)
    assert max(per_second.values()) <= budget, per_second
    assert sum(per_second.values()) >= 4 * budget - tasks
    # Without the phases the same shares bunch: four tasks at 12.5/s put 52 into the first second.
    unphased = Counter(math.floor(t + 1e-9) for _ in range(4) for t in _send_times(12.5, 0.0, 4.0))
    assert max(unphased.values()) == 52


def test_real_threads_never_exceed_the_rate():
    limiter = AdaptiveRateLimiter(200.0)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(stamps) == 200
    assert elapsed >= 199 / 200 * 0.98
    stamps.sort()
    busiest = max(sum(1 for s in stamps if start <= s < start + 0.25) for start in stamps)
    assert busiest <= 0.25 * 200 + 2


def test_a_lower_rate_applies_to_the_very_next_request():
    """Threads waiting to send do not hold send times at the old rate (no burst on a new share)."""
    limiter = AdaptiveRateLimiter(100.0)
    stamps: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    limiter.set_max_rate(10.0)
    changed = time.monotonic()
    time.sleep(0.5)
    stop.set()
    limiter.set_max_rate(1000.0)  # let the waiting threads out
    for thread in threads:
        thread.join()
    before = [s for s in stamps if s <= changed]
    after = [s for s in stamps if changed < s <= changed + 0.5]
    assert len(before) >= 20, "the pace before the change was 100/s"
    assert len(after) <= 10 * 0.5 + 2, f"{len(after)} requests in 0.5 s after the rate fell to 10/s"


def test_429_halves_and_success_recovers_additively():
    limiter = AdaptiveRateLimiter(50.0)
    limiter.on_throttled()
    assert limiter.rate == 25.0
    limiter.on_throttled()
    assert limiter.rate == 12.5
    for _ in range(10):
        limiter.on_success()
    assert limiter.rate == pytest.approx(22.5)
    for _ in range(100):
        limiter.on_success()
    assert limiter.rate == 50.0
    for _ in range(100):
        limiter.on_throttled()
    assert limiter.rate == limiter.min_rate > 0


def test_pause_holds_every_caller():
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(100.0, clock=clock, sleep=clock.sleep)
    limiter.pause(2.0)
    limiter.acquire()
    assert clock.now == pytest.approx(2.0)


def test_backoff_is_capped_and_jittered():
    rng = random.Random(1)
    delays = [
        backoff_delay(attempt, base=0.5, cap=8.0, rng=rng) for attempt in range(1, 12) for _ in range(50)
    ]
    assert all(0 <= delay <= 8.0 for delay in delays)
    assert len(set(delays)) > 100
    first = [backoff_delay(1, base=0.5, cap=8.0, rng=rng) for _ in range(200)]
    assert max(first) <= 0.5


def test_circuit_opens_after_a_storm_and_closes_on_success():
    breaker = CircuitBreaker(threshold=3, cooldown=1.0, max_cooldown=4.0)
    assert [breaker.record_failure() for _ in range(3)] == [0.0, 0.0, 1.0]
    assert [breaker.record_failure() for _ in range(3)] == [0.0, 0.0, 2.0]
    assert [breaker.record_failure() for _ in range(6)][-1] == 4.0
    breaker.record_success()
    assert [breaker.record_failure() for _ in range(3)] == [0.0, 0.0, 1.0]
    assert breaker.opened == 5


NOW = datetime(2026, 10, 21, 7, 28, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        ("100000", MAX_RETRY_AFTER_SECONDS),
        ("Wed, 21 Oct 2026 07:28:07 GMT", 7.0),  # IMF-fixdate, RFC 9110's preferred form
        ("Wednesday, 21-Oct-26 07:28:30 GMT", 30.0),  # obsolete RFC 850 form
        ("Wed Oct 21 07:28:02 2026", 2.0),  # obsolete asctime form, no zone: GMT
        ("Wed, 21 Oct 2026 07:27:00 GMT", 0.0),  # in the past: no wait
        ("Wed, 21 Oct 2026 09:28:00 GMT", MAX_RETRY_AFTER_SECONDS),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(header, expected):
    assert retry_after_seconds(header, now=NOW) == expected
