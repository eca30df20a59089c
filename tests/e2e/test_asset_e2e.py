"""What a run tells the systems around Airflow, on a real Airflow: the audit table's asset starts a
downstream DAG with the run's counts, the ``blueshift.*`` metrics reach Airflow's metrics channel
(OpenTelemetry, to an OTLP/HTTP receiver of the test), and OpenLineage events (file transport) name
the warehouse source and the audit table.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandbox.airflow_stack import ROOT, AirflowStack
from sandbox.blueshift_standin import free_port
from sandbox.demo_warehouse import seed_source
from tests.conftest import FIGURES
from tests.dags.conftest import audit_rows, users_of_day
from tests.e2e.conftest import pipeline_env

DAG_ID = "blueshift_start_tracking"
DOWNSTREAM_ID = "blueshift_audit_downstream"
USERS = 120
REJECTED = 6
DOWNSTREAM_DAG = f'''
from datetime import datetime, timezone

from airflow.sdk import dag, task

from blueshift.lineage import audit_asset
from blueshift.settings import Settings


@dag(
    dag_id="{DOWNSTREAM_ID}",
    schedule=[audit_asset(Settings.from_env())],
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    tags=["test"],
)
def downstream():
    @task
    def report(triggering_asset_events=None):
        """What a dbt job would read: the counts of the runs that triggered this one."""
        return [event.extra for events in triggering_asset_events.values() for event in events]

    report()


downstream()
'''


@dataclass
class OtlpReceiver:
    """An OTLP/HTTP metrics receiver: the counters' totals over every exporting process, and the gauges.

    A cumulative point repeats its stream's total so far (a stream: one process's counter, known by its
    start time), so each stream counts with its last total; delta points add up.
    """

    port: int = field(default_factory=free_port)
    cumulative: dict[tuple[str, int, str], int] = field(default_factory=dict)
    deltas: Counter[str] = field(default_factory=Counter)
    gauges: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, body: bytes) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )
        from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE

        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        metrics = [m for r in request.resource_metrics for s in r.scope_metrics for m in s.metrics]
        with self.lock:
            for metric in metrics:
                cumulative = metric.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
                for point in metric.sum.data_points:
                    value = point.as_int or int(point.as_double)
                    if cumulative:
                        key = (metric.name, point.start_time_unix_nano, str(point.attributes))
                        self.cumulative[key] = max(value, self.cumulative.get(key, 0))
                    else:
                        self.deltas[metric.name] += value
                for point in metric.gauge.data_points:
                    self.gauges.setdefault(metric.name, []).append(point.as_double or float(point.as_int))

    def totals(self) -> Counter[str]:
        with self.lock:
            totals = Counter(self.deltas)
            for (name, _, _), value in self.cumulative.items():
                totals[name] += value
            return totals

    def start(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.take(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def blueshift(self) -> dict[str, int]:
        """Return the totals of the ``airflow.blueshift.*`` counters, without that prefix."""
        prefix = "airflow.blueshift."
        return {name.removeprefix(prefix): n for name, n in self.totals().items() if name.startswith(prefix)}


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    server = receiver.start()
    yield receiver
    server.shutdown()


@pytest.fixture
def stack(postgres_warehouse, standin, otlp, tmp_path) -> Iterator[AirflowStack]:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / f"{DAG_ID}.py").symlink_to(ROOT / "dags" / f"{DAG_ID}.py")
    (dags / f"{DOWNSTREAM_ID}.py").write_text(DOWNSTREAM_DAG)
    env = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        **pipeline_env(postgres_warehouse.conn_json, standin.url),
        "BLUESHIFT_RATE_LIMIT": "200",
        "BLUESHIFT_BACKOFF_BASE_SECONDS": "0.01",
        "BLUESHIFT_BACKOFF_CAP_SECONDS": "0.05",
        "BLUESHIFT_PROGRESS_INTERVAL": "0.5",
        # Airflow's own metrics channel, OpenTelemetry here (test_metrics_statsd.py covers StatsD):
        # the standard OTEL_* variables, which Airflow 3.3 prefers to [metrics] otel_*.
        "AIRFLOW__METRICS__OTEL_ON": "True",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"http://127.0.0.1:{otlp.port}/v1/metrics",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(tmp_path / "openlineage.jsonl"), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "blueshift-e2e",
    }
    stack = AirflowStack(env)
    try:
        yield stack.start()
    finally:
        stack.stop()


def _downstream_events(stack: AirflowStack, source_run_id: str, timeout: float = 180) -> list[dict[str, Any]]:
    """Wait for an asset-triggered run of the downstream DAG that the run ``source_run_id`` triggered;
    return the asset events of that run's source (the scheduled run of the latest window, which
    unpausing creates, may trigger a downstream run of its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in stack.dag_runs(DOWNSTREAM_ID):
            if run["run_type"] != "asset_triggered":
                continue
            path = f"/dags/{DOWNSTREAM_ID}/dagRuns/{run['dag_run_id']}/upstreamAssetEvents"
            events = stack.api("GET", path)["asset_events"]
            events = [event for event in events if event["source_run_id"] == source_run_id]
            if events:
                stack.wait_for_runs(DOWNSTREAM_ID, {run["dag_run_id"]}, timeout=timeout)
                return events
        time.sleep(2)
    raise TimeoutError(f"no downstream run triggered by {source_run_id}: {stack.dag_runs(DOWNSTREAM_ID)}")


