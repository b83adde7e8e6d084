"""The resync after a Gmail history expiry fetches only the threads that may differ
(nova.gmail_resync), against SandboxGmail over HTTP: each kind of gap change is caught, every
other thread is recorded done without a threads.get, and the inbox ends equal to the mailbox."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from synchelp import running, wait_for
from test_gmail_sync import (
    _status_is,
    assert_matches_mailbox,
    backfilled,
    gmail_settings,
    make_sandbox,
    sync_changes,
)

from nova.sandbox.gmail import SandboxGmail

LIVE = """
SELECT provider_message_id FROM flux_email_messages
WHERE inbox_id = $1 AND provider_thread_id = $2 AND deleted_at IS NULL
ORDER BY provider_message_id
"""
FETCHED_HID = """
SELECT max((raw ->> 'threadHistoryId')::numeric) FROM flux_email_messages
WHERE inbox_id = $1 AND provider_thread_id = $2
"""


@pytest.fixture
def sandbox() -> Iterator[SandboxGmail]:
    with make_sandbox(40, hostile=0.25) as sb:
        yield sb


async def test_a_resync_fetches_each_changed_thread_and_no_unchanged_one(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """In the gap: (a) a label changed on one thread and a reply added to another (their
    historyIds move past the stored ones); (b) a message deleted from a thread whose historyId
    stays where the store has it, and a message the store lost; (c) a thread born in the gap
    and a thread the store lost whole. After the expiry, before the resync lists, a history
    record relabels another message of the relabelled thread: its historyId in the store then
    equals the listed one, and the thread must still be fetched (the gap's label is on another
    message). Exactly those six threads get a threads.get; the others are recorded done; the
    inbox equals the mailbox."""
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    box = sandbox.mailbox
    threads = sandbox.thread_ids(email)
    sizes = {t: len(await pool.fetch(LIVE, inbox, t)) for t in threads}
    multi = [t for t in threads if sizes[t] >= 3]
    assert len(multi) >= 3, sizes
    relabelled, deleted_from, lost_message = multi[:3]
    replied, lost_whole = [t for t in threads if t not in multi[:3]][:2]

    def messages(tid: str) -> list[str]:
        """The thread's messages, the one its historyId comes from last."""
        thread = box.thread(email, tid)
        assert thread is not None
        return [m.id for m in sorted(thread.messages, key=lambda m: m.history_id)]

    def absent(mid: str) -> list[str]:
        labels = sandbox.message_json(email, mid).get("labelIds") or []
        return [next(lb for lb in ("Label_2", "Label_3", "STARRED", "IMPORTANT")
                     if lb not in labels)]

    # (a) a label added in the gap; a reply in the gap
    first, *_, last = messages(relabelled)
    sandbox.modify_labels(email, first, add=absent(first))
    sandbox.add_message(email, thread_id=replied, text="a reply in the gap")
    # (b) a deletion that leaves the thread's historyId where the store has it (not its
    # newest change), and a message the store lost (its row soft-deleted behind Nova's back)
    sandbox.delete_message(email, messages(deleted_from)[0])
    listed_hid = box.thread(email, deleted_from).history_id  # type: ignore[union-attr]
    assert listed_hid <= await pool.fetchval(FETCHED_HID, inbox, deleted_from)
    gone_row = (await pool.fetch(LIVE, inbox, lost_message))[0]["provider_message_id"]
    await pool.execute("UPDATE flux_email_messages SET deleted_at = now() WHERE inbox_id = $1"
                       " AND provider_message_id = $2", inbox, gone_row)
    # (c) a thread born in the gap; a thread the store lost whole
    born = sandbox.add_message(email, subject="Born in the gap", text="new")["threadId"]
    for table in ("flux_email_messages", "flux_email_threads"):
        await pool.execute(f"UPDATE {table} SET deleted_at = now() WHERE inbox_id = $1"
                           " AND provider_thread_id = $2", inbox, lost_whole)
    sandbox.expire_history(email)

    await sync_changes(pool, db_url, s, inbox)  # 404: the resync is queued
    # After the expiry: another message of the relabelled thread changes, and history brings
    # it before the resync lists (its stored historyId now reaches the thread's listed one).
    sandbox.modify_labels(email, last, add=absent(last))
    await sync_changes(pool, db_url, s, inbox)
    listed = box.thread(email, relabelled).history_id  # type: ignore[union-attr]
    assert await pool.fetchval(
        "SELECT max((raw ->> 'historyId')::numeric) FROM flux_email_messages"
        " WHERE inbox_id = $1 AND provider_thread_id = $2", inbox, relabelled) == listed

    sandbox.reset_stats()
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    await sync_changes(pool, db_url, s, inbox)  # the history pass after the listing (prune)

    changed = {relabelled, replied, deleted_from, lost_message, born, lost_whole}
    fetched = {r["provider_thread_id"] for r in await pool.fetch(
        "SELECT provider_thread_id FROM queued_threads WHERE config_id = $1 AND attempts > 0",
        config)}
    assert fetched == changed
    stats = sandbox.get_stats()["requests"]
    assert stats.get("threads.get", 0) == len(changed), stats
    assert stats.get("messages.list", 0) >= 1 and "messages.get" not in stats, stats
    await assert_matches_mailbox(pool, sandbox, inbox, email)

    # Every listed thread is recorded completed, the unchanged ones with their messages' count
    # as a thread sync records it; the message listing is gone with the discovery.
    progress = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    assert progress["threads_completed"] == len(sandbox.thread_ids(email))
    assert progress["threads_failed"] == 0
    assert await pool.fetchval(
        "SELECT sum(message_count) FROM queued_threads WHERE config_id = $1", config) \
        == len(sandbox.message_ids(email))
    assert await pool.fetchval("SELECT count(*) FROM gmail_resync_listed_messages"
                               " WHERE config_id = $1", config) == 0


async def test_a_resumed_resync_lists_the_messages_again_unless_its_listing_ended(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """The message listing serves only the backfill it was made for: a listing stamped before
    this backfill was queued is made again (its rows go), and the resync then fetches the one
    thread the gap changed and no other."""
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    sandbox.add_message(email, subject="Born in the gap", text="new")  # the gap's one change
    sandbox.expire_history(email)
    await sync_changes(pool, db_url, s, inbox)  # 404: the resync is queued
    assert await _status_is(pool, config, "queued")
    # A stale listing of an earlier run, stamped before this backfill was queued.
    await pool.execute("INSERT INTO gmail_resync_listed_messages VALUES ($1, 'old', 'old')",
                       config)
    await pool.execute("UPDATE flux_inbox_configurations SET resync_messages_listed_at ="
                       " discovery_cutoff - interval '1 second' WHERE id = $1", config)
    sandbox.reset_stats()
    async with running(db_url, s, threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="resync")
    stats = sandbox.get_stats()["requests"]
    assert stats.get("messages.list", 0) >= 1, stats
    assert stats.get("threads.get", 0) == 1, stats  # the new thread's, no other
    assert await pool.fetchval("SELECT resync_messages_listed_at >= discovery_cutoff FROM"
                               " flux_inbox_configurations WHERE id = $1", config)
    assert await pool.fetchval("SELECT count(*) FROM gmail_resync_listed_messages"
                               " WHERE config_id = $1", config) == 0
    await assert_matches_mailbox(pool, sandbox, inbox, email)
