"""Sandbox mailbox state: grants, lazily generated threads, keyset paging and mutations.

Paging mirrors Nylas v3 list endpoints (``limit`` up to 200, opaque ``page_token`` taken from
the previous response's ``next_cursor``; https://developer.nylas.com/docs/api/v3/#pagination
and the SDK's ``ListQueryParams``: "defaults to 50. The maximum allowed value is 200").
Tokens encode the sort key of the last item returned, so pages stay stable when new mail
arrives at the top of the mailbox.  Date windows are half-open: ``after <= ts < before``.

Page tokens can go stale.  Nylas does not document a lifetime for ``page_token``; the sandbox
makes staleness testable: ``cursor_ttl_seconds`` ends a token's life that many seconds after it
was (last) issued, and :meth:`Mailbox.expire_cursors` invalidates every token issued so far (an
epoch number inside the token).  With a TTL set, a well-formed token this sandbox never issued
(for instance one from before a restart) counts as expired.  Stale tokens raise
:class:`ExpiredCursor`; the HTTP answer is in :func:`.errors.expired_page_token`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import random
import re
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from .generate import (
    DAY,
    GRANT_PROVIDERS,
    AttachmentRec,
    MessageRec,
    ThreadRec,
    build_thread,
    hostile_kinds,
    html_body,
    person,
    stable_hex,
    thread_dates,
)

MAX_LIMIT = 200
_TOP = "\U0010ffff"
Key = tuple[int, str]
T = TypeVar("T")


class BadCursor(ValueError):
    """The page token is not one this sandbox issued."""


class ExpiredCursor(BadCursor):
    """The page token was issued here but is past its lifetime or was invalidated."""


@dataclass
class GrantRec:
    idx: int
    id: str
    email: str
    name: str
    provider: str
    created_at: int
    n_threads: int
    dates: list[int]
    status: str = "valid"
    deleted: bool = False
    updated_at: int = 0
    hostile: dict[int, int] = field(default_factory=dict)  # thread index -> hostile ordinal

    def to_json(self) -> dict[str, Any]:
        """Grant object per https://developer.nylas.com/docs/reference/api/manage-grants/."""
        return {
            "id": self.id, "provider": self.provider, "grant_status": self.status,
            "email": self.email, "scope": ["https://mail.google.com/"]
            if self.provider == "google" else ["Mail.Read", "offline_access"],
            "user_agent": "nova-sandbox", "ip": "127.0.0.1", "state": "",
            "created_at": self.created_at, "updated_at": self.updated_at or self.created_at,
            "provider_user_id": stable_hex("user", self.id, n=21), "settings": {},
        }


