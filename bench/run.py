"""Benchmarks of the whole DAG on a real Airflow, against the stand-in: prints figures, asserts nothing.

    python bench/run.py                      # every case, median of 3 runs each
    python bench/run.py --cases budget --runs 1
    python bench/run.py --cases compare --runs 1   # loop vs thread pool vs pipeline, small

Cases (the throughput issue's goals in brackets):
  budget    20,000 users, stand-in 100 ms latency and a 50 req/s limit answered with 429
            [users/s / 50 >= 0.95, 429s <= 1% of requests]
  speed     100,000 users, stand-in with no limit and 20 ms latency, BLUESHIFT_RATE_LIMIT 10,000/s;
            in the same run, against the same stand-in, over the same users: a one-request-at-a-time
            loop (a sample of them) and a plain ThreadPoolExecutor of BLUESHIFT_MAX_IN_FLIGHT threads
            over HttpHook.run (all of them) [>= 1,000 users/s, >= 20x the loop]
  compare   the speed case at 5,000 users (a sample of 500 for the loop): the three figures in a
            few minutes
  backfill  a three-day backfill, three runs at once, 50 req/s budget
            [busiest second <= budget + 10%, combined rate >= 0.9 x budget]
  scale     1,000,000 and 100,000 users in one window, dry run [peak RSS of every task process
            <= 500 MB, <= 256 mapped tasks, <= 1 MB XCom, time per user at 1M within 10% of 100k]

Each run uses a real Airflow (api-server, scheduler, dag-processor, LocalExecutor, PostgreSQL
metadata DB) and a PostgreSQL warehouse; the stand-in runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil
import psycopg
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins"))

from sandbox.airflow_stack import AirflowStack  # noqa: E402
from sandbox.blueshift_standin import StandInProcess  # noqa: E402
from sandbox.databases import mariadb_database, postgres_database  # noqa: E402
from sandbox.demo_warehouse import SOURCE_DDL, seed_source  # noqa: E402

DAG_ID = "blueshift_start_tracking"
ENDPOINT = "/api/v1/customers/unforget"
API_KEY = "bench-key-" + uuid.uuid4().hex[:8]


def api_time(value: str) -> datetime:
    """Parse a REST API timestamp; Python 3.10's fromisoformat does not take the trailing ``Z``."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


WAREHOUSES = ("postgres", "mariadb")
WAREHOUSE = "postgres"
"""Where the benchmarks keep the customers and the audit (``--warehouse``). ``postgres``: one PostgreSQL
database is warehouse and state store. ``mariadb``: the warehouse is a MariaDB database (the
``BLUESHIFT_TEST_MARIADB`` server) and the working state lives apart, in a PostgreSQL database named by
the connection ``blueshift_state``, the layout a cloud warehouse needs."""


@dataclass
class BenchWarehouse:
    """A throw-away warehouse: the Airflow connections the stack needs and a SQLAlchemy URL."""

    connections: dict[str, str]
    url: str


@contextlib.contextmanager
def warehouse_db() -> Iterator[BenchWarehouse]:
    """The warehouse of ``WAREHOUSE``, created for one case and dropped after it."""
    with contextlib.ExitStack() as databases:
        if WAREHOUSE == "mariadb":
            warehouse = databases.enter_context(mariadb_database("blueshift_bench"))
            state = databases.enter_context(postgres_database("blueshift_bench_state"))
            connections = {
                "AIRFLOW_CONN_WAREHOUSE_DEFAULT": warehouse.conn_json,
                "AIRFLOW_CONN_BLUESHIFT_STATE": state.conn_json,
            }
        else:
            warehouse = databases.enter_context(postgres_database("blueshift_bench"))
            connections = {"AIRFLOW_CONN_WAREHOUSE_DEFAULT": warehouse.conn_json}
        yield BenchWarehouse(connections, warehouse.url)


def _seed_rows(day: str, count: int) -> Iterator[tuple[str, str, str]]:
    for n in range(count):
        second = n * 86_399 // max(count, 1)
        clock = f"{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        yield f"B-{day}-{n}", f"b{n}.{day}@example.com", f"{day} {clock}"


