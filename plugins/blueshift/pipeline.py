"""The extract and audit steps of the DAG, kept out of the DAG file so it only wires tasks."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from blueshift.connections import state_conn_id_for
from blueshift.exceptions import (
    BlueshiftAuditMismatchError,
    BlueshiftConfigError,
    BlueshiftRunIncompleteError,
)
from blueshift.outcomes import AUDITED_STATUSES, Status
from blueshift.settings import Settings
from blueshift.state import StateStore, batches, utc_naive
from blueshift.validation import BUCKETS, normalize
from blueshift.warehouse import Warehouse, expired_since

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("customer_id", "email")
MIN_CHUNK_USERS = 10


def warehouse_from(settings: Settings) -> Warehouse:
    """Return the warehouse named by the settings."""
    return Warehouse(settings.warehouse_conn_id, audit_table=settings.audit_table)


def state_store_from(settings: Settings) -> StateStore:
    """Return the state store named by the settings (the warehouse itself when it can be one)."""
    conn_id = state_conn_id_for(settings.state_conn_id, settings.warehouse_conn_id)
    return StateStore(conn_id, staging_table=settings.staging_table)


def read_extract_sql(path: str) -> str:
    """Return the extract query; it must bind ``:window_start`` and ``:window_end``."""
    file = Path(path)
    if not file.is_file():
        raise BlueshiftConfigError(
            f"BLUESHIFT_EXTRACT_SQL_PATH={path!r} is not a file: point it at a .sql file that selects "
            "customer_id and email for :window_start <= consented_at < :window_end"
        )
    sql = file.read_text(encoding="utf-8")
    missing = [name for name in (":window_start", ":window_end") if name not in sql]
    if missing:
        raise BlueshiftConfigError(
            f"{path} does not use the bound parameter(s) {', '.join(missing)}: filter the window with "
            "consented_at >= :window_start AND consented_at < :window_end"
        )
    return sql


def plan_chunks(
    pending_per_bucket: Iterable[tuple[int, int]],
    *,
    chunk_size: int,
    max_chunks: int,
    min_chunks: int = 1,
) -> list[dict[str, Any]]:
    """
    Cut the hash buckets into contiguous ranges of about ``chunk_size`` users, at most ``max_chunks``.

    Chunks shrink (to no fewer than ``MIN_CHUNK_USERS``) so that a run has at least ``min_chunks``
    of them (the chunk tasks that may run at once): each chunk task spends only its share of the
    budget, so a run with fewer chunks than that would leave budget unused.

    A chunk is a bucket range, so its identity comes from its users' hashes, not from where they sat
    in the extract; the ranges tile every bucket, so no staged user falls between two chunks.
    """
    counts = [(bucket, users) for bucket, users in pending_per_bucket if users > 0]
    total = sum(users for _, users in counts)
    if total == 0:
        return []
    target = max(
        min(chunk_size, max(MIN_CHUNK_USERS, math.ceil(total / min_chunks))),
        math.ceil(total / max_chunks),
    )
    ranges: list[list[int]] = []  # [lo, hi, users]
    lo, users_in_range = 0, 0
    for bucket, users in counts:
        users_in_range += users
        if users_in_range >= target:
            ranges.append([lo, bucket, users_in_range])
            lo, users_in_range = bucket + 1, 0
    if users_in_range:
        if len(ranges) >= max_chunks:
            ranges[-1][1] = BUCKETS - 1
            ranges[-1][2] += users_in_range
        else:
            ranges.append([lo, BUCKETS - 1, users_in_range])
    else:
        ranges[-1][1] = BUCKETS - 1
    return [
        {
            "chunk_id": f"b{lo:03x}-{hi:03x}",
            "bucket_lo": lo,
            "bucket_hi": hi,
            "users": users,
            "label": f"chunk {index + 1}/{len(ranges)} · {users} users",
        }
        for index, (lo, hi, users) in enumerate(ranges)
    ]


def extract_and_stage(
    *,
    settings: Settings,
    dag_id: str,
    run_id: str,
    window_start: datetime,
    window_end: datetime,
    chunk_size: int,
    force: bool = False,
    carry_over_since: datetime | None = None,
    read_chunksize: int = 50_000,
) -> dict[str, Any]:
    """Read the window, validate and de-duplicate its users, stage them and plan the chunks.

    :param force: also re-send users whose audit row for this window already says ``succeeded``.
    :param carry_over_since: also re-send users left ``failed`` by earlier windows since then.
    :return: counts and chunk descriptors only; no customer data.
    """
    sql = read_extract_sql(settings.extract_sql_path)
    warehouse, state = warehouse_from(settings), state_store_from(settings)
    counts = _stage_window(
        sql,
        warehouse,
        state,
        settings,
        dag_id=dag_id,
        run_id=run_id,
        window_start=window_start,
        window_end=window_end,
        force=force,
        carry_over_since=carry_over_since,
        read_chunksize=read_chunksize,
    )
    # The plan id ties each chunk task's result to this try of the extract: after a re-run, XComs of
    # map indexes the new plan no longer has are still readable, and must not count as finished.
    plan = uuid.uuid4().hex[:12]
    chunks = plan_chunks(
        state.pending_per_bucket(dag_id, run_id),
        chunk_size=chunk_size,
        max_chunks=settings.max_chunks,
        min_chunks=settings.max_active_chunks,
    )
    summary = {**counts, "plan": plan, "chunks": [{**chunk, "plan": plan} for chunk in chunks]}
    _log_staged(summary)
    return summary


def _stage_window(
    sql: str,
    warehouse: Warehouse,
    state: StateStore,
    settings: Settings,
    *,
    dag_id: str,
    run_id: str,
    window_start: datetime,
    window_end: datetime,
    force: bool,
    carry_over_since: datetime | None,
    read_chunksize: int,
) -> dict[str, Any]:
    """Stage the window's users and the failures carried over; return the counts of the staging."""
    warehouse.ensure_audit_table()
    state.ensure_tables()
    state.reset_run(dag_id, run_id)
    frames = warehouse.read_window(sql, window_start, window_end, chunksize=read_chunksize)
    rows = _stage(_checked(frames, settings), state, dag_id, run_id, window_start, window_end)
    window_users = sum(state.staged_counts(dag_id, run_id).values())
    if carry_over_since is not None:
        log.info("Retrying users left failed in windows since %s", carry_over_since.isoformat())
    carried, expired = _apply_prior_outcomes(
        warehouse, state, dag_id, run_id, window_start, window_end, force, carry_over_since
    )
    state.analyze()
    staged = state.staged_counts(dag_id, run_id)
    return {
        "window_start": window_start.isoformat(),
        "window_end": window_end.isoformat(),
        "rows": rows,
        "duplicates": rows - window_users,
        "window_users": window_users,
        "carried_over": carried,
        "already_succeeded": staged.get(Status.SKIPPED.value, 0),
        "users": sum(staged.values()),
        "invalid": staged.get(Status.INVALID.value, 0),
        "to_send": staged.get(Status.PENDING.value, 0),
        "carry_over_since": carry_over_since.isoformat() if carry_over_since else None,
        "expired_failures": expired,
    }


