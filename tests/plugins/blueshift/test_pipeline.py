"""Chunk planning, the extract query file, and settings: bounds and clear errors."""

from __future__ import annotations

import random

import pytest

from blueshift.exceptions import BlueshiftConfigError
from blueshift.pipeline import finished_chunks, plan_chunks, read_extract_sql
from blueshift.settings import DEFAULT_EXTRACT_SQL, Settings
from blueshift.validation import BUCKETS


def spread(users: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    counts: dict[int, int] = {}
    for _ in range(users):
        bucket = rng.randrange(BUCKETS)
        counts[bucket] = counts.get(bucket, 0) + 1
    return sorted(counts.items())


@pytest.mark.parametrize(
    ("users", "chunk_size", "max_chunks"),
    [
        (1, 500, 256),
        (499, 500, 256),
        (1_000, 100, 256),
        (20_000, 500, 256),
        (1_000_000, 10, 256),
        (5_000, 10, 8),
    ],
)
def test_chunks_tile_every_bucket_and_stay_under_the_bound(users, chunk_size, max_chunks):
    per_bucket = spread(users)
    chunks = plan_chunks(per_bucket, chunk_size=chunk_size, max_chunks=max_chunks)
    assert 1 <= len(chunks) <= max_chunks
    assert sum(chunk["users"] for chunk in chunks) == users
    assert chunks[0]["bucket_lo"] == 0 and chunks[-1]["bucket_hi"] == BUCKETS - 1
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["bucket_lo"] == before["bucket_hi"] + 1
    if users >= chunk_size * 2:
        assert min(chunk["users"] for chunk in chunks[:-1]) >= min(chunk_size, users // max_chunks)
    assert len({chunk["chunk_id"] for chunk in chunks}) == len(chunks)
    assert chunks[0]["label"].startswith(f"chunk 1/{len(chunks)} · ")


@pytest.mark.parametrize(("users", "expected"), [(5, 1), (40, 4), (600, 4), (5_000, 10)])
def test_small_runs_still_fill_the_pool_slots(users, expected):
    chunks = plan_chunks(spread(users, seed=2), chunk_size=500, max_chunks=256, min_chunks=4)
    assert len(chunks) == pytest.approx(expected, abs=1)
    assert sum(chunk["users"] for chunk in chunks) == users


def test_no_users_no_chunks():
    assert plan_chunks([], chunk_size=500, max_chunks=256) == []


def test_chunk_identity_comes_from_content():
    """The same customers extracted in another order land in the same buckets, so the same chunks."""
    import pandas as pd

    from blueshift.validation import normalize

    users = [(f"C-{n}", f"user{n}@example.com") for n in range(3_000)]
    shuffled = random.Random(1).sample(users, len(users))

    def chunks_of(rows: list[tuple[str, str]]) -> tuple[dict[str, int], list[dict]]:
        frame = normalize(pd.DataFrame(rows, columns=["customer_id", "email"]))
        bucket_by_id = dict(zip(frame["customer_id"], frame["bucket"], strict=True))
        per_bucket = sorted(frame["bucket"].value_counts().items())  # as the staging table's GROUP BY gives
        return bucket_by_id, plan_chunks(per_bucket, chunk_size=500, max_chunks=256)

    buckets, chunks = chunks_of(users)
    buckets_shuffled, chunks_shuffled = chunks_of(shuffled)
    assert buckets_shuffled == buckets
    assert chunks_shuffled == chunks
    assert len(set(buckets.values())) > 1000, "the customers spread over the buckets"


def test_default_extract_sql_binds_the_window():
    sql = read_extract_sql(str(DEFAULT_EXTRACT_SQL))
    assert ":window_start" in sql and ":window_end" in sql
    assert "{" not in sql and "%s" not in sql


def test_missing_extract_sql_names_the_setting(tmp_path):
    with pytest.raises(BlueshiftConfigError, match="BLUESHIFT_EXTRACT_SQL"):
        read_extract_sql(str(tmp_path / "nope.sql"))


def test_extract_sql_without_window_parameters_is_refused(tmp_path):
    path = tmp_path / "query.sql"
    path.write_text("SELECT customer_id, email FROM reconsented_users WHERE consented_at >= :window_start")
    with pytest.raises(BlueshiftConfigError, match=":window_end"):
        read_extract_sql(str(path))


def test_settings_defaults():
    settings = Settings.from_env({})
    assert settings.rate_limit == 50.0
    assert settings.max_chunks <= 1024


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("BLUESHIFT_RATE_LIMIT", "fast", "BLUESHIFT_RATE_LIMIT='fast' is invalid"),
        ("BLUESHIFT_RATE_LIMIT", "0", "greater than 0"),
        ("BLUESHIFT_POOL_SLOTS", "-1", "at least 1"),
        ("BLUESHIFT_AUDIT_TABLE", "audit; DROP TABLE x", "not a plain SQL table name"),
        ("BLUESHIFT_STAGING_TABLE", "stage-1", "not a plain SQL table name"),
        ("BLUESHIFT_MAX_CHUNKS", "5000", "max_map_length"),
    ],
)
def test_bad_settings_name_the_variable(name, value, message):
    with pytest.raises(BlueshiftConfigError, match=message):
        Settings.from_env({name: value})


def test_fields_with_other_variable_names():
    assert Settings.from_env({"BLUESHIFT_CONN_ID": "bs_eu"}).blueshift_conn_id == "bs_eu"
    assert Settings.from_env({"BLUESHIFT_EXTRACT_SQL": "/q.sql"}).extract_sql_path == "/q.sql"
    both = {"BLUESHIFT_EXTRACT_SQL_PATH": "/new.sql", "BLUESHIFT_EXTRACT_SQL": "/old.sql"}
    assert Settings.from_env(both).extract_sql_path == "/new.sql", "the primary name wins"
    assert Settings.from_env({"BLUESHIFT_POOL_SLOTS": "3"}).max_active_chunks == 3
    assert (
        Settings.from_env({"BLUESHIFT_MAX_ACTIVE_CHUNKS": "2", "BLUESHIFT_POOL_SLOTS": "3"}).max_active_chunks
        == 2
    )
    assert Settings.from_env({"BLUESHIFT_BLUESHIFT_CONN_ID": "x"}).blueshift_conn_id == "blueshift_default"


def test_schema_qualified_table_is_allowed():
    assert Settings.from_env({"BLUESHIFT_AUDIT_TABLE": "marketing.audit"}).audit_table == "marketing.audit"


def test_only_chunk_results_of_the_current_plan_count_as_finished():
    """After a re-run, results of map indexes from an earlier plan are still readable: not this plan's."""
    results = [{"chunk_id": "b000-0ff", "plan": "old"}, {"chunk_id": "b100-fff", "plan": "new"}, None]
    assert finished_chunks(results, "new") == 1
    assert finished_chunks(results, "other") == 0
    assert finished_chunks(None, "new") == 0
