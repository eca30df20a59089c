"""The task that starts tracking one chunk of users in Blueshift."""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import requests
from airflow.sdk import BaseOperator

from blueshift.budget import SharedBudget
from blueshift.connections import state_conn_id_for
from blueshift.exceptions import BlueshiftAuthError, BlueshiftChunkIncomplete, BlueshiftConfigError
from blueshift.hooks import BlueshiftHook
from blueshift.outcomes import Status, Verdict, classify, redact
from blueshift.pacing import AdaptiveRateLimiter, CircuitBreaker, backoff_delay, retry_after_seconds
from blueshift.state import StateStore

if TYPE_CHECKING:
    from airflow.sdk import Context

FLUSH_EVERY_SECONDS = 1.0
FLUSH_EVERY_OUTCOMES = 500


def as_bool(value: object, name: str) -> bool:
    """Return a param value as a bool; text such as ``"true"``/``"false"`` is accepted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise BlueshiftConfigError(f"Param {name!r} must be true or false, got {value!r}")


@dataclass
class ChunkProgress:
    """Counters of one chunk, shared by the sending threads."""

    total: int
    done: int = 0
    requests: int = 0
    throttled: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
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


class _KeyRefusedError(Exception):
    """Internal: Blueshift answered 401/403; carries the status for the task's error."""

    def __init__(self, status_code: int) -> None:
        super().__init__(status_code)
        self.status_code = status_code


