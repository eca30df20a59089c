"""The warehouse side: read a window, stage validated users, record outcomes, publish the audit.

Every statement goes through SQLAlchemy with bound parameters, on the engine of the connection's own
common-sql hook (SqliteHook, PostgresHook, ...). The writes use ``INSERT ... ON CONFLICT``, which
SQLite (3.24+) and PostgreSQL share; table names come from settings and are validated identifiers.

Customer rows never travel through XCom: the extract task stages them in ``staging_table`` keyed by
(dag_id, run_id, user_key), chunk tasks read their slice from there and write their outcomes back,
and the audit task publishes the run's rows into ``audit_table`` in one transactional statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook
from sqlalchemy import DateTime, Integer, String, bindparam, text

from blueshift.engines import safe_engine
from blueshift.exceptions import BlueshiftConfigError
from blueshift.outcomes import Status
from blueshift.settings import validate_identifier
from blueshift.validation import bucket_of, storable

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Connection, Engine, Inspector

CHUNK_TASK_DID_NOT_FINISH = "chunk task did not finish (see its log); the user was not confirmed sent"


def utc_naive(moment: datetime) -> datetime:
    """Return ``moment`` in UTC without tzinfo, the form stored in TIMESTAMP columns."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def sql_timestamp(moment: datetime) -> str:
    """Return ``YYYY-MM-DD HH:MM:SS`` in UTC: compares correctly as text (SQLite) and as a timestamp."""
    return utc_naive(moment).strftime("%Y-%m-%d %H:%M:%S")


