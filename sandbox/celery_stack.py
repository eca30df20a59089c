"""The compose deployment as plain processes: CeleryExecutor, Redis broker, PostgreSQL, several workers.

api-server, scheduler, dag-processor and triggerer as in ``sandbox.airflow_stack``, plus
``airflow celery worker`` processes, each with a hostname of its own and a small concurrency. The
Airflow settings are ``sandbox.deployment``'s, the ones docker-compose.yaml holds; only the places
differ (loopback ports, the stack's own databases).

Other test runs may share the Redis server: each stack uses a Redis database picked at random, a
key prefix and a Celery queue of its own, and deletes its keys when it stops.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
import uuid
from typing import Any

from sandbox.airflow_stack import AirflowStack
from sandbox.blueshift_standin import free_port
from sandbox.deployment import HOSTNAME_VARIABLE, Places, airflow_environment

REDIS_URL = "redis://127.0.0.1:6379"
REDIS_DATABASES = 16
"""Redis' default number of databases; database 0 is left to whoever uses Redis without choosing."""


class CeleryAirflowStack(AirflowStack):
    """A whole Airflow on the CeleryExecutor with ``workers`` Celery workers named ``worker-1`` ..."""

    SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 3,
        concurrency: int = 2,
        pool_slots: int | None = None,
        parallelism: int = 16,
    ) -> None:
        run = uuid.uuid4().hex[:10]
        self.redis_db = random.randrange(1, REDIS_DATABASES)
        self.key_prefix = f"blueshift-e2e-{run}:"
        self.queue = f"blueshift_e2e_{run}"
        self.worker_names = [f"worker-{n}" for n in range(1, workers + 1)]
        self.concurrency = concurrency
        super().__init__(env, pool_slots=pool_slots, parallelism=parallelism)

    @property
    def places(self) -> Places:
        """Where this stack's shared parts are."""
        return Places(
            metadata_db=self.metadata_db,
            broker=f"{REDIS_URL}/{self.redis_db}",
            api_server=self.url,
            passwords_file=str(self.home / "simple_auth_manager_passwords.json.generated"),
        )

    def _executor_env(self) -> dict[str, str]:
        return {
            **airflow_environment(self.places),
            # Isolation from other runs on the same Redis (see the module's docstring).
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.key_prefix,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            # Ports compose gives each container; here free ones, since runs share the machine.
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGERER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "sandbox.deployment.process_hostname",
            # Test only: a dead worker's task is detected after 20 s instead of Airflow's 300 s.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        }

    def start(self, timeout: float = 240) -> CeleryAirflowStack:
        try:
            super().start(timeout)
            for name in self.worker_names:
                self.start_worker(name)
            for name in self.worker_names:
                self.wait_for_worker(name, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, name: str) -> None:
        """Start the Celery worker ``name`` (also its hostname, recorded on the tasks it runs)."""
        self.start_process(
            name,
            [
                "celery",
                "worker",
                "--celery-hostname",
                f"{name}@sandbox",
                "--concurrency",
                str(self.concurrency),
                "--queues",
                self.queue,
            ],
            env={
                HOSTNAME_VARIABLE: name,
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            },
        )

    def wait_for_worker(self, name: str, timeout: float = 180) -> None:
        """Wait until the worker ``name`` says it is ready to take tasks."""
        log = self.home / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if f"{name}@sandbox ready" in log.read_text(errors="replace"):
                return
            time.sleep(1)
        raise TimeoutError(f"Celery worker {name} did not get ready in time:\n" + self.logs_tail())

    def worker_pids(self) -> dict[str, int]:
        """The process-group id of each running worker (its main process)."""
        return {name: process.pid for name, process in self.processes.items() if name in self.worker_names}

    def kill_worker(self, name: str) -> None:
        """Kill the worker and its task processes at once (SIGKILL), as the OOM killer or a lost host."""
        self.stop_process(name, signal.SIGKILL)

    def shut_down_worker(self, name: str, timeout: float = 300) -> float:
        """SIGTERM the worker's main process only, as ``docker stop`` with dumb-init's
        ``DUMB_INIT_SETSID=0`` does: Celery's warm shutdown. Return the seconds until it exited."""
        return self.stop_process(name, signal.SIGTERM, group=False, timeout=timeout)

    def stop(self, grace: float = 20) -> None:
        try:
            super().stop(grace)
        finally:
            self._delete_redis_keys()

    def _delete_redis_keys(self) -> None:
        import redis

        with contextlib.suppress(redis.RedisError):
            client: Any = redis.Redis.from_url(f"{REDIS_URL}/{self.redis_db}")
            keys = list(client.scan_iter(match=self.key_prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
