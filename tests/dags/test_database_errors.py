"""A failing warehouse write must not put customers' emails into the task log.

SQLAlchemy writes a failing statement's bound parameters into the exception text by default; the
staging insert binds every customer's email. The warehouse engine is created with
``hide_parameters=True``: this test makes that insert fail and scans everything the run logged.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime

import pytest
import sqlalchemy as sa

from sandbox.demo_warehouse import seed_source
from tests.dags.conftest import users_of_day

# The pipeline's staging table with one extra rule that every real email breaks.
STAGING_THAT_REFUSES_EMAILS = """
CREATE TABLE blueshift_start_tracking_staging (
    dag_id VARCHAR(250) NOT NULL,
    run_id VARCHAR(250) NOT NULL,
    user_key VARCHAR(64) NOT NULL,
    window_start TIMESTAMP NOT NULL,
    window_end TIMESTAMP NOT NULL,
    bucket INTEGER NOT NULL,
    customer_id TEXT,
    email TEXT CHECK (email IS NULL OR length(email) < 5),
    status VARCHAR(16) NOT NULL,
    http_status INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    PRIMARY KEY (dag_id, run_id, user_key)
)
"""


@pytest.fixture(autouse=True)
def _log_handlers_on_live_streams():
    """Point log handlers left on an earlier test's closed capture stream at the current one.

    Otherwise every log call fails with "--- Logging error ---" and Python prints the exception
    being handled, with its full chain, a harness artefact that a real task process does not have.
    """
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr


def test_failing_staging_write_logs_no_email(warehouse_db, standin, run_dag):
    users = users_of_day("2026-11-24", 20)
    seed_source(warehouse_db.url, users)
    engine = sa.create_engine(warehouse_db.url)
    with engine.begin() as conn:
        conn.execute(sa.text(STAGING_THAT_REFUSES_EMAILS))
    engine.dispose()

    result = run_dag(warehouse_db, standin, logical_date=datetime(2026, 11, 25))

    assert result.state == "failed"
    assert result.task_states["extract_and_validate"] == ["failed"]
    assert "INSERT INTO blueshift_start_tracking_staging" in result.output, "the failing write was logged"
    assert "SQL parameters hidden" in result.output
    leaked = [email for _, email, _ in users if email in result.output]
    assert not leaked, f"{len(leaked)} of {len(users)} emails in the run's logs, e.g. {leaked[:1]}"
    assert standin.state.requests == 0
    assert "extract_and_validate did not finish" in result.output, "the audit names the real cause"
