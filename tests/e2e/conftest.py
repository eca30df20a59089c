"""Shared parts of the end-to-end tests: the pipeline's two connections and the default e2e stack."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sandbox.airflow_stack import AirflowStack
from tests.conftest import API_KEY

QUICK_SENDS = {
    "BLUESHIFT_RATE_LIMIT": "400",
    "BLUESHIFT_MAX_ACTIVE_CHUNKS": "4",
    "BLUESHIFT_BACKOFF_BASE_SECONDS": "0.01",
    "BLUESHIFT_BACKOFF_CAP_SECONDS": "0.05",
    "BLUESHIFT_MAX_ATTEMPTS": "3",
    "BLUESHIFT_TASK_RETRIES": "0",
    "BLUESHIFT_READ_TIMEOUT": "2",
}
"""Settings of the default e2e stack: a budget the stand-in never refuses, short backoffs, no retries."""


def pipeline_env(warehouse_conn_json: str, standin_url: str, **settings: str) -> dict[str, str]:
    """Return the environment of a stack: the only two connections the DAG needs, and ``settings``."""
    return {
        "AIRFLOW_CONN_WAREHOUSE_DEFAULT": warehouse_conn_json,
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT": json.dumps(
            {"conn_type": "http", "host": standin_url, "login": API_KEY}
        ),
        **settings,
    }


@pytest.fixture
def stack(postgres_warehouse, standin) -> Iterator[AirflowStack]:
    """A fresh Airflow with only the two connections (no pool), a PostgreSQL warehouse, the stand-in."""
    airflow = AirflowStack(pipeline_env(postgres_warehouse.conn_json, standin.url, **QUICK_SENDS))
    try:
        airflow.start()
        yield airflow
    finally:
        airflow.stop()
