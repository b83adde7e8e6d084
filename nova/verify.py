"""`nova verify INBOX [--repair] [--json]`: compare an inbox in Postgres with the provider.

The proof a user can run against production. Over the inbox's backfill window (the
configuration's backfill_since..backfill_until; one year back when there is none) it lists the
provider's threads, 200 per page (the Nylas maximum), newest first. A thread object carries its
`message_ids` and its latest message date, so LIST calls are all it needs: no thread or message
is fetched one by one. Every request reserves a slot of the grant's shared budget
(`provider_rate_limits`, nova.ratelimit) and a 429 holds the grant for every worker, exactly as
the processors' requests do.

Memory stays bounded whatever the mailbox size: only one page is in Python at a time. Each page
is compared with the database in one REPEATABLE READ transaction of two statements (the stored
rows of that page's threads and messages) and its verdicts land in session temp tables; the
"extra" side (rows stored in the window that the provider did not list) is then one anti-join
against those tables.

Temp tables need a session, which a transaction pooler (PgBouncer) does not keep from one
transaction to the next: verify connects to NOVA_DATABASE_DIRECT_URL when it is set (and no
--database-url is given). Without it, behind a pooler, the whole run is one transaction, which
the pooler keeps on one server connection; each page's two statements then read the database
at READ COMMITTED, no longer in one snapshot, and a repair's batches commit together at the end.

Per thread: `missing` (no live row), `stale` (the stored set of live message ids differs from
the provider's `message_ids`, or `last_message_at` differs from the provider's latest message
date). Per message: `missing` (no live row), `stale` (stored under another thread, or without
a live thread row). `extra`: live rows in the window that the provider does not have: threads
by `last_message_at`; messages under the compared threads, the extra threads and the window's
soft-deleted threads (a thread deleted while its messages were not).

Mail that arrives while verify runs is not drift: threads whose latest message is at or after
the moment verify started (less VERSION_SKEW_SECONDS) are counted apart as "changed during the
run". After the main listing one more listing of those threads catches a thread that got a
reply while the main pass ran (it jumped to the first page, already read); the same technique
as discovery's rounds in nova.backfill.

`--repair` queues, with `queue_thread_sync` on the inbox's configuration, every thread that is
missing, stale, holds a missing or misplaced message (both its provider thread and the thread it
is stored under), or is/holds an extra. Thread sync fetches each one; a thread the provider
answers 404 for is soft-deleted. Nothing is deleted here. (Today thread sync does not soft-delete
stored messages the provider no longer lists, nor a 404'd thread's messages: extra messages stay
until it does.)

Measured against the sandbox (tests' `make_sandbox`, default budget 10/s burst 5): 1,000 threads
in 6 requests and 0.4 s; 10,000 in 51 requests and 5 s; 100,000 (238,232 messages) in 501
requests and 60 s, the CLI's resident memory ~72 MB at every size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from nova import db
from nova.config import Settings
from nova.providers import (
    GrantNotFound,
    InvalidApiKey,
    MailProvider,
    Permanent,
    ProviderError,
    RateLimited,
    Unauthorized,
)
from nova.providers.models import Page, Thread
from nova.store import VERSION_SKEW_SECONDS

log = logging.getLogger("nova.verify")

PAGE_LIMIT = 200  # the Nylas maximum
MAX_RATE_LIMITED_IN_A_ROW = 10
SAMPLE = 20  # ids shown per category
REPAIR_BATCH = 500
SKEW = timedelta(seconds=VERSION_SKEW_SECONDS)
DEFAULT_WINDOW = timedelta(days=365)

# Exit codes (also in nova/cli.py's and README's tables).
EXIT_OK = 0  # no drift, or --repair queued every affected thread
EXIT_FAILED = 1  # the database or the provider refused; nothing was concluded
EXIT_USAGE = 2  # bad usage or settings
EXIT_DRIFT = 3  # drift found (without --repair)

FIND_INBOX = """
SELECT i.id, i.provider, i.grant_id, i.email, i.status, c.id AS config_id,
       c.backfill_status, c.backfill_kind, c.backfill_since, c.backfill_until
FROM flux_inboxes i
LEFT JOIN flux_inbox_configurations c ON c.inbox_id = i.id AND c.deleted_at IS NULL
WHERE i.deleted_at IS NULL AND (i.id = $1 OR i.grant_id = $2 OR lower(i.email) = lower($2))
ORDER BY i.created_at
"""

SETUP = """
DROP TABLE IF EXISTS pg_temp.verify_threads, pg_temp.verify_messages,
    pg_temp.verify_extra_threads, pg_temp.verify_extra_messages, pg_temp.verify_repair;
