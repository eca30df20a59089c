"""End to end on a real Airflow: scheduler, api-server, dag-processor, LocalExecutor, PostgreSQL.

The path data engineering uses: unpause, the daily scheduled run, a UI backfill over three days
(``POST /api/v2/backfills``, three runs at once), a re-run backfill, a triggered dry run, and
failed users carried over by the next day's scheduled run.
"""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta, timezone

from sandbox.demo_warehouse import seed_source
from tests.conftest import FIGURES
from tests.dags.conftest import audit_rows, users_of_day

DAG_ID = "blueshift_start_tracking"
PER_DAY = 30


def _day(today: date, offset: int) -> str:
    return (today + timedelta(days=offset)).isoformat()


def _applied_ids(standin) -> Counter[str]:
    return Counter(user.get("customer_id") for user in standin.state.snapshot()["applied"])


def test_schedule_backfill_rerun_dry_run_and_carry_over(stack, postgres_warehouse, standin):
    # Every date is relative to the day the scheduler sees: unpausing creates the run of the last
    # whole day before now, so the test holds on any day of any year. Days -9 .. +1 are seeded so
    # that a test started just before midnight UTC still finds its users.
    today = datetime.now(timezone.utc).date()
    users = {_day(today, offset): users_of_day(_day(today, offset), PER_DAY) for offset in range(-9, 2)}
    seed_source(postgres_warehouse.url, [row for rows in users.values() for row in rows])
    stack.wait_for_dag(DAG_ID)
    assert stack.api("GET", f"/dags/{DAG_ID}")["is_paused"], "new DAGs start paused, as in production"
    pools = {pool["name"] for pool in stack.api("GET", "/pools")["pools"]}
    assert pools == {"default_pool"}, "nothing to set up but the two connections"

    # 1. A run with injected faults leaves three users of day -3 failed. (A manual run with logical
    #    date D covers [D-1, D); a scheduled or backfill run with logical date D covers [D, D+1).)
    failed_day = _day(today, -3)
    failing = [row[0] for row in users[failed_day][:3]]
    standin.state.config.fixed = {customer_id: 503 for customer_id in failing}
    local = stack.airflow("dags", "test", DAG_ID, _day(today, -2), timeout=600)
    assert "state=failed" in local.stdout + local.stderr, (local.stdout + local.stderr)[-3000:]
    audit = {row["customer_id"]: row for row in audit_rows(postgres_warehouse.url)}
    assert [audit[customer_id]["status"] for customer_id in failing] == ["failed"] * 3
    standin.state.config.fixed = {}

    # 2. Unpausing starts the latest scheduled run, [yesterday, today): it carries the failed users
    #    over (they are within BLUESHIFT_CARRY_OVER_DAYS of it).
    stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    scheduled = stack.wait_for_runs(DAG_ID, run_type="scheduled", timeout=300)
    assert len(scheduled) == 1
    assert scheduled[0]["state"] == "success", stack.logs_tail()
    scheduled_day = scheduled[0]["data_interval_start"][:10]
    assert scheduled_day in (_day(today, -1), _day(today, 0)), scheduled[0]
    audit = {
        (str(row["window_start"])[:10], row["customer_id"]): row for row in audit_rows(postgres_warehouse.url)
    }
    for customer_id in failing:
        assert audit[(failed_day, customer_id)]["status"] == "succeeded"
        assert audit[(failed_day, customer_id)]["run_id"] == scheduled[0]["dag_run_id"]
    assert all(audit[(scheduled_day, row[0])]["status"] == "succeeded" for row in users[scheduled_day])

    # 3. A backfill over three days, three runs at once, as the UI's Backfill button does.
    first, last = _day(today, -6), _day(today, -4)
    before = standin.state.requests
    applied_before = _applied_ids(standin)
    range_json = {
        "dag_id": DAG_ID,
        "from_date": f"{first}T00:00:00Z",
        "to_date": f"{last}T00:00:00Z",
        "max_active_runs": 3,
    }
    backfill = stack.api("POST", "/backfills", json=range_json)
    stack.wait_for_backfill(backfill["id"])
    runs = [run for run in stack.dag_runs(DAG_ID) if run["run_type"] == "backfill"]
    assert len(runs) == 3
    assert {run["state"] for run in runs} == {"success"}, stack.logs_tail()
    windows = sorted(run["data_interval_start"][:10] for run in runs)
    assert windows == [first, _day(today, -5), last]
    rows = audit_rows(postgres_warehouse.url)
    backfilled = [row for row in rows if str(row["window_start"])[:10] in windows]
    assert len(backfilled) == 3 * PER_DAY
    assert len({(row["window_start"], row["user_key"]) for row in backfilled}) == 3 * PER_DAY
    assert {row["status"] for row in backfilled} == {"succeeded"}
    applied = _applied_ids(standin)
    for day in windows:
        assert all(applied[row[0]] == 1 for row in users[day]), "each user of the range sent exactly once"
    for day in (_day(today, -7), failed_day):
        assert all(applied[row[0]] == applied_before[row[0]] for row in users[day]), (
            "nothing outside the range"
        )
    assert standin.state.requests - before == 3 * PER_DAY

    # 4. The same backfill again, reprocessing completed runs: nothing is sent again.
    count_before, requests_before = len(rows), standin.state.requests
    again = stack.api("POST", "/backfills", json={**range_json, "reprocess_behavior": "completed"})
    stack.wait_for_backfill(again["id"])
    rerun = [run for run in stack.dag_runs(DAG_ID) if run["run_type"] == "backfill"]
    assert {run["state"] for run in rerun} == {"success"}, stack.logs_tail()
    assert standin.state.requests == requests_before
    assert len(audit_rows(postgres_warehouse.url)) == count_before

    # 5. A triggered dry run (logical date day -7: the window of day -8) sends nothing, audits dry_run.
    dry = stack.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        json={"logical_date": f"{_day(today, -7)}T00:00:00Z", "conf": {"dry_run": True}},
    )
    finished = stack.wait_for_runs(DAG_ID, {dry["dag_run_id"]})
    assert finished[0]["state"] == "success"
    assert standin.state.requests == requests_before
    dry_rows = [
        row for row in audit_rows(postgres_warehouse.url) if str(row["window_start"])[:10] == _day(today, -8)
    ]
    assert len(dry_rows) == PER_DAY
    assert {row["status"] for row in dry_rows} == {"dry_run"}
    FIGURES.append(
        f"e2e: {standin.state.requests} requests, busiest second {standin.state.snapshot()['busiest_second']}"
    )
