"""Gmail sandbox state: users, lazily generated threads, listing, history and mutations.

Listing (https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.threads/list
and .../users.messages/list): newest first, ``maxResults`` pages with an opaque
``nextPageToken`` (keyset: stable while new mail arrives at the top), ``labelIds`` (all must
match), SPAM and TRASH left out unless ``includeSpamTrash`` (or unless the caller asks for
those labels), ``resultSizeEstimate`` -- an estimate, and deliberately not exact once filters
apply.

History (https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.history/
list and https://developers.google.com/workspace/gmail/api/guides/sync): every mutation appends
one record per change (messageAdded, messageDeleted, labelAdded, labelRemoved) with an id that
grows by a random gap ("History IDs increase chronologically but are not contiguous with random
gaps in between valid IDs").  Records are retained by count (``history_max_records``) and/or
age (``history_max_age``) and can be dropped on demand (:meth:`Mailbox.expire_history`).  A
``startHistoryId`` older than the oldest change still retained -- or newer than the mailbox's
current id, which is no valid id either -- raises :class:`HistoryGone` (the API's 404; "If you
receive an HTTP 404 error response, your application should perform a full sync").
"""

from __future__ import annotations

import copy
import random
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from ..nylas.generate import person, thread_dates
from . import generate as gen
from .errors import ApiError
from .generate import MessageSpec, PartSpec, ThreadSpec
from .mime import payload, render
from .tokens import decode_token, encode_token

MAX_RESULTS = 500
HISTORY_TYPES = ("messageAdded", "messageDeleted", "labelAdded", "labelRemoved")
SPAM_TRASH = frozenset({"SPAM", "TRASH"})
T = TypeVar("T")
Key = tuple[int, str]


@dataclass(frozen=True)
class Rendered:
    raw: bytes
    template: dict[str, Any]  # the payload, attachment ids still to be minted


class HistoryGone(Exception):
    """The start history id is older than the retained history (or not a valid id)."""


@dataclass
class HistoryRecord:
    id: int
    kind: str  # one of HISTORY_TYPES
    message: dict[str, Any]  # {"id", "threadId", "labelIds"} after the change
    labels: list[str] = field(default_factory=list)  # what a label change added/removed
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """One History resource (https://developers.google.com/workspace/gmail/api/reference/
        rest/v1/users.history#History)."""
        ref = {"id": self.message["id"], "threadId": self.message["threadId"]}
        out: dict[str, Any] = {"id": str(self.id), "messages": [ref]}
        key = {"messageAdded": "messagesAdded", "messageDeleted": "messagesDeleted",
               "labelAdded": "labelsAdded", "labelRemoved": "labelsRemoved"}[self.kind]
        entry: dict[str, Any] = {"message": dict(self.message)}
        if self.kind in ("labelAdded", "labelRemoved"):
            entry["labelIds"] = list(self.labels)
        out[key] = [entry]
        return out


@dataclass
class UserBox:
    idx: int
    email: str
    name: str
    n_threads: int
    dates: list[int]
    hostile: dict[int, int]  # thread index -> hostile ordinal
    history_id: int
    rng: random.Random
    scope: str = "https://www.googleapis.com/auth/gmail.readonly"
    over: dict[str, ThreadSpec | None] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # message id -> thread id (added)
    history: list[HistoryRecord] = field(default_factory=list)
    floor: int = 0  # highest history id expired so far
    thread_keys: list[Key] | None = None
    message_keys: list[Key] | None = None


def _page(keys: Sequence[Key], load: Callable[[Key], T | None], limit: int, after: Key | None,
          pred: Callable[[T], bool]) -> tuple[list[T], Key | None, int]:
    """Walk ``keys`` from after ``after``; (page, next key, how many keys were scanned)."""
    start = bisect_right(keys, after) if after is not None else 0
    out: list[T] = []
    last: Key | None = None
    for k in range(start, len(keys)):
        obj = load(keys[k])
        if obj is None or not pred(obj):
            continue
        if len(out) == limit:
            return out, last, k - start
        out.append(obj)
        last = keys[k]
    return out, None, len(keys) - start


