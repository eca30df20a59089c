"""Whole runs of the DAG with ``dag.test()``: the stand-in plays Blueshift, the warehouse is real."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from tests.dags.conftest import audit_rows, seed_source, users_of_day

DIRTY = [
    ("  CUST-TRIM ", "  Mixed.Case@Example.COM "),
    ("CUST-DUP", "dup@example.com"),
    ("CUST-DUP", " DUP@example.com"),
    ("", ""),
    (None, "not-an-email"),
    (None, "a" * 60 + "@example.com"),
    ("C" * 129, None),
    ("x'); DROP TABLE reconsented_users;--", None),
    ("CUST-ÜNICODE", "jürgen@exämple.de"),
]


def _applied(standin: object) -> set[tuple[str | None, str | None]]:
    snapshot = standin.state.snapshot()  # type: ignore[attr-defined]
    return {(user.get("customer_id"), user.get("email")) for user in snapshot["applied"]}


def test_run_with_faults_audits_every_user_once(warehouse_db, standin, run_dag):
    """20% transient faults: every user ends audited once, and succeeded == what Blueshift applied."""
    clean = users_of_day("2026-11-24", 120)
    outside = [
        ("CUST-BEFORE", "before@example.com", "2026-11-23 23:59:59"),
        ("CUST-AFTER", None, "2026-11-25 00:00:00"),
    ]
    seed_source(warehouse_db.url, clean + [(c, e, "2026-11-24 12:00:00") for c, e in DIRTY] + outside)
    standin.state.config.fault_rate = 0.2
    standin.state.config.faults = ["404", "409", "429", "500", "502", "503", "504", "drop"]

    result = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25), conf={"chunk_size": 40})

    rows = audit_rows(warehouse_db.url)
    statuses = Counter(row["status"] for row in rows)
    users = len(clean) + len(DIRTY) - 1  # the duplicate collapses
    assert len(rows) == users
    assert statuses["invalid"] == 4
    assert statuses["succeeded"] + statuses["rejected"] + statuses["invalid"] + statuses["failed"] == users
    succeeded = {(row["customer_id"], row["email"]) for row in rows if row["status"] == "succeeded"}
    assert succeeded == _applied(standin)
    assert ("x'); DROP TABLE reconsented_users;--", None) in succeeded
    assert ("CUST-TRIM", "mixed.case@example.com") in succeeded
    assert ("CUST-ÜNICODE", "jürgen@exämple.de") in succeeded
    assert not {row["customer_id"] for row in rows} & {"CUST-BEFORE", "CUST-AFTER"}
    expected_state = "failed" if statuses["failed"] else "success"
    assert result.state == expected_state, result.task_states
    assert result.task_states["extract_and_validate"] == ["success"]
    print(f"faults 20%: {dict(statuses)}, requests {standin.state.requests}, run {result.state}")