def _stage(
    frames: Iterable[Any],
    state: StateStore,
    dag_id: str,
    run_id: str,
    window_start: datetime,
    window_end: datetime,
) -> int:
    """Normalize, de-duplicate and stage each frame of the extract; return the rows read."""
    rows = 0
    for frame in frames:
        rows += len(frame)
        users = normalize(frame).drop_duplicates("user_key")
        state.stage(users, dag_id=dag_id, run_id=run_id, window_start=window_start, window_end=window_end)
    return rows


def _log_staged(summary: dict[str, Any]) -> None:
    log.info(
        "Window [%s, %s): %d rows, %d users (%d duplicates removed), %d invalid, %d already succeeded, "
        "%d failed earlier carried over; %d to send in %d chunks",
        summary["window_start"],
        summary["window_end"],
        summary["rows"],
        summary["window_users"],
        summary["duplicates"],
        summary["invalid"],
        summary["already_succeeded"],
        summary["carried_over"],
        summary["to_send"],
        len(summary["chunks"]),
    )


def _apply_prior_outcomes(
    warehouse: Warehouse,
    state: StateStore,
    dag_id: str,
    run_id: str,
    window_start: datetime,
    window_end: datetime,
    force: bool,
    carry_over_since: datetime | None,
) -> tuple[int, int]:
    """Read the audit once: skip the window's succeeded users, stage the failed ones to carry over.

    :return: how many users were carried over, and how many failures just left the carry-over.
    """
    prior = warehouse.read_prior(
        dag_id,
        window_start,
        window_end,
        succeeded=not force,
        failed_since=expired_since(carry_over_since) if carry_over_since is not None else None,
    )
    carry: list[dict[str, Any]] = []
    expired = 0
    for batch in batches(prior):
        state.skip_succeeded(
            dag_id, run_id, (row["user_key"] for row in batch if row["status"] == Status.SUCCEEDED.value)
        )
        for row in batch:
            if row["status"] != Status.FAILED.value or carry_over_since is None:
                continue
            if row["window_start"] >= utc_naive(carry_over_since):
                carry.append(row)
            else:
                expired += 1
    return state.stage_carried_over(dag_id, run_id, carry), expired


def _checked(frames: Iterable[Any], settings: Settings) -> Iterable[Any]:
    for frame in frames:
        frame.columns = [str(column).lower() for column in frame.columns]
        missing = [column for column in REQUIRED_COLUMNS if column not in frame.columns]
        if missing:
            raise BlueshiftConfigError(
                f"The extract query {settings.extract_sql_path} returns no column(s) {', '.join(missing)} "
                f"(it returns {', '.join(frame.columns)}): alias your columns AS customer_id and AS email"
            )
        yield frame


