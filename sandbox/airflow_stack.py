"""A real Airflow for end-to-end tests and benchmarks: api-server, scheduler and dag-processor.

LocalExecutor, PostgreSQL as the metadata DB (a database created for the stack and dropped after),
a temporary AIRFLOW_HOME, and the simple auth manager with a known admin password. Every process
is started in its own process group and stopped (TERM, then KILL) within a bounded time.
``sandbox.celery_stack`` runs the same on the CeleryExecutor, with workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from sandbox.blueshift_standin import free_port
from sandbox.databases import PG_ADMIN_DSN

ROOT = Path(__file__).resolve().parents[1]
ADMIN_PASSWORD = "admin-e2e-password"


class AirflowStack:
    """Start and stop a whole local Airflow; talk to it over its REST API."""

    SERVICES: tuple[str, ...] = ("api-server", "scheduler", "dag-processor")
    """The ``airflow`` commands started (in this order) and stopped with the stack."""

    def __init__(self, env: dict[str, str], *, pool_slots: int | None = None, parallelism: int = 16) -> None:
        """Prepare a stack; ``pool_slots`` also creates the pool ``blueshift_api`` (the DAG needs none)."""
        self.home = Path(tempfile.mkdtemp(prefix="blueshift-e2e-airflow-"))
        self.db_name = f"blueshift_e2e_meta_{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.pool_slots = pool_slots
        self.url = f"http://127.0.0.1:{self.port}"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_db,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": uuid.uuid4().hex,
            "AIRFLOW__API__SECRET_KEY": uuid.uuid4().hex,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            **self._executor_env(),
            **env,
        }
        for name in list(self.env):
            if name.startswith("PYTEST_"):
                del self.env[name]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None

    @property
    def metadata_db(self) -> str:
        """SQLAlchemy URL of the stack's metadata DB."""
        pg_base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        return f"{pg_base}/{self.db_name}"

    def _executor_env(self) -> dict[str, str]:
        """Return the settings of the executor (here none: the LocalExecutor set above)."""
        return {}

    def airflow(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run one ``airflow`` CLI command against the stack's metadata DB."""
        return subprocess.run(
            ["airflow", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, timeout: float = 180) -> AirflowStack:
        import psycopg

        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
        (self.home / "simple_auth_manager_passwords.json.generated").write_text(
            json.dumps({"admin": ADMIN_PASSWORD})
        )
        migrated = self.airflow("db", "migrate")
        if migrated.returncode != 0:
            raise RuntimeError(
                "airflow db migrate failed:\n" + migrated.stdout[-3000:] + migrated.stderr[-3000:]
            )
        if self.pool_slots is not None:
            pool = self.airflow("pools", "set", "blueshift_api", str(self.pool_slots), "Blueshift API budget")
            if pool.returncode != 0:
                raise RuntimeError("airflow pools set failed:\n" + pool.stderr[-2000:])
        for name in self.SERVICES:
            self.start_process(name, [name])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/api/v2/version", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise TimeoutError("the api-server did not answer in time:\n" + self.logs_tail())
        return self

    def start_process(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        """Start ``airflow <args>`` as the process ``name``, in a process group of its own."""
        with (self.home / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                ["airflow", *args],
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop_process(
        self, name: str, sig: signal.Signals, *, group: bool = True, timeout: float = 60
    ) -> float:
        """Send ``sig`` to the process ``name`` (and, with ``group``, every process it started), wait
        until it exits (KILL after ``timeout``), forget it; return the seconds it took to exit."""
        process = self.processes.pop(name)
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, sig)
            else:
                os.kill(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        # Whatever it started and left behind (a task process of a killed group) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return time.monotonic() - started

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {process.returncode}:\n" + self.logs_tail())

    def logs_tail(self, chars: int = 3000) -> str:
        parts = []
        for log in sorted(self.home.glob("*.log")):
            parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-chars:])
        return "\n".join(parts)

    def stop(self, grace: float = 20) -> None:
        """Stop every process (TERM, then KILL after ``grace`` seconds) and drop the metadata DB."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # A group's leader may be gone while a task process it started still runs.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        import psycopg

        with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # REST API -----------------------------------------------------------------------------------
    @property
    def token(self) -> str:
        if self._token is None:
            response = requests.post(
                f"{self.url}/auth/token", json={"username": "admin", "password": ADMIN_PASSWORD}, timeout=10
            )
            response.raise_for_status()
            self._token = str(response.json()["access_token"])
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = requests.request(
            method,
            f"{self.url}/api/v2{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kwargs,
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(RuntimeError):
                self.api("GET", f"/dags/{dag_id}")
                return
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} was not parsed in time:\n" + self.logs_tail())

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"])

    def wait_for_runs(
        self,
        dag_id: str,
        run_ids: set[str] | None = None,
        *,
        run_type: str | None = None,
        timeout: float = 300,
    ) -> list[dict[str, Any]]:
        """Wait until the given runs (or the runs of ``run_type``, at least one) have finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            runs = [
                run
                for run in self.dag_runs(dag_id)
                if (run_ids is None or run["dag_run_id"] in run_ids)
                and (run_type is None or run["run_type"] == run_type)
            ]
            finished = runs and all(run["state"] in ("success", "failed") for run in runs)
            if finished and (run_ids is None or {run["dag_run_id"] for run in runs} == run_ids):
                return runs
            time.sleep(2)
        raise TimeoutError(f"runs did not finish in time: {self.dag_runs(dag_id)}\n" + self.logs_tail())

    def wait_for_backfill(self, backfill_id: int, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            backfill = self.api("GET", f"/backfills/{backfill_id}")
            if backfill.get("completed_at"):
                return dict(backfill)
            time.sleep(2)
        raise TimeoutError(f"backfill {backfill_id} did not complete in time:\n" + self.logs_tail())

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return list(
            self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 500})[
                "task_instances"
            ]
        )
