"""SQLAlchemy engines of Airflow connections, made safe to log.

A failing statement's exception text normally carries its bound parameters (SQLAlchemy) and often
the failing row or key too (PostgreSQL's ``DETAIL: Failing row contains (...)``, MySQL's
``Duplicate entry '...'``): those are customers' emails, and Airflow logs the exception. Engines made
here hide the parameters and replace the driver's error by one that keeps only the first line of
its message, with emails redacted, and the same SQLAlchemy exception class (so ``except
IntegrityError`` still works).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from blueshift.outcomes import redact

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine, ExceptionContext, Inspector


class RedactedDatabaseError(Exception):
    """The driver's error, cut to its first line with emails redacted (stands in for ``err.orig``)."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def redacted_message(error: BaseException) -> str:
    """Return the first line of a driver error's message, emails redacted."""
    lines = str(error).strip().splitlines()
    return redact(lines[0] if lines else type(error).__name__, limit=500)


def _replace_driver_error(context: ExceptionContext) -> None:
    from sqlalchemy.exc import DBAPIError

    original = context.sqlalchemy_exception
    if not isinstance(original, DBAPIError) or context.original_exception is None:
        return
    driver_error = context.original_exception
    message = redacted_message(driver_error)
    # SQLAlchemy raises the replacement ``from`` the driver's error, and the traceback prints that
    # cause's message: cut it to the same redacted line in place.
    driver_error.args = (message,)
    orig = RedactedDatabaseError(message, sqlstate=getattr(driver_error, "sqlstate", None))
    replacement = type(original)(
        context.statement,
        context.parameters,
        orig,
        hide_parameters=True,
        connection_invalidated=original.connection_invalidated,
    )
    raise replacement


def safe_engine(hook: Any, **engine_kwargs: Any) -> Engine:
    """Return the engine of a common-sql hook that never puts row values into an error message."""
    engine: Engine = hook.get_sqlalchemy_engine(engine_kwargs={"hide_parameters": True, **engine_kwargs})
    event.listen(engine, "handle_error", _replace_driver_error)
    return engine


def create_tolerating_race(engine: Engine, ddl: str, created: Callable[[Inspector], bool]) -> None:
    """Run a ``CREATE ... IF NOT EXISTS``, tolerating another task creating it at the same moment.

    PostgreSQL's ``IF NOT EXISTS`` is not safe under concurrency: the loser of the race gets a
    unique violation on ``pg_type`` or ``pg_class``; the object exists then (``created`` says so),
    which is all we need. Any other failure is raised.
    """
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    try:
        with engine.begin() as conn:
            conn.execute(text(ddl))
    except DBAPIError:
        if not created(inspect(engine)):
            raise
