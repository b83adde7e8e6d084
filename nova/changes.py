"""Incremental sync from a provider's change feed (Gmail: users.history.list).

An inbox keeps `sync_cursor`, the last history id applied. A sync lists the history after it,
page by page, and applies each page in one transaction that also saves the cursor, so a crash
repeats at most one page (every write is idempotent and versioned):

| record          | effect                                                            |
| --------------- | ----------------------------------------------------------------- |
| messagesAdded   | messages.get (format full), upserted like any message; its thread |
|                 | re-derived, or queued for a whole sync while a backfill runs that |
|                 | has not listed it                                                 |
| messagesDeleted | soft delete                                                       |
| labelsAdded /   | the labels added to / removed from the stored message's folders   |
| labelsRemoved   | (unread and starred follow UNREAD and STARRED)                    |

A message added and then deleted within one page is only deleted; labels of a message fetched
in the same page come with the fetch. Label changes and deletes carry the version of the page
(nova.store): a newer write from a thread sync is not undone by an older record.

A cursor the provider no longer keeps (Gmail answers 404: history is kept for about a week,
https://developers.google.com/workspace/gmail/api/guides/sync) falls back to a full resync:
the current history id becomes the cursor first, then a backfill of the inbox's window is
queued (or owed to the monitor while one runs: nova_follow_resyncs); upserts by provider id keep
it free of duplicates. Its listing is not bounded at its start (nova.backfill): it lists the
mailbox as it is, new threads included, and fetches only the threads that may differ from the
store (nova.gmail_resync: a historyId past the thread's last threads.get, other message ids
than the stored ones, or not stored at all). Threads deleted whole during the gap get no history
record, so the expiry marks the configuration (`history_expired_at`): once the resync's listing
has ended and a pass of this feed that started after it has run, the threads stored in its range
that it did not list and that nothing wrote since it began are soft-deleted with their messages
(`nova_prune_unlisted_threads`, sql/120_gmail_resync.sql; called after each pass here and when
the backfill completes). An inbox without a cursor starts at the current history id (its
backfill covers what came before: discovery takes the cursor before it lists its first page).

Syncs are started by Pub/Sub pushes (POST /webhooks/gmail, via the webhooks queue) and by the
completion monitor every GMAIL_HISTORY_POLL_SECONDS. One runs per inbox at a time (an advisory
lock); a request that finds one running leaves `changes_requested_at`, which the running sync
reads after it lets go of the lock, and then runs again.

The lock is transaction-scoped (pg_try_advisory_xact_lock), held by a transaction of its own that
stays open while the sync runs its pages in others. A session lock would be wrong behind a
transaction pooler (PgBouncer): the unlock may reach another server connection than the lock,
leaving the inbox locked on a connection that serves other clients. The holding transaction does
keep one connection busy for the length of the sync: behind a pooler that is one server
connection of its pool unless the lock goes to NOVA_DATABASE_DIRECT_URL (`lock_pool`). A sync
whose lock connection dies meanwhile may overlap another one of the inbox, which is harmless:
every write is idempotent and the cursor only moves forward.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import asyncpg

from nova import store
from nova.providers import Message, NotFound
from nova.providers.gmail import CursorExpired, HistoryPage

log = logging.getLogger("nova.changes")

FETCH_CONCURRENCY = 8
LOCK_CLASS = 0x6E6F7661  # "nova": advisory lock class of change syncs (with the inbox hash)
T = TypeVar("T")
Call = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]

LOAD = """
SELECT id, grant_id, provider, status, sync_cursor, deleted_at
FROM flux_inboxes WHERE id = $1
"""
TRY_LOCK = "SELECT pg_try_advisory_xact_lock($1, hashtext($2::text))"
REQUEST = "UPDATE flux_inboxes SET changes_requested_at = clock_timestamp() WHERE id = $1"
REQUESTED_SINCE = "SELECT changes_requested_at > $2 FROM flux_inboxes WHERE id = $1"
SAVE_CURSOR = """
UPDATE flux_inboxes SET sync_cursor = $2, sync_cursor_at = now()
WHERE id = $1 AND (sync_cursor IS NULL OR sync_cursor !~ '^[0-9]+$'
                   OR sync_cursor::numeric < $2::numeric)
