"""Every state has a way out: each test puts a row where it used to get stuck and shows what
moves it on. Real Postgres, the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from synchelp import (
    add_inbox,
    assert_db_equals_mailbox,
    make_sandbox,
    running,
    settings,
    start_backfill,
    status,
    wait_for,
)

from nova.backfill import BackfillProcessor
from nova.runtime import Worker
from nova.threads import ThreadSyncProcessor


async def completed(pool: asyncpg.Pool, config: uuid.UUID) -> bool:
    return await status(pool, config) == "completed"


async def test_threads_parked_for_an_expired_inbox_fail_when_it_is_revoked(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(8, thread_bodies=False) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        await pool.execute("UPDATE flux_inboxes SET status = 'auth_expired' WHERE id = $1",
                           inbox)
        await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
        assert await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status = 'queued'"
                                   " AND queue_msg_id IS NULL") == 8  # parked
        await pool.execute("UPDATE flux_inboxes SET status = 'revoked' WHERE id = $1", inbox)
        rows = await pool.fetch("SELECT status, error_message FROM queued_threads")
        assert {r["status"] for r in rows} == {"failed"}
        assert all("revoked" in r["error_message"] for r in rows)
        async with running(db_url, s, backfill=0, threads=0):
            await wait_for(lambda: completed(pool, config), 20, what="completion")


async def test_an_expired_page_token_restarts_the_listing_instead_of_failing(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(450) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        # Discovery saved page 1 and stopped (a crash); its cursor expired meanwhile.
        await pool.execute(
            "UPDATE flux_inbox_configurations SET backfill_status = 'discovering',"
            " checkpoint_pages_done = 1, checkpoint_page_token = $2 WHERE id = $1", config,
            await sb_first_cursor(sb, grant))
        sb.expire_cursors()
        s = settings(sb)
        stats = await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        assert stats.archived == 0 and stats.processed == 1
        assert await status(pool, config) == "thread_sync"
        assert await pool.fetchval("SELECT count(*) FROM queued_threads") == 450
        async with running(db_url, s, backfill=0, threads=2):
            await wait_for(lambda: completed(pool, config), 60, what="completion")
        await assert_db_equals_mailbox(pool, sb, grant, inbox)


async def sb_first_cursor(sb: object, grant: str) -> str:
    import httpx

    async with httpx.AsyncClient() as client:
        r = await client.get(f"{sb.base_url}/v3/grants/{grant}/threads",  # type: ignore
                             params={"limit": 200},
                             headers={"Authorization": f"Bearer {sb.api_key}"})  # type: ignore
    token = r.json()["next_cursor"]
    assert token
    return str(token)


async def test_replaying_a_dead_lettered_backfill_job_runs_it(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(30) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        sb.inject_fault("error_5xx", 1000, endpoint="list_threads")
        s = settings(sb)
        worker = Worker(BackfillProcessor(s, retry_base_delay=0.01, retry_max_delay=0.02), s,
                        pool=pool)
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: pool.fetchval("SELECT count(*) = 1 FROM"
                                             " pgmq.a_inbox_backfill_jobs"), 30, what="archived")
        worker.stop()
        await task
        assert await status(pool, config) == "failed"
        [dead] = await pool.fetch("SELECT msg_id FROM pgmq.a_inbox_backfill_jobs")
        sb.clear_faults()
        new = await pool.fetchval("SELECT nova_replay_dead_letter('inbox_backfill_jobs', $1)",
                                  dead["msg_id"])
        assert new is not None and await status(pool, config) == "queued"
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        assert await status(pool, config) == "thread_sync"


async def test_a_new_full_backfill_resyncs_known_threads_and_counts_only_its_own(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(20, thread_bodies=False) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        async with running(db_url, s, threads=2):
            await wait_for(lambda: completed(pool, config), 30, what="first backfill")
            sb.reset_stats()
            again = await start_backfill(pool, inbox)
            assert again == config  # one configuration per inbox
            await wait_for(lambda: completed(pool, config), 30, what="second backfill")
        p = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
        assert (p["threads_queued"], p["threads_completed"]) == (20, 20)
        assert sb.get_stats()["requests"]["list_messages"] == 20  # every known thread again


async def test_replay_never_gives_a_thread_with_a_live_job_a_second_one(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(3, thread_bodies=False) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        row = await pool.fetchrow("SELECT * FROM queued_threads ORDER BY id LIMIT 1")
        # An old dead letter of this thread (an earlier attempt chain), while it has a live job.
        await pool.execute(
            "INSERT INTO pgmq.a_thread_sync_jobs (msg_id, read_ct, enqueued_at, archived_at, vt,"
            " message) VALUES (999999, 6, now(), now(), now(), $1)",
            {"queued_thread_id": row["id"], "config_id": str(config),
             "thread_id": row["provider_thread_id"]})
        assert await pool.fetchval(
            "SELECT nova_replay_dead_letter('thread_sync_jobs', 999999)") is None
        assert await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs") == 3
        assert await pool.fetchval("SELECT queue_msg_id FROM queued_threads WHERE id = $1",
                                   row["id"]) == row["queue_msg_id"]


async def test_a_sync_whose_thread_was_requeued_under_it_commits_nothing(
        pool: asyncpg.Pool, db_url: str) -> None:
    """START and COMPLETE belong to the job the row names: a recovery or a round of changes
    that re-queues a thread mid-sync leaves one live sync, the newer one."""
    with make_sandbox(1, thread_bodies=False) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        [row] = await pool.fetch("SELECT * FROM queued_threads")
        sb.set_latency(500)
        worker = Worker(ThreadSyncProcessor(s), s, pool=pool)
        task = asyncio.create_task(worker.run(burst=True))
        await wait_for(lambda: pool.fetchval("SELECT status = 'processing' FROM queued_threads"),
                       10, interval=0.01, what="sync started")
        newer = await pool.fetchval("SELECT queue_thread_sync($1, $2)", config,
                                    row["provider_thread_id"])
        await task
        after = await pool.fetchrow("SELECT * FROM queued_threads")
        # The older job ended without completing the row; the newer one then synced it.
        assert after["queue_msg_id"] == newer and after["status"] == "completed"
        assert worker.stats.processed == 2


async def test_an_expired_inbox_whose_reauthentication_webhook_was_lost_comes_back(
        pool: asyncpg.Pool, db_url: str) -> None:
    from nova.completion import CompletionMonitor

    with make_sandbox(6, thread_bodies=False) as sb:  # no receiver: webhooks go nowhere
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        sb.expire_grant(grant)
        await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
        assert await pool.fetchval("SELECT status FROM flux_inboxes") == "auth_expired"
        monitor = CompletionMonitor(s, pool=pool)
        assert (await monitor.recover()).grants == []  # checked only after a while
        await pool.execute("UPDATE flux_inboxes SET status_changed_at = now() - interval"
                           " '10 minutes'")
        assert (await monitor.recover()).grants == [(inbox, "auth_expired")]  # still expired
        sb.revive_grant(grant)  # re-authenticated; its grant.updated is lost
        await pool.execute("UPDATE flux_inboxes SET status_changed_at = now() - interval"
                           " '10 minutes'")
        assert (await monitor.recover()).grants == [(inbox, "active")]
        # The parked threads run again and the backfill completes.
        async with running(db_url, s, backfill=0, threads=1):
            await wait_for(lambda: completed(pool, config), 30, what="completion")
        await assert_db_equals_mailbox(pool, sb, grant, inbox)


async def test_a_failed_backfill_is_resumed_by_the_monitor_a_bounded_number_of_times(
        pool: asyncpg.Pool, db_url: str) -> None:
    from nova.completion import CompletionMonitor

    with make_sandbox(30) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed',"
                           " last_error = 'Transient: provider down', updated_at = now()"
                           " - interval '2 minutes' WHERE id = $1", config)
        s = settings(sb, backfill_resume_seconds=60, backfill_max_resumes=2)
        monitor = CompletionMonitor(s, pool=pool)
        assert [r["config_id"] for r in (await monitor.recover()).resumed] == [config]
        assert await status(pool, config) == "queued"
        # It failed again at once: resumed a second time, then left failed.
        for expected in ([config], []):
            await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed',"
                               " updated_at = now() - interval '2 minutes' WHERE id = $1",
                               config)
            assert [r["config_id"] for r in (await monitor.recover()).resumed] == expected
        assert await status(pool, config) == "failed"
        # One an operator cancelled is never resumed; a new backfill starts the count again.
        await pool.execute("UPDATE flux_inbox_configurations SET auto_resumes = 0,"
                           " last_error = 'cancelled by an operator' WHERE id = $1", config)
        assert (await monitor.recover()).resumed == []
        await pool.execute("UPDATE flux_inbox_configurations SET last_error = 'x' WHERE id = $1",
                           config)
        async with running(db_url, s, threads=2, monitor=False):
            assert len((await monitor.recover()).resumed) == 1
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'thread_sync' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 30, what="discovery after the resume")
