"""Gmail push notifications as a Cloud Pub/Sub push subscription delivers them.

Watch (https://developers.google.com/workspace/gmail/api/reference/rest/v1/users/watch and
https://developers.google.com/workspace/gmail/api/guides/push): ``labelIds`` with
``labelFilterBehavior`` include (default) or exclude decide which changes notify; the watch
answers ``{historyId, expiration}`` and lapses at ``expiration`` (7 days: "you must re-call
watch at least every 7 days"; ``watch_ttl`` shortens it); ``stop`` ends it.

Notifications (the push guide, "Receiving notifications"): the Pub/Sub message's ``data`` is
base64 of ``{"emailAddress", "historyId"}``, the mailbox's history id after the change.  "Each
user has a maximum notification rate of 1 event/sec. Any user notifications above that rate
will be dropped" and notifications "may be delayed or dropped" in extreme situations.  The
sandbox keeps at most one notification per user per ``min_interval`` (1 s): with
``excess="coalesce"`` (default) later changes fold into one notification sent when the second
has passed, carrying the newest history id; ``excess="drop"`` drops them, as the guide's
wording has it.  ``delay`` holds every notification back, ``drop_share`` drops that share
(seeded), :meth:`Push.drop_next` drops the next N.  ``historyId`` in ``data`` is a string or a
number (``number_share``, seeded per message): both have been seen.

Delivery (https://cloud.google.com/pubsub/docs/push): POST of ``{"message": {"data",
"messageId", "message_id", "publishTime", "publish_time", "attributes"}, "subscription"}``;
102, 200, 201, 202 and 204 acknowledge, anything else (or no answer) is retried with back-off
(``retry_delays``; Pub/Sub's default back-off runs from 10 s to 600 s), every attempt the same
``messageId``.  Authentication (https://cloud.google.com/pubsub/docs/authenticate-push-
subscriptions): ``auth="oidc"`` sends ``Authorization: Bearer <JWT>`` -- RS256 with a ``kid``,
claims ``iss`` https://accounts.google.com, ``aud`` (``audience``, default the endpoint URL),
``azp``/``sub`` (the service account's id), ``email`` (the push service account),
``email_verified`` true, ``iat``/``exp`` (one hour) -- verifiable against ``/oauth2/v1/certs``;
``auth="token"`` appends ``?token=<shared token>`` to the endpoint, the pattern older guides
use; ``"both"`` does both, ``"none"`` neither.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx

from ..nylas.generate import stable_hex
from .auth import signing_key
from .mailbox import HistoryRecord

SUCCESS = frozenset({102, 200, 201, 202, 204})
AUTH_MODES = ("oidc", "token", "both", "none")
EXCESS_MODES = ("coalesce", "drop")
DEFAULT_RETRY_DELAYS = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0)
WATCH_TTL = 7 * 86_400.0


@dataclass
class Watch:
    email: str
    topic: str
    labels: list[str]
    behavior: str  # include | exclude
    expiration_ms: int

    def wants(self, rec: HistoryRecord) -> bool:
        if not self.labels:
            return True
        have = set(rec.message.get("labelIds", [])) | set(rec.labels)
        hit = bool(have & set(self.labels))
        return hit if self.behavior == "include" else not hit


@dataclass
class PushConfig:
    endpoint: str | None = None
    auth: str = "oidc"
    token: str = "sandbox-push-token"
    audience: str | None = None
    service_account: str = "gmail-push@nova-sandbox.iam.gserviceaccount.com"
    subscription: str = "projects/nova-sandbox/subscriptions/gmail-push"
    min_interval: float = 1.0
    delay: float = 0.0
    drop_share: float = 0.0
    number_share: float = 0.5
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    excess: str = "coalesce"
    watch_ttl: float = WATCH_TTL
    timeout: float = 10.0

    def check(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"push auth must be one of {AUTH_MODES}, not {self.auth!r}")
        if self.excess not in EXCESS_MODES:
            raise ValueError(f"push excess must be one of {EXCESS_MODES}")
        for share in (self.drop_share, self.number_share):
            if not 0.0 <= share <= 1.0:
                raise ValueError("a share must be between 0 and 1")


@dataclass
class _UserState:
    last_sent: float = float("-inf")
    pending: int | None = None
    timer: asyncio.Task[None] | None = None


@dataclass
class Notification:
    """One published Pub/Sub message (what every delivery attempt of it carries)."""

    email: str
    history_id: int
    message_id: str
    publish_time: str
    as_number: bool
    data: dict[str, Any] = field(default_factory=dict)


class Push:
    def __init__(self, config: PushConfig, seed: int = 0) -> None:
        config.check()
        self.config = config
        self.watches: dict[str, Watch] = {}
        self.log: list[dict[str, Any]] = []
        self.published: list[Notification] = []
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}:push")
        self._drop_next = 0
        self._held = False
        self._seq = 0
        # Pub/Sub message ids are unique for good: each instance numbers from its own start
        # (microseconds since the epoch), so a restarted sandbox never repeats an earlier run's.
        self._id_base = time.time_ns() // 1000
        self._state: defaultdict[str, _UserState] = defaultdict(_UserState)
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(timeout=self.config.timeout)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    # ---------------------------------------------------------------- watch / stop
    def watch(self, email: str, topic: str, labels: Sequence[str], behavior: str) -> int:
        expiration = int((time.time() + self.config.watch_ttl) * 1000)
        with self._lock:
            self.watches[email] = Watch(email, topic, list(labels), behavior, expiration)
        return expiration

    def stop(self, email: str) -> None:
        with self._lock:
            self.watches.pop(email, None)

    def active(self, email: str) -> Watch | None:
        with self._lock:
            w = self.watches.get(email)
            if w is not None and w.expiration_ms <= time.time() * 1000:
                return None
            return w

    def drop_next(self, count: int = 1) -> None:
        with self._lock:
            self._drop_next += count

    def hold(self) -> None:
        """Publish nothing until :meth:`release`; changes meanwhile coalesce per user."""
        self._call(self._set_held, True)

    def release(self) -> None:
        self._call(self._set_held, False)

    def _call(self, fn: Any, *args: Any) -> None:
        if self._loop is None:
            raise RuntimeError("sandbox is not running")
        self._loop.call_soon_threadsafe(fn, *args)

    def _set_held(self, held: bool) -> None:
        self._held = held
        if not held:
            for email, st in list(self._state.items()):
                if st.pending is not None and st.timer is None:
                    hid, st.pending = st.pending, None
                    self._on_change(email, hid)

    # ---------------------------------------------------------------- changes
    def notify(self, email: str, records: Sequence[HistoryRecord]) -> bool:
        """A mailbox change (thread-safe): schedule a notification if a watch wants it."""
        w = self.active(email)
        if w is None or not records or not any(w.wants(r) for r in records):
            return False
        self._call(self._on_change, email, max(r.id for r in records))
        return True

    def _track(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_change(self, email: str, hid: int) -> None:
        st = self._state[email]
        if st.timer is not None or self._held:  # already scheduled (or held): coalesce
            st.pending = max(st.pending or 0, hid)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        too_soon = now < st.last_sent + self.config.min_interval
        if too_soon and self.config.excess == "drop":
            self._entry({"email": email, "historyId": hid, "outcome": "dropped_rate"})
            return
        due = max(now + self.config.delay, st.last_sent + self.config.min_interval)
        st.pending = hid
        st.timer = self._track(self._fire(email, due - now))

    async def _fire(self, email: str, wait: float) -> None:
        await asyncio.sleep(max(0.0, wait))
        st = self._state[email]
        hid = st.pending or 0
        st.timer, st.pending = None, None
        st.last_sent = asyncio.get_running_loop().time()
        with self._lock:
            forced = self._drop_next > 0
            self._drop_next -= 1 if forced else 0
            dropped = forced or self._rng.random() < self.config.drop_share
            as_number = self._rng.random() < self.config.number_share
            self._seq += 1
            seq = self._seq
        if dropped:
            self._entry({"email": email, "historyId": hid, "outcome": "dropped"})
            return
        now = datetime.now(UTC)
        note = Notification(email, hid, str(self._id_base * 1000 + seq),
                            now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                            as_number)
        note.data = {"emailAddress": email, "historyId": hid if as_number else str(hid)}
        with self._lock:
            self.published.append(note)
        await self._attempt(note, 1)

    # ---------------------------------------------------------------- delivery
    def url(self) -> str | None:
        base = self.config.endpoint
        if base is None or self.config.auth not in ("token", "both"):
            return base
        return base + ("&" if "?" in base else "?") + urlencode({"token": self.config.token})

    def envelope(self, note: Notification) -> dict[str, Any]:
        data = base64.b64encode(json.dumps(note.data).encode()).decode("ascii")
        return {"message": {"data": data, "messageId": note.message_id,
                            "message_id": note.message_id, "publishTime": note.publish_time,
                            "publish_time": note.publish_time, "attributes": {}},
                "subscription": self.config.subscription}

    def jwt(self, audience: str) -> str:
        now = int(time.time())
        sa_id = str(int(stable_hex(self.config.service_account, n=15), 16) % 10**21)
        return signing_key().sign({
            "aud": audience, "azp": sa_id, "email": self.config.service_account,
            "email_verified": True, "exp": now + 3600, "iat": now,
            "iss": "https://accounts.google.com", "sub": sa_id})

    async def _attempt(self, note: Notification, attempt: int) -> None:
        url = self.url()
        entry: dict[str, Any] = {"email": note.email, "historyId": note.history_id,
                                 "messageId": note.message_id, "attempt": attempt}
        if url is None:
            entry["outcome"] = "not_sent"
            self._entry(entry)
            return
        headers = {"Content-Type": "application/json",
                   "User-Agent": "APIs-Google; (+https://developers.google.com/webmasters/"
                                 "APIs-Google.html)"}
        if self.config.auth in ("oidc", "both"):
            headers["Authorization"] = "Bearer " + self.jwt(self.config.audience or url)
        ok = False
        try:
            assert self._client is not None
            resp = await self._client.post(url, content=json.dumps(self.envelope(note)),
                                           headers=headers)
            entry["status"] = resp.status_code
            ok = resp.status_code in SUCCESS
        except (httpx.HTTPError, OSError) as exc:
            entry["error"] = repr(exc)
        if ok:
            entry["outcome"] = "delivered"
        elif attempt <= len(self.config.retry_delays):
            delay = self.config.retry_delays[attempt - 1]
            entry["outcome"], entry["retry_in"] = "retrying", delay
            self._track(self._later(note, attempt + 1, delay))
        else:
            entry["outcome"] = "exhausted"
        self._entry(entry)

    async def _later(self, note: Notification, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._attempt(note, attempt)

    def _entry(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.log.append(entry)

    # ---------------------------------------------------------------- waiting
    async def _join(self) -> None:
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block (from a thread other than the server's) until every scheduled notification
        is delivered, dropped or out of attempts -- pending retries included."""
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._join(), self._loop)
        try:
            future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self.log]
