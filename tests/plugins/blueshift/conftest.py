"""Fixtures shared by the plugin tests."""

from __future__ import annotations

import pytest

from blueshift.warehouse import Warehouse


@pytest.fixture
def warehouse(monkeypatch, sqlite_warehouse) -> Warehouse:
    """A SQLite warehouse with the pipeline's tables, as the ``warehouse_default`` connection."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", sqlite_warehouse.conn_json)
    warehouse = Warehouse(
        "warehouse_default",
        audit_table="blueshift_start_tracking_audit",
        staging_table="blueshift_start_tracking_staging",
    )
    warehouse.ensure_tables()
    return warehouse
