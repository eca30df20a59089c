"""The pipeline's working state: staged users, their outcomes during a run, and the budget leases.

It lives in a small transactional database apart from the warehouse (connection ``blueshift_state``),
or in the warehouse itself when that is SQLite, PostgreSQL or MySQL/MariaDB (see
``blueshift.connections.state_conn_id_for``). Chunk tasks write here many times a second; the
warehouse sees only the extract, one read of the audit and the publish (``blueshift.warehouse``).

Customer rows never travel through XCom: the extract task stages them in ``staging_table`` keyed by
(dag_id, run_id, user_key), chunk tasks read their slice from there and write their outcomes back,
and the audit task publishes the run's rows to the warehouse. Every statement binds its values;
table names come from settings and are validated identifiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Integer, String, bindparam, text

from blueshift.connections import STATE_EXAMPLE, get_connection, sql_hook
from blueshift.engines import create_tolerating_race, safe_engine
from blueshift.exceptions import BlueshiftConfigError
from blueshift.outcomes import Status
from blueshift.settings import validate_identifier
from blueshift.validation import bucket_of, storable

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Engine, Inspector

CHUNK_TASK_DID_NOT_FINISH = "chunk task did not finish (see its log); the user was not confirmed sent"
STATE_DIALECTS = ("sqlite", "postgresql", "mysql")
_BATCH = 10_000


def utc_naive(moment: datetime) -> datetime:
    """Return ``moment`` in UTC without tzinfo, the form stored in TIMESTAMP columns."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def batches(rows: Iterable[dict[str, Any]], size: int = _BATCH) -> Iterator[list[dict[str, Any]]]:
    """Yield ``rows`` in lists of at most ``size``."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class StateStore:
    """
    Staging and lease tables on a SQLite, PostgreSQL or MySQL/MariaDB connection.

    :param conn_id: the Airflow connection of the state store.
    :param staging_table: table that holds the users of runs in flight.
    """

    def __init__(self, conn_id: str, *, staging_table: str) -> None:
        self.conn_id = conn_id
        self.staging_table = validate_identifier(staging_table, "BLUESHIFT_STAGING_TABLE")
        self.lease_table = f"{self.staging_table}_leases"

    @cached_property
    def engine(self) -> Engine:
        """Return the SQLAlchemy engine of the connection's common-sql hook."""
        connection = get_connection(self.conn_id, "State store", STATE_EXAMPLE)
        hook = sql_hook(connection, "State store")
        engine_kwargs: dict[str, Any] = {}
        if connection.conn_type == "sqlite":
            # Several chunk tasks write at once; wait for SQLite's lock instead of failing after 5 s.
            engine_kwargs["connect_args"] = {"timeout": 60}
        engine = safe_engine(hook, **engine_kwargs)
        if engine.dialect.name not in STATE_DIALECTS:
            raise BlueshiftConfigError(
                f"State store connection {self.conn_id!r} is {engine.dialect.name}: the working state "
                "needs PostgreSQL, MySQL/MariaDB or SQLite (many small concurrent transactions)"
            )
        return engine

    @property
    def dialect(self) -> str:
        """Return the SQLAlchemy dialect name: ``sqlite``, ``postgresql`` or ``mysql``."""
        return self.engine.dialect.name

    # Tables ---------------------------------------------------------------------------------------
    def _create(self, ddl: str, created: Callable[[Inspector], bool]) -> None:
        create_tolerating_race(self.engine, ddl, created)

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
        """Put a SQLite state store in WAL mode: readers do not block the writer, so tasks run side by side.

        The mode is stored in the file, so this writes once. Switching needs the file to itself
        and SQLite answers "database is locked" at once, without waiting, when another run's task
        has it open: that is retried briefly, and is fine when the other one switched it.
        """
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

    @property
    def _timestamp(self) -> str:
        # MySQL's TIMESTAMP updates itself and ends in 2038; leases need microseconds.
        return "DATETIME(6)" if self.dialect == "mysql" else "TIMESTAMP"

    def ensure_tables(self) -> None:
        """Create the staging table (and its bucket index) if it does not exist."""
        if self.dialect == "sqlite":
            self._use_wal()
        index = f"{self.staging_table.rpartition('.')[2]}_bucket"
        ts = self._timestamp
        # Chunk tasks read and mark their users by bucket range: without this index every chunk
        # task scans the whole run, and a run's cost grows with (users x chunks). MySQL has no
        # CREATE INDEX IF NOT EXISTS: there the index is declared with the table.
        inline_index = f",\n INDEX {index} (dag_id, run_id, bucket)" if self.dialect == "mysql" else ""
        self._create_table(
            self.staging_table,
            f"""
            CREATE TABLE IF NOT EXISTS {self.staging_table} (
                dag_id VARCHAR(250) NOT NULL,
                run_id VARCHAR(250) NOT NULL,
                user_key VARCHAR(64) NOT NULL,
                window_start {ts} NOT NULL,
                window_end {ts} NOT NULL,
                bucket INTEGER NOT NULL,
                customer_id TEXT,
                email TEXT,
                status VARCHAR(16) NOT NULL,
                http_status INTEGER,
                attempts INTEGER NOT NULL DEFAULT 0,
                error TEXT,
                PRIMARY KEY (dag_id, run_id, user_key){inline_index}
            )
            """,
        )
        if self.dialect != "mysql":
            self._create_index(self.staging_table, index, "dag_id, run_id, bucket")

    def ensure_lease_table(self) -> None:
        """Create the table of budget leases (see ``blueshift.budget``) if it does not exist."""
        self._create_table(
            self.lease_table,
            f"CREATE TABLE IF NOT EXISTS {self.lease_table} "
            f"(holder VARCHAR(500) PRIMARY KEY, heartbeat_at {self._timestamp} NOT NULL)",
        )

    def renew_lease_sql(self) -> Any:
        """Return the statement that stamps a lease (insert or update), in this store's dialect."""
        if self.dialect == "mysql":
            sql = (
                f"INSERT INTO {self.lease_table} (holder, heartbeat_at) VALUES (:holder, :now) "
                "ON DUPLICATE KEY UPDATE heartbeat_at = VALUES(heartbeat_at)"
            )
        else:
            sql = (
                f"INSERT INTO {self.lease_table} (holder, heartbeat_at) VALUES (:holder, :now) "
                "ON CONFLICT (holder) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
            )
        return text(sql).bindparams(bindparam("now", type_=DateTime()))

    # Staging --------------------------------------------------------------------------------------
    def reset_run(self, dag_id: str, run_id: str) -> None:
        """Forget what an earlier try of this run staged."""
        with self.engine.begin() as conn:
            conn.execute(
                text(f"DELETE FROM {self.staging_table} WHERE dag_id = :dag_id AND run_id = :run_id"),
                {"dag_id": dag_id, "run_id": run_id},
            )

    def _insert_staged(self) -> Any:
        """Return the statement that stages one user; a user already staged for the run is kept."""
        insert = "INSERT IGNORE INTO" if self.dialect == "mysql" else "INSERT INTO"
        keep = "" if self.dialect == "mysql" else "ON CONFLICT (dag_id, run_id, user_key) DO NOTHING"
        return text(
            f"""
            {insert} {self.staging_table}
                (dag_id, run_id, user_key, window_start, window_end, bucket, customer_id, email,
                 status, attempts, error)
            VALUES (:dag_id, :run_id, :user_key, :window_start, :window_end, :bucket, :customer_id,
                    :email, :status, 0, :error)
            {keep}
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
            conn.execute(self._insert_staged(), rows)

    def stage_carried_over(self, dag_id: str, run_id: str, rows: Sequence[dict[str, Any]]) -> int:
        """
        Stage users left ``failed`` by earlier windows (rows of the audit table), in their own window.

        So a success updates their original audit row. A user already staged for this run (it is
        in the current window too) is not staged twice: one send.

        :return: how many users were carried over.
        """
        if not rows:
            return 0
        staged = [
            {
                "dag_id": dag_id,
                "run_id": run_id,
                "user_key": row["user_key"],
                "window_start": row["window_start"],
                "window_end": row["window_end"],
                "bucket": bucket_of(row["user_key"]),
                "customer_id": row["customer_id"],
                "email": row["email"],
                "status": Status.PENDING.value,
                "error": None,
            }
            for row in rows
        ]
        before = sum(self.staged_counts(dag_id, run_id).values())
        with self.engine.begin() as conn:
            conn.execute(self._insert_staged(), staged)
        return sum(self.staged_counts(dag_id, run_id).values()) - before

    def skip_succeeded(self, dag_id: str, run_id: str, user_keys: Iterable[str]) -> None:
        """Mark staged users that the audit already has as ``succeeded`` for this window: not re-sent."""
        statement = text(
            f"UPDATE {self.staging_table} SET status = :skipped "
            "WHERE dag_id = :dag_id AND run_id = :run_id AND user_key = :user_key AND status = :pending"
        )
        params = {
            "dag_id": dag_id,
            "run_id": run_id,
            "skipped": Status.SKIPPED.value,
            "pending": Status.PENDING.value,
        }
        for batch in batches({**params, "user_key": key} for key in user_keys):
            with self.engine.begin() as conn:
                conn.execute(statement, batch)

    def analyze(self) -> None:
        """Refresh PostgreSQL's statistics of the staging table after a bulk load.

        Without them the planner cannot tell the bucket index from the primary key, and a generic
        plan of the per-user outcome UPDATE can pick the bucket index and scan the whole run for
        every customer.
        """
        if self.dialect == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text(f"ANALYZE {self.staging_table}"))

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

    # Chunk tasks ------------------------------------------------------------------------------------
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

    # The audit's source -----------------------------------------------------------------------------
    def outcomes(self, dag_id: str, run_id: str) -> Iterator[dict[str, Any]]:
        """Yield the run's final outcome per staged user, for the audit (not the ``skipped`` ones).

        Users still ``pending`` belong to a chunk task that did not finish: they are ``failed``.
        """
        statement = text(
            f"""
            SELECT dag_id, window_start, window_end, user_key, run_id, customer_id, email, status,
                   http_status, attempts, error
            FROM {self.staging_table}
            WHERE dag_id = :dag_id AND run_id = :run_id AND status <> :skipped
            """
        ).columns(window_start=DateTime(), window_end=DateTime())
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(
                statement, {"dag_id": dag_id, "run_id": run_id, "skipped": Status.SKIPPED.value}
            )
            for row in result.mappings():
                outcome = dict(row)
                if outcome["status"] == Status.PENDING.value:
                    outcome["status"], outcome["error"] = Status.FAILED.value, CHUNK_TASK_DID_NOT_FINISH
                yield outcome
