"""The DAG parses cleanly, cheaply, and carries what operators of it need."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import pytest

from tests.conftest import ROOT
from tests.dags.conftest import DAG_ID


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def test_owner_tags_retries_docs(dag):
    assert dag.tags >= {"blueshift"}
    assert dag.doc_md and "unforget" in dag.doc_md
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.owner == "data-engineering"
        assert task.retries >= 1
        assert task.retry_exponential_backoff


def test_daily_windows_are_a_day_long(dag):
    from airflow.sdk import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    from airflow.serialization.encoders import coerce_to_core_timetable

    interval = coerce_to_core_timetable(dag.timetable).infer_manual_data_interval(
        run_after=datetime(2026, 11, 25, tzinfo=timezone.utc)
    )
    assert interval.start == datetime(2026, 11, 24, tzinfo=timezone.utc)
    assert interval.end == datetime(2026, 11, 25, tzinfo=timezone.utc)


def test_wiring(dag):
    from airflow.sdk import TriggerRule

    assert set(dag.task_ids) == {"extract_and_validate", "start_tracking", "audit"}
    send = dag.get_task("start_tracking")
    assert send.downstream_task_ids == {"audit"}
    assert dag.get_task("audit").trigger_rule == TriggerRule.ALL_DONE
    assert dag.get_task("extract_and_validate").downstream_task_ids == {"start_tracking", "audit"}
    assert "pool" not in send.partial_kwargs, "no pool to create: the cap below needs no setup"
    assert send.partial_kwargs["max_active_tis_per_dag"] == 4
    assert send.partial_kwargs["map_index_template"]


def test_params_are_documented_and_bounded(dag):
    params = dag.params
    assert params["dry_run"] is False
    assert params["chunk_size"] == 500
    for name in ("dry_run", "chunk_size"):
        schema = params.get_param(name).schema
        assert schema["title"] and params.get_param(name).description
    assert params.get_param("chunk_size").schema["minimum"] >= 1


def test_import_is_cheap():
    """No pandas and no warehouse query at parse time: the dag-processor imports this every 30 s."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "print('pandas' in sys.modules, 'psycopg' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "dags" / "blueshift_start_tracking.py")],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "plugins"), "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_bad_setting_is_an_import_error_that_names_it(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("BLUESHIFT_RATE_LIMIT", "lots")
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert any("BLUESHIFT_RATE_LIMIT='lots' is invalid" in error for error in bag.import_errors.values())
