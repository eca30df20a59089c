"""One request budget shared by every chunk task of every run, through leases in the state store.

Each running chunk task holds a lease (a row with a heartbeat) and spends
``budget / active leases`` requests/s, re-read four times a second. So the tasks together fill the whole
budget whatever their number (one chunk alone gets all of it; a task that finishes early hands its
share to the others) and never exceed it, across mapped tasks, concurrent runs and backfills. A
task joins at zero and starts sending only once every other live holder has renewed its lease
after the join (a renewal re-counts the holders in the same transaction, so it has seen the
newcomer and slowed down): no fixed wait that a busy machine could outrun, and no longer than
needed. A lease whose holder died goes stale after ``stale_after`` seconds. Each task also takes
its rank among the live holders as the phase of its pace (``AdaptiveRateLimiter.set_phase``): at
equal shares their requests interleave on one grid of the wall clock, ``1 / budget`` apart, so no
clock second holds more than the budget.

Airflow offers no cross-process rate limiter: pools cap how many tasks run, not how fast they
send, so the share is computed here. The pool still caps concurrency.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, bindparam, text

if TYPE_CHECKING:
    from blueshift.pacing import AdaptiveRateLimiter
    from blueshift.state import StateStore

FORGET_DEAD_LEASES_AFTER_SECONDS = 600.0
"""A lease silent this long belongs to a killed task: the next task that leaves deletes it."""


def lease_holder(context: Any) -> str:
    """Return a unique id of this task try (from its Airflow context), for its lease."""
    ti = context.get("ti")
    if ti is None:
        return f"{context['run_id']}/{uuid.uuid4().hex}"
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}/{ti.try_number}"


class SharedBudget:
    """
    A chunk task's share of the global budget.

    :param store: the state store, where the lease table lives (every task already shares it).
    :param holder: this task's unique id (run, task, map index, try).
    :param budget: the global budget in requests/s.
    :param refresh_every: seconds between heartbeats and share updates. Every hand-over of a share
        (a task joining or leaving) leaves up to this long of budget unspent, and a backfill of
        small chunks hands over often: a quarter second keeps that loss near 1%, for one indexed
        upsert and one count per task per refresh.
    :param stale_after: seconds after which a silent holder no longer counts.
    :param join_timeout: longest wait at join for the others to renew (a holder killed less than
        ``stale_after`` ago never does); then the task starts at its share anyway.
    """

    def __init__(
        self,
        store: StateStore,
        holder: str,
        budget: float,
        *,
        refresh_every: float = 0.25,
        stale_after: float = 5.0,
        join_timeout: float = 3.0,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc).replace(tzinfo=None),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.holder = holder
        self.budget = budget
        self.refresh_every = refresh_every
        self.stale_after = stale_after
        self.join_timeout = join_timeout
        self._clock = clock
        self._sleep = sleep
        self.holders = 1
        self.rank = 0
        self._last_refresh = 0.0

    @property
    def share(self) -> float:
        """Requests/s this task may spend now."""
        return self.budget / max(self.holders, 1)

    def join(self, limiter: AdaptiveRateLimiter) -> None:
        """Take a lease, wait until the others have slowed down for it, then set this task's pace."""
        self.store.ensure_lease_table()
        self._heartbeat()
        joined = self._clock()  # read after the lease is committed: a renewal stamped later has seen it
        deadline = time.monotonic() + self.join_timeout
        while self._holders_unaware_of(joined) and time.monotonic() < deadline:
            self._sleep(self.refresh_every / 5)
        self.refresh(limiter, force=True)

    def refresh(self, limiter: AdaptiveRateLimiter, *, force: bool = False) -> None:
        """Renew the lease and re-read the number of holders, at most every ``refresh_every``."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.refresh_every:
            return
        self._last_refresh = now
        self.holders, self.rank = self._heartbeat()
        limiter.set_max_rate(self.share)
        limiter.set_phase(self.rank / self.holders)

    def leave(self) -> None:
        """Give the share back, and clear the leases of tasks that died long ago (they hold nothing)."""
        statement = text(
            f"DELETE FROM {self.store.lease_table} WHERE holder = :holder OR heartbeat_at < :long_ago"
        ).bindparams(bindparam("long_ago", type_=DateTime()))
        long_ago = self._clock() - timedelta(seconds=FORGET_DEAD_LEASES_AFTER_SECONDS)
        with self.store.engine.begin() as conn:
            conn.execute(statement, {"holder": self.holder, "long_ago": long_ago})

    def _holders_unaware_of(self, joined: datetime) -> int:
        """Count the live holders whose last renewal is older than ``joined`` (they still spend more)."""
        statement = text(
            f"SELECT COUNT(*) FROM {self.store.lease_table} "
            "WHERE holder <> :holder AND heartbeat_at >= :since AND heartbeat_at < :joined"
        ).bindparams(bindparam("since", type_=DateTime()), bindparam("joined", type_=DateTime()))
        since = joined - timedelta(seconds=self.stale_after)
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    statement, {"holder": self.holder, "since": since, "joined": joined}
                ).scalar_one()
            )

    def _heartbeat(self) -> tuple[int, int]:
        """Renew this task's lease; return the number of live holders and this one's rank among them."""
        renew = self.store.renew_lease_sql()
        live = text(
            f"SELECT holder FROM {self.store.lease_table} WHERE heartbeat_at >= :since ORDER BY holder"
        ).bindparams(bindparam("since", type_=DateTime()))
        now = self._clock()
        with self.store.engine.begin() as conn:
            conn.execute(renew, {"holder": self.holder, "now": now})
            holders = list(conn.execute(live, {"since": now - timedelta(seconds=self.stale_after)}).scalars())
        rank = holders.index(self.holder) if self.holder in holders else 0
        return max(1, len(holders)), rank
