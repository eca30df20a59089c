"""BlueshiftStartTrackingOperator against the stand-in: each documented status gives its outcome."""

from __future__ import annotations

import inspect
import json
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from blueshift.exceptions import BlueshiftAuthError, BlueshiftChunkIncompleteError, BlueshiftConfigError
from blueshift.operators import BlueshiftStartTrackingOperator, as_bool
from blueshift.settings import Settings
from blueshift.state import StateStore
from blueshift.validation import normalize
from tests.conftest import API_KEY

DAG_ID, RUN_ID = "blueshift_start_tracking", "manual__test"
WINDOW = (datetime(2026, 11, 24, tzinfo=timezone.utc), datetime(2026, 11, 25, tzinfo=timezone.utc))
MAX_ATTEMPTS = 3


@pytest.fixture
def blueshift(monkeypatch, standin):
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
        json.dumps({"conn_type": "http", "host": standin.url, "login": API_KEY}),
    )
    return standin


def stage(store: StateStore, users: list[tuple[str | None, str | None]]) -> None:
    frame = normalize(pd.DataFrame(users, columns=["customer_id", "email"]))
    store.stage(frame, dag_id=DAG_ID, run_id=RUN_ID, window_start=WINDOW[0], window_end=WINDOW[1])


def staged(store: StateStore) -> dict[str, dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM blueshift_start_tracking_staging")).mappings().all()
    return {row["customer_id"] or row["email"]: dict(row) for row in rows}


def run_operator(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "task_id": "start_tracking",
        "chunk": {"chunk_id": "b000-fff", "bucket_lo": 0, "bucket_hi": 4095, "users": 0, "label": "chunk"},
        "rate_limit": 500.0,
        "max_in_flight": 4,
        "max_attempts": MAX_ATTEMPTS,
        "backoff_base_seconds": 0.01,
        "backoff_cap_seconds": 0.02,
        "read_timeout": 0.5,
        "progress_interval": 0.2,
    }
    arguments.update(overrides)
    operator = BlueshiftStartTrackingOperator(**arguments)
    context: Any = {"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": RUN_ID}
    return operator.execute(context)


OUTCOMES = {
    200: ("succeeded", 1),
    400: ("rejected", 1),
    413: ("rejected", 1),
    422: ("rejected", 1),
    404: ("failed", MAX_ATTEMPTS),
    409: ("failed", MAX_ATTEMPTS),
    429: ("failed", MAX_ATTEMPTS),
    500: ("failed", MAX_ATTEMPTS),
    502: ("failed", MAX_ATTEMPTS),
    503: ("failed", MAX_ATTEMPTS),
    504: ("failed", MAX_ATTEMPTS),
}


@pytest.mark.parametrize(("http_status", "expected"), OUTCOMES.items(), ids=[str(code) for code in OUTCOMES])
def test_each_documented_status_gives_its_outcome(store, blueshift, http_status, expected):
    status, attempts = expected
    blueshift.state.config.fixed = {f"C-{http_status}": http_status, "C-OK": 200}
    stage(store, [(f"C-{http_status}", None), ("C-OK", None)])

    if status == "failed":
        with pytest.raises(BlueshiftChunkIncompleteError, match="1 of 2 users"):
            run_operator()
    else:
        summary = run_operator()
        assert summary[status] == (2 if status == "succeeded" else 1)

    rows = staged(store)
    assert rows[f"C-{http_status}"]["status"] == status
    assert rows[f"C-{http_status}"]["attempts"] == attempts
    assert rows[f"C-{http_status}"]["http_status"] == http_status
    assert rows["C-OK"]["status"] == "succeeded"
    assert blueshift.state.requests == attempts + 1  # plus the one request of C-OK


@pytest.mark.parametrize("http_status", [401, 403])
def test_refused_key_stops_at_once_without_retry(store, blueshift, http_status):
    users = [(f"C-{n:03d}", None) for n in range(200)]
    blueshift.state.config.fixed = {customer_id: http_status for customer_id, _ in users}
    stage(store, users)

    with pytest.raises(BlueshiftAuthError, match=f"refused the API key \\(HTTP {http_status}\\)") as raised:
        run_operator(max_in_flight=4)

    assert raised.value.__class__.__mro__[1].__name__ == "AirflowFailException"
    assert blueshift.state.requests <= 8, "no storm of requests after the key was refused"
    rows = staged(store).values()
    assert {row["status"] for row in rows} == {"failed"}
    assert all("refused the API key" in row["error"] for row in rows)
    assert API_KEY not in str(raised.value)


def test_wrong_key_is_refused_by_the_standin(store, blueshift, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
        json.dumps({"conn_type": "http", "host": blueshift.url, "login": "not-the-key"}),
    )
    stage(store, [("C-1", None)])
    with pytest.raises(BlueshiftAuthError, match="HTTP 401"):
        run_operator()


@pytest.mark.parametrize("fault", ["drop", "slow"])
def test_dropped_connections_and_timeouts_are_retried(store, blueshift, fault):
    blueshift.state.config.faults = [fault]
    blueshift.state.config.fault_rate = 0.4
    blueshift.state.config.slow_seconds = 1.0
    blueshift.state.config.seed = 3
    stage(store, [(f"C-{n:02d}", None) for n in range(30)])

    try:
        run_operator(max_attempts=6)
    except BlueshiftChunkIncompleteError:
        pass  # a user may exhaust its attempts by chance; the bound below still holds
    rows = staged(store).values()
    retried = [row for row in rows if row["attempts"] > 1]
    assert retried, "some users met the fault and were retried"
    assert all(1 <= row["attempts"] <= 6 for row in rows)
    assert sum(row["status"] == "succeeded" for row in rows) >= 25


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(store, blueshift, requests_mock, monkeypatch, form):
    """A Retry-After header, if Blueshift ever sends one, delays the next attempt (both RFC 9110 forms)."""
    import time
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    # An HTTP date has whole seconds: two seconds ahead is a wait of more than one.
    retry_after = (
        "1"
        if form == "seconds"
        else format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    )

    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
        json.dumps({"conn_type": "http", "host": "https://api.getblueshift.com", "login": API_KEY}),
    )
    requests_mock.post(
        "https://api.getblueshift.com/api/v1/customers/unforget",
        [
            {"status_code": 429, "headers": {"Retry-After": retry_after}, "json": {}},
            {"json": {"status": "ok"}},
        ],
    )
    stage(store, [("C-1", None)])
    started = time.monotonic()
    summary = run_operator()
    assert summary["succeeded"] == 1
    assert time.monotonic() - started >= 1.0
    assert requests_mock.call_count == 2


