"""The audit write-back's SQL for every supported warehouse, rendered from ``sql/audit/*.sql``.

A run's outcomes are batch-loaded into a per-run scratch table (``create_scratch_table``,
``insert_scratch``), then ONE set-based statement moves them into the audit table
(``upsert_audit``), optionally followed by ``close_carried_over`` in the same transaction, and the
scratch table is dropped (``drop_table``). The upsert comes in three families, one template each:

- ``on_conflict``: ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (PostgreSQL, SQLite >= 3.24, DuckDB);
- ``on_duplicate_key``: ``INSERT ... SELECT ... ON DUPLICATE KEY UPDATE`` (MySQL, MariaDB);
- ``merge``: ``MERGE INTO ... USING scratch`` with every condition in a ``CASE`` inside ``SET``
  (Snowflake, BigQuery, Redshift, Databricks, SQL Server).

Every family applies the same rules: one row per ``AUDIT_KEY``; a dry run never overwrites a real
outcome; attempts add up across runs but not across retries of the same run's audit (the row's
``run_attempts`` is the share of the run that last wrote it, which a retry replaces).

An audit table created by an older version lacks the columns added since (``run_attempts``): the
upsert then fails on it. ``audit_columns_missing`` names them and ``add_column_hint`` renders the
``ALTER TABLE`` that adds one.

This module renders text only (no SQLAlchemy, no connection): pass the result to SQLAlchemy's
``text()``. Bind parameters are named (``:now``); bind the ones in ``TIMESTAMP_PARAMS`` as
timestamps (naive UTC) and the scratch rows' ``http_status`` and ``attempts`` as integers. Table
names are validated as plain ``name`` or ``schema.name`` identifiers and interpolated as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from blueshift.exceptions import BlueshiftConfigError
from blueshift.settings import validate_identifier

AUDIT_COLUMNS = (
    "dag_id",
    "window_start",
    "window_end",
    "user_key",
    "run_id",
    "customer_id",
    "email",
    "status",
    "http_status",
    "attempts",
    "run_attempts",
    "error",
    "created_at",
    "updated_at",
)
"""The audit table's columns, in table order."""

AUDIT_KEY = ("dag_id", "window_start", "window_end", "user_key")
"""The audit table's key: one row per DAG, window and customer."""

SCRATCH_COLUMNS = tuple(
    column for column in AUDIT_COLUMNS if column not in ("run_attempts", "created_at", "updated_at")
)
"""The scratch table's columns (and ``insert_scratch``'s bind parameters): the upsert sets the rest."""

TIMESTAMP_PARAMS = frozenset({"window_start", "window_end", "now", "since"})
"""Bind parameters to bind as (naive UTC) timestamps."""

TEMPLATES = Path(__file__).resolve().parent / "sql" / "audit"
"""The folder of the SQL templates."""

FAMILIES: dict[str, str] = {
    "sqlite": "on_conflict",
    "postgresql": "on_conflict",
    "duckdb": "on_conflict",
    "mysql": "on_duplicate_key",
    "mariadb": "on_duplicate_key",
    "snowflake": "merge",
    "bigquery": "merge",
    "redshift": "merge",
    "redshift_connector": "merge",
    "databricks": "merge",
    "mssql": "merge",
}
"""SQLAlchemy dialect name -> upsert family."""


@dataclass(frozen=True)
class _Types:
    """Column types of one engine, by the placeholders of the DDL templates."""

    name: str  # dag_id, run_id: up to 250 characters, indexable
    hash: str  # user_key: a 64-character hex digest, indexable
    status: str  # a status word
    text: str  # free text: customer_id, email, error
    int: str
    ts: str  # a naive UTC timestamp
    primary_key: bool  # whether the engine enforces a PRIMARY KEY

    def placeholders(self) -> dict[str, str]:
        """Return the DDL templates' type placeholders."""
        return {
            "name": self.name,
            "hash": self.hash,
            "status": self.status,
            "text": self.text,
            "int": self.int,
            "ts": self.ts,
        }


