"""The processor runtime against a real queue: pickup, transactions, retries, dead letters,
leases and their heartbeat, jobs that kill their process, testing mode, shutdown, Fatal,
database errors and bounded stats."""

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
from nova.runtime import RECENT_DURATIONS, RetryLater, RetryPolicy, Worker

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
    # the finished run cost no attempt: the message would not creep towards its dead letter
    assert await rpool.fetchval(f"SELECT read_ct FROM pgmq.q_{TEST_QUEUE}") == 0


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
    # visible again now, not after the 30 s visibility timeout, and the attempt not counted
    row = await rpool.fetchrow(f"SELECT msg_id, read_ct FROM pgmq.q_{TEST_QUEUE}"
                               " WHERE vt <= clock_timestamp() + interval '1 second'")
    assert row is not None and row["msg_id"] == msg and row["read_ct"] == 0


def _spawn(db_url: str, **env: str) -> subprocess.Popen[str]:
    env = {**os.environ, "BATCH_SIZE": "4", "VISIBILITY_TIMEOUT": "2",
           "NOVA_SHUTDOWN_GRACE_SECONDS": "10", **env}
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


async def test_sigkilled_workers_job_runs_again_in_another_worker(rpool: asyncpg.Pool,
                                                                   db_url: str) -> None:
    # A 2 s lease: the idle second worker wakes when it runs out (no POLL_INTERVAL wait, no
    # 300 s visibility timeout) and the job runs there, once.
    msg = await send(rpool, sleep_first=60)
    first = _spawn(db_url)
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 1)
    second = _spawn(db_url)
    try:
        first.kill()
        first.wait(timeout=10)
        assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 0
        await _wait_for(rpool, "SELECT count(*) FROM runtime_done", 1, timeout=15)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=20)
    runs = await rpool.fetch("SELECT attempt, note FROM runtime_log WHERE msg_id = $1"
                             " ORDER BY at", msg)
    assert [r["attempt"] for r in runs] == [1, 2]
    assert [r["note"] for r in runs] == [str(first.pid), str(second.pid)]
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 1
    assert await queue_len(rpool) == 0


async def test_a_job_whose_process_dies_every_time_ends_archived_with_its_row_failed(
        rpool: asyncpg.Pool, db_url: str) -> None:
    # No Python `except` ever sees this job: each worker that reads it dies (as under the OOM
    # killer). Past max attempts (3) + the crash margin (2) it is archived unrun.
    msg = await send(rpool, die=True)
    archived = f"SELECT count(*) FROM pgmq.a_{TEST_QUEUE}"
    deadline = time.monotonic() + 90
    survivor = None
    while survivor is None and time.monotonic() < deadline:
        proc = _spawn(db_url, VISIBILITY_TIMEOUT="1")
        while proc.poll() is None and not await rpool.fetchval(archived):
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            survivor = proc  # it archived the message instead of running it
        else:
            assert proc.returncode == -signal.SIGKILL, proc.communicate()[0]
            proc.communicate()
    assert survivor is not None, "the message never reached its dead letter"
    survivor.send_signal(signal.SIGTERM)
    out, _ = survivor.communicate(timeout=20)
    assert survivor.returncode == 0, out
    assert [r["attempt"] for r in await rpool.fetch(
        "SELECT attempt FROM runtime_log WHERE msg_id = $1 ORDER BY at", msg)] == [1, 2, 3, 4, 5]
    row = await rpool.fetchrow(f"SELECT msg_id, read_ct FROM pgmq.a_{TEST_QUEUE}")
    assert (row["msg_id"], row["read_ct"]) == (msg, 6)
    assert await queue_len(rpool) == 0
    [failure] = await rpool.fetch("SELECT final, error FROM runtime_failures")
    assert failure["final"] is True
    assert "never finished in 5 attempts: its process died each time" in failure["error"]
    assert f"job {msg} archived unrun attempt=6" in out


