"""Whole runs of the DAG with ``dag.test()``: the stand-in plays Blueshift, the warehouse is real."""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import datetime

import pytest

from sandbox.demo_warehouse import seed_source
from tests.conftest import API_KEY, FIGURES
from tests.dags.conftest import FAST_SETTINGS, audit_rows, users_of_day

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
    FIGURES.append(f"faults 20%: {dict(statuses)}, requests {standin.state.requests}, run {result.state}")


def _assert_no_secrets_or_emails(output: str, emails: list[str]) -> None:
    header = base64.b64encode(f"{API_KEY}:".encode()).decode()
    assert API_KEY not in output
    assert header not in output
    leaked = [email for email in emails if email and email.strip().lower() in output.lower()]
    assert not leaked, f"{len(leaked)} customer emails in the logs, e.g. {leaked[0][:3]}***"


def _xcom_values(run_id: str) -> str:
    """Return every XCom value of one run as text."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id="blueshift_start_tracking", run_id=run_id).all()
        return "\n".join(str(row.value) for row in rows)


def test_no_key_header_or_email_in_logs_or_xcom(sqlite_warehouse, standin, run_dag):
    users = users_of_day("2026-11-24", 30)
    seed_source(sqlite_warehouse.url, users + [(None, "not-an-email@", "2026-11-24 01:00:00")])
    standin.state.config.fault_rate = 0.2
    standin.state.config.faults = ["500", "422", "drop"]

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25))

    # The checks below only mean something if this run's task logs and XComs were captured.
    assert ": 30 users to send" in result.output and f"Audit of run {result.run_id}" in result.output
    xcoms = _xcom_values(result.run_id)
    assert "chunk_id" in xcoms
    emails = [email for _, email, _ in users] + ["not-an-email@"]
    _assert_no_secrets_or_emails(result.output, emails)
    _assert_no_secrets_or_emails(xcoms, emails)


def test_dry_run_sends_nothing_and_audits_dry_run(warehouse_db, standin, run_dag):
    users = users_of_day("2026-11-24", 25)
    seed_source(warehouse_db.url, users)

    result = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25), conf={"dry_run": True})

    assert result.state == "success"
    assert standin.state.requests == 0
    rows = audit_rows(warehouse_db.url)
    assert len(rows) == 25
    assert {row["status"] for row in rows} == {"dry_run"}
    assert all(row["attempts"] == 0 for row in rows)


def test_rerunning_a_window_sends_only_what_did_not_succeed(warehouse_db, standin, run_dag):
    users = users_of_day("2026-11-24", 40)
    seed_source(warehouse_db.url, users)
    standin.state.config.fixed = {users[0][0]: 503}
    first = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25))
    assert first.state == "failed"
    sent_first = standin.state.requests

    standin.state.config.fixed = {}
    second = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25))
    assert second.state == "success"
    assert standin.state.requests == sent_first + 1, "only the failed user is sent again"
    assert "39 already succeeded" in second.output

    dry = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25), conf={"dry_run": True})
    assert dry.state == "success"
    assert standin.state.requests == sent_first + 1

    forced = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25), conf={"force": True})
    assert forced.state == "success"
    assert standin.state.requests == sent_first + 1 + 40, "force re-sends everyone"

    rows = audit_rows(warehouse_db.url)
    assert len(rows) == 40
    assert len({(row["window_start"], row["user_key"]) for row in rows}) == 40
    assert {row["status"] for row in rows} == {"succeeded"}, "a dry run never overwrites a real outcome"
    by_id = {row["customer_id"]: row for row in rows}
    assert by_id[users[0][0]]["attempts"] == 4 + 1 + 1
    assert by_id[users[1][0]]["attempts"] == 1 + 1


def test_user_left_failed_fails_the_run(warehouse_db, standin, run_dag):
    users = users_of_day("2026-11-24", 20)
    seed_source(warehouse_db.url, users)
    standin.state.config.fixed = {users[0][0]: 503}

    result = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25))

    assert result.state == "failed"
    assert result.task_states["start_tracking"] == ["failed"]
    assert result.task_states["audit"] == ["failed"]
    rows = {row["customer_id"]: row for row in audit_rows(warehouse_db.url)}
    assert len(rows) == 20
    assert rows[users[0][0]]["status"] == "failed"
    assert rows[users[0][0]]["attempts"] == 4
    assert "HTTP 503" in rows[users[0][0]]["error"]
    assert sum(row["status"] == "succeeded" for row in rows.values()) == 19


def test_revoked_key_stops_the_run_and_audits_the_rest_failed(warehouse_db, standin, run_dag):
    seed_source(warehouse_db.url, users_of_day("2026-11-24", 60))
    standin.state.config.revoke_after = 10

    result = run_dag(
        warehouse_db, standin, logical_date=datetime(2026, 11, 25), settings={"BLUESHIFT_TASK_RETRIES": "2"}
    )

    assert result.state == "failed"
    assert result.task_states["start_tracking"] == ["failed"]
    assert result.try_numbers["start_tracking"] == [1], "no Airflow retry after a refused key"
    # The 10 accepted requests, then at most one refused request per sender thread in flight.
    assert standin.state.requests <= 10 + int(FAST_SETTINGS["BLUESHIFT_MAX_IN_FLIGHT"])
    rows = audit_rows(warehouse_db.url)
    statuses = Counter(row["status"] for row in rows)
    assert len(rows) == 60
    assert statuses["succeeded"] == len(_applied(standin)) <= 10
    assert statuses["failed"] == 60 - statuses["succeeded"]
    assert all("refused the API key" in row["error"] for row in rows if row["status"] == "failed")
    assert "Blueshift refused the API key (HTTP 401)" in result.output


def test_empty_window_succeeds_with_nothing_to_do(warehouse_db, standin, run_dag):
    seed_source(warehouse_db.url, users_of_day("2026-11-20", 5))
    result = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25))
    assert result.state == "success"
    assert result.task_states["start_tracking"] == ["skipped"]
    assert audit_rows(warehouse_db.url) == []
    assert standin.state.requests == 0


def test_bad_param_is_refused_before_anything_is_sent(sqlite_warehouse, standin, run_dag):
    from airflow.sdk.exceptions import ParamValidationError

    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", 5))
    with pytest.raises(ParamValidationError, match="chunk_size"):
        run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25), conf={"chunk_size": 3})
    assert standin.state.requests == 0


def test_failure_alert_goes_through_the_configured_notifier(sqlite_warehouse, standin, run_dag, tmp_path):
    users = users_of_day("2026-11-24", 12)
    seed_source(sqlite_warehouse.url, users)
    standin.state.config.fixed = {users[0][0]: 500, users[1][0]: 500}
    alert_file = tmp_path / "alert.txt"

    result = run_dag(
        sqlite_warehouse,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={
            "BLUESHIFT_ALERT_NOTIFIER": "tests.dags.notifier.FileNotifier",
            "BLUESHIFT_ALERT_NOTIFIER_KWARGS": json.dumps(
                {"path": str(alert_file), "text": "{subject}\n{message}"}
            ),
        },
    )

    assert result.state == "failed"
    alert = alert_file.read_text()
    assert "blueshift_start_tracking failed for window 2026-11-24" in alert
    assert "succeeded 10" in alert and "failed 2" in alert
    assert "BlueshiftRunIncompleteError" in alert
    _assert_no_secrets_or_emails(alert, [email for _, email, _ in users])
    assert "ALERT [Airflow] blueshift_start_tracking failed" in result.output
