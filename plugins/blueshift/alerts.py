"""Failure alerts: the run, its window and per-status counts, through any Airflow notifier.

The channel is configuration, not code: ``BLUESHIFT_ALERT_NOTIFIER`` names a notifier class (any
``airflow.sdk.BaseNotifier``, e.g. ``airflow.providers.slack.notifications.slack.SlackNotifier`` or
``airflow.providers.smtp.notifications.smtp.SmtpNotifier``) and ``BLUESHIFT_ALERT_NOTIFIER_KWARGS``
its keyword arguments as JSON, where ``{subject}`` and ``{message}`` in any string are replaced by
the alert's. Without a notifier the alert is logged at ERROR level, which log-based alerting sees.
Alerts hold counts, ids and the error class only: never an email or a key.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

from blueshift.outcomes import AUDITED_STATUSES, redact
from blueshift.settings import Settings

log = logging.getLogger(__name__)


def build_alert(context: Any) -> tuple[str, str]:
    """Return ``(subject, message)`` for a failed run, from the task context of ``audit``."""
    dag_run = context.get("dag_run")
    run_id = getattr(dag_run, "run_id", None) or context.get("run_id", "?")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", "?")
    ti = context.get("ti")
    summary: dict[str, Any] | None = None
    if ti is not None:
        try:
            summary = ti.xcom_pull(task_ids="audit", key="summary")
        except Exception:  # an alert must not fail because a count is missing
            summary = None
    window = f"{context.get('data_interval_start')} .. {context.get('data_interval_end')}"
    lines = [f"DAG {dag_id}, run {run_id}", f"window {window}"]
    if summary:
        counts = ", ".join(f"{status.value} {summary.get(status.value, 0)}" for status in AUDITED_STATUSES)
        lines.append(f"users {summary.get('users', 0)}: {counts}")
        failed_chunks, chunks = summary.get("chunks_failed", 0), summary.get("chunks", 0)
        lines.append(f"chunk tasks that did not finish: {failed_chunks} of {chunks}")
    else:
        lines.append("per-status counts unavailable: the run failed before the audit could count")
    exception = context.get("exception")
    if exception is not None:
        lines.append(f"cause: {type(exception).__name__}: {redact(str(exception))}")
    subject = f"[Airflow] {dag_id} failed for window {window}"
    return subject, "\n".join(lines)


def _fill(value: Any, subject: str, message: str) -> Any:
    if isinstance(value, str):
        return value.replace("{subject}", subject).replace("{message}", message)
    if isinstance(value, dict):
        return {key: _fill(item, subject, message) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, subject, message) for item in value]
    return value


def notify_failure(context: Any) -> None:
    """``on_failure_callback`` of ``audit``: log the alert and send it through the configured notifier."""
    subject, message = build_alert(context)
    _send(context, subject, message)


def notify_run_failure(context: Any) -> None:
    """DAG ``on_failure_callback``: alert for runs that failed without a task failing (timed out).

    A failed task always fails ``audit`` too, whose own callback has already alerted with counts.
    """
    reason = context.get("reason")
    if reason == "task_failure":
        return
    settings = Settings.from_env()
    subject, message = build_alert(context)
    message += (
        f"\nreason: {reason}. The run did not finish within BLUESHIFT_RUN_TIMEOUT_MINUTES="
        f"{settings.run_timeout_minutes}."
    )
    if settings.pool:
        message += (
            f" If its start_tracking tasks stayed 'scheduled', the pool {settings.pool!r} (BLUESHIFT_POOL) "
            f"is missing or full: create it with `airflow pools set {settings.pool} "
            f'{settings.max_active_chunks} "Blueshift API"`, or unset BLUESHIFT_POOL, and clear the run.'
        )
    _send(context, subject, message)


def _send(context: Any, subject: str, message: str) -> None:
    log.error("ALERT %s\n%s", subject, message)
    settings = Settings.from_env()
    if not settings.alert_notifier:
        return
    try:
        module_name, _, class_name = settings.alert_notifier.rpartition(".")
        notifier_class = getattr(import_module(module_name), class_name)
        notifier = notifier_class(**_fill(settings.notifier_kwargs, subject, message))
        notifier(context)
    except Exception:
        # The run already failed; a broken alert channel must say so loudly but not mask the cause.
        log.exception("Could not send the alert through BLUESHIFT_ALERT_NOTIFIER=%s", settings.alert_notifier)
