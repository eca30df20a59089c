"""The warehouse side: the audit table as the pipeline finds it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from blueshift.exceptions import BlueshiftConfigError
from blueshift.warehouse import Warehouse

# The audit table as an earlier version created it: no run_attempts column.
OLD_AUDIT_TABLE = """
CREATE TABLE blueshift_start_tracking_audit (
    dag_id VARCHAR(250) NOT NULL, window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL,
    user_key VARCHAR(64) NOT NULL, run_id VARCHAR(250) NOT NULL, customer_id TEXT, email TEXT,
    status VARCHAR(16) NOT NULL, http_status INTEGER, attempts INTEGER NOT NULL, error TEXT,
    created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (dag_id, window_start, window_end, user_key)
)
"""


def test_an_audit_table_of_an_older_version_fails_with_the_statement_that_fixes_it(monkeypatch, warehouse_db):
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", warehouse_db.conn_json)
    engine = sa.create_engine(warehouse_db.url)
    with engine.begin() as conn:
        conn.execute(sa.text(OLD_AUDIT_TABLE))
    warehouse = Warehouse("warehouse_default", audit_table="blueshift_start_tracking_audit")

    with pytest.raises(BlueshiftConfigError, match="lacks the column") as raised:
        warehouse.ensure_audit_table()
    hint = "ALTER TABLE blueshift_start_tracking_audit ADD COLUMN run_attempts INTEGER"
    assert hint in str(raised.value)

    with engine.begin() as conn:
        conn.execute(sa.text(hint))
    engine.dispose()
    warehouse.ensure_audit_table()  # the fix named in the message is enough
