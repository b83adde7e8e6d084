"""`python -m nova.threads`: sync one thread of a backfill per `thread_sync_jobs` message.

Run any number of copies. For each job:

1. load the queued thread; resolve a missing grant from its inbox;
2. an inbox that is not active makes no API call: `auth_expired` / `disabled` park the thread
   (`queued`, no queue message, error_message says why) and the completion monitor re-queues it
   once the inbox is active again; `revoked` fails it;
3. mark it `processing` (attempts + 1, started_at), then fetch the thread and all its messages;
4. ONE transaction: upsert the thread and every message (attachment rows come with them), all
   versioned with the moment just before the fetch began, set the queued thread `completed`
   with its message_count and processed_at (triggers keep inbox_sync_stats), and delete the
   queue message.

Provider calls are paced by the per-grant budget shared through Postgres (nova.ratelimit); a 429
holds the grant for every worker and the call is tried again after the hold. Max 5 attempts;
then the queued thread is `failed` with its error and the message archived, so completion is
never held up by one bad thread. THREAD_DELAY_MS / MESSAGE_DELAY_MS add fixed pauses when set.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg

from nova import store
from nova.providers import (
    AuthExpired,
    GrantNotFound,
    NotFound,
    Permanent,
)
from nova.providers.models import Message, Thread
from nova.ratelimit import ProviderProcessor
from nova.runtime import (
    GiveUp,
    Job,
    JobContext,
)

log = logging.getLogger("nova.threads")


LOAD = """
SELECT q.id, q.config_id, q.inbox_id, q.provider_thread_id, q.status, q.queue_msg_id,
       coalesce(q.grant_id, i.grant_id) AS grant_id, i.status AS inbox_status
FROM queued_threads q JOIN flux_inboxes i ON i.id = q.inbox_id
WHERE q.id = $1
"""
FIND = "SELECT id FROM queued_threads WHERE config_id = $1 AND provider_thread_id = $2"
START = """
UPDATE queued_threads
SET status = 'processing', attempts = attempts + 1, started_at = now(),
    grant_id = coalesce(grant_id, $2)
WHERE id = $1
"""
COMPLETE = """
UPDATE queued_threads
SET status = 'completed', message_count = $2, processed_at = now(), error_message = $3
WHERE id = $1
"""
PARK = """
UPDATE queued_threads
SET status = 'queued', queue_msg_id = NULL, error_message = $2
WHERE id = $1
"""
FAIL = """
UPDATE queued_threads
SET status = CASE WHEN $3 THEN 'failed' ELSE 'queued' END, error_message = $2,
    processed_at = CASE WHEN $3 THEN now() ELSE processed_at END
WHERE id = $1 AND status <> 'completed'
"""
EXPIRE_INBOX = """
UPDATE flux_inboxes SET status = 'auth_expired', auth_expired_at = coalesce(auth_expired_at, now()),
       updated_at = now()
WHERE id = $1 AND status = 'active'
"""


class ThreadSyncProcessor(ProviderProcessor):
    queue: ClassVar[str] = "thread_sync_jobs"
    component: ClassVar[str] = "Threads"
    max_attempts: ClassVar[int] = 5

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        row = await _load(ctx.pool, job)
        if row is None:
            return "queued thread no longer exists"
        thread_id = row["provider_thread_id"]
        if row["status"] == "completed":
            return f"thread={thread_id} already completed"
        if row["queue_msg_id"] is not None and row["queue_msg_id"] != job.msg_id:
            return f"thread={thread_id} superseded by job {row['queue_msg_id']}"
        if not row["grant_id"]:
            raise GiveUp("inbox has no grant")
        if row["inbox_status"] != "active":
            return await self._inactive(ctx, row)

        await ctx.pool.execute(START, row["id"], row["grant_id"])
        version = datetime.now(UTC)  # what we store is provider state as of (at least) now
        try:
            fetched = await self._fetch(row["grant_id"], thread_id)
        except AuthExpired:
            async with ctx.transaction() as conn:
                await conn.execute(EXPIRE_INBOX, row["inbox_id"])
                await conn.execute(PARK, row["id"], "paused: the grant expired during sync")
            return f"thread={thread_id} parked: grant expired"

        async with ctx.transaction() as conn:
            if fetched is None:  # deleted at the provider since discovery
                await store.soft_delete_thread(conn, row["inbox_id"], thread_id, version)
                await conn.execute(COMPLETE, row["id"], 0, "thread no longer exists at provider")
                return f"thread={thread_id} gone at the provider"
            thread, messages = fetched
            await store.upsert_thread(conn, row["inbox_id"], thread, version)
            for message in messages:
                await store.upsert_message(conn, row["inbox_id"], message, version)
            await conn.execute(COMPLETE, row["id"], len(messages), None)
        if self.settings.thread_delay_ms:
            await asyncio.sleep(self.settings.thread_delay_ms / 1000)
        return f"thread={thread_id} messages={len(messages)}"

    async def _inactive(self, ctx: JobContext, row: asyncpg.Record) -> str:
        status = row["inbox_status"]
        async with ctx.transaction() as conn:
            if status == "revoked":
                await conn.execute(FAIL, row["id"], "inbox revoked: thread not synced", True)
                return f"thread={row['provider_thread_id']} failed: inbox revoked"
            await conn.execute(PARK, row["id"],
                               f"paused: inbox is {status}; re-queued when it is active again")
        return f"thread={row['provider_thread_id']} parked: inbox {status}"

    async def _fetch(self, grant_id: str,
                     thread_id: str) -> tuple[Thread, list[Message]] | None:
        async def fetch() -> tuple[Thread, list[Message]]:
            thread = await self.api.get_thread(grant_id, thread_id)
            messages: list[Message] = []
            async for message in self.api.list_thread_messages(grant_id, thread_id):
                messages.append(message)
                if self.settings.message_delay_ms:
                    await asyncio.sleep(self.settings.message_delay_ms / 1000)
            return thread, messages

        try:
            return await self.call(fetch)
        except GrantNotFound as exc:
            raise GiveUp(f"grant not found: {exc}") from exc
        except NotFound:
            return None
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        row_id = await _row_id(conn, job)
        if row_id is not None:
            await conn.execute(FAIL, row_id, f"{type(error).__name__}: {error}"[:2000], final)


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
