"""The ``blueshift.*`` metrics: increments per progress line, equal to what the stand-in saw."""

from __future__ import annotations

from collections import Counter
from typing import Any

import requests

from blueshift.metrics import ChunkMetrics, publish_run
from blueshift.pacing import AdaptiveRateLimiter, CircuitBreaker
from blueshift.sender import ChunkProgress, ChunkSender
from tests.conftest import API_KEY

RATE = 300.0


class FakeStats:
    """Airflow's ``Stats`` facade as the metrics module calls it: every call, in order."""

    def __init__(self) -> None:
        self.incrs: list[tuple[str, int]] = []
        self.gauges: list[tuple[str, float]] = []

    def incr(self, stat: str, count: int = 1) -> None:
        self.incrs.append((stat, count))

    def gauge(self, stat: str, value: float) -> None:
        self.gauges.append((stat, value))

    def totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for stat, count in self.incrs:
            totals[stat] += count
        return dict(totals)


class Client:
    """One keep-alive session with the key as Basic auth, like ``BlueshiftHook.start_tracking``."""

    def __init__(self, url: str) -> None:
        self.url = url + "/api/v1/customers/unforget"
        self.session = requests.Session()
        self.session.auth = (API_KEY, "")

    def start_tracking(self, payload: dict[str, str]) -> Any:
        return self.session.post(self.url, json=payload, timeout=(1.0, 2.0))


def test_each_publication_sends_only_the_increase():
    stats = FakeStats()
    metrics = ChunkMetrics(stats)
    progress = ChunkProgress(total=10, requests=5, throttled=1, by_status={"succeeded": 3})
    metrics.publish(progress, pace=12.5, circuit_opened=0)
    progress.requests, progress.throttled = 9, 1
    progress.by_status = {"succeeded": 6, "rejected": 1}
    metrics.publish(progress, pace=6.25, circuit_opened=1)
    metrics.publish(progress, pace=6.25, circuit_opened=1)

    assert stats.incrs == [
        ("blueshift.requests", 5),
        ("blueshift.throttled", 1),
        ("blueshift.outcomes.succeeded", 3),
        ("blueshift.requests", 4),
        ("blueshift.outcomes.succeeded", 3),
        ("blueshift.outcomes.rejected", 1),
        ("blueshift.circuit_opened", 1),
    ]
    assert stats.gauges == [("blueshift.pace", 12.5), ("blueshift.pace", 6.25), ("blueshift.pace", 6.25)]


def test_run_counts_are_published_by_name_and_zeros_are_not_sent():
    stats = FakeStats()
    summary = {"succeeded": 7, "rejected": 0, "invalid": 2, "failed": 1, "dry_run": 0, "carried_over": 3}
    publish_run({**summary, "users": 10, "window_start": "2026-11-24T00:00:00+00:00"}, stats)
    assert stats.totals() == {
        "blueshift.run.succeeded": 7,
        "blueshift.run.invalid": 2,
        "blueshift.run.failed": 1,
        "blueshift.run.carried_over": 3,
    }


def test_sender_counters_equal_what_the_standin_saw(standin):
    """429s and 503s, a circuit that opens: requests, 429s, outcomes and openings all add up."""
    standin.state.config.fault_rate = 0.3
    standin.state.config.faults = ["429", "503"]
    standin.state.config.fixed = {f"C-{n}": 422 for n in range(5)}
    stats = FakeStats()
    breaker = CircuitBreaker(threshold=3, cooldown=0.01, max_cooldown=0.02)
    chunk = [(f"key-{n}", f"C-{n}", None) for n in range(150)]
    sender = ChunkSender(
        Client(standin.url),
        AdaptiveRateLimiter(RATE),
        record=lambda outcomes: None,
        max_in_flight=4,
        max_attempts=6,
        backoff_base_seconds=0.005,
        backoff_cap_seconds=0.01,
        progress_interval=0.1,
        metrics=ChunkMetrics(stats),
        breaker=breaker,
    )
    progress = sender.send(chunk)

    snapshot = standin.state.snapshot()
    expected = {
        "blueshift.requests": snapshot["requests"],
        "blueshift.throttled": snapshot["statuses"]["429"],
        "blueshift.outcomes.succeeded": snapshot["statuses"]["200"],
        "blueshift.outcomes.rejected": 5,
        "blueshift.circuit_opened": breaker.opened,
    }
    failed = progress.by_status.get("failed", 0)
    if failed:
        expected["blueshift.outcomes.failed"] = failed
    assert stats.totals() == expected
    assert breaker.opened > 0, "the faults never opened the circuit: the test proves nothing about it"
    assert len(stats.gauges) >= 2, "a pace per progress line, and the last"
    assert all(stat == "blueshift.pace" and 0 < value <= RATE for stat, value in stats.gauges)
    assert min(value for _, value in stats.gauges) < RATE, "429s halve the pace: the gauge shows it"