class BlueshiftStartTrackingOperator(BaseOperator):
    """
    Start tracking every user of one chunk again: ``POST /api/v1/customers/unforget`` per user.

    The chunk's users are read from the state store's staging table (never from XCom), sent by up to
    ``max_in_flight`` threads over one keep-alive session, paced to ``rate_limit`` requests/s, and
    each outcome is written back to the staging table as it happens. Per the API contract:
    200 is ``succeeded``; 400/413/422 are ``rejected`` and never retried; 404/409/429/5xx, timeouts
    and dropped connections are retried with capped exponential backoff and full jitter, up to
    ``max_attempts`` per user, then ``failed``; 401/403 stop the chunk at once without Airflow retry.
    A chunk with ``failed`` users fails its task so Airflow's retries re-send only those users.

    :param chunk: the chunk descriptor made by the extract task (``chunk_id``, ``bucket_lo``,
        ``bucket_hi``, ``users``, ``label``).
    :param blueshift_conn_id: HTTP connection with the region host and the API key.
    :param state_conn_id: connection of the state store holding the staging table; when it is not
        defined, the warehouse holds it (if it can: see ``blueshift.connections.state_conn_id_for``).
    :param warehouse_conn_id: the warehouse connection.
    :param dry_run_enabled: mark the chunk ``dry_run`` without sending anything (templated; the
        DAG passes its ``dry_run`` param).
    :param rate_limit: the global budget in requests/s, shared with every other chunk task running
        (any run) through leases in the state store; this task spends ``rate_limit / tasks running``.
    :param max_in_flight: requests in flight at once.
    :param max_attempts: attempts per user inside the task, the first included.
    :param backoff_base_seconds: first backoff ceiling; it doubles per attempt.
    :param backoff_cap_seconds: largest backoff ceiling.
    :param connect_timeout: seconds to connect.
    :param read_timeout: seconds to wait for an answer.
    :param staging_table: the staging table holding the run's users.
    :param progress_interval: seconds between progress lines in the log.
    """

    template_fields: Sequence[str] = ("dry_run_enabled",)
    ui_color = "#2b6cb0"
    ui_fgcolor = "#ffffff"

    def __init__(
        self,
        *,
        chunk: dict[str, Any],
        blueshift_conn_id: str = BlueshiftHook.default_conn_name,
        state_conn_id: str = "blueshift_state",
        warehouse_conn_id: str = "warehouse_default",
        dry_run_enabled: bool | str = False,
        rate_limit: float = 50.0,
        max_in_flight: int = 16,
        max_attempts: int = 5,
        backoff_base_seconds: float = 0.5,
        backoff_cap_seconds: float = 30.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        staging_table: str = "blueshift_start_tracking_staging",
        progress_interval: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.blueshift_conn_id = blueshift_conn_id
        self.state_conn_id = state_conn_id
        self.warehouse_conn_id = warehouse_conn_id
        self.dry_run_enabled = dry_run_enabled
        self.rate_limit = rate_limit
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.staging_table = staging_table
        self.progress_interval = progress_interval

    def execute(self, context: Context) -> dict[str, Any]:
        dag_id = context["dag"].dag_id
        run_id = context["run_id"]
        chunk_id = str(self.chunk["chunk_id"])
        dry_run = as_bool(self.dry_run_enabled, "dry_run")
        store = StateStore(
            state_conn_id_for(self.state_conn_id, self.warehouse_conn_id), staging_table=self.staging_table
        )
        bucket_lo, bucket_hi = int(self.chunk["bucket_lo"]), int(self.chunk["bucket_hi"])
        if dry_run:
            marked = store.mark_chunk(dag_id, run_id, bucket_lo, bucket_hi, Status.DRY_RUN.value)
            self.log.info("Chunk %s: dry run, %d users marked dry_run, nothing sent", chunk_id, marked)
            progress = ChunkProgress(total=marked, done=marked, by_status={Status.DRY_RUN.value: marked})
            return self._summary(progress)
        users = store.load_chunk(dag_id, run_id, bucket_lo, bucket_hi)
        self.log.info("Chunk %s: %d users to send", chunk_id, len(users))
        progress = ChunkProgress(total=len(users))
        if not users:
            return self._summary(progress)

        hook = BlueshiftHook(
            self.blueshift_conn_id,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            pool_maxsize=self.max_in_flight,
        )
        limiter = AdaptiveRateLimiter(self.rate_limit)
        budget = SharedBudget(store, _holder(context), self.rate_limit)
        try:
            hook.get_conn()  # resolve the connection and key before any request
            budget.join(limiter)
            try:
                refused = self._send_all(hook, store, dag_id, run_id, users, progress, limiter, budget)
            finally:
                budget.leave()
        finally:
            hook.close()

        summary = self._summary(progress)
        self.log.info(
            "Chunk %s finished: %s in %d requests (%d throttled)",
            chunk_id,
            _format_counts(progress.by_status),
            progress.requests,
            progress.throttled,
        )
        if refused is not None:
            raise BlueshiftAuthError(
                f"Blueshift refused the API key (HTTP {refused}) of connection {self.blueshift_conn_id!r}: "
                "check that it holds a valid User API key for this account and region. "
                f"{summary['failed']} users of chunk {chunk_id} were not sent and are audited failed."
            )
        if summary["failed"]:
            raise BlueshiftChunkIncomplete(
                f"{summary['failed']} of {len(users)} users of chunk {chunk_id} still failed after "
                f"{self.max_attempts} attempts each; an Airflow retry re-sends only those users"
            )
        return summary

    def _send_all(
        self,
        hook: BlueshiftHook,
        store: StateStore,
        dag_id: str,
        run_id: str,
        users: list[tuple[str, str | None, str | None]],
        progress: ChunkProgress,
        limiter: AdaptiveRateLimiter,
        budget: SharedBudget,
    ) -> int | None:
        """Send every user at the task's share of the budget; return the 401/403 status if the key
        was refused, else None."""
        breaker = CircuitBreaker()
        stop = threading.Event()
        refused: list[int] = []
        pending: list[dict[str, Any]] = []
        last_flush = last_report = time.monotonic()
        started = last_report
        rng = random.Random()  # noqa: S311 - jitter, not cryptography

        def send(user: tuple[str, str | None, str | None]) -> dict[str, Any] | None:
            try:
                return self._send_one(hook, limiter, breaker, stop, user, progress, rng)
            except _KeyRefusedError as err:
                refused.append(err.status_code)
                stop.set()
                return None

        # A fixed set of sender threads pulling from a queue, rather than one future per user:
        # waiting on thousands of futures costs O(n) per wake-up, a CPU sink at 1,000 users/s.
        work: queue.SimpleQueue[tuple[str, str | None, str | None]] = queue.SimpleQueue()
        for user in users:
            work.put(user)
        results: queue.SimpleQueue[tuple[str, dict[str, Any] | None]] = queue.SimpleQueue()

        def sender() -> None:
            while True:
                try:
                    user = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put((user[0], send(user)))
                except BaseException:
                    results.put((user[0], None))
                    raise

        threads = [
            threading.Thread(target=sender, name=f"blueshift-{n}", daemon=True)
            for n in range(min(self.max_in_flight, len(users)))
        ]
        for thread in threads:
            thread.start()
        remaining = {user[0] for user in users}
        received = 0
        while received < len(users):
            try:
                key, outcome = results.get(timeout=min(FLUSH_EVERY_SECONDS, budget.refresh_every))
            except queue.Empty:
                pass
            else:
                received += 1
                if outcome is not None:
                    remaining.discard(key)
                    pending.append(outcome)
                    progress.count_outcome(outcome["status"])
            budget.refresh(limiter)
            now = time.monotonic()
            if len(pending) >= FLUSH_EVERY_OUTCOMES or (pending and now - last_flush >= FLUSH_EVERY_SECONDS):
                store.record_outcomes(dag_id, run_id, pending)
                pending, last_flush = [], now
            if now - last_report >= self.progress_interval:
                self._report(progress, now - started, limiter)
                last_report = now
        for thread in threads:
            thread.join()
        if refused:
            reason = f"not sent: Blueshift refused the API key (HTTP {refused[0]})"
            for key in remaining:
                pending.append(_outcome(key, Status.FAILED, refused[0], 0, reason))
                progress.count_outcome(Status.FAILED.value)
        store.record_outcomes(dag_id, run_id, pending)
        self._report(progress, time.monotonic() - started, limiter)
        return refused[0] if refused else None

    def _send_one(
        self,
        hook: BlueshiftHook,
        limiter: AdaptiveRateLimiter,
        breaker: CircuitBreaker,
        stop: threading.Event,
        user: tuple[str, str | None, str | None],
        progress: ChunkProgress,
        rng: random.Random,
    ) -> dict[str, Any] | None:
        """Send one user with bounded retries; return its outcome, or None if the chunk was stopped."""
        key, customer_id, email = user
        payload = {name: value for name, value in (("customer_id", customer_id), ("email", email)) if value}
        http_status: int | None = None
        error: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            if stop.is_set():
                return None
            limiter.acquire()
            if stop.is_set():
                return None
            retry_after: float | None = None
            try:
                response = hook.start_tracking(payload)
            except (requests.Timeout, requests.ConnectionError) as err:
                progress.count_request(None)
                http_status, error = None, f"{type(err).__name__} (attempt {attempt})"
            else:
                http_status = response.status_code
                progress.count_request(http_status)
                verdict = classify(http_status)
                if verdict is Verdict.OK:
                    limiter.on_success()
                    breaker.record_success()
                    return _outcome(key, Status.SUCCEEDED, http_status, attempt, None)
                if verdict is Verdict.AUTH:
                    raise _KeyRefusedError(http_status)
                if verdict is Verdict.REJECT:
                    breaker.record_success()
                    reason = redact(f"HTTP {http_status}: {response.text}")
                    return _outcome(key, Status.REJECTED, http_status, attempt, reason)
                if http_status == 429:
                    limiter.on_throttled()
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                error = redact(f"HTTP {http_status}: {response.text}")
            pause = breaker.record_failure()
            if pause:
                self.log.warning("Circuit open after repeated transient failures: pausing %.1f s", pause)
                limiter.pause(pause)
            if attempt < self.max_attempts:
                delay = backoff_delay(
                    attempt, base=self.backoff_base_seconds, cap=self.backoff_cap_seconds, rng=rng
                )
                if retry_after is not None:
                    delay = max(delay, retry_after)
                if stop.wait(delay):
                    return None
        return _outcome(key, Status.FAILED, http_status, self.max_attempts, f"gave up: {error}")

    def _report(self, progress: ChunkProgress, elapsed: float, limiter: AdaptiveRateLimiter) -> None:
        self.log.info(
            "Sent %d of %d users (%.1f req/s, pace %.1f/s of a %.1f/s share, %d throttled, %d requests)",
            progress.done,
            progress.total,
            progress.requests / elapsed if elapsed > 0 else 0.0,
            limiter.rate,
            limiter.max_rate,
            progress.throttled,
            progress.requests,
        )

    def _summary(self, progress: ChunkProgress) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "chunk_id": str(self.chunk["chunk_id"]),
            "plan": self.chunk.get("plan"),
            "users": progress.total,
        }
        for status in (Status.SUCCEEDED, Status.REJECTED, Status.FAILED, Status.DRY_RUN):
            summary[status.value] = progress.by_status.get(status.value, 0)
        summary["requests"] = progress.requests
        summary["throttled"] = progress.throttled
        return summary


def _outcome(
    key: str, status: Status, http_status: int | None, attempts: int, error: str | None
) -> dict[str, Any]:
    return {
        "user_key": key,
        "status": status.value,
        "http_status": http_status,
        "attempts": attempts,
        "error": error,
    }


def _holder(context: Any) -> str:
    """Return a unique id of this task try, for its budget lease."""
    ti = context.get("ti")
    if ti is None:
        return f"{context['run_id']}/{uuid.uuid4().hex}"
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}/{ti.try_number}"


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "nothing"
