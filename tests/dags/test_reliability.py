"""Faults, bad configuration and secrets, in whole DAG runs: every user ends with a true status.

Each fault test prints its figures (users, statuses, requests per user); the README's reliability
table quotes them.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from blueshift.pacing import AdaptiveRateLimiter, CircuitBreaker
from sandbox.demo_warehouse import seed_source
from tests.conftest import API_KEY, FIGURES
from tests.dags.conftest import DAG_ID, audit_rows, users_of_day

USERS = 60
MAX_ATTEMPTS = 12
"""Attempts per user in the fault runs: at 50% faults a user fails all of them with odds 1 in 4,096."""
FAULT_SETTINGS = {"BLUESHIFT_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "BLUESHIFT_READ_TIMEOUT": "0.3"}
SEED = 0
"""The stand-in's fault seed for the fault runs (the figures in the README are for this seed)."""


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
    """Retries inside the chunk task alone (no Airflow retry) bring every user to ``succeeded``."""
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    config = standin.state.config
    config.faults, config.fault_rate, config.seed, config.slow_seconds = [fault], rate, SEED, 0.6
    standin.state.reset()  # the stand-in draws its faults from an rng seeded at reset, not at each request

    result = run_dag(sqlite_warehouse, standin, logical_date=datetime(2026, 11, 25), settings=FAULT_SETTINGS)

    rows = audit_rows(sqlite_warehouse.url)
    statuses = _check_truth(rows, standin, result, USERS)
    requests = standin.state.requests
    FIGURES.append(
        f"fault {fault} at {rate:.0%}: {dict(statuses)}, {requests} requests "
        f"({requests / USERS:.2f} per user), run {result.state}"
    )
    assert statuses == {"succeeded": USERS}, "every user succeeded after its retries"
    assert result.state == "success", result.task_states
    assert result.try_numbers["start_tracking"] == [1], "without any Airflow retry"
    assert requests > USERS, "the fault was injected and retried"
    assert max(row["attempts"] for row in rows) <= MAX_ATTEMPTS, "attempts per user are bounded"
    assert sum(row["attempts"] for row in rows) == requests, "every request sent is counted in the audit"


def test_applied_but_answered_500_ends_succeeded(sqlite_warehouse, standin, run_dag):
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    config = standin.state.config
    config.faults, config.fault_rate, config.seed = ["applied_500"], 0.3, 9
    standin.state.reset()  # seed the stand-in's rng with it

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


