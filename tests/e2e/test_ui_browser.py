"""The Airflow UI clicked through as a person does, in a real headless Chromium (Playwright).

Against a whole Airflow (the e2e stack, PostgreSQL metadata DB: backfills need it), one test logs
in, unpauses ``blueshift_start_tracking``, triggers a dry run from the params form, backfills three
days from the Backfill dialog, reads the mapped chunks' labels and the run's outcome, and sees the
form refuse ``chunk_size: 3``. What the UI shows is cross-checked over the REST API and in the
warehouse. Each step is saved as a screenshot in the test's ``tmp_path``; with
``BLUESHIFT_TEST_SCREENSHOTS_DIR`` set (``make screenshots``) the README's figures are written there.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from datetime import time as clock
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from playwright.sync_api import Locator, Page, expect

from sandbox.airflow_stack import ADMIN_PASSWORD, AirflowStack
from sandbox.browser import Screenshots, check_chromium, chromium_page, log_in, pick_datetime
from sandbox.demo_warehouse import seed_source
from tests.conftest import FIGURES
from tests.dags.conftest import audit_rows, users_of_day

DAG_ID = "blueshift_start_tracking"
PER_DAY = 24
CHUNK_SIZE = 10
"""The backfill's chunk_size: several chunks per day, so that the labels say ``chunk i/n``."""
PARAMS = ("dry_run", "force", "chunk_size")
CHUNK_LABEL = re.compile(r"^chunk (\d+)\/(\d+) · (\d+) users$")  # "\/": Playwright sends it as /.../
RUN_FINISHES_MS = 300_000
SCREENSHOTS_ENV = "BLUESHIFT_TEST_SCREENSHOTS_DIR"
README_FIGURES = {
    "backfill-dialog": "backfill-dialog.png",
    "backfill-grid": "backfill-grid.png",
    "run-outcome": "run-outcome.png",
}
"""The steps the README shows, and their stable file names in ``docs/screenshots``."""


def show_run_outcome(page: Page, run_id: str) -> Locator:
    """Open the page that shows a run's per-status counts; return what shows its ``succeeded`` count.

    Today the counts are the ``audit`` task's return value, one XCom per status: its XCom tab. When
    they move (e.g. to the audit's asset event), this is the one place to point at the new page.
    """
    page.goto(f"/dags/{DAG_ID}/runs/{run_id}/tasks/audit/xcom")
    return page.get_by_role("row").filter(has=page.get_by_role("cell", name="succeeded", exact=True))


@pytest.fixture
def chromium() -> Path:
    """The browser, checked before the Airflow stack starts: missing, the test fails naming the fix."""
    return check_chromium()


def _midnight(day: date) -> datetime:
    return datetime.combine(day, clock(0), tzinfo=timezone.utc)


def _applied_ids(standin: Any) -> Counter[str]:
    return Counter(user.get("customer_id") for user in standin.state.snapshot()["applied"])


def _audit_by_day(url: str) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in audit_rows(url):
        rows.setdefault(str(row["window_start"])[:10], []).append(row)
    return rows


def _open_trigger_dialog(page: Page) -> Locator:
    page.goto(f"/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger Dag").click()
    dialog = page.get_by_role("dialog").first
    expect(dialog.get_by_role("heading", name=f"Trigger Dag - {DAG_ID}")).to_be_visible()
    return dialog


def _run_state(page: Page, run_id: str) -> Locator:
    """The state badge beside the run's name on its page."""
    header = page.get_by_role("heading", name=run_id, exact=True).locator("xpath=..")
    return header.get_by_test_id("state-badge")


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll the REST API until ``condition`` holds: the UI shows a change before the API has it."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(1)


def _expect_params_form(dialog: Locator, params: dict[str, Any]) -> None:
    """Each param is a field named by its title, described by its description (what a person reads)."""
    roles = {"boolean": "checkbox", "integer": "spinbutton"}
    for name in PARAMS:
        title = params[name]["schema"].get("title")
        description = params[name].get("description")
        assert title, f"param {name} has no title: the form would show its bare name"
        assert description, f"param {name} has no description: the form would not say what it does"
        field = dialog.get_by_role(roles[params[name]["schema"]["type"]], name=title, exact=True)
        expect(field).to_have_attribute("name", f"element_{name}")
        expect(field).to_have_accessible_description(description)


def _widen_grid(page: Page) -> None:
    """Drag the grid's edge to the right, so that the grid shows whole runs (a screenshot's sake)."""
    edge = page.get_by_role("separator").filter(has=page.get_by_role("button", name="Collapse Details Panel"))
    expect(edge).to_be_visible()
    box = edge.bounding_box()
    assert box is not None, "the grid's resizable edge is not on the page"
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + 300, box["y"] + 20, steps=10)
    page.mouse.up()


def _title(params: dict[str, Any], name: str) -> str:
    return str(params[name]["schema"]["title"])


