"""What a whole run (``dag.test()``) shows of itself: the audit task's counts (XCom), the audit
table's asset event with the same counts, and the ``blueshift.*`` metrics, equal to what happened."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from sandbox.demo_warehouse import seed_source
from tests.dags.conftest import DAG_ID, audit_rows, users_of_day

AUDIT_ASSET_NAME = "blueshift_start_tracking_audit"


class RecordingStats:
    """Stands in for Airflow's ``Stats`` in the test process (``dag.test`` runs tasks in it)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: list[tuple[str, float]] = []

    def incr(self, stat: str, count: int = 1) -> None:
        self.counters[stat] += count

    def gauge(self, stat: str, value: float) -> None:
        self.gauges.append((stat, value))


@pytest.fixture
def stats(monkeypatch) -> RecordingStats:
    import blueshift.metrics

    recording = RecordingStats()
    monkeypatch.setattr(blueshift.metrics, "_stats", lambda: recording)
    return recording


def _audit_xcom(run_id: str, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=DAG_ID, run_id=run_id, task_id="audit", key=key).one()
        return XComModel.deserialize_value(row)


def _asset_events(run_id: str) -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetEvent.source_run_id == run_id, AssetModel.name == AUDIT_ASSET_NAME)
            .all()
        )
        return [{"task_id": row.source_task_id, "extra": dict(row.extra)} for row in rows]


def test_run_shows_its_counts_in_xcom_asset_event_and_metrics(sqlite_warehouse, standin, run_dag, stats):
    users = users_of_day("2026-11-20", 60)
    seed_source(sqlite_warehouse.url, [*users, ("", "", "2026-11-20 10:00:00")])
    standin.state.config.fixed = {users[n][1]: 422 for n in range(4)}
    standin.state.config.fault_rate = 0.15
    standin.state.config.faults = ["429", "500"]

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 21), conf={"chunk_size": 20})

    assert result.state == "success", result.task_states
    statuses = Counter(row["status"] for row in audit_rows(sqlite_warehouse.url))
    assert statuses == {"succeeded": 56, "rejected": 4, "invalid": 1}
    counts = _audit_xcom(result.run_id, "return_value")
    assert counts == {
        "window_start": "2026-11-20T00:00:00+00:00",
        "window_end": "2026-11-21T00:00:00+00:00",
        "users": 61,
        "succeeded": 56,
        "rejected": 4,
        "invalid": 1,
        "failed": 0,
        "dry_run": 0,
        "carried_over": 0,
        "already_succeeded": 0,
    }
    assert _asset_events(result.run_id) == [{"task_id": "audit", "extra": counts}]
    assert "@" not in json.dumps(counts)

    snapshot = standin.state.snapshot()
    sent = {name: n for name, n in stats.counters.items() if not name.startswith("blueshift.run.")}
    sent.pop("blueshift.circuit_opened", None)  # whether 15% faults open it is chance: see test_metrics
    assert sent == {
        "blueshift.requests": snapshot["requests"],
        "blueshift.throttled": snapshot["statuses"]["429"],
        "blueshift.outcomes.succeeded": 56,
        "blueshift.outcomes.rejected": 4,
    }
    assert snapshot["statuses"]["429"] > 0, "the faults drew no 429: the throttled counter is untested"
    assert {name: n for name, n in stats.counters.items() if name.startswith("blueshift.run.")} == {
        "blueshift.run.succeeded": 56,
        "blueshift.run.rejected": 4,
        "blueshift.run.invalid": 1,
    }
    assert stats.gauges and {name for name, _ in stats.gauges} == {"blueshift.pace"}


def test_failed_run_keeps_its_counts_but_updates_no_asset(sqlite_warehouse, standin, run_dag, stats):
    """A run with users left failed fails: its counts stay in audit's XCom ``summary``, no asset event."""
    users = users_of_day("2026-11-20", 30)
    seed_source(sqlite_warehouse.url, users)
    standin.state.config.fixed = {users[0][1]: 503}

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 21), conf={"chunk_size": 10})

    assert result.state == "failed"
    assert result.task_states["audit"] == ["failed"]
    summary = _audit_xcom(result.run_id, "summary")
    assert (summary["succeeded"], summary["failed"]) == (29, 1)
    assert _asset_events(result.run_id) == []
    assert stats.counters["blueshift.outcomes.failed"] == 1
    assert stats.counters["blueshift.run.failed"] == 1
