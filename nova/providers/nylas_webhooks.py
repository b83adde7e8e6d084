"""Verify and parse Nylas v3 webhook notifications.

* ``X-Nylas-Signature`` is the hex HMAC-SHA256 of the raw request body keyed with the
  webhook secret; verify before parsing (https://developer.nylas.com/docs/v3/notifications/
  webhooks/).
* Envelope ``{specversion, type, source, id, time, webhook_delivery_attempt, data:
  {application_id, object}}``; ``id`` is the deduplication key because delivery is
  at-least-once; ``<trigger>.truncated`` means ``body`` was dropped (>1 MB) and the message
  must be re-fetched (https://developer.nylas.com/docs/reference/notifications/).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .clean import loads
from .errors import Permanent


def verify_signature(body: bytes, signature: str | None, secret: str) -> bool:
    if not signature:
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.strip().lower())


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    id: str
    type: str  # as sent, e.g. "message.created.truncated"
    trigger: str  # without the ".truncated" / ".transformed" suffix
    truncated: bool
    source: str | None
    time: datetime | None
    grant_id: str | None
    object: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)


# Nylas appends these to a trigger name, alone or combined ("message.updated.truncated",
# "message.created.cleaned.transformed.truncated"); the base trigger decides the handling and
# the suffixes say what the payload lacks or holds instead: .truncated (no body: the object was
# over 1 MB), .transformed (only the fields chosen in the dashboard), .metadata (Google's
# gmail.metadata scope: headers, no body, snippet or attachments), .cleaned (the body is
# markdown) (https://developer.nylas.com/docs/reference/notifications/messages/).
TYPE_SUFFIXES = frozenset({"truncated", "transformed", "cleaned", "metadata"})


def split_type(type_: str) -> tuple[str, frozenset[str]]:
    """`message.created.cleaned.truncated` -> ("message.created", {"cleaned", "truncated"})."""
    parts = type_.split(".")
    suffixes = set()
    while len(parts) > 2 and parts[-1] in TYPE_SUFFIXES:
        suffixes.add(parts.pop())
    return ".".join(parts), frozenset(suffixes)


def parse_notification(body: bytes) -> WebhookEvent:
    """Parse a notification body; raise :class:`Permanent` if it is not a Nylas envelope."""
    try:
        raw = loads(body)
        type_ = str(raw["type"])
        data = raw["data"]
        obj = data["object"]
        nid = str(raw["id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Permanent(f"not a Nylas notification: {exc!r}") from exc
    trigger, suffixes = split_type(type_)
    when = raw.get("time")
    return WebhookEvent(
        id=nid, type=type_, trigger=trigger, truncated="truncated" in suffixes,
        source=raw.get("source"),
        time=datetime.fromtimestamp(when, UTC)
        if isinstance(when, int | float) and not isinstance(when, bool) else None,
        grant_id=obj.get("grant_id") or data.get("grant_id"), object=obj, raw=raw)
