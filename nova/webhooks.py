"""`python -m nova.webhooks`: apply provider notifications from `nylas_webhook_notifications`.

Each queue message points at a stored `flux_webhook_notifications` row. Its type is routed by
its base trigger; the suffixes say what the payload lacks (https://developer.nylas.com/docs/
reference/notifications/messages/):

| trigger                            | effect                                                    |
| ---------------------------------- | --------------------------------------------------------- |
| message.created, message.updated   | upsert the message from the payload, only the fields it   |
|                                    | has (`.transformed`, `.metadata`); `.truncated` (no body) |
|                                    | fetches the message; a `.cleaned` body is kept apart as   |
|                                    | body_cleaned (markdown), never as the HTML body           |
| message.deleted                    | soft delete                                               |
| thread.replied                     | a message-tracking event (sends with reply tracking only):|
|                                    | re-derives the thread; the reply itself arrives as        |
|                                    | message.created                                           |
| grant.expired                      | inbox -> auth_expired (queued work stops calling the API) |
| grant.deleted                      | inbox -> revoked                                          |
| gmail.history                      | a Gmail push (POST /webhooks/gmail): the labels listed    |
|                                    | again (nova.folders: history has no label records), then  |
|                                    | an incremental sync from the history id (nova.changes)    |
| folder.created, folder.updated,    | the folder upserted from the payload, only the fields it  |
| folder.deleted                     | has; deleted: soft delete (nova.folders)                  |
| grant.updated                      | a re-authentication (`reauthentication_flag`) makes an    |
|                                    | expired inbox active and queues a catch-up backfill from  |
|                                    | its last event minus the overlap; other updates change    |
|                                    | nothing                                                   |
| anything else                      | stored and marked skipped                                 |

Every message write re-derives its thread from the stored messages (nova.store), so ordinary
replies, which Nylas announces with message.created alone, keep threads current without a
provider request. While the inbox's backfill runs, a message for a thread the backfill has not
listed queues that thread for sync: discovery may miss a thread that moves under it.

Queue messages `{"changes_inbox_id": ...}` (the completion monitor's poll, every
GMAIL_HISTORY_POLL_SECONDS) run the same incremental sync without a stored notification.

Nothing is dropped for its inbox: a notification whose inbox does not exist waits (`waiting`),
and so does one that needs the API while the inbox is not active; the inbox's activation queues
them again (sql/020_webhooks.sql). The rest apply at once.

Grant events carry `time`: one older than the event that set the inbox's status changes
nothing. Nylas delivers at least once and out of order; every mailbox write is versioned by the
event's `time` (see nova.store), so an earlier event never overwrites a later one. The row gets
status, attempts, error_message, processed_at and processing_duration_ms; the outcome commits
with the queue delete. Max 3 attempts, then the message is archived and the row says `error`.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg

from nova import db, folders, metrics, store
from nova.changes import ChangeSync
from nova.processor import ProviderProcessor, refuse_inbox
from nova.providers import (
    AuthExpired,
    ChangeFeed,
    GrantNotFound,
    Message,
    NotFound,
    Permanent,
    Transient,
)
from nova.providers.nylas import parse_message
from nova.providers.nylas_webhooks import split_type
from nova.runtime import GiveUp, Job, JobContext, Worker
from nova.webhook_batch import INBOX_SEEN, Batcher, batchable

log = logging.getLogger("nova.webhooks")

LOAD = """
SELECT n.id, n.webhook_id, n.notification_type, n.grant_id, n.payload, n.status,
       coalesce(n.event_time, n.received_at) AS version,
       i.id AS inbox_id, i.status AS inbox_status
FROM flux_webhook_notifications n
LEFT JOIN flux_inboxes i ON i.grant_id = n.grant_id AND i.provider = n.provider
                        AND i.deleted_at IS NULL
WHERE n.id = $1
"""
ACK = "SELECT acknowledge_webhook_notification($1, $2, $3, $4)"
# Grant events and the grant checks of workers change an inbox's status through one function
# (sql/020_webhooks.sql): ordered by time, revoked final, a catch-up when it comes back.
SET_STATUS = """
SELECT * FROM nova_set_inbox_status($1, $2, $3, make_interval(secs => $4),
                                    make_interval(secs => $5))
