"""Gmail inboxes end to end against SandboxGmail over HTTP: a full backfill equals the
mailbox; history applies added, deleted and relabelled messages; an expired history id falls
back to a full resync without duplicates; a refused refresh token expires the inbox; the quota
budget holds with several workers; attachments download through attachments.get."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.fernet import Fernet
from synchelp import running, start_backfill, status, wait_for

from nova.attachments import AttachmentProcessor
from nova.config import Settings, load_settings
from nova.credentials import authorized_user_from_info, cipher, save_credentials
from nova.providers.gmail_mime import parse_message
from nova.runtime import Worker
from nova.sandbox.gmail import SandboxGmail
from nova.webhooks import WebhookProcessor

KEY = Fernet.generate_key().decode()


def make_sandbox(threads: int, **kw: Any) -> SandboxGmail:
    """A mailbox wholly inside the default one-year backfill range."""
    kw.setdefault("quota_per_minute", None)
    return SandboxGmail(threads=threads, seed=kw.pop("seed", 7), users=2,
                        anchor=int(time.time()) - 3600, **kw)


def gmail_settings(sb: SandboxGmail, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "credentials_key": KEY, "gmail_api_uri": sb.base_url, "nylas_api_key": None,
        "gmail_token_uri": sb.token_uri,  # refresh tokens go to this endpoint only
        "gmail_quota_units_per_minute": 1_000_000, "batch_size": 10, "poll_interval_ms": 300,
        "visibility_timeout": 10, "completion_check_interval_ms": 100,
        "recovery_check_interval_ms": 300, "catchup_gap_seconds": 0,
        "gmail_history_poll_seconds": 0, "shutdown_grace_seconds": 2}
    values.update(kw)
    return load_settings(**values)


@pytest.fixture
def sandbox() -> Iterator[SandboxGmail]:
    with make_sandbox(40, hostile=0.25) as sb:
        yield sb


async def add_gmail_inbox(pool: asyncpg.Pool, sb: SandboxGmail, s: Settings,
                          email: str | None = None) -> uuid.UUID:
    email = email or sb.users[0]
    user = authorized_user_from_info({**sb.credentials(email), "token_uri": sb.token_uri})
    async with pool.acquire() as conn, conn.transaction():
        inbox: uuid.UUID = await conn.fetchval(
            "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES ('gmail', $1, $2)"
            " RETURNING id", email.lower(), email)
        await save_credentials(conn, inbox, user, cipher(s))
    return inbox


async def backfilled(pool: asyncpg.Pool, db_url: str, sb: SandboxGmail,
                     s: Settings) -> tuple[uuid.UUID, uuid.UUID]:
    inbox = await add_gmail_inbox(pool, sb, s)
    config = await start_backfill(pool, inbox)
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="backfill")
    return inbox, config


async def _status_is(pool: asyncpg.Pool, config: uuid.UUID, wanted: str) -> bool:
    return await status(pool, config) == wanted


STORED = """
SELECT m.provider_message_id AS id, m.provider_thread_id AS tid, m.subject, m.folders,
       m.unread, m.starred, m.sent_at, m.body_html, m.body_text, m.raw,
       (SELECT count(*) FROM flux_email_attachments a WHERE a.message_id = m.id) AS attachments
