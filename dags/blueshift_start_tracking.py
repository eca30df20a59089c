"""
### Blueshift: start tracking re-consented customers

Every day this DAG reads the customers who consented again during the day's window
`[data_interval_start, data_interval_end)` from the warehouse (connection `warehouse_default`),
validates and de-duplicates them, and calls Blueshift's `POST /api/v1/customers/unforget` once per
customer (connection `blueshift_default`), in chunks mapped over `start_tracking`.

`audit` writes one row per window and customer to the warehouse table
`blueshift_start_tracking_audit` with its outcome: `succeeded`, `rejected`, `invalid`, `failed` or
`dry_run`. The run fails when any customer ended `failed` or a chunk task did not finish.

Re-runs and backfills of a window send only customers not yet `succeeded` for it (param `force`
re-sends them). Scheduled runs also retry customers left `failed` by earlier windows of the last
`BLUESHIFT_CARRY_OVER_DAYS` days. Failures alert through `BLUESHIFT_ALERT_NOTIFIER`.

A successful `audit` updates the Asset named after the audit table, its event carrying the run's
per-status counts (the run's *Asset Events* tab; downstream DAGs can be scheduled on it); the counts
are also `audit`'s XCom. Metrics `blueshift.*` go through Airflow's StatsD or OpenTelemetry channel.

Params: `dry_run` (validate, chunk and audit without sending), `force`, `chunk_size` (customers per
mapped task). Settings: `BLUESHIFT_*` environment variables; see the project README.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, TriggerRule, dag, get_current_context, task

from blueshift.alerts import notify_failure, notify_run_failure
from blueshift.exceptions import BlueshiftConfigError, BlueshiftRunIncompleteError
from blueshift.lineage import audit_asset
from blueshift.operators import BlueshiftStartTrackingOperator
from blueshift.settings import Settings

SETTINGS = Settings.from_env()
AUDIT_ASSET = audit_asset(SETTINGS)


@dag(
    dag_id="blueshift_start_tracking",
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=3,
    # A run that cannot finish (e.g. its chunk tasks wait for a pool that does not exist) fails
    # after this long and alerts, instead of waiting silently.
    dagrun_timeout=timedelta(minutes=SETTINGS.run_timeout_minutes),
    on_failure_callback=notify_run_failure,
    render_template_as_native_obj=True,
    default_args={
        "owner": "data-engineering",
        "retries": SETTINGS.task_retries,
        "retry_delay": timedelta(seconds=SETTINGS.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    },
    params={
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Validate, chunk and audit the window as dry_run without calling Blueshift.",
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force re-send",
            description="Also re-send customers whose audit row for this window already says succeeded. "
            "Off: a re-run or backfill of a window sends only what is not yet succeeded.",
        ),
        "chunk_size": Param(
            500,
            type="integer",
            minimum=10,
            maximum=10_000,
            title="Chunk size",
            description="Customers per mapped start_tracking task (10 to 10,000). Large windows use "
            "bigger chunks so that no run maps more than BLUESHIFT_MAX_CHUNKS tasks.",
        ),
    },
    tags=["blueshift", "reverse-etl", "consent"],
    doc_md=__doc__,
)
def blueshift_start_tracking() -> None:
    @task(
        show_return_value_in_logs=False,
        doc_md="Streams the window's re-consented customers from the warehouse, validates and "
        "de-duplicates them with pandas, stages them, and returns chunk descriptors (no customer data).",
    )
    def extract_and_validate() -> list[dict[str, Any]]:
        """Read the window's users, validate and de-duplicate them, stage them, plan the chunks.

        Returns the chunk descriptors (mapped over by start_tracking); the run's counts go to the
        XCom key ``summary``. Neither holds customer data.
        """
        from blueshift.hooks import BlueshiftHook
        from blueshift.pipeline import extract_and_stage

        context = get_current_context()
        if not context["params"]["dry_run"]:
            # Pre-flight: a missing or wrong Blueshift connection fails here, before any extract or send.
            hook = BlueshiftHook(SETTINGS.blueshift_conn_id, allow_http_hosts=SETTINGS.allow_http_hosts)
            usable, message = hook.test_connection()
            if not usable:
                raise BlueshiftConfigError(message)
        window_start, window_end = context["data_interval_start"], context["data_interval_end"]
        if window_start is None or window_end is None:
            raise ValueError("This DAG needs a data interval: trigger it with a logical date")
        params = context["params"]
        carry_over_since = None
        if context["dag_run"].run_type == "scheduled" and SETTINGS.carry_over_days and not params["dry_run"]:
            carry_over_since = window_start - timedelta(days=SETTINGS.carry_over_days)
        summary = extract_and_stage(
            settings=SETTINGS,
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
            window_start=window_start,
            window_end=window_end,
            chunk_size=int(params["chunk_size"]),
            force=bool(params["force"]),
            carry_over_since=carry_over_since,
        )
        chunks: list[dict[str, Any]] = summary.pop("chunks")
        summary["chunks"] = len(chunks)
        context["ti"].xcom_push(key="summary", value=summary)
        return chunks

    chunks = extract_and_validate()

    # Chunk tasks at once across all runs and backfills of this DAG: a cap that needs no setup.
    # A pool (BLUESHIFT_POOL) is optional, for accounts shared with other DAGs.
    pool = {"pool": SETTINGS.pool} if SETTINGS.pool else {}
    sent = BlueshiftStartTrackingOperator.partial(
        task_id="start_tracking",
        max_active_tis_per_dag=SETTINGS.max_active_chunks,
        **pool,
        map_index_template="{{ task.chunk['label'] }}",
        dry_run_enabled="{{ params.dry_run }}",
        **SETTINGS.operator_kwargs(),
        doc_md="Sends one chunk of customers to Blueshift; its users come from the staging table.",
    ).expand(chunk=chunks)

    @task(
        trigger_rule=TriggerRule.ALL_DONE,
        show_return_value_in_logs=False,
        on_failure_callback=notify_failure,
        outlets=[AUDIT_ASSET],
        doc_md="Upserts every customer's outcome into the audit table and fails the run if any "
        "customer ended failed or a chunk task did not finish; alerts on failure. On success it "
        "updates the audit table's asset, with the run's counts as the event's extra.",
    )
    def audit(results: Any) -> dict[str, Any]:
        """Write every user's outcome to the audit table; fail the run if any user is left failed.

        Returns the run's window and per-status counts (its XCom), which also go to the audit
        table's asset event, and the metrics ``blueshift.run.*``.
        """
        from blueshift.metrics import publish_run
        from blueshift.pipeline import audit_run, finished_chunks, raise_if_incomplete, run_counts

        context = get_current_context()
        prepared = context["ti"].xcom_pull(task_ids="extract_and_validate", key="summary")
        if prepared is None:
            raise BlueshiftRunIncompleteError(
                "extract_and_validate did not finish, so nothing of this window was staged or sent: "
                "see its log for the cause, fix it, then clear the run"
            )
        summary = audit_run(
            settings=SETTINGS,
            dag_id=context["dag"].dag_id,
            run_id=context["run_id"],
            prepared=prepared,
            finished_chunks=finished_chunks(results, prepared.get("plan")),
        )
        context["ti"].xcom_push(key="summary", value=summary)
        publish_run(summary)
        raise_if_incomplete(summary, SETTINGS)
        counts = run_counts(summary)
        # Shown in the run's "Asset Events" tab, and handed to the DAGs scheduled on the audit table.
        context["outlet_events"][AUDIT_ASSET].extra = counts
        return counts

    # audit also reads extract_and_validate's summary (the XCom pull above): hence this edge.
    chunks >> audit(sent.output)


blueshift_start_tracking()
