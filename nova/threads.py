"""`python -m nova.threads`: sync one thread of a backfill per `thread_sync_jobs` message.

Run any number of copies. For each job:

1. load the queued thread; resolve a missing grant from its inbox;
2. an inbox that is not active makes no API call: `auth_expired` / `disabled` park the thread
   (`queued`, no queue message, error_message says why) and the completion monitor re-queues it
   once the inbox is active again; `revoked` fails it;
3. mark it `processing` (attempts + 1, started_at) -- only if the row still names this job
   (`queue_msg_id`): a thread re-queued under a running sync belongs to the newer job --, then
   fetch its messages with ONE request per 200 (the messages list filtered by thread: the
   thread object itself came with discovery's listing, and threads whose one message came
   whole with it never get a job); bodies are rendered to text off the event loop;
4. ONE statement, one round trip (`JobContext.commit`): the job's queue message is deleted
   (only while the job still holds it) and the thread written, its rows taken in the one lock
   order (DESIGN.md; sql/030_backfill.sql): first the thread row and its messages -- upsert
   the messages and their attachment rows, soft-delete the stored ones the provider no longer
   lists, derive the thread row from the messages, all versioned with
   `store.sync_version()` --, then set the queued thread `completed` (again only for this job:
   when a newer job took the thread over, nothing is written and only the delete commits)
   (`store.WRITE_SYNCED_THREAD`). A thread gone at the provider takes a transaction of its
   own (`write_gone_thread`). The progress counters take no lock (delta rows). The log line counts
   the requests the thread took.

A 401 is confirmed with the grant itself (nova.ratelimit): an expired grant marks the inbox
`auth_expired` and parks the thread, a deleted one marks it `revoked` and fails its threads, a
valid one makes the 401 a transient error, and a refused API key stops the processor.

Provider calls are paced by the per-grant budget shared through Postgres (nova.ratelimit); a 429
holds the grant for every worker and the call is tried again after the hold. Max 5 attempts;
then the queued thread is `failed` with its error and the message archived, so completion is
never held up by one bad thread. Failed is not forever: the thread gets NOVA_THREAD_RETRY_ROUNDS
more rounds of 5 attempts, the first NOVA_THREAD_RETRY_SECONDS after the failure and each later
one 6 times as long after the last (10 min, 1 h, 6 h by default), started by the completion
monitor (`retry_failed_threads`) whether or not its backfill completed meanwhile. A thread
failed because its inbox was revoked gets none: re-activating the inbox takes it back.
THREAD_DELAY_MS / MESSAGE_DELAY_MS add fixed pauses when set.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from functools import partial
from typing import Any, ClassVar

import asyncpg

from nova import store
from nova.config import Settings
from nova.processor import ProviderProcessor, refuse_inbox
from nova.providers import (
    AuthExpired,
    GrantNotFound,
    NotFound,
    Permanent,
)
from nova.providers.models import Message
from nova.runtime import (
    Defer,
    GiveUp,
    Job,
    JobContext,
    Worker,
)
from nova.search_index import SearchIndexer

log = logging.getLogger("nova.threads")

PAGE_LIMIT = 200  # the messages list's maximum page size


LOAD = """
SELECT q.id, q.config_id, q.inbox_id, q.provider_thread_id, q.status, q.queue_msg_id,
       coalesce(q.grant_id, i.grant_id) AS grant_id, i.status AS inbox_status,
       i.provider
FROM queued_threads q JOIN flux_inboxes i ON i.id = q.inbox_id
WHERE q.id = $1
"""
FIND = "SELECT id FROM queued_threads WHERE config_id = $1 AND provider_thread_id = $2"
# After a thread's commit: was it its backfill's last open one? (an index probe; the monitor's
# poll stays the safety net). Then complete_backfill_if_done re-counts and decides.
LAST_OPEN = """
SELECT c.backfill_status = 'thread_sync' AND c.discovery_completed_at IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM queued_threads q WHERE q.config_id = c.id
                       AND q.status IN ('queued', 'processing'))
FROM flux_inbox_configurations c WHERE c.id = $1
"""
COMPLETE_BACKFILL = "SELECT * FROM complete_backfill_if_done($1)"
# START and COMPLETE act only for the job the row names (queue_msg_id): a thread re-queued
# under a running sync (recovery, a round of changed threads) belongs to its newer job, and
# the older one commits nothing. One sync of a thread at a time.
START = """
UPDATE queued_threads
SET status = 'processing', attempts = attempts + 1, started_at = now(),
    grant_id = coalesce(grant_id, $3)
WHERE id = $1 AND queue_msg_id = $2 AND status IN ('queued', 'processing')
RETURNING id
"""
COMPLETE = """
UPDATE queued_threads
SET status = 'completed', message_count = $3, processed_at = now(), error_message = $4,
    retry_at = NULL
