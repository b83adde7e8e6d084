"""nova.attachments against the sandbox over HTTP: synced attachments end on disk with their
path, bytes, checksum and text; queueing in the storing transaction; concurrent consumers;
retries then failed; stuck and lost jobs; the Missive downloader's SQL; settings."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import asyncpg
import pytest
from attachhelp import (
    att_settings,
    downloads,
    drain,
    exists,
    janitor,
    part_files,
    rows,
    sha256,
    store_message,
    sync_mailbox,
)
from synchelp import add_inbox, env, make_sandbox, spawn, stop, wait_for

from nova import db, store
from nova.attachments import AttachmentProcessor
from nova.providers.nylas import parse_message
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.sandbox.nylas.blobs import random_chunks


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(25) as sb:
        yield sb


async def test_a_synced_mailbox_lands_on_disk_with_path_bytes_checksum_and_text(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    stored = await rows(pool)
    assert len(stored) >= 8 and {r["status"] for r in stored} == {"pending"}
    budget = "SELECT requests FROM provider_rate_limits WHERE grant_id = $1"
    before = await pool.fetchval(budget, sandbox.grant_ids[0])
    s = att_settings(sandbox, tmp_path)
    await drain(pool, s)
    # Every download took a slot of the grant's shared budget.
    assert await pool.fetchval(budget, sandbox.grant_ids[0]) - before == len(stored)
    root = (tmp_path / "nas").resolve()
    kinds = set()
    for r in await rows(pool):
        gid, aid, mid = r["grant_id"], r["provider_attachment_id"], r["provider_message_id"]
        data = sandbox.attachment_bytes(gid, aid, mid)
        month = f"{r['sent_at'].astimezone(UTC):%Y-%m}"
        assert r["status"] == "completed", r["error_message"]
        assert r["local_path"] == f"{month}/{r['local_filename']}"
        stem, ext = r["original_filename"].rsplit(".", 1)
        assert r["local_filename"] == f"{stem}_{r['id']}.{ext}"
        path = root / month / r["local_filename"]
        assert path.read_bytes() == data
        assert (r["checksum"], r["size"]) == (sha256(data), len(data))
        assert r["downloaded_at"] is not None and r["retry_count"] == 0
        rec = sandbox.mailbox.attachment(gid, aid, mid)
        assert rec is not None
        kinds.add(rec.kind)
        if rec.kind == "pdf":
            assert r["extracted_text"] is not None and r["skipped_reason"] is None
            assert all(line in r["extracted_text"] for line in rec.text), r["extracted_text"]
            assert r["metadata"]["pages"] >= 1 and r["metadata"]["processed_in"] == "file"
        elif rec.kind == "text":
            charset = "iso-8859-1" if "ISO-8859-1" in r["content_type"] else "utf-8"
            assert r["extracted_text"] == data.decode(charset)
        else:
            assert r["extracted_text"] is None and r["skipped_reason"] == "unsupported_type"
    assert {"pdf", "text"} <= kinds
    assert downloads(sandbox) == len(stored)  # each fetched once
    assert part_files(root) == []
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads") == 0


async def test_a_row_is_queued_by_the_transaction_that_stores_it_and_only_once(
        pool: asyncpg.Pool, sandbox: SandboxNylas) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    created = sandbox.add_message(gid, send=False, attachments=[
        ("a.txt", "text/plain", b"one"), ("b.txt", "text/plain", b"two")])
    assert created.message is not None
    message = parse_message(created.message, gid)
    queued = "SELECT count(*) FROM pgmq.q_attachment_downloads"
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await store.upsert_message(conn, inbox, message, store.sync_version())
        assert await conn.fetchval(queued) == 2  # inside the transaction
        await tx.rollback()
    assert await pool.fetchval(queued) == 0
    assert await pool.fetchval("SELECT count(*) FROM flux_email_attachments") == 0
    for _ in range(3):  # stored again (a webhook repeating the message): no second job
        async with pool.acquire() as conn, conn.transaction():
            await store.upsert_message(conn, inbox, message, store.sync_version())
    jobs = await pool.fetch("SELECT message FROM pgmq.q_attachment_downloads")
    ids = {str(r["id"]) for r in await pool.fetch("SELECT id FROM flux_email_attachments")}
    assert len(jobs) == 2 and {j["message"]["attachment_id"] for j in jobs} == ids


async def test_concurrent_consumers_download_each_attachment_once(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    with make_sandbox(40) as sb:
        await sync_mailbox(pool, sb)
        total = await pool.fetchval("SELECT count(*) FROM flux_email_attachments")
        # A second job for every row, as a reset racing a live job would make.
        await pool.execute("SELECT pgmq.send('attachment_downloads', message)"
                           " FROM pgmq.q_attachment_downloads")
        s = att_settings(sb, tmp_path, batch_size=4)
        pools = [await db.create_pool(db_url, min_size=1, max_size=6) for _ in range(4)]
        try:
            workers = [Worker(AttachmentProcessor(s), s, pool=p) for p in pools]
            await asyncio.gather(*(w.run(burst=True) for w in workers))
        finally:
            for p in pools:
                await p.close()
        assert sum(w.stats.processed for w in workers) == 2 * total
        stored = await rows(pool)
        assert [r["status"] for r in stored] == ["completed"] * total
        assert downloads(sb) == total
        for r in stored:
            data = sb.attachment_bytes(r["grant_id"], r["provider_attachment_id"],
                                       r["provider_message_id"])
            assert (tmp_path / "nas" / r["local_path"]).read_bytes() == data
        assert part_files(tmp_path) == []


async def test_transient_failures_are_retried_and_end_failed_after_max_retries(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    flaky = sandbox.add_message(gid, send=False, attachments=[("f.txt", "text/plain", b"f")])
    assert flaky.message is not None
    await store_message(pool, sandbox, inbox, flaky.message["id"])
    sandbox.inject_fault("error_5xx", 2, endpoint="download_attachment")
    s = att_settings(sandbox, tmp_path, max_retries=3)
    await drain(pool, s)
    (row,) = await rows(pool)
    assert (row["status"], row["retry_count"], row["error_message"]) == ("completed", 2, None)
    assert downloads(sandbox) == 3

    broken = sandbox.add_message(gid, send=False, attachments=[("b.txt", "text/plain", b"b")])
    assert broken.message is not None
    await store_message(pool, sandbox, inbox, broken.message["id"])
    sandbox.inject_fault("error_5xx", 1000, endpoint="download_attachment")
    await drain(pool, s)
    row = next(r for r in await rows(pool) if r["original_filename"] == "b.txt")
    assert (row["status"], row["retry_count"]) == ("failed", 3)
    assert row["error_message"].startswith("Transient")
    assert downloads(sandbox) == 6
    archived = await pool.fetch("SELECT message FROM pgmq.a_attachment_downloads")
    assert [a["message"]["attachment_id"] for a in archived] == [str(row["id"])]
    assert not (tmp_path / "nas").exists() or part_files(tmp_path / "nas") == []


async def test_a_missing_attachment_fails_at_once(pool: asyncpg.Pool, sandbox: SandboxNylas,
                                                  tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    victim = (await rows(pool))[0]
    await pool.execute("UPDATE flux_email_attachments SET provider_attachment_id = 'gone'"
                       " WHERE id = $1", victim["id"])
    await drain(pool, att_settings(sandbox, tmp_path))
    row = next(r for r in await rows(pool) if r["id"] == victim["id"])
    assert (row["status"], row["retry_count"]) == ("failed", 1)
    assert "not found at the provider" in row["error_message"]


async def test_stuck_downloads_and_lost_jobs_are_queued_again(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    stored = await rows(pool)
    stuck, fresh = stored[0]["id"], stored[1]["id"]
    await pool.execute("DELETE FROM pgmq.q_attachment_downloads")  # every job lost
    # One download whose consumer died half an hour ago, one that is still moving.
    await pool.execute("UPDATE flux_email_attachments SET status = 'downloading',"
                       " claim_msg_id = 424242, updated_at = now() - interval '31 minutes'"
                       " WHERE id = $1", stuck)
    await pool.execute("UPDATE flux_email_attachments SET status = 'downloading',"
                       " claim_msg_id = 434343, updated_at = now() - interval '5 minutes'"
                       " WHERE id = $1", fresh)
    s = att_settings(sandbox, tmp_path)
    sweep = await janitor(pool, s).sweep()
    assert [r["attachment_id"] for r in sweep.stuck] == [stuck]
    requeued = {r["attachment_id"] for r in sweep.requeued}
    assert requeued == {r["id"] for r in stored} - {stuck, fresh}
    jobs = {uuid.UUID(j["message"]["attachment_id"]) for j in await pool.fetch(
        "SELECT message FROM pgmq.q_attachment_downloads")}
    assert jobs == {r["id"] for r in stored} - {fresh}  # the stuck row got its job back
    again = await janitor(pool, s).sweep()
    assert again.stuck == [] and again.requeued == []  # nothing queued twice
    await drain(pool, s)
    status = {r["id"]: r["status"] for r in await rows(pool)}
    assert status.pop(fresh) == "downloading"  # its live download is left alone
    assert set(status.values()) == {"completed"}


async def test_the_missive_statements_run_unchanged_on_email_attachment_files(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    total = await pool.fetchval("SELECT count(*) FROM flux_email_attachments")
    # Check pending downloads
    assert await pool.fetchval(
        "SELECT COUNT(*) FROM email_attachment_files WHERE status = 'pending';") == total
    sandbox.inject_fault("error_5xx", 10_000, endpoint="download_attachment")
    s = att_settings(sandbox, tmp_path, max_retries=2)
    await drain(pool, s)
    # Check failed downloads
    failed = await pool.fetch("SELECT * FROM email_attachment_files WHERE status = 'failed';")
    assert len(failed) == total and all(f["retry_count"] == 2 for f in failed)
    assert {"missive_attachment_id", "missive_message_id", "original_filename", "original_url",
            "status", "local_filename", "downloaded_at"} <= set(failed[0].keys())
    # Reset failed downloads: every row gets a job again, and completes.
    sandbox.clear_faults()
    await pool.execute("""