FROM flux_email_messages m WHERE m.inbox_id = $1 AND m.deleted_at IS NULL
"""


async def assert_matches_mailbox(pool: asyncpg.Pool, sb: SandboxGmail, inbox: uuid.UUID,
                                 email: str) -> None:
    """Every message of the mailbox (spam and trash included) stored as the API gives it."""
    rows = {r["id"]: r for r in await pool.fetch(STORED, inbox)}
    expected = set(sb.message_ids(email))
    assert set(rows) == expected
    threads = {r["provider_thread_id"] for r in await pool.fetch(
        "SELECT provider_thread_id FROM flux_email_threads WHERE inbox_id = $1"
        " AND deleted_at IS NULL", inbox)}
    assert threads == set(sb.thread_ids(email))
    for mid in expected:
        resource = sb.message_json(email, mid)
        want = parse_message(resource, email)
        row = rows[mid]
        assert row["tid"] == resource["threadId"]
        assert row["subject"] == want.subject
        assert sorted(row["folders"]) == sorted(resource.get("labelIds") or [])  # a set
        assert row["unread"] == ("UNREAD" in row["folders"])
        assert row["starred"] == ("STARRED" in row["folders"])
        assert row["sent_at"] == want.date
        assert row["attachments"] == len(want.attachments)
        assert row["body_html"] == want.body and row["body_text"] == (want.text or row[
            "body_text"])
        raw = row["raw"]
        assert raw["historyId"] == resource["historyId"]
        assert raw["internalDate"] == resource["internalDate"]


async def test_a_full_backfill_equals_the_sandbox_mailbox(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    start_history = sandbox.history_id(sandbox.users[0])
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    # One threads.get per thread, listings of 500: no message fetched twice.
    stats = sandbox.get_stats()
    units = stats["units"][email]
    assert units["threads.get"] == 10 * len(sandbox.thread_ids(email))
    assert "messages.get" not in units
    # The change feed starts where discovery started.
    cursor = await pool.fetchval("SELECT sync_cursor FROM flux_inboxes WHERE id = $1", inbox)
    assert int(cursor) >= start_history
    progress = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    assert progress["threads_completed"] == len(sandbox.thread_ids(email))
    assert progress["threads_failed"] == 0


@asynccontextmanager
async def webhook_worker(db_url: str, s: Settings) -> AsyncIterator[None]:
    worker = Worker(WebhookProcessor(s), s, database_url=db_url)
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


async def sync_changes(pool: asyncpg.Pool, db_url: str, s: Settings,
                       inbox: uuid.UUID) -> None:
    """Ask for a change sync as the monitor's poll does, and wait for it to run."""
    before = await pool.fetchval(
        "SELECT coalesce(changes_synced_at, '-infinity') FROM flux_inboxes WHERE id = $1", inbox)
    await pool.execute("SELECT pgmq.send('nylas_webhook_notifications',"
                       " jsonb_build_object('changes_inbox_id', $1::uuid))", inbox)
    async with webhook_worker(db_url, s):
        await wait_for(lambda: pool.fetchval(
            "SELECT changes_synced_at > $2 FROM flux_inboxes WHERE id = $1", inbox, before),
            30, what="change sync")


