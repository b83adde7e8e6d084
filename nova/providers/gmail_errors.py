"""Gmail API error answers, classified
(https://developers.google.com/workspace/gmail/api/guides/handle-errors): 401 invalid
credentials (refresh the token), 403 ``userRateLimitExceeded`` / ``rateLimitExceeded`` /
``dailyLimitExceeded`` and 429 ``rateLimitExceeded`` or "Too many concurrent requests" (back
off), 403 ``insufficientPermissions`` (the grant lacks a scope: re-authorise), 404 not found,
5xx backend. Bodies may be anything: what cannot be read classifies by status."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import AuthExpired, NotFound, Permanent, ProviderError, RateLimited, Transient
from .nylas import parse_retry_after

RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
SCOPE_REASONS = frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                           "forbidden"})
# A quota refusal names no Retry-After: every worker of the user holds this long (the budget
# keeps the rate under the quota, so refusals are rare: clock skew, another client).
QUOTA_HOLD_SECONDS = 2.0
DAILY_HOLD_SECONDS = 300.0


def is_rate_refusal(status: int, body: bytes) -> bool:
    """A quota or concurrency refusal: 429, or 403 with a rate-limit reason."""
    if status == 429:
        return True
    return status == 403 and bool(_reasons(body) & RATE_REASONS)


def _reasons(body: bytes) -> set[str]:
    err = _error_json(body)
    reasons = {str(e.get("reason")) for e in err.get("errors") or () if isinstance(e, dict)}
    details = err.get("details")
    for d in details if isinstance(details, list) else ():
        if isinstance(d, dict) and d.get("reason"):
            reasons.add(str(d["reason"]))
    return reasons


def _error_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return {}
    err = data.get("error") if isinstance(data, dict) else None
    return err if isinstance(err, dict) else {}


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> ProviderError:
    """Classify a Gmail error answer (handle-errors guide); bodies may be anything."""
    err = _error_json(body)
    reasons = _reasons(body)
    message = str(err.get("message") or "") or \
        body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    kw: dict[str, Any] = {"status": status, "error_type": ",".join(sorted(reasons)) or None,
                          "provider": "gmail"}
    if is_rate_refusal(status, body):
        hold = parse_retry_after(headers.get("retry-after")) or QUOTA_HOLD_SECONDS
        return RateLimited(message, retry_after=hold, **kw)
    if status == 403 and "dailyLimitExceeded" in reasons:
        return RateLimited(message, retry_after=DAILY_HOLD_SECONDS, **kw)
    if status == 401 or (status == 403 and reasons & SCOPE_REASONS):
        return AuthExpired(message, **kw)
    if status == 404:
        return NotFound(message, **kw)
    if status == 408 or status >= 500:
        return Transient(message, **kw)
    return Permanent(message, **kw)
