"""`python -m nova.webhooks`: apply provider notifications from `nylas_webhook_notifications`.

Each queue message points at a stored `flux_webhook_notifications` row. Its type is routed by
its base trigger (suffixes such as `.truncated`, `.transformed`, `.cleaned` are stripped):

| trigger                            | effect                                                    |
| ---------------------------------- | --------------------------------------------------------- |
| message.created, message.updated   | upsert the message from the payload; a truncated payload  |
|                                    | (no body) is replaced by the full message from the API    |
| message.deleted                    | soft delete                                               |
| thread.replied                     | fetch the thread and upsert its metadata                  |
| grant.expired                      | inbox -> auth_expired (queued work stops calling the API) |
| grant.deleted                      | inbox -> revoked                                          |
| grant.updated                      | an expired inbox is active again, and a catch-up backfill |
|                                    | is queued from its last event minus the overlap window    |
| anything else                      | stored and marked skipped                                 |

Nylas delivers at least once and out of order. Every write is versioned by the event's `time`
(see nova.store), so an earlier event never overwrites a later one, whatever the arrival
order, and a redelivered event changes nothing. The notification row gets status, attempts,
error_message, processed_at and processing_duration_ms; the outcome commits with the queue
delete. Max 3 attempts, then the message is archived and the row says `error`.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime
from typing import Any, ClassVar

import asyncpg

from nova import store
from nova.providers import AuthExpired, NotFound, Permanent, RateLimited
from nova.providers.nylas import parse_message
from nova.providers.nylas_webhooks import split_type
from nova.ratelimit import ProviderProcessor
from nova.runtime import GiveUp, Job, JobContext, RetryLater

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
INBOX_SEEN = """
UPDATE flux_inboxes SET last_event_at = greatest(last_event_at, $2), updated_at = now()
WHERE id = $1
"""
INBOX_STATUS = """
UPDATE flux_inboxes
SET status = $2,
    auth_expired_at = CASE WHEN $2 = 'auth_expired' THEN coalesce(auth_expired_at, $3)
                           WHEN $2 = 'active' THEN NULL ELSE auth_expired_at END,
    updated_at = now()
WHERE id = $1 AND status IS DISTINCT FROM $2
  AND ($2 <> 'active' OR status = 'auth_expired')
