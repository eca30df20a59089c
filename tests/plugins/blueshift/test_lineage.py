"""The audit table's Asset and the OpenLineage datasets of the chunk task (no credentials in them)."""

from __future__ import annotations

import json

import pytest

from blueshift.lineage import audit_asset, chunk_lineage, source_tables, warehouse_namespace
from blueshift.operators import BlueshiftStartTrackingOperator
from blueshift.settings import DEFAULT_EXTRACT_SQL, Settings

SECRET = "pg-secret-Zq81"


def test_audit_asset_is_named_after_the_audit_table():
    asset = audit_asset(Settings())
    assert (asset.name, asset.uri, asset.group) == (
        "blueshift_start_tracking_audit",
        "x-blueshift-audit://warehouse_default/blueshift_start_tracking_audit",
        "blueshift",
    )
    other = audit_asset(Settings(audit_table="reporting.consent_audit", warehouse_conn_id="dwh"))
    assert (other.name, other.uri) == (
        "reporting.consent_audit",
        "x-blueshift-audit://dwh/reporting.consent_audit",
    )


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        (DEFAULT_EXTRACT_SQL.read_text(), ["reconsented_users"]),
        (
            "WITH recent AS (SELECT * FROM crm.consents WHERE at >= :window_start AND at < :window_end) "
            "SELECT r.customer_id, p.email FROM recent r JOIN people p ON p.id = r.person_id",
            ["crm.consents", "people"],
        ),
    ],
)
def test_source_tables_are_read_from_the_extract_query(sql, tables):
    assert source_tables(sql) == tables


def test_postgres_namespace_follows_openlineage_naming_without_credentials(monkeypatch):
    conn = {"conn_type": "postgres", "host": "10.1.2.3", "port": 6543, "login": "etl", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_DWH", json.dumps({**conn, "schema": "analytics"}))
    assert warehouse_namespace("dwh") == ("postgres://10.1.2.3:6543", "analytics", "public")


def test_chunk_lineage_names_source_and_audit_table(monkeypatch, sqlite_warehouse):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", sqlite_warehouse.conn_json)
    path = json.loads(sqlite_warehouse.conn_json)["host"]
    lineage = chunk_lineage(Settings(audit_table="audit.outcomes"), "warehouse_default")
    assert [(d.namespace, d.name) for d in lineage.inputs] == [(f"sqlite://{path}", "reconsented_users")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [(f"sqlite://{path}", "audit.outcomes")]


def test_operator_reports_lineage_of_its_warehouse(monkeypatch):
    conn = {"conn_type": "postgres", "host": "db.internal", "login": "etl", "password": SECRET}
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", json.dumps({**conn, "schema": "dwh"}))
    operator = BlueshiftStartTrackingOperator(task_id="start_tracking", chunk={"chunk_id": "b000-fff"})
    lineage = operator.get_openlineage_facets_on_complete(None)
    names = [(d.namespace, d.name) for d in [*lineage.inputs, *lineage.outputs]]
    assert names == [
        ("postgres://db.internal:5432", "dwh.public.reconsented_users"),
        ("postgres://db.internal:5432", "dwh.public.blueshift_start_tracking_audit"),
    ]
    assert SECRET not in repr(lineage) and "etl" not in repr(names)