"""
SET_CURSOR = "UPDATE flux_inboxes SET sync_cursor = $2, sync_cursor_at = now() WHERE id = $1"
SYNCED = "UPDATE flux_inboxes SET changes_synced_at = now() WHERE id = $1"
# A pass that read the feed to its end, and when it started (sql/120_gmail_resync.sql waits for
# one that started after a resync's listing ended).
PASSED = """
UPDATE flux_inboxes SET changes_synced_at = now(),
    history_pass_started_at = greatest(history_pass_started_at, $2)
WHERE id = $1
"""
# A deleted message keeps the history id of its deletion, the last record that touched it
# (nova.verify_gmail compares a thread's history id with the highest one stored for it).
DELETED_AT_RECORD = """
UPDATE flux_email_messages m
SET raw = coalesce(m.raw, '{}'::jsonb) || jsonb_build_object('historyId', x.hid)
FROM jsonb_to_recordset($2::jsonb) AS x(mid text, hid text)
WHERE m.inbox_id = $1 AND m.provider_message_id = x.mid AND m.deleted_at IS NOT NULL
  AND x.hid ~ '^[0-9]{1,30}$'
  AND (m.raw ->> 'historyId' IS NULL OR m.raw ->> 'historyId' !~ '^[0-9]{1,30}$'
       OR (m.raw ->> 'historyId')::numeric < x.hid::numeric)
"""
# After a pass: a resync owed a prune of what its listing did not see (sql/120).
PRUNE = """
SELECT p.pruned, p.queued FROM flux_inbox_configurations c
CROSS JOIN LATERAL nova_prune_unlisted_threads(c.id) p
WHERE c.inbox_id = $1 AND c.deleted_at IS NULL AND c.history_expired_at IS NOT NULL
"""
# The expiry marks the configuration: the first full backfill queued from now on (the resync)
# soft-deletes, once its listing has ended, the stored threads it did not list (sql/120).
EXPIRED = """
UPDATE flux_inbox_configurations SET history_expired_at = now()
WHERE inbox_id = $1 AND deleted_at IS NULL
"""
# Labels added / removed, one statement for the page: in record order per message.
RELABEL = """
WITH ops AS (
    SELECT x.mid, x.adds, x.removes, x.hid
    FROM jsonb_to_recordset($2::jsonb) AS x(mid text, adds text[], removes text[], hid text)
), next AS (
    SELECT m.id, ARRAY(SELECT u.f FROM unnest(m.folders || ops.adds) WITH ORDINALITY AS u(f, i)
                       WHERE u.f <> ALL (ops.removes) GROUP BY u.f ORDER BY min(u.i)) AS folders,
           ops.hid
    FROM flux_email_messages m JOIN ops ON m.provider_message_id = ops.mid
    WHERE m.inbox_id = $1 AND m.deleted_at IS NULL
      AND (m.provider_updated_at IS NULL OR m.provider_updated_at <= $3)
)
UPDATE flux_email_messages m
SET folders = next.folders, unread = 'UNREAD' = ANY (next.folders),
    starred = 'STARRED' = ANY (next.folders), provider_updated_at = $3, updated_at = now(),
    raw = CASE WHEN next.hid ~ '^[0-9]+$'
               THEN coalesce(m.raw, '{}'::jsonb) || jsonb_build_object('historyId', next.hid)
               ELSE m.raw END
FROM next WHERE m.id = next.id
RETURNING m.thread_id
"""
# Every writer locks threads before messages, in id order (nova.store): the page's threads
# first, so its statements never wait on each other's locks in another order.
LOCK_THREADS = """
SELECT t.id FROM flux_email_threads t
WHERE t.id IN (SELECT m.thread_id FROM flux_email_messages m
               WHERE m.inbox_id = $1 AND m.provider_message_id = ANY ($2::text[]))
ORDER BY t.id FOR UPDATE OF t
"""
RESYNC_OWED = """
UPDATE flux_inboxes SET resync_requested_at = CASE WHEN $2 THEN now() END WHERE id = $1
"""
RESYNC = """
SELECT queue_inbox_backfill(c.inbox_id, greatest(c.backfill_since, now() - interval '1 year'),
                            NULL, 'full')
FROM flux_inbox_configurations c
WHERE c.inbox_id = $1 AND c.deleted_at IS NULL
  AND c.backfill_status NOT IN ('queued', 'discovering', 'thread_sync')
