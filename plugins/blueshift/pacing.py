"""Client-side pacing: Blueshift sends no rate headers, so the client keeps to its budget itself."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_SECONDS = 120.0
"""A longer Retry-After is cut to this: the task's own attempts and Airflow's retries take over."""


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Return the wait a ``Retry-After`` header asks for, or None if there is none or it is unreadable.

    RFC 9110 allows both forms: a number of seconds (``120``) and an HTTP date
    (``Wed, 21 Oct 2026 07:28:00 GMT``). Blueshift sends none today; honouring one costs nothing.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:  # an HTTP date is always GMT; obsolete forms may omit the zone
            moment = moment.replace(tzinfo=timezone.utc)
        seconds = (moment - (now or datetime.now(timezone.utc))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Return the wait before retry number ``attempt`` (1-based): capped exponential, full jitter."""
    return rng.uniform(0.0, min(cap, base * (2 ** (attempt - 1))))


MIN_LATENESS_TOLERANCE_SECONDS = 0.005
"""A sender woken this late (or half an interval, if more) keeps the schedule: ordinary wake-up lag."""
MAX_SLEEP_STEP_SECONDS = 0.1


class AdaptiveRateLimiter:
    """
    Space requests evenly at a rate that never exceeds ``max_rate`` requests/s, shared by threads.

    One thread at a time waits for the next send time, ``1 / rate`` after the previous send, with
    the rate read when it is due; the others queue behind it. So no send time is handed out ahead:
    when the rate drops (a 429, or a smaller share of the budget because another task joined) the
    very next request already keeps the new spacing. (Slots handed out ahead, one per waiting
    thread, would keep up to a second of sends at the old rate: a burst above the budget each time
    a task joins.) A sender woken a little late keeps the schedule; one woken long after its time
    (the process was starved of CPU) does not catch up, so overdue requests never go out together.
    The rate adapts like TCP's congestion window: a 429 halves it (down to ``min_rate``), each
    success adds back ``max_rate / 50`` (so full speed returns within about 50 good answers).

    Send times sit on a grid of the wall clock, ``phase`` of an interval after each multiple of
    the interval: chunk tasks that share a budget at equal rates, each with its own phase (its rank
    among them, see ``blueshift.budget``), interleave their requests evenly instead of bunching, so
    a clock second holds no more requests than the budget, on any host whose clock is in sync.

    A plain token bucket would allow bursts above the budget after idle time; this does not.
    """

    def __init__(
        self,
        max_rate: float,
        *,
        min_rate: float | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be greater than 0")
        self.max_rate = max_rate
        self.min_rate = min_rate if min_rate is not None else max(max_rate / 64, 0.2)
        self.rate = max_rate
        self._clock = clock
        self._sleep = sleep
        self._last_sent: float | None = None
        self._lock = threading.Lock()
        self._turn = threading.Lock()
        self._paused_until = 0.0
        self.phase = 0.0

    def _slot_at_or_after(self, moment: float, interval: float) -> float:
        """Return the first send time of this limiter's grid at or after ``moment``."""
        offset = self.phase * interval
        # A thousandth of an interval of slack: at wall-clock magnitudes (1.8e9 s) the division's
        # rounding is about 1e-4 of an interval, and must not push a send time one slot later.
        return offset + math.ceil((moment - offset) / interval - 1e-3) * interval

    def acquire(self) -> None:
        """Block until this caller may send one request."""
        with self._turn:
            while True:
                with self._lock:
                    now = self._clock()
                    interval = 1.0 / self.rate
                    if self._last_sent is None or now < self._last_sent - interval:
                        # The first request (or the wall clock was set back): the grid's next slot.
                        self._last_sent = self._slot_at_or_after(now, interval) - interval
                    due = self._slot_at_or_after(
                        max(self._last_sent + interval, self._paused_until), interval
                    )
                    if now >= due:
                        late = now - due
                        tolerance = max(0.5 * interval, MIN_LATENESS_TOLERANCE_SECONDS)
                        self._last_sent = due if late <= tolerance else now
                        return
                # Sleep in short steps so that a change of rate or a pause applies while waiting.
                self._sleep(min(due - now, MAX_SLEEP_STEP_SECONDS))

    def set_max_rate(self, max_rate: float) -> None:
        """Change the ceiling (this task's share of a shared budget); the pace scales with it."""
        with self._lock:
            if max_rate <= 0 or max_rate == self.max_rate:
                return
            self.rate = max(self.min_rate, min(max_rate, self.rate * max_rate / self.max_rate))
            self.max_rate = max_rate

    def set_phase(self, phase: float) -> None:
        """Place the send times ``phase`` (0 to 1) of an interval after the grid's multiples."""
        with self._lock:
            self.phase = phase % 1.0

    def on_success(self) -> None:
        """Recover additively after a good answer."""
        with self._lock:
            self.rate = min(self.max_rate, self.rate + self.max_rate / 50)

    def on_throttled(self) -> None:
        """Slow down multiplicatively after a 429."""
        with self._lock:
            self.rate = max(self.min_rate, self.rate / 2)

    def pause(self, seconds: float) -> None:
        """Hold every caller back for ``seconds`` (a Retry-After, or an open circuit)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)


class CircuitBreaker:
    """
    Stop spending attempts during a storm of 429s or 5xx.

    After ``threshold`` transient failures in a row the circuit opens: callers wait ``cooldown``
    seconds (doubling on each re-open, up to ``max_cooldown``) before the next request, instead of
    each burning its bounded attempts against a server that is down. One success closes it.
    """

    def __init__(self, *, threshold: int = 20, cooldown: float = 2.0, max_cooldown: float = 30.0) -> None:
        self.threshold = threshold
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.cooldown = cooldown
        self.opened = 0
        self._consecutive = 0
        self._lock = threading.Lock()

    def record_success(self) -> None:
        """Close the circuit."""
        with self._lock:
            self._consecutive = 0
            self.cooldown = self.base_cooldown

    def record_failure(self) -> float:
        """Count a transient failure; return seconds to pause everyone (0 while the circuit is closed)."""
        with self._lock:
            self._consecutive += 1
            if self._consecutive < self.threshold:
                return 0.0
            self._consecutive = 0
            self.opened += 1
            pause = self.cooldown
            self.cooldown = min(self.max_cooldown, self.cooldown * 2)
            return pause
