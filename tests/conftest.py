"""Test setup: a private AIRFLOW_HOME with a migrated metadata DB, the stand-in, and warehouses.

Airflow reads its configuration when first imported, so the environment is set here, at import
time of the conftest, before any test module imports airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The servers the tests create their databases on (BLUESHIFT_TEST_PG, BLUESHIFT_TEST_MARIADB): read
# at this import, before the ``BLUESHIFT_*`` variables of the developer's shell are cleared below.
from sandbox.databases import (
    mariadb_database,
    postgres_database,
)

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="blueshift-tests-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
)
for name in list(os.environ):
    # The shell's pipeline settings and connections must not leak into tests; BLUESHIFT_TEST_* are
    # the suite's own settings and stay (the e2e stack reads BLUESHIFT_TEST_PG too).
    if name.startswith(("BLUESHIFT_", "AIRFLOW_CONN_")) and not name.startswith("BLUESHIFT_TEST_"):
        del os.environ[name]

FIGURES: list[str] = []
"""Figures the tests measured (fault runs, budget, crashes): printed together at the end of the run."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in FIGURES:
            terminalreporter.write_line(line)


API_KEY = "sk-test-7Hq2ZxV9pL4mN8rT"


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Migrate a fresh metadata DB once per test session (SQLite in the private AIRFLOW_HOME)."""
    airflow = Path(sys.executable).parent / "airflow"
    result = subprocess.run(
        [str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ.copy(), timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return AIRFLOW_HOME


@pytest.fixture
def standin() -> Iterator[object]:
    """A fresh Blueshift stand-in on a free loopback port, accepting ``API_KEY``."""
    from sandbox.blueshift_standin import StandIn, StandInConfig

    server = StandIn(StandInConfig(api_key=API_KEY)).start()
    yield server
    server.stop()


@dataclass
class WarehouseDb:
    """A throw-away warehouse: its Airflow connection JSON and a SQLAlchemy URL for assertions."""

    kind: str
    conn_json: str
    url: str


def _sqlite_warehouse(tmp_path: Path) -> WarehouseDb:
    path = tmp_path / "warehouse.db"
    return WarehouseDb("sqlite", f'{{"conn_type": "sqlite", "host": "{path}"}}', f"sqlite:///{path}")


@pytest.fixture
def sqlite_warehouse(tmp_path: Path) -> WarehouseDb:
    return _sqlite_warehouse(tmp_path)


@pytest.fixture
def postgres_warehouse() -> Iterator[WarehouseDb]:
    """A PostgreSQL database created for the test and dropped after it."""
    with postgres_database("blueshift_test") as database:
        yield WarehouseDb("postgres", database.conn_json, database.url)


@pytest.fixture
def mariadb_warehouse() -> Iterator[WarehouseDb]:
    """A MariaDB database created for the test and dropped after it (the mysql provider's hook)."""
    with mariadb_database("blueshift_test") as database:
        yield WarehouseDb("mariadb", database.conn_json, database.url)


@pytest.fixture
def duckdb_warehouse(tmp_path: Path) -> WarehouseDb:
    """A DuckDB file (the duckdb provider's hook); one writer at a time, so never the state store."""
    path = tmp_path / "warehouse.duckdb"
    return WarehouseDb("duckdb", f'{{"conn_type": "duckdb", "host": "{path}"}}', f"duckdb:///{path}")


@pytest.fixture
def postgres_state_store() -> Iterator[str]:
    """A PostgreSQL database for the state store; yields its Airflow connection JSON."""
    with postgres_database("blueshift_state") as database:
        yield database.conn_json


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse_db(request: pytest.FixtureRequest, tmp_path: Path) -> WarehouseDb:
    """Each warehouse kind in turn: SQLite (embedded default) and PostgreSQL."""
    if request.param == "sqlite":
        return _sqlite_warehouse(tmp_path)
    return request.getfixturevalue("postgres_warehouse")