async def test_history_applies_new_deleted_and_relabelled_messages(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox, _ = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    threads = sandbox.thread_ids(email)
    reply = sandbox.add_message(email, thread_id=threads[0], subject="Re: news",
                                text="a reply\x00 with a NUL")
    fresh = sandbox.add_message(email, subject="A new thread", html="<p>hello</p>",
                                attachments=[("notes.txt", "text/plain", b"hello notes")])
    gone = sorted(set(sandbox.message_ids(email)) - {reply["id"], fresh["id"]})[0]
    sandbox.delete_message(email, gone)
    relabel = sorted(set(sandbox.message_ids(email)) - {reply["id"], fresh["id"]})[0]
    stored = await pool.fetchval("SELECT folders FROM flux_email_messages WHERE inbox_id = $1"
                                 " AND provider_message_id = $2", inbox, relabel)
    sandbox.modify_labels(email, relabel, add=["STARRED", "Label_1"],
                          remove=[f for f in stored if f in ("INBOX", "UNREAD")])
    # added and deleted in one page: only deleted
    brief = sandbox.add_message(email, thread_id=threads[1], text="soon gone")
    sandbox.delete_message(email, brief["id"])

    await sync_changes(pool, db_url, s, inbox)
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    deleted = await pool.fetchval("SELECT deleted_at IS NOT NULL FROM flux_email_messages"
                                  " WHERE inbox_id = $1 AND provider_message_id = $2",
                                  inbox, gone)
    assert deleted is True
    thread = await pool.fetchrow("SELECT message_count, subject FROM flux_email_threads"
                                 " WHERE inbox_id = $1 AND provider_thread_id = $2",
                                 inbox, fresh["threadId"])
    assert thread["message_count"] == 1 and thread["subject"] == "A new thread"
    cursor = await pool.fetchval("SELECT sync_cursor FROM flux_inboxes WHERE id = $1", inbox)
    assert int(cursor) == sandbox.history_id(email)
    # The relabel used the delta, not a fetch; the new messages one messages.get each.
    assert sandbox.get_stats()["units"][email].get("messages.get", 0) == 5 * 2


async def test_an_expired_history_id_falls_back_to_a_full_resync_without_duplicates(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    reply = sandbox.add_message(email, thread_id=sandbox.thread_ids(email)[2], text="missed")
    sandbox.expire_history(email)
    rows_before = await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1", inbox)

    await sync_changes(pool, db_url, s, inbox)
    assert await status(pool, config) == "queued"  # the resync of the window
    cursor = await pool.fetchval("SELECT sync_cursor FROM flux_inboxes WHERE id = $1", inbox)
    assert int(cursor) == sandbox.history_id(email)
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    assert await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1", inbox) == rows_before + 1
    assert await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1"
        " AND provider_message_id = $2", inbox, reply["id"]) == 1


async def test_a_refused_refresh_token_marks_the_inbox_auth_expired(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox = await add_gmail_inbox(pool, sandbox, s)
    sandbox.revoke(sandbox.users[0])  # the refresh token answers invalid_grant from now on
    config = await start_backfill(pool, inbox)
    async with running(db_url, s, threads=1):
        await wait_for(lambda: pool.fetchval(
            "SELECT status = 'auth_expired' FROM flux_inboxes WHERE id = $1", inbox), 30,
            what="auth_expired")
    assert await status(pool, config) == "failed"
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1",
                               inbox) == 0


async def test_gmail_attachments_download_through_attachments_get(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail, tmp_path: Path) -> None:
    s = gmail_settings(sandbox, attachment_path=tmp_path / "nas", extract_workers=1)
    inbox, _ = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    body = b"quarterly numbers\n" * 5000  # big enough for Gmail to give an attachmentId
    added = sandbox.add_message(email, subject="report", text="see attached",
                                attachments=[("report.txt", "text/plain", body)])
    await sync_changes(pool, db_url, s, inbox)
    worker = Worker(AttachmentProcessor(s), s, database_url=db_url)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: pool.fetchval(
            "SELECT count(*) = count(*) FILTER (WHERE status = 'completed') AND count(*) > 0"
            " FROM flux_email_attachments WHERE inbox_id = $1", inbox), 60,
            what="attachments downloaded")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
    row = await pool.fetchrow(
        "SELECT a.* FROM flux_email_attachments a WHERE a.inbox_id = $1"
        " AND a.provider_message_id = $2", inbox, added["id"])
    assert row["original_filename"] == "report.txt"
    path = Path(row["local_path"])
    if not path.is_absolute():
        path = tmp_path / "nas" / path
    assert path.read_bytes() == body
    assert row["checksum"] == hashlib.sha256(body).hexdigest()
    assert sandbox.get_stats()["units"][email].get("messages.attachments.get", 0) >= 5


async def test_the_quota_budget_is_never_exceeded_with_several_workers(
        pool: asyncpg.Pool, db_url: str) -> None:
    """The sandbox enforces 1,200 units per sliding minute per user and refuses (429 or 403
    userRateLimitExceeded) past it; Nova is told the same quota. Two processes' worth of
    workers spend more than a whole minute's quota: not one call is refused. (About 70 s: the
    claim is about a sliding minute, so the run must outlast one.)"""
    with make_sandbox(120, seed=9, quota_per_minute=1200, quota_error="mixed") as sb:
        s = gmail_settings(sb, gmail_quota_units_per_minute=1200)
        inbox = await add_gmail_inbox(pool, sb, s)
        config = await start_backfill(pool, inbox)
        async with running(db_url, s, backfill=2, threads=2), running(db_url, s, backfill=0,
                                                                      threads=2):
            await wait_for(lambda: _status_is(pool, config, "completed"), 150,
                           what="backfill under quota")
        email = sb.users[0]
        stats = sb.get_stats()
        assert stats["refusals"].get(email, {}) == {}
        assert stats["units_total"][email] > 1200  # more than one minute's quota was spent
        assert stats["units"][email]["threads.get"] == 10 * len(sb.thread_ids(email))
        await assert_matches_mailbox(pool, sb, inbox, email)