CREATE TEMP TABLE verify_threads (
    thread_id text PRIMARY KEY,
    latest    timestamptz,
    messages  integer NOT NULL,
    state     text NOT NULL,          -- ok | missing | stale | changed
    detail    text
);
CREATE TEMP TABLE verify_messages (
    message_id    text PRIMARY KEY,
    thread_id     text NOT NULL,      -- at the provider
    stored_thread text,               -- in the database, when it differs
    state         text NOT NULL,      -- ok | missing | stale
    detail        text
);
CREATE TEMP TABLE verify_extra_threads (thread_id text PRIMARY KEY, row_id uuid NOT NULL);
CREATE TEMP TABLE verify_extra_messages (message_id text PRIMARY KEY, thread_id text);
CREATE TEMP TABLE verify_repair (
    thread_id text PRIMARY KEY,
    reason    text NOT NULL,
    msg_id    bigint
);
"""
TEARDOWN = """
DROP TABLE IF EXISTS pg_temp.verify_threads, pg_temp.verify_messages,
    pg_temp.verify_extra_threads, pg_temp.verify_extra_messages, pg_temp.verify_repair
"""

_TS = "to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

# One page of the main listing: each provider thread against its stored row and live messages.
PAGE_THREADS = f"""
WITH p AS (
    SELECT * FROM unnest($2::text[], $3::timestamptz[]) AS p(thread_id, latest)
), pa AS (
    SELECT pm.thread_id, array_agg(pm.message_id ORDER BY pm.message_id) AS ids
    FROM unnest($4::text[], $5::text[]) AS pm(message_id, thread_id)
    GROUP BY pm.thread_id
), r AS (
    SELECT p.thread_id, t.id AS row_id, t.last_message_at
    FROM p JOIN flux_email_threads t
      ON t.inbox_id = $1 AND t.provider_thread_id = p.thread_id AND t.deleted_at IS NULL
), da AS (
    SELECT r.thread_id, array_agg(m.provider_message_id ORDER BY m.provider_message_id) AS ids
    FROM r JOIN flux_email_messages m ON m.thread_id = r.row_id AND m.deleted_at IS NULL
    GROUP BY r.thread_id
), v AS (
    SELECT p.thread_id, p.latest, coalesce(cardinality(pa.ids), 0) AS n,
           r.row_id IS NOT NULL AS stored,
           r.last_message_at IS DISTINCT FROM p.latest AS date_differs,
           coalesce(da.ids, '{{}}') <> coalesce(pa.ids, '{{}}') AS set_differs,
           coalesce(cardinality(da.ids), 0) AS stored_n, r.last_message_at
    FROM p LEFT JOIN pa USING (thread_id) LEFT JOIN r USING (thread_id)
    LEFT JOIN da USING (thread_id)
)
INSERT INTO verify_threads (thread_id, latest, messages, state, detail)
SELECT v.thread_id, v.latest, v.n,
       CASE WHEN v.latest >= $6 THEN 'changed'
            WHEN NOT v.stored THEN 'missing'
            WHEN v.date_differs OR v.set_differs THEN 'stale'
            ELSE 'ok' END,
       CASE WHEN v.stored AND (v.date_differs OR v.set_differs) THEN concat_ws('; ',
            CASE WHEN v.set_differs THEN format('messages: %s live stored, %s at the provider',
                                                v.stored_n, v.n) END,
            CASE WHEN v.date_differs THEN format('last message: %s stored, %s at the provider',
                 coalesce({_TS % 'v.last_message_at'}, 'none'),
                 coalesce({_TS % 'v.latest'}, 'none')) END) END
FROM v
ON CONFLICT (thread_id) DO UPDATE
SET latest = EXCLUDED.latest, messages = EXCLUDED.messages,
    state = CASE WHEN verify_threads.state = 'changed' THEN 'changed' ELSE EXCLUDED.state END,
    detail = EXCLUDED.detail
"""

# The same page's messages: stored and live, and under the provider's thread?
PAGE_MESSAGES = """
INSERT INTO verify_messages (message_id, thread_id, stored_thread, state, detail)
SELECT pm.message_id, pm.thread_id, s.stored_thread,
       CASE WHEN m.id IS NULL THEN 'missing'
            WHEN t.id IS NULL OR t.deleted_at IS NOT NULL
                 OR t.provider_thread_id IS DISTINCT FROM pm.thread_id
                 OR m.provider_thread_id IS DISTINCT FROM pm.thread_id THEN 'stale'
            ELSE 'ok' END,
       CASE WHEN m.id IS NULL THEN NULL
            WHEN t.id IS NULL THEN format('stored without a thread row (provider_thread_id %s)',
                                          coalesce(m.provider_thread_id, 'none'))
            WHEN t.deleted_at IS NOT NULL THEN format('stored under deleted thread %s',
                                                      t.provider_thread_id)
            WHEN t.provider_thread_id IS DISTINCT FROM pm.thread_id
                 OR m.provider_thread_id IS DISTINCT FROM pm.thread_id
                 THEN format('stored under thread %s (provider_thread_id %s)',
                             t.provider_thread_id, coalesce(m.provider_thread_id, 'none')) END
