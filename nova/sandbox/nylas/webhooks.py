"""Nylas v3 webhook notifications: building, signing, and delivery with Nylas's retry rules.

Building
--------
* Envelope (CloudEvents: ``specversion``, ``type``, ``source``, ``id``, ``time`` (unix seconds),
  ``webhook_delivery_attempt``, ``data.application_id``, ``data.object``):
  https://developer.nylas.com/docs/v3/notifications/notification-schemas/ and
  https://developer.nylas.com/docs/reference/notifications/ ("the envelope fields are the same
  for every notification type").  Sources ``/google/emails/realtime``,
  ``/microsoft/emails/realtime``, ``/nylas/system`` (grants), ``/com/nylas/tracking``.
* ``message.created`` / ``message.updated``: ``data.object`` is the Message.  Variants, as
  type suffixes in the order the docs give (``message.created.cleaned.transformed.truncated``,
  https://developer.nylas.com/docs/changelogs/2026-04-16-webhook-notifications/):

  - ``.truncated`` -- "Payloads exceeding 1 MB are truncated: the type becomes
    ``message.created.truncated`` and the ``body`` field is removed" (always automatic, over
    ``truncate_at``): https://developer.nylas.com/docs/reference/notifications/messages/
    message-created/ and .../message-updated/.
  - ``.transformed`` -- field customisation: only the selected fields are present
    (https://developer.nylas.com/docs/v3/notifications/#specify-fields-for-webhook-notifications);
    ``id``, ``grant_id`` and ``object`` are always kept (the schema marks them required).
  - ``.metadata`` -- Google grants with the ``gmail.metadata`` scope: "Does not include body,
    snippet, or attachment fields", headers included
    (https://developer.nylas.com/docs/reference/notifications/message-metadata/).  Only Google
    grants get it; other providers' grants keep the plain trigger.
  - ``.cleaned`` -- Clean Conversations: ``body`` is cleaned markdown, or the original HTML
    with ``cleaning_status: "failed"`` (https://developer.nylas.com/docs/reference/
    notifications/messages/message-created-cleaned/).  The docs define it for
    ``message.created`` only, so ``message.updated`` stays plain under this variant.
    ``cleaning_status`` on the object is the sandbox's reading of that page.
* ``message.deleted``: object ``{grant_id, id, object: "message"}``:
  .../notifications/messages/message-deleted/.
* ``thread.replied``: a *message-tracking* trigger, only for threads of messages sent through
  Nylas with reply tracking on; object ``{object: "thread", grant_id, message_id,
  root_message_id, reply_data: {count}, thread_id, timestamp, reply_to_message_id, from_self
  ...}`` with ``data.grant_id``: .../notifications/message-tracking/thread-replied/.
* ``grant.expired`` (code 25009), ``grant.deleted`` (25013), ``grant.updated`` (25014 for a
  change, 25027 with ``reauthentication_flag: true`` for a re-authentication): objects
  ``{code, grant_id, integration_id, provider, email[, grant_updated_at,
  reauthentication_flag]}``: .../notifications/grants/grant-expired/, .../grant-deleted/,
  .../grant-updated/.

Delivery (:class:`Outbox`)
--------------------------
* Signature: header ``X-Nylas-Signature`` = hex HMAC-SHA256 of the raw body keyed with the
  webhook secret (https://developer.nylas.com/docs/v3/notifications/webhooks/, "verify webhook
  signatures").  With compressed delivery (``compressed_delivery: true``,
  https://developer.nylas.com/docs/dev-guide/best-practices/compression/) the body is gzip
  with ``Content-Encoding: gzip`` and the signature is over the *compressed* bytes.
* Retries (https://developer.nylas.com/docs/v3/notifications/webhooks/ "failing and failed
  webhooks", https://developer.nylas.com/docs/cookbook/use-cases/build/retry-failed-webhooks/):
  a POST answered 408, 429, 502, 503, 504 or 507, or failing on the connection or the 10 s
  timeout, is retried with back-off, three attempts in all, the last 10-20 minutes after the
  first.  Any other non-2xx answer (500, 400, 401, 413 ...) is final: the notification is
  gone.  Every attempt carries its own ``webhook_delivery_attempt`` (1..3) in the body, so each
  is re-serialised and re-signed.  The waits are scheduled tasks: a notification waiting for
  its retry does not hold back the ones after it (which is how retries arrive out of order).
* Delivery is at-least-once, so duplicates happen (``duplicate=True`` sends twice).
"""