async def test_a_pubsub_push_starts_an_incremental_sync(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """users.watch by the completion monitor (GMAIL_PUBSUB_TOPIC); the sandbox pushes to the
    receiver (?token=); the stored gmail.history notification runs the history sync."""
    from servers import ServerThread

    from nova.completion import CompletionMonitor
    from nova.receiver import create_app

    s = gmail_settings(sandbox, gmail_push_token="push-secret-long-enough",
                       gmail_pubsub_topic="projects/nova-sandbox/topics/gmail")
    inbox, _ = await backfilled(pool, db_url, sandbox, gmail_settings(sandbox))  # no watch
    email = sandbox.users[0]
    monitor = CompletionMonitor(s, pool=pool)
    watched = await monitor.renew_watches("projects/nova-sandbox/topics/gmail")
    assert watched == [(inbox, "watch")]
    assert await pool.fetchval("SELECT watch_expires_at > now() + interval '6 days'"
                               " FROM flux_inboxes WHERE id = $1", inbox)
    assert await monitor.renew_watches("projects/nova-sandbox/topics/gmail") == []  # not due

    with ServerThread(create_app(s, database_url=db_url)) as server:
        sandbox.set_push(endpoint=f"{server.url}/webhooks/gmail",
                         auth="token", token="push-secret-long-enough", min_interval=0.0)
        async with webhook_worker(db_url, s):
            added = sandbox.add_message(email, subject="pushed", text="hello by push")
            await wait_for(lambda: pool.fetchval(
                "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1"
                " AND provider_message_id = $2", inbox, added["id"]), 30,
                what="the pushed message stored")
    note = await pool.fetchrow(
        "SELECT status, provider, grant_id, inbox_id FROM flux_webhook_notifications"
        " WHERE notification_type = 'gmail.history' ORDER BY received_at LIMIT 1")
    assert dict(note) == {"status": "processed", "provider": "gmail", "grant_id": email,
                          "inbox_id": inbox}
    # Removed inboxes have their watch stopped.
    await pool.execute("UPDATE flux_inboxes SET deleted_at = now() WHERE id = $1", inbox)
    assert await monitor.renew_watches("projects/nova-sandbox/topics/gmail") == [
        (inbox, "stop")]


async def test_silent_gmail_inboxes_get_no_catch_up_backfill(pool: asyncpg.Pool) -> None:
    """A Nylas inbox without webhooks for a while gets a catch-up; a Gmail one does not: its
    history, polled, carries every change since its cursor."""
    ids = {}
    for provider in ("nylas", "gmail"):
        ids[provider] = await pool.fetchval(
            "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES ($1, $2, $2)"
            " RETURNING id", provider, f"{provider}-silent@example.com")
        await pool.execute(
            "INSERT INTO flux_inbox_configurations (inbox_id, backfill_status, backfill_since,"
            " backfill_completed_at) VALUES ($1, 'completed', now() - interval '30 days',"
            " now() - interval '2 days')", ids[provider])
    queued = await pool.fetch("SELECT * FROM queue_due_catchups(interval '1 hour',"
                              " interval '10 minutes')")
    assert [r["inbox_id"] for r in queued if r["config_id"] is not None] == [ids["nylas"]]


async def test_an_expired_gmail_inbox_is_checked_again_and_comes_back(
        pool: asyncpg.Pool, sandbox: SandboxGmail) -> None:
    """auth_expired is re-checked for Gmail as for Nylas: an inbox whose credentials work (a
    refresh and getProfile answer; it was marked expired by a refusal that was not the
    user's) becomes active again without a person; one whose refresh token is dead stays
    expired until the operator adds new credentials."""
    from nova.completion import CompletionMonitor

    s = gmail_settings(sandbox, grant_recheck_seconds=1)
    inbox = await add_gmail_inbox(pool, sandbox, s)
    expire = ("UPDATE flux_inboxes SET status = 'auth_expired', auth_expired_at = now(),"
              " status_changed_at = now() - interval '1 hour' WHERE id = $1")
    await pool.execute(expire, inbox)
    monitor = CompletionMonitor(s, pool=pool)
    assert await monitor.recheck_grants() == [(inbox, "active")]
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1", inbox) \
        == "active"
    sandbox.revoke(sandbox.users[0])  # the user removed Nova's access
    await pool.execute(expire, inbox)
    assert await monitor.recheck_grants() == [(inbox, "auth_expired")]


async def test_mail_that_arrives_while_the_history_is_expired_is_not_lost(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """The history expired (404) while a thread was created, a message added to an old
    thread, one deleted and labels changed: after the fallback the inbox equals the mailbox."""
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    threads = sandbox.thread_ids(email)
    fresh = sandbox.add_message(email, subject="Born in the gap", text="new thread")
    reply = sandbox.add_message(email, thread_id=threads[3], text="a reply in the gap")
    gone = sorted(set(sandbox.message_ids(email)) - {fresh["id"], reply["id"]})[0]
    sandbox.delete_message(email, gone)
    relabel = sorted(set(sandbox.message_ids(email)) - {fresh["id"], reply["id"]})[1]
    sandbox.modify_labels(email, relabel, add=["STARRED"])
    sandbox.expire_history(email)

    await sync_changes(pool, db_url, s, inbox)
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    for mid in (fresh["id"], reply["id"]):
        assert await pool.fetchval("SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1"
                                   " AND provider_message_id = $2 AND deleted_at IS NULL",
                                   inbox, mid) == 1


async def test_a_history_expiry_during_a_backfill_is_followed_by_a_resync(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """A 404 on history while a backfill of the inbox runs is never dropped: the resync is
    owed, and the monitor queues it as soon as that backfill has ended."""
    from nova.completion import CompletionMonitor

    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync'"
                       " WHERE id = $1", config)  # a backfill past its listing, still running
    fresh = sandbox.add_message(email, subject="Born in the gap", text="new thread")
    sandbox.expire_history(email)
    await sync_changes(pool, db_url, s, inbox)
    assert await pool.fetchval("SELECT resync_requested_at IS NOT NULL FROM flux_inboxes"
                               " WHERE id = $1", inbox)
    assert await pool.fetch("SELECT * FROM nova_follow_resyncs()") == []  # it still runs
    # The monitor's pass ends the backfill (every thread is done) and the resync follows.
    assert [tuple(r) for r in (await CompletionMonitor(s, pool=pool).recover()).resyncs] \
        == [(inbox, config)]
    assert await pool.fetchval("SELECT resync_requested_at FROM flux_inboxes WHERE id = $1",
                               inbox) is None
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1"
                               " AND provider_message_id = $2", inbox, fresh["id"]) == 1


async def test_a_history_gap_with_a_thread_deleted_whole_ends_equal_and_verifies_clean(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """The history expired (404) while a thread was created, a message added to an old
    thread, a thread deleted whole (no history record will ever say so once expired) and
    labels changed: the resync lists the whole mailbox, and once its listing has ended (and a
    history pass after it) what it did not list is soft-deleted. The inbox ends equal to the
    mailbox and `nova verify` reports zero drift."""
    from nova.ratelimit import ProviderBudget, provider_from_settings
    from nova.verify import find_inbox, format_report, verify_inbox

    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    # The backfill was a while ago (a history expires after days): its writes are older than
    # the resync's listing by more than the versions' clock skew (store.VERSION_SKEW_SECONDS).
    for table in ("flux_email_threads", "flux_email_messages"):
        await pool.execute(f"UPDATE {table} SET provider_updated_at = provider_updated_at"
                           " - interval '1 hour' WHERE inbox_id = $1", inbox)
    email = sandbox.users[0]
    threads = sandbox.thread_ids(email)
    fresh = sandbox.add_message(email, subject="Born in the gap", text="new thread")
    reply = sandbox.add_message(email, thread_id=threads[3], text="a reply in the gap")
    doomed = threads[5]
    doomed_ids = [r["provider_message_id"] for r in await pool.fetch(
        "SELECT provider_message_id FROM flux_email_messages WHERE inbox_id = $1"
        " AND provider_thread_id = $2", inbox, doomed)]
    assert doomed_ids
    for mid in doomed_ids:
        sandbox.delete_message(email, mid)
    relabel = sorted(set(sandbox.message_ids(email)) - {fresh["id"], reply["id"]})[1]
    sandbox.modify_labels(email, relabel, add=["STARRED", "Label_1"], remove=["INBOX"])
    sandbox.expire_history(email)

    await sync_changes(pool, db_url, s, inbox)  # 404: the resync is queued, the config marked
    assert await pool.fetchval("SELECT history_expired_at IS NOT NULL FROM"
                               " flux_inbox_configurations WHERE id = $1", config)
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    await sync_changes(pool, db_url, s, inbox)  # the history pass after the listing
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    gone = await pool.fetch("SELECT deleted_at IS NOT NULL AS deleted FROM flux_email_messages"
                            " WHERE inbox_id = $1 AND provider_thread_id = $2", inbox, doomed)
    assert gone and all(r["deleted"] for r in gone)
    assert await pool.fetchval("SELECT deleted_at IS NOT NULL FROM flux_email_threads"
                               " WHERE inbox_id = $1 AND provider_thread_id = $2", inbox, doomed)
    assert await pool.fetchval("SELECT history_expired_at FROM flux_inbox_configurations"
                               " WHERE id = $1", config) is None

    budget = ProviderBudget.from_settings(pool, s, "gmail")
    provider, client = provider_from_settings(s, budget, kind="gmail")
    try:
        report = await verify_inbox(pool, provider, await find_inbox(pool, str(inbox)))
    finally:
        await client.aclose()
    assert report.drift == 0, format_report(report)
    assert report.threads.expected == len(sandbox.thread_ids(email))


PRUNE = "SELECT * FROM nova_prune_unlisted_threads($1)"


async def test_the_prune_after_a_resync_deletes_only_unlisted_threads_unchanged_since(
        pool: asyncpg.Pool) -> None:
    """What a resync's listing did not see, in its range, unchanged since it began, is
    soft-deleted with its messages; a thread written after the listing began (its row or a
    message), one the listing saw, one before the range and a thread still holding mail from
    before the range (queued for a sync that decides) are not. Nothing happens for a Nylas
    inbox, a backfill queued before the expiry, a catch-up, or before a history pass that
    started after the listing ended."""
    async def setup(provider: str) -> tuple[uuid.UUID, uuid.UUID]:
        inbox = await pool.fetchval(
            "INSERT INTO flux_inboxes (provider, grant_id, email, history_pass_started_at)"
            " VALUES ($1, $2, $2, now()) RETURNING id", provider, f"{provider}@example.com")
        config = await pool.fetchval(
            "INSERT INTO flux_inbox_configurations (inbox_id, backfill_status, backfill_kind,"
            " backfill_since, discovery_cutoff, discovery_completed_at, history_expired_at)"
            " VALUES ($1, 'thread_sync', 'full', now() - interval '30 days',"
            " now() - interval '10 minutes', now() - interval '1 minute',"
            " now() - interval '11 minutes') RETURNING id", inbox)
        return inbox, config

    async def thread(inbox: uuid.UUID, tid: str, *, last: str = "1 day",
                     version: str = "1 hour", first: str | None = None,
                     message_version: str | None = None) -> None:
        row = await pool.fetchval(
            "INSERT INTO flux_email_threads (inbox_id, provider_thread_id, first_message_at,"
            " last_message_at, provider_updated_at, message_count) VALUES ($1, $2,"
            " now() - $3::text::interval, now() - $4::text::interval,"
            " now() - $5::text::interval, 2) RETURNING id",
            inbox, tid, first or last, last, version)
        for k, (ago, mv) in enumerate([(first or last, version),
                                       (last, message_version or version)]):
            await pool.execute(
                "INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id,"
                " provider_thread_id, sent_at, provider_updated_at) VALUES ($1, $2, $3, $4,"
                " now() - $5::text::interval, now() - $6::text::interval)",
                inbox, row, f"{tid}-m{k}", tid, ago, mv)

    inbox, config = await setup("gmail")
    await thread(inbox, "gone")
    await thread(inbox, "listed")
    await pool.execute("SELECT queue_thread_sync($1, 'listed')", config)
    await thread(inbox, "written-since", version="1 second")
    await thread(inbox, "reply-since", message_version="0 seconds")
    await thread(inbox, "before-the-range", last="60 days")
    await thread(inbox, "spans-the-start", first="40 days")

    # Not yet: no history pass since the listing ended.
    await pool.execute("UPDATE flux_inboxes SET history_pass_started_at = now() - interval"
                       " '2 minutes' WHERE id = $1", inbox)
    assert await pool.fetch(PRUNE, config) == []
    await pool.execute("UPDATE flux_inboxes SET history_pass_started_at = now() WHERE id = $1",
                       inbox)
    assert [tuple(r) for r in await pool.fetch(PRUNE, config)] == [(1, 1)]
    live = {r["provider_thread_id"]: r["deleted"] for r in await pool.fetch(
        "SELECT provider_thread_id, deleted_at IS NOT NULL AS deleted FROM flux_email_threads"
        " WHERE inbox_id = $1", inbox)}
    assert live == {"gone": True, "listed": False, "written-since": False,
                    "reply-since": False, "before-the-range": False, "spans-the-start": False}
    assert await pool.fetchval(
        "SELECT bool_and(deleted_at IS NOT NULL) FROM flux_email_messages"
        " WHERE provider_thread_id = 'gone'")
    assert await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1"
        " AND deleted_at IS NOT NULL", inbox) == 2
    assert await pool.fetchval(
        "SELECT status FROM queued_threads WHERE config_id = $1"
        " AND provider_thread_id = 'spans-the-start'", config) == "queued"
    assert await pool.fetchval("SELECT history_expired_at FROM flux_inbox_configurations"
                               " WHERE id = $1", config) is None
    assert await pool.fetch(PRUNE, config) == []  # done once

    # Never on a Nylas inbox, a backfill queued before the expiry, or a catch-up.
    nylas_inbox, nylas_config = await setup("nylas")
    await thread(nylas_inbox, "nylas-gone")
    assert await pool.fetch(PRUNE, nylas_config) == []
    other = await pool.fetchval("INSERT INTO flux_inboxes (provider, grant_id, email,"
                                " history_pass_started_at) VALUES ('gmail', 'b@example.com',"
                                " 'b@example.com', now()) RETURNING id")
    for kind, cutoff in (("full", "20 minutes"), ("catch_up", "10 minutes")):
        await pool.execute("DELETE FROM flux_inbox_configurations WHERE inbox_id = $1", other)
        cfg = await pool.fetchval(
            "INSERT INTO flux_inbox_configurations (inbox_id, backfill_status, backfill_kind,"
            " backfill_since, discovery_cutoff, discovery_completed_at, history_expired_at)"
            " VALUES ($1, 'thread_sync', $2, now() - interval '30 days',"
            " now() - $3::text::interval, now() - interval '1 minute',"
            " now() - interval '11 minutes') RETURNING id", other, kind, cutoff)
        await thread(other, f"{kind}-gone")
        assert await pool.fetch(PRUNE, cfg) == []
        assert await pool.fetchval("SELECT history_expired_at IS NOT NULL FROM"
                                   " flux_inbox_configurations WHERE id = $1", cfg)
    assert await pool.fetchval("SELECT count(*) FROM flux_email_threads WHERE deleted_at IS"
                               " NOT NULL AND provider_thread_id <> 'gone'") == 0
