"""nova.completion: progress lines, verified completion, recovery, and catch-up backfills."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from synchelp import ROOT, add_inbox, env, make_sandbox, running, settings, start_backfill, wait_for

from nova.backfill import BackfillProcessor
from nova.completion import CompletionMonitor, progress_line
from nova.providers.nylas import NylasProvider
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.webhooks import WebhookProcessor

CONFIG = uuid.UUID("12345678-aaaa-bbbb-cccc-000000000000")


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(20, thread_bodies=False) as sb:  # every thread gets a sync job
        yield sb


def progress(**kw: Any) -> dict[str, Any]:
    base = {"config_id": CONFIG, "backfill_status": "thread_sync", "discovery_complete": True,
            "threads_discovered": 200, "threads_queued": 200, "threads_completed": 150,
            "threads_failed": 0, "percent_complete": 75}
    return {**base, **kw}


def test_progress_line_is_the_seed_line() -> None:
    assert progress_line(progress()) == \
        "[Monitor] Config 12345678... | Status: thread_sync | Progress: 75% (150/200)"
    assert progress_line(progress(threads_completed=147, threads_failed=3)) == \
        "[Monitor] Config 12345678... | Status: thread_sync | Progress: 75% (150/200, 3 failed)"
    assert "Progress: 99% (1,999/2,000)" in progress_line(progress(
        threads_completed=1999, threads_queued=2000, percent_complete=99.95))


def test_progress_line_never_shows_a_percentage_of_an_unknown_total() -> None:
    line = progress_line(progress(backfill_status="discovering", discovery_complete=False,
                                  threads_discovered=1200, threads_completed=800,
                                  percent_complete=None))
    assert line.endswith("Status: discovering | Progress: discovering (1,200 threads found, "
                         "800 synced)")
    assert "%" not in line
    assert "waiting for discovery" in progress_line(progress(
        backfill_status="queued", discovery_complete=False, percent_complete=None))


async def synced(pool: asyncpg.Pool, db_url: str, sb: SandboxNylas) -> tuple[uuid.UUID, uuid.UUID]:
    """A completed full backfill of the sandbox mailbox."""
    inbox = await add_inbox(pool, sb.grant_ids[0])
    config = await start_backfill(pool, inbox)
    async with running(db_url, settings(sb)):
        await wait_for(lambda: pool.fetchval(
            "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
            " WHERE id = $1", config), 30, what="completion")
    return inbox, config


async def test_premature_completion_is_repaired_and_logged(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas,
        caplog: pytest.LogCaptureFixture) -> None:
    inbox, config = await synced(pool, db_url, sandbox)
    # Something (an old trigger, a manual UPDATE) completed it while threads still wait.
    await pool.execute("UPDATE queued_threads SET status = 'queued', queue_msg_id = NULL"
                       " WHERE id IN (SELECT id FROM queued_threads ORDER BY id LIMIT 2)")
    monitor = CompletionMonitor(settings(sandbox), pool=pool)
    caplog.set_level(logging.INFO)
    repairs = await monitor.recover()
    assert [(r["config_id"], r["threads_open"]) for r in repairs.premature] == [(config, 2)]
    assert len(repairs.threads) == 2  # and their lost jobs are queued again
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert row["backfill_status"] == "thread_sync" and row["backfill_completed_at"] is None
    assert await pool.fetchval(
        "SELECT sync_completed_at FROM inbox_sync_stats WHERE config_id = $1", config) is None
    assert f"premature completion repaired config={config} open_threads=2" in caplog.text
    assert (await monitor.recover()).premature == []  # once

    async with running(db_url, settings(sandbox), backfill=0, threads=1):
        await wait_for(lambda: pool.fetchval(
            "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
            " WHERE id = $1", config), 30, what="completion again")


async def test_completion_is_verified_against_the_rows(pool: asyncpg.Pool, db_url: str,
                                                       sandbox: SandboxNylas) -> None:
    inbox = await add_inbox(pool, sandbox.grant_ids[0])
    config = await start_backfill(pool, inbox)
    s = settings(sandbox)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    # Counters that lie: every thread "completed" while the rows are all still queued.
    await pool.execute("UPDATE inbox_sync_stats SET threads_completed = threads_queued,"
                       " threads_pending = 0 WHERE config_id = $1", config)
    monitor = CompletionMonitor(s, pool=pool)
    assert await monitor.check() == []
    p = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    assert p["backfill_status"] == "thread_sync"
    assert (p["threads_completed"], p["threads_pending"]) == (0, 20)  # re-derived


async def test_counters_that_drifted_low_do_not_block_completion(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    inbox, config = await synced(pool, db_url, sandbox)
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync',"
                       " backfill_completed_at = NULL WHERE id = $1", config)
    await pool.execute("UPDATE inbox_sync_stats SET threads_completed = 5,"
                       " threads_pending = 15 WHERE config_id = $1", config)
    monitor = CompletionMonitor(settings(sandbox), pool=pool)
    assert await monitor.check() == []  # the counters say 25%: no completion from them
    assert (await monitor.recover()).recounted == [config]
    p = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    assert p["backfill_status"] == "completed" and p["threads_completed"] == 20


async def test_stuck_threads_are_requeued(pool: asyncpg.Pool, db_url: str,
                                          sandbox: SandboxNylas) -> None:
    inbox = await add_inbox(pool, sandbox.grant_ids[0])
    await start_backfill(pool, inbox)
    s = settings(sandbox)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    ids = [r["id"] for r in await pool.fetch("SELECT id FROM queued_threads ORDER BY id")]
    # One lost its message; one is 'processing' long past the visibility timeout, its worker
    # gone; one is 'processing' but recent (a worker may hold it): left alone.
    await pool.execute("DELETE FROM pgmq.q_thread_sync_jobs WHERE msg_id IN (SELECT"
                       " queue_msg_id FROM queued_threads WHERE id = ANY($1::bigint[]))",
                       ids[:3])
    await pool.execute("UPDATE queued_threads SET status = 'processing' WHERE id = $1", ids[1])
    await pool.execute("ALTER TABLE queued_threads DISABLE TRIGGER queued_threads_touch")
    await pool.execute("UPDATE queued_threads SET updated_at = now() - interval '1 hour'"
                       " WHERE id = $1", ids[1])
    await pool.execute("ALTER TABLE queued_threads ENABLE TRIGGER queued_threads_touch")
    await pool.execute("UPDATE queued_threads SET status = 'processing' WHERE id = $1", ids[2])
    repairs = await CompletionMonitor(s, pool=pool).recover()
    assert sorted((r["was"]) for r in repairs.threads) == ["processing", "queued"]
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM queued_threads")}
    assert rows[ids[0]]["status"] == rows[ids[1]]["status"] == "queued"
    assert rows[ids[2]]["status"] == "processing"
    live = {r["msg_id"] for r in await pool.fetch("SELECT msg_id FROM pgmq.q_thread_sync_jobs")}
    assert {rows[ids[0]]["queue_msg_id"], rows[ids[1]]["queue_msg_id"]} <= live


async def test_catchup_is_queued_on_grant_updated_after_grant_expired(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    inbox, config = await synced(pool, db_url, sandbox)
    grant = sandbox.grant_ids[0]
    expired_at = int(time.time()) + 1

    async def deliver(kind: str, when: int, **obj: object) -> None:
        await pool.execute(
            "SELECT queue_nylas_webhook_notification($1, $2, $3)", str(uuid.uuid4()), kind,
            {"type": kind, "time": when, "data": {"object": {"grant_id": grant, **obj}}})
        s = settings(sandbox)
        provider = NylasProvider("sync-test-key", sandbox.base_url)
        await Worker(WebhookProcessor(s, provider), s, pool=pool).run(burst=True)

    await deliver("grant.expired", expired_at)
    assert await pool.fetchval("SELECT status FROM flux_inboxes") == "auth_expired"
    await deliver("grant.updated", expired_at + 1)  # not a re-authentication: no change
    assert await pool.fetchval("SELECT status FROM flux_inboxes") == "auth_expired"
    await deliver("grant.updated", expired_at + 2, reauthentication_flag=True)
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert await pool.fetchval("SELECT status FROM flux_inboxes") == "active"
    assert (row["backfill_status"], row["backfill_kind"]) == ("queued", "catch_up")
    # From the last event Nova applied (the plain grant.updated), less the overlap.
    assert row["backfill_since"] == datetime.fromtimestamp(expired_at + 1 - 600, UTC)
    jobs = await pool.fetch("SELECT message FROM pgmq.q_inbox_backfill_jobs")
    assert [j["message"]["kind"] for j in jobs] == ["catch_up"]
    assert {r["status"] for r in await pool.fetch(
        "SELECT status FROM flux_webhook_notifications WHERE notification_type ="
        " 'grant.updated'")} == {"processed"}


async def test_catchup_resyncs_known_threads_that_changed(pool: asyncpg.Pool, db_url: str,
                                                          sandbox: SandboxNylas) -> None:
    inbox, config = await synced(pool, db_url, sandbox)
    grant = sandbox.grant_ids[0]
    old = sandbox.thread_ids(grant)[5]
    reply = sandbox.add_message(grant, thread_id=old, subject="late reply", send=False).message
    new = sandbox.add_message(grant, subject="brand new", send=False).message
    assert reply is not None and new is not None
    since = datetime.now(UTC) - timedelta(hours=1)
    catchup = await start_backfill(pool, inbox, kind="catch_up", since=since)
    assert catchup == config  # one configuration per inbox
    sandbox.reset_stats()
    async with running(db_url, settings(sandbox)):
        await wait_for(lambda: pool.fetchval(
            "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
            " WHERE id = $1", config), 30, what="catch-up completion")
    stored = {r["provider_message_id"] for r in await pool.fetch(
        "SELECT provider_message_id FROM flux_email_messages")}
    assert {reply["id"], new["id"]} <= stored
    # Only the two changed threads were fetched again.
    assert sandbox.get_stats()["requests"]["list_messages"] == 2
    # A backfill's work list is its own: the catch-up holds the two threads it listed.
    assert await pool.fetchval("SELECT count(*) FROM queued_threads") == 2


async def test_silent_inbox_gets_a_catchup(pool: asyncpg.Pool, db_url: str,
                                           sandbox: SandboxNylas) -> None:
    inbox, config = await synced(pool, db_url, sandbox)
    grant = sandbox.grant_ids[0]
    await pool.execute(
        "SELECT queue_nylas_webhook_notification('w1', 'message.created', '{}'::jsonb)")
    await pool.execute("UPDATE flux_webhook_notifications SET grant_id = $1,"
                       " received_at = now() - interval '3 hours'", grant)
    s = settings(sandbox, catchup_gap_seconds=3600, catchup_overlap_seconds=600)
    monitor = CompletionMonitor(s, pool=pool)
    assert (await monitor.recover()).catchups == []  # completed just now: not silent yet
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_completed_at ="
                       " now() - interval '2 hours'")
    [queued] = (await monitor.recover()).catchups
    row = await pool.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1", config)
    assert queued["config_id"] == config and row["backfill_kind"] == "catch_up"
    # From the last sign of life (the completion, 2 h ago) minus the 10 minute overlap.
    assert abs((datetime.now(UTC) - row["backfill_since"]).total_seconds() - 7800) < 60
    assert (await monitor.recover()).catchups == []  # running: not queued twice


def test_monitor_process_exits_zero_on_sigterm(db_url: str, tmp_path: Path) -> None:
    with make_sandbox(5) as sb:
        proc = subprocess.Popen([sys.executable, "-m", "nova.completion"],
                                env=env(db_url, sb, COMPLETION_CHECK_INTERVAL_MS="100"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            if b"[Monitor] started" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
