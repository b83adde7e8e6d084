"""The loop every queue processor shares.

A `Processor` says what one job does; `Worker` runs it against its PGMQ queue:

- Pickup: a read returns at once; when the queue is empty the worker waits for a NOTIFY from the
  queue's insert trigger (sql/040_queue_notify.sql), for the next message to become visible (a
  delayed retry, or the lease of a dead worker running out), or for POLL_INTERVAL_MS, whichever
  comes first. There is no fixed sleep between reads. The LISTEN runs where a session can be
  trusted (db.listen_url): behind a connection pooler without NOVA_DATABASE_DIRECT_URL there is
  none, and POLL_INTERVAL_MS bounds the wait.
- Concurrency: at most BATCH_SIZE jobs in flight per process; reads ask only for free slots.
- Leases: a read message is held by a short lease, (msg_id, read_ct): PGMQ hands the same
  msg_id out again with read_ct + 1, so the worker that read it at read_ct N holds it only while
  the row's read_ct is still N. One heartbeat per worker renews the leases of its running jobs
  every third of VISIBILITY_TIMEOUT (`WHERE msg_id = .. AND read_ct = ..`). A job whose lease is
  gone, or whose heartbeat kept failing past the lease's end, is abandoned: cancelled, nothing
  committed, logged. A dead worker's jobs come back within VISIBILITY_TIMEOUT.
- One transaction per job: the processor writes through `ctx.transaction()`, and the queue
  delete commits inside that same transaction, only while the lease is still held; otherwise
  the transaction rolls back (`LeaseLost`: logged as "lease lost", not an attempt).
- Retries: a failed job's message is made visible again after an exponential backoff with
  jitter (`RetryPolicy`); past the queue's max attempts (PGMQ's read_ct) it is archived, the
  dead-letter record, and the processor records the error on the row the job concerns.
- Jobs that kill their process (OOM, a C crash) never reach an `except`: a message read more
  than max attempts + `Processor.crash_margin` times is archived at once, its row marked failed.
- TESTING_MODE: jobs are processed but their messages are not deleted (a finished run costs
  no attempt).
- Shutdown on SIGTERM/SIGINT: stop reading, let in-flight jobs finish within the grace period,
  cancel the rest and make their messages visible again at once without costing an attempt
  (read_ct - 1); exit 0. A second signal cancels at once.
- `Fatal` from a processor (the provider refuses the application's credentials: every job would
  fail the same way): the job is released without costing an attempt, the worker stops
  reading, drains, and the process exits with status 2 after one clear log line.
- Database errors (unreachable, too many connections, a statement failing in a race) in the
  read loop, the idle wait, the heartbeat, failure recording or a release: one log line, a
  bounded exponential backoff, and on. A job cut off by them is simply redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg

from nova import db, metrics
from nova.config import Settings
from nova.jobs import (  # noqa: F401 - the processors import them from here too
    RECENT_DURATIONS,
    Crashed,
    Defer,
    Fatal,
    GiveUp,
    Job,
    LeaseLost,
    Processor,
    RetryDecision,
    RetryLater,
    RetryPolicy,
    WorkerStats,
    describe_error,
)
from nova.queue_sql import QueueSQL

log = logging.getLogger("nova.runtime")
T = TypeVar("T")

# Errors that mean "the database is not reachable right now", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    ConnectionError,
)
# Everything the database (or the way to it) can throw at a worker or the monitor. None of it
# is a reason for a process to die: the next try, after a backoff, may well succeed (a
# function raising in a race, too many connections, a statement timing out, a lost socket).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    TimeoutError,
)
READ_TIMEOUT = 30.0  # a read is milliseconds; longer means a lock or an outage: log, retry
MAX_BACKOFF = 10.0


async def connect_pool(url: str, stopping: asyncio.Event, what: str, *,
                       max_size: int) -> asyncpg.Pool | None:
    """A pool (db.create_pool), tried again with a bounded exponential backoff while the
    database cannot be reached; None when `stopping` was set first. `what` names the part in
    the log line of each failed try."""
    delay = 0.5
    while not stopping.is_set():
        try:
            return await db.create_pool(url, min_size=1, max_size=max_size)
        except DATABASE_ERRORS as exc:
            log.warning("[%s] database unreachable (%s); retrying in %.1fs", what,
                        describe_error(exc), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF)
    return None


@dataclass(eq=False)
class Lease:
    """A worker's hold on one read message: (msg_id, read_ct), until a moment it renews."""

    job: Job
    until: float  # time.monotonic() at which it runs out unless renewed
    task: asyncio.Task[None] | None = None  # the job, from start to outcome
    work: asyncio.Task[str | None] | None = None  # the processor's part: what abandoning cancels
    finishing: bool = False  # the commit is under way: the heartbeat leaves it be
    lost: str | None = None  # why the lease is gone, once it is

    @property
    def renewable(self) -> bool:
        return (self.work is not None and not self.work.done() and not self.finishing
                and self.lost is None)


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
        """The job's transaction; the queue delete is committed with it, if the job still holds
        its message (else `LeaseLost`, and the transaction rolls back). Once per job."""
        if self._opened:
            raise RuntimeError("a job has exactly one transaction")
        self._opened = True
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn
            await self.worker.finish(conn, self.job)
        self.committed = True

    async def commit(self, statement: str, *args: Any) -> Any:
        """The job's transaction as ONE statement (instead of `transaction()`): `statement`,
        a SELECT of one value, runs together with the queue delete, and only while the job
        still holds its message (else `LeaseLost`: nothing is written). One round trip where
        BEGIN, the work, the delete and COMMIT take four. Returns the statement's value."""
        if self._opened:
            raise RuntimeError("a job has exactly one transaction")
        self._opened = True
        value = await self.worker.finish_with(self.pool, self.job, statement, args)
        self.committed = True
        return value

    async def hold_lease(self, conn: asyncpg.Connection) -> None:
        """For a transaction of the job's own besides `transaction()` (a page of a backfill):
        lock the message's row while the lease is ours, or raise `LeaseLost` so that the
        transaction rolls back. Another worker cannot take the message until it commits."""
        await self.worker.hold(conn, self.job)


