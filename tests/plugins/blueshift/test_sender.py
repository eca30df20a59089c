"""ChunkSender without Airflow: a plain requests client against the stand-in (or requests_mock)."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from blueshift.pacing import AdaptiveRateLimiter, CircuitBreaker
from blueshift.sender import FLUSH_EVERY_OUTCOMES, FLUSH_EVERY_SECONDS, ChunkProgress, ChunkSender, User
from tests.conftest import API_KEY

ENDPOINT = "/api/v1/customers/unforget"
MOCK_URL = "https://api.getblueshift.com"
MAX_ATTEMPTS = 3
PACE = re.compile(r"pace (\d+(?:\.\d+)?)/s of a (\d+(?:\.\d+)?)/s share")


class Client:
    """What BlueshiftHook.start_tracking does, without Airflow: one keep-alive session, Basic key auth."""

    def __init__(self, url: str, key: str = API_KEY, read_timeout: float = 0.5) -> None:
        self.url = url + ENDPOINT
        self.session = requests.Session()
        self.session.auth = (key, "")
        self.session.mount(url, HTTPAdapter(pool_maxsize=8, max_retries=0))
        self.timeout = (1.0, read_timeout)

    def start_tracking(self, payload: dict[str, str]) -> Any:
        return self.session.post(self.url, json=payload, timeout=self.timeout)


class Log:
    """Collects the sender's log lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, event: Any, *args: Any) -> None:
        self.lines.append(("info", event % args))

    def warning(self, event: Any, *args: Any) -> None:
        self.lines.append(("warning", event % args))

    def text(self, level: str) -> str:
        return "\n".join(line for lvl, line in self.lines if lvl == level)