RETURNING status
"""
LOCK_OBJECT = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
# Read before the inbox turns active (that clears auth_expired_at). Nylas replays only 72 hours
# of missed notifications, so a returning grant gets its gap re-listed by a catch-up backfill.
CATCHUP_SINCE = """
SELECT coalesce(last_event_at, auth_expired_at, now()) - make_interval(secs => $2)
FROM flux_inboxes WHERE id = $1 FOR UPDATE
"""
QUEUE_CATCHUP = "SELECT queue_catchup_backfill($1, $2)"


class Outcome:
    def __init__(self, status: str = "processed", note: str = "") -> None:
        self.status = status
        self.note = note


class WebhookProcessor(ProviderProcessor):
    queue: ClassVar[str] = "nylas_webhook_notifications"
    component: ClassVar[str] = "Webhooks"
    max_attempts: ClassVar[int] = 3

    @property
    def catchup_overlap(self) -> float:
        return float(self.settings.catchup_overlap_seconds)

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        notification_id = _notification_id(job)
        started = time.perf_counter()
        row = await ctx.pool.fetchrow(LOAD, notification_id)
        if row is None:
            raise GiveUp(f"notification {notification_id} does not exist")
        if row["status"] in ("processed", "skipped"):
            return f"{row['notification_type']} already {row['status']}"
        await ctx.pool.execute(ACK, notification_id, "processing", None, None)

        trigger, truncated = split_type(row["notification_type"])
        obj = (row["payload"].get("data") or {}).get("object") or {}
        # Work that needs the API happens before the transaction opens.
        fetched = await self._fetch(trigger, truncated, row, obj)

        async with ctx.transaction() as conn:
            outcome = await self._apply(conn, trigger, row, obj, fetched)
            elapsed = round((time.perf_counter() - started) * 1000)
            await conn.execute(ACK, notification_id, outcome.status,
                               outcome.note if outcome.status == "skipped" else None, elapsed)
            if row["inbox_id"] is not None and outcome.status == "processed":
                await conn.execute(INBOX_SEEN, row["inbox_id"], row["version"])
        return f"{row['notification_type']} {outcome.status} {outcome.note}".rstrip()

    async def _fetch(self, trigger: str, truncated: bool, row: asyncpg.Record,
                     obj: dict[str, Any]) -> Any:
        if row["inbox_id"] is None or row["inbox_status"] != "active":
            return None
        try:
            if trigger in ("message.created", "message.updated") and truncated:
                return await self.api.get_message(row["grant_id"], str(obj["id"]))
            if trigger == "thread.replied":
                return await self.api.get_thread(row["grant_id"], str(obj["thread_id"]))
        except RateLimited as exc:
            raise RetryLater(str(exc), delay=exc.retry_after) from exc
        except NotFound:
            return NotFound  # gone since the event: nothing to fetch, nothing to write
        except (AuthExpired, Permanent) as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc
        except KeyError as exc:
            raise GiveUp(f"payload lacks {exc}") from exc
        return None

    async def _apply(self, conn: asyncpg.Connection, trigger: str, row: asyncpg.Record,
                     obj: dict[str, Any], fetched: Any) -> Outcome:
        inbox_id: uuid.UUID | None = row["inbox_id"]
        version: datetime = row["version"]
        if trigger.startswith("grant."):
            return await self._grant_event(conn, trigger, inbox_id, version)
        if trigger not in ("message.created", "message.updated", "message.deleted",
                           "thread.replied"):
            return Outcome("skipped", f"unhandled type {row['notification_type']}")
        if inbox_id is None:
            return Outcome("skipped", f"no inbox for grant {row['grant_id']}")
        if row["inbox_status"] != "active":
            return Outcome("skipped", f"inbox is {row['inbox_status']}")
        if fetched is NotFound:
            return Outcome("skipped", "object no longer exists at the provider")

        # Events about one object apply one at a time; the versions decide the result.
        object_key = str(obj.get("thread_id") if trigger == "thread.replied" else obj.get("id"))
        await conn.execute(LOCK_OBJECT, f"{inbox_id}:{object_key}")
        if trigger == "message.deleted":
            await store.soft_delete_message(conn, inbox_id, str(obj["id"]), version)
            return Outcome(note=f"message={obj['id']}")
        if trigger == "thread.replied":
            await store.upsert_thread(conn, inbox_id, fetched, version)
            return Outcome(note=f"thread={obj['thread_id']}")
        message = fetched if fetched is not None else parse_message(obj, row["grant_id"])
        written = await store.upsert_message(conn, inbox_id, message, version)
        return Outcome(note=f"message={message.id}{'' if written else ' (older, ignored)'}")

    async def _grant_event(self, conn: asyncpg.Connection, trigger: str,
                           inbox_id: uuid.UUID | None, version: datetime) -> Outcome:
        target = {"grant.expired": "auth_expired", "grant.deleted": "revoked",
                  "grant.updated": "active"}.get(trigger)
        if target is None:
            return Outcome("skipped", f"unhandled type {trigger}")
        if inbox_id is None:
            return Outcome("skipped", "no inbox for this grant")
        since = (await conn.fetchval(CATCHUP_SINCE, inbox_id, self.catchup_overlap)
                 if target == "active" else None)
        changed = await conn.fetchval(INBOX_STATUS, inbox_id, target, version)
        note = f"inbox {'-> ' + target if changed else 'unchanged'}"
        if changed and target == "active":
            config_id = await conn.fetchval(QUEUE_CATCHUP, inbox_id, since)
            note += f" catch-up={config_id}" if config_id else " (backfill already running)"
        return Outcome(note=note)

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
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


