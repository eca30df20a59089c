"""Helpers for whole-DAG runs with ``dag.test()`` against the stand-in and a real warehouse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import API_KEY, ROOT, WarehouseDb

DAG_ID = "blueshift_start_tracking"
FAST_SETTINGS = {
    "BLUESHIFT_RATE_LIMIT": "2000",
    "BLUESHIFT_POOL_SLOTS": "1",
    "BLUESHIFT_MAX_IN_FLIGHT": "8",
    "BLUESHIFT_MAX_ATTEMPTS": "4",
    "BLUESHIFT_BACKOFF_BASE_SECONDS": "0.01",
    "BLUESHIFT_BACKOFF_CAP_SECONDS": "0.05",
    "BLUESHIFT_CONNECT_TIMEOUT": "2",
    "BLUESHIFT_READ_TIMEOUT": "0.5",
    "BLUESHIFT_TASK_RETRIES": "0",
    "BLUESHIFT_RETRY_DELAY_SECONDS": "0",
}


def audit_rows(url: str) -> list[dict[str, Any]]:
    """Return every audit row as a dict."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [
            dict(row._mapping)
            for row in conn.execute(sa.text("SELECT * FROM blueshift_start_tracking_audit"))
        ]
    engine.dispose()
    return rows


def users_of_day(day: str, count: int, prefix: str = "user") -> list[tuple[str, str, str]]:
    """Return ``count`` clean users who consented during ``day`` (YYYY-MM-DD)."""
    return [
        (
            f"{prefix.upper()}-{day}-{n:04d}",
            f"{prefix}{n:04d}.{day}@example.com",
            f"{day} {n % 24:02d}:{n % 60:02d}:00",
        )
        for n in range(count)
    ]


def run_logs(airflow_home: Path, run_id: str) -> str:
    """Return the task log files of one run of the DAG (none of another run's or DAG's)."""
    run_dir = airflow_home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
    return "\n".join(
        path.read_text(errors="replace") for path in sorted(run_dir.rglob("*")) if path.is_file()
    )


@dataclass
class RunResult:
    """The outcome of one ``dag.test()`` run."""

    state: str
    task_states: dict[str, list[str]]
    output: str
    run_id: str
    try_numbers: dict[str, list[int]]
    """Per task, the try number of each of its task instances (map index order): 1 = never retried."""


@pytest.fixture
def run_dag(
    airflow_db: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> Callable[..., RunResult]:
    """Return a function that runs the DAG once with ``dag.test()`` and reports states and output."""

    def run(
        warehouse: WarehouseDb,
        standin: Any,
        *,
        logical_date: datetime,
        conf: dict[str, Any] | None = None,
        settings: dict[str, str | None] | None = None,
        api_key: str = API_KEY,
    ) -> RunResult:
        """Run once; ``settings`` override environment variables (connections too), None unsets."""
        from airflow.dag_processing.dagbag import DagBag
        from airflow.utils.session import create_session

        monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE_DEFAULT", warehouse.conn_json)
        monkeypatch.setenv(
            "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
            f'{{"conn_type": "http", "host": "{standin.url}", "login": "{api_key}"}}',
        )
        for name, value in {**FAST_SETTINGS, **(settings or {})}.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        assert bag.import_errors == {}
        dag = bag.get_dag(DAG_ID)
        capfd.readouterr()
        caplog.clear()
        dag_run = dag.test(logical_date=logical_date.replace(tzinfo=timezone.utc), run_conf=conf)
        out, err = capfd.readouterr()
        with create_session() as session:
            from airflow.models.taskinstance import TaskInstance

            tis = session.query(TaskInstance).filter_by(dag_id=DAG_ID, run_id=dag_run.run_id).all()
            task_states: dict[str, list[str]] = {}
            try_numbers: dict[str, list[int]] = {}
            for ti in sorted(tis, key=lambda ti: (ti.task_id, ti.map_index)):
                task_states.setdefault(ti.task_id, []).append(str(ti.state))
                try_numbers.setdefault(ti.task_id, []).append(int(ti.try_number))
        # What this run printed and logged (both were cleared before it), and its own task log files.
        output = "\n".join([out, err, caplog.text, run_logs(Path(airflow_db), dag_run.run_id)])
        return RunResult(
            state=str(dag_run.state),
            task_states=task_states,
            output=output,
            run_id=dag_run.run_id,
            try_numbers=try_numbers,
        )

    return run
