"""The Airflow settings of the Celery deployment: the one source of docker-compose.yaml and the test stack.

``docker-compose.yaml`` (its ``x-airflow-common`` environment) and ``sandbox.celery_stack``
(the Celery end-to-end stack of the tests) both hold exactly :func:`airflow_environment`, each with
its own places: the compose service names, or the loopback ports and databases of one test run.
``tests/test_deployment.py`` compares the compose file with it, so the two cannot drift apart.
Secrets are not here: compose takes them from ``.env``, the stack makes fresh ones.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__AUTH_MANAGER": (
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    ),
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
}
"""The settings that are the same wherever the deployment runs."""


@dataclass(frozen=True)
class Places:
    """Where a deployment's shared parts are: what every host of the deployment must reach."""

    metadata_db: str
    """SQLAlchemy URL of Airflow's metadata DB; Celery's results go to the same database."""
    broker: str
    """The Celery broker (Redis)."""
    api_server: str
    """Base URL of the api-server; task processes report to its execution API."""
    passwords_file: str
    """The simple auth manager's passwords file."""


COMPOSE_PLACES = Places(
    metadata_db="postgresql+psycopg2://airflow:airflow@postgres/airflow",
    broker="redis://:@redis:6379/0",
    api_server="http://airflow-apiserver:8080",
    passwords_file="/opt/airflow/config/simple_auth_manager_passwords.json",
)
"""The places inside docker-compose.yaml: its service names."""


def airflow_environment(places: Places) -> dict[str, str]:
    """Return the ``AIRFLOW__*`` environment (secrets aside) of every Airflow process of a deployment."""
    return {
        **SETTINGS,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": places.passwords_file,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": places.metadata_db,
        # Celery's database result backend takes a SQLAlchemy URL behind "db+"; the driver of the
        # metadata DB's URL is dropped, so that it uses SQLAlchemy's default for the dialect.
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + _without_driver(places.metadata_db),
        "AIRFLOW__CELERY__BROKER_URL": places.broker,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": places.api_server.rstrip("/") + "/execution/",
    }


def _without_driver(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return scheme.split("+", 1)[0] + "://" + rest


HOSTNAME_VARIABLE = "SANDBOX_HOSTNAME"


def process_hostname() -> str:
    """Return ``$SANDBOX_HOSTNAME``, else the machine's name: Airflow's ``[core] hostname_callable``.

    In compose every worker is a container with a hostname of its own, which Airflow records on
    each task instance it runs. The test stack runs its workers on one machine, so each gets its
    name through this variable; Airflow has no setting for a per-process hostname but this callable.
    """
    return os.environ.get(HOSTNAME_VARIABLE) or socket.getfqdn()
