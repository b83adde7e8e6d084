"""`nova verify` for Gmail inboxes: list calls only, through the user's quota budget.

Gmail has no thread object with message ids and dates, so verify lists three things over the
window, each with `includeSpamTrash` (as the backfill lists) and `q=after:/before:` in epoch
seconds, 500 per page (the maximum):

1. `threads.list`: every thread with a message in the window, with its `historyId` ("the ID of
   the last history record that modified this thread"); 10 quota units a page;
2. `messages.list`: every message in the window with its `threadId`; 5 units a page;
3. `history.list` from the inbox's `sync_cursor` (read before the listings) to the end: every
   thread a record after the cursor names is still on its way through the change feed, or
   changed while verify ran; it is `changed`, not compared, never drift. 2 units a page.

No thread or message is fetched one by one. Measured against the sandbox: 1,000 threads of 2,549
messages in 9 requests and 52 units (0.9 s); 9,999 threads of 23,744 messages in 69 requests and
442 units (13.5 s, most of it the in-process sandbox generating its mail), under two seconds of
Google's default 15,000 units a minute. Every request spends its units of the user's budget
(`provider_rate_limits`, key `gmail:<email>`, nova.ratelimit) like every other Gmail request,
and a quota refusal holds the user for every worker.

Pages go to session temp tables as they arrive (only one page is in Python at a time); then
one REPEATABLE READ transaction compares them with the database and writes the shared verdict
tables of nova.verify_core, which concludes (extras, counts, samples) and repairs:

- thread `missing`: listed, no live row;
- thread `stale`: its live stored messages inside the window differ from the listed ones, or
  the highest `historyId` stored for it (its messages' `raw.historyId`, which history sync keeps
  current for label changes and deletions; the thread's own as of its last threads.get,
  `raw.threadHistoryId`; or the thread row's) is below the listed one: a
  change (labels included) that never reached the database;
- message `missing` / `stale`: not stored live / stored under another thread;
- `extra`: stored and live in the window, not listed: gone at Gmail (or, for a message, not
  in the thread any more).

When history from the cursor has expired (404) the feed cannot say what is in flight: nothing
is set apart, a note says so, and drift is expected until the resync that the next change sync
queues has completed (nova.changes).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import asyncpg

from nova.providers import AuthExpired, NotFound, Permanent, ProviderError, RateLimited
from nova.providers.gmail import MAX_LIST, CursorExpired, GmailProvider, HistoryPage
from nova.verify_core import (
    MAX_RATE_LIMITED_IN_A_ROW,
    MESSAGE_VERDICTS,
    Restart,
    Verification,
    VerifyError,
)

log = logging.getLogger("nova.verify")

T = TypeVar("T")
HISTORY_KINDS = ("messagesAdded", "messagesDeleted", "labelsAdded", "labelsRemoved")

SETUP_GMAIL = """
DROP TABLE IF EXISTS pg_temp.verify_gmail_threads, pg_temp.verify_gmail_messages,
    pg_temp.verify_gmail_changed;
CREATE TEMP TABLE verify_gmail_threads (thread_id text PRIMARY KEY, history_id numeric);
CREATE TEMP TABLE verify_gmail_messages (message_id text PRIMARY KEY, thread_id text NOT NULL);
CREATE TEMP TABLE verify_gmail_changed (thread_id text PRIMARY KEY);
"""
TEARDOWN_GMAIL = """
DROP TABLE IF EXISTS pg_temp.verify_gmail_threads, pg_temp.verify_gmail_messages,
    pg_temp.verify_gmail_changed