def seed(warehouse: BenchWarehouse, days: dict[str, int]) -> None:
    """Insert ``count`` users per day: COPY on PostgreSQL (fast enough for millions), else batches."""
    if WAREHOUSE != "postgres":
        for day, count in days.items():
            rows = _seed_rows(day, count)
            while batch := list(itertools.islice(rows, 50_000)):
                seed_source(warehouse.url, batch)
        return
    dsn = sa.engine.make_url(warehouse.url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
        for day, count in days.items():
            buffer = io.StringIO()
            buffer.writelines("\t".join(row) + "\n" for row in _seed_rows(day, count))
            buffer.seek(0)
            with conn.cursor().copy(
                "COPY reconsented_users (customer_id, email, consented_at) FROM STDIN"
            ) as copy:
                copy.write(buffer.read())


def make_stack(warehouse: BenchWarehouse, standin: StandInProcess, **settings: str) -> AirflowStack:
    """A fresh Airflow with only the connections: no pool (the DAG needs none)."""
    env = {
        **warehouse.connections,
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT": json.dumps(
            {"conn_type": "http", "host": standin.url, "login": API_KEY}
        ),
        "BLUESHIFT_TASK_RETRIES": "1",
        "BLUESHIFT_RETRY_DELAY_SECONDS": "1",
        **settings,
    }
    return AirflowStack(env, parallelism=8)


def trigger(stack: AirflowStack, window_day: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trigger the run whose window is ``window_day`` (a manual run with logical date D covers D-1)."""
    logical = (datetime.fromisoformat(window_day) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    run = stack.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": logical, "conf": conf or {}})
    return dict(stack.wait_for_runs(DAG_ID, {run["dag_run_id"]}, timeout=7200)[0])


def run_seconds(run: dict[str, Any]) -> float:
    start = api_time(run["start_date"])
    end = api_time(run["end_date"])
    return (end - start).total_seconds()


def send_window(state: dict[str, Any]) -> float:
    seconds = [int(second) for second, count in state["per_second"].items() if count]
    return float(max(seconds) - min(seconds) + 1) if seconds else 0.0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
def case_budget(runs: int, users: int = 20_000) -> dict[str, Any]:
    standin = StandInProcess(API_KEY, "--rate-limit", "50", "--latency-ms", "100")
    days = [f"2026-11-{10 + i:02d}" for i in range(runs)]
    results = []
    with warehouse_db() as warehouse:
        seed(warehouse, dict.fromkeys(days, users))
        stack = make_stack(warehouse, standin, BLUESHIFT_RATE_LIMIT="50", BLUESHIFT_MAX_ACTIVE_CHUNKS="4")
        try:
            stack.start()
            stack.wait_for_dag(DAG_ID)
            stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
            for day in days:
                standin.reset()
                run = trigger(stack, day)
                state = standin.state()
                throttled = state["statuses"].get("429", 0)
                results.append(
                    {
                        "state": run["state"],
                        "users_per_s_run": users / run_seconds(run),
                        "users_per_s_sending": users / send_window(state),
                        "throttled_share": throttled / max(state["requests"], 1),
                        "busiest_second": state["busiest_second"],
                        "run_seconds": run_seconds(run),
                        "task_seconds": task_seconds(stack.task_instances(DAG_ID, run["dag_run_id"])),
                    }
                )
                print("budget run:", json.dumps(results[-1]), flush=True)
                results[-1]["per_second"] = state["per_second"]
        finally:
            stack.stop()
            standin.stop()
    return {
        "users": users,
        "runs": results,
        "median_users_per_s_run": median([r["users_per_s_run"] for r in results]),
        "median_users_per_s_sending": median([r["users_per_s_sending"] for r in results]),
        "ratio_run": median([r["users_per_s_run"] for r in results]) / 50,
        "ratio_sending": median([r["users_per_s_sending"] for r in results]) / 50,
        "max_throttled_share": max(r["throttled_share"] for r in results),
    }


def window_users(url: str, window_day: str) -> list[dict[str, str]]:
    """The window's users as the pipeline sends them (the seeded rows are already normalized)."""
    start = datetime.fromisoformat(window_day)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT customer_id, email FROM reconsented_users "
                "WHERE consented_at >= :start AND consented_at < :end ORDER BY consented_at"
            ),
            {"start": start, "end": start + timedelta(days=1)},
        ).all()
    engine.dispose()
    return [
        {name: value for name, value in (("customer_id", customer_id), ("email", email)) if value}
        for customer_id, email in rows
    ]