_STANDARD = _Types("VARCHAR(250)", "VARCHAR(64)", "VARCHAR(16)", "TEXT", "INTEGER", "TIMESTAMP", True)

_TYPES: dict[str, _Types] = {
    "sqlite": _STANDARD,
    "postgresql": _STANDARD,
    "duckdb": _STANDARD,
    # TEXT cannot be in a primary key; DATETIME, unlike TIMESTAMP, is not converted to the session's
    # time zone nor auto-updated; (6) keeps microseconds like the other engines.
    "mysql": _Types("VARCHAR(250)", "VARCHAR(64)", "VARCHAR(16)", "TEXT", "INTEGER", "DATETIME(6)", True),
    # Snowflake, BigQuery, Databricks and Redshift accept PRIMARY KEY but do not enforce it.
    "snowflake": _Types(
        "VARCHAR(250)", "VARCHAR(64)", "VARCHAR(16)", "VARCHAR", "INTEGER", "TIMESTAMP_NTZ", False
    ),
    "bigquery": _Types("STRING", "STRING", "STRING", "STRING", "INT64", "TIMESTAMP", False),
    "databricks": _Types("STRING", "STRING", "STRING", "STRING", "INT", "TIMESTAMP", False),
    # Redshift's TEXT is VARCHAR(256): free text gets the longest VARCHAR.
    "redshift": _Types(
        "VARCHAR(250)", "VARCHAR(64)", "VARCHAR(16)", "VARCHAR(65535)", "INTEGER", "TIMESTAMP", False
    ),
    # SQL Server's TIMESTAMP is a row version, not a point in time.
    "mssql": _Types(
        "VARCHAR(250)", "VARCHAR(64)", "VARCHAR(16)", "NVARCHAR(MAX)", "INT", "DATETIME2(6)", True
    ),
}
_TYPES["mariadb"] = _TYPES["mysql"]
_TYPES["redshift_connector"] = _TYPES["redshift"]


def family(dialect_name: str) -> str:
    """Return the upsert family (``on_conflict``, ``on_duplicate_key``, ``merge``) of a SQLAlchemy dialect."""
    try:
        return FAMILIES[dialect_name.lower()]
    except KeyError:
        raise BlueshiftConfigError(
            f"The warehouse's SQLAlchemy dialect {dialect_name!r} is not supported for the audit table: "
            f"use one of {', '.join(sorted(FAMILIES))}"
        ) from None


@cache
def _template(name: str) -> str:
    """Return the template ``name`` without its comment lines (a ``:word`` in one would bind)."""
    lines = (TEMPLATES / f"{name}.sql").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("--")).strip()


def _table(table: str, what: str) -> str:
    return validate_identifier(table, what)


def _create_table(dialect: str, table: str, template: str) -> str:
    family(dialect)
    types = _TYPES[dialect.lower()]
    if dialect.lower() == "mssql":
        create = f"IF OBJECT_ID(N'{table}', N'U') IS NULL\nCREATE TABLE"
    else:
        create = "CREATE TABLE IF NOT EXISTS"
    primary_key = f",\n    PRIMARY KEY ({', '.join(AUDIT_KEY)})" if types.primary_key else ""
    return _template(template).format(
        create=create, audit=table, scratch=table, primary_key=primary_key, **types.placeholders()
    )


def create_audit_table(dialect: str, audit: str) -> str:
    """Return the ``CREATE TABLE`` of the audit table if it does not exist, in the engine's types."""
    return _create_table(dialect, _table(audit, "audit table"), "create_audit_table")


def create_scratch_table(dialect: str, scratch: str) -> str:
    """Return the ``CREATE TABLE`` of a scratch table (``SCRATCH_COLUMNS``) if it does not exist."""
    return _create_table(dialect, _table(scratch, "scratch table"), "create_scratch_table")


