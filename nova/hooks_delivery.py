"""One webhook delivery, as Standard Webhooks define it (https://www.standardwebhooks.com,
spec/standard-webhooks.md): the payload, the signature and the answer.

- Payload: JSON `{"type": kind, "timestamp": when the event happened, "data": {the event's
  fields}}`, minified, sent as the body it was signed over.
- Headers: `webhook-id` (the event's stable id, the same on every retry: the receiver's
  idempotency key), `webhook-timestamp` (the attempt's unix seconds), `webhook-signature`
  (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the key of a `whsec_<base64 key>`
  secret; while a rotation lasts, one signature per secret, space-separated).
- Answer: 2xx delivered; 410 Gone: the endpoint no longer wants them (it is disabled); anything
  else, a redirect included, a timeout or a connection error, fails, and its Retry-After
  (seconds or an HTTP date) is honoured.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec asks for 24 to 64 random bytes
USER_AGENT = "Nova-Webhooks/1"
RETRY_AFTER_MAX = 86_400.0  # a Retry-After further out than a day is taken as a day
ERROR_BODY_CHARS = 200  # of a failed answer's body, kept with the error

# The change feed's kinds (EVENTS_CONTRACT.md); `group.*` names a group of them.
KINDS = ("message.created", "message.updated", "message.deleted", "thread.created",
         "thread.updated", "thread.deleted", "folder.created", "folder.updated",
         "folder.deleted", "inbox.status_changed", "backfill.started", "backfill.completed",
         "backfill.failed")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Endpoint:
    """What a delivery needs of nova_hook_endpoints' row."""

    id: uuid.UUID
    url: str
    kinds: tuple[str, ...]
    secrets: tuple[str, ...]  # the current one first; the previous one during a rotation

    @classmethod
    def from_row(cls, row: Any) -> Endpoint:
        secrets = (row["secret"], *([row["previous_secret"]] if row["previous_secret"] else []))
        return cls(row["id"], row["url"], tuple(row["event_kinds"] or ()), secrets)


def consumer(endpoint_id: uuid.UUID) -> str:
    """The change-feed consumer of an endpoint: its cursors in nova_event_cursors."""
    return f"hook:{endpoint_id}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()
                                    ).decode()


def sign(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: a signature per secret, space-separated."""
    return " ".join(signature(s, msg_id, timestamp, body) for s in secrets_)


def headers(secrets_: Sequence[str], msg_id: str, body: bytes,
            timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"content-type": "application/json", "user-agent": USER_AGENT,
            "webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secrets_, msg_id, ts, body)}


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _iso(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and value.startswith(("{", "[")):
        try:  # jsonb read without a codec
            return json.loads(value)
        except ValueError:
            return value
    return value


# The event's fields in `data`; the rest of a nova_events row is Nova's own (its xid).
DATA_FIELDS = ("id", "inbox_id", "position", "kind", "object_id", "provider_id", "thread_id",
               "changes", "occurred_at")


def message_id(event: Mapping[str, Any]) -> str:
    """webhook-id: the event's id (nova_events.id), the same on every attempt and replay."""
    return str(event["id"])


def payload(event: Mapping[str, Any]) -> bytes:
    data = {name: _plain(event.get(name)) for name in DATA_FIELDS}
    body = {"type": event["kind"], "timestamp": _iso(event["occurred_at"]), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def parse_kinds(text: str | None) -> list[str]:
    """`--events kind,kind` (or `group.*`); empty or None: every kind. ValueError names an
    unknown one."""
    kinds = [k.strip() for k in (text or "").split(",") if k.strip()]
    groups = {k.split(".", 1)[0] for k in KINDS}
    for kind in kinds:
        if kind in KINDS or kind == "*":
            continue
        if kind.endswith(".*") and kind[:-2] in groups:
            continue
        raise ValueError(f"unknown event kind {kind!r} (kinds: {', '.join(KINDS)}; or a group "
                         f"such as message.*)")
    return [] if "*" in kinds else sorted(set(kinds))


def wanted(kinds: Iterable[str], kind: str) -> bool:
    """Whether an endpoint subscribed to `kinds` (empty: all) takes events of `kind`."""
    kinds = list(kinds)
    if not kinds:
        return True
    return any(k == kind or (k.endswith(".*") and kind.startswith(k[:-1])) for k in kinds)


def parse_schedule(text: str) -> list[float]:
    """NOVA_HOOKS_RETRY_SCHEDULE: delays between attempts, `5s,5m,30m,2h,...` (ms, s, m, h, d),
    in seconds."""
    delays = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", part)
        if match is None:
            raise ValueError(f"{part!r} is not a delay such as 5s, 30m, 2h or 1d")
        delays.append(float(match[1]) * _UNITS[match[2]])
    if not delays:
        raise ValueError("needs at least one delay")
    return delays


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After in seconds from now (delta-seconds or an HTTP date), at most a day."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


@dataclass(frozen=True)
class Answer:
    """What one attempt came to."""

    status: int | None  # None: no HTTP answer (connection refused, timeout, reset)
    error: str | None  # None: delivered
    retry_after: float | None = None
    elapsed: float = 0.0
    unreachable: bool = False  # the request never reached the endpoint (refused, no route)

    @property
    def delivered(self) -> bool:
        return self.error is None

    @property
    def gone(self) -> bool:
        return self.status == 410


async def post(client: httpx.AsyncClient, url: str, msg_id: str, body: bytes,
               secrets_: Sequence[str]) -> Answer:
    """POST one signed delivery. Never raises for what the endpoint or the network does."""
    started = time.monotonic()
    try:
        async with client.stream("POST", url, content=body,
                                 headers=headers(secrets_, msg_id, body)) as response:
            snippet = b""
            if not 200 <= response.status_code < 300:
                async for chunk in response.aiter_bytes():
                    snippet += chunk
                    if len(snippet) >= ERROR_BODY_CHARS:
                        break
    except httpx.TimeoutException as exc:
        return Answer(None, f"timeout ({type(exc).__name__})",
                      elapsed=time.monotonic() - started,
                      unreachable=isinstance(exc, httpx.ConnectTimeout))
    except httpx.HTTPError as exc:
        text = " ".join(str(exc).split())[:ERROR_BODY_CHARS]
        return Answer(None, f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
                      elapsed=time.monotonic() - started,
                      unreachable=isinstance(exc, httpx.ConnectError))
    elapsed = time.monotonic() - started
    status = response.status_code
    if 200 <= status < 300:
        return Answer(status, None, elapsed=elapsed)
    text = " ".join(snippet[:ERROR_BODY_CHARS].decode("utf-8", "replace").split())
    reason = response.reason_phrase or ""
    error = f"HTTP {status}{f' {reason}' if reason else ''}{f': {text}' if text else ''}"
    return Answer(status, error, retry_after(response.headers.get("retry-after")), elapsed)
