"""Runtime knobs of the Gmail sandbox: quota, the per-user concurrency limit, faults, stats.

Quota (https://developers.google.com/workspace/gmail/api/reference/quota): "Per user rate
limit: 15,000 quota units per user per minute" with reason ``userRateLimitExceeded`` (the page
has also said 250 units per user per second, "moving average (allows short bursts)", and,
reportedly for projects created from May 2026, 6,000 per user per minute: set
``quota_per_minute``).  Method costs default to the page's table (:data:`DEFAULT_COSTS`; a
third-party guide reports messages.get 20 and threads.get 40 under the 2026 model: set
``method_costs``).  The window slides: a call is refused when the units charged in the last
``window`` seconds plus its own cost exceed the limit.  A refused call is not charged
(https://developers.google.com/workspace/gmail/api/guides/handle-errors: back off and retry).
Which error a refusal gets is vague in the docs -- the quota page names
``userRateLimitExceeded`` (403 in the error guide), the error guide also lists 429
``rateLimitExceeded``, and Google's quota system answers 429 "Quota exceeded for quota metric
'Queries' and limit 'Queries per minute per user'" -- so by default (``quota_error="mixed"``)
the sandbox answers either, chosen by a seeded RNG; ``"429"`` or ``"403"`` pins one.  No
``Retry-After`` unless ``quota_retry_after`` is set (Google's quota errors carry none; the
403 says "Retry after <time>" in its message).

Concurrency: "The Gmail API enforces a per-user concurrent request limit (in addition to the
per-user rate limit). This limit is shared by all Gmail API clients accessing a given user"
(handle-errors, "429 Too many requests").  Google publishes no number; the sandbox refuses a
user's request with 429 "Too many concurrent requests for user." when ``max_concurrent``
requests are already in flight, and counts the inner calls of a batch as concurrent with each
other (Google runs them in parallel; the batch guide warns that "larger batch sizes are likely
to trigger rate limiting" and advises against more than 50).  GUESS: 50 by default.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._faults import FaultQueue

DEFAULT_COSTS: dict[str, int] = {
    "getProfile": 1, "watch": 100, "stop": 50, "labels.list": 1, "labels.get": 1,
    "history.list": 2, "messages.list": 5, "messages.get": 5, "messages.attachments.get": 5,
    "threads.list": 10, "threads.get": 10,
}
"""Quota units per method, from https://developers.google.com/workspace/gmail/api/reference/
quota ("Per-method quota usage")."""

QUOTA_ERRORS = ("mixed", "429", "403")
FAULT_KINDS = ("error_5xx", "timeout", "malformed", "html_error", "rate_limit",
               "user_rate_limit", "project_rate_limit", "daily_limit", "concurrency",
               "unauthorized")
"""``error_5xx``: 500 / 503 ``backendError`` in turn; ``timeout``: hang past the client's
timeout (``hang_seconds``; httplib2's default in google-api-python-client is 60 s);
``malformed``: 200 with a truncated JSON body; ``html_error``: 502 with Google's HTML error
page; ``rate_limit``: 429 ``rateLimitExceeded``; ``user_rate_limit``: 403
``userRateLimitExceeded``; ``project_rate_limit``: 403 ``rateLimitExceeded``;
``daily_limit``: 403 ``dailyLimitExceeded``; ``concurrency``: 429 "Too many concurrent
requests for user."; ``unauthorized``: 401 ``authError`` for a token that is in fact valid.
The throttling kinds are refusals and cost no quota; the others are charged."""
THROTTLE_FAULTS = frozenset({"rate_limit", "user_rate_limit", "project_rate_limit",
                             "daily_limit", "concurrency"})


@dataclass(frozen=True)
class Refusal:
    kind: str  # "429" | "403" | "project"
    wait: float  # seconds until the call would fit

    @property
    def retry_at(self) -> str:
        when = datetime.fromtimestamp(time.time() + self.wait, UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class Quota:
    """Sliding-window per-user (and optional per-project) quota units."""

    def __init__(self, per_minute: int | None = 15_000, *, window: float = 60.0,
                 costs: Mapping[str, int] | None = None, error: str = "mixed",
                 retry_after: bool = False, project_per_minute: int | None = None,
                 seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}:quota")
        self.per_minute = per_minute
        self.project_per_minute = project_per_minute
        self.window = float(window)
        self.costs = {**DEFAULT_COSTS, **(costs or {})}
        self.error = _check(error, QUOTA_ERRORS, "quota_error")
        self.retry_after = retry_after
        self._log: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._project: deque[tuple[float, int]] = deque()

    def configure(self, *, per_minute: int | None | str = "keep",
                  window: float | None = None, costs: Mapping[str, int] | None = None,
                  error: str | None = None, retry_after: bool | None = None,
                  project_per_minute: int | None | str = "keep") -> None:
        with self._lock:
            if per_minute != "keep":
                self.per_minute = None if per_minute is None else int(per_minute)
            if project_per_minute != "keep":
                self.project_per_minute = (None if project_per_minute is None
                                           else int(project_per_minute))
            if window is not None:
                self.window = float(window)
            if costs is not None:
                self.costs.update({str(k): int(v) for k, v in costs.items()})
            if error is not None:
                self.error = _check(error, QUOTA_ERRORS, "quota_error")
            if retry_after is not None:
                self.retry_after = bool(retry_after)

    def reset(self) -> None:
        with self._lock:
            self._log.clear()
            self._project.clear()

    def cost(self, method: str) -> int:
        return self.costs.get(method, 5)

    @staticmethod
    def _purge(log: deque[tuple[float, int]], since: float) -> int:
        while log and log[0][0] <= since:
            log.popleft()
        return sum(u for _, u in log)

    @staticmethod
    def _wait(log: deque[tuple[float, int]], used: int, units: int, limit: int,
              now: float, window: float) -> float:
        need = used + units - limit
        for t, u in log:
            need -= u
            if need <= 0:
                return max(0.001, t + window - now)
        return window

    def charge(self, user: str, method: str) -> Refusal | None:
        """Charge the call's units, or return the refusal (nothing charged)."""
        units = self.cost(method)
        with self._lock:
            now = time.monotonic()
            since = now - self.window
            log = self._log[user]
            used = self._purge(log, since)
            if self.per_minute is not None and used + units > self.per_minute:
                kind = self.error if self.error != "mixed" else self._rng.choice(["429", "403"])
                return Refusal(kind, self._wait(log, used, units, self.per_minute, now,
                                                self.window))
            if self.project_per_minute is not None:
                pused = self._purge(self._project, since)
                if pused + units > self.project_per_minute:
                    return Refusal("project", self._wait(self._project, pused, units,
                                                         self.project_per_minute, now,
                                                         self.window))
                self._project.append((now, units))
            log.append((now, units))
            return None

    def used(self, user: str) -> int:
        with self._lock:
            return self._purge(self._log[user], time.monotonic() - self.window)


class Gate:
    """Per-user in-flight request counter (the concurrency limit)."""

    def __init__(self, limit: int | None) -> None:
        self._lock = threading.Lock()
        self.limit = limit
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def acquire(self, user: str) -> bool:
        with self._lock:
            if self.limit is not None and self.in_flight[user] >= self.limit:
                return False
            self.in_flight[user] += 1
            self.peak[user] = max(self.peak[user], self.in_flight[user])
            return True

    def release(self, user: str) -> None:
        with self._lock:
            self.in_flight[user] -= 1


class Faults(FaultQueue):
    """Forced faults (next N matching calls, by endpoint and user) plus random faults at
    configured rates; 5xx faults answer 500 and 503 in turn."""

    def __init__(self, seed: int = 0, hang_seconds: float = 90.0) -> None:
        super().__init__(FAULT_KINDS, f"{seed}:gmail-faults", hang_seconds, (500, 503))


class Stats:
    """Requests per endpoint, statuses, units charged per user and method, refusals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self.requests: Counter[str] = Counter()
            self.statuses: Counter[str] = Counter()
            self.units: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.refusals: defaultdict[str, Counter[str]] = defaultdict(Counter)
            self.faults: Counter[str] = Counter()
            self.batches = 0
            self.batch_calls = 0

    def hit(self, endpoint: str) -> None:
        with self._lock:
            self.requests[endpoint] += 1

    def status(self, code: int) -> None:
        with self._lock:
            self.statuses[str(code)] += 1

    def charged(self, user: str, method: str, units: int) -> None:
        with self._lock:
            self.units[user][method] += units

    def refused(self, user: str, kind: str) -> None:
        with self._lock:
            self.refusals[user][kind] += 1

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def batch(self, calls: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_calls += calls

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests), "statuses": dict(self.statuses),
                "units": {u: dict(c) for u, c in self.units.items()},
                "units_total": {u: sum(c.values()) for u, c in self.units.items()},
                "refusals": {u: dict(c) for u, c in self.refusals.items()},
                "faults": dict(self.faults), "batches": self.batches,
                "batch_calls": self.batch_calls,
            }


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, not {value!r}")
    return value