def stand_in_conditions(state: dict[str, Any]) -> dict[str, Any]:
    """The stand-in's settings while a side ran, read back from it (not assumed)."""
    config = state["config"]
    return {"stand_in_latency_ms": config["latency_ms"], "stand_in_rate_limit": config["rate_limit"]}


def side_figures(users: int, seconds: float, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "users": users,
        "seconds": round(seconds, 2),
        "users_per_s": users / seconds,
        "users_per_s_sending": users / max(send_window(state), 1.0),
        "statuses": state["statuses"],
        **stand_in_conditions(state),
    }


def sequential_side(standin: StandInProcess, payloads: list[dict[str, str]]) -> dict[str, Any]:
    """A plain one-request-at-a-time loop with the pipeline's hook over the same stand-in."""
    os.environ["AIRFLOW_CONN_BLUESHIFT_DEFAULT"] = json.dumps(
        {"conn_type": "http", "host": standin.url, "login": API_KEY}
    )
    from blueshift.hooks import BlueshiftHook

    standin.reset()
    hook = BlueshiftHook()
    started = time.perf_counter()
    for payload in payloads:
        hook.start_tracking(payload)
    elapsed = time.perf_counter() - started
    hook.close()
    return {
        **side_figures(len(payloads), elapsed, standin.state()),
        "in_flight": 1,
        "client_budget": None,
    }


def thread_pool_side(
    standin: StandInProcess, payloads: list[dict[str, str]], threads: int, read_seconds: float
) -> dict[str, Any]:
    """What a user would write instead: a ThreadPoolExecutor over the http provider's HttpHook.

    One hook per thread (its keep-alive adapter is not shared between threads); ``run`` builds a
    session per call, as it does in any task. The connection carries the key as its login and an
    empty password: without ``"password": ""`` HttpHook sends ``Basic base64("KEY:None")`` and
    every request is a 401 (the statuses are in the figures to show it did not happen).
    Its whole run is the read of the window from the warehouse (``read_seconds``) plus the sending.
    """
    conn_id = "blueshift_plain_pool"
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(
        {"conn_type": "http", "host": standin.url, "login": API_KEY, "password": ""}
    )
    from airflow.providers.http.hooks.http import HttpHook

    local = threading.local()

    def send(payload: dict[str, str]) -> int:
        hook = getattr(local, "hook", None)
        if hook is None:
            hook = local.hook = HttpHook(method="POST", http_conn_id=conn_id)
        response = hook.run(ENDPOINT, json=payload, extra_options={"check_response": False})
        return int(response.status_code)

    standin.reset()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        answered = Counter(pool.map(send, payloads))
    elapsed = time.perf_counter() - started
    figures = side_figures(len(payloads), read_seconds + elapsed, standin.state())
    figures["read_seconds"] = round(read_seconds, 2)
    figures["client_statuses"] = {str(status): count for status, count in sorted(answered.items())}
    return {**figures, "in_flight": threads, "client_budget": None}


def print_comparison(name: str, index: int, result: dict[str, Any]) -> None:
    """The three sides with the conditions each ran at, for a reader rather than a parser."""

    def limit(value: float | None) -> str:
        return f"{value:,.0f} req/s" if value else "none"

    loop, pool, pipe = result["loop"], result["thread_pool"], result["pipeline"]
    lines = [
        f"{name} run {index}, {pipe['users']:,} users: users/s over the whole side | while sending (first to"
        " last second with a request at the stand-in); same stand-in process and machine, one after the other"
    ]
    for label, side, whole in (
        ("one-at-a-time loop (BlueshiftHook)", loop, "whole = the loop"),
        (f"ThreadPoolExecutor({pool['in_flight']}) x HttpHook.run", pool, "whole = read + send"),
        ("pipeline (the DAG run)", pipe, "whole = trigger to audit done"),
    ):
        lines.append(
            f"  {label:<38} {side['users_per_s']:>8,.1f} | {side['users_per_s_sending']:>8,.1f}"
            f"  ({whole}; {side['users']:,} users, {side['in_flight']} in flight, client budget "
            f"{limit(side['client_budget'])}, stand-in limit {limit(side['stand_in_rate_limit'])}, "
            f"stand-in latency {side['stand_in_latency_ms']:g} ms, statuses {side['statuses']})"
        )
    versus_loop = f"{result['speedup_run']:.1f}x whole, {result['speedup_sending']:.1f}x while sending"
    versus_pool = (
        f"{result['speedup_vs_pool_run']:.1f}x whole, {result['speedup_vs_pool_sending']:.1f}x while sending"
    )
    lines.append(f"  pipeline ÷ loop {versus_loop}; pipeline ÷ thread pool {versus_pool}")
    print("\n".join(lines), flush=True)


