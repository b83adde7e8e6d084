"""Nylas v3 webhook notifications: building, signing and (re)ordered delivery.

* Envelope (CloudEvents: ``specversion``, ``type``, ``source``, ``id``, ``time``,
  ``webhook_delivery_attempt``, ``data.application_id``, ``data.object``):
  https://developer.nylas.com/docs/v3/notifications/notification-schemas/ and
  https://developer.nylas.com/docs/reference/notifications/ ("the envelope fields are the same
  for every notification type").  Sources ``/google/emails/realtime``,
  ``/microsoft/emails/realtime``, ``/nylas/system`` (grants), ``/com/nylas/tracking``.
* ``message.created`` / ``message.updated``: ``data.object`` is the Message; "Payloads
  exceeding 1 MB are truncated: the type becomes ``message.created.truncated`` and the
  ``body`` field is removed" (same for ``message.updated.truncated``):
  https://developer.nylas.com/docs/reference/notifications/messages/message-created/ and
  .../message-updated/.
* ``message.deleted``: object ``{grant_id, id, object: "message"}``:
  .../notifications/messages/message-deleted/.
* ``thread.replied``: object ``{object: "thread", grant_id, message_id, root_message_id,
  reply_data: {count}, thread_id, timestamp, reply_to_message_id, from_self ...}`` with
  ``data.grant_id``: .../notifications/message-tracking/thread-replied/.
* ``grant.expired`` (code 25009) and ``grant.deleted`` (code 25013) objects
  ``{code, grant_id, integration_id, provider, email[, grant_updated_at]}``:
  .../notifications/grants/grant-expired/ and .../grant-deleted/.
* Signature: header ``X-Nylas-Signature`` = hex HMAC-SHA256 of the raw body keyed with the
  webhook secret (https://developer.nylas.com/docs/v3/notifications/webhooks/, "verify
  webhook signatures").  Delivery is at-least-once, so duplicates happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from nylas.models.webhooks import WebhookTriggers

from .generate import stable_hex
from .mailbox import GrantRec

TRUNCATE_AT = 1_000_000
SOURCES = {"google": "/google/emails/realtime", "microsoft": "/microsoft/emails/realtime"}


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Notification:
    """One built webhook delivery: the exact bytes to POST and their signature."""

    id: str
    type: str
    payload: dict[str, Any]
    body: bytes
    signature: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Nylas-Signature": self.signature}


@dataclass
class WebhookBuilder:
    application_id: str
    secret: str
    truncate_at: int = TRUNCATE_AT
    seq: int = field(default=0)

    def build(self, type_: str, source: str, obj: dict[str, Any],
              extra_data: dict[str, Any] | None = None) -> Notification:
        self.seq += 1
        nid = str(uuid.uuid4())
        payload = {
            "specversion": "1.0", "type": type_, "source": source, "id": nid,
            "time": int(time.time()), "webhook_delivery_attempt": 1,
            "data": {"application_id": self.application_id, **(extra_data or {}),
                     "object": obj},
        }
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Notification(nid, type_, payload, body, sign(body, self.secret))

    def message_event(self, trigger: WebhookTriggers, grant: GrantRec,
                      message: dict[str, Any]) -> Notification:
        type_ = trigger.value
        size = len(json.dumps(message, separators=(",", ":")).encode())
        if size > self.truncate_at:
            type_ += ".truncated"
            message = {k: v for k, v in message.items() if k != "body"}
        source = SOURCES.get(grant.provider, f"/{grant.provider}/emails/realtime")
        return self.build(type_, source, message)

    def message_deleted(self, grant: GrantRec, message_id: str) -> Notification:
        source = SOURCES.get(grant.provider, f"/{grant.provider}/emails/realtime")
        return self.build(WebhookTriggers.MESSAGE_DELETED.value, source,
                          {"grant_id": grant.id, "id": message_id, "object": "message"})

    def thread_replied(self, grant: GrantRec, thread_id: str, root_message_id: str,
                       reply_to_message_id: str, message_id: str, count: int,
                       timestamp: int) -> Notification:
        obj = {"object": "thread", "grant_id": grant.id, "message_id": message_id,
               "root_message_id": root_message_id, "label": "sandbox",
               "reply_data": {"count": count}, "sender_app_id": self.application_id,
               "thread_id": thread_id, "timestamp": timestamp,
               "reply_to_message_id": reply_to_message_id, "from_self": False}
        return self.build(WebhookTriggers.THREAD_REPLIED.value, "/com/nylas/tracking", obj,
                          extra_data={"grant_id": grant.id})

    def grant_event(self, trigger: WebhookTriggers, grant: GrantRec) -> Notification:
        obj: dict[str, Any] = {
            "code": 25009 if trigger is WebhookTriggers.GRANT_EXPIRED else 25013,
            "grant_id": grant.id, "integration_id": stable_hex("integration", grant.provider),
            "provider": grant.provider, "email": grant.email}
        if trigger is WebhookTriggers.GRANT_EXPIRED:
            obj["grant_updated_at"] = grant.updated_at or grant.created_at
        return self.build(trigger.value, "/nylas/system", obj)


class Outbox:
    """Sends notifications in order from the server's event loop; can hold and reorder."""

    def __init__(self, url: str | None, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self.log: list[dict[str, Any]] = []
        self._held: list[Notification] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Notification] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        assert self._queue is not None
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while True:
                note = await self._queue.get()
                entry: dict[str, Any] = {"id": note.id, "type": note.type}
                try:
                    if self.url is None:
                        entry["status"] = None
                    else:
                        resp = await client.post(self.url, content=note.body,
                                                 headers=note.headers)
                        entry["status"] = resp.status_code
                except httpx.HTTPError as exc:
                    entry["error"] = repr(exc)
                with self._lock:
                    self.log.append(entry)
                self._queue.task_done()

    def _enqueue(self, notes: Sequence[Notification]) -> None:
        if self._loop is None or self._queue is None:
            raise RuntimeError("sandbox is not running")
        for note in notes:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, note)

    def submit(self, notes: Sequence[Notification], *, duplicate: bool = False) -> None:
        batch = [n for note in notes for n in ([note, note] if duplicate else [note])]
        with self._lock:
            if self._held is not None:
                self._held.extend(batch)
                return
        self._enqueue(batch)

    def hold(self) -> None:
        with self._lock:
            if self._held is None:
                self._held = []

    def release(self, order: str | Sequence[int] = "fifo", *, seed: int = 0,
                ) -> list[Notification]:
        """Send held notifications: ``fifo``, ``reverse``, ``shuffle`` or explicit indices."""
        with self._lock:
            held, self._held = self._held or [], None
        if isinstance(order, str):
            if order == "reverse":
                held = held[::-1]
            elif order == "shuffle":
                random.Random(seed).shuffle(held)
            elif order != "fifo":
                raise ValueError(f"unknown order {order!r}")
        else:
            held = [held[i] for i in order]
        self._enqueue(held)
        return held

    async def _join(self) -> None:
        assert self._queue is not None
        await self._queue.join()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block (from a thread other than the server's) until queued sends are done."""
        if self._loop is None:
            return
        # call_soon_threadsafe puts are FIFO with this scheduling, so join sees them.
        asyncio.run_coroutine_threadsafe(self._join(), self._loop).result(timeout)
