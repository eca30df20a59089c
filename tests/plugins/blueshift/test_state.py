"""The state store's tables: created once, safely under concurrency, indexed for the chunk tasks' queries."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from blueshift.state import StateStore


def make(monkeypatch, warehouse_db, staging_table: str = "blueshift_start_tracking_staging") -> StateStore:
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", warehouse_db.conn_json)
    return StateStore("warehouse_default", staging_table=staging_table)


def index_names(warehouse: StateStore, table: str, schema: str | None = None) -> set[str]:
    return {index["name"] for index in sa.inspect(warehouse.engine).get_indexes(table, schema=schema)}


def test_chunk_queries_find_their_users_by_index(monkeypatch, warehouse_db):
    warehouse = make(monkeypatch, warehouse_db)
    warehouse.ensure_tables()
    assert "blueshift_start_tracking_staging_bucket" in index_names(
        warehouse, "blueshift_start_tracking_staging"
    )
    if warehouse.dialect == "sqlite":
        with warehouse.engine.connect() as conn:
            plan = " ".join(
                str(row[-1])
                for row in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN UPDATE blueshift_start_tracking_staging SET status = 'dry_run' "
                    "WHERE dag_id = 'd' AND run_id = 'r' AND bucket BETWEEN 0 AND 40 "
                    "AND status IN ('pending', 'failed')"
                )
            )
        assert "blueshift_start_tracking_staging_bucket" in plan, plan


def test_tables_are_created_once_when_runs_start_together(monkeypatch, warehouse_db):
    warehouse = make(monkeypatch, warehouse_db)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def create() -> None:
        try:
            start.wait()
            StateStore("warehouse_default", staging_table="blueshift_start_tracking_staging").ensure_tables()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert "blueshift_start_tracking_staging_bucket" in index_names(
        warehouse, "blueshift_start_tracking_staging"
    )


def test_schema_qualified_staging_table_gets_its_index(monkeypatch, postgres_warehouse):
    warehouse = make(monkeypatch, postgres_warehouse, staging_table="blueshift.staging")
    with warehouse.engine.begin() as conn:
        conn.exec_driver_sql("CREATE SCHEMA blueshift")
    warehouse.ensure_tables()
    warehouse.ensure_tables()  # a second run finds everything in place
    assert "staging_bucket" in index_names(warehouse, "staging", schema="blueshift")


def test_outcome_updates_find_each_user_by_primary_key(monkeypatch, postgres_warehouse):
    """After staging, the per-user UPDATE's generic plan uses the primary key, not the bucket index."""
    from datetime import datetime, timezone

    import pandas as pd

    from blueshift.validation import normalize

    warehouse = make(monkeypatch, postgres_warehouse)
    warehouse.ensure_tables()
    users = normalize(
        pd.DataFrame([(f"C-{n}", None) for n in range(5_000)], columns=["customer_id", "email"])
    )
    start, end = datetime(2026, 11, 24, tzinfo=timezone.utc), datetime(2026, 11, 25, tzinfo=timezone.utc)
    warehouse.stage(users, dag_id="d", run_id="r", window_start=start, window_end=end)
    warehouse.analyze()
    with warehouse.engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(
            "PREPARE outcome(text, text, text) AS UPDATE blueshift_start_tracking_staging "
            "SET status = 'succeeded' WHERE dag_id = $1 AND run_id = $2 AND user_key = $3"
        )
        plan = " ".join(row[0] for row in conn.exec_driver_sql("EXPLAIN EXECUTE outcome('d', 'r', 'k')"))
    assert "blueshift_start_tracking_staging_pkey" in plan, plan
