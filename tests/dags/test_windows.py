"""Window boundaries: a row at exactly 00:00 belongs to that day only, on every warehouse."""

from __future__ import annotations

from datetime import datetime, timezone

from blueshift.pipeline import read_extract_sql
from blueshift.settings import DEFAULT_EXTRACT_SQL
from blueshift.warehouse import Warehouse
from sandbox.demo_warehouse import seed_source


def test_midnight_belongs_to_its_own_day(warehouse_db, monkeypatch):
    seed_source(
        warehouse_db.url,
        [
            ("LAST-OF-23", None, "2026-11-23 23:59:59"),
            ("MIDNIGHT-24", None, "2026-11-24 00:00:00"),
            ("NOON-24", None, "2026-11-24 12:00:00"),
            ("LAST-OF-24", None, "2026-11-24 23:59:59"),
            ("MIDNIGHT-25", None, "2026-11-25 00:00:00"),
        ],
    )
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", warehouse_db.conn_json)
    warehouse = Warehouse("warehouse_default", audit_table="audit_t")
    sql = read_extract_sql(str(DEFAULT_EXTRACT_SQL))

    def ids(start: datetime, end: datetime) -> set[str]:
        return {
            customer_id
            for frame in warehouse.read_window(sql, start, end, chunksize=2)
            for customer_id in frame["customer_id"]
        }

    day = [datetime(2026, 11, d, tzinfo=timezone.utc) for d in (23, 24, 25, 26)]
    assert ids(day[1], day[2]) == {"MIDNIGHT-24", "NOON-24", "LAST-OF-24"}
    assert ids(day[0], day[1]) == {"LAST-OF-23"}
    assert ids(day[2], day[3]) == {"MIDNIGHT-25"}
