"""``SandboxGmail``: a real HTTP Gmail API v1 look-alike on loopback for tests and benchmarks.

Runs uvicorn in a background thread with its own event loop, so it serves sync code
(``with SandboxGmail(...) as sb``) and async tests (``async with SandboxGmail(...) as sb``)
alike, like :class:`nova.sandbox.nylas.SandboxNylas`.  Every knob and mutation is a thread-safe
method here and also reachable over HTTP under ``/_sandbox`` (:mod:`.control`).

Constructor knobs (defaults in brackets):

* mailbox: ``threads`` [200] in the first user's mailbox, ``other_threads`` [threads // 10,
  5..200] in the others', ``users`` [3] (a count, or the addresses), ``seed`` [0], ``anchor``
  [today 00:00 UTC], ``hostile`` [0.0] share of threads made hostile.
* OAuth: ``client_id``, ``client_secret``, ``access_token_ttl`` [3599 s], ``scope``
  [gmail.readonly] for every user (per user: :meth:`SandboxGmail.set_scope`).
* quota: ``quota_per_minute`` [15,000 units per user; None: off], ``quota_window`` [60 s,
  sliding], ``method_costs`` [Google's table], ``quota_error`` ["mixed": 429 or 403],
  ``quota_retry_after`` [False], ``project_quota_per_minute`` [None], ``max_concurrent`` [50
  in-flight requests per user; None: off].
* faults: ``latency_ms`` [0], ``hang_seconds`` [90, past httplib2's 60 s default].
* history: ``history_max_records`` [None], ``history_max_age`` [None s], ``history_gap`` [40:
  history ids grow by 1..gap per change]; attachments: ``attachment_id_ttl`` [3600 s; None:
  ids never expire].
* push: ``push_endpoint`` [None: notifications are logged, not sent], ``push_auth`` ["oidc" |
  "token" | "both" | "none"], ``push_token``, ``push_audience`` [the endpoint URL],
  ``push_service_account``, ``push_subscription``, ``pubsub_project`` ["nova-sandbox": watch
  accepts topics ``projects/<it>/topics/*`` only], ``push_min_interval`` [1 s],
  ``push_excess`` ["coalesce" | "drop"], ``push_delay`` [0 s], ``push_drop_share`` [0.0],
  ``push_number_share`` [0.5], ``push_retry_delays`` [10 .. 600 s], ``watch_ttl`` [7 days].
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .._server import LoopbackServer
from .api import Api
from .app import build_app
from .auth import READONLY, OAuth
from .labels import Labels
from .mailbox import HistoryRecord, Mailbox
from .push import DEFAULT_RETRY_DELAYS, WATCH_TTL, Push, PushConfig
from .state import Faults, Gate, Quota, Stats
from .tokens import AttachmentTokens


class SandboxGmail(LoopbackServer):
    """Gmail API v1 sandbox server.  ``base_url`` is valid after ``start()``."""

    thread_name = "sandbox-gmail"

    def __init__(self, *, threads: int = 200, seed: int = 0, users: int | Sequence[str] = 3,
                 other_threads: int | None = None, anchor: int | None = None,
                 hostile: float = 0.0,
                 client_id: str = "sandbox-client-id.apps.googleusercontent.com",
                 client_secret: str = "sandbox-client-secret", access_token_ttl: int = 3599,
                 scope: str = READONLY, quota_per_minute: int | None = 15_000,
                 quota_window: float = 60.0, method_costs: Mapping[str, int] | None = None,
                 quota_error: str = "mixed", quota_retry_after: bool = False,
                 project_quota_per_minute: int | None = None, max_concurrent: int | None = 50,
                 latency_ms: int = 0, hang_seconds: float = 90.0,
                 history_max_records: int | None = None, history_max_age: float | None = None,
                 history_gap: int = 40, attachment_id_ttl: float | None = 3600.0,
                 push_endpoint: str | None = None, push_auth: str = "oidc",
                 push_token: str = "sandbox-push-token", push_audience: str | None = None,
                 push_service_account: str = "gmail-push@nova-sandbox.iam.gserviceaccount.com",
                 push_subscription: str = "projects/nova-sandbox/subscriptions/gmail-push",
                 pubsub_project: str = "nova-sandbox", push_min_interval: float = 1.0,
                 push_excess: str = "coalesce", push_delay: float = 0.0,
                 push_drop_share: float = 0.0, push_number_share: float = 0.5,
                 push_retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
                 watch_ttl: float = WATCH_TTL, host: str = "127.0.0.1", port: int = 0) -> None:
        self.seed = seed
        self.mailbox = Mailbox(seed=seed, threads=threads, users=users,
                               other_threads=other_threads, anchor=anchor, hostile=hostile,
                               history_max_records=history_max_records,
                               history_max_age=history_max_age, history_gap=history_gap)
        self.oauth = OAuth(seed, self.mailbox.emails, client_id=client_id,
                           client_secret=client_secret, access_token_ttl=access_token_ttl)
        for email in self.mailbox.emails:
            self.oauth.set_scope(email, scope)
        self.quota = Quota(quota_per_minute, window=quota_window, costs=method_costs,
                           error=quota_error, retry_after=quota_retry_after,
                           project_per_minute=project_quota_per_minute, seed=seed)
        self.gate = Gate(max_concurrent)
        self.faults = Faults(seed, hang_seconds)
        self.stats = Stats()
        self.latency_ms = latency_ms
        self.attachment_ids = AttachmentTokens(seed, attachment_id_ttl)
        self.pubsub_project = pubsub_project
        self.project_number = str(100_000_000_000 + seed)
        self.push = Push(PushConfig(
            endpoint=push_endpoint, auth=push_auth, token=push_token, audience=push_audience,
            service_account=push_service_account, subscription=push_subscription,
            min_interval=push_min_interval, delay=push_delay, drop_share=push_drop_share,
            number_share=push_number_share, retry_delays=tuple(push_retry_delays),
            excess=push_excess, watch_ttl=watch_ttl), seed)
        self.labels = Labels(self.mailbox)
        self.api = Api(self)
        self.app = build_app(self)
        self._init_server(host, port)
        self._release = asyncio.Event()

    # ------------------------------------------------------------------ addresses
    @property
    def api_endpoint(self) -> str:
        """``client_options={"api_endpoint": ...}`` for googleapiclient.discovery.build: the
        root the discovery paths (``gmail/v1/users/...``) are joined to."""
        return self.base_url

    @property
    def token_uri(self) -> str:
        return self.base_url + "/token"

    @property
    def batch_uri(self) -> str:
        """For ``googleapiclient.http.BatchHttpRequest(batch_uri=...)``."""
        return self.base_url + "/batch/gmail/v1"

    @property
    def certs_url(self) -> str:
        return self.base_url + "/oauth2/v1/certs"

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/oauth2/v3/certs"

    @property
    def users(self) -> list[str]:
        return self.mailbox.emails

    def credentials(self, email: str) -> dict[str, Any]:
        """The user's ``authorized_user`` info (type, client_id, client_secret,
        refresh_token, token_uri)."""
        return self.oauth.authorized_user(self._email(email), self.token_uri)

    def access_token(self, email: str) -> str:
        """A fresh access token for plain-HTTP tests (no refresh round trip)."""
        return self.oauth.mint_access_token(self._email(email))

    def _email(self, email: str) -> str:
        return self.mailbox.user(email).email

    # ------------------------------------------------------------------ lifecycle
    async def _on_start(self) -> None:
        await self.push.start()

    async def _on_stop(self) -> None:
        await self.push.close()

    async def wait_stopped(self, seconds: float) -> None:
        """Sleep up to ``seconds``, ending early when the sandbox stops or
        :meth:`release_hangs` is called (the ``timeout`` fault)."""
        assert self.stop_event is not None
        release = self._release
        waiters = [asyncio.ensure_future(self.stop_event.wait()),
                   asyncio.ensure_future(release.wait())]
        try:
            done, _ = await asyncio.wait(waiters, timeout=seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not done:
            raise TimeoutError

    def release_hangs(self) -> None:
        """End every request hanging on a ``timeout`` fault now (it then answers 503)."""
        if self._loop is None:
            return
        old = self._release
        self._release = asyncio.Event()
        self._loop.call_soon_threadsafe(old.set)

    # ------------------------------------------------------------------ knobs
    def set_latency(self, ms: int) -> None:
        self.latency_ms = ms

    def set_quota(self, *, per_minute: int | None | str = "keep", window: float | None = None,
                  costs: Mapping[str, int] | None = None, error: str | None = None,
                  retry_after: bool | None = None,
                  project_per_minute: int | None | str = "keep") -> None:
        """Change the quota (``"keep"`` leaves a limit as it is; None turns it off)."""
        self.quota.configure(per_minute=per_minute, window=window, costs=costs, error=error,
                             retry_after=retry_after, project_per_minute=project_per_minute)

    def reset_quota(self) -> None:
        """Forget the units charged so far (a fresh window for every user)."""
        self.quota.reset()

    def set_max_concurrent(self, limit: int | None) -> None:
        self.gate.limit = limit

    def set_history_retention(self, *, max_records: int | None | str = "keep",
                              max_age: float | None | str = "keep") -> None:
        with self.mailbox.lock:
            if max_records != "keep":
                self.mailbox.history_max_records = (None if max_records is None
                                                    else int(max_records))
            if max_age != "keep":
                self.mailbox.history_max_age = None if max_age is None else float(max_age)

    def set_attachment_id_ttl(self, seconds: float | None) -> None:
        self.attachment_ids.ttl = seconds

    def set_push(self, **changes: Any) -> None:
        """Change push settings: any :class:`.push.PushConfig` field (``endpoint``, ``auth``,
        ``token``, ``audience``, ``min_interval``, ``delay``, ``drop_share``,
        ``number_share``, ``retry_delays``, ``excess``, ``watch_ttl`` ...)."""
        cfg = self.push.config
        for key, value in changes.items():
            if not hasattr(cfg, key):
                raise ValueError(f"unknown push setting {key!r}")
            setattr(cfg, key, tuple(value) if key == "retry_delays" else value)
        cfg.check()

    def drop_next_push(self, count: int = 1) -> None:
        self.push.drop_next(count)

    def hold_push(self) -> None:
        """Publish no notification until :meth:`release_push`; changes coalesce per user."""
        self.push.hold()

    def release_push(self) -> None:
        self.push.release()

    def wait_push(self, timeout: float = 10.0) -> None:
        """Block until every scheduled push notification is finished (retries included)."""
        self.push.wait_idle(timeout)

    async def await_push(self) -> None:
        """Async variant of :meth:`wait_push` (10 s limit)."""
        await asyncio.to_thread(self.push.wait_idle, 10.0)

    @property
    def push_log(self) -> list[dict[str, Any]]:
        """One entry per delivery attempt or drop: ``{email, historyId, messageId?, attempt?,
        status | error, outcome}``; outcome delivered | retrying | exhausted | dropped |
        dropped_rate | not_sent."""
        return self.push.entries()

    def inject_fault(self, kind: str, count: int = 1, *, endpoint: str | None = None,
                     user: str | None = None) -> None:
        """Force ``kind`` on the next ``count`` matching calls (``endpoint``: a method name
        such as ``messages.get``, or ``token``; see :data:`.state.FAULT_KINDS`)."""
        self.faults.inject(kind, count, endpoint=endpoint,
                           scope=None if user is None else self._email(user))

    def set_fault_rates(self, **rates: float) -> None:
        self.faults.set_rates(**rates)

    def clear_faults(self) -> None:
        self.faults.clear()

    def get_stats(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        snap["refreshes"] = dict(self.oauth.refreshes)
        snap["peak_concurrency"] = dict(self.gate.peak)
        return snap

    def reset_stats(self) -> None:
        self.stats.reset()

    # ------------------------------------------------------------------ auth knobs
    def revoke(self, email: str) -> None:
        """Revoke the user's refresh token (-> invalid_grant) and access tokens (-> 401)."""
        self.oauth.revoke(self._email(email))

    def reauthorize(self, email: str, scope: str | None = None) -> dict[str, Any]:
        """The user consents again: new credentials (the old refresh token stays dead)."""
        self.oauth.reauthorize(self._email(email), scope)
        return self.credentials(email)

    def expire_access_tokens(self, email: str | None = None) -> int:
        """End access tokens now (the next call answers 401 and the client refreshes)."""
        return self.oauth.expire_access_tokens(None if email is None else self._email(email))

    def set_scope(self, email: str, scope: str) -> None:
        self.oauth.set_scope(self._email(email), scope)

    # ------------------------------------------------------------------ data for tests
    def thread_ids(self, email: str, *, include_spam_trash: bool = True) -> list[str]:
        """Every thread id of a user, newest first."""
        out: list[str] = []
        token: str | None = None
        while True:
            items, token, _ = self.mailbox.list_threads(
                self._email(email), limit=500, page_token=token,
                include_spam_trash=include_spam_trash)
            out += [t.id for t in items]
            if token is None:
                return out

    def message_ids(self, email: str, *, include_spam_trash: bool = True) -> list[str]:
        out: list[str] = []
        token: str | None = None
        while True:
            items, token, _ = self.mailbox.list_messages(
                self._email(email), limit=500, page_token=token,
                include_spam_trash=include_spam_trash)
            out += [m.id for m in items]
            if token is None:
                return out

    def history_id(self, email: str) -> int:
        with self.mailbox.lock:
            return self.mailbox.user(email).history_id

    def raw_message(self, email: str, message_id: str) -> bytes:
        spec = self.mailbox.message(self._email(email), message_id)
        if spec is None:
            raise KeyError(message_id)
        return self.mailbox.raw(self._email(email), spec)

    def message_json(self, email: str, message_id: str, fmt: str = "full") -> dict[str, Any]:
        spec = self.mailbox.message(self._email(email), message_id)
        if spec is None:
            raise KeyError(message_id)
        return self.api.message_json(self._email(email), spec, fmt)

    def hostile_threads(self, email: str) -> dict[str, list[str]]:
        return self.mailbox.hostile_threads(self._email(email))

    # ------------------------------------------------------------------ mutations
    def _changed(self, email: str, records: Iterable[HistoryRecord]) -> int:
        recs = list(records)
        if recs and self._loop is not None:
            self.push.notify(email, recs)
        return self.history_id(email)

    def add_message(self, email: str, *, thread_id: str | None = None,
                    subject: str | None = None, text: str | None = None,
                    html: str | None = None, sender: tuple[str, str] | None = None,
                    labels: Sequence[str] | None = None,
                    attachments: Iterable[tuple[str, str, bytes]] = (),
                    generated: Iterable[tuple[str, str, int]] = (),
                    date_ms: int | None = None) -> dict[str, Any]:
        """Deliver a message: a new thread, or a reply into ``thread_id``.  ``attachments``
        are ``(filename, content_type, bytes)``; ``generated`` ``(filename, content_type,
        size)`` of pseudo-random bytes.  Appends a messageAdded record; pushes if watched."""
        email = self._email(email)
        msg, rec = self.mailbox.add_message(
            email, thread_id=thread_id, subject=subject, text=text, html=html, sender=sender,
            labels=labels, attachments=attachments, generated=generated, date_ms=date_ms)
        self._changed(email, [rec])
        return {"id": msg.id, "threadId": msg.thread_id, "labelIds": list(msg.labels),
                "historyId": rec.id}

    def delete_message(self, email: str, message_id: str) -> dict[str, Any]:
        email = self._email(email)
        msg, rec = self.mailbox.delete_message(email, message_id)
        self._changed(email, [rec])
        return {"id": msg.id, "threadId": msg.thread_id, "historyId": rec.id}

    def modify_labels(self, email: str, message_id: str, *, add: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> dict[str, Any]:
        email = self._email(email)
        msg, recs = self.mailbox.modify_labels(email, message_id, add=add, remove=remove)
        self._changed(email, recs)
        return {"id": msg.id, "threadId": msg.thread_id, "labelIds": list(msg.labels),
                "historyId": self.history_id(email), "records": [r.id for r in recs]}

    # Labels (.labels): Gmail's history records none of these, and nothing is pushed.
    def create_label(self, email: str, name: str, *, background_color: str | None = None,
                     text_color: str | None = None) -> dict[str, Any]:
        return self.labels.create(self._email(email), name, background_color=background_color,
                                  text_color=text_color)

    def rename_label(self, email: str, label_id: str, name: str) -> dict[str, Any]:
        return self.labels.patch(self._email(email), label_id, name=name)

    def delete_label(self, email: str, label_id: str) -> None:
        self.labels.delete(self._email(email), label_id)

    def expire_history(self, email: str, through: int | None = None) -> int:
        """Forget history up to ``through`` (default: all of it); a ``startHistoryId`` below
        the returned id answers 404 from then on."""
        return self.mailbox.expire_history(self._email(email), through)
