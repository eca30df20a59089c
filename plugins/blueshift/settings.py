"""Deployment settings, read from ``BLUESHIFT_*`` environment variables.

Environment variables are cheap to read at DAG parse time (unlike Airflow Variables, which cost a
metadata/API round trip on every parse) and are set the same way in ``airflow standalone``, the
compose file and a Kubernetes pod. Per-run choices (dry run, chunk size) are DAG params instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from blueshift.exceptions import BlueshiftConfigError

DEFAULT_EXTRACT_SQL = Path(__file__).resolve().parent / "sql" / "extract_reconsented_users.sql"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")


def validate_identifier(value: str, setting: str) -> str:
    """Return ``value`` if it is a plain SQL identifier (optionally ``schema.table``), else raise."""
    if not _IDENTIFIER.match(value):
        raise BlueshiftConfigError(
            f"{setting}={value!r} is not a plain SQL table name: use letters, digits and underscores, "
            "optionally as schema.table"
        )
    return value


def as_bool(value: object, name: str) -> bool:
    """Return a param value as a bool; text such as ``"true"``/``"false"`` is accepted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.strip().lower() in {"true", "1", "yes"}
    raise BlueshiftConfigError(f"Param {name!r} must be true or false, got {value!r}")


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _json_object(value: str) -> str:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err.msg}") from err
    if not isinstance(parsed, dict):
        raise ValueError("must be a JSON object")
    return value


def _host_list(value: str) -> tuple[str, ...]:
    return tuple(host.strip() for host in value.split(",") if host.strip())


PARSERS: dict[str, Callable[[str], Any]] = {
    "rate_limit": _positive_float,
    "max_active_chunks": _positive_int,
    "max_in_flight": _positive_int,
    "max_attempts": _positive_int,
    "backoff_base_seconds": _positive_float,
    "backoff_cap_seconds": _positive_float,
    "connect_timeout": _positive_float,
    "read_timeout": _positive_float,
    "progress_interval": _positive_float,
    "task_retries": _non_negative_int,
    "retry_delay_seconds": _non_negative_int,
    "max_chunks": _positive_int,
    "carry_over_days": _non_negative_int,
    "run_timeout_minutes": _positive_int,
    "alert_notifier_kwargs": _json_object,
    "allow_http_hosts": _host_list,
}
"""How a variable's text becomes a field's value; fields not listed take the stripped text."""

ENV_NAMES: dict[str, tuple[str, ...]] = {
    "blueshift_conn_id": ("BLUESHIFT_CONN_ID",),
    "extract_sql_path": ("BLUESHIFT_EXTRACT_SQL_PATH", "BLUESHIFT_EXTRACT_SQL"),
    "max_active_chunks": ("BLUESHIFT_MAX_ACTIVE_CHUNKS", "BLUESHIFT_POOL_SLOTS"),
}
"""The variables of the fields not read as just ``BLUESHIFT_<FIELD>``: the primary name first, then
older names, each read only when the ones before it are unset (for existing deployments)."""

OPERATOR_KWARGS = (
    "blueshift_conn_id",
    "state_conn_id",
    "warehouse_conn_id",
    "rate_limit",
    "max_in_flight",
    "max_attempts",
    "backoff_base_seconds",
    "backoff_cap_seconds",
    "connect_timeout",
    "read_timeout",
    "staging_table",
    "progress_interval",
    "allow_http_hosts",
)
"""The settings that ``BlueshiftStartTrackingOperator`` takes as keyword arguments of the same name."""


def env_names(field_name: str) -> tuple[str, ...]:
    """Return the variables a field is read from, the primary name first."""
    return ENV_NAMES.get(field_name, (f"BLUESHIFT_{field_name.upper()}",))


def _read(environ: Mapping[str, str], field_name: str) -> tuple[str, str] | None:
    """Return ``(variable, text)`` of the first of the field's variables that is set and not blank."""
    for name in env_names(field_name):
        raw = environ.get(name)
        if raw is not None and raw.strip():
            return name, raw
    return None


@dataclass(frozen=True)
class Settings:
    """All deployment settings of the pipeline, with their defaults: the one place they are set."""

    blueshift_conn_id: str = "blueshift_default"
    warehouse_conn_id: str = "warehouse_default"
    state_conn_id: str = "blueshift_state"
    extract_sql_path: str = str(DEFAULT_EXTRACT_SQL)
    audit_table: str = "blueshift_start_tracking_audit"
    staging_table: str = "blueshift_start_tracking_staging"
    rate_limit: float = 50.0
    pool: str = ""
    max_active_chunks: int = 4
    max_in_flight: int = 16
    max_attempts: int = 5
    backoff_base_seconds: float = 0.5
    backoff_cap_seconds: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    progress_interval: float = 5.0
    task_retries: int = 2
    retry_delay_seconds: int = 60
    max_chunks: int = 256
    carry_over_days: int = 7
    run_timeout_minutes: int = 720
    alert_notifier: str = ""
    alert_notifier_kwargs: str = "{}"
    allow_http_hosts: tuple[str, ...] = ()
    """Hosts the API key may reach over plain http besides loopback (test stand-ins)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field's variable (see ``env_names``); a bad value raises an error naming it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            found = _read(environ, field.name)
            if found is None:
                continue
            name, raw = found
            parse = PARSERS.get(field.name, str.strip)
            try:
                values[field.name] = parse(raw)
            except ValueError as err:
                raise BlueshiftConfigError(f"{name}={raw!r} is invalid ({err}); fix or unset it") from err
        settings = cls(**values)
        validate_identifier(settings.audit_table, "BLUESHIFT_AUDIT_TABLE")
        validate_identifier(settings.staging_table, "BLUESHIFT_STAGING_TABLE")
        if settings.max_chunks > 1024:
            raise BlueshiftConfigError("BLUESHIFT_MAX_CHUNKS must be at most 1024 ([core] max_map_length)")
        return settings

    @property
    def notifier_kwargs(self) -> dict[str, Any]:
        """Return the alert notifier's keyword arguments."""
        parsed: dict[str, Any] = json.loads(self.alert_notifier_kwargs)
        return parsed

    def operator_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of ``BlueshiftStartTrackingOperator`` these settings hold."""
        return {name: getattr(self, name) for name in OPERATOR_KWARGS}


DEFAULTS = Settings()
"""The defaults, for the signatures of the hook and the operator (never read from the environment)."""
