"""The warehouse side: the extract, one read of the audit table, and the audit publish.

Whatever the number of users or chunk tasks, a run sends the warehouse a fixed set of statements:
creating the audit table if it is missing, the extract query (streamed), one read of the audit
(the window's already-succeeded users and the failed users to carry over), and the publish: one
scratch table, its batch load, one set-based upsert into the audit table (plus one UPDATE that
closes carried-over failures), one count, and the drop of the scratch table. The per-dialect SQL
is in ``blueshift.dialects`` and ``sql/audit/``; the working state that chunk tasks write many
times a second lives in the state store (``blueshift.state``), never here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Integer, String, bindparam, text

import blueshift.dialects as dialects
from blueshift.connections import WAREHOUSE_EXAMPLE, get_connection, sql_hook
from blueshift.engines import create_tolerating_race, safe_engine
from blueshift.exceptions import BlueshiftConfigError
from blueshift.outcomes import Status
from blueshift.settings import validate_identifier
from blueshift.state import batches, utc_naive

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Connection, Engine


def sql_timestamp(moment: datetime) -> str:
    """Return ``YYYY-MM-DD HH:MM:SS`` in UTC: compares correctly as text (SQLite) and as a timestamp."""
    return utc_naive(moment).strftime("%Y-%m-%d %H:%M:%S")


class Warehouse:
    """
    The customers' source and the audit table, on any common-sql connection.

    :param conn_id: the Airflow connection of the warehouse (Snowflake, BigQuery, PostgreSQL, ...).
    :param audit_table: table that keeps one row per (dag, window, user).
    """

    def __init__(self, conn_id: str, *, audit_table: str) -> None:
        self.conn_id = conn_id
        self.audit_table = validate_identifier(audit_table, "BLUESHIFT_AUDIT_TABLE")

    @cached_property
    def engine(self) -> Engine:
        """Return the SQLAlchemy engine of the connection's common-sql hook."""
        connection = get_connection(self.conn_id, "Warehouse", WAREHOUSE_EXAMPLE)
        engine_kwargs: dict[str, Any] = {}
        if connection.conn_type == "sqlite":
            engine_kwargs["connect_args"] = {"timeout": 60}
        engine = safe_engine(sql_hook(connection, "Warehouse"), **engine_kwargs)
        dialects.family(engine.dialect.name)  # an engine we have no upsert for fails here, at once
        return engine

    @property
    def dialect(self) -> str:
        """Return the SQLAlchemy dialect name (``snowflake``, ``postgresql``, ...)."""
        return self.engine.dialect.name

    def ensure_audit_table(self) -> None:
        """Create the audit table if it does not exist; an older one without a newer column fails clearly."""
        from sqlalchemy.exc import DBAPIError

        schema, _, name = self.audit_table.rpartition(".")
        create_tolerating_race(
            self.engine,
            dialects.create_audit_table(self.dialect, self.audit_table),
            lambda inspector: inspector.has_table(name, schema=schema or None),
        )
        columns = ", ".join(dialects.AUDIT_COLUMNS)
        try:
            with self.engine.connect() as conn:
                conn.execute(text(f"SELECT {columns} FROM {self.audit_table} WHERE 1 = 0")).all()
        except DBAPIError as err:
            # The result's keys, not the inspector: duckdb_engine's column reflection fails.
            with self.engine.connect() as conn:
                existing = list(conn.execute(text(f"SELECT * FROM {self.audit_table} WHERE 1 = 0")).keys())
            missing = dialects.audit_columns_missing(existing)
            if not missing:
                raise
            hints = "; ".join(
                dialects.add_column_hint(self.dialect, self.audit_table, column) for column in missing
            )
            raise BlueshiftConfigError(
                f"The audit table {self.audit_table} was created by an older version and lacks the "
                f"column(s) {', '.join(missing)}: add them once ({hints}), then clear the task"
            ) from err

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
                    f"The extract query failed on warehouse connection {self.conn_id!r}: {cause}. Check "
                    "the table and column names in BLUESHIFT_EXTRACT_SQL_PATH and that the connection "
                    "points at the right database"
                ) from err

    def read_prior(
        self,
        dag_id: str,
        window_start: datetime,
        window_end: datetime,
        *,
        succeeded: bool,
        failed_since: datetime | None,
    ) -> Iterator[dict[str, Any]]:
        """
        Yield, in one query, the audit rows a run needs before it sends anything.

        :param succeeded: the window's ``succeeded`` users (not sent again unless forced).
        :param failed_since: also the ``failed`` users of earlier windows starting at or after this
            (carried over), up to ``window_start``.
        """
        conditions: list[str] = []
        params: dict[str, Any] = {"dag_id": dag_id, "ws": utc_naive(window_start)}
        if succeeded:
            conditions.append("(window_start = :ws AND window_end = :we AND status = :succeeded)")
            params.update(we=utc_naive(window_end), succeeded=Status.SUCCEEDED.value)
        if failed_since is not None:
            conditions.append("(status = :failed AND window_start >= :since AND window_end <= :ws)")
            params.update(since=utc_naive(failed_since), failed=Status.FAILED.value)
        if not conditions:
            return
        statement = (
            text(
                "SELECT user_key, window_start, window_end, status, customer_id, email "
                f"FROM {self.audit_table} WHERE dag_id = :dag_id AND ({' OR '.join(conditions)})"
            )
            .bindparams(
                *(bindparam(name, type_=DateTime()) for name in ("ws", "we", "since") if name in params)
            )
            .columns(window_start=DateTime(), window_end=DateTime(), customer_id=String(), email=String())
        )
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(statement, params)
            for row in result.mappings():
                yield dict(row)

    def _scratch_table(self) -> str:
        schema, _, _ = self.audit_table.rpartition(".")
        name = f"blueshift_load_{uuid.uuid4().hex[:12]}"
        return f"{schema}.{name}" if schema else name

    def publish_audit(
        self,
        dag_id: str,
        run_id: str,
        outcomes: Iterable[dict[str, Any]],
        *,
        carry_over_since: datetime | None = None,
        now: datetime | None = None,
    ) -> dict[str, int]:
        """
        Upsert the run's outcomes into the audit table, one row per (dag, window, user), atomically.

        The outcomes are loaded into a scratch table in batches, then one set-based upsert moves
        them into the audit table (a ``dry_run`` never overwrites a real outcome; ``attempts`` add
        up across runs and are not counted twice when the same run's audit is retried). With
        ``carry_over_since``, a user who succeeded now also closes its ``failed`` rows of earlier
        windows since then. All of it is one transaction where the engine has them.

        :return: the audit table's rows per status for the published users.
        """
        scratch = self._scratch_table()
        moment = utc_naive(now or datetime.now(timezone.utc))
        upsert = text(dialects.upsert_audit(self.dialect, self.audit_table, scratch)).bindparams(
            bindparam("now", type_=DateTime())
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(text(dialects.create_scratch_table(self.dialect, scratch)))
                self._load_scratch(conn, scratch, outcomes)
                conn.execute(upsert, {"now": moment})
                if carry_over_since is not None:
                    self._close_carried_over(conn, scratch, dag_id, run_id, carry_over_since, moment)
                counts = conn.execute(text(self._count_published(scratch)))
                return {str(status): int(count) for status, count in counts}
        finally:
            with self.engine.begin() as conn:
                conn.execute(text(dialects.drop_table(self.dialect, scratch)))

    def _load_scratch(self, conn: Connection, scratch: str, outcomes: Iterable[dict[str, Any]]) -> None:
        """Insert the outcomes into the scratch table in batches (one executemany per batch)."""
        insert = text(dialects.insert_scratch(self.dialect, scratch)).bindparams(
            bindparam("window_start", type_=DateTime()),
            bindparam("window_end", type_=DateTime()),
            bindparam("http_status", type_=Integer()),
            bindparam("attempts", type_=Integer()),
            bindparam("customer_id", type_=String()),
            bindparam("email", type_=String()),
            bindparam("error", type_=String()),
        )
        rows = ({column: outcome[column] for column in dialects.SCRATCH_COLUMNS} for outcome in outcomes)
        for batch in batches(rows):
            conn.execute(insert, batch)

    def _close_carried_over(
        self, conn: Connection, scratch: str, dag_id: str, run_id: str, since: datetime, now: datetime
    ) -> None:
        """Close the earlier windows' ``failed`` rows of the users this run sent successfully."""
        close = text(dialects.close_carried_over(self.dialect, self.audit_table, scratch)).bindparams(
            bindparam("now", type_=DateTime()), bindparam("since", type_=DateTime())
        )
        conn.execute(close, {"dag_id": dag_id, "run_id": run_id, "now": now, "since": utc_naive(since)})

    def _count_published(self, scratch: str) -> str:
        key = " AND ".join(f"audit.{column} = scratch.{column}" for column in dialects.AUDIT_KEY)
        return (
            f"SELECT audit.status, COUNT(*) FROM {self.audit_table} audit "
            f"JOIN {scratch} scratch ON {key} GROUP BY audit.status"
        )


def expired_since(carry_over_since: datetime) -> datetime:
    """Return the start of the window that just left the carry-over (its failures stay failed)."""
    return carry_over_since - timedelta(days=1)
