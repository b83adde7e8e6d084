"""The resync after a Gmail history expiry fetches only the threads that may differ.

A history.list 404 (nova.changes) restarts the feed at the current history id and queues a full,
open-ended backfill of the inbox, the resync, whose configuration carries `history_expired_at`
(sql/120_gmail_resync.sql). Its listing covers the whole mailbox as it is; a thread sync per
listed thread (a threads.get, 10 units) brings back what the gap lost, and that was nearly
every thread re-fetched for the few the gap touched.

So before the resync lists its threads, it lists the mailbox's messages (messages.list: ids and
thread ids, 5 units a page of 500, spam and trash included, from the range's start, or from
the oldest live message of a thread in it) into `gmail_resync_listed_messages`, one
transaction per page. Then each page of threads.list is compared with the store in its page's
transaction (`nova_queue_resync_page`): a thread is queued when (a) its listed historyId is
newer than the thread's own as of its last threads.get (a message added or a label changed
since), or (b) its listed message ids differ from its live stored ones (a message deleted in the
gap, whose deletion need not move the thread's historyId, or one never stored), or (c) it is
not stored at all; every other listed thread is recorded done with no request. Threads stored
but not listed are soft-deleted by the prune after the listing (`nova_prune_unlisted_threads`).

Why nothing is missed: both listings run after the expiry, whose history sync brings every
change from then on. A change in the gap either moved the thread's historyId past its last
fetch (an addition, a label: "the ID of the last history record that modified this thread")
or removed a message the store still holds live, which no listing made after it can show. Only
that fetch's historyId counts (`raw.threadHistoryId`, written by a thread sync on every message
it writes): a message's own, moved by a history record applied after the expiry, says nothing
of a gap record of another message of its thread. A listing that misses a stored message
(one older than its start) only makes the sets differ.

The listing serves the backfill it was made for (`resync_messages_listed_at` at or after its
`discovery_cutoff`); it is made again when a resumed discovery finds none (a crash before its
last page), and its rows go when discovery ends. Costs, measured in the chaos suite (a mailbox
of about 1,010 threads and 2,500 messages, one expiry while its backfill ran): 6 messages.list
pages (30 units), then 30 to 70 threads.get where every thread was fetched (10,100 units).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import asyncpg

from nova.providers import Permanent
from nova.providers.models import Page, Thread
from nova.runtime import GiveUp

log = logging.getLogger("nova.backfill")

T = TypeVar("T")
Call = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
LIST_LIMIT = 500  # messages.list maxResults maximum
# `after:` counts whole seconds, and Google does not say whether it is inclusive: a day of
# margin costs a few list items.
MARGIN = timedelta(days=1)

START = "SELECT nova_resync_listing_start($1)"
CLEAR = "DELETE FROM gmail_resync_listed_messages WHERE config_id = $1"
SAVE = """
INSERT INTO gmail_resync_listed_messages (config_id, provider_thread_id, provider_message_id)
SELECT $1, t, m FROM unnest($2::text[], $3::text[]) AS x(m, t)
ON CONFLICT DO NOTHING
"""
LISTED = """
UPDATE flux_inbox_configurations SET resync_messages_listed_at = clock_timestamp()
WHERE id = $1
"""
QUEUE = "SELECT queued, unchanged FROM nova_queue_resync_page($1, $2::text[], $3::text[])"


def applies(cfg: Any, feed: bool) -> bool:
    """Whether this backfill is a resync after a history expiry (the prune's own test,
    sql/120_gmail_resync.sql): a full backfill with no end, queued at or after the expiry."""
    expired = cfg["history_expired_at"]
    return (feed and expired is not None and cfg["backfill_kind"] == "full"
            and cfg["backfill_until"] is None and cfg["discovery_cutoff"] >= expired)


def listed(cfg: Any) -> bool:
    """Whether the message listing of this backfill is complete."""
    at = cfg["resync_messages_listed_at"]
    return at is not None and at >= cfg["discovery_cutoff"]


async def list_messages(pool: asyncpg.Pool, cfg: Any, provider: Any, call: Call[Any],
                        hold: Callable[[asyncpg.Connection], Awaitable[None]]) -> str:
    """Every message of the mailbox from the listing's start, with its thread, saved page by
    page (each in a transaction that holds the job's lease: ``hold``); then marked listed."""
    config_id, grant_id = cfg["id"], cfg["grant_id"]
    start: datetime = await pool.fetchval(START, config_id) - MARGIN
    token: str | None = None
    restarted = False
    pages = count = 0
    while True:
        try:
            page = await call(partial(provider.list_message_refs, grant_id, page_token=token,
                                      limit=LIST_LIMIT, received_after=start))
        except Permanent as exc:
            # A page token Gmail no longer takes: from the first page again, once. What was
            # saved stays (a message listed twice is one row; one gone since, a difference).
            if token is None or restarted or exc.status != 400:
                raise GiveUp(f"{type(exc).__name__}: {exc}") from exc
            log.warning("[Backfill] resync message listing: page token rejected config=%s "
                        "(%s): listing again from the first page", str(config_id)[:8], exc)
            token, restarted = None, True
            continue
        async with pool.acquire() as conn, conn.transaction():
            await hold(conn)
            if pages == 0:  # an earlier listing's rows go with the first page of this one
                await conn.execute(CLEAR, config_id)
            if page.items:
                await conn.execute(SAVE, config_id, [m.id for m in page.items],
                                   [m.thread_id for m in page.items])
            if page.next_page_token is None:
                await conn.execute(LISTED, config_id)
        pages += 1
        count += len(page.items)
        if page.next_page_token is None:
            break
        token = page.next_page_token
    log.info("[Backfill] resync message listing config=%s messages=%d pages=%d after=%s",
             str(config_id)[:8], count, pages, start.isoformat())
    return f"messages={count} pages={pages}"


def history_ids(page: Page[Thread]) -> dict[str, str]:
    """Each listed thread's historyId (threads.list gives it with the id)."""
    return {t.id: str(t.raw.get("historyId") or "") for t in page.items}


async def queue_page(conn: asyncpg.Connection, config_id: uuid.UUID, ids: Sequence[str],
                     versions: dict[str, str]) -> int:
    """Queue the page's threads that may differ; record the others done. Returns how many
    were unchanged."""
    if not ids:
        return 0
    row = await conn.fetchrow(QUEUE, config_id, list(ids), [versions.get(i, "") for i in ids])
    return int(row["unchanged"])


async def finish(conn: asyncpg.Connection, config_id: uuid.UUID) -> None:
    """Discovery ended: the listing has served."""
    await conn.execute(CLEAR, config_id)
