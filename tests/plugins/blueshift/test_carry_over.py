"""Failed users carry over to later scheduled runs; re-runs skip what already succeeded."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from blueshift.pipeline import audit_run, extract_and_stage
from blueshift.settings import Settings
from sandbox.demo_warehouse import seed_source

DAG_ID = "blueshift_start_tracking"


def day(n: int) -> datetime:
    return datetime(2026, 11, n, tzinfo=timezone.utc)


@pytest.fixture
def settings(warehouse_db, monkeypatch) -> Settings:
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", warehouse_db.conn_json)
    return Settings.from_env({"BLUESHIFT_MAX_ACTIVE_CHUNKS": "1"})


def run_window(settings: Settings, run_id: str, start: datetime, outcomes: dict[str, str], **kwargs):
    """Extract a window, give each pending user the outcome named for its customer_id, audit it."""
    from blueshift.pipeline import state_store_from

    prepared = extract_and_stage(
        settings=settings,
        dag_id=DAG_ID,
        run_id=run_id,
        window_start=start,
        window_end=start + timedelta(days=1),
        chunk_size=500,
        **kwargs,
    )
    store = state_store_from(settings)
    with store.engine.connect() as conn:
        pending = conn.execute(
            sa.text(
                "SELECT user_key, customer_id FROM blueshift_start_tracking_staging "
                "WHERE run_id = :run_id AND status = 'pending'"
            ),
            {"run_id": run_id},
        ).all()
    store.record_outcomes(
        DAG_ID,
        run_id,
        [
            {"user_key": key, "status": outcomes[cid], "http_status": 200, "attempts": 1, "error": None}
            for key, cid in pending
        ],
    )
    chunks = prepared.pop("chunks")
    prepared["chunks"] = len(chunks)
    summary = audit_run(
        settings=settings, dag_id=DAG_ID, run_id=run_id, prepared=prepared, finished_chunks=len(chunks)
    )
    return prepared, summary, {cid for _, cid in pending}


def audit_by_window(url: str) -> dict[tuple[str, str], str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT window_start, customer_id, status FROM blueshift_start_tracking_audit")
        ).all()
    engine.dispose()
    return {(str(start)[:10], cid): status for start, cid, status in rows}


def test_failed_users_are_retried_by_a_later_run_within_the_horizon(warehouse_db, settings):
    seed_source(
        warehouse_db.url,
        [
            ("OLD", None, "2026-11-10 10:00:00"),
            ("A", None, "2026-11-20 10:00:00"),
            ("B", None, "2026-11-20 11:00:00"),
            ("C", None, "2026-11-20 12:00:00"),
            ("C", None, "2026-11-21 09:00:00"),
            ("D", None, "2026-11-21 10:00:00"),
        ],
    )
    run_window(settings, "r-old", day(10), {"OLD": "failed"})
    run_window(settings, "r-20", day(20), {"A": "succeeded", "B": "failed", "C": "failed"})

    prepared, summary, sent = run_window(
        settings,
        "r-21",
        day(21),
        {"B": "succeeded", "C": "succeeded", "D": "succeeded"},
        carry_over_since=day(21) - timedelta(days=7),
    )

    assert sent == {"B", "C", "D"}, "C is sent once although it failed on the 20th and is in the 21st"
    assert prepared["carried_over"] == 1
    audit = audit_by_window(warehouse_db.url)
    assert audit[("2026-11-20", "B")] == "succeeded"
    assert audit[("2026-11-20", "C")] == "succeeded", "its original window's row says so"
    assert audit[("2026-11-21", "C")] == "succeeded"
    assert audit[("2026-11-10", "OLD")] == "failed", "older than the horizon: stays failed"
    assert summary["failed"] == 0
    assert summary["users"] == summary["audited"] == 3


def test_rerun_skips_succeeded_unless_forced(warehouse_db, settings):
    seed_source(warehouse_db.url, [("A", None, "2026-11-20 10:00:00"), ("B", None, "2026-11-20 11:00:00")])
    run_window(settings, "r-1", day(20), {"A": "succeeded", "B": "failed"})

    prepared, summary, sent = run_window(settings, "r-2", day(20), {"B": "succeeded"})
    assert sent == {"B"}
    assert prepared["already_succeeded"] == 1
    assert summary["succeeded"] == 2

    _, _, sent = run_window(settings, "r-3", day(20), {"A": "succeeded", "B": "succeeded"}, force=True)
    assert sent == {"A", "B"}