from __future__ import annotations

import asyncio
import gzip
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

from .clean import html_to_markdown
from .generate import stable_hex
from .mailbox import GrantRec

TRUNCATE_AT = 1_000_000
SOURCES = {"google": "/google/emails/realtime", "microsoft": "/microsoft/emails/realtime"}
MESSAGE_VARIANTS = (None, "transformed", "metadata", "cleaned")
DEFAULT_TRANSFORMED_FIELDS = ("id", "grant_id", "object", "thread_id", "subject", "from",
                              "date", "unread")
ALWAYS_KEPT = ("id", "grant_id", "object")
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504, 507})
"""Answers Nylas retries; anything else that is not 2xx drops the notification."""
DEFAULT_RETRY_DELAYS = (300.0, 600.0)
"""Seconds before attempt 2 and before attempt 3: the last attempt lands 15 minutes after the
first, inside the documented 10-20 minutes.  Tests pass e.g. ``(0.2, 0.4)``."""
WEBHOOK_TIMEOUT = 10.0


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def dump(payload: dict[str, Any]) -> bytes:
    # ensure_ascii: lone surrogates from hostile mail become "\ud800", never a crash.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass
class Notification:
    """One built webhook notification: the first attempt's exact bytes and signature.

    ``body`` / ``signature`` / ``headers`` are the uncompressed attempt-1 delivery (what a test
    posts itself); :meth:`encode` gives the bytes and headers of any attempt, gzipped or not.
    """

    id: str
    type: str
    payload: dict[str, Any]
    body: bytes
    signature: str
    secret: str = field(default="", repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Nylas-Signature": self.signature}

    def encode(self, attempt: int = 1, *, gzipped: bool = False,
               ) -> tuple[bytes, dict[str, str]]:
        body = self.body if attempt == 1 else dump(
            {**self.payload, "webhook_delivery_attempt": attempt})
        headers = {"Content-Type": "application/json"}
        if gzipped:
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = "gzip"
        headers["X-Nylas-Signature"] = sign(body, self.secret)
        return body, headers


@dataclass
class WebhookBuilder:
    application_id: str
    secret: str
    truncate_at: int = TRUNCATE_AT
    seq: int = field(default=0)
    message_variant: str | None = None
    transformed_fields: tuple[str, ...] = DEFAULT_TRANSFORMED_FIELDS

    def set_variant(self, variant: str | None) -> None:
        if variant not in MESSAGE_VARIANTS:
            raise ValueError(f"message_variant must be one of {MESSAGE_VARIANTS}, "
                             f"not {variant!r}")
        self.message_variant = variant

    def set_transformed_fields(self, fields: Sequence[str]) -> None:
        if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
            raise TypeError("transformed_fields is a list of field names")
        self.transformed_fields = tuple(fields)

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
        body = dump(payload)
        return Notification(nid, type_, payload, body, sign(body, self.secret), self.secret)

    def shape_message(self, trigger: WebhookTriggers, grant: GrantRec,
                      message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Apply the configured variant: return (type suffixes, object)."""
        variant = self.message_variant
        obj = {k: v for k, v in message.items() if k != "headers"}
        if variant == "metadata" and grant.provider == "google":
            obj = {k: v for k, v in message.items()
                   if k not in ("body", "snippet", "attachments")}
            obj.setdefault("headers", [])
            return ".metadata", obj
        if variant == "cleaned" and trigger is WebhookTriggers.MESSAGE_CREATED:
            cleaned = html_to_markdown(str(obj.get("body") or ""))
            if cleaned is None:
                obj["cleaning_status"] = "failed"  # body stays the original HTML
            else:
                obj["body"], obj["cleaning_status"] = cleaned, "success"
            return ".cleaned", obj
        if variant == "transformed":
            keep = set(self.transformed_fields) | set(ALWAYS_KEPT)
            return ".transformed", {k: v for k, v in obj.items() if k in keep}
        return "", obj

    def message_event(self, trigger: WebhookTriggers, grant: GrantRec,
                      message: dict[str, Any]) -> Notification:
        suffix, obj = self.shape_message(trigger, grant, message)
        type_ = trigger.value + suffix
        if len(dump(obj)) > self.truncate_at:
            type_ += ".truncated"
            obj = {k: v for k, v in obj.items() if k != "body"}
        source = SOURCES.get(grant.provider, f"/{grant.provider}/emails/realtime")
        return self.build(type_, source, obj)

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

    def grant_event(self, trigger: WebhookTriggers, grant: GrantRec, *,
                    reauthenticated: bool = False) -> Notification:
        codes = {WebhookTriggers.GRANT_EXPIRED: 25009, WebhookTriggers.GRANT_DELETED: 25013,
                 WebhookTriggers.GRANT_UPDATED: 25027 if reauthenticated else 25014}
        obj: dict[str, Any] = {
            "code": codes[trigger],
            "grant_id": grant.id, "integration_id": stable_hex("integration", grant.provider),
            "provider": grant.provider, "email": grant.email}
        if trigger is WebhookTriggers.GRANT_EXPIRED:
            obj["grant_updated_at"] = grant.updated_at or grant.created_at
        if trigger is WebhookTriggers.GRANT_UPDATED:
            obj["reauthentication_flag"] = reauthenticated
        return self.build(trigger.value, "/nylas/system", obj)


class Outbox:
    """Delivers notifications from the server's event loop, in order, with Nylas's retries.

    First attempts go out one at a time in submission order; a retry waits in its own task, so
    it never delays later notifications.  ``log`` gets one entry per attempt:
    ``{id, type, attempt, status | error, outcome[, retry_in]}`` where ``outcome`` is
    ``delivered`` (2xx), ``retrying``, ``dropped`` (a non-retryable answer: gone), ``exhausted``
    (retryable, but that was the last attempt) or ``not_sent`` (no webhook URL).
    """

    def __init__(self, url: str | None, timeout: float = WEBHOOK_TIMEOUT, *,
                 retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
                 gzipped: bool = False) -> None:
        self.url = url
        self.timeout = timeout
        self.retry_delays = _delays(retry_delays)
        self.gzipped = gzipped
        self.log: list[dict[str, Any]] = []
        self._held: list[Notification] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Notification] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def max_attempts(self) -> int:
        return 1 + len(self.retry_delays)

    def set_retry_delays(self, delays: Sequence[float]) -> None:
        self.retry_delays = _delays(delays)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._client = httpx.AsyncClient(timeout=self.timeout)
        self._worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._worker, *self._retries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            note = await self._queue.get()
            try:
                await self._attempt(note, 1)
            finally:
                self._queue.task_done()

    async def _attempt(self, note: Notification, attempt: int) -> None:
        entry: dict[str, Any] = {"id": note.id, "type": note.type, "attempt": attempt}
        retryable = False
        url = self.url
        if url is None:
            entry["status"], entry["outcome"] = None, "not_sent"
        else:
            body, headers = note.encode(attempt, gzipped=self.gzipped)
            try:
                assert self._client is not None
                resp = await self._client.post(url, content=body, headers=headers,
                                               timeout=self.timeout)
                entry["status"] = resp.status_code
                retryable = resp.status_code in RETRY_STATUSES
                ok = 200 <= resp.status_code < 300
                entry["outcome"] = "delivered" if ok else "dropped"
            except (httpx.HTTPError, OSError) as exc:  # connection refused/reset, timeouts
                entry["error"] = repr(exc)
                entry["outcome"] = "dropped"
                retryable = True
        if retryable:
            if attempt < self.max_attempts:
                delay = self.retry_delays[attempt - 1]
                entry["outcome"], entry["retry_in"] = "retrying", delay
                task = asyncio.create_task(self._later(note, attempt + 1, delay))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
            else:
                entry["outcome"] = "exhausted"
        with self._lock:
            self.log.append(entry)

    async def _later(self, note: Notification, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._attempt(note, attempt)

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
        while True:
            await self._queue.join()
            pending = set(self._retries)
            if not pending:
                if self._queue.empty():
                    return
                continue
            await asyncio.wait(pending)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block (from a thread other than the server's) until every submitted notification
        is finished: delivered, dropped or out of attempts -- scheduled retries included, so
        with Nylas's real delays a retried notification makes this time out."""
        if self._loop is None:
            return
        # call_soon_threadsafe puts are FIFO with this scheduling, so join sees them.
        future = asyncio.run_coroutine_threadsafe(self._join(), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self.log]


def _delays(delays: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(d) for d in delays)
    if any(d < 0 for d in out):
        raise ValueError("webhook retry delays must not be negative")
    return out

