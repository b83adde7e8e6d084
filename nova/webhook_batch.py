"""Message notifications of one read, applied in one transaction (nova.webhooks).

The runtime starts every message it reads as a job of its own (nova.runtime). A burst of
`message.created` / `message.updated` notifications would then cost one transaction each: a
load, an attempt mark, the thread locks, the upsert, the thread refresh, the acknowledgement,
the inbox's last-event stamp and the queue delete, one commit per message. Here the jobs that
one read started and that only write rows (a message event whose payload has the message: not
`.truncated`, its inbox known) join one batch, and one transaction writes them all:

1. one query loads every notification row with its inbox;
2. the payloads are parsed and rendered (`store.prepare_messages`, in a worker thread);
3. in ONE transaction: the thread rows of the whole batch are created when missing and locked
   in id order (the lock order: thread rows by id before anything else the jobs write); the
   messages are written through `store.upsert_messages`, one statement per (inbox, event
   version, field set); threads named by a message are followed into a running backfill;
   every row is acknowledged `processed` (its attempt counted) with one statement; each inbox's
   `last_event_at` is stamped once; every job's queue message is deleted while its lease is
   held (`Worker.finish`); then the commit.

What stays as it was, one by one: exactly once (a queue message is deleted only with the rows
it wrote, and only while its lease is held), the order guards (each write is versioned by its
own event's time; two notifications of one message in a batch are written in queue order, in
successive statements), and every other type, which runs alone. When anything in a batch
fails (a database error, one lease lost, a row that does not parse) the transaction rolls back
as a whole and every job of the batch runs alone, as before: the batch is an optimisation,
never a new way to fail.

Hooks used in the runtime (nova.runtime is not changed here): `Worker.finish(conn, job)`, the
queue delete of a job inside any transaction, and `JobContext.committed`, set for each job
whose delete the batch committed, so the runtime opens no transaction of its own for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from nova import metrics, store
from nova.providers.nylas import parse_message
from nova.providers.nylas_webhooks import split_type
from nova.runtime import Job, JobContext

log = logging.getLogger("nova.webhooks")

BATCHED_TRIGGERS = ("message.created", "message.updated")

LOAD_MANY = """
SELECT n.id, n.webhook_id, n.notification_type, n.grant_id, n.payload, n.status,
       coalesce(n.event_time, n.received_at) AS version,
       i.id AS inbox_id, i.status AS inbox_status
FROM flux_webhook_notifications n
LEFT JOIN flux_inboxes i ON i.grant_id = n.grant_id AND i.provider = n.provider
                        AND i.deleted_at IS NULL
