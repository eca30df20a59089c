"""The audit write-back's SQL per dialect: it parses in every dialect and keeps the upsert rules live.

Every statement of every dialect is parsed by sqlglot in that dialect (so a typo in a template fails
here, also for the warehouses that cannot be reached from this machine); the upsert rules run for
real on SQLite, PostgreSQL, MySQL and MariaDB (both on the local MariaDB server) and DuckDB.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError

from blueshift import dialects
from blueshift.exceptions import BlueshiftConfigError
from blueshift.outcomes import Status

SQLGLOT_DIALECTS = {
    "sqlite": "sqlite",
    "postgresql": "postgres",
    "duckdb": "duckdb",
    "mysql": "mysql",
    "mariadb": "mysql",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
    "redshift": "redshift",
    "redshift_connector": "redshift",
    "databricks": "databricks",
    "mssql": "tsql",
}
"""Every supported SQLAlchemy dialect name -> the sqlglot dialect that parses its SQL."""

AUDIT = "analytics.blueshift_audit"
SCRATCH = "analytics.blueshift_audit_scratch_42"
BIND = re.compile(r"(?<![:\w]):(\w+)")


def statements(dialect: str) -> dict[str, str]:
    """Return every statement the module renders for ``dialect``, by function name."""
    return {
        "create_audit_table": dialects.create_audit_table(dialect, AUDIT),
        "create_scratch_table": dialects.create_scratch_table(dialect, SCRATCH),
        "insert_scratch": dialects.insert_scratch(dialect, SCRATCH),
        "drop_table": dialects.drop_table(dialect, SCRATCH),
        "upsert_audit": dialects.upsert_audit(dialect, AUDIT, SCRATCH),
        "close_carried_over": dialects.close_carried_over(dialect, AUDIT, SCRATCH),
    }


def parse(sql: str, dialect: str) -> exp.Expr:
    """Parse one statement strictly: a syntax error raises, and so does sqlglot's fallback to a Command.

    sqlglot parses what it does not understand as an opaque ``Command`` (with a warning only), which
    would hide a typo: that counts as a failure here. ``:name`` binds become the dialect's own
    placeholders first (``@name`` in T-SQL and BigQuery, ``?`` elsewhere).
    """
    read = SQLGLOT_DIALECTS[dialect]
    placeholder = (lambda m: f"@{m.group(1)}") if read in ("tsql", "bigquery") else (lambda m: "?")
    trees = sqlglot.parse(BIND.sub(placeholder, sql), read=read, error_level=ErrorLevel.RAISE)
    assert len(trees) == 1 and trees[0] is not None, f"expected one statement, got {len(trees)}"
    tree = trees[0]
    commands = list(tree.find_all(exp.Command))
    assert not commands, f"sqlglot did not understand (parsed as Command): {commands[0].sql()[:200]}"
    return tree


def created(tree: exp.Expr) -> exp.Create:
    """Return the CREATE TABLE of a parsed DDL statement (SQL Server's sits inside an IF block)."""
    if isinstance(tree, exp.IfBlock):
        condition = tree.this
        assert isinstance(condition, exp.Is) and isinstance(condition.expression, exp.Null), condition
        assert isinstance(condition.this, exp.ObjectId), condition
        tree = tree.args["true"]
        (create,) = [node for node in tree.find_all(exp.Create)]
        return create
    assert isinstance(tree, exp.Create), type(tree)
    assert tree.args.get("exists"), "CREATE TABLE without IF NOT EXISTS"
    return tree


def column_types(create: exp.Create, dialect: str) -> dict[str, str]:
    return {
        column.name: column.args["kind"].sql(SQLGLOT_DIALECTS[dialect]).upper()
        for column in create.find_all(exp.ColumnDef)
    }


def not_null(create: exp.Create) -> set[str]:
    """Return the columns declared NOT NULL."""
    return {
        column.name
        for column in create.find_all(exp.ColumnDef)
        if any(isinstance(c.args.get("kind"), exp.NotNullColumnConstraint) for c in column.constraints)
    }


def primary_key(create: exp.Create) -> list[str] | None:
    keys = list(create.find_all(exp.PrimaryKey))
    if not keys:
        return None
    return [column.name for column in keys[0].find_all(exp.Identifier)]


def tables(tree: exp.Expr) -> set[str]:
    return {f"{table.db}.{table.name}" for table in tree.find_all(exp.Table)}


# ---------------------------------------------------------------------------------------------------
# Rendering and parsing, every dialect


@pytest.mark.parametrize(
    ("dialect", "expected"),
    [
        ("sqlite", "on_conflict"),
        ("postgresql", "on_conflict"),
        ("duckdb", "on_conflict"),
        ("mysql", "on_duplicate_key"),
        ("mariadb", "on_duplicate_key"),
        ("snowflake", "merge"),
        ("bigquery", "merge"),
        ("redshift", "merge"),
        ("redshift_connector", "merge"),
        ("databricks", "merge"),
        ("mssql", "merge"),
    ],
)
def test_family_of_each_sqlalchemy_dialect(dialect, expected):
    assert dialects.family(dialect) == expected


@pytest.mark.parametrize("dialect", ["oracle", "postgres", "trino", ""])
def test_an_unsupported_dialect_is_a_config_error_naming_the_supported_ones(dialect):
    with pytest.raises(BlueshiftConfigError, match="not supported") as raised:
        dialects.family(dialect)
    assert "postgresql" in str(raised.value) and "snowflake" in str(raised.value)
    with pytest.raises(BlueshiftConfigError):
        dialects.upsert_audit(dialect, AUDIT, SCRATCH)


def test_columns():
    assert dialects.AUDIT_COLUMNS == (
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
    assert dialects.AUDIT_KEY == ("dag_id", "window_start", "window_end", "user_key")
    # The scratch has no run_attempts: the upsert sets it from the scratch's attempts.
    assert dialects.SCRATCH_COLUMNS == (
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
        "error",
    )


@pytest.mark.parametrize("table", ["audit; DROP TABLE x", "a.b.c", "1audit", "audit table", ""])
def test_a_table_name_that_is_not_a_plain_identifier_is_refused(table):
    with pytest.raises(BlueshiftConfigError, match="not a plain SQL table name"):
        dialects.upsert_audit("postgresql", table, SCRATCH)
    with pytest.raises(BlueshiftConfigError, match="not a plain SQL table name"):
        dialects.create_scratch_table("postgresql", table)


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
@pytest.mark.parametrize("kind", list(statements("sqlite")))
def test_every_statement_parses_in_its_dialect(dialect, kind):
    sql = statements(dialect)[kind]
    assert "--" not in sql and "{" not in sql, "a comment or an unfilled placeholder was left in"
    tree = parse(sql, dialect)
    expected: dict[str, type[exp.Expr]] = {
        "create_audit_table": exp.IfBlock if dialect == "mssql" else exp.Create,
        "create_scratch_table": exp.IfBlock if dialect == "mssql" else exp.Create,
        "insert_scratch": exp.Insert,
        "drop_table": exp.Drop,
        "upsert_audit": exp.Merge if dialects.family(dialect) == "merge" else exp.Insert,
        "close_carried_over": exp.Update,
    }
    assert isinstance(tree, expected[kind]), type(tree)
    if kind == "drop_table":
        assert tree.args.get("exists"), "DROP TABLE without IF EXISTS"
        assert tables(tree) == {SCRATCH}
    elif kind in ("upsert_audit", "close_carried_over"):
        assert tables(tree) == {AUDIT, SCRATCH}


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
def test_the_tables_have_the_audit_columns_and_key(dialect):
    audit = created(parse(dialects.create_audit_table(dialect, AUDIT), dialect))
    scratch = created(parse(dialects.create_scratch_table(dialect, SCRATCH), dialect))
    assert tuple(column_types(audit, dialect)) == dialects.AUDIT_COLUMNS
    assert tuple(column_types(scratch, dialect)) == dialects.SCRATCH_COLUMNS
    enforced = dialect in ("sqlite", "postgresql", "duckdb", "mysql", "mariadb", "mssql")
    for create in (audit, scratch):
        assert primary_key(create) == (list(dialects.AUDIT_KEY) if enforced else None)
    types = column_types(audit, dialect)
    assert column_types(scratch, dialect) == {c: types[c] for c in dialects.SCRATCH_COLUMNS}
    # run_attempts: the attempts' type, but nullable (rows written before the column read NULL).
    assert types["run_attempts"] == types["attempts"]
    assert not_null(audit) == set(dialects.AUDIT_COLUMNS) - {
        "customer_id",
        "email",
        "http_status",
        "run_attempts",
        "error",
    }
    if dialect in ("mysql", "mariadb"):
        # TEXT cannot be in a MySQL primary key.
        assert types["dag_id"] == types["run_id"] == "VARCHAR(250)"
        assert types["user_key"] == "VARCHAR(64)"
    if dialect == "bigquery":
        assert set(types.values()) == {"STRING", "INT64", "TIMESTAMP"}
    if dialect == "databricks":
        assert set(types.values()) == {"STRING", "INT", "TIMESTAMP"}
    if dialect.startswith("redshift"):
        # Redshift's TEXT is a VARCHAR(256): every string has an explicit length.
        assert types["error"] == types["email"] == types["customer_id"] == "VARCHAR(65535)"
        assert all(
            t.startswith("VARCHAR(") or t in ("INT", "INTEGER", "TIMESTAMP") for t in types.values()
        ), types
    if dialect == "mssql":
        # SQL Server's TIMESTAMP is a row version.
        assert types["created_at"] == "DATETIME2(6)"
        assert not any("TIMESTAMP" in t or "ROWVERSION" in t for t in types.values()), types


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
def test_the_upsert_has_the_shape_of_its_family(dialect):
    tree = parse(dialects.upsert_audit(dialect, AUDIT, SCRATCH), dialect)
    if dialects.family(dialect) == "merge":
        assert isinstance(tree, exp.Merge)
        whens = list(tree.find_all(exp.When))
        assert [bool(when.args.get("matched")) for when in whens] == [True, False]
        # Redshift has no WHEN MATCHED AND ...: every condition is a CASE inside SET.
        assert not any(when.args.get("condition") for when in whens)
        updated = [eq.this.name for eq in whens[0].args["then"].expressions]
        assert sorted(updated) == sorted(
            set(dialects.AUDIT_COLUMNS) - set(dialects.AUDIT_KEY) - {"created_at"}
        )
        assert dialects.upsert_audit(dialect, AUDIT, SCRATCH).rstrip().endswith(";") == (dialect == "mssql")
        insert = whens[1].args["then"]
        columns = [c.name for c in insert.this.expressions]
        values = insert.expression.expressions
    else:
        assert isinstance(tree, exp.Insert)
        conflict = tree.args["conflict"]
        assert isinstance(conflict, exp.OnConflict)
        assert bool(conflict.args.get("duplicate")) == (dialects.family(dialect) == "on_duplicate_key")
        columns = [c.name for c in tree.this.expressions]
        values = tree.expression.expressions
    # A new key is inserted with every audit column, run_attempts from the scratch's attempts.
    assert columns == list(dialects.AUDIT_COLUMNS)
    inserted = dict(zip(columns, values, strict=True))
    assert isinstance(inserted["run_attempts"], exp.Column) and inserted["run_attempts"].name == "attempts"
    assert isinstance(inserted["attempts"], exp.Column) and inserted["attempts"].name == "attempts"


def target_reads(eq: exp.EQ) -> set[str]:
    """Return the target's columns that one ON DUPLICATE KEY UPDATE assignment reads."""
    return {
        column.name
        for column in eq.expression.find_all(exp.Column)
        # VALUES(col) reads the inserted row, not the target's column.
        if not isinstance(column.parent, exp.Values) and column.table
    }


def read_after_assigned(assignments: list[exp.EQ]) -> list[str]:
    """Return "col reads {...}" for each assignment that reads a column an earlier one assigned."""
    order = [eq.this.name for eq in assignments]
    late = []
    for position, eq in enumerate(assignments):
        clash = target_reads(eq) & set(order[:position])
        if clash:
            late.append(f"{order[position]} reads {sorted(clash)}, assigned earlier")
    return late


def test_the_on_duplicate_key_assignments_are_ordered_so_that_reads_see_old_values():
    """MySQL applies the assignments left to right: a column is assigned after every reader of it."""
    tree = parse(dialects.upsert_audit("mysql", AUDIT, SCRATCH), "mysql")
    assignments = list(tree.args["conflict"].expressions)
    order = [eq.this.name for eq in assignments]
    assert sorted(order) == sorted(set(dialects.AUDIT_COLUMNS) - set(dialects.AUDIT_KEY) - {"created_at"})
    reads = {eq.this.name: target_reads(eq) for eq in assignments}
    # What makes the order matter: attempts reads the row's run_id and run_attempts (the retry rule)
    # and every assignment reads its status (the dry-run guard).
    assert reads["attempts"] == {"status", "run_id", "run_attempts", "attempts"}
    assert reads["run_attempts"] == {"status", "run_attempts"}
    assert all("status" in read for read in reads.values()), reads
    assert read_after_assigned(assignments) == []
    assert order[0] == "attempts" and order[-2:] == ["run_id", "status"]

    # The check fails on a wrong order: run_attempts or run_id assigned before attempts reads them.
    by_name = {eq.this.name: eq for eq in assignments}
    for first in ("run_attempts", "run_id", "status"):
        wrong = [by_name[first], *(eq for eq in assignments if eq.this.name != first)]
        assert f"attempts reads ['{first}'], assigned earlier" in read_after_assigned(wrong), first


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
def test_the_bind_parameters(dialect):
    rendered = statements(dialect)
    assert set(BIND.findall(rendered["insert_scratch"])) == set(dialects.SCRATCH_COLUMNS)
    assert set(BIND.findall(rendered["upsert_audit"])) == {"now"}
    assert set(BIND.findall(rendered["close_carried_over"])) == {"dag_id", "run_id", "since", "now"}
    for kind in ("create_audit_table", "create_scratch_table", "drop_table"):
        assert not BIND.findall(rendered[kind]), kind


def test_the_status_literals_are_the_pipelines_statuses():
    statuses = {status.value for status in Status}
    for dialect in SQLGLOT_DIALECTS:
        for sql in statements(dialect).values():
            literals = set(re.findall(r"'([a-z_]+)'", sql)) - {"U"}
            assert literals <= statuses, literals - statuses


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
@pytest.mark.parametrize(
    ("kind", "typo"),
    [
        ("upsert_audit", ("THEN", "THN")),
        ("upsert_audit", (" END", "")),
        ("create_audit_table", ("CREATE TABLE", "CREATE TABEL")),
        ("create_scratch_table", ("NOT NULL,", "NOT NUL,")),
        ("close_carried_over", ("SELECT user_key FROM", "SELECT user_key FORM")),
        ("insert_scratch", (":error)", ":error")),
    ],
)
def test_a_typo_in_a_template_fails_the_parse(dialect, kind, typo):
    """The parse check can fail: a one-word typo in any statement is caught in every dialect."""
    sql = statements(dialect)[kind]
    assert typo[0] in sql
    with pytest.raises((ParseError, AssertionError)):
        parse(sql.replace(typo[0], typo[1], 1), dialect)


def test_the_templates_are_files_of_the_package():
    names = sorted(path.name for path in dialects.TEMPLATES.glob("*.sql"))
    assert names == [
        "close_carried_over.sql",
        "create_audit_table.sql",
        "create_scratch_table.sql",
        "drop_table.sql",
        "insert_scratch.sql",
        "upsert_audit.merge.sql",
        "upsert_audit.on_conflict.sql",
        "upsert_audit.on_duplicate_key.sql",
    ]


# ---------------------------------------------------------------------------------------------------
# The rules, live on every engine that runs here

MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"

DAG = "blueshift_start_tracking"
OTHER_DAG = "other_dag"
W0 = datetime(2026, 11, 19)
W1 = datetime(2026, 11, 20)
W2 = datetime(2026, 11, 21)
DAY = timedelta(days=1)
NOW1 = datetime(2026, 11, 21, 1, 0, 0, 123456)
NOW2 = datetime(2026, 11, 22, 1, 0, 0, 654321)
NOW3 = datetime(2026, 11, 23, 1, 0, 0, 1)
NOW4 = datetime(2026, 11, 24, 1, 0, 0)
U1, U2, U3 = "a" * 64, "b" * 64, "c" * 64


@dataclass
class Db:
    """A live warehouse for one test: its engine, its audit table and the scratch tables it made."""

    engine: sa.Engine
    schema: str
    audit: str
    upsert_as: str | None = None
    """Render the upsert for this dialect instead of the engine's own (to run the MERGE here)."""
    scratches: list[str] = field(default_factory=list)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def upsert_audit(self, scratch: str) -> str:
        return dialects.upsert_audit(self.upsert_as or self.dialect, self.audit, scratch)

    def new_scratch(self) -> str:
        name = f"{self.schema}.blueshift_scratch_{uuid.uuid4().hex[:12]}"
        self.scratches.append(name)
        return name


def _sqlite(tmp_path: Path) -> tuple[sa.Engine, str]:
    return sa.create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}"), "main"


def _duckdb(tmp_path: Path) -> tuple[sa.Engine, str]:
    return sa.create_engine(f"duckdb:///{tmp_path / 'warehouse.duckdb'}"), "main"


@pytest.fixture(
    params=["sqlite", "postgresql", "mysql", "mariadb", "duckdb", "postgresql-merge", "duckdb-merge"]
)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """Each engine in turn, with the audit table created (twice: IF NOT EXISTS) and dropped after.

    ``*-merge``: PostgreSQL 15 and DuckDB also speak MERGE, so the merge family's statement (as
    rendered for Snowflake, BigQuery, Redshift and Databricks) runs there too, against the same rules.
    """
    kind, _, merge = request.param.partition("-")
    if kind == "sqlite":
        engine, schema = _sqlite(tmp_path)
    elif kind == "duckdb":
        engine, schema = _duckdb(tmp_path)
    elif kind == "postgresql":
        engine, schema = sa.create_engine(request.getfixturevalue("postgres_warehouse").url), "public"
    else:
        # The same MariaDB server through SQLAlchemy's "mysql" dialect (as MySqlHook's URL gives)
        # and its "mariadb" one; tables of their own, dropped after the test.
        url = MARIADB_URL if kind == "mysql" else MARIADB_URL.replace("mysql+", "mariadb+")
        engine, schema = sa.create_engine(url), "test"
    assert engine.dialect.name == kind
    database = Db(
        engine,
        schema,
        f"{schema}.blueshift_audit_{uuid.uuid4().hex[:12]}",
        upsert_as="snowflake" if merge else None,
    )
    if merge:
        assert dialects.family(kind) != "merge" and "MERGE INTO" in database.upsert_audit("scratch")
    for _ in range(2):
        with engine.begin() as conn:
            conn.execute(sa.text(dialects.create_audit_table(database.dialect, database.audit)))
    try:
        yield database
    finally:
        with engine.begin() as conn:
            for table in [database.audit, *database.scratches]:
                conn.execute(sa.text(dialects.drop_table(database.dialect, table)))
        engine.dispose()


def bound(sql: str) -> sa.TextClause:
    """Return ``text(sql)`` with its timestamp and integer binds typed, as the pipeline binds them."""
    names = set(BIND.findall(sql))
    return sa.text(sql).bindparams(
        *(sa.bindparam(name, type_=sa.DateTime()) for name in names & dialects.TIMESTAMP_PARAMS),
        *(sa.bindparam(name, type_=sa.Integer()) for name in names & {"http_status", "attempts"}),
    )


def outcome(
    user_key: str,
    status: str,
    *,
    run_id: str,
    window: datetime = W1,
    dag_id: str = DAG,
    attempts: int = 1,
    http_status: int | None = None,
    error: str | None = None,
    email: str | None = None,
) -> dict[str, Any]:
    """Return one scratch row."""
    return {
        "dag_id": dag_id,
        "window_start": window,
        "window_end": window + DAY,
        "user_key": user_key,
        "run_id": run_id,
        "customer_id": f"CUST-{user_key[:4]}",
        "email": email or f"{user_key[:4]}@example.com",
        "status": status,
        "http_status": http_status,
        "attempts": attempts,
        "error": error,
    }


def publish(
    db: Db,
    rows: list[dict[str, Any]],
    now: datetime,
    *,
    carry_over_since: datetime | None = None,
) -> None:
    """Do what the audit task does: load a scratch table, upsert (and close) in one transaction, drop."""
    scratch = db.new_scratch()
    for _ in range(2):
        with db.engine.begin() as conn:
            conn.execute(sa.text(dialects.create_scratch_table(db.dialect, scratch)))
    with db.engine.begin() as conn:
        conn.execute(bound(dialects.insert_scratch(db.dialect, scratch)), rows)
    with db.engine.begin() as conn:
        conn.execute(bound(db.upsert_audit(scratch)), {"now": now})
        if carry_over_since is not None:
            (run_id,) = {row["run_id"] for row in rows}
            (dag_id,) = {row["dag_id"] for row in rows}
            conn.execute(
                bound(dialects.close_carried_over(db.dialect, db.audit, scratch)),
                {"dag_id": dag_id, "run_id": run_id, "since": carry_over_since, "now": now},
            )
    with db.engine.begin() as conn:
        conn.execute(sa.text(dialects.drop_table(db.dialect, scratch)))
    with db.engine.connect() as conn:
        assert not sa.inspect(conn).has_table(scratch.split(".")[1], schema=db.schema)


def audit_rows(db: Db) -> dict[tuple[str, datetime, str], dict[str, Any]]:
    """Return the audit table by (dag_id, window_start, user_key); asserts one row per key."""
    timestamps = {name: sa.DateTime() for name in ("window_start", "window_end", "created_at", "updated_at")}
    with db.engine.connect() as conn:
        rows = [
            dict(row._mapping)
            for row in conn.execute(
                sa.text(f"SELECT {', '.join(dialects.AUDIT_COLUMNS)} FROM {db.audit}").columns(**timestamps)
            )
        ]
    by_key = {(row["dag_id"], row["window_start"], row["user_key"]): row for row in rows}
    assert len(by_key) == len(rows), "more than one audit row per key"
    return by_key


def expected(row: dict[str, Any], *, created_at: datetime, updated_at: datetime, **changes: Any) -> dict:
    """Return the audit row a scratch ``row`` leaves (its run_attempts: the row's attempts)."""
    return {
        **row,
        "run_attempts": row["attempts"],
        "created_at": created_at,
        "updated_at": updated_at,
        **changes,
    }


def test_a_first_run_inserts_one_row_per_user(db):
    first = [
        outcome(U1, "succeeded", run_id="r1", http_status=200),
        outcome(U2, "failed", run_id="r1", attempts=5, http_status=503, error="HTTP 503 five times"),
        outcome(U3, "invalid", run_id="r1", attempts=0, error="no email"),
    ]
    publish(db, first, NOW1)
    assert audit_rows(db) == {
        (DAG, W1, row["user_key"]): expected(row, created_at=NOW1, updated_at=NOW1) for row in first
    }


def test_a_later_run_of_the_window_overwrites_the_outcome_and_adds_up_attempts(db):
    u1 = outcome(U1, "failed", run_id="r1", attempts=3, http_status=503, error="HTTP 503")
    u2 = outcome(U2, "failed", run_id="r1", attempts=2, http_status=429, error="HTTP 429")
    publish(db, [u1, u2], NOW1)
    # The re-run sends U1 only (U2 is sent by neither: its row is kept as it was).
    again = outcome(
        U1, "succeeded", run_id="manual__r2", attempts=2, http_status=200, email="new@example.com"
    )
    publish(db, [again], NOW2)
    assert audit_rows(db) == {
        (DAG, W1, U1): expected(again, created_at=NOW1, updated_at=NOW2, attempts=5),
        (DAG, W1, U2): expected(u2, created_at=NOW1, updated_at=NOW1),
    }
    # A third run adds up again, and a failure overwrites a success the same way.
    third = outcome(U1, "rejected", run_id="r3", attempts=1, http_status=422, error="HTTP 422")
    publish(db, [third], NOW3)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(third, created_at=NOW1, updated_at=NOW3, attempts=6)


def test_the_same_runs_audit_retried_does_not_count_attempts_twice(db):
    u1 = outcome(U1, "failed", run_id="r1", attempts=3, http_status=503, error="HTTP 503")
    publish(db, [u1], NOW1)
    publish(db, [u1], NOW2)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(u1, created_at=NOW1, updated_at=NOW2, attempts=3)
    # The run's chunk was cleared and sent again (its staged attempts went on counting), then audited.
    retried = outcome(U1, "succeeded", run_id="r1", attempts=4, http_status=200)
    publish(db, [retried], NOW3)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(retried, created_at=NOW1, updated_at=NOW3, attempts=4)


def test_a_dry_run_never_overwrites_a_real_outcome_but_updates_a_dry_run(db):
    real = [
        outcome(U1, "succeeded", run_id="r1", http_status=200),
        outcome(U2, "failed", run_id="r1", attempts=5, http_status=503, error="HTTP 503"),
    ]
    publish(db, real, NOW1)
    before = audit_rows(db)
    dry = [
        outcome(key, "dry_run", run_id="dry1", attempts=0, email="dry@example.com") for key in (U1, U2, U3)
    ]
    publish(db, dry, NOW2)
    after = audit_rows(db)
    assert after[(DAG, W1, U1)] == before[(DAG, W1, U1)]
    assert after[(DAG, W1, U2)] == before[(DAG, W1, U2)]
    # A key without a row gets the dry run's.
    assert after[(DAG, W1, U3)] == expected(dry[2], created_at=NOW2, updated_at=NOW2)

    # A dry run over a dry run updates it (attempts add up across runs, as for any run).
    dry_again = outcome(U3, "dry_run", run_id="dry2", attempts=1, email="again@example.com")
    publish(db, [dry_again], NOW3)
    assert audit_rows(db)[(DAG, W1, U3)] == expected(dry_again, created_at=NOW2, updated_at=NOW3, attempts=1)

    # And a real outcome overwrites a dry run.
    sent = outcome(U3, "succeeded", run_id="r4", attempts=2, http_status=200)
    publish(db, [sent], NOW4)
    assert audit_rows(db)[(DAG, W1, U3)] == expected(sent, created_at=NOW2, updated_at=NOW4, attempts=3)


def test_a_success_closes_the_users_earlier_failed_rows_and_nothing_else(db):
    earlier = [
        outcome(U1, "failed", run_id="r0", window=W0, attempts=5, error="HTTP 503"),  # before since
        outcome(U1, "failed", run_id="r1", attempts=4, http_status=503, error="HTTP 503"),  # closes
        outcome(U2, "failed", run_id="r1", attempts=5, http_status=503, error="HTTP 503"),  # fails again
        outcome(U3, "rejected", run_id="r1", http_status=422, error="HTTP 422"),  # not failed
    ]
    publish(db, earlier[:1], NOW1)
    publish(db, earlier[1:], NOW1)
    other_dag = outcome(U1, "failed", run_id="o1", dag_id=OTHER_DAG, attempts=5, error="HTTP 503")
    publish(db, [other_dag], NOW1)
    before = audit_rows(db)

    today = [
        outcome(U1, "succeeded", run_id="r2", window=W2, http_status=200),
        outcome(U2, "failed", run_id="r2", window=W2, attempts=5, http_status=503, error="HTTP 503"),
        outcome(U3, "succeeded", run_id="r2", window=W2, http_status=200),
    ]
    publish(db, today, NOW2, carry_over_since=W1)
    after = audit_rows(db)

    closed = before[(DAG, W1, U1)]
    assert after[(DAG, W1, U1)] == {
        **closed,
        "status": "succeeded",
        "run_id": "r2",
        "http_status": 200,
        "error": None,
        "updated_at": NOW2,
    }
    for key in [(DAG, W0, U1), (DAG, W1, U2), (DAG, W1, U3), (OTHER_DAG, W1, U1)]:
        assert after[key] == before[key], key
    for row in today:
        assert after[(DAG, W2, row["user_key"])] == expected(row, created_at=NOW2, updated_at=NOW2)
    assert len(after) == len(before) + len(today)


def upsert_close_and_fail(db: Db, scratch: str) -> None:
    with db.engine.begin() as conn:
        conn.execute(bound(db.upsert_audit(scratch)), {"now": NOW2})
        conn.execute(
            bound(dialects.close_carried_over(db.dialect, db.audit, scratch)),
            {"dag_id": DAG, "run_id": "r2", "since": W1, "now": NOW2},
        )
        raise RuntimeError("after the upsert")


def test_the_upsert_and_the_close_roll_back_together(db):
    """Both run in one transaction: an error after them leaves the audit table as it was."""
    publish(db, [outcome(U1, "failed", run_id="r1", attempts=5, error="HTTP 503")], NOW1)
    before = audit_rows(db)
    scratch = db.new_scratch()
    with db.engine.begin() as conn:
        conn.execute(sa.text(dialects.create_scratch_table(db.dialect, scratch)))
    with db.engine.begin() as conn:
        conn.execute(
            bound(dialects.insert_scratch(db.dialect, scratch)),
            [outcome(U1, "succeeded", run_id="r2", window=W2, http_status=200)],
        )
    with pytest.raises(RuntimeError, match="after the upsert"):
        upsert_close_and_fail(db, scratch)
    assert audit_rows(db) == before


def test_a_retried_audit_keeps_the_attempts_of_earlier_runs(db):
    """r1 sent 3, r2 sent 2 (audit says 5); r2's audit retried still says 5: r2's share is replaced."""
    publish(db, [outcome(U1, "failed", run_id="r1", attempts=3, error="HTTP 503")], NOW1)
    publish(db, [outcome(U1, "failed", run_id="r2", attempts=2, error="HTTP 503")], NOW2)
    assert audit_rows(db)[(DAG, W1, U1)]["attempts"] == 5
    publish(db, [outcome(U1, "failed", run_id="r2", attempts=2, error="HTTP 503")], NOW3)
    assert audit_rows(db)[(DAG, W1, U1)]["attempts"] == 5
    assert audit_rows(db)[(DAG, W1, U1)]["run_attempts"] == 2


def test_attempts_are_the_sum_of_each_runs_final_attempts_at_every_step(db):
    """r1 -> r2 -> r2's audit retried (twice) -> r3: each run counts once, with its last attempts.

    On the first retry r2's chunk was re-sent before the audit ran again (its staged attempts went
    on counting: U1 2 -> 4), so the retry replaces r2's share rather than keeping or adding it.
    """
    steps: list[tuple[str, dict[str, tuple[str, int]], dict[str, int]]] = [
        # run_id, what the run's scratch holds per user (status, attempts), audit attempts expected
        ("r1", {U1: ("failed", 3), U2: ("failed", 1), U3: ("failed", 5)}, {U1: 3, U2: 1, U3: 5}),
        ("r2", {U1: ("failed", 2), U2: ("failed", 5)}, {U1: 5, U2: 6, U3: 5}),
        ("r2", {U1: ("succeeded", 4), U2: ("failed", 5)}, {U1: 7, U2: 6, U3: 5}),
        ("r2", {U1: ("succeeded", 4), U2: ("failed", 5)}, {U1: 7, U2: 6, U3: 5}),
        ("r3", {U2: ("succeeded", 1), U3: ("rejected", 1)}, {U1: 7, U2: 7, U3: 6}),
    ]
    finals: dict[str, dict[str, int]] = {U1: {}, U2: {}, U3: {}}  # user -> run -> its last attempts
    last: dict[str, dict[str, Any]] = {}  # user -> the scratch row that last wrote its audit row
    for step, (run_id, sent, totals) in enumerate(steps):
        now = NOW1 + step * timedelta(hours=1)
        rows = [
            outcome(
                user,
                status,
                run_id=run_id,
                attempts=attempts,
                http_status=200 if status == "succeeded" else 503,
                error=None if status == "succeeded" else f"HTTP 503 in {run_id}",
            )
            for user, (status, attempts) in sent.items()
        ]
        publish(db, rows, now)
        for row in rows:
            finals[row["user_key"]][run_id] = row["attempts"]
            last[row["user_key"]] = {**row, "updated_at": now}
        audit = audit_rows(db)
        assert {user: sum(runs.values()) for user, runs in finals.items()} == totals, step
        assert {user: audit[(DAG, W1, user)]["attempts"] for user in finals} == totals, step
        for user, row in last.items():
            assert audit[(DAG, W1, user)] == expected(
                row, created_at=NOW1, updated_at=row["updated_at"], attempts=totals[user]
            ), (step, user)


def test_a_dry_run_between_a_run_and_its_retried_audit_keeps_the_runs_share(db):
    """The dry-run guard keeps run_attempts too: r2's retried audit still replaces r2's share only."""
    publish(db, [outcome(U1, "failed", run_id="r1", attempts=3, error="HTTP 503")], NOW1)
    publish(db, [outcome(U1, "failed", run_id="r2", attempts=2, error="HTTP 503")], NOW2)
    before = audit_rows(db)[(DAG, W1, U1)]
    assert (before["attempts"], before["run_attempts"]) == (5, 2)
    publish(db, [outcome(U1, "dry_run", run_id="dry1", attempts=0)], NOW3)
    assert audit_rows(db)[(DAG, W1, U1)] == before
    retried = outcome(U1, "succeeded", run_id="r2", attempts=4, http_status=200)
    publish(db, [retried], NOW4)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(retried, created_at=NOW1, updated_at=NOW4, attempts=7)


# ---------------------------------------------------------------------------------------------------
# An audit table of an older version (without run_attempts)

OLD_COLUMNS = [c for c in dialects.AUDIT_COLUMNS if c != "run_attempts"]
"""The audit table's columns before run_attempts."""


def test_the_audit_columns_missing_from_an_existing_table():
    assert dialects.audit_columns_missing(dialects.AUDIT_COLUMNS) == []
    assert dialects.audit_columns_missing(OLD_COLUMNS) == ["run_attempts"]
    # Case-insensitive (Snowflake reports names in capitals), extra columns ignored, any iterable.
    assert dialects.audit_columns_missing(c.upper() for c in dialects.AUDIT_COLUMNS) == []
    assert dialects.audit_columns_missing([*(c.title() for c in OLD_COLUMNS), "extra"]) == ["run_attempts"]
    assert dialects.audit_columns_missing(["Run_Attempts", "DAG_ID"]) == [
        c for c in dialects.AUDIT_COLUMNS if c not in ("run_attempts", "dag_id")
    ]
    assert dialects.audit_columns_missing([]) == list(dialects.AUDIT_COLUMNS)


@pytest.mark.parametrize(
    ("dialect", "hint"),
    [
        ("sqlite", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("postgresql", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("duckdb", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("mysql", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("mariadb", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("snowflake", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("bigquery", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INT64"),
        ("redshift", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("redshift_connector", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INTEGER"),
        ("databricks", f"ALTER TABLE {AUDIT} ADD COLUMN run_attempts INT"),
        ("mssql", f"ALTER TABLE {AUDIT} ADD run_attempts INT"),
    ],
)
def test_the_hint_adds_the_column_in_the_dialects_type(dialect, hint):
    assert dialects.add_column_hint(dialect, AUDIT, "run_attempts") == hint
    tree = parse(hint, dialect)
    assert isinstance(tree, exp.Alter) and tables(tree) == {AUDIT}
    (added,) = tree.args["actions"]
    assert isinstance(added, exp.ColumnDef) and added.name == "run_attempts"
    # The type the audit table is created with, and nullable like there.
    audit = created(parse(dialects.create_audit_table(dialect, AUDIT), dialect))
    assert (
        added.args["kind"].sql(SQLGLOT_DIALECTS[dialect]).upper()
        == column_types(audit, dialect)["run_attempts"]
    )
    assert not added.constraints


@pytest.mark.parametrize("dialect", sorted(SQLGLOT_DIALECTS))
@pytest.mark.parametrize("column", dialects.AUDIT_COLUMNS)
def test_the_hint_parses_for_every_column_and_dialect(dialect, column):
    hint = dialects.add_column_hint(dialect, AUDIT, column)
    (added,) = parse(hint, dialect).args["actions"]
    audit = created(parse(dialects.create_audit_table(dialect, AUDIT), dialect))
    assert added.args["kind"].sql(SQLGLOT_DIALECTS[dialect]).upper() == column_types(audit, dialect)[column]


def test_the_hint_refuses_what_is_not_an_audit_column_table_or_dialect():
    with pytest.raises(ValueError, match="not a column of the audit table"):
        dialects.add_column_hint("postgresql", AUDIT, "run_attempts; DROP TABLE x")
    with pytest.raises(BlueshiftConfigError, match="not a plain SQL table name"):
        dialects.add_column_hint("postgresql", "audit; DROP TABLE x", "run_attempts")
    with pytest.raises(BlueshiftConfigError, match="not supported"):
        dialects.add_column_hint("oracle", AUDIT, "run_attempts")


def audit_columns(db: Db) -> list[str]:
    """Return the audit table's column names (from an empty SELECT: duckdb_engine's inspector fails)."""
    with db.engine.connect() as conn:
        return list(conn.execute(sa.text(f"SELECT * FROM {db.audit} WHERE 1 = 0")).keys())


def test_an_older_audit_table_is_found_lacking_run_attempts_and_the_hint_adds_it(db):
    """The older table's rows read NULL run_attempts after the hint, and the rules hold from there."""
    old_ddl, removed = re.subn(
        r"\n\s*run_attempts\b[^\n]*", "", dialects.create_audit_table(db.dialect, db.audit)
    )
    assert removed == 1
    old_row = expected(
        outcome(U1, "failed", run_id="r1", attempts=3, http_status=503, error="HTTP 503"),
        created_at=NOW1,
        updated_at=NOW1,
    )
    del old_row["run_attempts"]
    insert_old = bound(
        f"INSERT INTO {db.audit} ({', '.join(OLD_COLUMNS)}) "
        f"VALUES ({', '.join(f':{column}' for column in OLD_COLUMNS)})"
    ).bindparams(
        sa.bindparam("created_at", type_=sa.DateTime()), sa.bindparam("updated_at", type_=sa.DateTime())
    )
    with db.engine.begin() as conn:
        conn.execute(sa.text(dialects.drop_table(db.dialect, db.audit)))
        conn.execute(sa.text(old_ddl))
        conn.execute(insert_old, old_row)
    assert sorted(audit_columns(db)) == sorted(OLD_COLUMNS)
    assert dialects.audit_columns_missing(audit_columns(db)) == ["run_attempts"]
    # Without the column the upsert fails (this is what the hint is for).
    with pytest.raises(sa.exc.DBAPIError):
        publish(db, [outcome(U1, "failed", run_id="r2", attempts=2)], NOW2)

    with db.engine.begin() as conn:
        conn.execute(sa.text(dialects.add_column_hint(db.dialect, db.audit, "run_attempts")))
    assert dialects.audit_columns_missing(audit_columns(db)) == []
    assert audit_rows(db) == {(DAG, W1, U1): {**old_row, "run_attempts": None}}

    # A later run adds up (the old row's NULL share is not read), its retried audit replaces its own.
    r2 = outcome(U1, "failed", run_id="r2", attempts=2, http_status=503, error="HTTP 503")
    publish(db, [r2], NOW2)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(r2, created_at=NOW1, updated_at=NOW2, attempts=5)
    retried = outcome(U1, "succeeded", run_id="r2", attempts=4, http_status=200)
    publish(db, [retried], NOW3)
    assert audit_rows(db)[(DAG, W1, U1)] == expected(retried, created_at=NOW1, updated_at=NOW3, attempts=7)