class Worker:
    def __init__(self, processor: Processor, settings: Settings, *,
                 database_url: str | None = None, pool: asyncpg.Pool | None = None,
                 shutdown_grace: float | None = None) -> None:
        self.processor = processor
        self.settings = settings
        self.database_url = database_url
        self.queue = processor.queue
        self.component = processor.component
        self.sql = QueueSQL(self.queue)
        self.concurrency = settings.batch_size
        self.vt = settings.visibility_timeout
        self.heartbeat_interval = max(self.vt / 3, 0.05)
        self.idle_ceiling = settings.poll_interval_ms / 1000
        self.grace = settings.shutdown_grace_seconds if shutdown_grace is None else shutdown_grace
        self.policy = processor.retry_policy()
        self.crash_limit = self.policy.max_attempts + processor.crash_margin
        self.stats = WorkerStats()
        self.fatal: Fatal | None = None
        metrics.declare_queue(self.queue)
        self._pool = pool
        self._own_pool = pool is None
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._inflight: dict[tuple[int, int], Lease] = {}  # by (msg_id, read_ct)
        self._renewing = asyncio.Lock()
        self._listener: asyncpg.Connection | None = None
        # Where the listener connects (db.listen_url), decided at the first read; `_polling`
        # when there is nowhere: behind a pooler without NOVA_DATABASE_DIRECT_URL.
        self._listen_url: str | None = None
        self._polling = False
        # Grants whose jobs this worker leaves in the queue for now (a job of theirs was
        # deferred for lack of budget): grant -> time.monotonic() until which.
        self._blocked: dict[str, float] = {}

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
        """Process jobs until stopped (or, with burst, until the queue has nothing visible).
        Raises `Fatal` after a clean stop when a job (or the set-up) raised it."""
        if self.database_url is None:
            self.database_url = db.database_url(self.settings)
        if self._pool is None:
            pool = await self._connect(self.database_url)
            if pool is None:  # stopped before the database ever answered
                return self.stats
            self._pool = pool
        try:
            await self.processor.setup(self)
        except BaseException as exc:
            if self._own_pool:
                await self.pool.close()
            if isinstance(exc, Fatal):
                self.fatal = exc
                log.error("[%s] fatal: %s; not started", self.component, exc)
            raise
        log.info("[%s] started queue=%s concurrency=%d vt=%ds", self.component, self.queue,
                 self.concurrency, self.vt)
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"{self.queue}:heartbeat")
        try:
            await self._loop(burst)
        finally:
            await self._drain()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self._close_listener()
            await self.processor.teardown()
            if self._own_pool:
                await self.pool.close()
            log.info("[%s] stopped processed=%d retried=%d archived=%d released=%d lost=%d",
                     self.component, self.stats.processed, self.stats.retried,
                     self.stats.archived, self.stats.released, self.stats.lost)
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    async def _connect(self, url: str) -> asyncpg.Pool | None:
        return await connect_pool(url, self._stopping, self.component,
                                  max_size=self.concurrency + 2)

    # --- reading ---------------------------------------------------------------------------

    async def _loop(self, burst: bool) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:  # every slot busy: wait for a job to finish (its callback wakes us)
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            read_at = time.monotonic()
            try:
                await self._ensure_listener()
                jobs = await self._read(free)
                backoff = 0.5
            except DATABASE_ERRORS as exc:
                log.warning("[%s] read failed (%s); retrying in %.1fs", self.component,
                            describe_error(exc), backoff)
                await self._close_listener()
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            for job in jobs:
                self._start(job, read_at)
            if jobs:
                continue
            if burst:
                if not self._inflight:
                    return
                await asyncio.wait([lease.task for lease in self._inflight.values()
                                    if lease.task is not None],
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            await self._idle_wait()

    def _blocked_grants(self) -> list[str]:
        now = time.monotonic()
        for grant in [g for g, until in self._blocked.items() if until <= now]:
            del self._blocked[grant]
        return list(self._blocked)

    async def _read(self, qty: int) -> list[Job]:
        self._wakeup.clear()  # a notify from now on means "look again"
        rows = await self.pool.fetch(self.sql.read, qty, float(self.vt),
                                     self._blocked_grants(), timeout=READ_TIMEOUT)
        return [Job(self.queue, r["msg_id"], r["read_ct"], r["enqueued_at"], r["message"] or {})
                for r in rows]

    async def _idle_wait(self) -> None:
        timeout = self.idle_ceiling
        try:
            # A message becomes visible without any insert (a retry's delay, or the lease of a
            # dead worker running out): wake for the first one.
            next_vt = await self.pool.fetchval(self.sql.next_vt, self._blocked_grants(),
                                               timeout=READ_TIMEOUT)
            if next_vt is not None:
                timeout = max(0.0, min(timeout, float(next_vt) + 0.01))
            if self._blocked:  # a grant's jobs become takeable again
                timeout = min(timeout, max(0.0, min(self._blocked.values()) - time.monotonic())
                              + 0.01)
        except DATABASE_ERRORS as exc:
            log.warning("[%s] idle wait: next visibility unknown (%s); waiting %.1fs",
                        self.component, describe_error(exc), timeout)
        if self._listener is None and not self._polling:
            timeout = min(timeout, 0.5)  # the listener is lost: look again soon
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _ensure_listener(self) -> None:
        """LISTEN for the queue's inserts on a connection of its own, where a session can be
        trusted (db.listen_url); behind a pooler without one there is no listener, and idle
        waits last up to POLL_INTERVAL_MS."""
        if self._polling or (self._listener is not None and not self._listener.is_closed()):
            return
        if self._listen_url is None:
            assert self.database_url is not None
            self._listen_url = await db.listen_url(self.settings, self.database_url)
            if self._listen_url is None:
                self._polling = True
                return
        conn = await asyncpg.connect(self._listen_url)
        try:
            await conn.add_listener(f"nova_q_{self.queue}", self._on_notify)
        except BaseException:
            await conn.close(timeout=2)
            raise
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

    # --- leases ----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Renew every running job's lease each third of VISIBILITY_TIMEOUT. A lease the renewal
        does not find is gone; one that could not be renewed before its end is given up. Either
        way the job is cancelled before it commits anything."""
        interval = self.heartbeat_interval
        delay, backoff = interval, 0.5
        while True:
            await asyncio.sleep(delay)
            delay = interval
            leases = [lease for lease in self._inflight.values() if lease.renewable]
            if not leases:
                continue
            try:
                async with self._renewing:
                    sent = time.monotonic()
                    held = await asyncio.wait_for(self._renew(leases), max(interval, 1.0))
            except Exception as exc:  # a dead heartbeat would lose every job
                now = time.monotonic()
                for lease in leases:
                    if lease.renewable and now >= lease.until:
                        self._abandon(lease, "its heartbeat kept failing past the lease's end")
                left = [lease.until - now for lease in leases if lease.renewable]
                delay = max(0.05, min([backoff, *left]))
                log.warning("[%s] heartbeat failed for %d job(s) (%s); retrying in %.1fs",
                            self.component, len(leases), describe_error(exc), delay)
                backoff = min(backoff * 2, interval)
                continue
            backoff = 0.5
            for lease in leases:
                if not lease.renewable:
                    continue
                if lease.job.msg_id in held:
                    lease.until = sent + self.vt
                else:
                    self._abandon(lease, "its message was read again by another worker, or is "
                                         "gone")

    async def _renew(self, leases: list[Lease]) -> set[int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(self.sql.renew, [lease.job.msg_id for lease in leases],
                                    [lease.job.read_ct for lease in leases], float(self.vt))
        return {r["msg_id"] for r in rows}

    def _abandon(self, lease: Lease, reason: str) -> None:
        lease.lost = reason
        if lease.work is not None:
            lease.work.cancel()

    def _lease_lost(self, job: Job, reason: str) -> LeaseLost:
        lease = self._inflight.get((job.msg_id, job.read_ct))
        if lease is not None and lease.job is job and lease.lost is None:
            lease.lost = reason
        return LeaseLost(f"job {job.msg_id}: {reason}")

    async def hold(self, conn: asyncpg.Connection, job: Job) -> None:
        """Inside a transaction: lock the job's message while its lease is ours, or raise
        `LeaseLost`."""
        if await conn.fetchval(self.sql.hold, job.msg_id, job.read_ct) is None:
            raise self._lease_lost(job, f"its message is no longer held at read_ct "
                                        f"{job.read_ct}")

    async def finish(self, conn: asyncpg.Connection, job: Job) -> None:
        """Inside the job's transaction: remove its message (TESTING_MODE: keep it, and give
        the attempt back), only while the lease is ours; `LeaseLost` otherwise, which rolls the
        transaction back: a job that lost its message to another worker commits nothing."""
        self._finishing(job)
        statement = self.sql.keep if self.settings.testing_mode else self.sql.delete
        if await conn.fetchval(statement, job.msg_id, job.read_ct) is None:
            raise self._lost_at_commit(job)

    async def finish_with(self, pool: asyncpg.Pool, job: Job, statement: str,
                          args: tuple[Any, ...]) -> Any:
        """`finish` and `statement` in one statement of their own (JobContext.commit)."""
        self._finishing(job)
        row = await pool.fetchrow(
            self.sql.finishing(statement, len(args), self.settings.testing_mode),
            *args, job.msg_id, job.read_ct)
        if row["held"] is None:
            raise self._lost_at_commit(job)
        return row["value"]

    def _lost_at_commit(self, job: Job) -> LeaseLost:
        return self._lease_lost(job, f"at commit its message was no longer held at read_ct "
                                     f"{job.read_ct}")

    def _finishing(self, job: Job) -> None:
        lease = self._inflight.get((job.msg_id, job.read_ct))
        if lease is not None and lease.job is job:
            lease.finishing = True

    # --- running a job ---------------------------------------------------------------------

    def _start(self, job: Job, read_at: float) -> None:
        lease = Lease(job, until=read_at + self.vt)
        key = (job.msg_id, job.read_ct)
        self._inflight[key] = lease
        lease.task = asyncio.create_task(self._run_job(lease), name=f"{self.queue}:{job.msg_id}")
        lease.task.add_done_callback(lambda _t: self._done(key))

    def _done(self, key: tuple[int, int]) -> None:
        self._inflight.pop(key, None)
        self._wakeup.set()

    async def _work(self, job: Job, ctx: JobContext) -> str | None:
        note = await self.processor.process(job, ctx)
        if not ctx.committed:
            async with ctx.transaction():
                pass
        return note

    async def _run_job(self, lease: Lease) -> None:
        job = lease.job
        if job.read_ct > self.crash_limit:
            await self._bury(job)
            return
        started = time.perf_counter()
        lease.work = asyncio.create_task(self._work(job, JobContext(self, job)),
                                         name=f"{self.queue}:{job.msg_id}:work")
        try:
            note = await lease.work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if lease.lost is not None and not (task is not None and task.cancelling()):
                self._log_lost(job, lease.lost)  # the heartbeat gave the job up
                return
            await self._release(job)  # shutdown
            raise
        except Fatal as exc:
            self._on_fatal(job, exc)
            await self._release(job)
            return
        except Defer as exc:
            await self._defer(job, exc)
            return
        except Exception as exc:  # every failure becomes a retry or a dead letter
            if lease.lost is not None:
                self._log_lost(job, lease.lost)
                return
            await self._fail(job, exc, started)
            return
        elapsed = (time.perf_counter() - started) * 1000
        self.stats.record(elapsed)
        metrics.job_outcome(self.queue, "done", elapsed / 1000)
        log.info("[%s] job %d done in %.0fms attempt=%d%s", self.component, job.msg_id,
                 elapsed, job.read_ct, f" {note}" if note else "")

    def _log_lost(self, job: Job, reason: str) -> None:
        self.stats.lost += 1
        metrics.job_outcome(self.queue, "lost")
        log.warning("[%s] job %d lease lost attempt=%d: %s; nothing committed, no attempt "
                    "counted", self.component, job.msg_id, job.read_ct, reason)

    def _on_fatal(self, job: Job, exc: Fatal) -> None:
        if self.fatal is not None:
            return
        self.fatal = exc
        log.error("[%s] fatal: %s; stopping (job %d is given back)", self.component, exc,
                  job.msg_id)
        self.stop()

    async def _fail(self, job: Job, error: BaseException, started: float) -> None:
        decision = self.policy.decide(job.read_ct, error)
        elapsed = (time.perf_counter() - started) * 1000
        reason = describe_error(error)
        async with self._renewing:  # a renewal under way must not push the retry's time back
            pass
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if decision.retry:
                    if await conn.fetchval(self.sql.retry, job.msg_id, job.read_ct,
                                           max(0.0, decision.delay)) is None:
                        raise self._lease_lost(job, "by the time it failed, its message was "
                                                    "held by another worker")
                else:
                    await self.hold(conn, job)
                await self.processor.record_failure(conn, job, error, final=not decision.retry)
                if not decision.retry:
                    await conn.execute(self.sql.archive, self.queue, job.msg_id)
        except LeaseLost as exc:
            self._log_lost(job, f"{exc} (it failed: {reason})")
            return
        except Exception as exc:
            # The message comes back when its lease runs out: nothing lost.
            log.warning("[%s] job %d failed (%s) and its outcome could not be recorded: %s",
                        self.component, job.msg_id, reason, describe_error(exc))
            return
        metrics.job_outcome(self.queue, "retried" if decision.retry else "dead_lettered",
                            elapsed / 1000)
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

    async def _bury(self, job: Job) -> None:
        """A message read past max attempts + the crash margin: its job never got as far as an
        outcome. Archive it unrun, and mark the row it concerns failed, in one transaction."""
        error = Crashed(f"the job never finished in {job.read_ct - 1} attempts: its process "
                        f"died each time (limit {self.policy.max_attempts} attempts + "
                        f"{self.processor.crash_margin} for crashes)")
        unrecorded: BaseException | None = None
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self.hold(conn, job)
                try:
                    async with conn.transaction():  # a savepoint: the archive goes ahead
                        await self.processor.record_failure(conn, job, error, final=True)
                except Exception as exc:
                    unrecorded = exc
                await conn.execute(self.sql.archive, self.queue, job.msg_id)
        except LeaseLost as exc:
            self._log_lost(job, str(exc))
            return
        except Exception as exc:
            log.warning("[%s] job %d: could not archive it after %d attempts (%s); it comes "
                        "back when its lease runs out", self.component, job.msg_id,
                        job.read_ct - 1, describe_error(exc))
            return
        self.stats.archived += 1
        self.stats.crashed += 1
        metrics.job_outcome(self.queue, "dead_lettered")
        log.error("[%s] job %d archived unrun attempt=%d: %s%s", self.component, job.msg_id,
                  job.read_ct, error, f" (its row could not be marked failed: "
                  f"{describe_error(unrecorded)})" if unrecorded else "")

    async def _defer(self, job: Job, deferred: Defer) -> None:
        """Put a job back for `deferred.delay` seconds, its read undone (no attempt); with a
        grant, leave that grant's other jobs in the queue as long."""
        if deferred.grant is not None:
            until = time.monotonic() + deferred.delay
            self._blocked[deferred.grant] = max(until, self._blocked.get(deferred.grant, 0.0))
            self._wakeup.set()  # a slot is free: read again, without this grant
        try:
            held = await self.pool.fetchval(self.sql.release, job.msg_id, job.read_ct,
                                            float(deferred.delay))
        except DATABASE_ERRORS as exc:  # its lease runs out soon anyway
            log.warning("[%s] could not defer job %d (%s); it comes back when its lease runs "
                        "out", self.component, job.msg_id, describe_error(exc))
            return
        if held is None:
            self._log_lost(job, "by the time it was deferred, its message was held by another "
                                "worker")
            return
        metrics.job_outcome(self.queue, "deferred")
        log.log(logging.DEBUG if deferred.grant is not None else logging.INFO,
                "[%s] job %d deferred %.1fs (not counted): %s", self.component, job.msg_id,
                deferred.delay, deferred)

    async def _release(self, job: Job) -> None:
        """Make a job's message visible again now, for another worker, undoing its read: a
        job given back (shutdown, Fatal) costs no attempt."""
        try:
            held = await asyncio.shield(asyncio.wait_for(
                self.pool.fetchval(self.sql.release, job.msg_id, job.read_ct, 0.0), 5))
        except Exception as exc:  # its lease runs out soon anyway
            log.warning("[%s] could not release job %d (%s); it comes back when its lease runs "
                        "out", self.component, job.msg_id, describe_error(exc))
            return
        if held is None:
            log.info("[%s] job %d not released: its lease was already lost", self.component,
                     job.msg_id)
            return
        self.stats.released += 1
        metrics.job_outcome(self.queue, "released")
        log.info("[%s] job %d released attempt=%d (not counted)", self.component, job.msg_id,
                 job.read_ct)

    async def _drain(self) -> None:
        tasks = [lease.task for lease in self._inflight.values() if lease.task is not None]
        if not tasks:
            return
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


EXIT_FATAL = 2


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it exists (not on Windows), else asyncio's own. A worker's
    job is mostly I/O on two sockets (the provider's, PostgreSQL's); asyncio's own loop was a
    large share of its CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_process(main: Coroutine[Any, Any, T]) -> T:
    """A Nova process's event loop (`event_loop_factory`) running `main` to its end."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


async def run_parts(parts: Sequence[Runnable]) -> int:
    """Run the parts of a process side by side until a signal stops them. When one part ends
    on its own (it failed), the others are stopped too, so the process never limps on.

    Returns the process's exit status: 0, or EXIT_FATAL (2) when a part stopped on `Fatal`
    (the part logged why). Any other error of a part is raised once every part has stopped."""
    install_signal_handlers(parts)
    tasks = [asyncio.create_task(p.run(), name=type(p).__name__) for p in parts]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for part in parts:
            part.stop()
        await asyncio.wait(tasks)
    except asyncio.CancelledError:  # a second signal
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    status = 0
    for task in tasks:
        if task.cancelled():
            continue
        error = task.exception()
        if isinstance(error, Fatal):
            status = EXIT_FATAL
        elif error is not None:
            raise error
    return status