"""
THREAD_OF = """
SELECT id FROM flux_email_threads WHERE inbox_id = $1 AND provider_thread_id = $2
"""
MESSAGE_TRIGGERS = ("message.created", "message.updated")
CHANGES = "gmail.history"
HANDLED = (*MESSAGE_TRIGGERS, "message.deleted", "thread.replied", "grant.expired",
           "grant.deleted", "grant.updated", CHANGES, *folders.FOLDER_TRIGGERS)
INBOX_KIND = "SELECT provider, grant_id, status, deleted_at FROM flux_inboxes WHERE id = $1"


class Outcome:
    def __init__(self, status: str = "processed", note: str = "") -> None:
        self.status = status
        self.note = note


class WebhookProcessor(ProviderProcessor):
    queue: ClassVar[str] = "nylas_webhook_notifications"
    component: ClassVar[str] = "Webhooks"
    max_attempts: ClassVar[int] = 3
    patience_factor = None  # live mail waits for its slot, ahead of backfills' deferred jobs

    # Behind a connection pooler, with NOVA_DATABASE_DIRECT_URL: the pool on it that holds the
    # change syncs' lock transactions, so that no sync keeps a server connection of the pooler
    # busy for its length (nova.changes). Connections are opened when first needed.
    lock_pool: asyncpg.Pool | None = None
    # Message notifications read together are written together (nova.webhook_batch).
    batcher: Batcher | None = None

    @property
    def catchup_overlap(self) -> float:
        return float(self.settings.catchup_overlap_seconds)

    async def setup(self, worker: Worker) -> None:
        await super().setup(worker)
        self.batcher = Batcher(self.settings.webhook_batch_max)
        direct = self.settings.database_direct_url
        if direct and worker.database_url and await db.behind_pooler(worker.database_url):
            self.lock_pool = await db.create_pool(direct, min_size=0,
                                                  max_size=worker.concurrency)

    async def teardown(self) -> None:
        pool, self.lock_pool = self.lock_pool, None
        if pool is not None:
            await pool.close()
        await super().teardown()

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        if "changes_inbox_id" in job.message:
            try:
                inbox_id = uuid.UUID(str(job.message["changes_inbox_id"]))
            except ValueError as exc:
                raise GiveUp(f"bad changes job: {job.message}") from exc
            return f"changes inbox={inbox_id}: {await self._changes(ctx.pool, inbox_id)}"
        notification_id = _notification_id(job)
        if self.batcher is not None and batchable(job):
            note = await self.batcher.submit(job, ctx, notification_id)
            if note is not None:  # written and acknowledged by its batch, message deleted
                return note
        started = time.perf_counter()
        row = await ctx.pool.fetchrow(LOAD, notification_id)
        if row is None:
            raise GiveUp(f"notification {notification_id} does not exist")
        if row["status"] in ("processed", "skipped"):
            return f"{row['notification_type']} already {row['status']}"
        await ctx.pool.execute(ACK, notification_id, "processing", None, None)

        trigger, suffixes = split_type(row["notification_type"])
        data = row["payload"].get("data") if isinstance(row["payload"], dict) else None
        obj = (data or {}).get("object") if isinstance(data, dict) else None
        obj = obj if isinstance(obj, dict) else {}
        # Work that needs the API, and CPU work, happens before the transaction opens.
        outcome, prepared = await self._prepare(ctx.pool, trigger, suffixes, row, obj)

        async with ctx.transaction() as conn:
            if outcome is None:
                outcome = await self._apply(conn, trigger, row, obj, prepared)
            elapsed = round((time.perf_counter() - started) * 1000)
            await conn.execute(ACK, notification_id, outcome.status,
                               outcome.note if outcome.status in ("skipped", "waiting")
                               else None, elapsed)
            if row["inbox_id"] is not None and outcome.status == "processed":
                await conn.execute(INBOX_SEEN, row["inbox_id"], row["version"])
        if outcome.status == "processed":  # committed: the provider's event is in the rows
            metrics.webhook_lag((datetime.now(UTC) - row["version"]).total_seconds())
        return f"{row['notification_type']} {outcome.status} {outcome.note}".rstrip()

    async def _prepare(self, pool: asyncpg.Pool, trigger: str, suffixes: frozenset[str],
                       row: asyncpg.Record, obj: dict[str, Any],
                       ) -> tuple[Outcome | None, list[store.PreparedMessage]]:
        """Decide what waits or is skipped; fetch and render what a message event writes."""
        if trigger not in HANDLED:
            return Outcome("skipped", f"unhandled type {row['notification_type']}"), []
        if row["inbox_id"] is None:
            return Outcome("waiting", f"no inbox for grant {row['grant_id']} yet"), []
        if trigger == CHANGES:
            return Outcome(note=await self._changes(pool, row["inbox_id"])), []
        if trigger not in MESSAGE_TRIGGERS:
            return None, []
        if not obj.get("id"):
            raise GiveUp("message payload without an id")
        if "truncated" not in suffixes:
            message = parse_message(obj, row["grant_id"], partial=True,
                                    cleaned="cleaned" in suffixes)
            return None, await store.prepare_messages([message])
        # No body: the message is fetched whole, which needs an active inbox.
        if row["inbox_status"] != "active":
            return Outcome("waiting", f"inbox is {row['inbox_status']}"), []
        try:
            fetched: Message = await self.call(
                lambda: self.api.get_message(row["grant_id"], str(obj["id"])), row["grant_id"])
        except NotFound:
            return Outcome("skipped", "message no longer exists at the provider"), []
        except (AuthExpired, GrantNotFound) as exc:
            status = "revoked" if isinstance(exc, GrantNotFound) else "auth_expired"
            await refuse_inbox(pool, row["inbox_id"], status)
            return Outcome("waiting", f"inbox is {status}"), []
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc
        return None, await store.prepare_messages([fetched])

    async def _changes(self, pool: asyncpg.Pool, inbox_id: uuid.UUID) -> str:
        """An incremental sync of the inbox from its change feed (nova.changes)."""
        inbox = await pool.fetchrow(INBOX_KIND, inbox_id)
        if inbox is None:
            return "inbox removed"
        kind, grant = inbox["provider"], inbox["grant_id"]
        provider = self.provider_for(kind)
        if not isinstance(provider, ChangeFeed):
            return f"provider {kind} has no change feed"
        sync = ChangeSync(pool, provider, lambda request: self.call(request, grant, kind),
                          lock_pool=self.lock_pool)
        try:
            labels = await self._relist_folders(pool, provider, inbox, inbox_id)
            note = await sync.run(inbox_id)
            return f"{labels}; {note}" if labels else note
        except (AuthExpired, GrantNotFound) as exc:
            status = "revoked" if isinstance(exc, GrantNotFound) else "auth_expired"
            await refuse_inbox(pool, inbox_id, status)
            return f"inbox is {status}: {exc}"
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc

    async def _relist_folders(self, pool: asyncpg.Pool, provider: Any, inbox: asyncpg.Record,
                              inbox_id: uuid.UUID) -> str:
        """The labels again (Gmail: labels.list, labels.get for a new one): a rename shows at
        the next push. A failure costs the labels this round, never the history sync."""
        if inbox["status"] != "active" or inbox["deleted_at"] is not None:
            return ""
        grant, kind = inbox["grant_id"], inbox["provider"]
        try:
            return await folders.sync_folders(
                pool, provider, lambda request: self.call(request, grant, kind), inbox_id,
                grant, details="new")
        except (Transient, NotFound, Permanent) as exc:
            log.warning("[Webhooks] inbox=%s labels not listed this time: %s: %s", inbox_id,
                        type(exc).__name__, exc)
            return f"labels not listed ({type(exc).__name__})"

    async def _apply(self, conn: asyncpg.Connection, trigger: str, row: asyncpg.Record,
                     obj: dict[str, Any], prepared: list[store.PreparedMessage]) -> Outcome:
        inbox_id: uuid.UUID = row["inbox_id"]
        version: datetime = row["version"]
        if trigger.startswith("grant."):
            return await self._grant_event(conn, trigger, inbox_id, obj, version)
        if trigger in folders.FOLDER_TRIGGERS:
            return Outcome(note=await folders.apply_event(conn, inbox_id, trigger, obj, version))
        if trigger == "message.deleted":
            if not obj.get("id"):
                raise GiveUp("message.deleted without an id")
            applied = await store.soft_delete_message(conn, inbox_id, str(obj["id"]), version)
            return Outcome(note=f"message={obj['id']}{'' if applied else ' (older, ignored)'}")
        if trigger == "thread.replied":
            thread_id = obj.get("thread_id")
            row_id = await conn.fetchval(THREAD_OF, inbox_id, str(thread_id)) if thread_id \
                else None
            if row_id is not None:
                await store.refresh_threads(conn, [row_id])
            return Outcome(note=f"thread={thread_id} (tracking)")
        written = await store.upsert_messages(conn, inbox_id, prepared, version)
        message = prepared[0].row
        thread_id = message["provider_thread_id"]
        if thread_id and "thread_id" in prepared[0].fields:
            await store.follow_backfill(conn, inbox_id, [thread_id])
        mid = message["provider_message_id"]
        return Outcome(note=f"message={mid}{'' if mid in written else ' (older, ignored)'}")

    async def _grant_event(self, conn: asyncpg.Connection, trigger: str, inbox_id: uuid.UUID,
                           obj: dict[str, Any], version: datetime) -> Outcome:
        if trigger == "grant.updated" and obj.get("reauthentication_flag") is not True:
            return Outcome(note="grant updated: no status change")
        target = {"grant.expired": "auth_expired", "grant.deleted": "revoked",
                  "grant.updated": "active"}[trigger]
        result = await conn.fetchrow(SET_STATUS, inbox_id, target, version,
                                     self.catchup_overlap, float(store.VERSION_SKEW_SECONDS))
        if result["was"] == result["status"]:
            return Outcome(note=f"inbox unchanged ({result['status']})")
        note = f"inbox {result['was']} -> {result['status']}"
        if result["status"] == "active":
            config_id = result["catchup_config_id"]
            note += f" catch-up={config_id}" if config_id else " (backfill already running)"
        return Outcome(note=note)

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        if "changes_inbox_id" in job.message:
            return  # no row: the next push or poll syncs again
        try:
            notification_id = _notification_id(job)
        except GiveUp:
            return
        await conn.execute(
            "UPDATE flux_webhook_notifications SET error_message = $2,"
            " status = CASE WHEN $3 THEN 'error' ELSE 'pending' END,"
            " processed_at = CASE WHEN $3 THEN now() END WHERE id = $1",
            notification_id, f"{type(error).__name__}: {error}"[:2000], final)


def _notification_id(job: Job) -> uuid.UUID:
    try:
        return uuid.UUID(str(job.message["notification_id"]))
    except (KeyError, ValueError) as exc:
        raise GiveUp(f"queue message without a notification id: {job.message}") from exc


def main() -> int:
    return WebhookProcessor.main()


if __name__ == "__main__":
    raise SystemExit(main())


