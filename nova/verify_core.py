"""The comparison core of `nova verify`, shared by every provider.

A provider's verifier (nova.verify_nylas, nova.verify_gmail) lists the provider's threads and
messages and writes its verdicts into session temp tables: `verify_threads` (per listed thread:
ok | missing | stale | changed, with why) and `verify_messages` (per listed message: ok |
missing | stale). What follows is the same for every provider and lives here: the extras (rows
stored and live in the window that the provider did not list: one anti-join against those
tables), the counts and samples of the report, and `--repair`, which queues a thread sync
(`queue_thread_sync` on the inbox's configuration) for every thread that is missing, stale,
extra, or holds a missing, misplaced or extra message. Thread sync fetches each one; a thread
the provider answers 404 for is soft-deleted with its messages, and stored messages the provider
no longer lists are soft-deleted. Nothing is deleted here.

Threads marked `changed` (mail arriving during the run, or changes still on their way through a
change feed) are known to the provider but not compared, and never count as drift.

Temp tables need a session, which a transaction pooler (PgBouncer) does not keep from one
transaction to the next: `nova verify` connects to NOVA_DATABASE_DIRECT_URL when it is set.
Without it, behind a pooler, the whole run is one transaction, which the pooler keeps on one
server connection; the statements then read at READ COMMITTED, no longer in one snapshot, and a
repair's batches commit together at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from nova import db
from nova.store import VERSION_SKEW_SECONDS
from nova.verify_report import (
    EXIT_USAGE,
    Counts,
    Inbox,
    Repair,
    Report,
    Sample,
    VerifyError,
)

log = logging.getLogger("nova.verify")

MAX_RATE_LIMITED_IN_A_ROW = 10
SAMPLE = 20  # ids shown per category
REPAIR_BATCH = 500
SKEW = timedelta(seconds=VERSION_SKEW_SECONDS)
DEFAULT_WINDOW = timedelta(days=365)

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

# Each listed message against its stored row: stored and live, and under the provider's
# thread? ``{source}`` is a fixed relation (message_id, thread_id), never input.
MESSAGE_VERDICTS = """
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
FROM {source} AS pm(message_id, thread_id)
LEFT JOIN flux_email_messages m
  ON m.inbox_id = $1 AND m.provider_message_id = pm.message_id AND m.deleted_at IS NULL
LEFT JOIN flux_email_threads t ON t.id = m.thread_id
CROSS JOIN LATERAL (SELECT coalesce(t.provider_thread_id, m.provider_thread_id)
                    AS stored_thread) s
ON CONFLICT (message_id) DO UPDATE
SET thread_id = EXCLUDED.thread_id, stored_thread = EXCLUDED.stored_thread,
    state = EXCLUDED.state, detail = EXCLUDED.detail
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
# messages were not); messages newer than the start are mail arriving during the run. With a
# message window ($5, $6: a provider that lists messages by date), only messages inside it.
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
  AND ($5::timestamptz IS NULL OR m.sent_at >= $5)
  AND ($6::timestamptz IS NULL OR m.sent_at < $6)
  AND NOT EXISTS (SELECT 1 FROM verify_messages v WHERE v.message_id = m.provider_message_id)
UNION
SELECT m.provider_message_id, m.provider_thread_id
FROM verify_threads v
JOIN flux_email_messages m ON m.inbox_id = $1 AND m.provider_thread_id = v.thread_id
WHERE v.state <> 'changed' AND m.thread_id IS NULL AND m.deleted_at IS NULL
  AND (m.sent_at IS NULL OR m.sent_at < $2)
  AND ($5::timestamptz IS NULL OR m.sent_at >= $5)
  AND ($6::timestamptz IS NULL OR m.sent_at < $6)
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


# --------------------------------------------------------------------------- verification
class Restart(Exception):
    """The provider rejected a page token (expired cursor): list again from the first page."""


def floor_second(value: datetime) -> datetime:
    return value.replace(microsecond=0)


class Verification:
    """One run against one inbox: the subclass lists the provider (`_list_all`) into the temp
    tables; this class sets them up, concludes (extras, counts, samples) and repairs."""

    setup_sql = ""  # the subclass's own temp tables, created after the shared ones
    teardown_sql = ""
    messages_windowed = False  # stored messages compared only inside the window (by date)

    def __init__(self, pool: asyncpg.Pool, provider: Any, inbox: Inbox, *,
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
            since=floor_second(since),
            until=floor_second(until) if until is not None else None,
            started_at=started, changed_after=floor_second(started - SKEW))
        self.requests = 0
        # One snapshot for a statement group; None when the run is one transaction (behind a
        # pooler), inside which no other isolation can be chosen.
        self.isolation: str | None = "repeatable_read"

    async def run(self, *, repair: bool = False) -> Report:
        r = self.report
        clock = time.monotonic()
        self._notes()
        setup = SETUP + self.setup_sql
        teardown = ";\n".join(x for x in (self.teardown_sql, TEARDOWN) if x)
        async with self.pool.acquire() as conn:
            if await db.through_pooler(conn):
                log.warning("[Verify] behind a connection pooler: the run is one transaction "
                            "(NOVA_DATABASE_DIRECT_URL, a direct connection, avoids it)")
                self.isolation = None
                async with conn.transaction():  # a failure rolls the temp tables back too
                    await conn.execute(setup)
                    await self._verify(conn, repair)
                    await conn.execute(teardown)
            else:
                await conn.execute(setup)
                try:
                    await self._verify(conn, repair)
                finally:
                    await conn.execute(teardown)
        r.seconds = round(time.monotonic() - clock, 3)
        return r

    async def _verify(self, conn: asyncpg.Connection, repair: bool) -> None:
        await self._list_all(conn)
        await self._conclude(conn)
        if repair:
            self.report.repair = await self._repair(conn)

    async def _list_all(self, conn: asyncpg.Connection) -> None:
        raise NotImplementedError

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

    async def _conclude(self, conn: asyncpg.Connection) -> None:
        r = self.report
        window = (r.since, r.until) if self.messages_windowed else (None, None)
        await conn.execute("ANALYZE verify_threads; ANALYZE verify_messages")
        async with conn.transaction(isolation=self.isolation):
            await conn.execute(EXTRA_THREADS, self.inbox.id, r.since, r.until, r.changed_after)
            await conn.execute(EXTRA_MESSAGES, self.inbox.id, r.changed_after, r.since, r.until,
                               *window)
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