def encode_cursor(kind: str, key: Key, epoch: int = 0) -> str:
    raw = json.dumps([kind, key[0], key[1], epoch], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, token: str) -> tuple[Key, int]:
    """``(sort key, epoch)`` of a token; :class:`BadCursor` when it is not well formed."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        got_kind, neg_ts, ident, epoch = json.loads(raw)
        if got_kind != kind or not isinstance(neg_ts, int) or not isinstance(ident, str) \
                or not isinstance(epoch, int):
            raise BadCursor(token)
        return (neg_ts, ident), epoch
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadCursor(token) from exc


def page_keys(keys: Sequence[Key], load: Callable[[Key], T | None], *, limit: int,
              cursor: Key | None, after: int | None, before: int | None,
              pred: Callable[[T], bool] | None) -> tuple[list[T], Key | None]:
    """Walk ``keys`` (sorted newest first) from the cursor; return a page and the next key."""
    start = bisect_right(keys, (-before, _TOP)) if before is not None else 0
    stop = bisect_right(keys, (-after, _TOP)) if after is not None else len(keys)
    if cursor is not None:
        start = max(start, bisect_right(keys, cursor))
    out: list[T] = []
    last: Key | None = None
    for i in range(start, stop):
        obj = load(keys[i])
        if obj is None or (pred is not None and not pred(obj)):
            continue
        if len(out) == limit:
            return out, last
        out.append(obj)
        last = keys[i]
    return out, None


class Mailbox:
    """All grants of one sandbox.  Thread-safe: every public method takes the lock."""

    def __init__(self, *, seed: int = 0, threads: int = 200, grants: int = 3,
                 other_threads: int | None = None, anchor: int | None = None,
                 cache_size: int = 4096, hostile: float = 0.0,
                 cursor_ttl_seconds: float | None = None) -> None:
        if not 0.0 <= hostile <= 1.0:
            raise ValueError(f"hostile is a share of threads between 0 and 1, not {hostile}")
        if anchor is None:
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            anchor = int(today.timestamp())
        self.seed, self.anchor = seed, anchor
        self.lock = threading.RLock()
        others = other_threads if other_threads is not None else max(5, min(200, threads // 10))
        self.grants: dict[str, GrantRec] = {}
        used: set[str] = set()
        for gi in range(grants):
            rng = random.Random(f"{seed}:grant:{gi}")
            gid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            who = person(rng)
            email = who["email"] if who["email"] not in used else f"{gi}.{who['email']}"
            used.add(email)
            n = threads if gi == 0 else others
            chosen = sorted(random.Random(f"{seed}:{gi}:hostile").sample(
                range(n), round(n * hostile))) if hostile else []
            self.grants[gid] = GrantRec(
                idx=gi, id=gid, email=email, name=who["name"],
                provider=GRANT_PROVIDERS[gi % len(GRANT_PROVIDERS)],
                created_at=anchor - 400 * DAY + gi * 3600, n_threads=n,
                dates=thread_dates(seed, gi, n, anchor),
                hostile={i: k for k, i in enumerate(chosen)})
        self.hostile = hostile
        self.cursor_ttl: float | None = cursor_ttl_seconds
        self._epoch = 0
        self._issued: dict[str, float] = {}
        self._over: dict[str, dict[str, ThreadRec | None]] = {g: {} for g in self.grants}
        self._owner: dict[str, dict[str, str]] = {g: {} for g in self.grants}
        self._blobs: dict[str, bytes] = {}
        self._keys: dict[str, list[Key]] = {}
        self._msg_keys: dict[str, list[Key]] = {}
        self._counter = 0
        self._gen = lru_cache(maxsize=cache_size)(self._generate)

    # ----------------------------------------------------------------- ids and lookups
    @property
    def grant_ids(self) -> list[str]:
        return list(self.grants)

    def base_thread_id(self, grant: GrantRec, i: int) -> str:
        return f"{stable_hex(self.seed, grant.idx, i)}{i:06x}"

    def _parse_base(self, grant: GrantRec, tid: str) -> int | None:
        if len(tid) != 16:
            return None
        try:
            i = int(tid[10:], 16)
        except ValueError:
            return None
        if i < grant.n_threads and tid == self.base_thread_id(grant, i):
            return i
        return None

    def _generate(self, gid: str, i: int) -> ThreadRec:
        g = self.grants[gid]
        return build_thread(self.seed, g.idx, g.email, g.name, self.base_thread_id(g, i),
                            g.dates[i], hostile_ordinal=g.hostile.get(i))

    def hostile_threads(self, gid: str) -> dict[str, list[str]]:
        """Hostile thread ids of a grant (newest first) -> the kinds each carries."""
        with self.lock:
            g = self.grants[gid]
            out: dict[str, list[str]] = {}
            for i, ordinal in sorted(g.hostile.items()):
                tid = self.base_thread_id(g, i)
                if self._over[gid].get(tid, True) is not None:
                    out[tid] = hostile_kinds(ordinal)
            return out

    # ----------------------------------------------------------------- page tokens
    def expire_cursors(self) -> None:
        """Invalidate every page token issued so far."""
        with self.lock:
            self._epoch += 1
            self._issued.clear()

    def _issue(self, kind: str, key: Key | None) -> str | None:
        if key is None:
            return None
        token = encode_cursor(kind, key, self._epoch)
        self._issued[token] = time.monotonic()
        return token

    def _redeem(self, kind: str, token: str | None) -> Key | None:
        if not token:
            return None
        key, epoch = decode_cursor(kind, token)
        if epoch != self._epoch:
            raise ExpiredCursor(token)
        if self.cursor_ttl is not None:
            issued = self._issued.get(token)
            if issued is None or time.monotonic() - issued > self.cursor_ttl:
                raise ExpiredCursor(token)
        return key

    def grant(self, gid: str) -> GrantRec | None:
        return self.grants.get(gid)

    def thread(self, gid: str, tid: str) -> ThreadRec | None:
        with self.lock:
            over = self._over[gid]
            if tid in over:
                return over[tid]
            i = self._parse_base(self.grants[gid], tid)
            return None if i is None else self._gen(gid, i)

    def message(self, gid: str, mid: str) -> MessageRec | None:
        with self.lock:
            thread = self.thread(gid, self._owner[gid].get(mid, mid[:16]))
            if thread is None:
                return None
            return next((m for m in thread.messages if m.id == mid), None)

    def attachment(self, gid: str, aid: str, mid: str) -> AttachmentRec | None:
        msg = self.message(gid, mid)
        return None if msg is None else next((a for a in msg.attachments if a.id == aid), None)

    def blob(self, aid: str) -> bytes | None:
        return self._blobs.get(aid)

    # ----------------------------------------------------------------- listing
    def _thread_keys(self, gid: str) -> list[Key]:
        keys = self._keys.get(gid)
        if keys is None:
            g, over = self.grants[gid], self._over[gid]
            keys = [(-g.dates[i], tid) for i in range(g.n_threads)
                    if (tid := self.base_thread_id(g, i)) not in over]
            keys += [(-t.latest_ts, t.id) for t in over.values() if t is not None]
            keys.sort()
            self._keys[gid] = keys
        return keys

    def _message_keys(self, gid: str) -> list[Key]:
        keys = self._msg_keys.get(gid)
        if keys is None:
            keys = []
            for _, tid in self._thread_keys(gid):
                thread = self.thread(gid, tid)
                if thread is not None:
                    keys.extend((-m.date, m.id) for m in thread.messages)
            keys.sort()
            self._msg_keys[gid] = keys
        return keys

    def list_threads(self, gid: str, *, limit: int = 50, cursor: str | None = None,
                     after: int | None = None, before: int | None = None,
                     pred: Callable[[ThreadRec], bool] | None = None,
                     ) -> tuple[list[ThreadRec], str | None]:
        with self.lock:
            key = self._redeem("t", cursor)
            items, nxt = page_keys(self._thread_keys(gid), lambda k: self.thread(gid, k[1]),
                                   limit=limit, cursor=key, after=after, before=before,
                                   pred=pred)
            return items, self._issue("t", nxt)

    def list_messages(self, gid: str, *, thread_id: str | None = None, limit: int = 50,
                      cursor: str | None = None, after: int | None = None,
                      before: int | None = None,
                      pred: Callable[[MessageRec], bool] | None = None,
                      ) -> tuple[list[MessageRec], str | None]:
        with self.lock:
            key = self._redeem("m", cursor)
            if thread_id is not None:
                thread = self.thread(gid, thread_id)
                msgs = {m.id: m for m in thread.messages} if thread else {}
                keys = sorted((-m.date, m.id) for m in msgs.values())
                load: Callable[[Key], MessageRec | None] = lambda k: msgs.get(k[1])  # noqa: E731
            else:
                keys = self._message_keys(gid)
                load = lambda k: self.message(gid, k[1])  # noqa: E731
            items, nxt = page_keys(keys, load, limit=limit, cursor=key, after=after,
                                   before=before, pred=pred)
            return items, self._issue("m", nxt)

    # ----------------------------------------------------------------- mutations
    def _editable(self, gid: str, tid: str) -> ThreadRec | None:
        over = self._over[gid]
        if tid in over:
            return over[tid]
        base = self.thread(gid, tid)
        if base is None:
            return None
        thread = copy.deepcopy(base)
        over[tid] = thread
        return thread

    def _invalidate(self, gid: str) -> None:
        self._keys.pop(gid, None)
        self._msg_keys.pop(gid, None)

    def add_message(self, gid: str, *, thread_id: str | None = None, subject: str | None = None,
                    sender: dict[str, str] | None = None, body: str | None = None,
                    date: int | None = None, unread: bool = True, starred: bool = False,
                    folders: list[str] | None = None,
                    attachments: Iterable[tuple[str, str, bytes]] = (),
                    generated: Iterable[tuple[str, str, int]] = (),
                    ) -> tuple[MessageRec, ThreadRec, bool]:
        """Deliver a new message (into ``thread_id`` or a new thread).

        Returns ``(message, thread, created_thread)``.  ``attachments`` are
        ``(filename, content_type, data)`` triples served back byte-for-byte; ``generated`` are
        ``(filename, content_type, size)`` triples whose bytes are pseudo-random, generated
        from the attachment id as they are served (a gigabyte costs no memory).
        """
        with self.lock:
            g = self.grants[gid]
            self._counter += 1
            n = self._counter
            rng = random.Random(f"{self.seed}:{gid}:new:{n}")
            keys = self._thread_keys(gid)
            newest_ts = -keys[0][0] if keys else 0
            created = thread_id is None
            if thread_id is None:
                new_id = f"{stable_hex(self.seed, gid, 'thread', n, n=11)}n{n:04x}"
                thread = ThreadRec(id=new_id, messages=[])
                self._over[gid][new_id] = thread
            else:
                found = self._editable(gid, thread_id)
                if found is None:
                    raise KeyError(thread_id)
                thread = found
            prev = thread.messages[-1] if thread.messages else None
            sender = sender or person(rng)
            subj = subject or (f"Re: {prev.subject.removeprefix('Re: ')}" if prev
                               else f"New message {n}")
            when = date if date is not None else max(int(time.time()), newest_ts + 1)
            mid = f"{thread.id}n{n:04x}"
            gen_body, snippet = html_body(g.name.split()[0], ["Sandbox message."], sender["name"])
            if body is not None:
                snippet = " ".join(re.sub(r"<[^>]+>", " ", body[:2000]).split())[:100]
            atts = []
            for k, (filename, ctype, data) in enumerate(attachments):
                aid = f"{mid}a{k}"
                self._blobs[aid] = data
                atts.append(AttachmentRec(aid, filename, ctype, len(data), "blob"))
            for k, (filename, ctype, size) in enumerate(generated, start=len(atts)):
                atts.append(AttachmentRec(f"{mid}a{k}", filename, ctype, int(size), "bin"))
            msg = MessageRec(
                id=mid, thread_id=thread.id, subject=subj, from_=[sender],
                to=[{"name": g.name, "email": g.email}], cc=[], date=when,
                body=body if body is not None else gen_body, snippet=snippet,
                folders=folders or ["INBOX"], unread=unread, starred=starred,
                attachments=atts, headers=[{"name": "Message-ID", "value": f"<{mid}@sandbox>"},
                                           {"name": "Subject", "value": subj}])
            thread.messages.append(msg)
            self._owner[gid][mid] = thread.id
            self._invalidate(gid)
            return msg, thread, created

    def update_message(self, gid: str, mid: str, *, unread: bool | None = None,
                       starred: bool | None = None, folders: list[str] | None = None,
                       ) -> MessageRec:
        with self.lock:
            msg = self.message(gid, mid)
            if msg is None:
                raise KeyError(mid)
            thread = self._editable(gid, msg.thread_id)
            assert thread is not None
            msg = next(m for m in thread.messages if m.id == mid)
            if unread is not None:
                msg.unread = unread
            if starred is not None:
                msg.starred = starred
            if folders is not None:
                msg.folders = list(folders)
            self._invalidate(gid)
            return msg

    def delete_message(self, gid: str, mid: str) -> MessageRec:
        with self.lock:
            msg = self.message(gid, mid)
            if msg is None:
                raise KeyError(mid)
            thread = self._editable(gid, msg.thread_id)
            assert thread is not None
            thread.messages = [m for m in thread.messages if m.id != mid]
            if not thread.messages:
                self._over[gid][thread.id] = None
            self._invalidate(gid)
            return msg

    def expire_grant(self, gid: str) -> GrantRec:
        with self.lock:
            g = self.grants[gid]
            g.status, g.updated_at = "invalid", int(time.time())
            return g

    def revive_grant(self, gid: str) -> GrantRec:
        with self.lock:
            g = self.grants[gid]
            g.status, g.updated_at = "valid", int(time.time())
            return g

    def touch_grant(self, gid: str) -> GrantRec:
        with self.lock:
            g = self.grants[gid]
            g.updated_at = max(int(time.time()), g.updated_at + 1)
            return g

    def delete_grant(self, gid: str) -> GrantRec:
        with self.lock:
            g = self.grants[gid]
            g.deleted = True
            return g