WHERE id = $1 AND queue_msg_id = $2 AND status = 'processing'
RETURNING id
"""
# A job put back before it fetched anything (runtime.Defer: its grant has no budget now):
# its start is undone, the attempt with it.
UNSTART = """
UPDATE queued_threads SET status = 'queued', attempts = greatest(attempts - 1, 0)
WHERE id = $1 AND queue_msg_id = $2 AND status = 'processing'
"""
PARK = """
UPDATE queued_threads
SET status = 'queued', queue_msg_id = NULL, error_message = $3
WHERE id = $1 AND queue_msg_id = $2
"""
# A final failure schedules the next retry round from $5, the delays in seconds of the rounds
# (empty: none); a retry (not final) keeps the round's watch (retry_failed_threads).
FAIL = """
UPDATE queued_threads
SET status = CASE WHEN $4 THEN 'failed' ELSE 'queued' END, error_message = $3,
    processed_at = CASE WHEN $4 THEN now() ELSE processed_at END,
    retry_at = CASE WHEN NOT $4 THEN retry_at
                    WHEN retry_rounds < cardinality($5::float8[])
                    THEN now() + make_interval(secs => ($5::float8[])[retry_rounds + 1])
               END
WHERE id = $1 AND queue_msg_id = $2 AND status <> 'completed'
"""
NO_RETRY: list[float] = []
RETRY_GROWTH = 6  # each later round waits this many times longer: 10 min, 1 h, 6 h


def retry_schedule(settings: Settings) -> list[float]:
    """The delays of a failed thread's retry rounds, in seconds (NOVA_THREAD_RETRY_ROUNDS,
    NOVA_THREAD_RETRY_SECONDS)."""
    first = settings.thread_retry_seconds
    return [first * RETRY_GROWTH ** n for n in range(settings.thread_retry_rounds)]


SUPERSEDED = "superseded during sync: nothing written"


class Superseded(Exception):
    """COMPLETE found a newer job named on the queued thread: roll this one's writes back."""


class ThreadSyncProcessor(ProviderProcessor):
    queue: ClassVar[str] = "thread_sync_jobs"
    component: ClassVar[str] = "Threads"
    max_attempts: ClassVar[int] = 5

    def __init__(self, *args: Any, retry_delays: list[float] | None = None,
                 **kw: Any) -> None:
        """``retry_delays``: the retry rounds' delays in seconds (default: from the settings,
        `retry_schedule`)."""
        super().__init__(*args, **kw)
        self.retry_delays = (retry_schedule(self.settings) if retry_delays is None
                             else list(retry_delays))
        self._indexing: asyncio.Task[None] | None = None

    @classmethod
    def niceness(cls, settings: Settings) -> int:
        """Bulk work: a thread sync yields the CPU to the webhook intake (NOVA_THREADS_NICE)."""
        return settings.threads_nice

    async def setup(self, worker: Worker) -> None:
        await super().setup(worker)
        # The search index step (nova.search_index) on the worker's pool: mail is indexed
        # where most of it is written, at the pace it arrives.
        self._indexer = SearchIndexer(worker.pool)
        self._indexing = asyncio.create_task(self._indexer.run(), name="search-index")

    async def teardown(self) -> None:
        if self._indexing is not None:
            self._indexer.stop()
            await asyncio.gather(self._indexing, return_exceptions=True)
            self._indexing = None
        await super().teardown()

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        row = await _load(ctx.pool, job)
        if row is None:
            return "queued thread no longer exists"
        thread_id = row["provider_thread_id"]
        if row["status"] == "completed":
            return f"thread={thread_id} already completed"
        if row["queue_msg_id"] != job.msg_id:
            return f"thread={thread_id} superseded by job {row['queue_msg_id']}"
        if not row["grant_id"]:
            raise GiveUp("inbox has no grant")
        if row["inbox_status"] != "active":
            return await self._inactive(ctx, row, job)
        self.provider_for(row["provider"])  # not configured here: the job waits, untouched

        if await ctx.pool.fetchval(START, row["id"], job.msg_id, row["grant_id"]) is None:
            return f"thread={thread_id} superseded while starting"
        with store.fetch_version() as fetched:  # provider state as of (at least) its version
            try:
                messages, requests = await self._fetch(row["provider"], row["grant_id"],
                                                       thread_id)
            except AuthExpired:
                return await self._grant_lost(ctx, row, job, "auth_expired")
            except GrantNotFound:
                return await self._grant_lost(ctx, row, job, "revoked")
            except Defer:
                await ctx.pool.execute(UNSTART, row["id"], job.msg_id)
                raise
        version = fetched()
        prepared = await store.prepare_messages(messages)

        if messages:  # the write and the queue delete: one statement, one round trip
            # (superseded, the call writes nothing and returns false: only the delete commits)
            written = await ctx.commit(store.WRITE_SYNCED_THREAD, *store.synced_thread_args(
                row["inbox_id"], thread_id, prepared, version, row["id"], job.msg_id))
            outcome = None if written else SUPERSEDED
        else:  # deleted at the provider since it was listed
            async with ctx.transaction() as conn:
                outcome = await write_gone_thread(conn, row, job.msg_id, version)
        if outcome is not None:
            return f"thread={thread_id} {outcome} requests={requests}"
        await self._complete_if_last(ctx.pool, row["config_id"])
        if self.settings.thread_delay_ms:
            await asyncio.sleep(self.settings.thread_delay_ms / 1000)
        return f"thread={thread_id} messages={len(messages)} requests={requests}"

    async def _complete_if_last(self, pool: asyncpg.Pool, config_id: uuid.UUID) -> None:
        """The backfill's last thread marks it completed, within moments of its commit
        rather than at the monitor's next check."""
        if not await pool.fetchval(LAST_OPEN, config_id):
            return
        result = await pool.fetchrow(COMPLETE_BACKFILL, config_id)
        if result["outcome"] == "completed":
            log.info("[Threads] Config %s... completed threads=%d (its last thread)",
                     str(config_id)[:8], result["threads_queued"])

    async def _inactive(self, ctx: JobContext, row: asyncpg.Record, job: Job) -> str:
        status = row["inbox_status"]
        async with ctx.transaction() as conn:
            if status == "revoked":
                await conn.execute(FAIL, row["id"], job.msg_id,
                                   "inbox revoked: thread not synced", True, NO_RETRY)
                return f"thread={row['provider_thread_id']} failed: inbox revoked"
            await conn.execute(PARK, row["id"], job.msg_id,
                               f"paused: inbox is {status}; re-queued when it is active again")
        return f"thread={row['provider_thread_id']} parked: inbox {status}"

    async def _grant_lost(self, ctx: JobContext, row: asyncpg.Record, job: Job,
                          status: str) -> str:
        """The grant itself confirmed the refusal: the inbox stops, this thread waits (or, for
        a deleted grant, fails with every other thread of the inbox)."""
        async with ctx.transaction() as conn:
            await refuse_inbox(conn, row["inbox_id"], status)
            if status == "revoked":
                await conn.execute(FAIL, row["id"], job.msg_id, "grant deleted at the provider",
                                   True, NO_RETRY)
            else:
                await conn.execute(PARK, row["id"], job.msg_id,
                                   "paused: the grant expired during sync")
        return f"thread={row['provider_thread_id']} {status}: grant refused"

    async def _fetch(self, kind: str, grant_id: str,
                     thread_id: str) -> tuple[list[Message], int]:
        """Every message of the thread, through the messages list filtered by thread (200 per
        page), and the number of requests it took. No message: the thread is gone."""
        messages: list[Message] = []
        requests = 0
        token: str | None = None
        try:
            while True:
                page = await self.call(partial(
                    self.provider_for(kind).list_messages_page, grant_id,
                    thread_id=thread_id, page_token=token, limit=PAGE_LIMIT), grant_id, kind)
                requests += 1
                messages.extend(m for m in page.items if m.thread_id in (None, thread_id))
                if self.settings.message_delay_ms:
                    await asyncio.sleep(self.settings.message_delay_ms / 1000)
                if page.next_page_token is None:
                    return messages, requests
                token = page.next_page_token
        except (AuthExpired, GrantNotFound):
            raise
        except NotFound:
            return [], requests
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        row_id = await _row_id(conn, job)
        if row_id is not None:
            await conn.execute(FAIL, row_id, job.msg_id, f"{type(error).__name__}: {error}"[:2000],
                               final, self.retry_delays)