def _lineage_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_run_triggers_downstream_with_counts_and_reports_metrics_and_lineage(
    stack, postgres_warehouse, standin, otlp, tmp_path
):
    logical = datetime.now(timezone.utc).date() - timedelta(days=30)
    window = (logical - timedelta(days=1)).isoformat()
    users = users_of_day(window, USERS)
    seed_source(postgres_warehouse.url, users)
    standin.state.config.fault_rate = 0.1
    standin.state.config.faults = ["429", "503"]
    standin.state.config.fixed = {users[n][1]: 422 for n in range(REJECTED)}
    for dag_id in (DAG_ID, DOWNSTREAM_ID):
        stack.wait_for_dag(dag_id)
        stack.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    run = stack.api(
        "POST",
        f"/dags/{DAG_ID}/dagRuns",
        json={"logical_date": f"{logical.isoformat()}T00:00:00Z", "conf": {"chunk_size": 40}},
    )
    run_id = run["dag_run_id"]
    (finished,) = stack.wait_for_runs(DAG_ID, {run_id}, timeout=300)
    assert finished["state"] == "success", stack.logs_tail()

    # The asset: a downstream run of type asset_triggered, whose triggering event carries the counts.
    statuses = Counter(row["status"] for row in audit_rows(postgres_warehouse.url))
    expected = {"users": USERS, "succeeded": USERS - REJECTED, "rejected": REJECTED, "failed": 0}
    assert dict(statuses) == {"succeeded": USERS - REJECTED, "rejected": REJECTED}
    events = _downstream_events(stack, run_id)
    assert len(events) == 1, events
    assert events[0]["extra"] | expected == events[0]["extra"], events[0]["extra"]
    assert events[0]["source_task_id"] == "audit"
    assert "@" not in json.dumps(events[0]["extra"])

    # The metrics: the chunk tasks' counters equal what the stand-in saw and answered.
    snapshot = standin.state.snapshot()
    expected_metrics = {
        "requests": snapshot["requests"],
        "throttled": snapshot["statuses"].get("429", 0),
        "outcomes.succeeded": USERS - REJECTED,
        "outcomes.rejected": REJECTED,
        "run.succeeded": USERS - REJECTED,
        "run.rejected": REJECTED,
    }
    deadline = time.monotonic() + 30
    while otlp.blueshift() | expected_metrics != otlp.blueshift() and time.monotonic() < deadline:
        time.sleep(1)
    metrics = otlp.blueshift()
    assert {name: metrics.get(name) for name in expected_metrics} == expected_metrics, metrics
    assert expected_metrics["throttled"] > 0, "the faults included no 429: nothing to count"
    paces = otlp.gauges.get("airflow.blueshift.pace", [])
    assert paces and all(0 < pace <= 200 for pace in paces), paces

    # Lineage: the chunk task's COMPLETE events name the source table and the audit table.
    lineage = [
        event
        for event in _lineage_events(tmp_path / "openlineage.jsonl")
        if event.get("eventType") == "COMPLETE" and event["job"]["name"].endswith(".start_tracking")
    ]
    assert lineage, "no OpenLineage COMPLETE event of start_tracking"
    warehouse = json.loads(postgres_warehouse.conn_json)  # the server BLUESHIFT_TEST_PG names
    namespace, database = f"postgres://{warehouse['host']}:{warehouse['port']}", warehouse["schema"]
    for event in lineage:
        assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [
            (namespace, f"{database}.public.reconsented_users")
        ]
        assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
            (namespace, f"{database}.public.blueshift_start_tracking_audit")
        ]
    FIGURES.append(
        f"asset e2e: {USERS} users, {snapshot['requests']} requests ({expected_metrics['throttled']} 429s) "
        f"counted by airflow.blueshift.* over OpenTelemetry; downstream DAG triggered by the audit asset"
    )
