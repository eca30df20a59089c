"""Exceptions of the Blueshift pipeline: one ``Blueshift<Thing>Error`` per thing that can go wrong."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class BlueshiftConfigError(AirflowFailException):
    """Raise when a setting, connection or param is wrong: no retry can fix it, the message names the fix."""


class BlueshiftAuthError(AirflowFailException):
    """Raise when Blueshift refuses the API key (401/403): every further request would fail too."""


class BlueshiftChunkIncompleteError(AirflowException):
    """Raise when users of a chunk still failed after the in-task attempts; Airflow retries the chunk."""


class BlueshiftRunIncompleteError(AirflowFailException):
    """Raise from the audit when users ended ``failed`` or a chunk task did not finish: the run must fail."""


class BlueshiftAuditMismatchError(AirflowFailException):
    """Raise when the audit cannot account for every extracted user."""