def test_dry_run_sends_nothing(store, blueshift):
    stage(store, [(f"C-{n}", None) for n in range(5)])
    summary = run_operator(dry_run_enabled="true")
    assert summary["dry_run"] == 5
    assert blueshift.state.requests == 0
    assert {row["status"] for row in staged(store).values()} == {"dry_run"}


def test_retry_of_a_chunk_resends_only_unfinished_users(store, blueshift):
    blueshift.state.config.fixed = {"C-FLAKY": 503}
    stage(store, [("C-FLAKY", None), ("C-1", None), ("C-2", None)])
    with pytest.raises(BlueshiftChunkIncompleteError):
        run_operator()
    first = blueshift.state.requests
    blueshift.state.config.fixed = {}
    run_operator()  # what Airflow's task retry does
    assert blueshift.state.requests == first + 1
    rows = staged(store)
    assert rows["C-FLAKY"]["status"] == "succeeded"
    assert rows["C-FLAKY"]["attempts"] == MAX_ATTEMPTS + 1


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), ("False", False), ("true", True), ("0", False)]
)
def test_as_bool(value, expected):
    assert as_bool(value, "dry_run") is expected


def test_as_bool_names_the_param():
    with pytest.raises(BlueshiftConfigError, match="'dry_run' must be true or false"):
        as_bool("maybe", "dry_run")


def test_settings_hold_exactly_the_operators_keyword_arguments():
    """The DAG passes ``**SETTINGS.operator_kwargs()``: every argument but the chunk and the param."""
    parameters = inspect.signature(BlueshiftStartTrackingOperator.__init__).parameters
    settable = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY} - {
        "chunk",
        "dry_run_enabled",
    }
    assert set(Settings().operator_kwargs()) == settable
    for name, value in Settings().operator_kwargs().items():
        assert parameters[name].default == value, f"{name}: the operator's default is the setting's"
