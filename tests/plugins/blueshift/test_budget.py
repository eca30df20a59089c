"""The global budget: shared by running chunk tasks of any run, never exceeded, fully used."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest

from blueshift.budget import FORGET_DEAD_LEASES_AFTER_SECONDS, SharedBudget
from blueshift.pacing import AdaptiveRateLimiter
from blueshift.state import StateStore
from tests.plugins.blueshift.test_operators import run_operator, stage


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now


def budget(store: StateStore, holder: str, clock: Clock, total: float = 50.0) -> SharedBudget:
    return SharedBudget(store, holder, total, clock=clock, sleep=lambda seconds: None)


def test_shares_follow_the_tasks_that_run(store):
    clock = Clock()
    first, second = budget(store, "run-1/chunk/0", clock), budget(store, "run-1/chunk/1", clock)
    limiter_1, limiter_2 = AdaptiveRateLimiter(50.0), AdaptiveRateLimiter(50.0)

    first.join(limiter_1)
    assert limiter_1.max_rate == 50.0, "one chunk alone gets the whole budget"
    second.join(limiter_2)
    first.refresh(limiter_1, force=True)
    assert limiter_1.max_rate == limiter_2.max_rate == 25.0

    second.leave()
    first.refresh(limiter_1, force=True)
    assert limiter_1.max_rate == 50.0, "a task that ends hands its share back"


def test_tasks_of_concurrent_runs_share_one_budget(store):
    clock = Clock()
    holders = [
        budget(store, f"backfill__2026-11-2{day}/start_tracking/{index}", clock)
        for day in range(3)
        for index in range(2)
    ]
    limiters = [AdaptiveRateLimiter(50.0) for _ in holders]
    for holder, limiter in zip(holders, limiters, strict=True):
        holder.join(limiter)
    for holder, limiter in zip(holders, limiters, strict=True):
        holder.refresh(limiter, force=True)
    assert sum(limiter.max_rate for limiter in limiters) == pytest.approx(50.0)
    # Each holder paces at its rank's phase: six shares interleave on one grid, 1/50 s apart.
    assert sorted(limiter.phase for limiter in limiters) == pytest.approx([n / 6 for n in range(6)])


def test_a_dead_holder_stops_counting(store):
    clock = Clock()
    alive, dead = budget(store, "alive", clock), budget(store, "killed", clock)
    limiter = AdaptiveRateLimiter(50.0)
    dead.join(AdaptiveRateLimiter(50.0))
    alive.join(limiter)
    assert limiter.max_rate == 25.0
    clock.now += timedelta(seconds=6)
    alive.refresh(limiter, force=True)
    assert limiter.max_rate == 50.0


def test_a_new_task_sends_only_after_the_others_slowed_down(store):
    """Real clock and sleeps: the newcomer waits for the running task's next renewal, not longer."""
    running, newcomer = SharedBudget(store, "running", 50.0), SharedBudget(store, "newcomer", 50.0)
    running_limiter, newcomer_limiter = AdaptiveRateLimiter(50.0), AdaptiveRateLimiter(50.0)
    running.join(running_limiter)
    joined = threading.Event()
    seen_by_running_when_joined: list[float] = []

    def join() -> None:
        newcomer.join(newcomer_limiter)
        seen_by_running_when_joined.append(running_limiter.max_rate)
        joined.set()

    thread = threading.Thread(target=join)
    thread.start()
    assert not joined.wait(1.0), "the newcomer must wait while the running task still spends 50/s"
    running.refresh(running_limiter, force=True)
    assert joined.wait(1.0), "one renewal of the running task is enough"
    thread.join()
    assert seen_by_running_when_joined == [25.0]
    assert newcomer_limiter.max_rate == 25.0


def test_a_holder_that_never_renews_delays_a_join_only_briefly(store):
    silent = SharedBudget(store, "killed-a-second-ago", 50.0)
    silent.join(AdaptiveRateLimiter(50.0))
    newcomer = SharedBudget(store, "newcomer", 50.0, join_timeout=0.5)
    limiter = AdaptiveRateLimiter(50.0)
    newcomer.join(limiter)
    assert limiter.max_rate == 25.0, "until its lease goes stale, the silent holder keeps its share"


def test_leases_of_long_dead_tasks_are_cleared(store):
    import sqlalchemy as sa

    clock = Clock()
    budget(store, "dead-long-ago", clock).join(AdaptiveRateLimiter(50.0))
    clock.now += timedelta(seconds=3)
    budget(store, "dead-recently", clock).join(AdaptiveRateLimiter(50.0))
    clock.now += timedelta(seconds=FORGET_DEAD_LEASES_AFTER_SECONDS - 1)
    finished = budget(store, "finished", clock)
    finished.join(AdaptiveRateLimiter(50.0))
    finished.leave()
    with store.engine.connect() as conn:
        holders = conn.execute(sa.text(f"SELECT holder FROM {store.lease_table}")).scalars().all()
    assert holders == ["dead-recently"]


def test_set_max_rate_scales_the_pace():
    limiter = AdaptiveRateLimiter(50.0)
    limiter.on_throttled()
    assert limiter.rate == 25.0
    limiter.set_max_rate(10.0)
    assert limiter.max_rate == 10.0
    assert limiter.rate == 5.0


def test_two_chunk_tasks_together_stay_within_the_budget(store, standin, monkeypatch):
    """Two chunk tasks at once against a stand-in that enforces the same budget with 429s."""
    import json

    from tests.conftest import API_KEY, FIGURES

    monkeypatch.setenv(
        "AIRFLOW_CONN_BLUESHIFT_DEFAULT",
        json.dumps({"conn_type": "http", "host": standin.url, "login": API_KEY}),
    )
    standin.state.config.rate_limit = 30
    standin.state.config.latency_ms = 20
    standin.state.reset()
    stage(store, [(f"C-{n:03d}", None) for n in range(150)])
    chunks = [
        {"chunk_id": "low", "bucket_lo": 0, "bucket_hi": 2047, "users": 0, "label": "low"},
        {"chunk_id": "high", "bucket_lo": 2048, "bucket_hi": 4095, "users": 0, "label": "high"},
    ]
    results: list[dict] = []
    threads = [
        threading.Thread(
            target=lambda chunk=chunk: results.append(run_operator(chunk=chunk, rate_limit=30.0))
        )
        for chunk in chunks
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = standin.state.snapshot()
    assert sum(result["succeeded"] for result in results) == 150
    throttled = snapshot["statuses"].get("429", 0)
    FIGURES.append(
        f"2 tasks, budget 30/s: busiest second {snapshot['busiest_second']}, "
        f"{throttled} of {snapshot['requests']} throttled"
    )
    assert throttled <= 0.02 * snapshot["requests"]
    assert snapshot["busiest_second"] <= 30 + 1, "the two shares interleave: no second above the budget"