class Mailbox:
    """All users of one sandbox.  Thread-safe: every public method takes the lock."""

    def __init__(self, *, seed: int = 0, threads: int = 200, users: int | Sequence[str] = 3,
                 other_threads: int | None = None, anchor: int | None = None,
                 hostile: float = 0.0, cache_size: int = 8192,
                 history_max_records: int | None = None,
                 history_max_age: float | None = None, history_gap: int = 40) -> None:
        if not 0.0 <= hostile <= 1.0:
            raise ValueError(f"hostile is a share of threads between 0 and 1, not {hostile}")
        if anchor is None:
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            anchor = int(today.timestamp())
        self.seed, self.anchor, self.hostile = seed, anchor, hostile
        self.lock = threading.RLock()
        self.history_max_records = history_max_records
        self.history_max_age = history_max_age
        self.history_gap = max(1, history_gap)
        others = other_threads if other_threads is not None else max(5, min(200, threads // 10))
        given = list(users) if not isinstance(users, int) else []
        count = users if isinstance(users, int) else len(given)
        self.users: dict[str, UserBox] = {}
        used: set[str] = set()
        for ui in range(count):
            name, email = gen.user_identity(seed, ui, used)
            if given:
                email, name = given[ui].lower(), given[ui].split("@")[0].title()
            used.add(email)
            n = threads if ui == 0 else others
            chosen = sorted(random.Random(f"{seed}:{ui}:gmail-hostile").sample(
                range(n), round(n * hostile))) if hostile else []
            rng = random.Random(f"{seed}:{ui}:history")
            self.users[email] = UserBox(
                idx=ui, email=email, name=name, n_threads=n,
                dates=thread_dates(seed, 100 + ui, n, anchor),
                hostile={i: k for k, i in enumerate(chosen)},
                history_id=gen.generated_history_id(anchor, anchor + 2 * 86_400, 0)
                + rng.randint(1_000, 9_999), rng=rng)
        self._counter = 0
        self._gen = lru_cache(maxsize=cache_size)(self._generate)
        self._raw: OrderedDict[tuple[str, str, int], Rendered] = OrderedDict()
        self._raw_max = 512

    # ----------------------------------------------------------------- lookups
    @property
    def emails(self) -> list[str]:
        return list(self.users)

    def user(self, email: str) -> UserBox:
        box = self.users.get(email.lower())
        if box is None:
            raise KeyError(email)
        return box

    def _generate(self, email: str, i: int) -> ThreadSpec:
        u = self.users[email]
        return gen.build_thread(self.seed, u.idx, (u.name, u.email), i, u.dates[i],
                                self.anchor, hostile_ordinal=u.hostile.get(i))

    def thread(self, email: str, tid: str) -> ThreadSpec | None:
        with self.lock:
            u = self.user(email)
            if tid in u.over:
                return u.over[tid]
            parsed = gen.parse_base_id(tid)
            if parsed is None or parsed[1] != 0 or parsed[0] >= u.n_threads:
                return None
            i = parsed[0]
            if tid != gen.base_message_id(self.seed, u.idx, i, 0):
                return None
            return self._gen(u.email, i)

    def message(self, email: str, mid: str) -> MessageSpec | None:
        with self.lock:
            u = self.user(email)
            tid = u.owner.get(mid)
            if tid is None:
                parsed = gen.parse_base_id(mid)
                if parsed is None or parsed[0] >= u.n_threads:
                    return None
                tid = gen.base_message_id(self.seed, u.idx, parsed[0], 0)
            thread = self.thread(email, tid)
            if thread is None:
                return None
            return next((m for m in thread.messages if m.id == mid), None)

    def rendered(self, email: str, spec: MessageSpec) -> Rendered:
        """RFC 822 bytes and payload template of a message (made once, then cached)."""
        key = (email, spec.id, spec.version)
        with self.lock:
            hit = self._raw.get(key)
            if hit is not None:
                self._raw.move_to_end(key)
                return hit
        raw = render(spec, None if "SENT" in spec.labels else email)
        made = Rendered(raw, payload(raw))
        with self.lock:
            self._raw[key] = made
            while len(self._raw) > self._raw_max:
                self._raw.popitem(last=False)
        return made

    def raw(self, email: str, spec: MessageSpec) -> bytes:
        return self.rendered(email, spec).raw

    def hostile_threads(self, email: str) -> dict[str, list[str]]:
        with self.lock:
            u = self.user(email)
            out: dict[str, list[str]] = {}
            for i, ordinal in sorted(u.hostile.items()):
                tid = gen.base_message_id(self.seed, u.idx, i, 0)
                if u.over.get(tid, True) is not None:
                    out[tid] = gen.hostile_kinds(ordinal)
            return out

    # ----------------------------------------------------------------- keys
    def _thread_keys(self, u: UserBox) -> list[Key]:
        if u.thread_keys is None:
            keys = [(-u.dates[i], tid) for i in range(u.n_threads)
                    if (tid := gen.base_message_id(self.seed, u.idx, i, 0)) not in u.over]
            keys += [(-(t.latest_ms // 1000), t.id) for t in u.over.values() if t is not None]
            keys.sort()
            u.thread_keys = keys
        return u.thread_keys

    def _message_keys(self, u: UserBox) -> list[Key]:
        if u.message_keys is None:
            keys: list[Key] = []
            for _, tid in self._thread_keys(u):
                thread = self.thread(u.email, tid)
                if thread is not None:
                    keys.extend((-m.internal_ms, m.id) for m in thread.messages)
            keys.sort()
            u.message_keys = keys
        return u.message_keys

    @staticmethod
    def _thread_key(t: ThreadSpec) -> Key:
        return -(t.latest_ms // 1000), t.id

    # ----------------------------------------------------------------- listing
    def list_threads(self, email: str, *, limit: int = 100, page_token: str | None = None,
                     label_ids: Sequence[str] = (), include_spam_trash: bool = False,
                     after_ms: int | None = None, before_ms: int | None = None,
                     ) -> tuple[list[ThreadSpec], str | None, int]:
        with self.lock:
            u = self.user(email)
            keys = self._thread_keys(u)
            after = decode_token("t", page_token) if page_token else None
            hide = not include_spam_trash and not SPAM_TRASH & set(label_ids)

            def visible(m: MessageSpec) -> bool:
                return not (hide and SPAM_TRASH & set(m.labels)) and (
                    after_ms is None or m.internal_ms >= after_ms) and (
                    before_ms is None or m.internal_ms < before_ms)

            def pred(t: ThreadSpec) -> bool:
                shown = [m for m in t.messages if visible(m)]
                have = {lb for m in shown for lb in m.labels}
                return bool(shown) and all(lb in have for lb in label_ids)

            items, nxt, scanned = _page(keys, lambda k: self.thread(email, k[1]), limit, after,
                                        pred)
            return items, None if nxt is None else encode_token("t", nxt), \
                _estimate(len(items), scanned, len(keys), nxt is None)

    def list_messages(self, email: str, *, limit: int = 100, page_token: str | None = None,
                      label_ids: Sequence[str] = (), include_spam_trash: bool = False,
                      after_ms: int | None = None, before_ms: int | None = None,
                      ) -> tuple[list[MessageSpec], str | None, int]:
        with self.lock:
            u = self.user(email)
            keys = self._message_keys(u)
            after = decode_token("m", page_token) if page_token else None
            hide = not include_spam_trash and not SPAM_TRASH & set(label_ids)

            def pred(m: MessageSpec) -> bool:
                return not (hide and SPAM_TRASH & set(m.labels)) and all(
                    lb in m.labels for lb in label_ids) and (
                    after_ms is None or m.internal_ms >= after_ms) and (
                    before_ms is None or m.internal_ms < before_ms)

            items, nxt, scanned = _page(keys, lambda k: self.message(email, k[1]), limit, after,
                                        pred)
            return items, None if nxt is None else encode_token("m", nxt), \
                _estimate(len(items), scanned, len(keys), nxt is None)

    def totals(self, email: str) -> tuple[int, int]:
        """(messagesTotal, threadsTotal) for users.getProfile."""
        with self.lock:
            u = self.user(email)
            return len(self._message_keys(u)), len(self._thread_keys(u))

    # ----------------------------------------------------------------- history
    def _retain(self, u: UserBox) -> None:
        drop = 0
        if self.history_max_records is not None:
            drop = max(0, len(u.history) - self.history_max_records)
        if self.history_max_age is not None:
            cutoff = time.time() - self.history_max_age
            while drop < len(u.history) and u.history[drop].at <= cutoff:
                drop += 1
        if drop:
            u.floor = max(u.floor, u.history[drop - 1].id)
            del u.history[:drop]

    def history(self, email: str, start: int, *, types: Sequence[str] = (),
                label_id: str | None = None, limit: int = 100, page_token: str | None = None,
                ) -> tuple[list[HistoryRecord], str | None, int]:
        """Records after ``start`` (oldest first), the next page token, the current id."""
        with self.lock:
            u = self.user(email)
            self._retain(u)
            after = start
            if page_token:
                neg, _ = decode_token("h", page_token)
                after = max(start, -neg)
            if start < u.floor or start > u.history_id or after < u.floor:
                raise HistoryGone(start)
            ids = [r.id for r in u.history]
            out: list[HistoryRecord] = []
            for rec in u.history[bisect_right(ids, after):]:
                if types and rec.kind not in types:
                    continue
                if label_id is not None and label_id not in rec.message.get("labelIds", []) \
                        and label_id not in rec.labels:
                    continue
                if len(out) == limit:
                    return out, encode_token("h", (-out[-1].id, "")), u.history_id
                out.append(rec)
            return out, None, u.history_id

    def expire_history(self, email: str, through: int | None = None) -> int:
        """Drop the records up to ``through`` (default: all of them, up to the current id);
        a later ``startHistoryId`` below the returned floor answers 404."""
        with self.lock:
            u = self.user(email)
            limit = u.history_id if through is None else through
            u.history = [r for r in u.history if r.id > limit]
            u.floor = max(u.floor, limit)
            return u.floor

    def _record(self, u: UserBox, kind: str, msg: MessageSpec, labels: Sequence[str] = (),
                ) -> HistoryRecord:
        u.history_id += u.rng.randint(1, self.history_gap)
        msg.history_id = u.history_id
        rec = HistoryRecord(u.history_id, kind, {"id": msg.id, "threadId": msg.thread_id,
                                                 "labelIds": list(msg.labels)}, list(labels))
        u.history.append(rec)
        self._retain(u)
        return rec

    # ----------------------------------------------------------------- mutations
    def _editable(self, u: UserBox, tid: str) -> ThreadSpec | None:
        if tid in u.over:
            return u.over[tid]
        base = self.thread(u.email, tid)
        if base is None:
            return None
        thread = copy.deepcopy(base)
        u.over[tid] = thread
        return thread

    def _rekey(self, u: UserBox, old: Key | None, thread: ThreadSpec | None) -> None:
        keys = u.thread_keys
        if keys is not None:
            if old is not None:
                at = bisect_left(keys, old)
                if at < len(keys) and keys[at] == old:
                    del keys[at]
            if thread is not None and thread.messages:
                insort(keys, self._thread_key(thread))

    def _msg_key(self, u: UserBox, key: Key, add: bool) -> None:
        keys = u.message_keys
        if keys is None:
            return
        if add:
            insort(keys, key)
            return
        at = bisect_left(keys, key)
        if at < len(keys) and keys[at] == key:
            del keys[at]

    def add_message(self, email: str, *, thread_id: str | None = None,
                    subject: str | None = None, text: str | None = None,
                    html: str | None = None, sender: tuple[str, str] | None = None,
                    labels: Sequence[str] | None = None,
                    attachments: Iterable[tuple[str, str, bytes]] = (),
                    generated: Iterable[tuple[str, str, int]] = (),
                    date_ms: int | None = None,
                    ) -> tuple[MessageSpec, HistoryRecord]:
        """Deliver a message into ``thread_id`` (a reply) or a new thread."""
        with self.lock:
            u = self.user(email)
            self._counter += 1
            n = self._counter
            rng = random.Random(f"{self.seed}:{email}:new:{n}")
            mid = gen.new_message_id(self.seed, email, n)
            keys = self._thread_keys(u)  # before the new thread exists
            newest = -keys[0][0] * 1000 + 999 if keys else 0
            old: Key | None = None
            if thread_id is None:
                thread = ThreadSpec(mid, [])
                u.over[mid] = thread
            else:
                found = self._editable(u, thread_id)
                if found is None or not found.messages:
                    raise KeyError(thread_id)
                thread = found
                old = self._thread_key(thread)
            prev = thread.messages[-1] if thread.messages else None
            if sender is None:
                p = person(rng)
                sender = (p["name"], p["email"])
            subj = subject or (f"Re: {prev.subject.removeprefix('Re: ')}" if prev
                               else f"New message {n}")
            when = date_ms if date_ms is not None else max(int(time.time() * 1000), newest + 1)
            body = text if text is not None else f"Hi {u.name.split()[0]},\n\nSandbox message.\n"
            parts = [PartSpec(fn, ct, "blob", f"{mid}:a{k}", data=data)
                     for k, (fn, ct, data) in enumerate(attachments)]
            parts += [PartSpec(fn, ct, "bin", f"{mid}:g{k}", size=int(size))
                      for k, (fn, ct, size) in enumerate(generated)]
            msg = MessageSpec(
                id=mid, thread_id=thread.id, internal_ms=when, history_id=0,
                labels=list(labels) if labels is not None
                else ["UNREAD", "CATEGORY_PERSONAL", "INBOX"],
                sender=sender, to=[(u.name, u.email)], cc=[], subject=subj, text=body,
                html=html, charset="utf-8", layout="alternative" if html else "plain",
                msgid=f"<{mid}@sandbox.gmail>",
                in_reply_to=prev.msgid if prev else None,
                references=thread.messages[0].msgid if prev else None, attachments=parts)
            thread.messages.append(msg)
            u.owner[mid] = thread.id
            self._rekey(u, old, thread)
            self._msg_key(u, (-msg.internal_ms, mid), True)
            return msg, self._record(u, "messageAdded", msg)

    def delete_message(self, email: str, mid: str) -> tuple[MessageSpec, HistoryRecord]:
        """Delete permanently (messages.delete, not trash)."""
        with self.lock:
            u = self.user(email)
            found = self.message(email, mid)
            if found is None:
                raise KeyError(mid)
            thread = self._editable(u, found.thread_id)
            assert thread is not None
            old = self._thread_key(thread)
            msg = next(m for m in thread.messages if m.id == mid)
            thread.messages = [m for m in thread.messages if m.id != mid]
            if not thread.messages:
                u.over[thread.id] = None
            self._rekey(u, old, thread if thread.messages else None)
            self._msg_key(u, (-msg.internal_ms, mid), False)
            rec = self._record(u, "messageDeleted", msg)
            return msg, rec

    def modify_labels(self, email: str, mid: str, *, add: Sequence[str] = (),
                      remove: Sequence[str] = ()) -> tuple[MessageSpec, list[HistoryRecord]]:
        """Add/remove labels; one history record per kind of actual change (none if none)."""
        with self.lock:
            u = self.user(email)
            found = self.message(email, mid)
            if found is None:
                raise KeyError(mid)
            thread = self._editable(u, found.thread_id)
            assert thread is not None
            msg = next(m for m in thread.messages if m.id == mid)
            added = [lb for lb in dict.fromkeys(add) if lb not in msg.labels]
            removed = [lb for lb in dict.fromkeys(remove) if lb in msg.labels and lb not in added]
            recs: list[HistoryRecord] = []
            if added:
                msg.labels = [*msg.labels, *added]
                recs.append(self._record(u, "labelAdded", msg, added))
            if removed:
                msg.labels = [lb for lb in msg.labels if lb not in removed]
                recs.append(self._record(u, "labelRemoved", msg, removed))
            return msg, recs


def _estimate(found: int, scanned: int, total: int, last: bool) -> int:
    """resultSizeEstimate: exact-looking when nothing filters, a rough guess otherwise."""
    if scanned == 0:
        return 0
    if last and scanned == total:
        return found
    return max(found, round(found / scanned * total))


def label_list() -> list[dict[str, Any]]:
    """labels.list (https://developers.google.com/workspace/gmail/api/reference/rest/v1/
    users.labels/list): system labels, then user labels with their visibility settings."""
    out: list[dict[str, Any]] = []
    for lid in gen.SYSTEM_LABELS:
        item: dict[str, Any] = {"id": lid, "name": lid}
        if lid in ("SENT", "DRAFT", "SPAM", "TRASH", "CHAT"):
            item |= {"messageListVisibility": "hide", "labelListVisibility": "labelHide"}
        out.append(item | {"type": "system"})
    for lid, name in gen.USER_LABELS:
        out.append({"id": lid, "name": name, "messageListVisibility": "show",
                    "labelListVisibility": "labelShow", "type": "user"})
    return out


def known_labels() -> frozenset[str]:
    return frozenset([*gen.SYSTEM_LABELS, *(lid for lid, _ in gen.USER_LABELS)])


def check_labels(label_ids: Iterable[str]) -> list[str]:
    known = known_labels()
    out = list(label_ids)
    for lid in out:
        if lid not in known:
            raise ApiError(400, "invalidArgument", f"Invalid label: {lid}")
    return out
