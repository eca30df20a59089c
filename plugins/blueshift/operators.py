"""The task that starts tracking one chunk of users in Blueshift."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from blueshift.budget import SharedBudget, lease_holder
from blueshift.connections import state_conn_id_for
from blueshift.exceptions import BlueshiftAuthError, BlueshiftChunkIncompleteError
from blueshift.hooks import BlueshiftHook
from blueshift.lineage import chunk_lineage
from blueshift.metrics import ChunkMetrics
from blueshift.outcomes import Status
from blueshift.pacing import AdaptiveRateLimiter
from blueshift.sender import ChunkProgress, ChunkSender
from blueshift.settings import DEFAULTS, Settings, as_bool
from blueshift.state import StateStore

if TYPE_CHECKING:
    from airflow.sdk import Context


class BlueshiftStartTrackingOperator(BaseOperator):
    """
    Start tracking every user of one chunk again: ``POST /api/v1/customers/unforget`` per user.

    The chunk's users are read from the state store's staging table (never from XCom), sent by a
    ``blueshift.sender.ChunkSender`` (threads, pacing, retries: see there) at this task's share of
    the global budget, and each outcome is written back to the staging table as it happens. 401/403
    stop the chunk at once without Airflow retry; a chunk with ``failed`` users fails its task so
    Airflow's retries re-send only those users. Every default comes from ``blueshift.settings``.

    :param chunk: the chunk descriptor made by the extract task (``chunk_id``, ``bucket_lo``,
        ``bucket_hi``, ``users``, ``label``).
    :param blueshift_conn_id: HTTP connection with the region host and the API key.
    :param state_conn_id: connection of the state store holding the staging table; when it is not
        defined, the warehouse holds it (if it can: see ``blueshift.connections.state_conn_id_for``).
    :param warehouse_conn_id: the warehouse connection.
    :param dry_run_enabled: mark the chunk ``dry_run`` without sending anything (templated; the
        DAG passes its ``dry_run`` param).
    :param rate_limit: the global budget in requests/s, shared with every other chunk task running
        (any run) through leases in the state store; this task spends ``rate_limit / tasks running``.
    :param max_in_flight: requests in flight at once.
    :param max_attempts: attempts per user inside the task, the first included.
    :param backoff_base_seconds: first backoff ceiling; it doubles per attempt.
    :param backoff_cap_seconds: largest backoff ceiling.
    :param connect_timeout: seconds to connect.
    :param read_timeout: seconds to wait for an answer.
    :param staging_table: the staging table holding the run's users.
    :param progress_interval: seconds between progress lines in the log.
    :param allow_http_hosts: hosts the key may reach over plain http besides loopback (test stand-ins).
    """

    template_fields: Sequence[str] = ("dry_run_enabled",)
    ui_color = "#2b6cb0"
    ui_fgcolor = "#ffffff"

    def __init__(
        self,
        *,
        chunk: dict[str, Any],
        blueshift_conn_id: str = DEFAULTS.blueshift_conn_id,
        state_conn_id: str = DEFAULTS.state_conn_id,
        warehouse_conn_id: str = DEFAULTS.warehouse_conn_id,
        dry_run_enabled: bool | str = False,
        rate_limit: float = DEFAULTS.rate_limit,
        max_in_flight: int = DEFAULTS.max_in_flight,
        max_attempts: int = DEFAULTS.max_attempts,
        backoff_base_seconds: float = DEFAULTS.backoff_base_seconds,
        backoff_cap_seconds: float = DEFAULTS.backoff_cap_seconds,
        connect_timeout: float = DEFAULTS.connect_timeout,
        read_timeout: float = DEFAULTS.read_timeout,
        staging_table: str = DEFAULTS.staging_table,
        progress_interval: float = DEFAULTS.progress_interval,
        allow_http_hosts: Sequence[str] = DEFAULTS.allow_http_hosts,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.blueshift_conn_id = blueshift_conn_id
        self.state_conn_id = state_conn_id
        self.warehouse_conn_id = warehouse_conn_id
        self.dry_run_enabled = dry_run_enabled
        self.rate_limit = rate_limit
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.staging_table = staging_table
        self.progress_interval = progress_interval
        self.allow_http_hosts = tuple(allow_http_hosts)

    def execute(self, context: Context) -> dict[str, Any]:
        """Load the chunk's users, join the budget, send them, record every outcome, then decide."""
        dag_id, run_id, chunk_id = context["dag"].dag_id, context["run_id"], str(self.chunk["chunk_id"])
        dry_run = as_bool(self.dry_run_enabled, "dry_run")
        conn_id = state_conn_id_for(self.state_conn_id, self.warehouse_conn_id)
        store = StateStore(conn_id, staging_table=self.staging_table)
        buckets = int(self.chunk["bucket_lo"]), int(self.chunk["bucket_hi"])
        if dry_run:
            marked = store.mark_chunk(dag_id, run_id, *buckets, Status.DRY_RUN.value)
            self.log.info("Chunk %s: dry run, %d users marked dry_run, nothing sent", chunk_id, marked)
            progress = ChunkProgress(marked, done=marked, by_status={Status.DRY_RUN.value: marked})
            ChunkMetrics().publish(progress, pace=None, circuit_opened=0)
            return self._summary(progress)
        users = store.load_chunk(dag_id, run_id, *buckets)
        self.log.info("Chunk %s: %d users to send", chunk_id, len(users))
        if not users:
            return self._summary(ChunkProgress(total=0))
        with self._blueshift() as hook, self._budget_share(context, store) as (limiter, budget):
            sender = ChunkSender(
                hook,
                limiter,
                record=partial(store.record_outcomes, dag_id, run_id),
                renew=partial(budget.refresh, limiter),
                renew_every=budget.refresh_every,
                max_in_flight=self.max_in_flight,
                max_attempts=self.max_attempts,
                backoff_base_seconds=self.backoff_base_seconds,
                backoff_cap_seconds=self.backoff_cap_seconds,
                progress_interval=self.progress_interval,
                log=self.log,
                metrics=ChunkMetrics(),
            )
            progress = sender.send(users)
        self.log.info(
            "Chunk %s finished: %s in %d requests (%d throttled)",
            chunk_id,
            progress.format_counts(),
            progress.requests,
            progress.throttled,
        )
        self._raise_if_incomplete(progress, chunk_id)
        return self._summary(progress)

    @contextmanager
    def _blueshift(self) -> Iterator[BlueshiftHook]:
        """Yield the hook with its connection and key resolved before any request; close it after."""
        hook = BlueshiftHook(
            self.blueshift_conn_id,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            pool_maxsize=self.max_in_flight,
            allow_http_hosts=self.allow_http_hosts,
        )
        try:
            hook.get_conn()
            yield hook
        finally:
            hook.close()

    @contextmanager
    def _budget_share(
        self, context: Context, store: StateStore
    ) -> Iterator[tuple[AdaptiveRateLimiter, SharedBudget]]:
        """Join the global budget and yield a limiter paced at this task's share; leave it after."""
        limiter = AdaptiveRateLimiter(self.rate_limit)
        budget = SharedBudget(store, lease_holder(context), self.rate_limit)
        budget.join(limiter)
        try:
            yield limiter, budget
        finally:
            budget.leave()

    def _raise_if_incomplete(self, progress: ChunkProgress, chunk_id: str) -> None:
        failed = progress.by_status.get(Status.FAILED.value, 0)
        if progress.refused is not None:
            raise BlueshiftAuthError(
                f"Blueshift refused the API key (HTTP {progress.refused}) of connection "
                f"{self.blueshift_conn_id!r}: check that it holds a valid User API key for this account "
                f"and region. {failed} users of chunk {chunk_id} were not sent and are audited failed."
            )
        if failed:
            raise BlueshiftChunkIncompleteError(
                f"{failed} of {progress.total} users of chunk {chunk_id} still failed after "
                f"{self.max_attempts} attempts each; an Airflow retry re-sends only those users"
            )

    def _summary(self, progress: ChunkProgress) -> dict[str, Any]:
        """Return the task's result (its XCom): the chunk's counts, no customer data."""
        return {"chunk_id": str(self.chunk["chunk_id"]), "plan": self.chunk.get("plan"), **progress.counts()}

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Report the warehouse source as input and the audit table as output (OpenLineage provider)."""
        return chunk_lineage(Settings.from_env(), self.warehouse_conn_id)
