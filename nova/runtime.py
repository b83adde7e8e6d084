"""The loop every queue processor shares.

A `Processor` says what one job does; `Worker` runs it against its PGMQ queue:

- Pickup: a read returns at once; when the queue is empty the worker waits for a NOTIFY from the
  queue's insert trigger (sql/040_queue_notify.sql), for the next delayed message to become
  visible, or for POLL_INTERVAL_MS, whichever comes first. There is no fixed sleep between reads.
- Concurrency: at most BATCH_SIZE jobs in flight per process; reads ask only for free slots.
- One transaction per job: the processor writes through `ctx.transaction()`, and the queue
  delete commits inside that same transaction. A crash before commit leaves the message to be
  redelivered after its visibility timeout; a crash after means the work is done.
- Retries: a failed job's message is made visible again after an exponential backoff with
  jitter (`RetryPolicy`); past the queue's max attempts (PGMQ's read_ct) it is archived, the
  dead-letter record, and the processor records the error on the row the job concerns.
- Heartbeat: while a job runs, its message's visibility is pushed forward every third of
  VISIBILITY_TIMEOUT, so a long job is never handed to a second worker.
- TESTING_MODE: jobs are processed but their messages are not deleted.
- Shutdown on SIGTERM/SIGINT: stop reading, let in-flight jobs finish within the grace period,
  cancel the rest and make their messages visible again at once; exit 0. A second signal
  cancels at once.
- Database outages: reads back off and retry; pools reconnect; an interrupted job is simply
  redelivered. Nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

import asyncpg

from nova import db
from nova.config import Settings

log = logging.getLogger("nova.runtime")

# Errors that mean "the database is not reachable right now", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    ConnectionError,
)


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


class JobContext:
    """What a running job may use: the pool, and its one transaction."""

    def __init__(self, worker: Worker, job: Job) -> None:
        self.worker = worker
        self.job = job
        self.pool: asyncpg.Pool = worker.pool
        self.committed = False
        self._opened = False

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """The job's transaction; the queue delete is committed with it. Once per job."""
        if self._opened:
            raise RuntimeError("a job has exactly one transaction")
        self._opened = True
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
            await self.worker.finish(conn, self.job)
        self.committed = True


class Processor:
    """One kind of job. Subclasses set `queue`, `component`, `max_attempts` and `process`."""

    queue: ClassVar[str]
    component: ClassVar[str]
    max_attempts: ClassVar[int] = 3

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


@dataclass
class WorkerStats:
    processed: int = 0
    retried: int = 0
    archived: int = 0
    released: int = 0
    durations_ms: list[float] = field(default_factory=list)