def test_unpause_dry_run_backfill_chunks_and_refused_chunk_size_in_the_ui(
    chromium: Path, stack: AirflowStack, postgres_warehouse: Any, standin: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    # Every date is relative to the day the test runs. Backfill: logical dates -10 .. -8 (windows of
    # those days). Dry run: triggered with logical date -5, so it covers the window of day -6.
    today = datetime.now(timezone.utc).date()
    backfill_days = [today - timedelta(days=n) for n in (10, 9, 8)]
    dry_logical, dry_day = today - timedelta(days=5), today - timedelta(days=6)
    users = {day: users_of_day(day.isoformat(), PER_DAY) for day in [*backfill_days, dry_day]}
    seed_source(postgres_warehouse.url, [row for rows in users.values() for row in rows])
    stack.wait_for_dag(DAG_ID)
    params = stack.api("GET", f"/dags/{DAG_ID}/details")["params"]
    published = os.environ.get(SCREENSHOTS_ENV)
    shots = Screenshots(tmp_path / "ui", Path(published) if published else None)

    with chromium_page(stack.url, shots.artifacts) as page:
        log_in(page, "admin", ADMIN_PASSWORD)

        # 1. The DAG starts paused; its toggle unpauses it.
        page.goto(f"/dags/{DAG_ID}")
        toggle = page.get_by_test_id("toggle-pause")
        expect(toggle).to_have_attribute("data-state", "unchecked")
        shots.take(page, "dag-paused")
        toggle.click()
        expect(toggle).to_have_attribute("data-state", "checked")
        _wait_until(lambda: stack.api("GET", f"/dags/{DAG_ID}")["is_paused"] is False, "the DAG unpaused")

        # 2. Trigger: the three params with their titles and descriptions; a dry run of day -6.
        dialog = _open_trigger_dialog(page)
        _expect_params_form(dialog, params)
        pick_datetime(
            page,
            dialog.get_by_test_id("datetime-input").first,
            _midnight(dry_logical),
            close_on=dialog.get_by_text("Data Interval", exact=True),
        )
        dialog.locator("label[data-scope=switch]:has(input[name=element_dry_run])").click()
        expect(dialog.get_by_role("checkbox", name=_title(params, "dry_run"), exact=True)).to_be_checked()
        shots.take(page, "trigger-dry-run")
        dialog.get_by_role("button", name="Trigger", exact=True).click()
        page.wait_for_url(re.compile(rf"/dags/{DAG_ID}/runs/manual__"))
        dry_run_id = unquote(page.url.rsplit("/runs/", 1)[1])
        expect(_run_state(page, dry_run_id)).to_have_text("Success", timeout=RUN_FINISHES_MS)
        shots.take(page, "dry-run-success")

        dry = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{dry_run_id}")
        assert dry["state"] == "success"
        assert dry["conf"]["dry_run"] is True
        assert dry["data_interval_start"][:10] == dry_day.isoformat()
        dry_rows = _audit_by_day(postgres_warehouse.url)[dry_day.isoformat()]
        assert len(dry_rows) == PER_DAY
        assert {row["status"] for row in dry_rows} == {"dry_run"}
        applied = _applied_ids(standin)
        assert not any(applied[customer_id] for customer_id, _, _ in users[dry_day]), (
            "a dry run sends nothing"
        )

        # 3. Backfill three days: range, reprocess behaviour, max active runs, chunk_size.
        dialog = _open_trigger_dialog(page)
        dialog.get_by_text("Run this Dag for a range of dates").click(force=True)
        expect(dialog.get_by_role("heading", name=f"Run Backfill - {DAG_ID}")).to_be_visible()
        date_range = dialog.get_by_text("Date Range", exact=True)
        fields = dialog.get_by_test_id("datetime-input")
        pick_datetime(page, fields.nth(0), _midnight(backfill_days[0]), close_on=date_range)
        pick_datetime(page, fields.nth(1), _midnight(backfill_days[-1]), close_on=date_range)
        expect(dialog.get_by_text("3 runs will be triggered.")).to_be_visible()
        dialog.get_by_text("All Runs", exact=True).click(force=True)
        expect(dialog.get_by_role("radio", name="All Runs")).to_be_checked()
        dialog.locator("input[name=max_active_runs]").fill("3")
        # Airflow 3.3's Backfill dialog sends the params form only with this box ticked; unticked,
        # every run gets the DAG's defaults whatever the form shows.
        override = dialog.get_by_role("checkbox", name="Override parameters on existing runs")
        dialog.get_by_text("Override parameters on existing runs", exact=True).click()
        expect(override).to_be_checked()
        _expect_params_form(dialog, params)
        chunk_size = dialog.get_by_role("spinbutton", name=_title(params, "chunk_size"), exact=True)
        chunk_size.fill(str(CHUNK_SIZE))
        chunk_size.press("Tab")
        expect(chunk_size).to_have_value(str(CHUNK_SIZE))
        date_range.scroll_into_view_if_needed()
        page.set_viewport_size({"width": 1400, "height": 1500})  # the whole dialog, params included
        shots.take(page, "backfill-dialog", publish_as=README_FIGURES["backfill-dialog"])
        page.set_viewport_size({"width": 1400, "height": 900})
        dialog.get_by_role("button", name="Run Backfill").click()
        expect(page.get_by_text("Backfill jobs have been successfully triggered.").first).to_be_visible()

        backfills = stack.api("GET", "/backfills", params={"dag_id": DAG_ID})["backfills"]
        assert len(backfills) == 1
        backfill = stack.wait_for_backfill(backfills[0]["id"])
        assert backfill["reprocess_behavior"] == "completed"
        assert backfill["max_active_runs"] == 3
        runs = sorted(
            (run for run in stack.dag_runs(DAG_ID) if run["run_type"] == "backfill"),
            key=lambda run: run["logical_date"],
        )
        assert [run["logical_date"][:10] for run in runs] == [day.isoformat() for day in backfill_days]
        assert {run["state"] for run in runs} == {"success"}, stack.logs_tail()
        assert {run["conf"].get("chunk_size") for run in runs} == {CHUNK_SIZE}

        page.goto(f"/dags/{DAG_ID}/runs")
        _widen_grid(page)
        for run in runs:
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=run["dag_run_id"]))
            expect(row.get_by_test_id("state-badge")).to_have_text("Success")
        shots.take(page, "backfill-grid", publish_as=README_FIGURES["backfill-grid"])

        audit = _audit_by_day(postgres_warehouse.url)
        applied = _applied_ids(standin)
        for day in backfill_days:
            assert len(audit[day.isoformat()]) == PER_DAY
            assert {row["status"] for row in audit[day.isoformat()]} == {"succeeded"}
            assert all(applied[customer_id] == 1 for customer_id, _, _ in users[day])

        # 4. The mapped start_tracking of one backfilled day: its chunks' labels, from the grid.
        run_id = runs[1]["dag_run_id"]
        page.goto(f"/dags/{DAG_ID}/runs/{run_id}")
        page.locator(f'a[href$="/runs/{run_id}/tasks/start_tracking/mapped"]').first.click()
        page.wait_for_url(re.compile(r"/tasks/start_tracking/mapped$"))
        labels = page.get_by_role("link", name=CHUNK_LABEL)
        expect(labels.first).to_be_visible()
        texts = labels.all_inner_texts()
        matches = [CHUNK_LABEL.match(text) for text in texts]
        parsed = [tuple(int(part) for part in match.groups()) for match in matches if match]
        chunks = parsed[0][1]
        assert chunks >= 2, texts
        assert sorted(index for index, _, _ in parsed) == list(range(1, chunks + 1)), texts
        assert {total for _, total, _ in parsed} == {chunks}, texts
        assert sum(count for _, _, count in parsed) == PER_DAY, texts
        chunk_rows = page.get_by_role("row").filter(has=labels)
        expect(chunk_rows.get_by_test_id("state-badge")).to_have_text(["Success"] * chunks)
        mapped = [ti for ti in stack.task_instances(DAG_ID, run_id) if ti["task_id"] == "start_tracking"]
        assert sorted(ti["rendered_map_index"] for ti in mapped) == sorted(texts)
        shots.take(page, "mapped-chunks")

        # 5. The run's outcome: its per-status counts, without opening a log.
        succeeded = show_run_outcome(page, run_id)
        expect(succeeded).to_contain_text(str(PER_DAY))
        page.set_viewport_size({"width": 1400, "height": 1400})
        shots.take(page, "run-outcome", publish_as=README_FIGURES["run-outcome"])
        page.set_viewport_size({"width": 1400, "height": 900})

        # 6. chunk_size 3: the field will not go below the minimum, and a conf that says 3 is refused.
        runs_before = len(stack.dag_runs(DAG_ID))
        dialog = _open_trigger_dialog(page)
        chunk_size = dialog.get_by_role("spinbutton", name=_title(params, "chunk_size"), exact=True)
        chunk_size.fill("3")
        expect(dialog.get_by_role("button", name="decrease value")).to_be_disabled()
        chunk_size.press("Tab")
        expect(chunk_size).to_have_value(str(params["chunk_size"]["schema"]["minimum"]))
        dialog.get_by_role("button", name="Advanced Options").click()
        dialog.get_by_role("code").click()
        page.keyboard.press("Control+A")
        page.keyboard.press("Delete")
        page.keyboard.insert_text('{"dry_run": true, "force": false, "chunk_size": 3}')
        dialog.get_by_role("button", name="Trigger", exact=True).click()
        refusal = dialog.get_by_text(
            re.compile(r"Invalid input for param chunk_size: 3 is less than the minimum")
        )
        expect(refusal).to_be_visible()
        refusal.scroll_into_view_if_needed()
        shots.take(page, "chunk-size-refused")
        assert len(stack.dag_runs(DAG_ID)) == runs_before, "a refused form creates no run"

    elapsed = time.monotonic() - started
    FIGURES.append(f"ui: {len(shots.saved)} screenshots in {shots.artifacts}, test body {elapsed:.0f} s")
