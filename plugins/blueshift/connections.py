"""Resolve the SQL connections (warehouse, state store), failing at once on what no retry can fix.

``Connection.get_hook()`` raises Airflow's bare "Unknown hook type" when the connection's provider
is not installed, and Airflow would retry that, minutes apart. Here every such mistake becomes a
``BlueshiftConfigError`` (no retry) that names the package to install or the connection to fix.
"""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseHook

from blueshift.exceptions import BlueshiftConfigError

PROVIDER_OF_CONN_TYPE = {
    "postgres": "apache-airflow-providers-postgres",
    "sqlite": "apache-airflow-providers-sqlite",
    "mysql": "apache-airflow-providers-mysql",
    "duckdb": "airflow-provider-duckdb",
    "snowflake": "apache-airflow-providers-snowflake",
    "gcpbigquery": "apache-airflow-providers-google",
    "google_cloud_platform": "apache-airflow-providers-google",
    "redshift": "apache-airflow-providers-amazon",
    "databricks": "apache-airflow-providers-databricks",
    "mssql": "apache-airflow-providers-microsoft-mssql",
}
"""The provider package that brings the hook of each connection type the pipeline knows."""

STATE_STORE_CONN_TYPES = frozenset({"sqlite", "postgres", "mysql"})
"""Connection types that can hold the working state: transactional, many small writes, many writers."""


def get_connection(conn_id: str, role: str, example: str) -> Any:
    """Return the Airflow connection ``conn_id``, or raise an error that says how to create it."""
    try:
        return BaseHook.get_connection(conn_id)
    except Exception as err:  # Airflow raises AirflowNotFoundException, secrets backends others
        raise BlueshiftConfigError(
            f"{role} connection {conn_id!r} is not defined: create it, e.g. "
            f"AIRFLOW_CONN_{conn_id.upper()}='{example}'"
        ) from err


def connection_exists(conn_id: str) -> bool:
    """Return whether Airflow can find the connection ``conn_id``."""
    try:
        BaseHook.get_connection(conn_id)
    except Exception:  # not found, whatever the secrets backend raises for it
        return False
    return True


def sql_hook(connection: Any, role: str) -> Any:
    """Return the common-sql hook of ``connection``; a missing provider or non-SQL type fails at once."""
    conn_type = str(connection.conn_type or "")
    try:
        hook = connection.get_hook()
    except Exception as err:  # "Unknown hook type", or the provider's driver failing to import
        package = PROVIDER_OF_CONN_TYPE.get(conn_type)
        fix = (
            f"install {package} (pinned in requirements-warehouses.txt) in every Airflow image"
            if package
            else "use a connection type of an installed common-sql provider"
        )
        raise BlueshiftConfigError(
            f"{role} connection {connection.conn_id!r} has type {conn_type!r}, whose hook cannot be "
            f"loaded ({type(err).__name__}: {str(err)[:200]}): {fix}"
        ) from err
    if not hasattr(hook, "get_sqlalchemy_engine"):
        raise BlueshiftConfigError(
            f"{role} connection {connection.conn_id!r} has type {conn_type!r}, which is not a SQL "
            "database: use a common-sql connection type such as postgres, mysql, sqlite or snowflake"
        )
    return hook


def state_conn_id_for(state_conn_id: str, warehouse_conn_id: str) -> str:
    """Return the connection that holds the working state (staging, outcomes, budget leases).

    ``state_conn_id`` when it is defined; otherwise the warehouse itself, when it is a database
    made for many small concurrent writes (SQLite, PostgreSQL, MySQL/MariaDB). A cloud warehouse
    (Snowflake, BigQuery, Redshift, Databricks) or DuckDB must not be the working memory: its
    per-table DML locks and quotas would queue or fail the chunk tasks' writes, and the steady
    writes would keep a billed warehouse awake.
    """
    if connection_exists(state_conn_id):
        return state_conn_id
    warehouse = get_connection(warehouse_conn_id, "Warehouse", WAREHOUSE_EXAMPLE)
    if warehouse.conn_type in STATE_STORE_CONN_TYPES:
        return warehouse_conn_id
    raise BlueshiftConfigError(
        f"The warehouse connection {warehouse_conn_id!r} has type {warehouse.conn_type!r}, which cannot "
        f"hold the pipeline's working state, and the state connection {state_conn_id!r} is not "
        "defined: create it on a PostgreSQL database (e.g. one on the server of Airflow's metadata "
        f"DB): AIRFLOW_CONN_{state_conn_id.upper()}='{STATE_EXAMPLE}'"
    )


WAREHOUSE_EXAMPLE = json.dumps({"conn_type": "sqlite", "host": "/abs/warehouse.db"})
STATE_EXAMPLE = json.dumps(
    {"conn_type": "postgres", "host": "postgres", "schema": "blueshift_state", "login": "airflow"}
)