"""
CURSOR = "SELECT sync_cursor FROM flux_inboxes WHERE id = $1"
SAVE_THREADS = """
INSERT INTO verify_gmail_threads (thread_id, history_id)
SELECT t, CASE WHEN h ~ '^[0-9]{1,30}$' THEN h::numeric END
FROM unnest($1::text[], $2::text[]) AS p(t, h)
ON CONFLICT (thread_id) DO UPDATE SET history_id = EXCLUDED.history_id
"""
SAVE_MESSAGES = """
INSERT INTO verify_gmail_messages (message_id, thread_id)
SELECT m, t FROM unnest($1::text[], $2::text[]) AS p(m, t)
ON CONFLICT (message_id) DO UPDATE SET thread_id = EXCLUDED.thread_id
"""
SAVE_CHANGED = """
INSERT INTO verify_gmail_changed (thread_id) SELECT DISTINCT unnest($1::text[])
ON CONFLICT (thread_id) DO NOTHING
"""
_HID = "CASE WHEN {0} ~ '^[0-9]{{1,30}}$' THEN ({0})::numeric END"

# Each listed thread against its stored row and messages. $2: the cursor (threads modified
# after it are in flight), $3/$4: the window that the message listing covered.
COMPARE_THREADS = f"""
WITH p AS (
    SELECT g.thread_id, g.history_id,
           c.thread_id IS NOT NULL OR coalesce(g.history_id > $2::numeric, false) AS changed
    FROM verify_gmail_threads g LEFT JOIN verify_gmail_changed c USING (thread_id)
), pa AS (
    SELECT thread_id, array_agg(message_id ORDER BY message_id) AS ids
    FROM verify_gmail_messages GROUP BY thread_id
), r AS (
    SELECT p.thread_id, t.id AS row_id, {_HID.format("t.raw ->> 'historyId'")} AS hid
    FROM p JOIN flux_email_threads t
      ON t.inbox_id = $1 AND t.provider_thread_id = p.thread_id AND t.deleted_at IS NULL
), da AS (
    SELECT r.thread_id,
           array_agg(m.provider_message_id ORDER BY m.provider_message_id)
               FILTER (WHERE m.deleted_at IS NULL AND m.sent_at >= $3
                       AND ($4::timestamptz IS NULL OR m.sent_at < $4)) AS ids,
           max(greatest({_HID.format("m.raw ->> 'historyId'")},
                         {_HID.format("m.raw ->> 'threadHistoryId'")})) AS hid
    FROM r JOIN flux_email_messages m ON m.thread_id = r.row_id
    GROUP BY r.thread_id
), v AS (
    SELECT p.thread_id, p.history_id, p.changed, coalesce(cardinality(pa.ids), 0) AS n,
           r.row_id IS NOT NULL AS stored,
           coalesce(da.ids, '{{}}') <> coalesce(pa.ids, '{{}}') AS set_differs,
           coalesce(cardinality(da.ids), 0) AS stored_n,
           greatest(r.hid, da.hid) AS stored_hid
    FROM p LEFT JOIN pa USING (thread_id) LEFT JOIN r USING (thread_id)
    LEFT JOIN da USING (thread_id)
), s AS (
    SELECT v.*, coalesce(v.stored_hid < v.history_id,
                         v.history_id IS NOT NULL) AS behind FROM v
)
INSERT INTO verify_threads (thread_id, latest, messages, state, detail)
SELECT s.thread_id, NULL, s.n,
       CASE WHEN s.changed THEN 'changed'
            WHEN NOT s.stored THEN 'missing'
            WHEN s.set_differs OR s.behind THEN 'stale'
            ELSE 'ok' END,
       CASE WHEN NOT s.changed AND s.stored AND (s.set_differs OR s.behind) THEN concat_ws('; ',
            CASE WHEN s.set_differs THEN format(
                'messages in the window: %s live stored, %s at the provider', s.stored_n,
                s.n) END,
            CASE WHEN s.behind THEN format('history id: %s stored, %s at the provider',
                                           coalesce(s.stored_hid::text, 'none'),
                                           s.history_id) END) END
