"""The whole DAG on every warehouse engine that runs here: the same dirty data, the same audit.

SQLite and PostgreSQL hold the working state themselves; MariaDB keeps it too, and DuckDB (one
writer process at a time) gets its state store on PostgreSQL, as a cloud warehouse would. Each run
is followed by a second run of the same window, a dry run, and a retried audit.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import pytest

from sandbox.demo_warehouse import seed_source
from tests.dags.conftest import audit_rows, users_of_day
from tests.dags.test_dag_runs import DIRTY

ENGINES = ["sqlite", "postgres", "mariadb", "duckdb"]


@pytest.fixture(params=ENGINES)
def engine_under_test(request: pytest.FixtureRequest, tmp_path) -> tuple[Any, dict[str, str]]:
    """Return the warehouse and the extra settings (the state store's connection) of one engine."""
    kind = request.param
    warehouse = request.getfixturevalue(
        {"sqlite": "sqlite_warehouse", "postgres": "postgres_warehouse"}.get(kind, f"{kind}_warehouse")
    )
    settings: dict[str, str] = {}
    if kind == "duckdb":
        settings["AIRFLOW_CONN_BLUESHIFT_STATE"] = request.getfixturevalue("postgres_state_store")
    return warehouse, settings


def test_the_same_audit_on_every_warehouse(engine_under_test, standin, run_dag):
    warehouse, settings = engine_under_test
    clean = users_of_day("2026-11-24", 60)
    outside = [("CUST-BEFORE", None, "2026-11-23 23:59:59"), ("CUST-AFTER", None, "2026-11-25 00:00:00")]
    seed_source(warehouse.url, clean + [(c, e, "2026-11-24 12:00:00") for c, e in DIRTY] + outside)
    standin.state.config.fixed = {clean[0][0]: 422, clean[1][0]: 503}

    first = run_dag(warehouse, standin, logical_date=datetime(2026, 11, 25), settings=settings)

    users = len(clean) + len(DIRTY) - 1  # the duplicate collapses
    rows = audit_rows(warehouse.url)
    statuses = Counter(row["status"] for row in rows)
    assert len(rows) == users, "one row per customer: the conservation check"
    assert len({(str(row["window_start"]), row["user_key"]) for row in rows}) == users
    assert statuses == {"succeeded": users - 6, "invalid": 4, "rejected": 1, "failed": 1}
    assert first.state == "failed", "a customer ended failed"
    assert {(row["customer_id"], row["email"]) for row in rows if row["status"] == "succeeded"} >= {
        ("CUST-TRIM", "mixed.case@example.com"),
        ("CUST-ÜNICODE", "jürgen@exämple.de"),
        ("x'); DROP TABLE reconsented_users;--", None),
    }
    failed_attempts = next(row["attempts"] for row in rows if row["customer_id"] == clean[1][0])
    sent_first = standin.state.requests

    # The same window again: only the failed and rejected customers are sent; attempts add up.
    standin.state.config.fixed = {}
    second = run_dag(warehouse, standin, logical_date=datetime(2026, 11, 25), settings=settings)
    assert second.state == "success", second.task_states
    assert standin.state.requests == sent_first + 2
    again = audit_rows(warehouse.url)
    assert len(again) == users
    rows = {row["customer_id"]: row for row in again}
    assert rows[clean[1][0]]["status"] == "succeeded"
    assert rows[clean[1][0]]["attempts"] == failed_attempts + 1

    # A dry run never overwrites a real outcome.
    dry = run_dag(
        warehouse, standin, logical_date=datetime(2026, 11, 25), settings=settings, conf={"dry_run": True}
    )
    assert dry.state == "success"
    after = {row["customer_id"]: row for row in audit_rows(warehouse.url)}
    assert {row["status"] for row in after.values()} == {"succeeded", "invalid"}
    assert after[clean[1][0]]["attempts"] == failed_attempts + 1