FROM unnest($2::text[], $3::text[]) AS pm(message_id, thread_id)
LEFT JOIN flux_email_messages m
  ON m.inbox_id = $1 AND m.provider_message_id = pm.message_id AND m.deleted_at IS NULL
LEFT JOIN flux_email_threads t ON t.id = m.thread_id
CROSS JOIN LATERAL (SELECT coalesce(t.provider_thread_id, m.provider_thread_id)
                    AS stored_thread) s
ON CONFLICT (message_id) DO UPDATE
SET thread_id = EXCLUDED.thread_id, stored_thread = EXCLUDED.stored_thread,
    state = EXCLUDED.state, detail = EXCLUDED.detail
"""

# The listing of threads that changed during the run: known to the provider, not compared.
CHANGED_THREADS = """
INSERT INTO verify_threads (thread_id, latest, messages, state)
SELECT t, l, 0, 'changed' FROM unnest($1::text[], $2::timestamptz[]) AS p(t, l)
ON CONFLICT (thread_id) DO UPDATE SET latest = EXCLUDED.latest, state = 'changed'
"""
CHANGED_MESSAGES = """
INSERT INTO verify_messages (message_id, thread_id, state)
SELECT m, t, 'ok' FROM unnest($1::text[], $2::text[]) AS p(m, t)
ON CONFLICT (message_id) DO UPDATE SET thread_id = EXCLUDED.thread_id
"""

EXTRA_THREADS = """
INSERT INTO verify_extra_threads (thread_id, row_id)
SELECT t.provider_thread_id, t.id FROM flux_email_threads t
WHERE t.inbox_id = $1 AND t.deleted_at IS NULL
  AND t.last_message_at >= $2 AND ($3::timestamptz IS NULL OR t.last_message_at < $3)
  AND t.last_message_at < $4
  AND NOT EXISTS (SELECT 1 FROM verify_threads v WHERE v.thread_id = t.provider_thread_id)
"""
# Live messages that the provider does not have (in no listed thread), under the compared
# threads, the extra threads, or soft-deleted threads of the window (a thread deleted while its
# messages were not); messages newer than the start are mail arriving during the run.
EXTRA_MESSAGES = """
INSERT INTO verify_extra_messages (message_id, thread_id)
WITH scope AS (
    SELECT t.id AS row_id, t.provider_thread_id FROM verify_threads v
    JOIN flux_email_threads t ON t.inbox_id = $1 AND t.provider_thread_id = v.thread_id
    WHERE v.state <> 'changed'
    UNION ALL
    SELECT e.row_id, e.thread_id FROM verify_extra_threads e
    UNION ALL
    SELECT t.id, t.provider_thread_id FROM flux_email_threads t
    WHERE t.inbox_id = $1 AND t.deleted_at IS NOT NULL
      AND t.last_message_at >= $3 AND ($4::timestamptz IS NULL OR t.last_message_at < $4)
      AND t.last_message_at < $2
      AND NOT EXISTS (SELECT 1 FROM verify_threads v WHERE v.thread_id = t.provider_thread_id)
)
SELECT m.provider_message_id, s.provider_thread_id
FROM scope s JOIN flux_email_messages m ON m.thread_id = s.row_id
WHERE m.deleted_at IS NULL AND (m.sent_at IS NULL OR m.sent_at < $2)
  AND NOT EXISTS (SELECT 1 FROM verify_messages v WHERE v.message_id = m.provider_message_id)
UNION
SELECT m.provider_message_id, m.provider_thread_id
FROM verify_threads v
JOIN flux_email_messages m ON m.inbox_id = $1 AND m.provider_thread_id = v.thread_id
WHERE v.state <> 'changed' AND m.thread_id IS NULL AND m.deleted_at IS NULL
  AND (m.sent_at IS NULL OR m.sent_at < $2)
  AND NOT EXISTS (SELECT 1 FROM verify_messages x WHERE x.message_id = m.provider_message_id)
ON CONFLICT (message_id) DO NOTHING
"""

THREAD_COUNTS = """
SELECT count(*) FILTER (WHERE state <> 'changed') AS expected,
       count(*) FILTER (WHERE state = 'missing') AS missing,
       count(*) FILTER (WHERE state = 'stale') AS stale,
       count(*) FILTER (WHERE state = 'changed') AS changed,
       (SELECT count(*) FROM verify_extra_threads) AS extra
