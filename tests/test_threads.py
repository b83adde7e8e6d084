"""nova.threads: one thread per job, bounded retries, inactive inboxes, missing grants."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from synchelp import (
    discover,
    env,
    make_sandbox,
    running,
    settings,
    spawn,
    stop,
    wait_for,
)

from nova.completion import CompletionMonitor
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    # Thread listings without bodies: every thread gets a sync job (the mechanics tested here).
    with make_sandbox(12, thread_bodies=False) as sb:
        yield sb


def fast_worker(pool: asyncpg.Pool, sb: SandboxNylas, **kw: Any) -> Worker:
    s = settings(sb, **kw)
    return Worker(ThreadSyncProcessor(s, retry_base_delay=0.02, retry_max_delay=0.05), s,
                  pool=pool)


async def thread_rows(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    return {r["provider_thread_id"]: r for r in await pool.fetch("SELECT * FROM queued_threads")}


async def test_a_thread_that_always_fails_ends_failed_and_the_backfill_completes(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    bad = sandbox.thread_ids(sandbox.grant_ids[0])[3]
    # Faults target a grant: route this one thread through another sandbox grant whose every
    # messages list answers 500, so it fails on each of its attempts and no other thread does.
    other = sandbox.grant_ids[1]
    await pool.execute("UPDATE queued_threads SET grant_id = $1 WHERE provider_thread_id = $2",
                       other, bad)
    sandbox.inject_fault("error_5xx", 1000, endpoint="list_messages", grant_id=other)
    async with running(db_url, settings(sandbox), backfill=0, threads=2,
                       thread_kw={"retry_base_delay": 0.02, "retry_max_delay": 0.05}):
        await wait_for(lambda: pool.fetchval(
            "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
            " WHERE id = $1", config), 30, what="completion")
    rows = await thread_rows(pool)
    assert rows[bad]["status"] == "failed" and rows[bad]["attempts"] == 5
    assert rows[bad]["error_message"].startswith("Transient") and rows[bad]["processed_at"]
    assert all(r["status"] == "completed" for t, r in rows.items() if t != bad)
    p = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    assert (p["threads_completed"], p["threads_failed"], p["percent_complete"]) == (11, 1, 100)
    archived = await pool.fetch("SELECT message FROM pgmq.a_thread_sync_jobs")
    assert [a["message"]["thread_id"] for a in archived] == [bad]
    assert sandbox.get_stats()["by_grant"][other]["list_messages"] == 5


async def test_inactive_inbox_makes_no_api_call_and_threads_wait_for_it(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    await pool.execute("UPDATE flux_inboxes SET status = 'auth_expired' WHERE id = $1", inbox)
    sandbox.reset_stats()
    await fast_worker(pool, sandbox).run(burst=True)
    assert sandbox.get_stats()["requests"] == {}
    rows = await thread_rows(pool)
    assert {r["status"] for r in rows.values()} == {"queued"}
    assert all(r["queue_msg_id"] is None and "auth_expired" in r["error_message"]
               for r in rows.values())
    monitor = CompletionMonitor(settings(sandbox), pool=pool)
    assert (await monitor.recover()).threads == []  # not while the inbox is expired
    await pool.execute("UPDATE flux_inboxes SET status = 'active' WHERE id = $1", inbox)
    assert len((await monitor.recover()).threads) == 12
    await fast_worker(pool, sandbox).run(burst=True)
    await monitor.check()
    assert await pool.fetchval(
        "SELECT backfill_status FROM flux_inbox_configurations WHERE id = $1", config) \
        == "completed"


async def test_revoked_inbox_fails_its_threads_without_api_calls(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    await pool.execute("UPDATE flux_inboxes SET status = 'revoked' WHERE id = $1", inbox)
    sandbox.reset_stats()
    await fast_worker(pool, sandbox).run(burst=True)
    assert sandbox.get_stats()["requests"] == {}
    rows = await thread_rows(pool)
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert all("revoked" in r["error_message"] for r in rows.values())


async def test_missing_grant_is_resolved_from_the_inbox(pool: asyncpg.Pool,
                                                        sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    await pool.execute("UPDATE queued_threads SET grant_id = NULL")
    await pool.execute("DELETE FROM pgmq.q_thread_sync_jobs")
    tid = sandbox.thread_ids(sandbox.grant_ids[0])[0]
    msg_id = await pool.fetchval("SELECT queue_thread_sync($1, $2)", config, tid)
    message = await pool.fetchval(
        "SELECT message FROM pgmq.q_thread_sync_jobs WHERE msg_id = $1", msg_id)
    assert message["grant_id"] is None
    stats = await fast_worker(pool, sandbox).run(burst=True)
    assert stats.processed == 1
    row = (await thread_rows(pool))[tid]
    assert row["status"] == "completed" and row["grant_id"] == sandbox.grant_ids[0]
    assert row["attempts"] == 1 and row["started_at"] and row["message_count"] > 0
    assert await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE provider_thread_id = $1", tid) \
        == row["message_count"]


async def test_thread_deleted_at_the_provider_completes_empty(pool: asyncpg.Pool,
                                                              sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    grant = sandbox.grant_ids[0]
    tid = sandbox.thread_ids(grant)[0]
    thread = sandbox.thread_json(grant, tid)
    assert thread is not None
    for mid in thread["message_ids"]:
        sandbox.delete_message(grant, mid, send=False)
    await fast_worker(pool, sandbox).run(burst=True)
    row = (await thread_rows(pool))[tid]
    assert row["status"] == "completed" and row["message_count"] == 0
    assert "no longer exists" in row["error_message"]


async def test_the_last_thread_completes_its_backfill_without_the_monitor(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    """Completion does not wait for the monitor's poll: the commit of the backfill's last
    thread marks it completed (the monitor stays the safety net)."""
    inbox, config = await discover(pool, sandbox)
    assert await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                               " WHERE id = $1", config) == "thread_sync"
    await fast_worker(pool, sandbox).run(burst=True)  # no CompletionMonitor anywhere
    row = await pool.fetchrow("SELECT backfill_status, backfill_completed_at FROM"
                              " flux_inbox_configurations WHERE id = $1", config)
    assert row["backfill_status"] == "completed" and row["backfill_completed_at"] is not None


async def test_a_thread_is_versioned_after_its_wait_for_the_budget(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    """The sync version is the moment the request left, not the moment the job began: a
    grant held by its budget for 3 s makes a sync whose rows are versioned after the hold, so
    an event of the held seconds cannot overwrite what the sync read."""
    from nova.store import VERSION_SKEW_SECONDS

    inbox, _ = await discover(pool, sandbox)
    tid = sandbox.thread_ids(sandbox.grant_ids[0])[0]
    await pool.execute("DELETE FROM pgmq.q_thread_sync_jobs WHERE message->>'thread_id' <> $1",
                       tid)
    until = await pool.fetchval("SELECT now() + interval '3 seconds'")
    await pool.execute("SELECT hold_provider_grant($1, $2)", sandbox.grant_ids[0], until)
    # Patient enough to wait the hold out in its slot (with less, the job is deferred).
    await fast_worker(pool, sandbox, budget_patience_seconds=10).run(burst=True)
    versions = await pool.fetch(
        "SELECT provider_updated_at FROM flux_email_messages WHERE inbox_id = $1"
        " AND provider_thread_id = $2", inbox, tid)
    assert versions
    earliest = until - timedelta(seconds=VERSION_SKEW_SECONDS + 1)  # whole seconds, less skew
    assert all(v["provider_updated_at"] >= earliest for v in versions), (versions, until)


@pytest.mark.parametrize("nice", ["7", "0"])
def test_the_thread_process_yields_the_cpu_at_its_nice_value(
        db_url: str, tmp_path: Path, nice: str) -> None:
    """python -m nova.threads runs at NOVA_THREADS_NICE (bulk work: the webhook intake goes
    first when the CPU is short); 0 leaves the priority it was started with."""
    with make_sandbox(1) as sb:
        log = tmp_path / "threads.log"
        proc = spawn("nova.threads", env(db_url, sb, NOVA_THREADS_NICE=nice), log)
        try:
            for _ in range(200):
                if "] started queue=" in log.read_text(errors="replace"):
                    break
                assert proc.poll() is None, log.read_text(errors="replace")
                time.sleep(0.05)
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            assert int(fields[16]) == int(nice) + os.nice(0)  # field 19 of stat: nice
        finally:
            stop(proc)
    assert ("CPU priority: nice" in log.read_text(errors="replace")) == (nice != "0")
