"""Runtime knobs of the sandbox: injected faults, per-grant rate limiting and request stats."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from .._faults import FaultQueue

FAULT_KINDS = ("error_5xx", "timeout", "malformed", "html_error", "rate_limit",
               "nylas_rate_limit", "provider_rate_limit", "unauthorized", "grant_not_found")
"""``error_5xx``: 500/503/504 with a Nylas error body; ``timeout``: hang past the client's
timeout; ``malformed``: 200 with an invalid JSON body; ``html_error``: 502 with an HTML body
(a proxy in front of the API); ``rate_limit``: a forced 429 *from the provider, with*
``Retry-After`` (``rate_limit_error`` + ``provider_error``; the header carries the sandbox's
``retry_after`` knob) -- the one 429 that tells the client how long to wait;
``nylas_rate_limit``: Nylas's own 429 (``nylas_rate_limit_exceeded``, no Retry-After);
``provider_rate_limit``: a provider 429 without Retry-After.  The two kinds of 429:
https://developer.nylas.com/docs/developer-tools/api/rate-limits/.  ``unauthorized``: a 401
``api.authentication_error`` for a grant that is in fact valid (Nylas documents that one type
for a bad key, a grant of another region and an expired grant alike:
https://developer.nylas.com/docs/api/errors/).  ``grant_not_found``: a 404 ``grant.not_found``
for a grant that exists (a lagging replica just after the grant was made, a misrouted
request): one answer is not the provider's word that the grant is gone."""

RATE_LIMIT_KINDS = ("nylas", "provider")


class Faults(FaultQueue):
    """Forced faults (next N matching requests, by endpoint and grant) plus random faults at
    configured rates; 5xx faults answer 500, 503 and 504 in turn."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(FAULT_KINDS, f"{seed}:faults", 30.0, (500, 503, 504))


@dataclass(frozen=True)
class Throttle:
    """A refused request: which layer refused it and the Retry-After to send (None: none)."""

    kind: str  # "nylas" | "provider"
    retry_after: int | None


class RateLimiter:
    """Token bucket per grant: ``rate`` requests per second, bursts up to ``rate``.

    ``kind`` says which layer the limit models
    (https://developer.nylas.com/docs/developer-tools/api/rate-limits/):

    * ``"nylas"`` -- Nylas's own per-grant limit (the docs: 200 requests/s per grant on the
      Messages endpoints): the 429 is ``nylas_rate_limit_exceeded`` and carries no
      Retry-After, so the client must pick its own back-off.
    * ``"provider"`` -- the mailbox provider's limit relayed by Nylas: ``rate_limit_error`` with
      ``provider_error``; only ``retry_after_share`` of these 429s carry Retry-After ("when the
      provider sends one"), chosen by a seeded RNG so runs repeat.
    """

    def __init__(self, rate: float | None, *, kind: str = "nylas",
                 retry_after_share: float = 0.5, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self.rate = rate
        self.kind = _check_kind(kind)
        self.retry_after_share = _share(retry_after_share)
        self._rng = random.Random(f"{seed}:rate-limit")
        self._buckets: dict[str, tuple[float, float]] = {}

    def set_rate(self, rate: float | None) -> None:
        with self._lock:
            self.rate = rate
            self._buckets.clear()

    def configure(self, *, kind: str | None = None,
                  retry_after_share: float | None = None) -> None:
        with self._lock:
            if kind is not None:
                self.kind = _check_kind(kind)
            if retry_after_share is not None:
                self.retry_after_share = _share(retry_after_share)

    def verdict(self, key: str) -> Throttle | None:
        """Consume a token; None when allowed, else how the refusal looks."""
        wait = self.check(key)
        if wait is None:
            return None
        with self._lock:
            if self.kind == "nylas":
                return Throttle("nylas", None)
            with_header = self._rng.random() < self.retry_after_share
            return Throttle("provider", wait if with_header else None)

    def check(self, key: str) -> int | None:
        """Consume a token; return None when allowed, else Retry-After seconds (>= 1)."""
        with self._lock:
            rate = self.rate
            if not rate:
                return None
            now = time.monotonic()
            tokens, last = self._buckets.get(key, (rate, now))
            tokens = min(rate, tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return None
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / rate))


def _check_kind(kind: str) -> str:
    if kind not in RATE_LIMIT_KINDS:
        raise ValueError(f"rate_limit_kind must be one of {RATE_LIMIT_KINDS}, not {kind!r}")
    return kind


def _share(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"a share must be between 0 and 1, not {value}")
    return value


class Stats:
    """Request counters: per endpoint, per status, per grant, per thread-listing page token."""

    FIRST_PAGE = "<first>"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.requests: Counter[str] = Counter()
            self.statuses: Counter[str] = Counter()
            self.by_grant: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.thread_pages: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.faults: Counter[str] = Counter()

    def hit(self, endpoint: str, grant_id: str | None, page_token: str | None = None) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            if grant_id:
                self.by_grant[grant_id][endpoint] += 1
            if endpoint == "list_threads" and grant_id:
                self.thread_pages[grant_id][page_token or self.FIRST_PAGE] += 1

    def status(self, code: int) -> None:
        with self._lock:
            self.statuses[str(code)] += 1

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "statuses": dict(self.statuses),
                "by_grant": {g: dict(c) for g, c in self.by_grant.items()},
                "thread_pages": {g: dict(c) for g, c in self.thread_pages.items()},
                "faults": dict(self.faults),
            }
