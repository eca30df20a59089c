"""Normalize and validate extracted users with pandas, before anything is sent.

Rules (README "Validation"): both identifiers are trimmed, emails lower-cased, empty strings are
missing. A user needs an email or a customer_id. An email has exactly one ``@``, a non-empty local
part, a dot inside the domain, no whitespace or control characters and at most 64 characters; a
customer_id has no control characters and at most 128 characters. A row whose present identifier
breaks a rule is ``invalid`` and never sent.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

EMAIL_MAX_LENGTH = 64
CUSTOMER_ID_MAX_LENGTH = 128
BUCKETS = 4096
"""Users are spread over this many hash buckets; chunks are contiguous bucket ranges."""

_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
_WHITESPACE = r"\s"


def _to_text(value: object) -> str | None:
    """Turn one cell (text, number, bytes, NULL) into trimmed text, or ``None`` when missing."""
    import pandas as pd

    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        if value != value:
            return None
        if value.is_integer():
            value = int(value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).strip()
    return text or None


def user_key(customer_id: str | None, email: str | None) -> str:
    """Return the stable identity of a user: a hash of both normalized identifiers."""
    raw = f"{customer_id or ''}\x1f{email or ''}".encode("utf-8", errors="surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:32]


def bucket_of(key: str) -> int:
    """Return the hash bucket of a user key; chunks are ranges of buckets."""
    return int(key[:8], 16) % BUCKETS


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``customer_id, email, user_key, bucket, error`` per input row; ``error`` is None when valid.

    :param frame: rows with at least the columns ``customer_id`` and ``email``.
    """
    import pandas as pd

    ids = [_to_text(value) for value in frame["customer_id"].tolist()]
    emails = [text.lower() if text else None for text in map(_to_text, frame["email"].tolist())]
    customer_id = pd.Series(ids, index=frame.index, dtype=object)
    email = pd.Series(emails, index=frame.index, dtype=object)
    error = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    for mask, reason in _broken_rules(customer_id, email):
        mask = mask.fillna(False).astype(bool)
        error = error.where(~mask | error.notna(), reason)  # the first broken rule is the reason

    keys = [user_key(c, e) for c, e in zip(ids, emails, strict=True)]
    return pd.DataFrame(
        {
            "customer_id": customer_id,
            "email": email,
            "user_key": keys,
            "bucket": [bucket_of(key) for key in keys],
            "error": error,
        },
        index=frame.index,
    )


def _broken_rules(customer_id: pd.Series, email: pd.Series) -> list[tuple[pd.Series, str]]:
    """Return each validation rule as (rows that break it, reason), in the order they are reported."""
    has_email = email.notna()
    has_id = customer_id.notna()
    email_str = email.fillna("").astype(str)
    id_str = customer_id.fillna("").astype(str)
    parts = email_str.str.split("@", regex=False)
    at_count = email_str.str.count("@")
    local = parts.str[0].fillna("")
    domain = parts.str[-1].fillna("")
    one_at = has_email & (at_count == 1)
    return [
        (~has_email & ~has_id, "no email and no customer_id"),
        (has_email & (at_count != 1), "email must contain exactly one @"),
        (one_at & (local == ""), "email has an empty local part"),
        (one_at & ~domain.str.strip(".").str.contains(".", regex=False), "email domain has no dot"),
        (has_email & email_str.str.contains(_WHITESPACE, regex=True), "email contains whitespace"),
        (has_email & email_str.str.contains(_CONTROL, regex=True), "email contains control characters"),
        (has_email & (email_str.str.len() > EMAIL_MAX_LENGTH), f"email longer than {EMAIL_MAX_LENGTH}"),
        (has_id & id_str.str.contains(_CONTROL, regex=True), "customer_id contains control characters"),
        (
            has_id & (id_str.str.len() > CUSTOMER_ID_MAX_LENGTH),
            f"customer_id longer than {CUSTOMER_ID_MAX_LENGTH}",
        ),
    ]


def storable(value: str | None) -> str | None:
    """Return ``value`` safe for any warehouse text column (PostgreSQL refuses NUL characters)."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")