class Recorder:
    """The ``record`` callback: keeps every batch and when it came."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.times: list[float] = []
        self.threads: set[str] = set()

    def __call__(self, outcomes: list[dict[str, Any]]) -> None:
        self.batches.append(list(outcomes))
        self.times.append(time.monotonic())
        self.threads.add(threading.current_thread().name)

    @property
    def outcomes(self) -> dict[str, dict[str, Any]]:
        merged = [outcome for batch in self.batches for outcome in batch]
        by_key = {outcome["user_key"]: outcome for outcome in merged}
        assert len(by_key) == len(merged), "every user is recorded once"
        return by_key


def users(*customer_ids: str) -> list[User]:
    return [(f"key-{customer_id}", customer_id, None) for customer_id in customer_ids]


def send(
    client: Any,
    chunk: list[User],
    *,
    rate: float = 500.0,
    breaker: CircuitBreaker | None = None,
    renew: Any = None,
    **overrides: Any,
) -> tuple[ChunkProgress, Recorder, Log]:
    recorder, log = Recorder(), Log()
    arguments: dict[str, Any] = {
        "record": recorder,
        "max_in_flight": 4,
        "max_attempts": MAX_ATTEMPTS,
        "backoff_base_seconds": 0.01,
        "backoff_cap_seconds": 0.02,
        "progress_interval": 0.2,
        "log": log,
        "breaker": breaker,
    }
    if renew is not None:
        arguments["renew"] = renew
    arguments.update(overrides)
    progress = ChunkSender(client, AdaptiveRateLimiter(rate), **arguments).send(chunk)
    return progress, recorder, log


STATUSES = {
    200: ("succeeded", 1),
    400: ("rejected", 1),
    413: ("rejected", 1),
    422: ("rejected", 1),
    418: ("rejected", 1),
    404: ("failed", MAX_ATTEMPTS),
    409: ("failed", MAX_ATTEMPTS),
    429: ("failed", MAX_ATTEMPTS),
    500: ("failed", MAX_ATTEMPTS),
    502: ("failed", MAX_ATTEMPTS),
    503: ("failed", MAX_ATTEMPTS),
    504: ("failed", MAX_ATTEMPTS),
    599: ("failed", MAX_ATTEMPTS),
}


def test_each_status_gives_its_outcome_and_retries_are_bounded(standin):
    standin.state.config.fixed = {f"C-{code}": code for code in STATUSES}
    progress, recorder, _ = send(Client(standin.url), users(*(f"C-{code}" for code in STATUSES)))

    outcomes = recorder.outcomes
    for code, (status, attempts) in STATUSES.items():
        outcome = outcomes[f"key-C-{code}"]
        assert (outcome["status"], outcome["attempts"], outcome["http_status"]) == (status, attempts, code)
        assert (outcome["error"] is None) == (status == "succeeded")
    retried = sum(attempts for _, attempts in STATUSES.values())
    assert standin.state.requests == progress.requests == retried, "no request beyond max_attempts"
    assert progress.throttled == MAX_ATTEMPTS
    assert progress.by_status == {"succeeded": 1, "rejected": 4, "failed": 8}
    assert progress.done == progress.total == len(STATUSES)
    assert progress.refused is None
    assert outcomes["key-C-503"]["error"].startswith("gave up: HTTP 503")


def test_timeouts_are_retried_then_fail_with_their_cause(requests_mock):
    requests_mock.post(MOCK_URL + ENDPOINT, exc=requests.exceptions.ConnectTimeout)
    progress, recorder, _ = send(Client(MOCK_URL), users("C-1"))
    (outcome,) = recorder.outcomes.values()
    assert outcome["status"] == "failed"
    assert outcome["attempts"] == MAX_ATTEMPTS
    assert outcome["http_status"] is None
    assert outcome["error"] == f"gave up: ConnectTimeout (attempt {MAX_ATTEMPTS})"
    assert requests_mock.call_count == MAX_ATTEMPTS == progress.requests


@pytest.mark.parametrize("code", [401, 403])
def test_a_refused_key_stops_every_thread(standin, code):
    chunk = users(*(f"C-{n:03d}" for n in range(200)))
    standin.state.config.fixed = {customer_id: code for _, customer_id, _ in chunk}
    progress, recorder, _ = send(Client(standin.url), chunk, max_in_flight=4)

    assert progress.refused == code
    assert standin.state.requests <= 8, "no storm of requests after the key was refused"
    outcomes = recorder.outcomes
    assert len(outcomes) == 200, "every user has an outcome"
    assert {outcome["status"] for outcome in outcomes.values()} == {"failed"}
    assert {outcome["error"] for outcome in outcomes.values()} == {
        f"not sent: Blueshift refused the API key (HTTP {code})"
    }
    assert progress.by_status == {"failed": 200}
    assert max(len(batch) for batch in recorder.batches) <= FLUSH_EVERY_OUTCOMES


def test_a_wrong_key_is_refused(standin):
    progress, _, _ = send(Client(standin.url, key="not-the-key"), users("C-1", "C-2"))
    assert progress.refused == 401
    assert standin.state.requests <= 2


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(requests_mock, form):
    # An HTTP date has whole seconds: two seconds ahead is a wait of more than one.
    in_two_seconds = datetime.now(timezone.utc) + timedelta(seconds=2)
    retry_after = "1" if form == "seconds" else format_datetime(in_two_seconds, usegmt=True)
    requests_mock.post(
        MOCK_URL + ENDPOINT,
        [
            {"status_code": 429, "headers": {"Retry-After": retry_after}, "json": {}},
            {"json": {"status": "ok"}},
        ],
    )
    renewals: list[float] = []
    started = time.monotonic()
    progress, recorder, _ = send(
        Client(MOCK_URL), users("C-1"), renew=lambda: renewals.append(time.monotonic()), renew_every=0.1
    )
    assert time.monotonic() - started >= 1.0
    assert requests_mock.call_count == 2
    assert recorder.outcomes["key-C-1"]["attempts"] == 2
    assert progress.by_status == {"succeeded": 1} and progress.throttled == 1
    assert len(renewals) >= 5, "the budget is renewed while the sender waits"


def test_outcomes_are_recorded_in_batches_by_the_calling_thread(standin):
    chunk = users(*(f"C-{n:04d}" for n in range(1_200)))
    progress, recorder, _ = send(Client(standin.url), chunk, rate=5_000.0, max_in_flight=8)

    assert progress.by_status == {"succeeded": 1_200}
    assert len(recorder.outcomes) == 1_200
    assert max(len(batch) for batch in recorder.batches) <= FLUSH_EVERY_OUTCOMES
    assert len(recorder.batches) >= 3
    assert recorder.threads == {threading.current_thread().name}


def test_outcomes_wait_at_most_flush_every_seconds(standin):
    """At 10 users/s, outcomes are recorded about once a second, not once at the end."""
    started = time.monotonic()
    progress, recorder, log = send(Client(standin.url), users(*(f"C-{n}" for n in range(25))), rate=10.0)

    assert progress.by_status == {"succeeded": 25}
    assert len(recorder.batches) >= 2
    assert recorder.times[0] - started <= FLUSH_EVERY_SECONDS + 0.5
    gaps = [later - earlier for earlier, later in zip(recorder.times, recorder.times[1:], strict=False)]
    assert max(gaps) <= FLUSH_EVERY_SECONDS + 0.5
    paces = [(float(pace), float(share)) for pace, share in PACE.findall(log.text("info"))]
    assert len(paces) >= 5, "a progress line every progress_interval"
    assert {share for _, share in paces} == {10.0}
    assert log.text("info").splitlines()[-1].startswith("Sent 25 of 25 users")


def test_the_circuit_opens_under_a_429_storm_and_the_chunk_recovers(standin):
    standin.state.config.storm_seconds = 1.0
    breaker = CircuitBreaker(threshold=5, cooldown=0.3, max_cooldown=0.6)
    progress, recorder, log = send(
        Client(standin.url), users(*(f"C-{n:02d}" for n in range(20))), breaker=breaker, max_attempts=10
    )

    assert breaker.opened >= 1
    assert "Circuit open after repeated transient failures: pausing 0.3 s" in log.text("warning")
    assert progress.by_status == {"succeeded": 20}
    assert progress.throttled == standin.state.statuses["429"] >= breaker.threshold
    assert all(outcome["attempts"] <= 10 for outcome in recorder.outcomes.values())


def test_no_users_sends_nothing(standin):
    progress, recorder, _ = send(Client(standin.url), [])
    assert progress.total == progress.done == 0
    assert recorder.batches == []
    assert standin.state.requests == 0