WHERE n.id = ANY($1::uuid[])
"""
# The thread rows of every message of the batch, created when missing (DO NOTHING: an
# existing row is neither rewritten nor locked) and then locked in id order with the threads
# the messages are stored under now (nova_lock_threads), before any message is written:
# `store.upsert_messages` locks only the threads of its own statement.
ENSURE_THREADS = """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id)
SELECT DISTINCT x.i, x.t FROM unnest($1::uuid[], $2::text[]) AS x(i, t)
ORDER BY 1, 2
ON CONFLICT (inbox_id, provider_thread_id) DO NOTHING
"""
LOCK_THREADS = ("SELECT count(*)"
                " FROM nova_lock_threads($1::uuid[], $2::text[], $3::uuid[], $4::text[])")
ACK_MANY = "SELECT nova_webhook_notifications_processed($1::uuid[], $2::int)"
# The inbox's last event, only when this one is newer: the inbox row is shared by every writer
# of the inbox, and a burst of events of one second would otherwise each rewrite it.
INBOX_SEEN = """
UPDATE flux_inboxes SET last_event_at = $2, updated_at = now()
WHERE id = $1 AND (last_event_at IS NULL OR last_event_at < $2)
"""


@dataclass(eq=False)
class Entry:
    job: Job
    ctx: JobContext
    notification_id: uuid.UUID
    future: asyncio.Future[str | None]
    row: asyncpg.Record | None = None
    prepared: store.PreparedMessage | None = None
    written: bool = False

    def resolve(self, note: str | None) -> None:
        if not self.future.done():  # a job cancelled meanwhile (shutdown, lease lost)
            self.future.set_result(note)


@dataclass
class BatchStats:
    batches: int = 0
    applied: int = 0  # notifications written by a batch
    alone: int = 0  # handed back to run one by one
    failed: int = 0  # batches rolled back, their jobs run alone
    sizes: list[int] = field(default_factory=list)


def batchable(job: Job) -> bool:
    """Whether the queue message names a message event that needs no provider request."""
    kind = job.message.get("type")
    if not isinstance(kind, str):
        return False
    trigger, suffixes = split_type(kind)
    return trigger in BATCHED_TRIGGERS and "truncated" not in suffixes


def message_object(row: asyncpg.Record) -> dict[str, Any]:
    payload = row["payload"]
    data = payload.get("data") if isinstance(payload, dict) else None
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


class Batcher:
    """Collects the batchable jobs started together and applies them in one transaction.

    `submit` answers the job's log note once its batch committed, or None: run it alone."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.stats = BatchStats()
        self._pending: list[Entry] = []
        self._flush: asyncio.Task[None] | None = None

    async def submit(self, job: Job, ctx: JobContext, notification_id: uuid.UUID) -> str | None:
        if self.max_size <= 1:
            return None
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending.append(Entry(job, ctx, notification_id, future))
        if self._flush is None:
            # Its own task: a job cancelled while waiting (its lease lost, a forced shutdown)
            # never cancels the batch the others wait on.
            self._flush = asyncio.create_task(self._run(), name="webhooks:batch")
        return await future

    async def _run(self) -> None:
        # The jobs of one read start in the same turns of the event loop: let them all join.
        for _ in range(3):
            await asyncio.sleep(0)
        entries, self._pending = self._pending[:self.max_size], self._pending[self.max_size:]
        self._flush = (asyncio.create_task(self._run(), name="webhooks:batch")
                       if self._pending else None)
        try:
            await self._apply(entries)
        except Exception as exc:  # rolled back: each job runs alone, as it always could
            self.stats.failed += 1
            log.warning("[Webhooks] a batch of %d notification(s) was rolled back (%s: %s); "
                        "they run one by one", len(entries), type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
        finally:
            for entry in entries:
                entry.resolve(None)

    async def _apply(self, entries: list[Entry]) -> None:
        pool: asyncpg.Pool = entries[0].ctx.pool
        started = time.perf_counter()
        rows = {r["id"]: r for r in await pool.fetch(
            LOAD_MANY, [e.notification_id for e in entries])}
        ready: list[Entry] = []
        seen: set[uuid.UUID] = set()
        for entry in entries:
            row = rows.get(entry.notification_id)
            if (row is None or entry.notification_id in seen or row["inbox_id"] is None
                    or row["status"] in ("processed", "skipped")):
                entry.resolve(None)  # the single path says why (gone, done, waiting...)
                continue
            trigger, suffixes = split_type(row["notification_type"])
            obj = message_object(row)
            if trigger not in BATCHED_TRIGGERS or "truncated" in suffixes or not obj.get("id"):
                entry.resolve(None)
                continue
            seen.add(entry.notification_id)
            entry.row = row
            ready.append(entry)
        self.stats.alone += len(entries) - len(ready)
        if len(ready) < 2:
            for entry in ready:
                entry.resolve(None)
            self.stats.alone += len(ready)
            return
        await self._prepare(ready)
        ready = [e for e in ready if e.prepared is not None]
        ready.sort(key=lambda e: e.job.msg_id)  # queue order: the order of the writes
        async with pool.acquire() as conn, conn.transaction():
            await self._write(conn, ready)
            elapsed = round((time.perf_counter() - started) * 1000)
            await conn.execute(ACK_MANY, [e.notification_id for e in ready], elapsed)
            seen_at: dict[uuid.UUID, datetime] = {}
            for entry in ready:
                assert entry.row is not None
                inbox, version = entry.row["inbox_id"], entry.row["version"]
                seen_at[inbox] = max(version, seen_at.get(inbox, version))
            for inbox in sorted(seen_at):
                await conn.execute(INBOX_SEEN, inbox, seen_at[inbox])
            for entry in ready:
                await entry.ctx.worker.finish(conn, entry.job)
        for entry in ready:  # committed: the runtime must not open a transaction for them
            entry.ctx.committed = True
        now = datetime.now(UTC)
        self.stats.batches += 1
        self.stats.applied += len(ready)
        if len(self.stats.sizes) < 10_000:
            self.stats.sizes.append(len(ready))
        for entry in ready:
            assert entry.row is not None and entry.prepared is not None
            metrics.webhook_lag((now - entry.row["version"]).total_seconds())
            mid = entry.prepared.row["provider_message_id"]
            entry.resolve(f"{entry.row['notification_type']} processed message={mid}"
                          f"{'' if entry.written else ' (older, ignored)'} batch={len(ready)}")

    async def _prepare(self, ready: list[Entry]) -> None:
        """Parse each payload (one that does not parse runs alone, and fails there as it
        would have) and render all of them in one worker thread."""
        parsed: list[tuple[Entry, Any]] = []
        for entry in ready:
            assert entry.row is not None
            _trigger, suffixes = split_type(entry.row["notification_type"])
            try:
                message = parse_message(message_object(entry.row), entry.row["grant_id"],
                                        partial=True, cleaned="cleaned" in suffixes)
            except Exception:
                entry.resolve(None)
                self.stats.alone += 1
                continue
            parsed.append((entry, message))
        prepared = await store.prepare_messages([m for _e, m in parsed])
        for (entry, _m), p in zip(parsed, prepared, strict=True):
            entry.prepared = p

    async def _write(self, conn: asyncpg.Connection, ready: Sequence[Entry]) -> None:
        threads = sorted({(e.row["inbox_id"], e.prepared.row["provider_thread_id"])
                          for e in ready if e.row is not None and e.prepared is not None
                          and "thread_id" in e.prepared.fields
                          and e.prepared.row["provider_thread_id"]})
        if threads:
            inboxes, tids = [i for i, _t in threads], [t for _i, t in threads]
            await conn.execute(ENSURE_THREADS, inboxes, tids)
            keys = [(e.row["inbox_id"], e.prepared.row["provider_message_id"])
                    for e in ready if e.row is not None and e.prepared is not None]
            await conn.execute(LOCK_THREADS, inboxes, tids, [i for i, _m in keys],
                               [m for _i, m in keys])
        # A message named twice in the batch is written twice, in queue order: its second
        # notification goes to the next round of statements.
        rounds: dict[tuple[int, uuid.UUID, datetime], list[Entry]] = {}
        depth: dict[tuple[uuid.UUID, str], int] = {}
        for entry in ready:
            assert entry.row is not None and entry.prepared is not None
            key = (entry.row["inbox_id"], entry.prepared.row["provider_message_id"])
            depth[key] = depth.get(key, -1) + 1
            rounds.setdefault((depth[key], entry.row["inbox_id"], entry.row["version"]),
                              []).append(entry)
        for (_depth, inbox, version), group in sorted(rounds.items(), key=lambda kv: kv[0][0]):
            written = await store.upsert_messages(
                conn, inbox, [e.prepared for e in group if e.prepared is not None], version)
            for entry in group:
                assert entry.prepared is not None
                entry.written = entry.prepared.row["provider_message_id"] in written
        follow: dict[uuid.UUID, set[str]] = {}
        for entry in ready:
            assert entry.row is not None and entry.prepared is not None
            thread_id = entry.prepared.row["provider_thread_id"]
            if thread_id and "thread_id" in entry.prepared.fields:
                follow.setdefault(entry.row["inbox_id"], set()).add(thread_id)
        for inbox in sorted(follow):
            await store.follow_backfill(conn, inbox, sorted(follow[inbox]))
