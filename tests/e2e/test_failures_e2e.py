"""Failures on a real Airflow: a chunk task killed mid-chunk, and a pool that does not exist."""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from sandbox.airflow_stack import AirflowStack
from sandbox.demo_warehouse import seed_source
from tests.conftest import FIGURES
from tests.dags.conftest import audit_rows, users_of_day
from tests.e2e.conftest import pipeline_env

DAG_ID = "blueshift_start_tracking"


def _stack(warehouse, standin, **settings: str) -> AirflowStack:
    env = pipeline_env(
        warehouse.conn_json,
        standin.url,
        BLUESHIFT_BACKOFF_BASE_SECONDS="0.01",
        BLUESHIFT_BACKOFF_CAP_SECONDS="0.05",
        BLUESHIFT_RETRY_DELAY_SECONDS="1",
        **settings,
    )
    return AirflowStack(env, pool_slots=int(settings.get("BLUESHIFT_POOL_SLOTS", "4")))


CRASH_RATE = 40
"""The crash stack's budget (requests/s); with one pool slot, its only chunk task's pace."""
CRASH_IN_FLIGHT = 8
"""The crash stack's BLUESHIFT_MAX_IN_FLIGHT."""


def _unrecorded_at_most() -> int:
    """The most users a killed try can have sent without recording them: what is in flight, plus
    the outcomes waiting for the next flush to the staging table (one flush interval at the task's
    pace; the loop checks for a flush at least every budget refresh, so that long again at most)."""
    from blueshift.budget import SharedBudget
    from blueshift.sender import FLUSH_EVERY_SECONDS

    refresh = inspect.signature(SharedBudget).parameters["refresh_every"].default
    return CRASH_IN_FLIGHT + math.ceil(CRASH_RATE * (FLUSH_EVERY_SECONDS + min(FLUSH_EVERY_SECONDS, refresh)))


@pytest.fixture
def crash_stack(postgres_warehouse, standin) -> Iterator[AirflowStack]:
    stack = _stack(
        postgres_warehouse,
        standin,
        BLUESHIFT_RATE_LIMIT=str(CRASH_RATE),
        BLUESHIFT_MAX_IN_FLIGHT=str(CRASH_IN_FLIGHT),
        BLUESHIFT_POOL_SLOTS="1",
        BLUESHIFT_TASK_RETRIES="2",
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


def _sending_pids(port: int) -> set[int]:
    """PIDs of processes with an open connection to the stand-in: the chunk task sending."""
    pids = set()
    for connection in psutil.net_connections(kind="tcp"):
        if (
            connection.raddr
            and connection.raddr.port == port
            and connection.pid
            and connection.pid != os.getpid()
        ):
            pids.add(connection.pid)
    return pids


def _manual_window() -> tuple[str, str]:
    """Return a past day and the logical date of the manual run that covers it.

    Unpausing creates the scheduled run of yesterday; a manual run with the same logical date at the
    same moment makes the scheduler fail on a unique key, so the manual run is a month back, computed
    from today so that the test holds on any day.
    """
    logical = datetime.now(timezone.utc).date() - timedelta(days=30)
    return (logical - timedelta(days=1)).isoformat(), f"{logical.isoformat()}T00:00:00Z"


def test_chunk_killed_mid_chunk_is_finished_by_airflow_retry(crash_stack, postgres_warehouse, standin):
    window, logical_date = _manual_window()
    users = users_of_day(window, 200)
    seed_source(postgres_warehouse.url, users)
    crash_stack.wait_for_dag(DAG_ID)
    crash_stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    run = crash_stack.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        json={"logical_date": logical_date, "conf": {"chunk_size": 200}},
    )
    port = int(standin.url.rsplit(":", 1)[1])
    # Kill at twice what a killed try can leave unrecorded, so that a retry that re-sent the whole
    # killed try (all it had sent, at least 2 * bound) fails the bound below.
    bound = _unrecorded_at_most()
    kill_after = 2 * bound
    assert kill_after < len(users)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and standin.state.requests < kill_after:
        time.sleep(0.05)
    assert standin.state.requests >= kill_after, crash_stack.logs_tail()
    victims = _sending_pids(port)
    assert victims, "the chunk task's process was found by its connection to the stand-in"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed_at = standin.state.requests
    assert killed_at < len(users), "killed mid-chunk"

    finished = crash_stack.wait_for_runs(DAG_ID, {run["dag_run_id"]}, timeout=400)
    assert finished[0]["state"] == "success", crash_stack.logs_tail()
    tries = [
        ti["try_number"]
        for ti in crash_stack.task_instances(DAG_ID, run["dag_run_id"])
        if ti["task_id"] == "start_tracking"
    ]
    assert tries == [2], "Airflow's retry finished the chunk"
    rows = audit_rows(postgres_warehouse.url)
    assert len(rows) == len(users)
    assert Counter(row["status"] for row in rows) == {"succeeded": len(users)}
    applied = Counter(user["customer_id"] for user in standin.state.snapshot()["applied"])
    assert set(applied) == {row[0] for row in users}
    resent = sum(count - 1 for count in applied.values())
    FIGURES.append(
        f"SIGKILL after {killed_at} requests: {len(users)} users audited succeeded, "
        f"{resent} re-sent by retry (at most {bound})"
    )
    assert resent <= bound, (
        f"the retry re-sent {resent} users of the {killed_at} the killed try had sent: more than it can "
        f"have left unrecorded ({bound})"
    )


@pytest.fixture
def missing_pool_stack(postgres_warehouse, standin, tmp_path) -> Iterator[tuple[AirflowStack, Path]]:
    alert = tmp_path / "alert.txt"
    stack = _stack(
        postgres_warehouse,
        standin,
        BLUESHIFT_POOL="blueshift_pool_nobody_created",
        BLUESHIFT_RUN_TIMEOUT_MINUTES="1",
        BLUESHIFT_ALERT_NOTIFIER="tests.dags.notifier.FileNotifier",
        BLUESHIFT_ALERT_NOTIFIER_KWARGS=json.dumps({"path": str(alert), "text": "{subject}\n{message}"}),
    )
    try:
        yield stack.start(), alert
    finally:
        stack.stop()


def test_missing_pool_fails_the_run_with_an_alert_that_names_the_fix(
    missing_pool_stack, postgres_warehouse, standin
):
    stack, alert = missing_pool_stack
    window, logical_date = _manual_window()
    seed_source(postgres_warehouse.url, users_of_day(window, 20))
    stack.wait_for_dag(DAG_ID)
    stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    run = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": logical_date})

    finished = stack.wait_for_runs(DAG_ID, {run["dag_run_id"]}, timeout=240)
    assert finished[0]["state"] == "failed"
    assert standin.state.requests == 0, "nothing is sent"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not alert.exists():
        time.sleep(1)
    text = alert.read_text()
    assert "timed_out" in text
    assert "airflow pools set blueshift_pool_nobody_created" in text