UPDATE email_attachment_files
SET status = 'pending', retry_count = 0, error_message = NULL
WHERE status = 'failed';""")
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads") == total
    await drain(pool, s)
    done = await pool.fetch("SELECT * FROM email_attachment_files WHERE status = 'completed'")
    assert len(done) == total
    # Downloads stuck in "downloading": the manual reset, as the seed writes it.
    victim = done[0]["missive_attachment_id"]
    await pool.execute("UPDATE flux_email_attachments SET status = 'downloading',"
                       " updated_at = now() - interval '1 hour' WHERE id = $1", victim)
    result = await pool.execute("""
UPDATE email_attachment_files
SET status = 'pending', updated_at = NOW()
WHERE status = 'downloading' AND updated_at < NOW() - INTERVAL '30 minutes';""")
    assert result == "UPDATE 1"
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads") == 1
    # FileMetadataSync's lookup by file name.
    name = done[1]["local_filename"]
    found = await pool.fetch(
        f"SELECT * FROM email_attachment_files WHERE local_filename = '{name}'")
    assert [f["missive_attachment_id"] for f in found] == [done[1]["missive_attachment_id"]]
    assert (tmp_path / "nas" / found[0]["local_path"]).is_file()


async def test_a_file_already_on_disk_with_its_checksum_is_not_downloaded_again(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    s = att_settings(sandbox, tmp_path)
    await drain(pool, s)
    first = await rows(pool)
    fetched = downloads(sandbox)
    damaged = first[0]
    (tmp_path / "nas" / damaged["local_path"]).write_bytes(b"not the attachment")
    await pool.execute("UPDATE flux_email_attachments SET status = 'pending'")  # re-run all
    await drain(pool, s)
    assert downloads(sandbox) == fetched + 1  # only the damaged file is fetched again
    after = {r["id"]: r for r in await rows(pool)}
    for r in first:
        assert after[r["id"]]["status"] == "completed"
        assert after[r["id"]]["checksum"] == r["checksum"]
        assert sha256((tmp_path / "nas" / r["local_path"]).read_bytes()) == r["checksum"]
        assert after[r["id"]]["extracted_text"] == r["extracted_text"]


async def test_settings_skip_without_a_request_and_a_requeue_downloads_later(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    created = sandbox.add_message(gid, send=False, attachments=[
        ("small.txt", "text/plain", b"small"), ("large.txt", "text/plain", b"L" * 5000)])
    assert created.message is not None
    await store_message(pool, sandbox, inbox, created.message["id"])
    await pool.execute("UPDATE flux_email_attachments SET is_inline = true,"
                       " content_id = 'logo@x' WHERE original_filename = 'small.txt'")

    await drain(pool, att_settings(sandbox, tmp_path, attachment_downloads=False))
    assert {(r["status"], r["skipped_reason"]) for r in await rows(pool)} == {
        ("skipped", "downloads_disabled")}
    await pool.execute("UPDATE flux_email_attachments SET status = 'pending',"
                       " skipped_reason = NULL WHERE status = 'skipped'")
    await drain(pool, att_settings(sandbox, tmp_path, attachment_include_inline=False,
                                   attachment_max_bytes=1000))
    got = {r["original_filename"]: (r["status"], r["skipped_reason"]) for r in await rows(pool)}
    assert got == {"small.txt": ("skipped", "inline"), "large.txt": ("skipped", "over_size_cap")}
    assert downloads(sandbox) == 0
    await pool.execute("UPDATE flux_email_attachments SET status = 'pending',"
                       " skipped_reason = NULL WHERE status = 'skipped'")
    await drain(pool, att_settings(sandbox, tmp_path))
    assert {r["status"] for r in await rows(pool)} == {"completed"}
    assert downloads(sandbox) == 2


async def test_a_size_cap_is_enforced_while_streaming_when_the_size_is_not_announced(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    created = sandbox.add_message(gid, send=False,
                                  generated=[("big.bin", "application/octet-stream", 3_000_000)])
    assert created.message is not None
    await store_message(pool, sandbox, inbox, created.message["id"])
    await pool.execute("UPDATE flux_email_attachments SET size = NULL")
    await drain(pool, att_settings(sandbox, tmp_path, attachment_max_bytes=1_000_000))
    (row,) = await rows(pool)
    assert (row["status"], row["skipped_reason"]) == ("skipped", "over_size_cap")
    assert downloads(sandbox) == 1
    assert [p for p in (tmp_path / "nas").rglob("*") if p.is_file()] == []


async def test_an_inactive_inbox_makes_no_request_and_its_downloads_wait_for_it(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    inbox = await sync_mailbox(pool, sandbox)
    total = await pool.fetchval("SELECT count(*) FROM flux_email_attachments")
    await pool.execute("UPDATE flux_inboxes SET status = 'auth_expired' WHERE id = $1", inbox)
    s = att_settings(sandbox, tmp_path)
    await drain(pool, s)
    assert downloads(sandbox) == 0
    waiting = await rows(pool)
    assert {r["status"] for r in waiting} == {"pending"}
    assert all(r["error_message"].startswith("waiting: inbox is auth_expired") for r in waiting)
    assert (await janitor(pool, s).sweep()).requeued == []  # not while the inbox is expired
    await pool.execute("UPDATE flux_inboxes SET status = 'active' WHERE id = $1", inbox)
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads") == total
    await drain(pool, s)
    assert {r["status"] for r in await rows(pool)} == {"completed"}
    assert downloads(sandbox) == total


async def test_a_revoked_inbox_fails_its_downloads_without_requests(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    inbox = await sync_mailbox(pool, sandbox)
    await pool.execute("UPDATE flux_inboxes SET status = 'revoked' WHERE id = $1", inbox)
    await drain(pool, att_settings(sandbox, tmp_path))
    assert downloads(sandbox) == 0
    assert {(r["status"], r["error_message"]) for r in await rows(pool)} == {
        ("failed", "GiveUp: inbox revoked: attachment not downloaded")}


async def test_a_replayed_dead_letter_downloads_the_failed_row(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    gid = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, gid)
    created = sandbox.add_message(gid, send=False, attachments=[("r.txt", "text/plain", b"r")])
    assert created.message is not None
    await store_message(pool, sandbox, inbox, created.message["id"])
    sandbox.inject_fault("error_5xx", 3, endpoint="download_attachment")
    s = att_settings(sandbox, tmp_path)
    await drain(pool, s)
    assert (await rows(pool))[0]["status"] == "failed"
    msg_id = await pool.fetchval("SELECT msg_id FROM pgmq.a_attachment_downloads")
    assert await pool.fetchval("SELECT nova_replay_dead_letter('attachment_downloads', $1)",
                               msg_id) is not None
    await drain(pool, s)
    (row,) = await rows(pool)
    assert (row["status"], row["extracted_text"]) == ("completed", "r")


async def test_a_consumer_killed_mid_download_is_replaced_and_its_temp_file_swept(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    size = 400_000_000
    with make_sandbox(2) as sb:
        gid = sb.grant_ids[0]
        inbox = await add_inbox(pool, gid)
        created = sb.add_message(gid, send=False,
                                 generated=[("huge.bin", "application/octet-stream", size)])
        assert created.message is not None
        await store_message(pool, sb, inbox, created.message["id"])
        nas_root = tmp_path / "nas"
        environment = env(db_url, sb, NOVA_ATTACHMENT_PATH=str(nas_root),
                          NOVA_ATTACHMENT_TEMP_PATH=str(tmp_path / "tmp"),
                          NOVA_ATTACHMENT_TEMP_MAX_AGE_SECONDS="1",
                          NOVA_ATTACHMENT_SWEEP_SECONDS="1")
        log = tmp_path / "consumers.log"
        first = spawn("nova.attachments", environment, log)
        try:
            await wait_for(lambda: _started(nas_root), 60, what="a download in progress")
        finally:
            first.kill()  # SIGKILL: no finally, no cleanup
            first.wait(10)
        (orphan,) = part_files(nas_root)
        assert await pool.fetchval("SELECT status FROM flux_email_attachments") == "downloading"
        second = spawn("nova.attachments", environment, log)
        try:
            await wait_for(lambda: pool.fetchval(
                "SELECT status = 'completed' FROM flux_email_attachments"), 120,
                interval=0.2, what=f"the download to complete: {log.read_text()[-2000:]}")
            await wait_for(lambda: _gone(orphan), 30, what="the orphaned temp file swept")
        finally:
            assert stop(second) == 0
        (row,) = await rows(pool)
        aid = row["provider_attachment_id"]
        expected = hashlib.sha256()
        for chunk in random_chunks(aid, size):
            expected.update(chunk)
        assert (row["checksum"], row["size"]) == (expected.hexdigest(), size)
        assert (nas_root / row["local_path"]).stat().st_size == size
        assert part_files(nas_root) == [] and downloads(sb) == 2
        assert "orphaned temporary file deleted" in log.read_text()


async def _started(root: Path) -> bool:
    return any(p.stat().st_size > 0 for p in part_files(root))


async def _gone(path: Path) -> bool:
    return not await asyncio.to_thread(exists, path)


async def test_sigterm_mid_download_gives_the_job_back_and_leaves_no_temp_file(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    size = 400_000_000
    with make_sandbox(2) as sb:
        gid = sb.grant_ids[0]
        inbox = await add_inbox(pool, gid)
        created = sb.add_message(gid, send=False,
                                 generated=[("huge.bin", "application/octet-stream", size)])
        assert created.message is not None
        await store_message(pool, sb, inbox, created.message["id"])
        nas_root = tmp_path / "nas"
        environment = env(db_url, sb, NOVA_ATTACHMENT_PATH=str(nas_root),
                          NOVA_SHUTDOWN_GRACE_SECONDS="0")
        log = tmp_path / "consumer.log"
        proc = spawn("nova.attachments", environment, log)
        try:
            await wait_for(lambda: _started(nas_root), 60, what="a download in progress")
        finally:
            assert stop(proc) == 0, log.read_text()[-2000:]
        assert part_files(nas_root) == []  # the cancelled download removed its file
        text = log.read_text()
        assert "released attempt=1 (not counted)" in text
        row = await pool.fetchrow("SELECT status, retry_count FROM flux_email_attachments")
        assert (row["status"], row["retry_count"]) == ("downloading", 0)
        # Given back at once: the next consumer takes it over without waiting for the lease.
        assert await pool.fetchval("SELECT read_ct FROM pgmq.q_attachment_downloads") == 0
        await drain(pool, att_settings(sb, tmp_path))
        (row,) = await rows(pool)
        assert (row["status"], row["size"], row["retry_count"]) == ("completed", size, 0)


async def test_without_an_api_key_provider_downloads_wait_untouched(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await sync_mailbox(pool, sandbox)
    s = att_settings(sandbox, tmp_path, nylas_api_key=None)
    worker = Worker(AttachmentProcessor(s), s, pool=pool)
    stats = await worker.run(burst=True)  # the consumer goes on: other inboxes may need it
    assert worker.fatal is None and stats.archived == 0
    assert downloads(sandbox) == 0
    assert {(r["status"], r["retry_count"]) for r in await rows(pool)} == {("pending", 0)}
    # Every job is back in the queue, later, without an attempt counted.
    queued = await pool.fetch("SELECT read_ct, vt > now() + interval '30 seconds' AS later"
                              " FROM pgmq.q_attachment_downloads")
    assert queued and {(q["read_ct"], q["later"]) for q in queued} == {(0, True)}


async def test_a_grant_that_expired_parks_its_downloads_until_the_inbox_is_back(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    inbox = await sync_mailbox(pool, sandbox)
    gid = sandbox.grant_ids[0]
    sandbox.expire_grant(gid, send=False)  # answers 401; the grant says it is invalid
    s = att_settings(sandbox, tmp_path)
    await drain(pool, s)
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "auth_expired"
    waiting = await rows(pool)
    assert {(r["status"], r["retry_count"]) for r in waiting} == {("pending", 0)}
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads") == 0
    sandbox.revive_grant(gid, send=False)
    await pool.execute("SELECT nova_set_inbox_status($1, 'active')", inbox)
    await drain(pool, s)
    assert {r["status"] for r in await rows(pool)} == {"completed"}
