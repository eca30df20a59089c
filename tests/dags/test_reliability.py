"""Faults, bad configuration and secrets, in whole DAG runs: every user ends with a true status.

Each fault test prints its figures (users, statuses, requests per user); the README's reliability
table quotes them.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests.conftest import API_KEY, FIGURES
from tests.dags.conftest import audit_rows, seed_source, users_of_day

USERS = 60
FAULT_SETTINGS = {"BLUESHIFT_MAX_ATTEMPTS": "8", "BLUESHIFT_READ_TIMEOUT": "0.3"}


def _applied(standin: object, key: str = "applied") -> Counter[str]:
    return Counter(user.get("customer_id") for user in standin.state.snapshot()[key])  # type: ignore[attr-defined]


def _check_truth(rows: list[dict], standin: object, result: object, users: int) -> Counter[str]:
    """The invariants every faulty run must keep; returns the per-status counts."""
    statuses = Counter(row["status"] for row in rows)
    assert len(rows) == users, "users extracted = users audited"
    succeeded = {row["customer_id"] for row in rows if row["status"] == "succeeded"}
    assert set(_applied(standin, "answered_ok")) <= succeeded, "every user answered 200 is audited succeeded"
    assert succeeded <= set(_applied(standin)), "nobody is audited succeeded who was not applied"
    expected = "failed" if statuses["failed"] else "success"
    assert result.state == expected  # type: ignore[attr-defined]
    return statuses


@pytest.mark.parametrize("rate", [0.2, 0.5])
@pytest.mark.parametrize("fault", ["404", "409", "429", "500", "502", "503", "504", "drop", "slow"])
def test_transient_fault(sqlite_warehouse, standin, run_dag, fault, rate):
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    config = standin.state.config
    config.faults, config.fault_rate, config.seed, config.slow_seconds = [fault], rate, 5, 0.6

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25), settings=FAULT_SETTINGS)

    statuses = _check_truth(audit_rows(sqlite_warehouse.url), standin, result, USERS)
    requests = standin.state.requests
    assert requests <= USERS * 8, "attempts per user are bounded"
    FIGURES.append(
        f"fault {fault} at {rate:.0%}: {dict(statuses)}, {requests} requests "
        f"({requests / USERS:.2f} per user), run {result.state}"
    )


def test_applied_but_answered_500_ends_succeeded(sqlite_warehouse, standin, run_dag):
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    config = standin.state.config
    config.faults, config.fault_rate, config.seed = ["applied_500"], 0.3, 9

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25), settings=FAULT_SETTINGS)

    rows = audit_rows(sqlite_warehouse.url)
    statuses = _check_truth(rows, standin, result, USERS)
    applied = _applied(standin)
    resent = sum(count - 1 for count in applied.values())
    assert statuses["succeeded"] == USERS
    assert resent > 0, "some users were applied, answered 500, and sent again: harmless"
    FIGURES.append(
        f"applied then 500 at 30%: {dict(statuses)}, {resent} harmless re-sends, "
        f"{standin.state.requests} requests"
    )


def test_429_storm_backs_off_and_recovers(sqlite_warehouse, standin, run_dag):
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    standin.state.config.storm_seconds = 10

    result = run_dag(
        sqlite_warehouse,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={
            "BLUESHIFT_RATE_LIMIT": "50",
            "BLUESHIFT_MAX_ATTEMPTS": "6",
            "BLUESHIFT_BACKOFF_BASE_SECONDS": "0.5",
            "BLUESHIFT_BACKOFF_CAP_SECONDS": "8",
        },
    )

    statuses = _check_truth(audit_rows(sqlite_warehouse.url), standin, result, USERS)
    throttled = standin.state.statuses["429"]
    FIGURES.append(
        f"429 storm of 10 s: {dict(statuses)}, {throttled} requests refused, {standin.state.requests} in all"
    )
    assert statuses["succeeded"] == USERS
    assert result.state == "success"
    assert throttled < 10 * 50 / 4, "the back-off shows: far fewer than the budget would allow in 10 s"


def test_warehouse_failing_mid_audit_leaves_no_partial_rows(postgres_warehouse, standin, run_dag):
    """The audit's upsert is one transaction: a failure after 20 rows leaves none; the retry writes all."""
    seed_source(postgres_warehouse.url, users_of_day("2026-11-24", USERS))
    engine = sa.create_engine(postgres_warehouse.url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE blink"))
        conn.execute(
            sa.text(
                """
                CREATE FUNCTION blink() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                  IF nextval('blink') = 20 THEN RAISE EXCEPTION 'warehouse went away'; END IF;
                  RETURN NEW;
                END $$
                """
            )
        )
        # The audit table does not exist yet: create it as the pipeline would, then arm the trigger.
    import os

    from blueshift.warehouse import Warehouse

    os.environ["AIRFLOW_CONN_WAREHOUSE_DEFAULT"] = postgres_warehouse.conn_json
    try:
        Warehouse(
            "warehouse_default",
            audit_table="blueshift_start_tracking_audit",
            staging_table="blueshift_start_tracking_staging",
        ).ensure_tables()
    finally:
        del os.environ["AIRFLOW_CONN_WAREHOUSE_DEFAULT"]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TRIGGER blink BEFORE INSERT ON blueshift_start_tracking_audit "
                "FOR EACH ROW EXECUTE FUNCTION blink()"
            )
        )

    result = run_dag(
        postgres_warehouse,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={"BLUESHIFT_TASK_RETRIES": "1", "BLUESHIFT_RETRY_DELAY_SECONDS": "1"},
    )

    rows = audit_rows(postgres_warehouse.url)
    assert result.state == "success", result.task_states
    assert "warehouse went away" in result.output, "the first audit try failed mid-write"
    assert len(rows) == USERS
    assert len({row["user_key"] for row in rows}) == USERS
    assert {row["status"] for row in rows} == {"succeeded"}
    engine.dispose()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"AIRFLOW_CONN_BLUESHIFT_DEFAULT": None}, "blueshift_default"),
        (
            {
                "AIRFLOW_CONN_BLUESHIFT_DEFAULT": json.dumps(
                    {"conn_type": "http", "host": "api.getblueshift.com", "login": API_KEY}
                )
            },
            "without a scheme",
        ),
        ({"AIRFLOW_CONN_WAREHOUSE_DEFAULT": None}, "Warehouse connection 'warehouse_default' is not defined"),
        ({"BLUESHIFT_EXTRACT_SQL": "WRONG_TABLE"}, "reconsented_userz"),
        ({"BLUESHIFT_EXTRACT_SQL": "WRONG_COLUMNS"}, "alias your columns AS customer_id and AS email"),
    ],
    ids=[
        "missing-blueshift-conn",
        "host-without-scheme",
        "missing-warehouse-conn",
        "wrong-table",
        "wrong-columns",
    ],
)
def test_bad_configuration_fails_before_any_request(
    sqlite_warehouse, standin, run_dag, monkeypatch, tmp_path, change, message
):
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", 10))
    queries = {
        "WRONG_TABLE": "SELECT customer_id, email FROM reconsented_userz "
        "WHERE consented_at >= :window_start AND consented_at < :window_end",
        "WRONG_COLUMNS": "SELECT customer_id AS id, email AS mail FROM reconsented_users "
        "WHERE consented_at >= :window_start AND consented_at < :window_end",
    }
    settings: dict[str, str | None] = {}
    for name, value in change.items():
        if name == "BLUESHIFT_EXTRACT_SQL":
            path = tmp_path / "query.sql"
            path.write_text(queries[str(value)])
            settings[name] = str(path)
        else:
            settings[name] = value
    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25), settings=settings)

    assert result.state == "failed"
    assert result.task_states["extract_and_validate"] == ["failed"]
    assert message in result.output
    assert standin.state.requests == 0