def case_speed(runs: int, users: int = 100_000, sample: int = 2_000, name: str = "speed") -> dict[str, Any]:
    latency_ms, rate_limit, pool_slots, in_flight = 20, 10_000, 4, 48
    standin = StandInProcess(API_KEY, "--latency-ms", str(latency_ms))
    days = [f"2026-11-{10 + i:02d}" for i in range(runs)]
    results = []
    with warehouse_db() as warehouse:
        seed(warehouse, dict.fromkeys(days, users))
        stack = make_stack(
            warehouse,
            standin,
            BLUESHIFT_RATE_LIMIT=str(rate_limit),
            BLUESHIFT_MAX_ACTIVE_CHUNKS=str(pool_slots),
            BLUESHIFT_MAX_IN_FLIGHT=str(in_flight),
        )
        try:
            stack.start()
            stack.wait_for_dag(DAG_ID)
            stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
            for index, day in enumerate(days, start=1):
                standin.reset()
                run = trigger(stack, day, {"chunk_size": 10_000})
                state = standin.state()
                read_started = time.perf_counter()
                payloads = window_users(warehouse.url, day)
                read_seconds = time.perf_counter() - read_started
                pipeline = {
                    **side_figures(users, run_seconds(run), state),
                    "state": run["state"],
                    "in_flight": f"{pool_slots} slots x {in_flight}",
                    "client_budget": rate_limit,
                }
                loop = sequential_side(standin, payloads[:sample])
                pool = thread_pool_side(standin, payloads, in_flight, read_seconds)
                result = {
                    "state": run["state"],
                    "users_per_s_run": pipeline["users_per_s"],
                    "users_per_s_sending": pipeline["users_per_s_sending"],
                    "sequential_users_per_s": loop["users_per_s"],
                    "pool_users_per_s": pool["users_per_s"],
                    "pool_users_per_s_sending": pool["users_per_s_sending"],
                    "run_seconds": run_seconds(run),
                    "speedup_run": pipeline["users_per_s"] / loop["users_per_s"],
                    "speedup_sending": pipeline["users_per_s_sending"] / loop["users_per_s_sending"],
                    "speedup_vs_pool_run": pipeline["users_per_s"] / pool["users_per_s"],
                    "speedup_vs_pool_sending": pipeline["users_per_s_sending"] / pool["users_per_s_sending"],
                    "pipeline": pipeline,
                    "loop": loop,
                    "thread_pool": pool,
                }
                results.append(result)
                print(f"{name} run:", json.dumps(result), flush=True)
                print_comparison(name, index, result)
        finally:
            stack.stop()
            standin.stop()
    return {
        "users": users,
        "conditions": {
            "stand_in_latency_ms": latency_ms,
            "stand_in_rate_limit": None,
            "pipeline_BLUESHIFT_RATE_LIMIT": rate_limit,
            "pipeline_in_flight": f"{pool_slots} slots x BLUESHIFT_MAX_IN_FLIGHT {in_flight}",
            "loop": f"1 in flight, no client budget, {min(sample, users)} of the users",
            "thread_pool": f"{in_flight} threads, no client budget, all {users} users",
        },
        "runs": results,
        "median_users_per_s_run": median([r["users_per_s_run"] for r in results]),
        "median_users_per_s_sending": median([r["users_per_s_sending"] for r in results]),
        "median_sequential_users_per_s": median([r["sequential_users_per_s"] for r in results]),
        "median_pool_users_per_s": median([r["pool_users_per_s"] for r in results]),
        "median_pool_users_per_s_sending": median([r["pool_users_per_s_sending"] for r in results]),
        "median_speedup_run": median([r["speedup_run"] for r in results]),
        "median_speedup_sending": median([r["speedup_sending"] for r in results]),
        "median_speedup_vs_pool_run": median([r["speedup_vs_pool_run"] for r in results]),
        "median_speedup_vs_pool_sending": median([r["speedup_vs_pool_sending"] for r in results]),
    }