"""


@dataclass
class PagePlan:
    """What one history page changes, per message, in record order."""

    fetch: dict[str, str | None] = field(default_factory=dict)  # message -> thread
    delete: dict[str, None] = field(default_factory=dict)
    labels: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)  # adds, removes
    label_records: dict[str, str] = field(default_factory=dict)  # message -> last record id
    delete_records: dict[str, str] = field(default_factory=dict)  # message -> its deletion's

    @classmethod
    def of(cls, page: HistoryPage) -> PagePlan:
        plan = cls()
        for record in page.records:
            for added, tid in _entries(record, "messagesAdded"):
                plan.delete.pop(added, None)
                plan.labels.pop(added, None)
                plan.fetch[added] = tid
            for gone, _ in _entries(record, "messagesDeleted"):
                plan.fetch.pop(gone, None)
                plan.labels.pop(gone, None)
                plan.delete[gone] = None
                plan.delete_records[gone] = str(record.get("id") or "")
            for kind in ("labelsAdded", "labelsRemoved"):
                for item in record.get(kind) or ():
                    mid = _message_id(item)
                    if mid is None or mid in plan.fetch or mid in plan.delete:
                        continue  # the fetch brings its labels; a deleted one has none
                    labels = {str(x) for x in item.get("labelIds") or () if isinstance(x, str)}
                    adds, removes = plan.labels.setdefault(mid, (set(), set()))
                    plan.label_records[mid] = str(record.get("id") or "")
                    if kind == "labelsAdded":
                        adds |= labels
                        removes -= labels
                    else:
                        removes |= labels
                        adds -= labels
        return plan


def _message_id(item: Any) -> str | None:
    message = item.get("message") if isinstance(item, dict) else None
    mid = message.get("id") if isinstance(message, dict) else None
    return str(mid) if mid else None


def _entries(record: dict[str, Any], kind: str) -> list[tuple[str, str | None]]:
    out = []
    for item in record.get(kind) or ():
        mid = _message_id(item)
        if mid is not None:
            tid = item["message"].get("threadId")
            out.append((mid, str(tid) if tid else None))
    return out


class ChangeSync:
    """Runs the change feed of one inbox (see the module doc). ``call`` wraps each provider
    request (ProviderProcessor.call: 429s waited out, refusals confirmed); ``lock_pool`` holds
    the lock's transaction (default: ``pool``)."""

    def __init__(self, pool: asyncpg.Pool, provider: Any, call: Call[Any], *,
                 lock_pool: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        self.provider = provider
        self.call = call
        self.lock_pool = lock_pool or pool

    async def run(self, inbox_id: uuid.UUID) -> str:
        """Sync the inbox unless a sync of it runs elsewhere (then ask that one to go again)."""
        await self.pool.execute(REQUEST, inbox_id)
        notes: list[str] = []
        while True:
            # The lock lasts as long as this transaction: its end, however it ends, unlocks.
            async with self.lock_pool.acquire() as lock_conn, lock_conn.transaction():
                if not await lock_conn.fetchval(TRY_LOCK, LOCK_CLASS, str(inbox_id)):
                    return "; ".join(notes) or "a sync of this inbox is running: it goes again"
                started = await lock_conn.fetchval("SELECT clock_timestamp()")
                notes.append(await self._sync(inbox_id, started))
            if not await self.pool.fetchval(REQUESTED_SINCE, inbox_id, started):
                return "; ".join(notes)

    async def _sync(self, inbox_id: uuid.UUID, started: datetime | None = None) -> str:
        if started is None:  # when this pass began (PASSED)
            started = await self.pool.fetchval("SELECT clock_timestamp()")
        inbox = await self.pool.fetchrow(LOAD, inbox_id)
        if inbox is None or inbox["deleted_at"] is not None:
            return "inbox removed"
        if inbox["status"] != "active":
            return f"inbox is {inbox['status']}: the next sync after it is active covers this"
        grant = inbox["grant_id"]
        cursor = inbox["sync_cursor"]
        if cursor is None:
            cursor = await self.call(lambda: self.provider.current_cursor(grant))
            await self.pool.execute(SAVE_CURSOR, inbox_id, cursor)
            await self.pool.execute(SYNCED, inbox_id)
            return f"cursor started at {cursor}"
        token: str | None = None
        pages = added = deleted = relabelled = 0
        while True:
            with store.fetch_version() as page_version:
                try:
                    page: HistoryPage = await self.call(
                        partial(self.provider.list_changes, grant, cursor, page_token=token))
                except CursorExpired:
                    return await self._resync(inbox_id, grant, cursor)
                plan = PagePlan.of(page)
                fetched = await self._fetch(grant, list(plan.fetch))
            version = page_version()
            prepared = await store.prepare_messages([m for m in fetched if m is not None])
            gone = [mid for mid, m in zip(plan.fetch, fetched, strict=True) if m is None]
            last = page.last_record_id if page.next_page_token else (
                page.history_id or page.last_record_id)
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.fetch(LOCK_THREADS, inbox_id,
                                 [*plan.fetch, *plan.delete, *plan.labels])
                await store.upsert_messages(conn, inbox_id, prepared, version)
                await store.follow_backfill(conn, inbox_id, sorted(
                    {p.row["provider_thread_id"] for p in prepared
                     if p.row["provider_thread_id"]}))
                for mid in [*plan.delete, *gone]:
                    await store.soft_delete_message(conn, inbox_id, mid, version)
                if plan.delete_records:
                    await conn.execute(DELETED_AT_RECORD, inbox_id, [
                        {"mid": mid, "hid": hid} for mid, hid in plan.delete_records.items()])
                relabelled += await self._relabel(conn, inbox_id, plan, version)
                if last is not None:
                    await conn.execute(SAVE_CURSOR, inbox_id, last)
            pages += 1
            added += len(prepared)
            deleted += len(plan.delete) + len(gone)
            if page.next_page_token is None:
                break
            token = page.next_page_token
        await self.pool.execute(PASSED, inbox_id, started)
        pruned = await self._prune(inbox_id)
        return (f"history from {cursor}: pages={pages} added={added} deleted={deleted} "
                f"relabelled={relabelled}{pruned}")

    async def _prune(self, inbox_id: uuid.UUID) -> str:
        """A resync whose listing has ended soft-deletes what it did not list (sql/120)."""
        rows = await self.pool.fetch(PRUNE, inbox_id)
        pruned, queued = sum(r["pruned"] for r in rows), sum(r["queued"] for r in rows)
        if not pruned + queued:
            return ""
        log.info("[Changes] inbox=%s resync listing ended: %d thread(s) gone at the provider "
                 "soft-deleted, %d queued to check", inbox_id, pruned, queued)
        return f" gone={pruned} checked={queued}"

    async def _fetch(self, grant: str, ids: list[str]) -> list[Message | None]:
        """Each added message, whole; None for one deleted since."""
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(mid: str) -> Message | None:
            async with gate:
                try:
                    message: Message = await self.call(
                        lambda: self.provider.get_message(grant, mid))
                    return message
                except NotFound:
                    return None

        return list(await asyncio.gather(*(one(mid) for mid in ids)))

    @staticmethod
    async def _relabel(conn: asyncpg.Connection, inbox_id: uuid.UUID, plan: PagePlan,
                       version: datetime) -> int:
        if not plan.labels:
            return 0
        ops = [{"mid": mid, "adds": sorted(adds), "removes": sorted(removes),
                "hid": plan.label_records.get(mid)}
               for mid, (adds, removes) in plan.labels.items()]
        rows = await conn.fetch(RELABEL, inbox_id, ops, version)
        await store.refresh_threads(conn, [r["thread_id"] for r in rows if r["thread_id"]])
        return len(rows)

    async def _resync(self, inbox_id: uuid.UUID, grant: str, cursor: str) -> str:
        """History from ``cursor`` is gone: take the current id, then resync the window."""
        current = await self.call(lambda: self.provider.current_cursor(grant))
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(SET_CURSOR, inbox_id, current)
            config = await conn.fetchval(RESYNC, inbox_id)
            # A running backfill's listing may be past the gap's mail: the resync is owed,
            # and the monitor queues it when that backfill ends (nova_follow_resyncs).
            await conn.execute(RESYNC_OWED, inbox_id, config is None)
            await conn.execute(EXPIRED, inbox_id)
            await conn.execute(SYNCED, inbox_id)
        log.warning("[Changes] inbox=%s history from %s expired: cursor now %s, %s", inbox_id,
                    cursor, current,
                    f"full resync queued config={config}" if config
                    else "a backfill is running: the resync follows it")
        return (f"history from {cursor} expired: cursor {current}, "
                + (f"resync config={config}" if config else "resync after the running backfill"))