class Warehouse:
    """
    Staging and audit tables on any common-sql connection.

    :param conn_id: the Airflow connection of the warehouse (SQLite, PostgreSQL, ...).
    :param audit_table: table that keeps one row per (dag, window, user).
    :param staging_table: table that holds the users of runs in flight.
    """

    def __init__(self, conn_id: str, *, audit_table: str, staging_table: str) -> None:
        self.conn_id = conn_id
        self.audit_table = validate_identifier(audit_table, "BLUESHIFT_AUDIT_TABLE")
        self.staging_table = validate_identifier(staging_table, "BLUESHIFT_STAGING_TABLE")
        self.lease_table = f"{self.staging_table}_leases"

    @cached_property
    def engine(self) -> Engine:
        """Return the SQLAlchemy engine of the connection's common-sql hook."""
        try:
            connection = BaseHook.get_connection(self.conn_id)
        except Exception as err:
            raise BlueshiftConfigError(
                f"Warehouse connection {self.conn_id!r} is not defined: create it (e.g. "
                f"AIRFLOW_CONN_{self.conn_id.upper()}="
                '\'{"conn_type": "sqlite", "host": "/abs/warehouse.db"}\')'
            ) from err
        hook = connection.get_hook()
        if not hasattr(hook, "get_sqlalchemy_engine"):
            raise BlueshiftConfigError(
                f"Warehouse connection {self.conn_id!r} has type {connection.conn_type!r}, which is not a "
                "SQL database: use a common-sql connection type such as sqlite or postgres"
            )
        engine_kwargs: dict[str, Any] = {}
        if connection.conn_type == "sqlite":
            # Several chunk tasks write at once; wait for SQLite's lock instead of failing after 5 s.
            engine_kwargs["connect_args"] = {"timeout": 60}
        return safe_engine(hook, **engine_kwargs)

    @property
    def dialect(self) -> str:
        """Return the SQLAlchemy dialect name (``sqlite``, ``postgresql``, ...)."""
        return self.engine.dialect.name

    def _create(self, ddl: str, created: Callable[[Inspector], bool]) -> None:
        """Run a ``CREATE ... IF NOT EXISTS``, tolerating another task creating it at the same moment.

        PostgreSQL's ``IF NOT EXISTS`` is not safe under concurrency: the loser of the race gets a
        unique violation on ``pg_type`` or ``pg_class``; the object exists then (``created`` says
        so), which is all we need.
        """
        from sqlalchemy import inspect
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        try:
            with self.engine.begin() as conn:
                conn.execute(text(ddl))
        except (IntegrityError, ProgrammingError):
            if not created(inspect(self.engine)):
                raise

    def _create_table(self, table: str, ddl: str) -> None:
        schema, _, name = table.rpartition(".")
        self._create(ddl, lambda inspector: inspector.has_table(name, schema=schema or None))

    def _create_index(self, table: str, name: str, columns: str) -> None:
        schema, _, bare = table.rpartition(".")
        # The index lives in its table's schema: PostgreSQL names the schema on the table, SQLite
        # on the index.
        ddl = (
            f"CREATE INDEX IF NOT EXISTS {schema}.{name} ON {bare} ({columns})"
            if schema and self.dialect == "sqlite"
            else f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"
        )
        self._create(
            ddl,
            lambda inspector: (
                name in {index["name"] for index in inspector.get_indexes(bare, schema=schema or None)}
            ),
        )

    def _use_wal(self) -> None:
        """Put a SQLite warehouse in WAL mode: readers do not block the writer, so tasks run side by side.

        The mode is stored in the file, so this writes once. Switching needs the file to itself
        and SQLite answers "database is locked" at once, without waiting, when another run's task
        has it open: that is retried briefly, and is fine when the other one switched it.
        """
        import time

        from sqlalchemy.exc import OperationalError

        attempts = 50  # 5 s in all
        for attempt in range(1, attempts + 1):
            with self.engine.connect() as conn:
                if str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() == "wal":
                    return
                try:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                    return
                except OperationalError:
                    if attempt == attempts:
                        raise
            time.sleep(0.1)

    def ensure_tables(self) -> None:
        """Create the staging and audit tables if they do not exist."""
        if self.dialect == "sqlite":
            self._use_wal()
        self._create_table(
            self.staging_table,
            f"""
                    CREATE TABLE IF NOT EXISTS {self.staging_table} (
                        dag_id VARCHAR(250) NOT NULL,
                        run_id VARCHAR(250) NOT NULL,
                        user_key VARCHAR(64) NOT NULL,
                        window_start TIMESTAMP NOT NULL,
                        window_end TIMESTAMP NOT NULL,
                        bucket INTEGER NOT NULL,
                        customer_id TEXT,
                        email TEXT,
                        status VARCHAR(16) NOT NULL,
                        http_status INTEGER,
                        attempts INTEGER NOT NULL DEFAULT 0,
                        error TEXT,
                        PRIMARY KEY (dag_id, run_id, user_key)
                    )
                    """,
        )
        # Chunk tasks read and mark their users by bucket range: without this index every chunk
        # task scans the whole run, and a run's cost grows with (users x chunks).
        self._create_index(
            self.staging_table, f"{self.staging_table.rpartition('.')[2]}_bucket", "dag_id, run_id, bucket"
        )
        self._create_table(
            self.audit_table,
            f"""
                    CREATE TABLE IF NOT EXISTS {self.audit_table} (
                        dag_id VARCHAR(250) NOT NULL,
                        window_start TIMESTAMP NOT NULL,
                        window_end TIMESTAMP NOT NULL,
                        user_key VARCHAR(64) NOT NULL,
                        run_id VARCHAR(250) NOT NULL,
                        customer_id TEXT,
                        email TEXT,
                        status VARCHAR(16) NOT NULL,
                        http_status INTEGER,
                        attempts INTEGER NOT NULL,
                        error TEXT,
                        created_at TIMESTAMP NOT NULL,
                        updated_at TIMESTAMP NOT NULL,
                        PRIMARY KEY (dag_id, window_start, window_end, user_key)
                    )
                    """,
        )

    def ensure_lease_table(self) -> None:
        """Create the table of budget leases (see ``blueshift.budget``) if it does not exist."""
        self._create_table(
            self.lease_table,
            f"CREATE TABLE IF NOT EXISTS {self.lease_table} "
            "(holder VARCHAR(500) PRIMARY KEY, heartbeat_at TIMESTAMP NOT NULL)",
        )

    def read_window(
        self, sql: str, window_start: datetime, window_end: datetime, *, chunksize: int = 50_000
    ) -> Iterator[pd.DataFrame]:
        """Yield the window's rows in frames of at most ``chunksize`` rows (bounded memory)."""
        import pandas as pd
        from sqlalchemy.exc import DBAPIError

        params = {"window_start": sql_timestamp(window_start), "window_end": sql_timestamp(window_end)}
        with self.engine.connect() as conn:
            streaming = conn.execution_options(stream_results=True)
            try:
                yield from pd.read_sql(text(sql), streaming, params=params, chunksize=chunksize)
            except (DBAPIError, pd.errors.DatabaseError) as err:
                # The driver's message names the table or column; it holds the query, not customer data.
                cause = str(getattr(err, "orig", err)).strip().splitlines()[0][:300]
                raise BlueshiftConfigError(
                    f"The extract query failed on warehouse connection {self.conn_id!r}: {cause}. Check the "
                    "table and column names in BLUESHIFT_EXTRACT_SQL and that the connection points at the "
                    "right database"
                ) from err

    def reset_run(self, dag_id: str, run_id: str) -> None:
        """Forget what an earlier try of this run staged."""
        with self.engine.begin() as conn:
            conn.execute(
                text(f"DELETE FROM {self.staging_table} WHERE dag_id = :dag_id AND run_id = :run_id"),
                {"dag_id": dag_id, "run_id": run_id},
            )

    def _insert_staged(self) -> Any:
        """Return the statement that stages one user; a user already staged for the run is kept."""
        return text(
            f"""
            INSERT INTO {self.staging_table}
                (dag_id, run_id, user_key, window_start, window_end, bucket, customer_id, email,
                 status, attempts, error)
            VALUES (:dag_id, :run_id, :user_key, :window_start, :window_end, :bucket, :customer_id,
                    :email, :status, 0, :error)
            ON CONFLICT (dag_id, run_id, user_key) DO NOTHING
            """
        ).bindparams(
            bindparam("window_start", type_=DateTime()),
            bindparam("window_end", type_=DateTime()),
            bindparam("bucket", type_=Integer()),
            bindparam("error", type_=String()),
        )

    def stage(
        self,
        users: pd.DataFrame,
        *,
        dag_id: str,
        run_id: str,
        window_start: datetime,
        window_end: datetime,
    ) -> None:
        """Insert normalized users; a user already staged for the run (a duplicate) is kept once."""
        if users.empty:
            return
        statement = self._insert_staged()
        start, end = utc_naive(window_start), utc_naive(window_end)
        rows = [
            {
                "dag_id": dag_id,
                "run_id": run_id,
                "user_key": key,
                "window_start": start,
                "window_end": end,
                "bucket": int(bucket),
                "customer_id": storable(customer_id),
                "email": storable(email),
                "status": Status.PENDING.value if error is None else Status.INVALID.value,
                "error": error,
            }
            for key, bucket, customer_id, email, error in zip(
                users["user_key"].tolist(),
                users["bucket"].tolist(),
                users["customer_id"].tolist(),
                users["email"].tolist(),
                users["error"].tolist(),
                strict=True,
            )
        ]
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def analyze_staging(self) -> None:
        """Refresh PostgreSQL's statistics of the staging table after a bulk load.

        Without them the planner cannot tell the bucket index from the primary key, and a generic
        plan of the per-user outcome UPDATE can pick the bucket index and scan the whole run for
        every customer (seen: 100,000 users took minutes instead of seconds).
        """
        if self.dialect == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text(f"ANALYZE {self.staging_table}"))

    def skip_already_succeeded(self, dag_id: str, run_id: str) -> None:
        """Mark staged users whose audit row for the same window already says ``succeeded``."""
        statement = text(
            f"""
            UPDATE {self.staging_table}
            SET status = :skipped
            WHERE dag_id = :dag_id AND run_id = :run_id AND status = :pending
              AND EXISTS (
                SELECT 1 FROM {self.audit_table} audit
                WHERE audit.dag_id = {self.staging_table}.dag_id
                  AND audit.window_start = {self.staging_table}.window_start
                  AND audit.window_end = {self.staging_table}.window_end
                  AND audit.user_key = {self.staging_table}.user_key
                  AND audit.status = :succeeded
              )
            """
        )
        with self.engine.begin() as conn:
            conn.execute(
                statement,
                {
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "skipped": Status.SKIPPED.value,
                    "pending": Status.PENDING.value,
                    "succeeded": Status.SUCCEEDED.value,
                },
            )

    def carry_over_failed(self, dag_id: str, run_id: str, *, since: datetime, before: datetime) -> int:
        """
        Stage the users whose audit row is ``failed`` in a window in ``[since, before)``.

        They keep their own window, so a success updates their original audit row. A user already
        staged for this run (it is in the current window too) is not staged twice: one send.

        :return: how many users were carried over.
        """
        select = (
            text(
                f"""
                SELECT user_key, window_start, window_end, customer_id, email
                FROM {self.audit_table}
                WHERE dag_id = :dag_id AND status = :failed
                  AND window_start >= :since AND window_end <= :before
                """
            )
            .bindparams(bindparam("since", type_=DateTime()), bindparam("before", type_=DateTime()))
            .columns(
                user_key=String(),
                window_start=DateTime(),
                window_end=DateTime(),
                customer_id=String(),
                email=String(),
            )
        )
        params = {
            "dag_id": dag_id,
            "failed": Status.FAILED.value,
            "since": utc_naive(since),
            "before": utc_naive(before),
        }
        with self.engine.begin() as conn:
            rows = [
                {
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "user_key": row.user_key,
                    "window_start": row.window_start,
                    "window_end": row.window_end,
                    "bucket": bucket_of(row.user_key),
                    "customer_id": row.customer_id,
                    "email": row.email,
                    "status": Status.PENDING.value,
                    "error": None,
                }
                for row in conn.execute(select, params)
            ]
            before_count = self._count_staged(conn, dag_id, run_id)
            if rows:
                conn.execute(self._insert_staged(), rows)
            return self._count_staged(conn, dag_id, run_id) - before_count

    def _count_staged(self, conn: Connection, dag_id: str, run_id: str) -> int:
        return int(
            conn.execute(
                text(
                    f"SELECT COUNT(*) FROM {self.staging_table} WHERE dag_id = :dag_id AND run_id = :run_id"
                ),
                {"dag_id": dag_id, "run_id": run_id},
            ).scalar_one()
        )

    def count_failed(self, dag_id: str, *, since: datetime, before: datetime) -> int:
        """Return how many audit rows are ``failed`` in windows starting in ``[since, before)``."""
        statement = text(
            f"SELECT COUNT(*) FROM {self.audit_table} WHERE dag_id = :dag_id AND status = :failed "
            "AND window_start >= :since AND window_start < :before"
        ).bindparams(bindparam("since", type_=DateTime()), bindparam("before", type_=DateTime()))
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    statement,
                    {
                        "dag_id": dag_id,
                        "failed": Status.FAILED.value,
                        "since": utc_naive(since),
                        "before": utc_naive(before),
                    },
                ).scalar_one()
            )

    def staged_counts(self, dag_id: str, run_id: str) -> dict[str, int]:
        """Return the number of staged users of the run per status."""
        with self.engine.connect() as conn:
            result = conn.execute(
                text(
                    f"SELECT status, COUNT(*) FROM {self.staging_table} "
                    "WHERE dag_id = :dag_id AND run_id = :run_id GROUP BY status"
                ),
                {"dag_id": dag_id, "run_id": run_id},
            )
            return {str(status): int(count) for status, count in result}

    def pending_per_bucket(self, dag_id: str, run_id: str) -> list[tuple[int, int]]:
        """Return ``(bucket, users)`` for every bucket that holds users still to send, in bucket order."""
        with self.engine.connect() as conn:
            result = conn.execute(
                text(
                    f"SELECT bucket, COUNT(*) FROM {self.staging_table} "
                    "WHERE dag_id = :dag_id AND run_id = :run_id AND status = :pending "
                    "GROUP BY bucket ORDER BY bucket"
                ),
                {"dag_id": dag_id, "run_id": run_id, "pending": Status.PENDING.value},
            )
            return [(int(bucket), int(count)) for bucket, count in result]

    def load_chunk(
        self, dag_id: str, run_id: str, bucket_lo: int, bucket_hi: int
    ) -> list[tuple[str, str | None, str | None]]:
        """Return ``(user_key, customer_id, email)`` of the chunk's users not yet done (pending or failed)."""
        with self.engine.connect() as conn:
            result = conn.execute(
                text(
                    f"SELECT user_key, customer_id, email FROM {self.staging_table} "
                    "WHERE dag_id = :dag_id AND run_id = :run_id AND bucket BETWEEN :lo AND :hi "
                    "AND status IN (:pending, :failed) ORDER BY user_key"
                ),
                {
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "lo": bucket_lo,
                    "hi": bucket_hi,
                    "pending": Status.PENDING.value,
                    "failed": Status.FAILED.value,
                },
            )
            return [(str(key), customer_id, email) for key, customer_id, email in result]

    def mark_chunk(self, dag_id: str, run_id: str, bucket_lo: int, bucket_hi: int, status: str) -> int:
        """Set ``status`` on every unfinished user of a chunk in one statement; return how many."""
        statement = text(
            f"""
            UPDATE {self.staging_table} SET status = :status
            WHERE dag_id = :dag_id AND run_id = :run_id AND bucket BETWEEN :lo AND :hi
              AND status IN (:pending, :failed)
            """
        )
        with self.engine.begin() as conn:
            result = conn.execute(
                statement,
                {
                    "status": status,
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "lo": bucket_lo,
                    "hi": bucket_hi,
                    "pending": Status.PENDING.value,
                    "failed": Status.FAILED.value,
                },
            )
            return int(result.rowcount)

    def record_outcomes(self, dag_id: str, run_id: str, outcomes: Sequence[dict[str, Any]]) -> None:
        """Write outcomes (``user_key, status, http_status, attempts, error``) in one transaction."""
        if not outcomes:
            return
        statement = text(
            f"""
            UPDATE {self.staging_table}
            SET status = :status, http_status = :http_status, attempts = attempts + :attempts,
                error = :error
            WHERE dag_id = :dag_id AND run_id = :run_id AND user_key = :user_key
            """
        ).bindparams(
            bindparam("http_status", type_=Integer()),
            bindparam("attempts", type_=Integer()),
            bindparam("error", type_=String()),
        )
        rows = [{"dag_id": dag_id, "run_id": run_id, **outcome} for outcome in outcomes]
        with self.engine.begin() as conn:
            conn.execute(statement, rows)

    def publish_audit(
        self,
        dag_id: str,
        run_id: str,
        *,
        now: datetime | None = None,
        carry_over_since: datetime | None = None,
    ) -> None:
        """
        Upsert the run's users into the audit table, one row per (dag, window, user), atomically.

        Users still ``pending`` belong to a chunk task that did not finish: they are audited
        ``failed``. A ``dry_run`` outcome never overwrites a real one; ``skipped`` users (already
        succeeded for the window) keep the row of the run that sent them. With
        ``carry_over_since``, a user who succeeded now also closes its ``failed`` rows of earlier
        windows since then (it was sent once, for both).
        """
        statement = text(
            f"""
            INSERT INTO {self.audit_table} AS audit
                (dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
                 http_status, attempts, error, created_at, updated_at)
            SELECT dag_id, window_start, window_end, user_key, run_id, customer_id, email,
                   CASE WHEN status = :pending THEN :failed ELSE status END,
                   http_status, attempts,
                   CASE WHEN status = :pending THEN :not_finished ELSE error END,
                   :now, :now
            FROM {self.staging_table}
            WHERE dag_id = :dag_id AND run_id = :run_id AND status <> :skipped
            ON CONFLICT (dag_id, window_start, window_end, user_key) DO UPDATE SET
                run_id = excluded.run_id,
                customer_id = excluded.customer_id,
                email = excluded.email,
                status = excluded.status,
                http_status = excluded.http_status,
                attempts = CASE WHEN audit.run_id = excluded.run_id THEN excluded.attempts
                                ELSE audit.attempts + excluded.attempts END,
                error = excluded.error,
                updated_at = excluded.updated_at
            WHERE audit.status = :dry_run OR excluded.status <> :dry_run
            """
        ).bindparams(bindparam("now", type_=DateTime()))
        params = {
            "dag_id": dag_id,
            "run_id": run_id,
            "pending": Status.PENDING.value,
            "failed": Status.FAILED.value,
            "dry_run": Status.DRY_RUN.value,
            "skipped": Status.SKIPPED.value,
            "not_finished": CHUNK_TASK_DID_NOT_FINISH,
            "now": utc_naive(now or datetime.now(UTC)),
        }
        close_earlier = text(
            f"""
            UPDATE {self.audit_table}
            SET status = :succeeded, run_id = :run_id, http_status = 200, error = NULL, updated_at = :now
            WHERE dag_id = :dag_id AND status = :failed AND window_start >= :since
              AND user_key IN (
                SELECT user_key FROM {self.staging_table}
                WHERE dag_id = :dag_id AND run_id = :run_id AND status = :succeeded
              )
            """
        ).bindparams(bindparam("now", type_=DateTime()), bindparam("since", type_=DateTime()))
        with self.engine.begin() as conn:
            conn.execute(statement, params)
            if carry_over_since is not None:
                conn.execute(
                    close_earlier,
                    {
                        "dag_id": dag_id,
                        "run_id": run_id,
                        "succeeded": Status.SUCCEEDED.value,
                        "failed": Status.FAILED.value,
                        "now": params["now"],
                        "since": utc_naive(carry_over_since),
                    },
                )

    def audit_counts(self, dag_id: str, run_id: str) -> dict[str, int]:
        """Return the audit's rows per status for the users staged by this run."""
        with self.engine.connect() as conn:
            result = conn.execute(
                text(
                    f"""
                    SELECT audit.status, COUNT(*)
                    FROM {self.audit_table} audit
                    JOIN {self.staging_table} staged
                      ON staged.dag_id = audit.dag_id AND staged.user_key = audit.user_key
                     AND staged.window_start = audit.window_start AND staged.window_end = audit.window_end
                    WHERE staged.dag_id = :dag_id AND staged.run_id = :run_id
                    GROUP BY audit.status
                    """
                ),
                {"dag_id": dag_id, "run_id": run_id},
            )
            return {str(status): int(count) for status, count in result}
