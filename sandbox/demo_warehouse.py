"""Seed a SQLite demo warehouse with re-consented users, and print the audit summary.

python sandbox/demo_warehouse.py seed WAREHOUSE.db --day 2026-11-24
python sandbox/demo_warehouse.py summary WAREHOUSE.db
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from typing import Any

SOURCE_DDL = (
    "CREATE TABLE IF NOT EXISTS reconsented_users "
    "(customer_id TEXT NULL, email TEXT NULL, consented_at TIMESTAMP NOT NULL)"
)
"""The source the default extract query reads (``consented_at`` in UTC): the one definition the demo,
the tests and the benchmarks create it from, in any of the engines they run (SQLite, PostgreSQL,
MariaDB, DuckDB)."""


def seed_source(url: str, rows: Iterable[tuple[Any, Any, str]]) -> None:
    """Create ``reconsented_users`` at the SQLAlchemy ``url`` and insert ``(customer_id, email,
    consented_at)`` rows."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(SOURCE_DDL))
        conn.execute(
            sa.text("INSERT INTO reconsented_users VALUES (:customer_id, :email, :consented_at)"),
            [{"customer_id": c, "email": e, "consented_at": t} for c, e, t in rows],
        )
    engine.dispose()


DIRTY = [
    ("  CUST-CLEAN-1 ", "  Mixed.Case@Example.COM "),  # trimmed and lower-cased, then valid
    ("CUST-DUP", "dup@example.com"),  # the same user twice: one send
    ("CUST-DUP", "DUP@example.com "),
    ("", ""),  # no identifier: invalid
    (None, "not-an-email"),  # no @: invalid
    (None, "two@@example.com"),  # two @: invalid
    (None, "nodot@localhost"),  # no dot in the domain: invalid
    (None, "a" * 60 + "@example.com"),  # longer than 64 characters: invalid
    ("C" * 129, None),  # customer_id longer than 128: invalid
    ("x'); DROP TABLE reconsented_users;--", None),  # travels as data
    ("CUST-ÜNICODE-ß", "jürgen@exämple.de"),
    ("CUST-REJECT", None),  # the stand-in answers 422 for this one (demo of "rejected")
]


def seed(path: str, day: date, users: int) -> None:
    start = datetime(day.year, day.month, day.day)
    with sqlite3.connect(path) as conn:
        conn.execute(SOURCE_DDL)
        conn.execute("DELETE FROM reconsented_users")
        rows: list[tuple[str | None, str | None, str]] = [
            (
                f"CUST-{n:05d}",
                f"user{n:05d}@example.com",
                (start + timedelta(seconds=n * 37 % 86400)).strftime("%Y-%m-%d %H:%M:%S"),
            )
            for n in range(users)
        ]
        rows += [
            (customer_id, email, (start + timedelta(hours=12)).strftime("%Y-%m-%d %H:%M:%S"))
            for customer_id, email in DIRTY
        ]
        # Window edges: 00:00 of the day is inside, 00:00 of the next day belongs to the next window.
        rows.append(("CUST-EDGE-IN", None, start.strftime("%Y-%m-%d %H:%M:%S")))
        rows.append(("CUST-EDGE-OUT", None, (start + timedelta(days=1)).strftime("%Y-%m-%d %H:%M:%S")))
        conn.executemany(
            "INSERT INTO reconsented_users (customer_id, email, consented_at) VALUES (?, ?, ?)", rows
        )
    print(f"Seeded {len(rows)} rows into {path} (window {day} has {len(rows) - 1}, one is on the next day)")


def summary(path: str) -> None:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT window_start, status, COUNT(*), SUM(attempts) FROM blueshift_start_tracking_audit "
            "GROUP BY window_start, status ORDER BY window_start, status"
        ).fetchall()
        errors = conn.execute(
            "SELECT status, error, COUNT(*) FROM blueshift_start_tracking_audit "
            "WHERE status IN ('invalid', 'rejected', 'failed') GROUP BY status, error ORDER BY status, error"
        ).fetchall()
    print("\nAudit table blueshift_start_tracking_audit")
    print(f"{'window_start':<28}{'status':<12}{'users':>7}{'attempts':>10}")
    total = 0
    for window_start, status, count, attempts in rows:
        total += count
        print(f"{window_start:<28}{status:<12}{count:>7}{attempts or 0:>10}")
    print(f"{'total':<40}{total:>7}")
    if errors:
        print("\nReasons")
        for status, error, count in errors:
            print(f"  {status:<9} {count:>3}  {error}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    seed_parser = sub.add_parser("seed")
    seed_parser.add_argument("path")
    seed_parser.add_argument("--day", type=date.fromisoformat, default=date(2026, 11, 24))
    seed_parser.add_argument("--users", type=int, default=200)
    summary_parser = sub.add_parser("summary")
    summary_parser.add_argument("path")
    args = parser.parse_args()
    if args.command == "seed":
        seed(args.path, args.day, args.users)
    else:
        summary(args.path)


if __name__ == "__main__":
    main()