@pytest.mark.parametrize("key_field", ["login", "password"])
def test_key_header_and_emails_stay_out_of_logs_metadata_and_audit(
    sqlite_warehouse, standin, run_dag, monkeypatch, key_field
):
    users = users_of_day("2026-11-24", 30)
    seed_source(sqlite_warehouse.url, users)
    rejected_email = users[0][1]
    standin.state.config.fixed = {rejected_email: 422}
    standin.state.config.faults, standin.state.config.fault_rate = ["500"], 0.2

    connection = json.dumps({"conn_type": "http", "host": standin.url, key_field: API_KEY})
    result = run_dag(
        sqlite_warehouse,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={"AIRFLOW_CONN_BLUESHIFT_DEFAULT": connection},
    )

    header = base64.b64encode(f"{API_KEY}:".encode()).decode()
    rows = audit_rows(sqlite_warehouse.url)
    rejected = next(row for row in rows if row["email"] == rejected_email)
    assert rejected["status"] == "rejected"
    assert rejected_email not in rejected["error"]
    assert rejected_email[:1] + "***@example.com" in rejected["error"], "the echoed email is redacted"
    audit_text = json.dumps(rows, default=str)
    metadata = _metadata_text()
    for where, text in (("logs", result.output), ("audit table", audit_text), ("metadata DB", metadata)):
        assert API_KEY not in text, where
        assert header not in text, where
    for where, text in (("logs", result.output), ("metadata DB", metadata)):
        leaked = [email for _, email, _ in users if email in text]
        assert not leaked, f"{len(leaked)} emails in the {where}"


def _metadata_text() -> str:
    """Everything this DAG left in the metadata DB that could hold data: XComs and rendered fields."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        xcoms = session.query(XComModel).filter(XComModel.dag_id == "blueshift_start_tracking").all()
        rendered = (
            session.query(RenderedTaskInstanceFields)
            .filter(RenderedTaskInstanceFields.dag_id == "blueshift_start_tracking")
            .all()
        )
        return "\n".join(
            [str(x.value) for x in xcoms] + [json.dumps(r.rendered_fields, default=str) for r in rendered]
        )