def finished_chunks(results: Iterable[Any] | None, plan: str | None) -> int:
    """Return how many chunk tasks of this plan returned a result (a failed task returns nothing)."""
    return sum(1 for result in results or () if isinstance(result, dict) and result.get("plan") == plan)


_EXTRACT_COUNTS = (
    "window_start",
    "window_end",
    "rows",
    "duplicates",
    "users",
    "already_succeeded",
    "carried_over",
    "expired_failures",
)
"""The extract's counts that the audit's summary repeats."""


def audit_run(
    *,
    settings: Settings,
    dag_id: str,
    run_id: str,
    prepared: dict[str, Any],
    finished_chunks: int,
) -> dict[str, Any]:
    """Publish every staged user's outcome to the audit table and return the run's counts.

    ``raise_if_incomplete`` then decides the run's fate from the counts.

    :param finished_chunks: how many chunk tasks of the run's plan returned (see ``finished_chunks``).
    :return: per-status counts of the run (no customer data).
    """
    warehouse, state = warehouse_from(settings), state_store_from(settings)
    since = prepared.get("carry_over_since")
    carry_over_since = datetime.fromisoformat(since) if since else None
    counts = warehouse.publish_audit(
        dag_id, run_id, state.outcomes(dag_id, run_id), carry_over_since=carry_over_since
    )
    staged_counts = state.staged_counts(dag_id, run_id)
    # Users already succeeded for the window were not re-sent: their audit row says succeeded.
    skipped = staged_counts.get(Status.SKIPPED.value, 0)
    counts[Status.SUCCEEDED.value] = counts.get(Status.SUCCEEDED.value, 0) + skipped
    staged = sum(staged_counts.values())
    audited = sum(counts.values())
    summary: dict[str, Any] = {status.value: counts.get(status.value, 0) for status in AUDITED_STATUSES}
    summary.update({name: prepared.get(name, 0) for name in _EXTRACT_COUNTS})
    summary["chunks"] = int(prepared["chunks"])
    summary["chunks_failed"] = summary["chunks"] - finished_chunks
    log.info("Audit of run %s\n%s", run_id, format_summary(summary))
    if summary["expired_failures"]:
        log.warning(
            "%d users failed in the window that just left the %d-day carry-over: they stay failed and are "
            "no longer retried automatically; see %s",
            summary["expired_failures"],
            settings.carry_over_days,
            settings.audit_table,
        )
    summary["staged"], summary["audited"] = staged, audited
    if (
        audited == staged == prepared["users"]
        and not summary[Status.FAILED.value]
        and not summary["chunks_failed"]
    ):
        # Kept for failed runs, so clearing a failed chunk re-sends only its unfinished users.
        state.reset_run(dag_id, run_id)
    return summary


def raise_if_incomplete(summary: dict[str, Any], settings: Settings) -> None:
    """Fail the run unless every user is accounted for and none ended ``failed``."""
    if not (summary["audited"] == summary["staged"] == summary["users"]):
        raise BlueshiftAuditMismatchError(
            f"Audit mismatch: {summary['users']} users extracted, {summary['staged']} staged, "
            f"{summary['audited']} audited"
        )
    if summary[Status.FAILED.value] or summary["chunks_failed"]:
        raise BlueshiftRunIncompleteError(
            f"{summary[Status.FAILED.value]} users ended failed and {summary['chunks_failed']} of "
            f"{summary['chunks']} chunk tasks did not finish; see {settings.audit_table} for the users "
            "and the chunk task logs for the cause, then clear the failed tasks to re-send them"
        )


def format_summary(summary: dict[str, Any]) -> str:
    """Return the run's per-status counts as a small text table."""
    lines = [
        f"window      {summary['window_start']} .. {summary['window_end']}",
        f"rows        {summary['rows']:>9}  ({summary['duplicates']} duplicates collapsed)",
        f"users       {summary['users']:>9}  ({summary.get('carried_over', 0)} carried over from earlier "
        f"windows, {summary.get('already_succeeded', 0)} already succeeded and not re-sent)",
    ]
    lines += [f"{status.value:<11} {summary[status.value]:>9}" for status in AUDITED_STATUSES]
    lines.append(f"chunks      {summary['chunks']:>9}  ({summary['chunks_failed']} did not finish)")
    return "\n".join(lines)


RUN_COUNT_NAMES = (
    "window_start",
    "window_end",
    "users",
    *(status.value for status in AUDITED_STATUSES),
    "carried_over",
    "already_succeeded",
)
"""What a run shows of itself (``audit``'s return value and its asset event's extra), in this order."""


def run_counts(summary: dict[str, Any]) -> dict[str, Any]:
    """Return the run's window and per-status counts from ``audit_run``'s summary: nothing else.

    ``succeeded`` includes the users ``already_succeeded`` for the window (not re-sent).
    """
    return {name: summary.get(name, 0) for name in RUN_COUNT_NAMES}