def insert_scratch(dialect: str, scratch: str) -> str:
    """Return the ``INSERT`` of one scratch row, bind parameters named after ``SCRATCH_COLUMNS``."""
    family(dialect)
    return _template("insert_scratch").format(scratch=_table(scratch, "scratch table"))


def drop_table(dialect: str, table: str) -> str:
    """Return ``DROP TABLE IF EXISTS`` of ``table``."""
    family(dialect)
    return _template("drop_table").format(table=_table(table, "table"))


def upsert_audit(dialect: str, audit: str, scratch: str) -> str:
    """
    Return the one statement that moves the scratch rows into the audit table (bind ``:now``).

    A new key is inserted with ``created_at = updated_at = :now`` and ``run_attempts = attempts``.
    A matched row whose scratch status is ``dry_run`` while its own is not is left unchanged. Any
    other matched row takes run_id, customer_id, email, status, http_status and error from the
    scratch row, updated_at ``:now``, keeps created_at, and run_attempts becomes the scratch's
    attempts. Its ``attempts`` become ``attempts - COALESCE(run_attempts, 0)`` plus the scratch's
    when the run is the same (its audit retried: the run's earlier share is replaced) and the sum
    of both otherwise. The scratch rows must be unique per ``AUDIT_KEY`` and hold final statuses
    (no ``pending``, no ``skipped``).
    """
    kind = family(dialect)
    return _template(f"upsert_audit.{kind}").format(
        audit=_table(audit, "audit table"),
        scratch=_table(scratch, "scratch table"),
        terminator=";" if dialect.lower() == "mssql" else "",
    )


def close_carried_over(dialect: str, audit: str, scratch: str) -> str:
    """
    Return the ``UPDATE`` that closes earlier failures of customers who succeeded in this run.

    Audit rows with ``dag_id = :dag_id``, status ``failed`` and ``window_start >= :since`` whose
    user_key has a ``succeeded`` row in the scratch table become ``succeeded`` with
    ``run_id = :run_id``, http_status 200, no error and ``updated_at = :now``. Run it after
    ``upsert_audit``, in the same transaction.
    """
    family(dialect)
    return _template("close_carried_over").format(
        audit=_table(audit, "audit table"), scratch=_table(scratch, "scratch table")
    )


def audit_columns_missing(existing: Iterable[str]) -> list[str]:
    """
    Return the ``AUDIT_COLUMNS`` that are not in ``existing`` (compared case-insensitively), in order.

    Pass the column names of an existing audit table (e.g. the keys of ``SELECT * FROM audit WHERE
    1 = 0``: SQLAlchemy's inspector fails on some dialects, duckdb_engine's among them). A table
    created by an older version lacks the columns added since, and the upsert fails on it.
    """
    have = {column.lower() for column in existing}
    return [column for column in AUDIT_COLUMNS if column not in have]


_COLUMN_DDL = re.compile(r"^\s*(\w+)\s+\{(\w+)\}", re.MULTILINE)


def _column_placeholders() -> dict[str, str]:
    """Return the audit table's column -> type placeholder, as ``create_audit_table.sql`` has them."""
    return dict(_COLUMN_DDL.findall(_template("create_audit_table")))


def add_column_hint(dialect: str, audit: str, column: str) -> str:
    """
    Return the ``ALTER TABLE`` that adds ``column`` to an older audit table, in the engine's type.

    ``ALTER TABLE {audit} ADD COLUMN {column} {type}`` (SQL Server: ``ADD {column} {type}``). The
    column is added nullable, as ``run_attempts`` is: rows written before it read NULL.
    """
    family(dialect)
    table = _table(audit, "audit table")
    if column not in AUDIT_COLUMNS:
        raise ValueError(f"{column!r} is not a column of the audit table: one of {', '.join(AUDIT_COLUMNS)}")
    kind = _TYPES[dialect.lower()].placeholders()[_column_placeholders()[column]]
    add = "ADD" if dialect.lower() == "mssql" else "ADD COLUMN"
    return f"ALTER TABLE {table} {add} {column} {kind}"