async def write_gone_thread(conn: Any, row: Any, msg_id: int, version: Any) -> str:
    """A thread the provider no longer has (no message listed), inside the job's transaction:
    its stored messages soft-deleted, then the queued thread completed (COMPLETE), in the one
    lock order. A job that a newer one superseded while it fetched (a round of changed
    threads, recovery) learns it only then: the savepoint rolls its writes back, and the job's
    transaction commits only the delete of its message. Returns the note of the log line."""
    try:
        async with conn.transaction():
            await store.soft_delete_thread(conn, row["inbox_id"], row["provider_thread_id"],
                                           version)
            if await conn.fetchval(COMPLETE, row["id"], msg_id, 0,
                                   "thread no longer exists at provider") is None:
                raise Superseded
    except Superseded:
        return SUPERSEDED
    return "gone at the provider"


async def _row_id(conn: Any, job: Job) -> int | None:
    msg = job.message
    if msg.get("queued_thread_id") is not None:
        return int(msg["queued_thread_id"])
    try:
        config_id = uuid.UUID(str(msg["config_id"]))
        thread_id = str(msg["thread_id"])
    except (KeyError, ValueError):
        return None
    return await conn.fetchval(FIND, config_id, thread_id)  # type: ignore[no-any-return]


async def _load(pool: asyncpg.Pool, job: Job) -> asyncpg.Record | None:
    try:
        row_id = await _row_id(pool, job)
    except (TypeError, ValueError) as exc:
        raise GiveUp(f"bad thread job: {job.message}") from exc
    if row_id is None:
        if "thread_id" not in job.message:
            raise GiveUp(f"thread job without a thread: {job.message}")
        return None
    return await pool.fetchrow(LOAD, row_id)  # type: ignore[no-any-return]


def main() -> int:
    return ThreadSyncProcessor.main()


if __name__ == "__main__":
    raise SystemExit(main())
