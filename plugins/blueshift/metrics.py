"""The pipeline's metrics, sent through Airflow's own metrics channel (StatsD or OpenTelemetry).

Every name starts with ``blueshift.`` under Airflow's prefix (``[metrics] statsd_prefix`` or
``otel_prefix``, ``airflow`` by default), so ``airflow.blueshift.requests`` on a default StatsD:

- ``blueshift.requests``: HTTP requests sent to Blueshift (every attempt);
- ``blueshift.throttled``: of those, answered 429;
- ``blueshift.circuit_opened``: times the circuit breaker opened;
- ``blueshift.outcomes.<status>``: users sent, per final status (``succeeded``, ``rejected``,
  ``failed``, ``dry_run``), counted by the chunk tasks as the outcomes happen;
- ``blueshift.pace``: gauge, the requests/s a chunk task is pacing itself at right now;
- ``blueshift.run.<count>``: per run, from ``audit``: the audited statuses plus ``carried_over``
  and ``already_succeeded``.

Airflow's task runner sets the channel up from ``[metrics]`` (``statsd_on``, ``statsd_host``,
``statsd_port`` ... or ``otel_on``, ``otel_host`` ...); with neither on, every call is a no-op.
The chunk tasks publish the increase since their last publication at each progress line
(``BLUESHIFT_PROGRESS_INTERVAL``) and at the end, not one packet per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from blueshift.outcomes import AUDITED_STATUSES

if TYPE_CHECKING:
    from blueshift.sender import ChunkProgress

PREFIX = "blueshift"
"""The first part of every metric name, after Airflow's own prefix."""

RUN_COUNTS = (*(status.value for status in AUDITED_STATUSES), "carried_over", "already_succeeded")
"""The run's counts that ``audit`` publishes as ``blueshift.run.<count>``."""


def _stats() -> Any:
    # Airflow's metrics facade in the task SDK: the task runner initializes it from [metrics].
    from airflow.sdk.observability.stats import Stats

    return Stats


class ChunkMetrics:
    """Publish one chunk task's counters as increments since the previous publication."""

    def __init__(self, stats: Any = None) -> None:
        self._stats = stats
        self._published: dict[str, int] = {}

    def publish(self, progress: ChunkProgress, *, pace: float | None, circuit_opened: int) -> None:
        """Send the counters' increase since the last call, and the current pace as a gauge."""
        stats = self._stats or _stats()
        with progress.lock:
            current = {"requests": progress.requests, "throttled": progress.throttled}
            current.update({f"outcomes.{status}": n for status, n in progress.by_status.items()})
        current["circuit_opened"] = circuit_opened
        for name, value in current.items():
            increase = value - self._published.get(name, 0)
            if increase > 0:
                stats.incr(f"{PREFIX}.{name}", count=increase)
        self._published = current
        if pace is not None:
            stats.gauge(f"{PREFIX}.pace", round(pace, 3))


def publish_run(summary: Mapping[str, Any], stats: Any = None) -> None:
    """Send a run's counts (``audit``'s summary) as ``blueshift.run.<count>`` counters."""
    stats = stats or _stats()
    for name in RUN_COUNTS:
        count = int(summary.get(name) or 0)
        if count:
            stats.incr(f"{PREFIX}.run.{name}", count=count)