FROM verify_threads
"""
MESSAGE_COUNTS = """
SELECT count(*) AS expected,
       count(*) FILTER (WHERE m.state = 'missing') AS missing,
       count(*) FILTER (WHERE m.state = 'stale') AS stale,
       (SELECT count(*) FROM verify_extra_messages) AS extra
FROM verify_messages m JOIN verify_threads t ON t.thread_id = m.thread_id
WHERE t.state <> 'changed'
"""
SAMPLES: dict[str, str] = {
    "missing_threads": "SELECT thread_id AS id, NULL AS detail FROM verify_threads"
                       " WHERE state = 'missing' ORDER BY thread_id LIMIT $1",
    "stale_threads": "SELECT thread_id AS id, detail FROM verify_threads"
                     " WHERE state = 'stale' ORDER BY thread_id LIMIT $1",
    "extra_threads": "SELECT thread_id AS id, NULL AS detail FROM verify_extra_threads"
                     " ORDER BY thread_id LIMIT $1",
    "missing_messages": "SELECT m.message_id AS id, 'thread ' || m.thread_id AS detail"
                        " FROM verify_messages m JOIN verify_threads t USING (thread_id)"
                        " WHERE m.state = 'missing' AND t.state <> 'changed'"
                        " ORDER BY m.message_id LIMIT $1",
    "stale_messages": "SELECT m.message_id AS id,"
                      " m.detail || ', at the provider under ' || m.thread_id AS detail"
                      " FROM verify_messages m JOIN verify_threads t USING (thread_id)"
                      " WHERE m.state = 'stale' AND t.state <> 'changed'"
                      " ORDER BY m.message_id LIMIT $1",
    "extra_messages": "SELECT message_id AS id, 'thread ' || coalesce(thread_id, 'none')"
                      " AS detail FROM verify_extra_messages ORDER BY message_id LIMIT $1",
}

# The threads --repair queues, each with the first reason that applies.
REPAIR_SET = """
INSERT INTO verify_repair (thread_id, reason)
SELECT DISTINCT ON (thread_id) thread_id, reason FROM (
    SELECT thread_id, 1 AS rank, 'missing thread' AS reason FROM verify_threads
    WHERE state = 'missing'
    UNION ALL
    SELECT thread_id, 2, 'stale thread' FROM verify_threads WHERE state = 'stale'
    UNION ALL
    SELECT thread_id, 3, 'extra thread' FROM verify_extra_threads
    UNION ALL
    SELECT m.thread_id, 4, 'message ' || m.state FROM verify_messages m
    JOIN verify_threads t USING (thread_id)
    WHERE m.state IN ('missing', 'stale') AND t.state <> 'changed'
    UNION ALL
    SELECT m.stored_thread, 5, 'holds a misplaced message' FROM verify_messages m
    JOIN verify_threads t USING (thread_id)
    WHERE m.state = 'stale' AND t.state <> 'changed' AND m.stored_thread IS NOT NULL
    UNION ALL
    SELECT thread_id, 6, 'holds an extra message' FROM verify_extra_messages
    WHERE thread_id IS NOT NULL
) r
ORDER BY thread_id, rank
"""
REPAIR_BATCH_SQL = """
WITH b AS (
    SELECT thread_id FROM verify_repair WHERE msg_id IS NULL ORDER BY thread_id LIMIT $2
)
UPDATE verify_repair r SET msg_id = queue_thread_sync($1, r.thread_id)
FROM b WHERE r.thread_id = b.thread_id
RETURNING r.thread_id, r.reason, r.msg_id
"""
REPAIR_REASONS = "SELECT reason, count(*) AS n FROM verify_repair GROUP BY reason ORDER BY reason"


class VerifyError(Exception):
    """Verification could not run or finish; the message says why, the code is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Counts:
    expected: int = 0  # at the provider
    present: int = 0  # of those, live in the database
    missing: int = 0  # at the provider, not live in the database
    extra: int = 0  # live in the database within the window, not at the provider
    stale: int = 0  # present but out of date (threads) / under the wrong thread (messages)

    @property
    def drift(self) -> int:
        return self.missing + self.extra + self.stale


@dataclass
class Sample:
    id: str
    detail: str | None = None


@dataclass
class Repair:
    config_id: uuid.UUID
    queued: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    sample: list[Sample] = field(default_factory=list)  # thread id, reason


@dataclass
class Inbox:
    id: uuid.UUID
    provider: str
    grant_id: str | None
    email: str
    status: str
    config_id: uuid.UUID | None
    backfill_status: str | None
    backfill_kind: str | None
    backfill_since: datetime | None
    backfill_until: datetime | None


