"""Injected faults, shared by both sandboxes: forced ones (the next N matching calls, by
endpoint and by grant or user) and random ones at configured rates, from a seeded RNG."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class _Injection:
    kind: str
    count: int
    endpoint: str | None
    scope: str | None  # a grant (Nylas) or a user (Gmail); None: any


class FaultQueue:
    """``kinds`` are the sandbox's fault names; ``status_cycle`` the 5xx statuses answered in
    turn for its ``error_5xx`` fault; ``hang_seconds`` how long a ``timeout`` fault hangs."""

    def __init__(self, kinds: Sequence[str], rng_key: str, hang_seconds: float,
                 status_cycle: Sequence[int]) -> None:
        self.kinds = tuple(kinds)
        self._lock = threading.Lock()
        self._rng = random.Random(rng_key)
        self.rates: dict[str, float] = {}
        self._queue: list[_Injection] = []
        self.hang_seconds = hang_seconds
        self.status_cycle = tuple(status_cycle)
        self._n5xx = 0

    def set_rates(self, **rates: float) -> None:
        unknown = set(rates) - set(self.kinds)
        if unknown:
            raise ValueError(f"unknown fault kinds: {sorted(unknown)}")
        with self._lock:
            self.rates.update({k: float(v) for k, v in rates.items()})

    def inject(self, kind: str, count: int = 1, *, endpoint: str | None = None,
               scope: str | None = None) -> None:
        if kind not in self.kinds:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._queue.append(_Injection(kind, count, endpoint, scope))

    def clear(self) -> None:
        with self._lock:
            self.rates.clear()
            self._queue.clear()

    def pick(self, endpoint: str, scope: str | None) -> str | None:
        with self._lock:
            for inj in self._queue:
                if inj.endpoint in (None, endpoint) and inj.scope in (None, scope):
                    inj.count -= 1
                    if inj.count <= 0:
                        self._queue.remove(inj)
                    return inj.kind
            for kind, rate in self.rates.items():
                if rate > 0 and self._rng.random() < rate:
                    return kind
            return None

    def next_5xx(self) -> int:
        with self._lock:
            self._n5xx += 1
            return self.status_cycle[(self._n5xx - 1) % len(self.status_cycle)]
