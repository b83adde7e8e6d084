"""What a queue processor is made of: the job it is handed, the decisions it can raise
(retry later, give up, defer, fatal), the retry policy, the `Processor` base class and the
counters of a worker. `nova.runtime.Worker` runs processors against their queues."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import asyncpg

if TYPE_CHECKING:
    from nova.runtime import JobContext, Worker


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass(frozen=True)
class Job:
    queue: str
    msg_id: int
    read_ct: int  # deliveries so far, this one included: the attempt number
    enqueued_at: datetime
    message: dict[str, Any]


class RetryLater(Exception):  # noqa: N818 - it is a decision, not a failure
    """Raised by a processor to ask for another attempt after `delay` seconds."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class GiveUp(Exception):  # noqa: N818
    """Raised by a processor when retrying cannot help (bad payload, permanent error)."""


class Fatal(Exception):
    """Raised by a processor when no job can succeed until an operator acts (the provider
    rejects the application's API key, say). The job is released without costing an attempt,
    the worker stops reading and drains, and the process exits with status 2."""


class Defer(Exception):  # noqa: N818 - it is a decision, not a failure
    """Raised by a processor when the job cannot run here yet for a reason that is not the
    job's fault (its inbox's provider is not configured in this process, or its grant has no
    budget left for now): the message comes back after `delay` seconds without costing an
    attempt, and nothing is recorded. With `grant`, the worker also leaves that grant's other
    jobs for that long (the read skips them)."""

    def __init__(self, message: str, delay: float, *, grant: str | None = None) -> None:
        super().__init__(message)
        self.delay = delay
        self.grant = grant


class LeaseLost(Exception):  # noqa: N818
    """The job's message is no longer held at the read_ct it was read with: another worker
    has it (or it is gone). Whatever the job wrote in this transaction is rolled back."""


class Crashed(Exception):  # noqa: N818
    """The error recorded for a job that never finished: its process died every time."""


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay: float = 0.0


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, capped; a fixed number of attempts."""

    max_attempts: int
    base_delay: float = 2.0
    max_delay: float = 300.0

    def decide(self, attempt: int, error: BaseException) -> RetryDecision:
        if isinstance(error, GiveUp) or attempt >= self.max_attempts:
            return RetryDecision(retry=False)
        if isinstance(error, RetryLater) and error.delay is not None:
            return RetryDecision(retry=True, delay=min(error.delay, self.max_delay))
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return RetryDecision(retry=True, delay=random.uniform(ceiling / 2, ceiling))


class Processor:
    """One kind of job. Subclasses set `queue`, `component`, `max_attempts` and `process`."""

    queue: ClassVar[str]
    component: ClassVar[str]
    max_attempts: ClassVar[int] = 3
    # Reads past max_attempts that a job may spend without an outcome (its process died, it lost
    # its lease) before its message is archived unrun: a job that kills its process (OOM, a
    # crash in C) never reaches an `except`, and would otherwise come back forever.
    crash_margin: ClassVar[int] = 2

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts)

    async def setup(self, worker: Worker) -> None:
        """Called once the pool is up (create clients here)."""

    async def teardown(self) -> None:
        """Called on shutdown."""

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        """Do the job; write through `ctx.transaction()`. Returns a note for the log line."""
        raise NotImplementedError

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        """Note the error on the row the job concerns (same transaction as the retry/archive)."""


RECENT_DURATIONS = 1000


@dataclass
class WorkerStats:
    """Counters of one worker. Nothing here grows with the number of jobs run."""

    processed: int = 0
    retried: int = 0
    archived: int = 0  # dead letters, crashed jobs included
    crashed: int = 0  # archived unrun: their process died every time
    released: int = 0  # given back at shutdown or on Fatal, without costing an attempt
    lost: int = 0  # leases lost: abandoned or refused at commit, nothing committed
    # The most recent job durations (for percentiles); the totals cover every job.
    durations_ms: deque[float] = field(
        default_factory=lambda: deque(maxlen=RECENT_DURATIONS))
    total_ms: float = 0.0
    max_ms: float = 0.0

    def record(self, elapsed_ms: float) -> None:
        self.processed += 1
        self.durations_ms.append(elapsed_ms)
        self.total_ms += elapsed_ms
        self.max_ms = max(self.max_ms, elapsed_ms)

    @property
    def mean_ms(self) -> float:
        return self.total_ms / self.processed if self.processed else 0.0

    def percentile_ms(self, pct: float) -> float:
        """The pct-th percentile of the most recent jobs' durations."""
        recent = sorted(self.durations_ms)
        if not recent:
            return 0.0
        return recent[min(len(recent) - 1, int(len(recent) * pct / 100))]