@dataclass
class Report:
    inbox_id: uuid.UUID
    email: str
    grant_id: str
    inbox_status: str
    config_id: uuid.UUID | None
    backfill_status: str | None
    since: datetime
    until: datetime | None
    started_at: datetime
    changed_after: datetime  # threads with a latest message at or after this are not compared
    threads: Counts = field(default_factory=Counts)
    messages: Counts = field(default_factory=Counts)
    changed_during_run: int = 0
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    pages: int = 0
    requests: int = 0  # HTTP requests sent (retries included)
    rate_limited: int = 0  # 429 answers
    waited_seconds: float = 0.0  # for budget slots
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    repair: Repair | None = None

    @property
    def drift(self) -> int:
        return self.threads.drift + self.messages.drift

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["drift"] = self.drift
        out["threads"]["drift"] = self.threads.drift
        out["messages"]["drift"] = self.messages.drift
        return out


# --------------------------------------------------------------------------- inbox
async def find_inbox(pool: asyncpg.Pool, ref: str) -> Inbox:
    """The inbox named by its uuid, grant id or email; VerifyError when none or several."""
    try:
        as_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        as_id = None
    rows = await pool.fetch(FIND_INBOX, as_id, ref)
    if not rows:
        raise VerifyError(f"no inbox {ref!r} (give its id, grant id or email)")
    exact = [r for r in rows if r["id"] == as_id]
    if exact:
        rows = exact
    if len(rows) > 1:
        listed = ", ".join(f"{r['id']} ({r['email']}, grant {r['grant_id']})" for r in rows)
        raise VerifyError(f"{ref!r} names {len(rows)} inboxes: {listed}; give the inbox id",
                          EXIT_USAGE)
    return Inbox(**dict(rows[0]))


# --------------------------------------------------------------------------- verification
class _Restart(Exception):
    """The provider rejected a page token (expired cursor): list again from the first page."""


@dataclass
class _Listing:
    after: datetime | None
    before: datetime | None


