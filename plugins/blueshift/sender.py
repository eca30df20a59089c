"""Sending one chunk of users to Blueshift: sender threads, bounded retries, pacing, the circuit.

``ChunkSender`` knows neither Airflow nor the state store nor the budget's leases: it sends every
user once to ``POST /api/v1/customers/unforget`` through a client (the hook), hands the outcomes to
a ``record`` callback in batches, and calls ``renew`` while it sends, so that the caller can renew
its share of the budget and set the limiter's ceiling.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests

from blueshift.outcomes import Status, Verdict, classify, redact
from blueshift.pacing import AdaptiveRateLimiter, CircuitBreaker, backoff_delay, retry_after_seconds

FLUSH_EVERY_SECONDS = 1.0
"""Outcomes wait at most this long before they are recorded: what a killed task can lose."""
FLUSH_EVERY_OUTCOMES = 500
"""Outcomes recorded at once at most."""

User = tuple[str, str | None, str | None]
"""``(user_key, customer_id, email)``, as the state store loads them."""
Outcome = dict[str, Any]
"""``user_key, status, http_status, attempts, error``: one row of the staging table's outcome."""
_Answers = queue.SimpleQueue[tuple[str, Outcome | None]]
"""Each user's key and outcome, from the sender threads (None: not sent, the chunk stopped)."""


class Client(Protocol):
    """What the sender needs of the hook: one call that returns the response, whatever its status."""

    def start_tracking(self, payload: dict[str, str]) -> Any: ...


class Log(Protocol):
    """A logger (``logging.Logger`` or an Airflow task's ``self.log``)."""

    def info(self, event: Any, *args: Any) -> Any: ...

    def warning(self, event: Any, *args: Any) -> Any: ...


class Metrics(Protocol):
    """Where the counters go at each progress line (``blueshift.metrics.ChunkMetrics``)."""

    def publish(self, progress: ChunkProgress, *, pace: float | None, circuit_opened: int) -> None: ...


@dataclass
class ChunkProgress:
    """Counters of one chunk, shared by the sending threads, and whether Blueshift refused the key."""

    total: int
    done: int = 0
    requests: int = 0
    throttled: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    refused: int | None = None
    """The status (401 or 403) with which Blueshift refused the key; the chunk stopped at once."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, status_code: int | None) -> None:
        with self.lock:
            self.requests += 1
            if status_code == 429:
                self.throttled += 1

    def count_outcome(self, status: str) -> None:
        with self.lock:
            self.done += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def counts(self) -> dict[str, int]:
        """Return users, the count per final status (succeeded, rejected, failed, dry_run), requests
        and throttled requests."""
        counts = {"users": self.total}
        for status in (Status.SUCCEEDED, Status.REJECTED, Status.FAILED, Status.DRY_RUN):
            counts[status.value] = self.by_status.get(status.value, 0)
        return {**counts, "requests": self.requests, "throttled": self.throttled}

    def format_counts(self) -> str:
        """Return ``"3 failed, 497 succeeded"``: the statuses so far, by name."""
        return ", ".join(f"{count} {status}" for status, count in sorted(self.by_status.items())) or "nothing"


class _KeyRefusedError(Exception):
    """Internal: Blueshift answered 401/403; carries the status for the task's error."""

    def __init__(self, status_code: int) -> None:
        super().__init__(status_code)
        self.status_code = status_code


@dataclass(frozen=True)
class _Transient:
    """An attempt that failed in a way worth retrying: a timeout, a dropped connection, 404/409/429/5xx."""

    http_status: int | None
    error: str
    retry_after: float | None = None


def _nothing() -> None:
    return None