class Worker:
    def __init__(self, processor: Processor, settings: Settings, *,
                 database_url: str | None = None, pool: asyncpg.Pool | None = None,
                 shutdown_grace: float | None = None) -> None:
        self.processor = processor
        self.settings = settings
        self.database_url = database_url
        self.queue = processor.queue
        self.component = processor.component
        self.concurrency = settings.batch_size
        self.vt = settings.visibility_timeout
        self.idle_ceiling = settings.poll_interval_ms / 1000
        self.grace = settings.shutdown_grace_seconds if shutdown_grace is None else shutdown_grace
        self.policy = processor.retry_policy()
        self.stats = WorkerStats()
        self._pool = pool
        self._own_pool = pool is None
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._listener: asyncpg.Connection | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "worker not started"
        return self._pool

    def stop(self) -> None:
        """Stop reading; in-flight jobs get the grace period."""
        self._stopping.set()
        self._wakeup.set()

    async def run(self, *, burst: bool = False) -> WorkerStats:
        """Process jobs until stopped (or, with burst, until the queue has nothing visible)."""
        if self.database_url is None:
            self.database_url = db.database_url(self.settings)
        if self._pool is None:
            pool = await self._connect(self.database_url)
            if pool is None:  # stopped before the database ever answered
                return self.stats
            self._pool = pool
        await self.processor.setup(self)
        log.info("[%s] started queue=%s concurrency=%d vt=%ds", self.component, self.queue,
                 self.concurrency, self.vt)
        try:
            await self._loop(burst)
        finally:
            await self._drain()
            await self._close_listener()
            await self.processor.teardown()
            if self._own_pool:
                await self.pool.close()
            log.info("[%s] stopped processed=%d retried=%d archived=%d released=%d",
                     self.component, self.stats.processed, self.stats.retried,
                     self.stats.archived, self.stats.released)
        return self.stats

    async def _connect(self, url: str) -> asyncpg.Pool | None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                return await db.create_pool(url, min_size=1, max_size=self.concurrency + 2)
            except CONNECTION_ERRORS as exc:
                log.warning("[%s] database unreachable (%s); retrying in %.1fs",
                            self.component, exc, delay)
                await self._sleep(delay)
                delay = min(delay * 2, 10)
        return None

    # --- reading ---------------------------------------------------------------------------

    async def _loop(self, burst: bool) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:  # every slot busy: wait for a job to finish (its callback wakes us)
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._ensure_listener()
                jobs = await self._read(free)
                backoff = 0.5
            except CONNECTION_ERRORS as exc:
                log.warning("[%s] read failed, database unreachable (%s); retrying in %.1fs",
                            self.component, exc, backoff)
                await self._close_listener()
                await self._sleep(backoff)
                backoff = min(backoff * 2, 10)
                continue
            for job in jobs:
                self._start(job)
            if jobs:
                continue
            if burst:
                if not self._inflight:
                    return
                await asyncio.wait(list(self._inflight.values()),
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._idle_wait()

    async def _read(self, qty: int) -> list[Job]:
        self._wakeup.clear()  # a notify from now on means "look again"
        rows = await self.pool.fetch(
            "SELECT msg_id, read_ct, enqueued_at, message FROM pgmq.read($1, $2, $3)",
            self.queue, self.vt, qty)
        return [Job(self.queue, r["msg_id"], r["read_ct"], r["enqueued_at"], r["message"] or {})
                for r in rows]

    async def _idle_wait(self) -> None:
        timeout = self.idle_ceiling
        try:
            # A delayed message (a retry) becomes visible without any insert: wake for it.
            next_vt = await self.pool.fetchval(
                f"SELECT extract(epoch FROM min(vt) - clock_timestamp()) FROM pgmq.q_{self.queue}")
            if next_vt is not None:
                timeout = max(0.0, min(timeout, float(next_vt) + 0.01))
        except CONNECTION_ERRORS:
            pass
        if self._listener is None:
            timeout = min(timeout, 0.5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        assert self.database_url is not None
        conn = await asyncpg.connect(self.database_url)
        await conn.add_listener(f"nova_q_{self.queue}", self._on_notify)
        conn.add_termination_listener(lambda _c: self._on_listener_lost())
        self._listener = conn

    def _on_notify(self, *_args: object) -> None:
        self._wakeup.set()

    def _on_listener_lost(self) -> None:
        self._listener = None
        self._wakeup.set()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- running a job ---------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        task = asyncio.create_task(self._run_job(job), name=f"{self.queue}:{job.msg_id}")
        self._inflight[job.msg_id] = task
        task.add_done_callback(lambda _t: self._done(job.msg_id))

    def _done(self, msg_id: int) -> None:
        self._inflight.pop(msg_id, None)
        self._wakeup.set()

    async def finish(self, conn: asyncpg.Connection, job: Job) -> None:
        """Inside the job's transaction: remove its message (unless TESTING_MODE)."""
        if not self.settings.testing_mode:
            await conn.execute("SELECT pgmq.delete($1, $2::bigint)", self.queue, job.msg_id)

    async def _run_job(self, job: Job) -> None:
        started = time.perf_counter()
        heartbeat = asyncio.create_task(self._heartbeat(job))
        ctx = JobContext(self, job)
        try:
            note = await self.processor.process(job, ctx)
            if not ctx.committed:
                async with ctx.transaction():
                    pass
        except asyncio.CancelledError:
            heartbeat.cancel()
            await self._release(job)
            raise
        except Exception as exc:  # every failure becomes a retry or a dead letter
            heartbeat.cancel()
            await self._fail(job, exc, started)
            return
        finally:
            heartbeat.cancel()
        elapsed = (time.perf_counter() - started) * 1000
        self.stats.processed += 1
        self.stats.durations_ms.append(elapsed)
        log.info("[%s] job %d done in %.0fms attempt=%d%s", self.component, job.msg_id,
                 elapsed, job.read_ct, f" {note}" if note else "")

    async def _heartbeat(self, job: Job) -> None:
        interval = max(self.vt / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.pool.execute("SELECT 1 FROM pgmq.set_vt($1, $2::bigint, $3::integer)",
                                        self.queue, job.msg_id, self.vt)
            except CONNECTION_ERRORS as exc:
                log.warning("[%s] heartbeat of job %d failed: %s", self.component, job.msg_id,
                            exc)

    async def _fail(self, job: Job, error: BaseException, started: float) -> None:
        decision = self.policy.decide(job.read_ct, error)
        elapsed = (time.perf_counter() - started) * 1000
        reason = f"{type(error).__name__}: {error}"
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self.processor.record_failure(conn, job, error, final=not decision.retry)
                if decision.retry:
                    await conn.execute(
                        "SELECT 1 FROM pgmq.set_vt($1, $2::bigint,"
                        " clock_timestamp() + make_interval(secs => $3::float8))",
                        self.queue, job.msg_id, max(0.0, decision.delay))
                else:
                    await conn.execute("SELECT pgmq.archive($1, $2::bigint)", self.queue,
                                       job.msg_id)
        except Exception as exc:
            # The message stays invisible until its timeout, then comes back: nothing lost.
            log.warning("[%s] job %d failed (%s) and its outcome could not be recorded: %s",
                        self.component, job.msg_id, reason, exc)
            return
        if decision.retry:
            self.stats.retried += 1
            log.warning("[%s] job %d failed in %.0fms attempt=%d/%d, retry in %.0fs: %s",
                        self.component, job.msg_id, elapsed, job.read_ct,
                        self.policy.max_attempts, decision.delay, reason)
        else:
            self.stats.archived += 1
            log.error("[%s] job %d failed in %.0fms attempt=%d/%d, archived: %s",
                      self.component, job.msg_id, elapsed, job.read_ct,
                      self.policy.max_attempts, reason)

    async def _release(self, job: Job) -> None:
        """Make a cancelled job's message visible again now, for another worker."""
        try:
            await asyncio.shield(self.pool.execute(
                "SELECT 1 FROM pgmq.set_vt($1, $2::bigint, 0)", self.queue, job.msg_id))
            self.stats.released += 1
            log.info("[%s] job %d released", self.component, job.msg_id)
        except Exception as exc:  # its visibility timeout will release it anyway
            log.warning("[%s] could not release job %d: %s", self.component, job.msg_id, exc)

    async def _drain(self) -> None:
        if not self._inflight:
            return
        tasks = list(self._inflight.values())
        log.info("[%s] waiting up to %.0fs for %d job(s)", self.component, self.grace,
                 len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class Runnable(Protocol):
    """A part of a process: runs until stopped."""

    async def run(self) -> Any: ...

    def stop(self) -> None: ...


def install_signal_handlers(parts: Sequence[Runnable]) -> None:
    """First SIGTERM/SIGINT: graceful stop of every part. Second: cancel everything now."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def first(sig: signal.Signals) -> None:
        log.info("[Runtime] %s received: stopping (again to force)", sig.name)
        for part in parts:
            part.stop()
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, second, s)

    def second(sig: signal.Signals) -> None:
        log.warning("[Runtime] %s received again: cancelling in-flight work", sig.name)
        for part in parts:
            if isinstance(part, Worker):
                part.grace = 0
        if main_task is not None:
            main_task.cancel()

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, first, s)


async def run_parts(parts: Sequence[Runnable]) -> None:
    """Run the parts of a process side by side until a signal stops them. When one part ends
    on its own (it failed), the others are stopped too, so the process never limps on."""
    install_signal_handlers(parts)
    tasks = [asyncio.create_task(p.run(), name=type(p).__name__) for p in parts]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for part in parts:
            part.stop()
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:  # a second signal
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
