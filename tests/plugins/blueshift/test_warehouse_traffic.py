"""What the warehouse sees per run: a fixed set of statements, whatever the number of chunks or users.

A cloud warehouse bills, locks and rate-limits per statement: the chunk tasks' many small writes
(outcomes, budget leases) go to the state store, and the warehouse receives only the extract, one
read of the audit and the publish. Every statement the warehouse engine runs is counted here, over
the real extract, the real chunk tasks sending to the stand-in, and the real audit.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from blueshift.operators import BlueshiftStartTrackingOperator
from blueshift.pipeline import audit_run, extract_and_stage
from blueshift.settings import Settings
from sandbox.demo_warehouse import seed_source
from tests.conftest import API_KEY, FIGURES
from tests.dags.conftest import users_of_day

DAG_ID = "blueshift_start_tracking"
WINDOW = (datetime(2026, 11, 24, tzinfo=timezone.utc), datetime(2026, 11, 25, tzinfo=timezone.utc))
CHUNK_USERS = 20


class StatementCounter:
    """Count the statements (cursor executions; one per executemany batch) sent to one database file."""

    def __init__(self, database: Path) -> None:
        self.database = str(database)
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if conn.engine.url.database == self.database:
            self.statements.append(" ".join(statement.split())[:60])


def run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, standin: Any, chunks: int) -> list[str]:
    warehouse_db, state_db = tmp_path / f"warehouse-{chunks}.db", tmp_path / f"state-{chunks}.db"
    seed_source(f"sqlite:///{warehouse_db}", users_of_day("2026-11-24", chunks * CHUNK_USERS))
    monkeypatch.setenv(
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT", json.dumps({"conn_type": "sqlite", "host": str(warehouse_db)})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_STATE", json.dumps({"conn_type": "sqlite", "host": str(state_db)})
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
        json.dumps({"conn_type": "http", "host": standin.url, "login": API_KEY}),
    )
    settings = Settings.from_env({"BLUESHIFT_MAX_ACTIVE_CHUNKS": "1", "BLUESHIFT_MAX_CHUNKS": "1024"})
    counter = StatementCounter(warehouse_db)
    sa.event.listen(Engine, "before_cursor_execute", counter)
    try:
        run_id = f"manual__{chunks}"
        prepared = extract_and_stage(
            settings=settings,
            dag_id=DAG_ID,
            run_id=run_id,
            window_start=WINDOW[0],
            window_end=WINDOW[1],
            chunk_size=CHUNK_USERS,
        )
        planned = prepared.pop("chunks")
        assert abs(len(planned) - chunks) <= chunks // 10, len(planned)  # chunks are hash-bucket ranges
        prepared["chunks"] = len(planned)
        results = []
        for chunk in planned:
            operator = BlueshiftStartTrackingOperator(
                task_id="start_tracking", chunk=chunk, rate_limit=5_000.0, max_in_flight=8
            )
            context: Any = {"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": run_id}
            results.append(operator.execute(context))
        summary = audit_run(
            settings=settings, dag_id=DAG_ID, run_id=run_id, prepared=prepared, finished_chunks=len(results)
        )
    finally:
        sa.event.remove(Engine, "before_cursor_execute", counter)
    assert summary["succeeded"] == chunks * CHUNK_USERS
    return counter.statements


def test_warehouse_statements_do_not_grow_with_chunks_or_users(tmp_path, monkeypatch, standin):
    small = run_once(tmp_path, monkeypatch, standin, chunks=20)
    large = run_once(tmp_path, monkeypatch, standin, chunks=200)
    assert standin.state.requests == 220 * CHUNK_USERS
    # 400 and 4,000 users both fit one batch of the scratch load: the same statements, one for one.
    assert len(large) == len(small), (small, large)
    # The README's figure: create the audit table, check its columns, extract, read the audit once,
    # create the scratch table, load it (one batch), upsert, count, drop the scratch table.
    assert len(small) == 9, small
    assert not [statement for statement in small if "leases" in statement or "staging" in statement]
    FIGURES.append(f"warehouse statements per run, 20 or 200 chunks: {len(small)}")
