"""What each Blueshift answer means for one user (see the API contract)."""

from __future__ import annotations

import re
from enum import Enum


class StrEnum(str, Enum):
    """``enum.StrEnum`` (Python 3.11+) for Python 3.10 too: each member is a ``str`` equal to its value, and
    ``str()``, ``format()`` and f-strings give the plain value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, format_spec: str) -> str:
        return format(str(self.value), format_spec)


class Status(StrEnum):
    """A user's status in the staging and audit tables."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    INVALID = "invalid"
    FAILED = "failed"
    DRY_RUN = "dry_run"
    SKIPPED = "skipped"
    """Staging only: the user already succeeded for this window; a re-run does not send it again."""


AUDITED_STATUSES = (Status.SUCCEEDED, Status.REJECTED, Status.INVALID, Status.FAILED, Status.DRY_RUN)
"""The statuses a user can end with in the audit table, in the order the summaries list them."""


class Verdict(StrEnum):
    """What the client does with an answer."""

    OK = "ok"
    REJECT = "reject"
    AUTH = "auth"
    RETRY = "retry"


AUTH = frozenset({401, 403})
TRANSIENT = frozenset({404, 409, 429, 500, 502, 503, 504})


def classify(status_code: int) -> Verdict:
    """Map an HTTP status to a verdict; unlisted 4xx are permanent, unlisted 5xx transient."""
    if 200 <= status_code < 300:
        return Verdict.OK
    if status_code in AUTH:
        return Verdict.AUTH
    if status_code in TRANSIENT or status_code >= 500:
        return Verdict.RETRY
    return Verdict.REJECT


_EMAIL = re.compile(r"[^\s@\"'<>(),;:]+@[^\s@\"'<>(),;:]+")


def redact_email(email: str) -> str:
    """Return ``j***@example.com`` for ``jane@example.com``: enough to recognise, not to leak."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def redact(text: str, limit: int = 300) -> str:
    """Return ``text`` with every email-like token redacted, cut to ``limit`` characters."""
    cleaned = _EMAIL.sub(lambda match: redact_email(match.group(0)), text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
