"""The ``blueshift.*`` metrics reach a StatsD server through Airflow's own StatsD channel.

A separate Python process sets the channel up from ``[metrics]`` the way Airflow's task runner does
(``stats.initialize`` with Airflow's stats factory), publishes a chunk's counters and a run's counts,
and the test reads the datagrams on a UDP socket of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT

PUBLISHER = textwrap.dedent(
    """
    from airflow.sdk._shared.observability.metrics import stats
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability.metrics import stats_utils

    from blueshift.metrics import ChunkMetrics, publish_run
    from blueshift.sender import ChunkProgress

    # What airflow.sdk.execution_time.task_runner.main does before it runs a task.
    stats.initialize(
        factory=stats_utils.get_stats_factory(),
        export_legacy_names=conf.getboolean("metrics", "legacy_names_on"),
    )
    metrics = ChunkMetrics()
    progress = ChunkProgress(10, done=4, requests=6, throttled=2, by_status={"succeeded": 4})
    metrics.publish(progress, pace=12.5, circuit_opened=0)
    progress.requests, progress.done, progress.by_status = 11, 9, {"succeeded": 8, "rejected": 1}
    metrics.publish(progress, pace=25.0, circuit_opened=1)
    publish_run({"succeeded": 8, "rejected": 1, "invalid": 3, "failed": 0})
    """
)


def _datagrams(sock: socket.socket, until: float) -> list[str]:
    lines: list[str] = []
    while time.monotonic() < until:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            continue
        lines.extend(data.decode().splitlines())
    return lines


def test_metrics_reach_statsd_with_airflows_prefix():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        port = sock.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT)]),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        }
        result = subprocess.run(
            [sys.executable, "-c", PUBLISHER],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Could not configure StatsClient" not in result.stdout + result.stderr
        lines = _datagrams(sock, time.monotonic() + 2)

    counters: dict[str, int] = {}
    gauges: list[tuple[str, float]] = []
    for line in lines:
        name, _, rest = line.partition(":")
        value, _, kind = rest.partition("|")
        if kind.startswith("c"):
            counters[name] = counters.get(name, 0) + int(value)
        elif kind.startswith("g"):
            gauges.append((name, float(value)))
    assert counters == {
        "airflow.blueshift.requests": 11,
        "airflow.blueshift.throttled": 2,
        "airflow.blueshift.outcomes.succeeded": 8,
        "airflow.blueshift.outcomes.rejected": 1,
        "airflow.blueshift.circuit_opened": 1,
        "airflow.blueshift.run.succeeded": 8,
        "airflow.blueshift.run.rejected": 1,
        "airflow.blueshift.run.invalid": 3,
    }, lines
    assert gauges == [("airflow.blueshift.pace", 12.5), ("airflow.blueshift.pace", 25.0)], lines
