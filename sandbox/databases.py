"""Throw-away databases on the machine's PostgreSQL and MariaDB servers, for tests and benchmarks.

``BLUESHIFT_TEST_PG`` (an admin DSN) and ``BLUESHIFT_TEST_MARIADB`` (a SQLAlchemy URL) name the
servers; each database is created under a unique name and dropped after use, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

PG_ADMIN_DSN = os.environ.get("BLUESHIFT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MARIADB_ADMIN_URL = os.environ.get("BLUESHIFT_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")


@dataclass(frozen=True)
class Database:
    """A database made for one test or case: its Airflow connection JSON and a SQLAlchemy URL."""

    conn_json: str
    url: str


def pg_url(database: str) -> str:
    """Return the SQLAlchemy URL of ``database`` on the PostgreSQL server of ``PG_ADMIN_DSN``."""
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_DSN).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


def pg_conn_json(database: str) -> str:
    """Return the Airflow connection JSON of ``database`` on the PostgreSQL server of ``PG_ADMIN_DSN``."""
    from sqlalchemy.engine import make_url

    url = make_url(PG_ADMIN_DSN)
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


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[Database]:
    """Create a PostgreSQL database named ``<prefix>_<random>``; drop it after."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Database(pg_conn_json(name), pg_url(name))
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def mariadb_database(prefix: str) -> Iterator[Database]:
    """Create a MariaDB (or MySQL) database ``<prefix>_<random>`` in utf8mb4; drop it after.

    Its connection is the mysql provider's (``mysqlclient``), with the utf8mb4 charset.
    """
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(MARIADB_ADMIN_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = make_url(MARIADB_ADMIN_URL)
    conn_fields = {
        "conn_type": "mysql",
        "host": url.host or "127.0.0.1",
        "port": url.port or 3306,
        "login": url.username or "root",
        "schema": name,
        "extra": {"charset": "utf8mb4"},
    }
    if url.password:
        conn_fields["password"] = url.password
    try:
        yield Database(json.dumps(conn_fields), url.set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