async def test_sigterm_gives_inflight_jobs_back_without_costing_an_attempt(
        rpool: asyncpg.Pool, db_url: str) -> None:
    ids = [await send(rpool, sleep=60) for _ in range(2)]
    proc = _spawn(db_url, NOVA_SHUTDOWN_GRACE_SECONDS="0.2", VISIBILITY_TIMEOUT="30")
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 2)
    assert [r["read_ct"] for r in await rpool.fetch(
        f"SELECT read_ct FROM pgmq.q_{TEST_QUEUE} ORDER BY msg_id")] == [1, 1]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    rows = await rpool.fetch(f"SELECT msg_id, read_ct, vt <= clock_timestamp() AS visible"
                             f" FROM pgmq.q_{TEST_QUEUE} ORDER BY msg_id")
    assert [(r["msg_id"], r["read_ct"], r["visible"]) for r in rows] == [
        (i, 0, True) for i in ids]
    assert "released=2" in out
    assert await rpool.fetchval("SELECT count(*) FROM runtime_failures") == 0


async def _steal(pool: asyncpg.Pool, msg: int) -> int:
    """Another reader takes the message, as PGMQ would once a lease runs out."""
    await pool.execute(f"UPDATE pgmq.q_{TEST_QUEUE} SET vt = clock_timestamp()"
                       " WHERE msg_id = $1", msg)
    row = await pool.fetchrow("SELECT msg_id, read_ct FROM pgmq.read($1, 300, 1)", TEST_QUEUE)
    assert row is not None and row["msg_id"] == msg
    return row["read_ct"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", [
    {"sleep_in_tx": 1.0},  # a transaction, stolen while it is open
    {"one_statement": True, "sleep": 1.0},  # JobContext.commit, stolen before it runs
], ids=["transaction", "one_statement"])
async def test_a_job_that_lost_its_lease_cannot_commit(rpool: asyncpg.Pool,
                                                       caplog: pytest.LogCaptureFixture,
                                                       how: dict[str, Any]) -> None:
    # vt 30: no heartbeat before the commit, so the commit itself must refuse
    msg = await send(rpool, **how)
    worker = make_worker(rpool, visibility_timeout=30)
    task = asyncio.create_task(worker.run())
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 1)
    assert await _steal(rpool, msg) == 2
    deadline = time.monotonic() + 15
    while worker.stats.lost == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    assert worker.stats.lost == 1
    assert worker.stats.processed == worker.stats.retried == worker.stats.archived == 0
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 0  # rolled back
    assert await rpool.fetchval("SELECT count(*) FROM runtime_failures") == 0  # no attempt
    assert await rpool.fetchval(f"SELECT read_ct FROM pgmq.q_{TEST_QUEUE}") == 2  # the thief's
    assert "lease lost attempt=1: at commit" in caplog.text


async def test_a_job_can_commit_in_one_statement(rpool: asyncpg.Pool) -> None:
    """JobContext.commit: the work and the queue delete in one statement; an error in the
    statement takes the delete back with the write (the job is retried); TESTING_MODE keeps
    the message without costing an attempt."""
    ids = [await send(rpool, one_statement=True) for _ in range(3)]
    failing = await send(rpool, one_statement=True, fail_in_statement=1)
    worker = make_worker(rpool)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 15
    while await queue_len(rpool) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    assert worker.stats.processed == 4 and worker.stats.retried == 1
    assert sorted(r["msg_id"] for r in await rpool.fetch("SELECT msg_id FROM runtime_done")) == \
        [*ids, failing]
    assert await queue_len(rpool) == 0
    assert await rpool.fetchval("SELECT error FROM runtime_failures WHERE msg_id = $1",
                                failing) == "boom in the statement"
    assert await rpool.fetchval("SELECT count(*) FROM runtime_log WHERE msg_id = $1",
                                failing) == 2

    kept = await send(rpool, one_statement=True)
    stats = await make_worker(rpool, testing_mode=True).run(burst=True)
    assert stats.processed == 1
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done WHERE msg_id = $1", kept) == 1
    assert await rpool.fetchval(f"SELECT read_ct FROM pgmq.q_{TEST_QUEUE}") == 0