def case_compare(runs: int, users: int = 5_000, sample: int = 500) -> dict[str, Any]:
    """The speed case, small: the three figures in a few minutes (fixed costs weigh more here)."""
    return case_speed(runs, users=users, sample=sample, name="compare")


def case_backfill(runs: int, users_per_day: int = 3_000) -> dict[str, Any]:
    results = []
    for index in range(runs):
        standin = StandInProcess(API_KEY, "--rate-limit", "50", "--latency-ms", "100")
        days = ["2026-11-20", "2026-11-21", "2026-11-22"]
        with warehouse_db() as warehouse:
            seed(warehouse, dict.fromkeys(days, users_per_day))
            stack = make_stack(warehouse, standin, BLUESHIFT_RATE_LIMIT="50", BLUESHIFT_MAX_ACTIVE_CHUNKS="4")
            try:
                stack.start()
                stack.wait_for_dag(DAG_ID)
                stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
                stack.wait_for_runs(DAG_ID, run_type="scheduled", timeout=600)
                standin.reset()
                backfill = stack.api(
                    "POST",
                    "/backfills",
                    json={
                        "dag_id": DAG_ID,
                        "from_date": "2026-11-20T00:00:00Z",
                        "to_date": "2026-11-22T00:00:00Z",
                        "max_active_runs": 3,
                    },
                )
                stack.wait_for_backfill(backfill["id"], timeout=7200)
                state = standin.state()
                runs_done = [r for r in stack.dag_runs(DAG_ID) if r["run_type"] == "backfill"]
                total = users_per_day * len(days)
                result = {
                    "run": index + 1,
                    "states": sorted(r["state"] for r in runs_done),
                    "busiest_second": state["busiest_second"],
                    "combined_users_per_s": total / send_window(state),
                    "throttled": state["statuses"].get("429", 0),
                    "requests": state["requests"],
                }
                results.append(result)
                print("backfill run:", json.dumps(result), flush=True)
            finally:
                stack.stop()
                standin.stop()
    return {
        "users": users_per_day * 3,
        "runs": results,
        "max_busiest_second": max(r["busiest_second"] for r in results),
        "median_combined_users_per_s": median([r["combined_users_per_s"] for r in results]),
        "ratio": median([r["combined_users_per_s"] for r in results]) / 50,
    }


class RssSampler:
    """Peak RSS of every Airflow task process (the ones running under the scheduler)."""

    def __init__(self, root_pids: Callable[[], list[int]]) -> None:
        self.root_pids = root_pids
        self.peaks: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for root in self.root_pids():
                with contextlib.suppress(psutil.Error):
                    for child in psutil.Process(root).children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            rss = child.memory_info().rss / 2**20
                            name = " ".join(child.cmdline()[:4])[:80]
                            if rss > self.peaks.get(child.pid, (0.0, ""))[0]:
                                self.peaks[child.pid] = (rss, name)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return max((rss for rss, _ in self.peaks.values()), default=0.0)


def xcom_bytes(stack: AirflowStack, run_id: str) -> int:
    dsn = stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(pg_column_size(value)), 0) FROM xcom WHERE dag_id = %s AND run_id = %s",
            (DAG_ID, run_id),
        ).fetchone()
    return int(row[0]) if row else 0


def task_seconds(tasks: list[dict[str, Any]]) -> dict[str, float]:
    """Wall seconds per task id, first start to last end (where the run's time goes)."""
    spans: dict[str, list[datetime]] = {}
    for ti in tasks:
        if ti.get("start_date") and ti.get("end_date"):
            span = spans.setdefault(ti["task_id"], [])
            span += [api_time(ti["start_date"]), api_time(ti["end_date"])]
    return {task: round((max(s) - min(s)).total_seconds(), 1) for task, s in spans.items()}


