"""``SandboxNylas``: a real HTTP Nylas v3 look-alike on loopback for tests and benchmarks.

Runs uvicorn in a background thread with its own event loop, so it serves sync code
(``with SandboxNylas(...) as sb``) and async tests (``async with SandboxNylas(...) as sb``)
alike.  Every knob and mutation is a thread-safe method here and also reachable over HTTP
under ``/_sandbox`` (see :mod:`.control`).

Constructor knobs beyond the mailbox's size and seed (defaults keep the old behaviour unless
noted):

* ``rate_limit`` (requests/s per grant, None = off), ``rate_limit_kind`` (``"nylas"``: 429
  ``nylas_rate_limit_exceeded`` without Retry-After -- the default, and a change: the old
  limiter sent Retry-After; ``"provider"``: ``rate_limit_error`` + ``provider_error``),
  ``retry_after_share`` (0.5: share of provider 429s with Retry-After), ``retry_after``
  (seconds on the forced ``rate_limit`` fault).
* ``webhook_retry_delays`` (``(300, 600)`` s: Nylas's three attempts, the last 15 minutes after
  the first), ``webhook_gzip`` (False), ``webhook_timeout`` (10 s, Nylas's endpoint timeout).
* ``message_variant`` (None | ``"transformed"`` | ``"metadata"`` | ``"cleaned"``),
  ``transformed_fields`` (for ``.transformed``), ``truncate_at`` (1 MB).
* ``hostile`` (0.0: share of generated threads that carry hostile strings and filenames).
* ``cursor_ttl_seconds`` (None: page tokens never expire; see also :meth:`expire_cursors`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nylas.models.webhooks import WebhookTriggers

from .._server import LoopbackServer
from .app import build_app
from .folders import FolderRec, Folders, folder_event
from .generate import stable_hex
from .mailbox import Mailbox
from .state import Faults, RateLimiter, Stats
from .webhooks import (
    DEFAULT_RETRY_DELAYS,
    DEFAULT_TRANSFORMED_FIELDS,
    WEBHOOK_TIMEOUT,
    Notification,
    Outbox,
    WebhookBuilder,
)


@dataclass
class Mutation:
    """What a mutation changed, plus the webhook notifications built for it."""

    notifications: list[Notification] = field(default_factory=list)
    message: dict[str, Any] | None = None
    thread: dict[str, Any] | None = None
    grant: dict[str, Any] | None = None
    folder: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"notifications": [n.payload for n in self.notifications]}
        for key in ("message", "thread", "grant", "folder"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class SandboxNylas(LoopbackServer):
    """Nylas v3 sandbox server.  ``base_url`` / ``grant_ids`` are valid after ``start()``."""

    thread_name = "sandbox-nylas"

    def __init__(self, *, threads: int = 200, seed: int = 0, grants: int = 3,
                 other_threads: int | None = None, api_key: str = "sandbox-api-key",
                 webhook_url: str | None = None, webhook_secret: str = "sandbox-webhook-secret",
                 latency_ms: int = 0, rate_limit: float | None = None,
                 host: str = "127.0.0.1", port: int = 0, anchor: int | None = None,
                 hang_seconds: float = 30.0, retry_after: int = 1,
                 truncate_at: int = 1_000_000, rate_limit_kind: str = "nylas",
                 retry_after_share: float = 0.5,
                 webhook_retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
                 webhook_gzip: bool = False, webhook_timeout: float = WEBHOOK_TIMEOUT,
                 message_variant: str | None = None,
                 transformed_fields: Sequence[str] = DEFAULT_TRANSFORMED_FIELDS,
                 hostile: float = 0.0, cursor_ttl_seconds: float | None = None,
                 thread_bodies: bool = True) -> None:
        # Whether a thread's latest_draft_or_message carries its body (the SDKs type it as a
        # whole Message, https://developer.nylas.com/docs/reference/api/threads/; False is the
        # harsher reading, and makes every thread need its own message request).
        self.thread_bodies = thread_bodies
        self.mailbox = Mailbox(seed=seed, threads=threads, grants=grants,
                               other_threads=other_threads, anchor=anchor, hostile=hostile,
                               cursor_ttl_seconds=cursor_ttl_seconds)
        self.seed = seed
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.latency_ms = latency_ms
        self.limiter = RateLimiter(rate_limit, kind=rate_limit_kind,
                                   retry_after_share=retry_after_share, seed=seed)
        self.faults = Faults(seed)
        self.faults.hang_seconds = hang_seconds
        self.forced_retry_after = retry_after
        self.stats = Stats()
        self.application_id = stable_hex("app", seed, n=32)
        self.webhooks = WebhookBuilder(self.application_id, webhook_secret, truncate_at)
        self.webhooks.set_variant(message_variant)
        self.webhooks.set_transformed_fields(transformed_fields)
        self.outbox = Outbox(webhook_url, webhook_timeout, retry_delays=webhook_retry_delays,
                             gzipped=webhook_gzip)
        self.folders = Folders(self.mailbox)
        self._replies = 0
        self.app = build_app(self)
        self._init_server(host, port)

    # ------------------------------------------------------------------ lifecycle
    @property
    def grant_ids(self) -> list[str]:
        return self.mailbox.grant_ids

    async def _on_start(self) -> None:
        await self.outbox.start()

    async def _on_stop(self) -> None:
        await self.outbox.stop()

    # ------------------------------------------------------------------ knobs
    def set_latency(self, ms: int) -> None:
        self.latency_ms = ms

    def set_rate_limit(self, per_second: float | None, *, kind: str | None = None,
                       retry_after_share: float | None = None) -> None:
        """Requests/s per grant (None: off); ``kind`` ``"nylas"`` | ``"provider"``."""
        self.limiter.configure(kind=kind, retry_after_share=retry_after_share)
        self.limiter.set_rate(per_second)

    def set_message_variant(self, variant: str | None,
                            transformed_fields: Sequence[str] | None = None) -> None:
        """Shape message.created/updated: None, "transformed", "metadata" or "cleaned"."""
        self.webhooks.set_variant(variant)
        if transformed_fields is not None:
            self.webhooks.set_transformed_fields(transformed_fields)

    def set_webhook_delivery(self, *, gzip: bool | None = None,
                             retry_delays: Sequence[float] | None = None) -> None:
        if gzip is not None:
            self.outbox.gzipped = bool(gzip)
        if retry_delays is not None:
            self.outbox.set_retry_delays(retry_delays)

    def set_cursor_ttl(self, seconds: float | None) -> None:
        """Page tokens older than ``seconds`` (since issued) answer as expired; None: never."""
        with self.mailbox.lock:
            self.mailbox.cursor_ttl = seconds

    def expire_cursors(self) -> None:
        """Invalidate every page token issued so far (they answer as expired)."""
        self.mailbox.expire_cursors()

    def inject_fault(self, kind: str, count: int = 1, *, endpoint: str | None = None,
                     grant_id: str | None = None) -> None:
        """Force ``kind`` on the next ``count`` matching requests (see ``FAULT_KINDS``)."""
        self.faults.inject(kind, count, endpoint=endpoint, scope=grant_id)

    def set_fault_rates(self, **rates: float) -> None:
        """Random faults: e.g. ``set_fault_rates(error_5xx=0.1, timeout=0.01)``."""
        self.faults.set_rates(**rates)

    def clear_faults(self) -> None:
        self.faults.clear()

    def get_stats(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def reset_stats(self) -> None:
        self.stats.reset()

    # ------------------------------------------------------------------ data access for tests
    def thread_ids(self, grant_id: str) -> list[str]:
        """All thread ids of a grant, newest first (what paging should yield)."""
        with self.mailbox.lock:
            return [k[1] for k in self.mailbox._thread_keys(grant_id)]

    def thread_json(self, grant_id: str, thread_id: str) -> dict[str, Any] | None:
        t = self.mailbox.thread(grant_id, thread_id)
        return None if t is None else t.to_json(grant_id)

    def message_json(self, grant_id: str, message_id: str) -> dict[str, Any] | None:
        m = self.mailbox.message(grant_id, message_id)
        return None if m is None else m.to_json(grant_id, include_headers=True)

    def hostile_threads(self, grant_id: str) -> dict[str, list[str]]:
        """Thread ids made hostile (``hostile`` knob), newest first, with what each carries."""
        return self.mailbox.hostile_threads(grant_id)

    def attachment_bytes(self, grant_id: str, attachment_id: str, message_id: str) -> bytes:
        from .blobs import random_chunks

        att = self.mailbox.attachment(grant_id, attachment_id, message_id)
        if att is None:
            raise KeyError(attachment_id)
        data = att.data if att.data is not None else self.mailbox.blob(att.id)
        return data if data is not None else b"".join(random_chunks(att.id, att.size))

    # ------------------------------------------------------------------ mutations + webhooks
    def _emit(self, notes: list[Notification], send: bool, duplicate: bool) -> None:
        if send:
            self.outbox.submit(notes, duplicate=duplicate)

    def add_message(self, grant_id: str, *, thread_id: str | None = None,
                    subject: str | None = None, body: str | None = None,
                    sender: dict[str, str] | None = None, date: int | None = None,
                    unread: bool = True, starred: bool = False,
                    folders: list[str] | None = None,
                    attachments: Iterable[tuple[str, str, bytes]] = (),
                    generated: Iterable[tuple[str, str, int]] = (),
                    send: bool = True, duplicate: bool = False,
                    tracked: bool = False) -> Mutation:
        """New message -> ``message.created``.

        ``thread.replied`` is a message-tracking trigger (source ``/com/nylas/tracking``): Nylas
        sends it only for threads of messages sent through Nylas with reply tracking on
        (https://developer.nylas.com/docs/reference/notifications/message-tracking/
        thread-replied/).  So it is emitted only with ``tracked=True`` for an existing thread;
        an ordinary reply is a ``message.created`` alone.
        """
        grant = self.mailbox.grants[grant_id]
        msg, thread, created = self.mailbox.add_message(
            grant_id, thread_id=thread_id, subject=subject, sender=sender, body=body,
            date=date, unread=unread, starred=starred, folders=folders,
            attachments=attachments, generated=generated)
        mjson = msg.to_json(grant_id)
        notes = [self.webhooks.message_event(WebhookTriggers.MESSAGE_CREATED, grant,
                                             msg.to_json(grant_id, include_headers=True))]
        if tracked and not created:
            ordered = sorted(thread.messages, key=lambda m: (m.date, m.id))
            notes.append(self.webhooks.thread_replied(
                grant, thread.id, ordered[0].id, ordered[-2].id, msg.id, len(ordered) - 1,
                msg.date))
        self._emit(notes, send, duplicate)
        return Mutation(notes, message=mjson, thread=thread.to_json(grant_id))

    def update_message(self, grant_id: str, message_id: str, *, unread: bool | None = None,
                       starred: bool | None = None, folders: list[str] | None = None,
                       send: bool = True, duplicate: bool = False) -> Mutation:
        grant = self.mailbox.grants[grant_id]
        msg = self.mailbox.update_message(grant_id, message_id, unread=unread, starred=starred,
                                          folders=folders)
        mjson = msg.to_json(grant_id)
        notes = [self.webhooks.message_event(WebhookTriggers.MESSAGE_UPDATED, grant,
                                             msg.to_json(grant_id, include_headers=True))]
        self._emit(notes, send, duplicate)
        return Mutation(notes, message=mjson)

    def delete_message(self, grant_id: str, message_id: str, *, send: bool = True,
                       duplicate: bool = False) -> Mutation:
        grant = self.mailbox.grants[grant_id]
        msg = self.mailbox.delete_message(grant_id, message_id)
        notes = [self.webhooks.message_deleted(grant, msg.id)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, message={"id": msg.id, "grant_id": grant_id,
                                        "thread_id": msg.thread_id, "object": "message"})

    def expire_grant(self, grant_id: str, *, send: bool = True,
                     duplicate: bool = False) -> Mutation:
        grant = self.mailbox.expire_grant(grant_id)
        notes = [self.webhooks.grant_event(WebhookTriggers.GRANT_EXPIRED, grant)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, grant=grant.to_json())

    def revive_grant(self, grant_id: str, *, send: bool = True,
                     duplicate: bool = False) -> Mutation:
        """Re-authenticate a grant -> ``grant.updated`` with code 25027 and
        ``reauthentication_flag: true``
        (https://developer.nylas.com/docs/reference/notifications/grants/grant-updated/)."""
        grant = self.mailbox.revive_grant(grant_id)
        notes = [self.webhooks.grant_event(WebhookTriggers.GRANT_UPDATED, grant,
                                           reauthenticated=True)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, grant=grant.to_json())

    def update_grant(self, grant_id: str, *, send: bool = True,
                     duplicate: bool = False) -> Mutation:
        """Any other change to a grant -> plain ``grant.updated`` (code 25014,
        ``reauthentication_flag: false``); the grant's status is left as it is."""
        grant = self.mailbox.touch_grant(grant_id)
        notes = [self.webhooks.grant_event(WebhookTriggers.GRANT_UPDATED, grant)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, grant=grant.to_json())

    def reply_to_random_threads(self, grant_id: str, n: int, *, older_than_rank: int = 200,
                                seed: int | None = None, send: bool = True) -> list[str]:
        """Reply to ``n`` threads now ranked ``older_than_rank`` or further down the newest-first
        list (so past the first page of any listing), moving each to the top.

        Each reply is an ordinary (untracked) ``message.created``.  Threads are picked with
        ``random.Random(seed)`` (default: derived from the sandbox seed and a call counter, so
        runs repeat).  Returns the thread ids in the order they were replied to; the last one
        ends up newest.  Meant to race discovery/backfill with new mail.
        """
        if n < 0 or older_than_rank < 0:
            raise ValueError("n and older_than_rank must not be negative")
        candidates = self.thread_ids(grant_id)[older_than_rank:]
        if len(candidates) < n:
            raise ValueError(f"only {len(candidates)} threads rank {older_than_rank} or lower")
        self._replies += 1
        rng = random.Random(seed if seed is not None
                            else f"{self.seed}:replies:{grant_id}:{self._replies}")
        picked = rng.sample(candidates, n)
        for tid in picked:
            self.add_message(grant_id, thread_id=tid, send=send)
        return picked

    # Folders (.folders): each change announced as folder.created / .updated / .deleted.
    def create_folder(self, grant_id: str, name: str, *, parent_id: str | None = None,
                      background_color: str | None = None, text_color: str | None = None,
                      folder_id: str | None = None, send: bool = True,
                      duplicate: bool = False) -> Mutation:
        rec = self.folders.create(grant_id, name, parent_id=parent_id, folder_id=folder_id,
                                  background_color=background_color, text_color=text_color)
        return self._folder_changed(WebhookTriggers.FOLDER_CREATED, grant_id, rec, send,
                                    duplicate)

    def update_folder(self, grant_id: str, folder_id: str, *, send: bool = True,
                      duplicate: bool = False, **changes: Any) -> Mutation:
        """Rename (``name``), move (``parent_id``) or recolour a folder."""
        rec = self.folders.update(grant_id, folder_id, **changes)
        return self._folder_changed(WebhookTriggers.FOLDER_UPDATED, grant_id, rec, send,
                                    duplicate)

    def delete_folder(self, grant_id: str, folder_id: str, *, send: bool = True,
                      duplicate: bool = False) -> Mutation:
        rec = self.folders.delete(grant_id, folder_id)
        return self._folder_changed(WebhookTriggers.FOLDER_DELETED, grant_id, rec, send,
                                    duplicate)

    def _folder_changed(self, trigger: WebhookTriggers, grant_id: str, rec: FolderRec,
                        send: bool, duplicate: bool) -> Mutation:
        grant = self.mailbox.grants[grant_id]
        notes = [folder_event(self.webhooks, trigger, grant, rec)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, folder=rec.to_json(grant, None, 0))

    def delete_grant(self, grant_id: str, *, send: bool = True,
                     duplicate: bool = False) -> Mutation:
        grant = self.mailbox.delete_grant(grant_id)
        notes = [self.webhooks.grant_event(WebhookTriggers.GRANT_DELETED, grant)]
        self._emit(notes, send, duplicate)
        return Mutation(notes, grant=grant.to_json())

    def send_notifications(self, notes: Sequence[Notification], *,
                           duplicate: bool = False) -> None:
        """(Re)send already built notifications, e.g. ones built with ``send=False``."""
        self.outbox.submit(list(notes), duplicate=duplicate)

    def hold_webhooks(self) -> None:
        """Queue notifications instead of sending them until ``release_webhooks``."""
        self.outbox.hold()

    def release_webhooks(self, order: str | Sequence[int] = "fifo") -> list[Notification]:
        return self.outbox.release(order, seed=self.seed)

    def wait_webhooks(self, timeout: float = 10.0) -> None:
        """Block until every submitted notification was POSTed (call from a non-server thread)."""
        self.outbox.wait_idle(timeout)

    async def await_webhooks(self) -> None:
        """Async variant of ``wait_webhooks`` (10 s limit)."""
        await asyncio.to_thread(self.outbox.wait_idle, 10.0)

    @property
    def webhook_log(self) -> list[dict[str, Any]]:
        """One entry per delivery attempt: ``{id, type, attempt, status | error, outcome
        [, retry_in]}`` (see :class:`.webhooks.Outbox`)."""
        return self.outbox.entries()