FROM s
ON CONFLICT (thread_id) DO NOTHING
"""
COMPARE_MESSAGES = MESSAGE_VERDICTS.format(
    source="(SELECT message_id, thread_id FROM verify_gmail_messages)")
# Threads the feed names that the listings did not show (gone or born during the run):
# known to be in flight, so never extras.
CHANGED_UNLISTED = """
INSERT INTO verify_threads (thread_id, latest, messages, state)
SELECT thread_id, NULL, 0, 'changed' FROM verify_gmail_changed
ON CONFLICT (thread_id) DO NOTHING
"""


def history_threads(page: HistoryPage) -> set[str]:
    """The threads the records of a history page name."""
    out: set[str] = set()
    for record in page.records:
        items = [*(record.get("messages") or ())]
        for kind in HISTORY_KINDS:
            items += [x.get("message") for x in record.get(kind) or () if isinstance(x, dict)]
        for message in items:
            if isinstance(message, dict) and message.get("threadId"):
                out.add(str(message["threadId"]))
    return out


class GmailVerifier(Verification):
    """Lists a Gmail user's threads, messages and history (see the module doc)."""

    setup_sql = SETUP_GMAIL
    teardown_sql = TEARDOWN_GMAIL
    messages_windowed = True

    provider: GmailProvider

    async def _list_all(self, conn: asyncpg.Connection) -> None:
        r = self.report
        cursor = await conn.fetchval(CURSOR, self.inbox.id)
        cursor = str(cursor) if cursor is not None and str(cursor).isdigit() else None
        r.history_from = cursor
        await self._listing(conn, self._threads_page)
        await self._listing(conn, self._messages_page)
        in_flight = await self._history(conn, cursor)
        async with conn.transaction(isolation=self.isolation):
            await conn.execute(COMPARE_THREADS, self.inbox.id, in_flight, r.since, r.until)
            await conn.execute(COMPARE_MESSAGES, self.inbox.id)
            await conn.execute(CHANGED_UNLISTED)

    # ------------------------------------------------------------------ listings
    async def _listing(self, conn: asyncpg.Connection,
                       page: Callable[[asyncpg.Connection, str | None],
                                      Awaitable[str | None]]) -> None:
        """Every page of one listing; a rejected page token lists it again from the first
        page, once (what was saved stays: saving is idempotent)."""
        restarted = False
        while True:
            token: str | None = None
            try:
                while True:
                    token = await page(conn, token)
                    self.report.pages += 1
                    if token is None:
                        return
            except Restart as exc:
                if restarted:
                    raise VerifyError(f"Gmail rejected a page token twice: "
                                      f"{exc.__cause__}") from exc
                log.warning("[Verify] page token rejected (%s): listing again from the first "
                            "page", exc.__cause__)
                restarted = True

    async def _threads_page(self, conn: asyncpg.Connection, token: str | None) -> str | None:
        page = await self._call(lambda: self.provider.list_threads_page(
            self.grant_id, page_token=token, limit=MAX_LIST, received_after=self.report.since,
            received_before=self.report.until), token)
        if page.items:
            await conn.execute(SAVE_THREADS, [t.id for t in page.items],
                               [str(t.raw.get("historyId") or "") for t in page.items])
        return page.next_page_token

    async def _messages_page(self, conn: asyncpg.Connection, token: str | None) -> str | None:
        # messages.list answers ids and thread ids only: a list call, 5 units
        page = await self._call(lambda: self.provider.list_message_refs(
            self.grant_id, page_token=token, limit=MAX_LIST, received_after=self.report.since,
            received_before=self.report.until), token)
        if page.items:
            await conn.execute(SAVE_MESSAGES, [m.id for m in page.items],
                               [m.thread_id for m in page.items])
        return page.next_page_token

    async def _history(self, conn: asyncpg.Connection, cursor: str | None) -> str | None:
        """The threads named by history after ``cursor``, to the end; the cursor to compare
        listed history ids with, or None when the feed cannot say what is in flight."""
        r = self.report
        if cursor is None:
            r.notes.append("the inbox has no history cursor yet: mail arriving during the run "
                           "may show as drift")
            return None
        token: str | None = None
        while True:
            try:
                page: HistoryPage = await self._call(partial(
                    self.provider.list_changes, self.grant_id, cursor, page_token=token), None)
            except CursorExpired:
                r.notes.append(f"history after the inbox's cursor {cursor} has expired at "
                               "Gmail: the next change sync queues a resync; drift is expected "
                               "until it completes, and mail arriving during the run counts")
                return None
            r.pages += 1
            threads = history_threads(page)
            if threads:
                await conn.execute(SAVE_CHANGED, sorted(threads))
            if page.next_page_token is None:
                return cursor
            token = page.next_page_token

    async def _call(self, request: Callable[[], Awaitable[T]], token: str | None) -> T:
        """One request, tried again after a quota refusal: the budget holds the user for the
        hold, so the next try waits by itself (as ProviderProcessor.call does)."""
        limited = 0
        while True:
            try:
                self.requests += 1
                return await request()
            except RateLimited as exc:
                self.report.rate_limited += 1
                limited += 1
                if limited >= MAX_RATE_LIMITED_IN_A_ROW:
                    raise VerifyError(f"refused for quota {limited} times in a row by Gmail "
                                      f"(last: {exc}); try again later") from exc
            except CursorExpired:
                raise
            except AuthExpired as exc:
                raise VerifyError(
                    f"Google refused the credentials of {self.grant_id} ({exc}): the user must "
                    "authorize Nova again (nova inbox add --provider gmail --email "
                    f"{self.inbox.email} --credentials FILE)") from exc
            except Permanent as exc:
                if token is not None and exc.status == 400:
                    raise Restart() from exc
                raise VerifyError(f"Gmail refused the listing: {exc!r}") from exc
            except NotFound as exc:
                raise VerifyError(f"Gmail does not know user {self.grant_id}: {exc}") from exc
            except ProviderError as exc:
                raise VerifyError(f"Gmail failed: {exc!r}") from exc
