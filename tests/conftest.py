"""Test setup: a private AIRFLOW_HOME with a migrated metadata DB, the stand-in, and warehouses.

Airflow reads its configuration when first imported, so the environment is set here, at import
time of the conftest, before any test module imports airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The PostgreSQL server the tests create their databases on (an admin DSN, BLUESHIFT_TEST_PG): read
# at this import, before the ``BLUESHIFT_*`` variables of the developer's shell are cleared below.
from sandbox.airflow_stack import PG_ADMIN_DSN as PG_DSN

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


def pg_url(database: str) -> str:
    """Return the SQLAlchemy URL of ``database`` on the test PostgreSQL server."""
    from sqlalchemy.engine import make_url

    url = make_url(PG_DSN).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


def pg_conn_json(database: str) -> str:
    """Return the Airflow connection JSON of ``database`` on the test PostgreSQL server."""
    import json

    from sqlalchemy.engine import make_url

    url = make_url(PG_DSN)
    conn = {
        "conn_type": "postgres",
        "host": url.host or "127.0.0.1",
        "port": url.port or 5432,
        "login": url.username or "postgres",
        "schema": database,
    }
    if url.password:
        conn["password"] = url.password
    return json.dumps(conn)


@pytest.fixture
def postgres_warehouse() -> Iterator[WarehouseDb]:
    """A PostgreSQL database created for the test and dropped after it."""
    import psycopg

    name = f"blueshift_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield WarehouseDb("postgres", pg_conn_json(name), pg_url(name))
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


MARIADB_DSN = os.environ.get("BLUESHIFT_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
"""The MariaDB (or MySQL) server the tests create their databases on."""


@pytest.fixture
def mariadb_warehouse() -> Iterator[WarehouseDb]:
    """A MariaDB database created for the test and dropped after it (the mysql provider's hook)."""
    import json

    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"blueshift_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(MARIADB_DSN)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = make_url(MARIADB_DSN)
    conn = {
        "conn_type": "mysql",
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "login": url.username or "root",
        "schema": name,
        "extra": {"charset": "utf8mb4"},
    }
    if url.password:
        conn["password"] = url.password
    yield WarehouseDb(
        "mariadb", json.dumps(conn), url.set(database=name).render_as_string(hide_password=False)
    )
    with admin.begin() as conn_:
        conn_.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    admin.dispose()


@pytest.fixture
def duckdb_warehouse(tmp_path: Path) -> WarehouseDb:
    """A DuckDB file (the duckdb provider's hook); one writer at a time, so never the state store."""
    path = tmp_path / "warehouse.duckdb"
    return WarehouseDb("duckdb", f'{{"conn_type": "duckdb", "host": "{path}"}}', f"duckdb:///{path}")


@pytest.fixture
def postgres_state_store() -> Iterator[str]:
    """A PostgreSQL database for the state store; yields its Airflow connection JSON."""
    import psycopg

    name = f"blueshift_state_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield pg_conn_json(name)
    with psycopg.connect(PG_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse_db(request: pytest.FixtureRequest, tmp_path: Path) -> WarehouseDb:
    """Each warehouse kind in turn: SQLite (embedded default) and PostgreSQL."""
    if request.param == "sqlite":
        return _sqlite_warehouse(tmp_path)
    return request.getfixturevalue("postgres_warehouse")