def _chunk_results(run_id: str) -> list[dict]:
    """Return what each chunk task of the run returned (its counters), from the metadata DB."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter_by(dag_id=DAG_ID, run_id=run_id, task_id="start_tracking", key="return_value")
            .all()
        )
        return [XComModel.deserialize_value(row) for row in rows]


PACE = re.compile(r"pace (\d+(?:\.\d+)?)/s of a (\d+(?:\.\d+)?)/s share")
CIRCUIT_OPEN = "Circuit open after repeated transient failures"
STORM_IN_FLIGHT = 8  # FAST_SETTINGS' BLUESHIFT_MAX_IN_FLIGHT


@pytest.mark.parametrize(
    ("budget", "storm_seconds", "backoff"),
    [
        # The default budget: halving the pace down to its floor (1/64 of the share) holds the storm.
        pytest.param(50, 10, ("0.5", "8"), id="budget-50-pace"),
        # A budget whose pace floor (31/s) still hammers Blueshift: the circuit must pause everyone.
        pytest.param(2000, 5, ("0.01", "0.05"), id="budget-2000-circuit"),
    ],
)
def test_429_storm_backs_off_and_recovers(sqlite_warehouse, standin, run_dag, budget, storm_seconds, backoff):
    """Every request refused for a while: the pace falls to its floor, the circuit opens when the floor
    is not enough, and the run then finishes with every user succeeded."""
    seed_source(sqlite_warehouse.url, users_of_day("2026-11-24", USERS))
    standin.state.config.storm_seconds = storm_seconds

    result = run_dag(
        sqlite_warehouse,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={
            "BLUESHIFT_RATE_LIMIT": str(budget),
            "BLUESHIFT_MAX_ATTEMPTS": "10",
            "BLUESHIFT_BACKOFF_BASE_SECONDS": backoff[0],
            "BLUESHIFT_BACKOFF_CAP_SECONDS": backoff[1],
        },
    )

    statuses = _check_truth(audit_rows(sqlite_warehouse.url), standin, result, USERS)
    throttled = standin.state.statuses["429"]
    paces = [(float(pace), float(share)) for pace, share in PACE.findall(result.output)]
    opened = result.output.count(CIRCUIT_OPEN)
    floor = AdaptiveRateLimiter(float(budget)).min_rate
    FIGURES.append(
        f"429 storm of {storm_seconds} s at a budget of {budget}/s: {dict(statuses)}, {throttled} requests "
        f"refused, {standin.state.requests} in all, lowest pace {min(paces, default=None)}, "
        f"circuit opened {opened} times"
    )
    assert statuses == {"succeeded": USERS}
    assert result.state == "success", result.task_states
    (chunk,) = _chunk_results(result.run_id)
    assert chunk["throttled"] == throttled, "the task counted every 429 it was answered"
    assert chunk["requests"] == standin.state.requests
    assert paces and {share for _, share in paces} == {float(budget)}, "the progress lines were logged"
    assert min(pace for pace, _ in paces) == pytest.approx(floor, abs=0.06), "the pace fell to its floor"
    threshold = CircuitBreaker().threshold
    if budget == 50:
        # Refused at most: those in flight, the halvings from the share to the floor, the storm at the floor.
        bound = STORM_IN_FLIGHT + math.log2(budget / floor) + storm_seconds * floor
        assert throttled <= bound, f"{throttled} refused, more than the pace allows ({bound:.0f})"
    else:
        assert opened >= 1, "the circuit opened"
        # The circuit opens after `threshold` failures in a row and pauses 2 s, then 4 s: the storm
        # is over before a third opening. At most the requests in flight slip past each opening.
        bound = 2 * (threshold + STORM_IN_FLIGHT)
        assert throttled <= bound, f"{throttled} refused, more than two openings of the circuit allow"


AUDIT_TABLE = "blueshift_start_tracking_audit"
FAIL_AT_ROW = 20
# A trigger that fails the insert of the 20th audit row: the write breaks with 19 rows of its own
# already inserted. (A row-level BEFORE trigger sees the rows its statement inserted before.)
FAILING_AUDIT_TRIGGER = {
    "sqlite": [
        f"""
        CREATE TRIGGER blink BEFORE INSERT ON {AUDIT_TABLE}
        WHEN (SELECT COUNT(*) FROM {AUDIT_TABLE}) >= {FAIL_AT_ROW - 1}
        BEGIN SELECT RAISE(ABORT, 'warehouse went away'); END
        """
    ],
    "postgres": [
        f"""
        CREATE FUNCTION blink() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF (SELECT COUNT(*) FROM {AUDIT_TABLE}) >= {FAIL_AT_ROW - 1} THEN
            RAISE EXCEPTION 'warehouse went away';
          END IF;
          RETURN NEW;
        END $$
        """,
        f"CREATE TRIGGER blink BEFORE INSERT ON {AUDIT_TABLE} FOR EACH ROW EXECUTE FUNCTION blink()",
    ],
}
DROP_FAILING_AUDIT_TRIGGER = {
    "sqlite": "DROP TRIGGER blink",
    "postgres": f"DROP TRIGGER blink ON {AUDIT_TABLE}",
}


def test_warehouse_failing_mid_audit_leaves_no_partial_rows(warehouse_db, standin, run_dag, monkeypatch):
    """The audit's upsert is one transaction: a failure after 19 rows leaves none; the retry writes all."""
    from blueshift.warehouse import Warehouse

    seed_source(warehouse_db.url, users_of_day("2026-11-24", USERS))
    engine = sa.create_engine(warehouse_db.url)

    def audit_row_count() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM {AUDIT_TABLE}")).scalar_one())

    # dag.test runs the tasks in this process: arm the failing trigger just before the audit's
    # first write (the extract has created the audit table by then), count the audit table's rows
    # right after each try of the write, and let the warehouse come back after the failed try.
    after_each_try: list[tuple[str, int]] = []
    publish_audit = Warehouse.publish_audit

    def observed_publish_audit(self: Warehouse, *args: Any, **kwargs: Any) -> Any:
        if not after_each_try:
            with engine.begin() as conn:
                for statement in FAILING_AUDIT_TRIGGER[warehouse_db.kind]:
                    conn.execute(sa.text(statement))
        try:
            written = publish_audit(self, *args, **kwargs)
        except Exception:
            after_each_try.append(("failed", audit_row_count()))
            with engine.begin() as conn:
                conn.execute(sa.text(DROP_FAILING_AUDIT_TRIGGER[warehouse_db.kind]))
            raise
        after_each_try.append(("written", audit_row_count()))
        return written

    monkeypatch.setattr(Warehouse, "publish_audit", observed_publish_audit)

    result = run_dag(
        warehouse_db,
        standin,
        logical_date=datetime(2026, 11, 25),
        settings={"BLUESHIFT_TASK_RETRIES": "1", "BLUESHIFT_RETRY_DELAY_SECONDS": "1"},
    )

    rows = audit_rows(warehouse_db.url)
    engine.dispose()
    FIGURES.append(
        f"warehouse failing at audit row {FAIL_AT_ROW} ({warehouse_db.kind}): rows after each try "
        f"{after_each_try}, {len(rows)} rows at the end, run {result.state}"
    )
    assert "warehouse went away" in result.output, "the first audit try failed mid-write"
    assert after_each_try == [("failed", 0), ("written", USERS)], "no partial rows after the failed try"
    assert result.try_numbers["audit"] == [2], "Airflow's retry of the audit wrote the rows"
    assert result.state == "success", result.task_states
    assert len(rows) == USERS
    assert len({row["user_key"] for row in rows}) == USERS
    assert {row["status"] for row in rows} == {"succeeded"}


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

    # The checks below only mean something if this run's logs and metadata were captured.
    assert result.output.strip(), "the run's logs were captured"
    assert f"Audit of run {result.run_id}" in result.output, "the audit task's log of this run is there"
    assert ": 30 users to send" in result.output, "the sending task's log of this run is there"
    assert standin.state.requests >= 30, "the key was used"
    header = base64.b64encode(f"{API_KEY}:".encode()).decode()
    rows = audit_rows(sqlite_warehouse.url)
    rejected = next(row for row in rows if row["email"] == rejected_email)
    assert rejected["status"] == "rejected"
    assert rejected_email not in rejected["error"]
    assert rejected_email[:1] + "***@example.com" in rejected["error"], "the echoed email is redacted"
    audit_text = json.dumps(rows, default=str)
    metadata = _metadata_text(result.run_id)
    assert "chunk_id" in metadata, "the run's XComs were read"
    for where, text in (("logs", result.output), ("audit table", audit_text), ("metadata DB", metadata)):
        assert API_KEY not in text, where
        assert header not in text, where
    for where, text in (("logs", result.output), ("metadata DB", metadata)):
        leaked = [email for _, email, _ in users if email in text]
        assert not leaked, f"{len(leaked)} emails in the {where}"


def _metadata_text(run_id: str) -> str:
    """Everything the run left in the metadata DB that could hold data: XComs and rendered fields."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        xcoms = session.query(XComModel).filter_by(dag_id=DAG_ID, run_id=run_id).all()
        rendered = session.query(RenderedTaskInstanceFields).filter_by(dag_id=DAG_ID, run_id=run_id).all()
        return "\n".join(
            [str(x.value) for x in xcoms] + [json.dumps(r.rendered_fields, default=str) for r in rendered]
        )
