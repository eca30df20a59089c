"""Lineage: the audit table as an Airflow Asset, and OpenLineage datasets when the provider is there.

``audit`` declares ``audit_asset()`` as its outlet: each successful run adds an asset event
carrying the run's counts, and a downstream DAG scheduled on the asset starts after it::

    from blueshift.lineage import audit_asset
    from blueshift.settings import Settings

    @dag(schedule=[audit_asset(Settings.from_env())])
    def audit_report(): ...

(or ``schedule=[Asset.ref(name="blueshift_start_tracking_audit")]`` without importing the plugin).

With ``apache-airflow-providers-openlineage`` installed and a transport configured, the chunk task
reports the warehouse source as its input and the audit table as its output. Namespaces and names
follow OpenLineage's naming: ``postgres://host:port`` and ``database.schema.table``; a connection's
login and password never appear.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset

from blueshift.settings import Settings

ASSET_SCHEME = "x-blueshift-audit"
"""An ``x-`` scheme: Airflow keeps such an Asset URI as it is (no provider normalizes it)."""
DEFAULT_SCHEMAS = {"postgres": "public"}
"""The schema of an unqualified table, where the database has a fixed default."""


def audit_asset(settings: Settings) -> Asset:
    """Return the Asset of the audit table: named after the table, so stable across deployments."""
    return Asset(
        name=settings.audit_table,
        uri=f"{ASSET_SCHEME}://{settings.warehouse_conn_id}/{settings.audit_table}",
        group="blueshift",
    )


def source_tables(sql: str) -> list[str]:
    """Return the tables the extract query reads (``schema.table`` where it says so), sorted.

    Parsed by ``openlineage-sql``, which the OpenLineage provider installs: lineage needs nothing
    that only the tests have.
    """
    from openlineage_sql import parse

    tables = {
        ".".join(part for part in (table.schema, table.name) if part) for table in parse([sql]).in_tables
    }
    return sorted(tables)


def warehouse_namespace(conn_id: str) -> tuple[str, str | None, str | None]:
    """Return the warehouse's OpenLineage namespace, database and default schema (no credentials).

    The hook's own OpenLineage description where it has one (Postgres, MySQL), else
    ``<conn_type>://<host>[:port]`` (SQLite: the file's path).
    """
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    info = connection.get_hook().get_openlineage_database_info(connection)
    if info is not None:
        return f"{info.scheme}://{info.authority}", info.database, DEFAULT_SCHEMAS.get(info.scheme)
    authority = f"{connection.host or ''}{f':{connection.port}' if connection.port else ''}"
    return f"{connection.conn_type}://{authority}", None, None


def _dataset_name(table: str, database: str | None, schema: str | None) -> str:
    parts = table.split(".")
    if len(parts) == 1 and schema:
        parts.insert(0, schema)
    return ".".join([database, *parts] if database else parts)


def chunk_lineage(settings: Settings, warehouse_conn_id: str) -> Any:
    """Return the chunk task's OpenLineage: the extract's source tables in, the audit table out."""
    from airflow.providers.common.compat.openlineage.facet import Dataset
    from airflow.providers.openlineage.extractors import OperatorLineage

    from blueshift.pipeline import read_extract_sql

    namespace, database, schema = warehouse_namespace(warehouse_conn_id)
    inputs = [
        Dataset(namespace=namespace, name=_dataset_name(table, database, schema))
        for table in source_tables(read_extract_sql(settings.extract_sql_path))
    ]
    output = Dataset(namespace=namespace, name=_dataset_name(settings.audit_table, database, schema))
    return OperatorLineage(inputs=inputs, outputs=[output])
