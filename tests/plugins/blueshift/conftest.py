"""Fixtures shared by the plugin tests."""

from __future__ import annotations

import pytest

from blueshift.state import StateStore


@pytest.fixture
def store(monkeypatch, sqlite_warehouse) -> StateStore:
    """A SQLite state store with the pipeline's tables, on the ``warehouse_default`` connection."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", sqlite_warehouse.conn_json)
    store = StateStore("warehouse_default", staging_table="blueshift_start_tracking_staging")
    store.ensure_tables()
    return store