def case_scale(runs: int, sizes: tuple[int, ...] = (100_000, 1_000_000)) -> dict[str, Any]:
    standin = StandInProcess(API_KEY)
    results: dict[int, list[dict[str, Any]]] = {size: [] for size in sizes}
    with warehouse_db() as warehouse:
        # One window per run and size: a manual run's logical date can be used only once.
        plan = [
            [(f"2026-10-{10 + run * len(sizes) + i:02d}", size) for i, size in enumerate(sizes)]
            for run in range(runs)
        ]
        seed(warehouse, {day: size for windows in plan for day, size in windows})
        stack = make_stack(warehouse, standin, BLUESHIFT_MAX_ACTIVE_CHUNKS="4")
        try:
            stack.start()
            stack.wait_for_dag(DAG_ID)
            stack.api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
            roots = lambda: [p.pid for name, p in stack.processes.items() if name == "scheduler"]  # noqa: E731
            for windows in plan:
                for day, size in windows:
                    with RssSampler(roots) as sampler:
                        run = trigger(stack, day, {"dry_run": True, "chunk_size": 10_000})
                    tasks = stack.task_instances(DAG_ID, run["dag_run_id"])
                    mapped = sum(1 for ti in tasks if ti["task_id"] == "start_tracking")
                    result = {
                        "users": size,
                        "state": run["state"],
                        "run_seconds": run_seconds(run),
                        "us_per_user": run_seconds(run) / size * 1e6,
                        "peak_task_rss_mb": sampler.peak_mb,
                        "mapped_tasks": mapped,
                        "xcom_bytes": xcom_bytes(stack, run["dag_run_id"]),
                        "task_seconds": task_seconds(tasks),
                    }
                    results[size].append(result)
                    print("scale run:", json.dumps(result), flush=True)
        finally:
            stack.stop()
            standin.stop()
    summary = {
        str(size): {
            "median_us_per_user": median([r["us_per_user"] for r in rows]),
            "max_peak_task_rss_mb": max(r["peak_task_rss_mb"] for r in rows),
            "max_mapped_tasks": max(r["mapped_tasks"] for r in rows),
            "max_xcom_bytes": max(r["xcom_bytes"] for r in rows),
            "runs": rows,
        }
        for size, rows in results.items()
    }
    small, large = (summary[str(size)]["median_us_per_user"] for size in sizes)
    summary["per_user_ratio_large_vs_small"] = large / small
    return summary


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "budget": case_budget,
    "speed": case_speed,
    "compare": case_compare,
    "backfill": case_backfill,
    "scale": case_scale,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases",
        default=",".join(name for name in CASES if name != "compare"),
        help="comma-separated: " + ", ".join(CASES) + " (all but compare by default)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--warehouse",
        choices=WAREHOUSES,
        default="postgres",
        help="postgres: warehouse and state store in one PostgreSQL database; mariadb: the warehouse "
        "on MariaDB and the state store apart on PostgreSQL (blueshift_state)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1/50 of the users, one run")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "results.json"))
    args = parser.parse_args()
    global WAREHOUSE
    WAREHOUSE = args.warehouse
    machine = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "warehouse": WAREHOUSE,
        "state_store": "postgres (blueshift_state)" if WAREHOUSE != "postgres" else "the warehouse",
    }
    print("machine:", json.dumps(machine), flush=True)
    report: dict[str, Any] = {"machine": machine}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quick = {
        "budget": {"users": 400},
        "speed": {"users": 2_000, "sample": 200},
        "compare": {"users": 2_000, "sample": 200},
        "backfill": {"users_per_day": 100},
        "scale": {"sizes": (2_000, 20_000)},
    }
    for name in args.cases.split(","):
        started = time.monotonic()
        report[name] = CASES[name](1 if args.quick else args.runs, **(quick[name] if args.quick else {}))
        report[name]["bench_seconds"] = round(time.monotonic() - started)
        print(f"== {name}:", json.dumps({k: v for k, v in report[name].items() if k != "runs"}), flush=True)
        out.write_text(json.dumps(report, indent=2))
    print(f"Results written to {out}")


if __name__ == "__main__":
    main()
