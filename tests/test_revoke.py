"""`revoked` needs the provider's word and can be undone: a grant the API answers 404 for is
asked again after NOVA_REVOKE_CONFIRM_SECONDS (one 404 changes nothing), and the operator's
`nova inbox reactivate` (or `nova inbox add` again) brings a revoked inbox back with a
catch-up that syncs what the revocation failed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from synchelp import (
    add_inbox,
    assert_db_equals_mailbox,
    discover,
    make_sandbox,
    settings,
)

from nova import cli
from nova.backfill import BackfillProcessor
from nova.completion import CompletionMonitor
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(8, thread_bodies=False) as sb:
        yield sb


async def sync_threads(pool: asyncpg.Pool, sb: SandboxNylas) -> None:
    """Thread sync until its queue is empty (a retried job comes back after its delay)."""
    s = settings(sb)
    while True:
        await Worker(ThreadSyncProcessor(s, retry_base_delay=0.02, retry_max_delay=0.05), s,
                     pool=pool).run(burst=True)
        if not await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs"):
            return
        await asyncio.sleep(0.05)


async def status(pool: asyncpg.Pool, inbox: uuid.UUID) -> str:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT status FROM flux_inboxes WHERE id = $1", inbox)


async def test_one_404_for_a_grant_that_exists_does_not_revoke_the_inbox(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    inbox, _ = await discover(pool, sandbox)
    gid = sandbox.grant_ids[0]
    sandbox.inject_fault("grant_not_found", 1, endpoint="list_messages", grant_id=gid)
    sandbox.reset_stats()
    await sync_threads(pool, sandbox)
    assert sandbox.get_stats()["faults"] == {"grant_not_found": 1}
    assert await status(pool, inbox) == "active"
    assert {r["status"] for r in await pool.fetch("SELECT status FROM queued_threads")} \
        == {"completed"}
    assert sandbox.get_stats()["by_grant"][gid]["get_grant"] == 1  # the second opinion


async def test_a_grant_gone_twice_revokes_the_inbox_and_reactivation_undoes_it(
        pool: asyncpg.Pool, sandbox: SandboxNylas, db_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    inbox, config = await discover(pool, sandbox)
    gid = sandbox.grant_ids[0]
    sandbox.delete_grant(gid, send=False)  # no webhook: only the API tells
    await sync_threads(pool, sandbox)
    assert await status(pool, inbox) == "revoked"
    failed = await pool.fetch("SELECT status, error_message FROM queued_threads")
    assert {r["status"] for r in failed} == {"failed"}
    monitor = CompletionMonitor(settings(sandbox), pool=pool)
    await monitor.check()  # the revoked inbox's backfill ends (every thread failed)
    assert await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                               " WHERE id = $1", config) == "completed"

    sandbox.mailbox.grants[gid].deleted = False  # the user connected the mailbox again
    assert cli.main(["--database-url", db_url, "inbox", "reactivate", str(inbox)]) == 0
    said = capsys.readouterr().err
    assert f"inbox {inbox} ({gid}@example.com) was revoked, active again; catch-up" in said
    assert await status(pool, inbox) == "active"
    # The threads the revocation failed are listed again: from the backfill's own start.
    row = await pool.fetchrow("SELECT backfill_status, backfill_since FROM"
                              " flux_inbox_configurations WHERE id = $1", config)
    assert row["backfill_status"] == "queued"
    s = settings(sandbox)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    await sync_threads(pool, sandbox)
    await monitor.check()
    assert await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                               " WHERE id = $1", config) == "completed"
    await assert_db_equals_mailbox(pool, sandbox, gid, inbox)


async def test_reactivating_while_the_backfill_runs_queues_its_failed_threads_again(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    inbox, config = await discover(pool, sandbox)
    await pool.execute("SELECT nova_set_inbox_status($1, 'revoked')", inbox)
    assert {r["status"] for r in await pool.fetch("SELECT status FROM queued_threads")} \
        == {"failed"}
    row = await pool.fetchrow("SELECT * FROM nova_reactivate_inbox($1)", inbox)
    assert (row["was"], row["status"], row["catchup_config_id"]) == ("revoked", "active", None)
    rows = await pool.fetch("SELECT status, queue_msg_id FROM queued_threads")
    assert {r["status"] for r in rows} == {"queued"} and all(r["queue_msg_id"] for r in rows)
    await sync_threads(pool, sandbox)
    await CompletionMonitor(settings(sandbox), pool=pool).check()
    assert await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                               " WHERE id = $1", config) == "completed"
    assert await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status = 'completed'"
                               ) == len(sandbox.thread_ids(sandbox.grant_ids[0]))


async def test_inbox_add_of_a_revoked_nylas_inbox_reactivates_it(
        pool: asyncpg.Pool, sandbox: SandboxNylas, db_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    await pool.execute("SELECT nova_set_inbox_status($1, 'revoked')", inbox)
    argv = ["--database-url", db_url, "inbox", "add", "--grant-id", gid, "--email", "a@x.com"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(inbox) and "was revoked, active again" in out.err
    assert await status(pool, inbox) == "active"
    assert await pool.fetchval("SELECT backfill_kind FROM flux_inbox_configurations"
                               " WHERE inbox_id = $1", inbox) == "catch_up"
    assert cli.main(argv) == 0  # again: nothing changes, nothing said
    assert capsys.readouterr().err == ""


def test_reactivate_names_what_it_cannot_find(db_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--database-url", db_url, "inbox", "reactivate", "nobody@x.com"]) == 1
    assert "no inbox 'nobody@x.com'" in capsys.readouterr().err
