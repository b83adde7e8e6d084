"""The processor runtime against a real queue: pickup, transactions, retries, dead letters,
heartbeat, testing mode, shutdown and database outages."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from nova.config import load_settings
from nova.runtime import RetryLater, RetryPolicy, Worker

from runtime_procs import LOG_TABLE, TEST_QUEUE, Recorder

HERE = Path(__file__).resolve().parent


def settings(**kw: Any) -> Any:
    base = {"batch_size": 4, "visibility_timeout": 30, "poll_interval_ms": 2000,
            "shutdown_grace_seconds": 5}
    base.update(kw)
    return load_settings(**base)


def make_worker(pool: asyncpg.Pool, shutdown_grace: float | None = None, **kw: Any) -> Worker:
    return Worker(Recorder(), settings(**kw), pool=pool, database_url=URLS[id(pool)],
                  shutdown_grace=shutdown_grace)


async def send(pool: asyncpg.Pool, **message: Any) -> int:
    return await pool.fetchval("SELECT flux_pgmq_send($1, $2::jsonb)", TEST_QUEUE,  # type: ignore[no-any-return]
                               message)


URLS: dict[int, str] = {}  # pool id -> its database URL (the listener needs it)


@pytest.fixture
async def rpool(pool: asyncpg.Pool, db_url: str) -> asyncpg.Pool:
    await pool.execute(LOG_TABLE)
    URLS[id(pool)] = db_url
    return pool


async def queue_len(pool: asyncpg.Pool) -> int:
    return await pool.fetchval(f"SELECT count(*) FROM pgmq.q_{TEST_QUEUE}")  # type: ignore[no-any-return]


async def test_jobs_commit_with_their_queue_delete(rpool: asyncpg.Pool, db_url: str) -> None:
    ids = [await send(rpool) for _ in range(10)]
    stats = await make_worker(rpool).run(burst=True)
    assert stats.processed == 10
    assert sorted(r["msg_id"] for r in await rpool.fetch("SELECT msg_id FROM runtime_done")) == ids
    assert await queue_len(rpool) == 0


async def test_failures_retry_with_backoff_then_succeed(rpool: asyncpg.Pool) -> None:
    msg = await send(rpool, fail=2)
    worker = make_worker(rpool)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 15
    while not await rpool.fetchval("SELECT count(*) FROM runtime_done") and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    attempts = await rpool.fetch("SELECT attempt, at FROM runtime_log WHERE msg_id = $1"
                                 " ORDER BY at", msg)
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in zip(attempts, attempts[1:],
                                                                  strict=False)]
    assert all(g >= 0.09 for g in gaps), gaps  # backed off, not hammered
    failures = await rpool.fetch("SELECT final FROM runtime_failures")
    assert [f["final"] for f in failures] == [False, False]
    assert worker.stats.retried == 2 and worker.stats.processed == 1


async def test_past_max_attempts_the_message_is_archived(rpool: asyncpg.Pool) -> None:
    msg = await send(rpool, fail=99)
    worker = make_worker(rpool)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 15
    while worker.stats.archived == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    assert await queue_len(rpool) == 0
    archived = await rpool.fetchrow(f"SELECT msg_id, read_ct FROM pgmq.a_{TEST_QUEUE}")
    assert archived["msg_id"] == msg and archived["read_ct"] == 3
    final = await rpool.fetch("SELECT final, error FROM runtime_failures ORDER BY final")
    assert [(f["final"], f["error"]) for f in final] == [
        (False, "boom 1"), (False, "boom 2"), (True, "boom 3")]


async def test_give_up_archives_at_once(rpool: asyncpg.Pool) -> None:
    await send(rpool, give_up=True)
    stats = await make_worker(rpool).run(burst=True)
    assert stats.archived == 1 and stats.retried == 0
    assert await rpool.fetchval(f"SELECT count(*) FROM pgmq.a_{TEST_QUEUE}") == 1


def test_retry_policy_backoff_grows_with_jitter_and_caps() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay=2, max_delay=20)
    for attempt, ceiling in ((1, 2), (2, 4), (3, 8), (4, 16)):
        delays = {policy.decide(attempt, RuntimeError()).delay for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert not policy.decide(5, RuntimeError()).retry
    assert policy.decide(1, RetryLater("429", delay=7)).delay == 7
    assert policy.decide(1, RetryLater("429", delay=700)).delay == 20


async def test_heartbeat_keeps_a_long_job_from_a_second_worker(rpool: asyncpg.Pool) -> None:
    msg = await send(rpool, sleep=3.5)
    workers = [make_worker(rpool, visibility_timeout=1) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    deadline = time.monotonic() + 15
    while not await rpool.fetchval("SELECT count(*) FROM runtime_done") and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks)
    assert await rpool.fetchval("SELECT count(*) FROM runtime_log WHERE msg_id = $1", msg) == 1


async def test_testing_mode_processes_without_deleting(rpool: asyncpg.Pool) -> None:
    await send(rpool)
    stats = await make_worker(rpool, testing_mode=True).run(burst=True)
    assert stats.processed == 1
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 1
    assert await queue_len(rpool) == 1


async def test_idle_worker_picks_up_a_new_message_without_polling(rpool: asyncpg.Pool) -> None:
    # poll ceiling of 30 s: only the NOTIFY can explain a fast pickup
    worker = make_worker(rpool, poll_interval_ms=30_000)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.5)  # let it go idle
    latencies = []
    for _ in range(5):
        t0 = time.monotonic()
        msg = await send(rpool)
        while not await rpool.fetchval("SELECT 1 FROM runtime_done WHERE msg_id = $1", msg):
            await asyncio.sleep(0.005)
        latencies.append(time.monotonic() - t0)
        await asyncio.sleep(0.2)
    worker.stop()
    await task
    assert max(latencies) < 1.0, latencies


async def test_concurrency_is_bounded_by_batch_size(rpool: asyncpg.Pool) -> None:
    for _ in range(9):
        await send(rpool, sleep=0.4)
    t0 = time.monotonic()
    stats = await make_worker(rpool, batch_size=3).run(burst=True)
    elapsed = time.monotonic() - t0
    assert stats.processed == 9
    starts = [r["at"] for r in await rpool.fetch("SELECT at FROM runtime_log ORDER BY at")]
    # never more than 3 running: the 4th start comes after the first finished
    assert (starts[3] - starts[0]).total_seconds() >= 0.35
    assert elapsed >= 1.1  # 3 rounds of 0.4 s


async def test_stop_lets_inflight_jobs_finish(rpool: asyncpg.Pool) -> None:
    for _ in range(3):
        await send(rpool, sleep=0.8)
    worker = make_worker(rpool)
    task = asyncio.create_task(worker.run())
    while await rpool.fetchval("SELECT count(*) FROM runtime_log") < 3:
        await asyncio.sleep(0.02)
    worker.stop()
    await task
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 3
    assert await queue_len(rpool) == 0


async def test_jobs_past_the_grace_period_are_released(rpool: asyncpg.Pool) -> None:
    msg = await send(rpool, sleep=30)
    worker = make_worker(rpool, shutdown_grace=0.3)
    task = asyncio.create_task(worker.run())
    while not await rpool.fetchval("SELECT count(*) FROM runtime_log"):
        await asyncio.sleep(0.02)
    worker.stop()
    await task
    assert worker.stats.released == 1
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 0
    # visible again now, not after the 30 s visibility timeout
    row = await rpool.fetchrow(f"SELECT msg_id FROM pgmq.q_{TEST_QUEUE}"
                               " WHERE vt <= clock_timestamp() + interval '1 second'")
    assert row is not None and row["msg_id"] == msg


def _spawn(db_url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "BATCH_SIZE": "4", "VISIBILITY_TIMEOUT": "2",
           "NOVA_SHUTDOWN_GRACE_SECONDS": "10"}
    proc = subprocess.Popen([sys.executable, str(HERE / "runtime_procs.py"), db_url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    return proc


async def _wait_for(pool: asyncpg.Pool, query: str, want: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pool.fetchval(query) >= want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {query} >= {want}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_finishes_inflight_jobs_and_exits_zero(rpool: asyncpg.Pool, db_url: str,
                                                            sig: signal.Signals) -> None:
    for _ in range(2):
        await send(rpool, sleep=1.0)
    proc = _spawn(db_url)
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 2
    assert "stopped processed=2" in out


async def test_sigkill_mid_job_is_redelivered_and_done_once(rpool: asyncpg.Pool,
                                                            db_url: str) -> None:
    msg = await send(rpool, sleep=1.5)
    first = _spawn(db_url)
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 1)
    first.kill()
    first.wait(timeout=10)
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 0
    second = _spawn(db_url)
    try:
        await _wait_for(rpool, "SELECT count(*) FROM runtime_done", 1)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=20)
    assert [r["attempt"] for r in await rpool.fetch(
        "SELECT attempt FROM runtime_log WHERE msg_id = $1 ORDER BY at", msg)] == [1, 2]
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 1
    assert await queue_len(rpool) == 0


def test_message_payload_round_trips_as_json() -> None:
    assert json.loads(json.dumps({"sleep": 0.1})) == {"sleep": 0.1}


async def test_worker_waits_for_an_unreachable_database_and_stops_cleanly() -> None:
    worker = Worker(Recorder(), settings(), database_url="postgresql://postgres@127.0.0.1:1/x")
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(1.0)
    assert not task.done()  # still trying, not crashed
    worker.stop()
    stats = await asyncio.wait_for(task, 5)
    assert stats.processed == 0