class Verifier:
    def __init__(self, pool: asyncpg.Pool, provider: MailProvider, inbox: Inbox, *,
                 since: datetime | None = None, until: datetime | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if inbox.grant_id is None:
            raise VerifyError(f"inbox {inbox.id} has no grant", EXIT_USAGE)
        self.pool = pool
        self.provider = provider
        self.inbox = inbox
        self.grant_id: str = inbox.grant_id
        started = now()
        since = since or inbox.backfill_since or started - DEFAULT_WINDOW
        until = until if until is not None else inbox.backfill_until
        if until is not None and until <= since:
            raise VerifyError(f"empty window ({since.isoformat()} .. {until.isoformat()})",
                              EXIT_USAGE)
        self.report = Report(
            inbox_id=inbox.id, email=inbox.email, grant_id=self.grant_id,
            inbox_status=inbox.status, config_id=inbox.config_id,
            backfill_status=inbox.backfill_status,
            # Provider filters take whole seconds; compare stored rows on the same edges.
            since=_floor(since), until=_floor(until) if until is not None else None,
            started_at=started, changed_after=_floor(started - SKEW))
        self.requests = 0
        # One snapshot for a page's two statements, and for the extras; None when the run is
        # one transaction (behind a pooler), inside which no other isolation can be chosen.
        self.isolation: str | None = "repeatable_read"

    async def run(self, *, repair: bool = False) -> Report:
        r = self.report
        clock = time.monotonic()
        self._notes()
        async with self.pool.acquire() as conn:
            if await db.through_pooler(conn):
                log.warning("[Verify] behind a connection pooler: the run is one transaction "
                            "(NOVA_DATABASE_DIRECT_URL, a direct connection, avoids it)")
                self.isolation = None
                async with conn.transaction():  # a failure rolls the temp tables back too
                    await conn.execute(SETUP)
                    await self._verify(conn, repair)
                    await conn.execute(TEARDOWN)
            else:
                await conn.execute(SETUP)
                try:
                    await self._verify(conn, repair)
                finally:
                    await conn.execute(TEARDOWN)
        r.seconds = round(time.monotonic() - clock, 3)
        return r

    async def _verify(self, conn: asyncpg.Connection, repair: bool) -> None:
        await self._list_all(conn)
        await self._conclude(conn)
        if repair:
            self.report.repair = await self._repair(conn)

    def _notes(self) -> None:
        r, inbox = self.report, self.inbox
        if inbox.config_id is None:
            r.notes.append("the inbox has no configuration (never backfilled): window is one "
                           "year back; --repair needs one (nova backfill start)")
        elif inbox.backfill_status in ("queued", "discovering", "thread_sync"):
            r.notes.append(f"a backfill is running ({inbox.backfill_status}): drift is expected "
                           "until it completes")
        elif inbox.backfill_status == "failed":
            r.notes.append("the last backfill failed (nova backfill resume)")
        if inbox.backfill_kind == "catch_up":
            r.notes.append("the configuration's range is a catch-up's: pass --since for the "
                           "range of the full backfill")
        if inbox.status != "active":
            r.notes.append(f"the inbox is {inbox.status}: thread sync parks its threads until "
                           "it is active again")

    # ------------------------------------------------------------------ listing
    async def _list_all(self, conn: asyncpg.Connection) -> None:
        r = self.report
        main = _Listing(r.since, r.until)
        await self._listing(conn, main, changed=False)
        # Threads that got mail during the main pass moved to its first page, already read:
        # list what changed since the start (none can move into a range that ended before).
        if r.until is None or r.until > r.changed_after:
            await self._listing(conn, _Listing(r.changed_after, r.until), changed=True)

    async def _listing(self, conn: asyncpg.Connection, listing: _Listing, *,
                       changed: bool) -> None:
        restarted = False
        while True:
            try:
                await self._pages(conn, listing, changed)
                return
            except _Restart as exc:
                if restarted:
                    raise VerifyError(f"the provider rejected a page token twice: "
                                      f"{exc.__cause__}") from exc
                log.warning("[Verify] page token rejected (%s): listing again from the first "
                            "page", exc.__cause__)
                restarted = True

    async def _pages(self, conn: asyncpg.Connection, listing: _Listing, changed: bool) -> None:
        # The next page is fetched while this one is compared with the database.
        fetch = asyncio.ensure_future(self._page(listing, None))
        try:
            while True:
                page = await fetch
                self.report.pages += 1
                if page.next_page_token is not None:
                    fetch = asyncio.ensure_future(self._page(listing, page.next_page_token))
                if changed:
                    await self._save_changed(conn, page)
                else:
                    await self._compare(conn, page)
                if self.report.pages % 25 == 0:
                    log.info("[Verify] inbox=%s pages=%d requests=%d", self.inbox.id,
                             self.report.pages, self.requests)
                if page.next_page_token is None:
                    return
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _page(self, listing: _Listing, token: str | None) -> Page[Thread]:
        """One page, trying again after a 429: the budget holds the grant for its Retry-After,
        so the next try waits by itself (as ProviderProcessor.call does)."""
        limited = 0
        while True:
            try:
                self.requests += 1
                return await self.provider.list_threads_page(
                    self.grant_id, page_token=token, limit=PAGE_LIMIT,
                    received_after=listing.after, received_before=listing.before)
            except RateLimited as exc:
                self.report.rate_limited += 1
                limited += 1
                if limited >= MAX_RATE_LIMITED_IN_A_ROW:
                    raise VerifyError(f"rate limited {limited} times in a row by the provider "
                                      f"(last: {exc}); try again later") from exc
            except InvalidApiKey as exc:
                raise VerifyError(f"the provider refused the API key (NYLAS_API_KEY / "
                                  f"NYLAS_API_URI): {exc}") from exc
            except GrantNotFound as exc:
                raise VerifyError(f"grant {self.grant_id} does not exist at the provider "
                                  f"(deleted): {exc}") from exc
            except Unauthorized as exc:
                raise VerifyError(await self._unauthorized(exc)) from exc
            except Permanent as exc:
                if token is not None and exc.status == 400:
                    raise _Restart() from exc
                raise VerifyError(f"the provider refused the listing: {exc!r}") from exc
            except ProviderError as exc:
                raise VerifyError(f"the provider failed: {exc!r}") from exc

    async def _unauthorized(self, error: Unauthorized) -> str:
        """What a 401/403 means, asked of the grant (as nova.ratelimit confirms it)."""
        head = f"the provider answered {error.status} ({error.error_type or 'unauthorized'})"
        try:
            grant = await self.provider.get_grant(self.grant_id)
        except (Unauthorized, InvalidApiKey):
            return f"{head}: the API key is refused (check NYLAS_API_KEY / NYLAS_API_URI)"
        except GrantNotFound:
            return f"{head}: grant {self.grant_id} no longer exists (deleted)"
        except ProviderError as exc:
            return f"{head}; the grant check failed too ({exc}): try again later"
        if grant.is_valid:
            return f"{head} although grant {self.grant_id} is valid: try again later"
        return (f"{head}: grant {self.grant_id} is {grant.status or 'not valid'}; the user must "
                "re-authenticate")

    # ------------------------------------------------------------------ comparison
    async def _compare(self, conn: asyncpg.Connection, page: Page[Thread]) -> None:
        threads: dict[str, datetime | None] = {}
        messages: dict[str, str] = {}
        for t in page.items:
            threads[t.id] = t.latest_message_date
            for mid in t.message_ids:
                messages[mid] = t.id
        if not threads:
            return
        mids, mtids = list(messages), list(messages.values())
        # One snapshot for both statements: the thread and message verdicts agree.
        async with conn.transaction(isolation=self.isolation):
            await conn.execute(PAGE_THREADS, self.inbox.id, list(threads),
                               list(threads.values()), mids, mtids, self.report.changed_after)
            await conn.execute(PAGE_MESSAGES, self.inbox.id, mids, mtids)

    async def _save_changed(self, conn: asyncpg.Connection, page: Page[Thread]) -> None:
        threads = {t.id: t.latest_message_date for t in page.items}
        messages = {mid: t.id for t in page.items for mid in t.message_ids}
        if threads:
            async with conn.transaction():
                await conn.execute(CHANGED_THREADS, list(threads), list(threads.values()))
                await conn.execute(CHANGED_MESSAGES, list(messages), list(messages.values()))

    async def _conclude(self, conn: asyncpg.Connection) -> None:
        r = self.report
        await conn.execute("ANALYZE verify_threads; ANALYZE verify_messages")
        async with conn.transaction(isolation=self.isolation):
            await conn.execute(EXTRA_THREADS, self.inbox.id, r.since, r.until, r.changed_after)
            await conn.execute(EXTRA_MESSAGES, self.inbox.id, r.changed_after, r.since, r.until)
        t = await conn.fetchrow(THREAD_COUNTS)
        m = await conn.fetchrow(MESSAGE_COUNTS)
        r.threads = Counts(expected=t["expected"], present=t["expected"] - t["missing"],
                           missing=t["missing"], extra=t["extra"], stale=t["stale"])
        r.messages = Counts(expected=m["expected"], present=m["expected"] - m["missing"],
                            missing=m["missing"], extra=m["extra"], stale=m["stale"])
        r.changed_during_run = t["changed"]
        for name, sql in SAMPLES.items():
            rows = await conn.fetch(sql, SAMPLE)
            if rows:
                r.samples[name] = [Sample(x["id"], x["detail"]) for x in rows]
        r.requests = self.requests

    async def _repair(self, conn: asyncpg.Connection) -> Repair | None:
        config_id = self.inbox.config_id
        if self.report.drift == 0:
            return Repair(config_id) if config_id else None
        if config_id is None:  # the report is still worth printing; the caller fails
            return None
        repair = Repair(config_id)
        await conn.execute(REPAIR_SET)
        repair.reasons = {x["reason"]: x["n"] for x in await conn.fetch(REPAIR_REASONS)}
        while True:  # batches of their own transaction: a huge repair holds no long locks
            rows = await conn.fetch(REPAIR_BATCH_SQL, config_id, REPAIR_BATCH)
            if not rows:
                break
            repair.queued += len(rows)
            for x in rows:
                if len(repair.sample) < SAMPLE:
                    repair.sample.append(Sample(x["thread_id"], x["reason"]))
        repair.sample.sort(key=lambda s: s.id)
        log.info("[Verify] queued %d thread syncs inbox=%s config=%s", repair.queued,
                 self.inbox.id, config_id)
        return repair


def _floor(value: datetime) -> datetime:
    return value.replace(microsecond=0)


async def verify_inbox(pool: asyncpg.Pool, provider: MailProvider, inbox: Inbox, *,
                       repair: bool = False, since: datetime | None = None,
                       until: datetime | None = None) -> Report:
    """Compare one inbox with the provider (and, with ``repair``, queue the affected threads).
    ``provider`` should be budgeted (nova.ratelimit.budgeted_nylas / provider_from_settings)."""
    return await Verifier(pool, provider, inbox, since=since, until=until).run(repair=repair)


# --------------------------------------------------------------------------- output
def _ts(value: datetime | None) -> str:
    return "now" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_LABELS = {
    "missing_threads": "Missing threads (at the provider, not stored)",
    "stale_threads": "Stale threads",
    "extra_threads": "Extra threads (stored in the window, not at the provider)",
    "missing_messages": "Missing messages",
    "stale_messages": "Stale messages (under the wrong thread)",
    "extra_messages": "Extra messages (stored, not at the provider)",
}


def format_report(r: Report) -> str:
    counts = {"threads": r.threads, "messages": r.messages}
    lines = [
        f"Inbox {r.inbox_id} ({r.email}, grant {r.grant_id}, {r.inbox_status})",
        f"Window: {_ts(r.since)} .. {_ts(r.until)}"
        + (f" (configuration {r.config_id}, backfill {r.backfill_status})" if r.config_id
           else " (no configuration)"),
        f"Provider: {r.pages} page(s), {r.requests} request(s), {r.rate_limited} rate-limited,"
        f" {r.waited_seconds:.1f}s waiting for budget, {r.seconds:.1f}s in all",
        "",
        f"{'':<10}{'expected':>10}{'present':>10}{'missing':>10}{'extra':>10}{'stale':>10}",
    ]
    for name, c in counts.items():
        lines.append(f"{name:<10}{c.expected:>10,}{c.present:>10,}{c.missing:>10,}"
                     f"{c.extra:>10,}{c.stale:>10,}")
    lines.append("")
    lines.append(f"{r.changed_during_run:,} thread(s) with mail at or after {_ts(r.changed_after)}"
                 " (arriving during the run): not compared, not counted as drift.")
    for note in r.notes:
        lines.append(f"Note: {note}.")
    for key, label in _LABELS.items():
        sample = r.samples.get(key)
        if not sample:
            continue
        total = _category_total(r, key)
        more = f" (first {len(sample)} of {total:,})" if total > len(sample) else ""
        lines.append(f"{label}{more}:")
        lines.extend(f"  {s.id}" + (f"  {s.detail}" if s.detail else "") for s in sample)
    if r.drift == 0:
        lines.append("No drift.")
    else:
        lines.append(f"Drift: {r.threads.drift:,} thread(s), {r.messages.drift:,} message(s).")
    if r.repair is not None and r.repair.queued:
        why = ", ".join(f"{n:,} {reason}" for reason, n in r.repair.reasons.items())
        lines.append(f"Repair: queued {r.repair.queued:,} thread sync(s) on configuration "
                     f"{r.repair.config_id} ({why}):")
        lines.extend(f"  {s.id}  {s.detail}" for s in r.repair.sample)
        if r.repair.queued > len(r.repair.sample):
            lines.append(f"  ... and {r.repair.queued - len(r.repair.sample):,} more")
        lines.append("Thread sync workers (nova.threads) apply them; run verify again after.")
    elif r.drift:
        lines.append("Run with --repair to queue the affected threads for sync.")
    return "\n".join(lines)


def _category_total(r: Report, key: str) -> int:
    kind, _, side = key.partition("_")
    return int(getattr(r.threads if side == "threads" else r.messages, kind))


def exit_code(r: Report, repair: bool) -> int:
    if r.drift == 0:
        return EXIT_OK
    if not repair:
        return EXIT_DRIFT
    return EXIT_OK if r.repair is not None else EXIT_FAILED


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


# --------------------------------------------------------------------------- command
async def _run(settings: Settings, url: str, args: argparse.Namespace) -> int:
    from nova.ratelimit import ProviderBudget, provider_from_settings

    if settings.database_direct_url and not getattr(args, "database_url", None):
        url = settings.database_direct_url  # temp tables need a session (module doc)
    pool = await db.create_pool(url, min_size=1, max_size=3)
    try:
        inbox = await find_inbox(pool, args.inbox)
        if inbox.provider != "nylas":
            raise VerifyError(f"inbox {inbox.id} is a {inbox.provider} inbox: verify knows "
                              "Nylas only", EXIT_USAGE)
        budget = ProviderBudget.from_settings(pool, settings)
        provider, client = provider_from_settings(settings, budget, transient_retries=3)
        sent = 0

        async def count(_: httpx.Request) -> None:
            nonlocal sent
            sent += 1

        client.event_hooks["request"].append(count)
        try:
            verifier = Verifier(pool, provider, inbox, since=args.since, until=args.until)
            report = await verifier.run(repair=args.repair)
            report.requests, report.waited_seconds = sent, round(budget.waited, 3)
        finally:
            await provider.aclose()
            await client.aclose()
    finally:
        await pool.close()
    if args.json:
        print(json.dumps(report.to_json(), default=_json_default, indent=2))
    else:
        print(format_report(report))
    code = exit_code(report, args.repair)
    if code == EXIT_FAILED:
        print(f"nova: verify: inbox {inbox.id} has no configuration to queue thread syncs on: "
              "start a backfill first (nova backfill start)", file=sys.stderr)
    return code


def main(settings: Settings, url: str, args: argparse.Namespace) -> int:
    """`nova verify`: the report on stdout, errors on stderr, the exit code documented above."""
    if settings.nylas_api_key is None:
        print("nova: NYLAS_API_KEY is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(settings, url, args))
    except VerifyError as exc:
        print(f"nova: verify: {exc}", file=sys.stderr)
        return exc.code
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"nova: verify: database: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except httpx.HTTPError as exc:  # not classified by the provider (should not happen)
        print(f"nova: verify: provider request failed: {exc!r}", file=sys.stderr)
        return EXIT_FAILED
