"""The Gmail API v1 calls, shared by plain HTTP requests and the inner calls of a batch.

Paths are the discovery document's (``gmail/v1/users/{userId}/...`` joined to the root URL; the
reference pages under https://developers.google.com/workspace/gmail/api/reference/rest/v1/):

* ``GET  users/{userId}/profile`` -- getProfile: ``{emailAddress, messagesTotal, threadsTotal,
  historyId}``
* ``GET  users/{userId}/labels`` -- labels.list (id, name, visibility, type: no colour or
  counts); ``GET labels/{id}`` (labels.get: in full), ``POST labels``, ``PATCH labels/{id}``,
  ``DELETE labels/{id}`` (:mod:`.labels`)
* ``GET  users/{userId}/threads`` -- threads.list: ``maxResults`` (default 100, at most 500),
  ``pageToken``, ``q``, ``labelIds`` (repeated), ``includeSpamTrash``; items ``{id, snippet,
  historyId}``; ``nextPageToken``, ``resultSizeEstimate``; no ``threads`` key when empty
* ``GET  users/{userId}/threads/{id}`` -- threads.get: ``format`` full | metadata | minimal,
  ``metadataHeaders``
* ``GET  users/{userId}/messages`` -- messages.list: as threads.list, items ``{id, threadId}``
* ``GET  users/{userId}/messages/{id}`` -- messages.get: ``format`` full | metadata | minimal
  | raw
* ``GET  users/{userId}/messages/{messageId}/attachments/{id}`` -- ``{attachmentId, size,
  data}``
* ``GET  users/{userId}/history`` -- history.list: ``startHistoryId`` (required),
  ``historyTypes`` (repeated), ``labelId``, ``maxResults`` (<= 500), ``pageToken``
* ``POST users/{userId}/watch`` -- ``{topicName, labelIds, labelFilterBehavior}`` ->
  ``{historyId, expiration}``; ``POST users/{userId}/stop`` -> 204

``userId`` ``me`` is the token's user; another address than the token's answers 403
"Delegation denied".  Under the ``gmail.metadata`` scope ``q`` is refused ("Metadata scope
does not support 'q' parameter"), and so are ``format=full``/``raw`` and attachments (the
scope's documented reach: https://developers.google.com/workspace/gmail/api/auth/scopes).
``maxResults`` over 500 is refused with 400 (the reference's "maximum allowed value"; GUESS:
Gmail may clamp instead).  ``q`` understands only ``after:``/``before:`` (epoch seconds, or
``yyyy/mm/dd`` read as midnight *Pacific* time, as
https://developers.google.com/workspace/gmail/api/guides/filtering warns), ``in:``,
``is:`` and ``label:``; any other term is refused with 400 so a test can never believe a search
ran that did not.

Order of checks for each call: route, authentication (401), the user (403), the scope (403),
the concurrency limit (429), throttling faults (not charged), quota (not charged when refused),
then the call is charged and any other injected fault or the handler answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo

from . import errors as E
from .auth import METADATA, READONLY, AccessToken
from .errors import ApiError, Reply
from .generate import USER_LABELS, MessageSpec, ThreadSpec
from .mailbox import HISTORY_TYPES, MAX_RESULTS, HistoryGone, check_labels
from .mime import b64url, fill, leaf_bytes, metadata, snippet
from .state import THROTTLE_FAULTS, Refusal
from .tokens import BadPageToken

if TYPE_CHECKING:
    from .server import SandboxGmail

PACIFIC = ZoneInfo("America/Los_Angeles")
FORMATS = ("full", "metadata", "minimal", "raw")
_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class Call:
    method: str
    path: str  # raw (percent-encoded) path, no query
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def get(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.query if k == name]

    @property
    def pretty(self) -> bool:
        return (self.get("prettyPrint") or "true").lower() != "false"


@dataclass
class Prepared:
    call: Call
    name: str
    handler: Callable[[Prepared], Awaitable[Reply]]
    params: dict[str, str]
    token: AccessToken
    slot: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def email(self) -> str:
        return self.token.email


class Api:
    def __init__(self, sb: SandboxGmail) -> None:
        self.sb = sb
        u = r"/gmail/v1/users/(?P<userId>[^/]+)"
        self.routes: list[tuple[str, re.Pattern[str], str,
                                Callable[[Prepared], Awaitable[Reply]]]] = [
            ("GET", re.compile(u + r"/profile$"), "getProfile", self.get_profile),
            ("POST", re.compile(u + r"/watch$"), "watch", self.watch),
            ("POST", re.compile(u + r"/stop$"), "stop", self.stop),
            ("GET", re.compile(u + r"/labels$"), "labels.list", self.labels),
            ("POST", re.compile(u + r"/labels$"), "labels.create", self.create_label),
            ("GET", re.compile(u + r"/labels/(?P<id>[^/]+)$"), "labels.get", self.get_label),
            ("PATCH", re.compile(u + r"/labels/(?P<id>[^/]+)$"), "labels.patch",
             self.patch_label),
            ("DELETE", re.compile(u + r"/labels/(?P<id>[^/]+)$"), "labels.delete",
             self.delete_label),
            ("GET", re.compile(u + r"/history$"), "history.list", self.history),
            ("GET", re.compile(u + r"/messages$"), "messages.list", self.list_messages),
            ("GET", re.compile(u + r"/messages/(?P<id>[^/]+)$"), "messages.get",
             self.get_message),
            ("GET", re.compile(u + r"/messages/(?P<messageId>[^/]+)/attachments/(?P<id>[^/]+)$"),
             "messages.attachments.get", self.get_attachment),
            ("GET", re.compile(u + r"/threads$"), "threads.list", self.list_threads),
            ("GET", re.compile(u + r"/threads/(?P<id>[^/]+)$"), "threads.get", self.get_thread),
        ]

    # ------------------------------------------------------------------ pipeline
    def prepare(self, call: Call, fallback_auth: str | None = None) -> Prepared | Reply:
        sb = self.sb
        found = next(((name, handler, m) for method, pattern, name, handler in self.routes
                      if method == call.method and (m := pattern.match(call.path))), None)
        if found is None:
            sb.stats.hit("unknown")
            return E.html_404(call.path)
        name, handler, m = found
        sb.stats.hit(name)
        params = {k: unquote(v) for k, v in m.groupdict().items()}
        try:
            token = sb.oauth.resolve(self._bearer(call, fallback_auth))
            user = params["userId"]
            if user != "me" and user.lower() != token.email:
                raise E.delegation_denied(token.email)
            if token.scope == METADATA:
                self._metadata_scope(name, call)
        except ApiError as exc:
            return exc.reply(call.pretty)
        prepared = Prepared(call, name, handler, params, token)
        if not sb.gate.acquire(token.email):
            sb.stats.refused(token.email, "concurrency")
            return E.too_many_concurrent().reply(call.pretty)
        prepared.slot = True
        return prepared

    def finish(self, p: Prepared) -> None:
        if p.slot:
            p.slot = False
            self.sb.gate.release(p.email)

    async def execute(self, p: Prepared, *, latency: bool = True) -> Reply:
        sb = self.sb
        if latency and sb.latency_ms:
            await asyncio.sleep(sb.latency_ms / 1000)
        fault = sb.faults.pick(p.name, p.email)
        if fault is not None:
            sb.stats.fault(fault)
        if fault in THROTTLE_FAULTS:
            sb.stats.refused(p.email, f"fault:{fault}")
            return self._throttle_fault(fault).reply(p.call.pretty)
        refusal = sb.quota.charge(p.email, p.name)
        if refusal is not None:
            sb.stats.refused(p.email, f"quota:{refusal.kind}")
            return self._refusal(refusal).reply(p.call.pretty)
        sb.stats.charged(p.email, p.name, sb.quota.cost(p.name))
        if fault is not None:
            return await self._fault(fault, p)
        try:
            return await p.handler(p)
        except ApiError as exc:
            return exc.reply(p.call.pretty)
        except BadPageToken:
            return E.invalid_argument("Invalid pageToken").reply(p.call.pretty)
        except HistoryGone:
            return E.not_found().reply(p.call.pretty)

    async def handle(self, call: Call) -> Reply:
        prepared = self.prepare(call)
        if isinstance(prepared, Reply):
            return prepared
        try:
            return await self.execute(prepared)
        finally:
            self.finish(prepared)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _bearer(call: Call, fallback: str | None) -> str:
        auth = call.headers.get("authorization") or fallback
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise E.invalid_credentials()
        query = call.get("access_token") or call.get("oauth_token")
        if query:
            return query
        raise E.login_required()

    @staticmethod
    def _metadata_scope(name: str, call: Call) -> None:
        if call.get("q") is not None and name in ("messages.list", "threads.list"):
            raise E.insufficient_scope("Metadata scope does not support 'q' parameter")
        fmt = (call.get("format") or "full").lower()
        if name in ("messages.get", "threads.get") and fmt in ("full", "raw"):
            raise E.insufficient_scope(f"Metadata scope doesn't allow format {fmt.upper()}")
        if name == "messages.attachments.get":
            raise E.insufficient_scope("Request had insufficient authentication scopes.")

    def _refusal(self, r: Refusal) -> ApiError:
        if r.kind == "project":
            exc = E.project_rate_limited()
        elif r.kind == "403":
            exc = E.user_rate_limited(r.retry_at)
        else:
            exc = E.quota_exceeded_429(self.sb.project_number)
        if self.sb.quota.retry_after:
            exc.headers["Retry-After"] = str(max(1, int(r.wait + 0.999)))
        return exc

    def _throttle_fault(self, kind: str) -> ApiError:
        return {"rate_limit": lambda: E.quota_exceeded_429(self.sb.project_number),
                "user_rate_limit": lambda: E.user_rate_limited(),
                "project_rate_limit": E.project_rate_limited, "daily_limit": E.daily_limit,
                "concurrency": E.too_many_concurrent}[kind]()

    async def _fault(self, kind: str, p: Prepared) -> Reply:
        sb = self.sb
        if kind == "error_5xx":
            return E.backend_error(sb.faults.next_5xx()).reply(p.call.pretty)
        if kind == "unauthorized":
            return E.invalid_credentials().reply(p.call.pretty)
        if kind == "html_error":
            return Reply(502, E.HTML_502, content_type="text/html; charset=UTF-8")
        if kind == "malformed":
            return Reply(200, b'{\n  "id": "18c0ffee', content_type=E.JSON_TYPE)
        with contextlib.suppress(TimeoutError):  # "timeout": hang past the client's timeout
            await sb.wait_stopped(sb.faults.hang_seconds)
        return E.backend_error(503).reply(p.call.pretty)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _int(call: Call, name: str, default: int, hi: int = MAX_RESULTS) -> int:
        raw = call.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError as exc:
            raise E.invalid_argument(f"Invalid value at '{name}' ({raw!r})") from exc
        if not 1 <= value <= hi:
            raise E.invalid_argument(f"{name} must be between 1 and {hi}")
        return value

    @staticmethod
    def _bool(call: Call, name: str) -> bool:
        raw = (call.get(name) or "false").lower()
        if raw not in ("true", "false", "1", "0"):
            raise E.invalid_argument(f"Invalid value at '{name}' ({raw!r})")
        return raw in ("true", "1")

    @staticmethod
    def _format(call: Call, allowed: tuple[str, ...]) -> str:
        fmt = (call.get("format") or "full").lower()
        if fmt not in allowed:
            raise E.invalid_argument(f"Invalid value at 'format' ({fmt!r})")
        return fmt

    def _list_args(self, p: Prepared) -> dict[str, Any]:
        call = p.call
        labels = check_labels(call.all("labelIds"))
        after_ms = before_ms = None
        q = call.get("q")
        if q:
            after_ms, before_ms, more = parse_q(q)
            labels += [lb for lb in more if lb not in labels]
        return {"limit": self._int(call, "maxResults", 100),
                "page_token": call.get("pageToken") or None, "label_ids": labels,
                "include_spam_trash": self._bool(call, "includeSpamTrash"),
                "after_ms": after_ms, "before_ms": before_ms}

    def message_json(self, email: str, m: MessageSpec, fmt: str,
                     only_headers: list[str] | None = None) -> dict[str, Any]:
        """A Message resource (https://developers.google.com/workspace/gmail/api/reference/
        rest/v1/users.messages#Message) in the given format."""
        out: dict[str, Any] = {"id": m.id, "threadId": m.thread_id}
        if m.labels:
            out["labelIds"] = list(m.labels)
        out["snippet"] = snippet(m)
        made = self.sb.mailbox.rendered(email, m)
        if fmt == "full":
            tokens = self.sb.attachment_ids
            out["payload"] = fill(made.template, lambda part: tokens.mint(email, m.id, part))
        elif fmt == "metadata":
            out["payload"] = metadata(made.template, only_headers)
        out["sizeEstimate"] = len(made.raw)
        if fmt == "raw":
            out["raw"] = b64url(made.raw)
        out["historyId"] = str(m.history_id)
        out["internalDate"] = str(m.internal_ms)
        return out

    def _message(self, p: Prepared, mid: str) -> MessageSpec:
        if not _ID.match(mid):
            raise E.invalid_argument("Invalid id value")
        m = self.sb.mailbox.message(p.email, mid)
        if m is None:
            raise E.not_found()
        return m

    def _ok(self, p: Prepared, obj: Any) -> Reply:
        return Reply.json(obj, pretty=p.call.pretty)

    # ------------------------------------------------------------------ handlers
    async def get_profile(self, p: Prepared) -> Reply:
        mb = self.sb.mailbox
        messages, threads = mb.totals(p.email)
        return self._ok(p, {"emailAddress": p.email, "messagesTotal": messages,
                            "threadsTotal": threads,
                            "historyId": str(mb.user(p.email).history_id)})

    async def labels(self, p: Prepared) -> Reply:
        return self._ok(p, {"labels": self.sb.labels.listed(p.email)})

    # labels.get / create / patch / delete: nova.sandbox.gmail.labels. Writes need a scope
    # that may change labels (gmail.labels, gmail.modify or the full one).
    async def get_label(self, p: Prepared) -> Reply:
        return self._ok(p, self.sb.labels.get(p.email, p.params["id"]))

    def _label_body(self, p: Prepared) -> dict[str, Any]:
        if p.token.scope in (READONLY, METADATA):
            raise E.insufficient_scope("Request had insufficient authentication scopes.")
        body = _json_object(p)
        raw_color = body.get("color")
        color: dict[str, Any] = raw_color if isinstance(raw_color, dict) else {}
        return {"name": body.get("name"), "background_color": color.get("backgroundColor"),
                "text_color": color.get("textColor")}

    async def create_label(self, p: Prepared) -> Reply:
        body = self._label_body(p)
        return self._ok(p, self.sb.labels.create(p.email, str(body.pop("name") or ""), **body))

    async def patch_label(self, p: Prepared) -> Reply:
        body = self._label_body(p)
        name = body.pop("name")
        return self._ok(p, self.sb.labels.patch(p.email, p.params["id"],
                                                name=None if name is None else str(name),
                                                **body))

    async def delete_label(self, p: Prepared) -> Reply:
        self._label_body(p)
        self.sb.labels.delete(p.email, p.params["id"])
        return Reply(204, b"")

    async def list_messages(self, p: Prepared) -> Reply:
        items, nxt, estimate = self.sb.mailbox.list_messages(p.email, **self._list_args(p))
        out: dict[str, Any] = {}
        if items:
            out["messages"] = [{"id": m.id, "threadId": m.thread_id} for m in items]
        if nxt:
            out["nextPageToken"] = nxt
        out["resultSizeEstimate"] = estimate
        return self._ok(p, out)

    async def list_threads(self, p: Prepared) -> Reply:
        items, nxt, estimate = self.sb.mailbox.list_threads(p.email, **self._list_args(p))
        out: dict[str, Any] = {}
        if items:
            out["threads"] = [{"id": t.id, "snippet": snippet(_latest(t)),
                               "historyId": str(t.history_id)} for t in items]
        if nxt:
            out["nextPageToken"] = nxt
        out["resultSizeEstimate"] = estimate
        return self._ok(p, out)

    async def get_message(self, p: Prepared) -> Reply:
        fmt = self._format(p.call, FORMATS)
        m = self._message(p, p.params["id"])
        return self._ok(p, self.message_json(p.email, m, fmt, p.call.all("metadataHeaders")))

    async def get_thread(self, p: Prepared) -> Reply:
        fmt = self._format(p.call, ("full", "metadata", "minimal"))
        tid = p.params["id"]
        if not _ID.match(tid):
            raise E.invalid_argument("Invalid id value")
        thread = self.sb.mailbox.thread(p.email, tid)
        if thread is None or not thread.messages:
            raise E.not_found()
        heads = p.call.all("metadataHeaders")
        msgs = sorted(thread.messages, key=lambda m: (m.internal_ms, m.id))
        return self._ok(p, {"id": thread.id, "historyId": str(thread.history_id),
                            "messages": [self.message_json(p.email, m, fmt, heads)
                                         for m in msgs]})

    async def get_attachment(self, p: Prepared) -> Reply:
        m = self._message(p, p.params["messageId"])
        part_id = self.sb.attachment_ids.open(p.email, m.id, p.params["id"])
        data = leaf_bytes(self.sb.mailbox.raw(p.email, m), part_id)
        if data is None:
            raise E.invalid_argument("Invalid attachment token")
        return self._ok(p, {"attachmentId": p.params["id"], "size": len(data),
                            "data": b64url(data)})

    async def history(self, p: Prepared) -> Reply:
        call = p.call
        raw = call.get("startHistoryId")
        if not raw:
            raise E.invalid_argument("Missing required parameter: startHistoryId")
        if not raw.isdigit():
            raise E.invalid_argument(f"Invalid value at 'start_history_id' ({raw!r})")
        types = call.all("historyTypes")
        for t in types:
            if t not in HISTORY_TYPES:
                raise E.invalid_argument(f"Invalid value at 'history_types' ({t!r})")
        label = call.get("labelId")
        if label is not None:
            check_labels([label])
        recs, nxt, current = self.sb.mailbox.history(
            p.email, int(raw), types=types, label_id=label,
            limit=self._int(call, "maxResults", 100), page_token=call.get("pageToken") or None)
        out: dict[str, Any] = {}
        if recs:
            out["history"] = [r.to_json() for r in recs]
        if nxt:
            out["nextPageToken"] = nxt
        out["historyId"] = str(current)
        return self._ok(p, out)

    async def watch(self, p: Prepared) -> Reply:
        body = _json_object(p)
        topic = body.get("topicName")
        project = self.sb.pubsub_project
        m = re.match(r"^projects/([^/]+)/topics/[^/]+$", str(topic or ""))
        if not topic or m is None or m.group(1) != project:
            raise E.invalid_argument(
                f"Invalid topicName does not match projects/{project}/topics/*")
        labels = check_labels(body.get("labelIds") or [])
        behavior = str(body.get("labelFilterBehavior") or body.get("labelFilterAction")
                       or "include").lower()
        if behavior not in ("include", "exclude"):
            raise E.invalid_argument(f"Invalid value at 'label_filter_behavior' ({behavior!r})")
        expiration = self.sb.push.watch(p.email, str(topic), labels, behavior)
        return self._ok(p, {"historyId": str(self.sb.mailbox.user(p.email).history_id),
                            "expiration": str(expiration)})

    async def stop(self, p: Prepared) -> Reply:
        self.sb.push.stop(p.email)
        return Reply(204, b"", content_type="")


def _latest(t: ThreadSpec) -> MessageSpec:
    return max(t.messages, key=lambda m: (m.internal_ms, m.id))


_LABEL_TERMS = {"in:inbox": "INBOX", "in:sent": "SENT", "in:spam": "SPAM", "in:trash": "TRASH",
                "is:unread": "UNREAD", "is:starred": "STARRED", "is:important": "IMPORTANT",
                "in:starred": "STARRED", "in:important": "IMPORTANT"}


def parse_q(q: str) -> tuple[int | None, int | None, list[str]]:
    """(after ms, before ms, labels) of the search subset the sandbox understands."""
    after = before = None
    labels: list[str] = []
    for term in q.split():
        low = term.lower()
        if low.startswith(("after:", "before:")):
            key, _, value = low.partition(":")
            ms = _q_time(value)
            if key == "after":
                after = ms
            else:
                before = ms
        elif low in _LABEL_TERMS:
            labels.append(_LABEL_TERMS[low])
        elif low.startswith("label:"):
            want = term[6:].lower()
            found = [lid for lid, name in USER_LABELS
                     if want in (lid.lower(), name.lower(), name.lower().replace(" ", "-"),
                                 name.lower().replace("/", "-"))]
            if not found:
                raise E.invalid_argument(f"Invalid label: {term[6:]}")
            labels.append(found[0])
        else:
            raise E.invalid_argument(
                f"sandbox: unsupported search term {term!r} (the sandbox understands after:, "
                "before:, in:, is:, label:)")
    return after, before, labels


def _q_time(value: str) -> int:
    if value.isdigit():
        return int(value) * 1000
    m = re.match(r"^(\d{4})[/-](\d{1,2})[/-](\d{1,2})$", value)
    if m is None:
        raise E.invalid_argument(f"Invalid date in query: {value!r}")
    try:
        day = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=PACIFIC)
    except ValueError as exc:
        raise E.invalid_argument(f"Invalid date in query: {value!r}") from exc
    return int(day.timestamp() * 1000)


def _json_object(p: Prepared) -> dict[str, Any]:
    """A request's JSON body, which must be an object (an empty body is {}), as Google refuses
    anything else: 400 "Invalid JSON payload received."."""
    try:
        body = json.loads(p.call.body or b"{}")
    except ValueError as exc:
        raise E.invalid_argument("Invalid JSON payload received.") from exc
    if not isinstance(body, dict):
        raise E.invalid_argument("Invalid JSON payload received.")
    return body
