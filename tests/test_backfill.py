"""nova.backfill with nova.threads and nova.completion against SandboxNylas over HTTP."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from synchelp import (
    add_inbox,
    assert_db_equals_mailbox,
    env,
    make_sandbox,
    running,
    settings,
    spawn,
    start_backfill,
    status,
    stop,
    wait_for,
)

from nova.backfill import BackfillProcessor
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(300) as sb:
        yield sb


async def progress(pool: asyncpg.Pool, config_id: uuid.UUID) -> asyncpg.Record:
    return await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config_id)


async def test_full_backfill_with_two_thread_workers_stores_the_whole_mailbox(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    config = await start_backfill(pool, inbox)
    async with running(db_url, settings(sandbox), threads=2):
        await wait_for(lambda: _is(pool, config, "completed"), 60, what="completion")
    messages = await assert_db_equals_mailbox(pool, sandbox, grant, inbox)
    p = await progress(pool, config)
    assert p["percent_complete"] == 100 and p["threads_queued"] == 300
    assert p["threads_completed"] == 300 and p["threads_failed"] == 0
    # Two pages of the main pass, then one round of changes (none in a quiet mailbox).
    assert p["messages_synced"] == messages and p["pages_done"] == 3
    stats = sandbox.get_stats()
    # The fewest requests: a thread whose one message came whole with the listing needs none;
    # every other thread one messages list; no thread is fetched on its own.
    several = sum(1 for t in sandbox.thread_ids(grant)
                  if len((sandbox.thread_json(grant, t) or {})["message_ids"]) > 1)
    assert 0 < several < 300 and "get_thread" not in stats["requests"]
    assert stats["requests"]["list_messages"] == several
    assert sum(stats["requests"].values()) / 300 <= 0.8
    assert stats["thread_pages"][grant] == {"<first>": 2, next(
        t for t in stats["thread_pages"][grant] if t != "<first>"): 1}
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert row["backfill_completed_at"] is not None and row["discovery_completed_at"] is not None
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs") == 0
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_inbox_backfill_jobs") == 0
    assert await pool.fetchval(
        "SELECT sync_completed_at IS NOT NULL FROM inbox_sync_stats WHERE config_id = $1",
        config)


async def _is(pool: asyncpg.Pool, config: uuid.UUID, wanted: str) -> bool:
    return await status(pool, config) == wanted


async def test_thread_sync_starts_while_discovery_goes_on(pool: asyncpg.Pool,
                                                         db_url: str) -> None:
    with make_sandbox(600, latency_ms=100) as sb:  # three pages, each takes a while
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        async with running(db_url, settings(sb), threads=2):
            await wait_for(lambda: _is(pool, config, "completed"), 90, what="completion")
    # A worker picks up a thread of page 1 while pages 2 and 3 are still being fetched.
    first_started = await pool.fetchval("SELECT min(started_at) FROM queued_threads")
    discovered = await pool.fetchval(
        "SELECT discovery_completed_at FROM flux_inbox_configurations WHERE id = $1", config)
    assert first_started < discovered


async def test_sigkill_mid_discovery_and_mid_sync_resumes_to_the_same_state(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    with make_sandbox(1200, latency_ms=60) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        e = env(db_url, sb)
        log = tmp_path / "procs.log"
        orchestrator = spawn("nova.backfill", e, log)
        workers = [spawn("nova.threads", e, log) for _ in range(2)]
        try:
            await wait_for(lambda: pool.fetchval(
                "SELECT checkpoint_pages_done >= 2 FROM flux_inbox_configurations"
                " WHERE id = $1", config), 60, what="two pages discovered")
            orchestrator.send_signal(signal.SIGKILL)
            orchestrator.wait(10)
            await wait_for(lambda: pool.fetchval(
                "SELECT count(*) >= 20 FROM queued_threads WHERE status = 'completed'"),
                60, what="some threads synced")
            workers[0].send_signal(signal.SIGKILL)  # mid-sync: it holds up to 10 jobs
            workers[0].wait(10)
            pages_at_kill = await pool.fetchval(
                "SELECT checkpoint_pages_done FROM flux_inbox_configurations WHERE id = $1",
                config)
            assert await status(pool, config) == "discovering" and pages_at_kill < 6
            orchestrator = spawn("nova.backfill", e, log)
            workers[0] = spawn("nova.threads", e, log)
            from nova.completion import CompletionMonitor
            monitor = CompletionMonitor(settings(sb), pool=pool)
            async def done() -> bool:
                await monitor.check()
                return await _is(pool, config, "completed")
            await wait_for(done, 120, interval=0.3, what="completion after restarts")
        finally:
            for proc in [orchestrator, *workers]:
                stop(proc)
        await assert_db_equals_mailbox(pool, sb, grant, inbox)
        pages = sb.get_stats()["thread_pages"][grant]
        # The main pass resumed, never restarted: its first page once, the round's once.
        assert pages["<first>"] == 2, pages
        # 6 pages and the round's; at most two fetched twice: the page being written at the
        # kill and the next one, requested meanwhile.
        assert sum(pages.values()) <= 6 + 1 + 2, pages
        p = await progress(pool, config)
        assert p["percent_complete"] == 100 and p["threads_completed"] == 1200
        dupes = await pool.fetchval(
            "SELECT count(*) - count(DISTINCT provider_message_id) FROM flux_email_messages")
        assert dupes == 0
        assert "Traceback" not in log.read_text()


async def test_range_over_one_year_is_refused_at_start_but_a_started_one_still_runs(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    inbox = await add_inbox(pool, sandbox.grant_ids[0])
    with pytest.raises(asyncpg.InvalidParameterValueError, match="more than one year back"):
        await pool.execute("SELECT queue_inbox_backfill($1, now() - interval '2 years')", inbox)
    config = await start_backfill(pool, inbox)
    # A backfill queued with the default range and resumed (or recovered) after the day of
    # grace reaches a little more than a year back by then: it must run, not fail.
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_since = $2 WHERE id = $1",
                       config, datetime.now(UTC) - timedelta(days=400))
    s = settings(sandbox)
    stats = await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    assert stats.archived == 0 and stats.processed == 1
    assert await status(pool, config) == "thread_sync"
    assert await pool.fetchval("SELECT count(*) FROM queued_threads") == 300


async def test_expired_grant_fails_the_backfill_and_marks_the_inbox(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    config = await start_backfill(pool, inbox)
    sandbox.expire_grant(grant, send=False)
    s = settings(sandbox)
    stats = await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    assert stats.archived == 1
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert row["backfill_status"] == "failed" and row["last_error"].startswith("GrantExpired")
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1", inbox) \
        == "auth_expired"


async def test_failed_backfill_resumes_from_its_checkpoint(pool: asyncpg.Pool, db_url: str,
                                                           sandbox: SandboxNylas) -> None:
    grant = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    config = await start_backfill(pool, inbox)
    s = settings(sandbox)
    sandbox.set_latency(300)
    worker = Worker(BackfillProcessor(s, retry_base_delay=0.05, retry_max_delay=0.1), s,
                    pool=pool)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: pool.fetchval("SELECT checkpoint_pages_done = 1 FROM"
                                         " flux_inbox_configurations WHERE id = $1", config),
                   10, interval=0.01, what="page 1")
    # Page 2, requested while page 1 was written, may be in by now; every later page request
    # fails (the sandbox decides faults after its latency), past the provider's own transient
    # retries and the job's 3 attempts.
    sandbox.inject_fault("error_5xx", 1000, endpoint="list_threads")
    sandbox.set_latency(0)
    await wait_for(lambda: _is(pool, config, "failed"), 30, what="failed")
    worker.stop()
    await task
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert row["checkpoint_pages_done"] in (1, 2) and row["checkpoint_page_token"] is not None
    assert row["last_error"].startswith("Transient") and row["backfill_attempts"] == 3
    assert await pool.fetchval("SELECT count(*) FROM pgmq.a_inbox_backfill_jobs") == 1

    sandbox.clear_faults()
    assert await pool.fetchval("SELECT resume_inbox_backfill($1)", config) is not None
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    assert await status(pool, config) == "thread_sync"
    # Resumed from its checkpoint: the first page again only for the round of changes.
    assert sandbox.get_stats()["thread_pages"][grant]["<first>"] == 2
    assert await pool.fetchval("SELECT count(*) FROM queued_threads") == 300