async def test_heartbeat_that_finds_the_lease_taken_abandons_the_job(
        rpool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    msg = await send(rpool, sleep=60)
    worker = make_worker(rpool, visibility_timeout=1)  # a heartbeat every 0.33 s
    task = asyncio.create_task(worker.run())
    await _wait_for(rpool, "SELECT count(*) FROM runtime_log", 1)
    await _steal(rpool, msg)
    deadline = time.monotonic() + 15
    while worker.stats.lost == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await asyncio.wait_for(task, 10)  # the 60 s job was cancelled, not waited for
    assert worker.stats.lost == 1 and worker.stats.released == 0
    assert "read again by another worker" in caplog.text
    assert await rpool.fetchval("SELECT count(*) FROM runtime_done") == 0
    assert await rpool.fetchval("SELECT count(*) FROM runtime_failures") == 0


FAILING_HEARTBEAT = f"""
CREATE FUNCTION fail_heartbeat() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.read_ct = OLD.read_ct AND NEW.vt > OLD.vt THEN
        RAISE EXCEPTION 'heartbeat refused (test)';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_heartbeat BEFORE UPDATE ON pgmq.q_{TEST_QUEUE}
    FOR EACH ROW EXECUTE FUNCTION fail_heartbeat();
"""


async def test_a_failing_heartbeat_abandons_the_job_at_its_leases_end(
        rpool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    # Every renewal fails in Postgres; reads still work. The first attempt (60 s long) is given
    # up when its 1 s lease runs out, commits nothing, costs nothing; the next read runs it.
    await rpool.execute(FAILING_HEARTBEAT)
    msg = await send(rpool, sleep_first=60)
    worker = make_worker(rpool, visibility_timeout=1)
    task = asyncio.create_task(worker.run())
    try:
        await _wait_for(rpool, "SELECT count(*) FROM runtime_done", 1, timeout=20)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    assert worker.stats.lost == 1 and worker.stats.processed == 1
    assert "heartbeat failed" in caplog.text and "heartbeat refused (test)" in caplog.text
    assert "heartbeat kept failing past the lease's end" in caplog.text
    assert [r["attempt"] for r in await rpool.fetch(
        "SELECT attempt FROM runtime_log WHERE msg_id = $1 ORDER BY at", msg)] == [1, 2]
    assert await rpool.fetchval("SELECT count(*) FROM runtime_failures") == 0


async def test_the_read_loop_survives_postgres_errors(rpool: asyncpg.Pool,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    worker = make_worker(rpool, poll_interval_ms=200)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.3)  # idle
    await rpool.execute(f"ALTER TABLE pgmq.q_{TEST_QUEUE} RENAME TO q_away")
    try:
        deadline = time.monotonic() + 15
        while "read failed (UndefinedTableError" not in caplog.text and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "read failed (UndefinedTableError" in caplog.text
        assert not task.done()
    finally:
        await rpool.execute("ALTER TABLE pgmq.q_away RENAME TO q_" + TEST_QUEUE)
    msg = await send(rpool)
    try:
        await _wait_for(rpool, "SELECT count(*) FROM runtime_done", 1)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    assert await rpool.fetchval("SELECT msg_id FROM runtime_done") == msg


async def test_fatal_stops_the_worker_with_status_2_and_costs_no_attempt(
        rpool: asyncpg.Pool, db_url: str) -> None:
    slow = await send(rpool, sleep=1.0)
    fatal = await send(rpool, fatal="the provider rejected the API key")
    proc = _spawn(db_url, VISIBILITY_TIMEOUT="30")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    lines = [line for line in out.splitlines() if "rejected the API key" in line]
    assert len(lines) == 1 and "[Test] fatal: the provider rejected the API key" in lines[0]
    assert "Traceback" not in out
    # the in-flight job was drained; the fatal one given back, visible, its read undone
    assert [r["msg_id"] for r in await rpool.fetch("SELECT msg_id FROM runtime_done")] == [slow]
    row = await rpool.fetchrow(f"SELECT msg_id, read_ct, vt <= clock_timestamp() AS visible"
                               f" FROM pgmq.q_{TEST_QUEUE}")
    assert (row["msg_id"], row["read_ct"], row["visible"]) == (fatal, 0, True)
    assert await rpool.fetchval("SELECT count(*) FROM runtime_failures") == 0


async def test_stats_stay_bounded_after_many_jobs(rpool: asyncpg.Pool) -> None:
    n = RECENT_DURATIONS + 500
    await rpool.execute("SELECT pgmq.send_batch($1, array_agg('{}'::jsonb))"
                        " FROM generate_series(1, $2)", TEST_QUEUE, n)
    worker = make_worker(rpool, batch_size=20)
    stats = await worker.run(burst=True)
    assert stats.processed == n
    assert len(stats.durations_ms) == RECENT_DURATIONS  # the most recent only
    assert 0 < stats.mean_ms <= stats.max_ms
    assert stats.percentile_ms(50) <= stats.percentile_ms(99) <= stats.max_ms
    assert not worker._inflight


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