class ChunkSender:
    """
    Send every user of a chunk once, by ``max_in_flight`` threads, at the pace of ``limiter``.

    Per the API contract: 200 is ``succeeded``; 400/413/422 (and unlisted 4xx) are ``rejected``
    and never retried; 404/409/429/5xx, timeouts and dropped connections are retried with capped
    exponential backoff and full jitter (at least the Retry-After, if Blueshift sends one), up to
    ``max_attempts`` per user, then ``failed``; a 429 halves the pace. 401/403 stop every thread
    at once: the users not sent are ``failed`` with attempts 0. A storm of transient failures opens
    the circuit breaker, which pauses every thread.

    :param client: sends one user (``BlueshiftHook``, whose session the threads share).
    :param limiter: the pace; ``renew`` may change its ceiling while the chunk is sent.
    :param record: receives the outcomes, at most ``FLUSH_EVERY_OUTCOMES`` at a time, at the latest
        ``FLUSH_EVERY_SECONDS`` after they happened; called from the thread that called ``send``.
    :param renew: called about every ``renew_every`` seconds (and at every outcome) while sending.
    :param renew_every: the longest time between calls of ``renew``.
    :param progress_interval: seconds between progress lines in the log.
    :param log: where the progress lines and circuit warnings go.
    :param metrics: receives the counters with every progress line (and the last one).
    """

    def __init__(
        self,
        client: Client,
        limiter: AdaptiveRateLimiter,
        *,
        record: Callable[[list[Outcome]], None],
        max_in_flight: int,
        max_attempts: int,
        backoff_base_seconds: float,
        backoff_cap_seconds: float,
        progress_interval: float,
        renew: Callable[[], None] = _nothing,
        renew_every: float = FLUSH_EVERY_SECONDS,
        log: Log | None = None,
        metrics: Metrics | None = None,
        breaker: CircuitBreaker | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.limiter = limiter
        self.record = record
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.progress_interval = progress_interval
        self.renew = renew
        self.renew_every = renew_every
        self.log: Log = log or logging.getLogger(__name__)
        self.metrics = metrics
        self.breaker = breaker or CircuitBreaker()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._stop = threading.Event()
        self._refused: list[int] = []
        self._progress = ChunkProgress(total=0)
        self._started = time.monotonic()

    def send(self, users: Sequence[User]) -> ChunkProgress:
        """Send every user; return the chunk's counts once every outcome has gone to ``record``."""
        self._stop.clear()
        self._refused.clear()
        self._progress = ChunkProgress(total=len(users))
        self._started = time.monotonic()
        # A fixed set of sender threads pulls users from one queue and puts outcomes on another:
        # the thread that called send waits on one queue, whatever the number of users.
        work: queue.SimpleQueue[User] = queue.SimpleQueue()
        for user in users:
            work.put(user)
        results: _Answers = queue.SimpleQueue()
        threads = [
            threading.Thread(target=self._sender, args=(work, results), name=f"blueshift-{n}", daemon=True)
            for n in range(min(self.max_in_flight, len(users)))
        ]
        for thread in threads:
            thread.start()
        pending, unsent = self._collect(results, users)
        for thread in threads:
            thread.join()
        self._finish(pending, unsent)
        return self._progress

    def _sender(self, work: queue.SimpleQueue[User], results: _Answers) -> None:
        """One sender thread: send users off ``work`` until it is empty, each outcome to ``results``."""
        while True:
            try:
                user = work.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((user[0], self._send_or_stop(user)))
            except BaseException:
                results.put((user[0], None))
                raise

    def _send_or_stop(self, user: User) -> Outcome | None:
        try:
            return self._send_one(user)
        except _KeyRefusedError as err:
            self._refused.append(err.status_code)
            self._stop.set()
            return None

    def _collect(self, results: _Answers, users: Sequence[User]) -> tuple[list[Outcome], set[str]]:
        """Take every user's answer from the threads, and on every wake-up (an answer, or
        ``renew_every`` without one) renew, record the outcomes due and report progress when due.

        :return: the outcomes not recorded yet, and the keys of the users left without an outcome.
        """
        unsent = {user[0] for user in users}
        pending: list[Outcome] = []
        last_flush = last_report = self._started
        received = 0
        while received < len(users):
            try:
                key, outcome = results.get(timeout=min(FLUSH_EVERY_SECONDS, self.renew_every))
            except queue.Empty:
                pass
            else:
                received += 1
                if outcome is not None:
                    unsent.discard(key)
                    pending.append(outcome)
                    self._progress.count_outcome(outcome["status"])
            self.renew()
            now = time.monotonic()
            if len(pending) >= FLUSH_EVERY_OUTCOMES or (pending and now - last_flush >= FLUSH_EVERY_SECONDS):
                self.record(pending)
                pending, last_flush = [], now
            if now - last_report >= self.progress_interval:
                self._report()
                last_report = now
        return pending, unsent

    def _finish(self, pending: list[Outcome], unsent: set[str]) -> None:
        """Mark the users not sent after a refused key failed, record the rest, log the last line."""
        if self._refused:
            status = self._progress.refused = self._refused[0]
            reason = f"not sent: Blueshift refused the API key (HTTP {status})"
            for key in unsent:
                pending.append(_outcome(key, Status.FAILED, status, 0, reason))
                self._progress.count_outcome(Status.FAILED.value)
        for start in range(0, len(pending), FLUSH_EVERY_OUTCOMES):
            self.record(pending[start : start + FLUSH_EVERY_OUTCOMES])
        self._report()

    def _send_one(self, user: User) -> Outcome | None:
        """Send one user with bounded retries; return its outcome, or None if the chunk was stopped.

        A plain loop rather than tenacity: every attempt first waits its turn at the shared pace,
        a refused key must interrupt every thread's wait (``stop.wait``), and the wait between
        attempts is the larger of the jittered backoff and Retry-After, next to the circuit's
        pause. Spread over tenacity's stop, wait, retry and before hooks it reads worse.
        """
        key, customer_id, email = user
        payload = {name: value for name, value in (("customer_id", customer_id), ("email", email)) if value}
        failure = _Transient(None, "no attempt")
        for attempt in range(1, self.max_attempts + 1):
            if not self._take_turn():
                return None
            result = self._attempt(key, payload, attempt)
            if not isinstance(result, _Transient):
                return result
            failure = result
            if self._wait_to_retry(attempt, failure.retry_after):
                return None
        return _outcome(
            key, Status.FAILED, failure.http_status, self.max_attempts, f"gave up: {failure.error}"
        )

    def _take_turn(self) -> bool:
        """Wait for this thread's turn at the pace; return False if the chunk stopped meanwhile."""
        if self._stop.is_set():
            return False
        self.limiter.acquire()
        return not self._stop.is_set()

    def _attempt(self, key: str, payload: dict[str, str], attempt: int) -> Outcome | _Transient:
        """Send one request; return the user's final outcome, or the transient failure to retry."""
        try:
            response = self.client.start_tracking(payload)
        except (requests.Timeout, requests.ConnectionError) as err:
            self._progress.count_request(None)
            return _Transient(None, f"{type(err).__name__} (attempt {attempt})")
        http_status = response.status_code
        self._progress.count_request(http_status)
        verdict = classify(http_status)
        if verdict is Verdict.OK:
            self.limiter.on_success()
            self.breaker.record_success()
            return _outcome(key, Status.SUCCEEDED, http_status, attempt, None)
        if verdict is Verdict.AUTH:
            raise _KeyRefusedError(http_status)
        error = redact(f"HTTP {http_status}: {response.text}")
        if verdict is Verdict.REJECT:
            self.breaker.record_success()
            return _outcome(key, Status.REJECTED, http_status, attempt, error)
        if http_status == 429:
            self.limiter.on_throttled()
        return _Transient(http_status, error, retry_after_seconds(response.headers.get("Retry-After")))

    def _wait_to_retry(self, attempt: int, retry_after: float | None) -> bool:
        """Count a transient failure (the circuit may open), then wait before the next attempt if one
        is left; return True if the chunk stopped during the wait."""
        pause = self.breaker.record_failure()
        if pause:
            self.log.warning("Circuit open after repeated transient failures: pausing %.1f s", pause)
            self.limiter.pause(pause)
        if attempt >= self.max_attempts:
            return False
        delay = backoff_delay(
            attempt, base=self.backoff_base_seconds, cap=self.backoff_cap_seconds, rng=self._rng
        )
        if retry_after is not None:
            delay = max(delay, retry_after)
        return self._stop.wait(delay)

    def _report(self) -> None:
        progress, elapsed = self._progress, time.monotonic() - self._started
        self.log.info(
            "Sent %d of %d users (%.1f req/s, pace %.1f/s of a %.1f/s share, %d throttled, %d requests)",
            progress.done,
            progress.total,
            progress.requests / elapsed if elapsed > 0 else 0.0,
            self.limiter.rate,
            self.limiter.max_rate,
            progress.throttled,
            progress.requests,
        )
        if self.metrics is not None:
            self.metrics.publish(progress, pace=self.limiter.rate, circuit_opened=self.breaker.opened)


def _outcome(key: str, status: Status, http_status: int | None, attempts: int, error: str | None) -> Outcome:
    return {
        "user_key": key,
        "status": status.value,
        "http_status": http_status,
        "attempts": attempts,
        "error": error,
    }
