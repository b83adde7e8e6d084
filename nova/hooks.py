"""`python -m nova.hooks`: outbound webhooks, the change feed (nova_events) delivered to the
endpoints `nova hooks add` registered, signed as Standard Webhooks do (nova.hooks_delivery).
Optional: without endpoints it only looks for some now and then.

- Streams: each (endpoint, inbox) pair is delivered in the inbox's event order, from the
  change feed's cursor of consumer 'hook:<endpoint id>'. A delivery task leases one stream
  (nova_hook_claim, sql/160_hooks.sql: a lease with a token, so several processes can run),
  sends its next events one at a time and moves the cursor past each event delivered (2xx) or
  not subscribed to (no request). At least once: a process that dies between an endpoint's 2xx
  and the cursor's move sends that event again.
- A failed attempt (any other answer, a timeout, a refused connection) stops the stream: its
  next attempt is due after the schedule's next delay (NOVA_HOOKS_RETRY_SCHEDULE, jittered,
  never sooner than a Retry-After); the events behind it wait, so order holds per inbox. Once
  the schedule is used up the event is dead-lettered (`nova failures`, `nova replay hooks`) and
  the stream goes on with the next one.
- 410 Gone disables the endpoint, saying so; so does a run of failures without a success for
  NOVA_HOOKS_DISABLE_AFTER_DAYS. A Retry-After pauses every inbox of its endpoint until then.
  `nova hooks enable ID` sets it going again from where each inbox stood.
- Concurrency: at most NOVA_HOOKS_CONCURRENCY tasks in the process, at most
  NOVA_HOOKS_ENDPOINT_CONCURRENCY leases per endpoint across processes, so one slow endpoint
  holds only its own share; a task ends after a batch so that the least recently served
  inboxes of the endpoint get their turn.
- Wake-ups: the change feed's NOTIFY (a hint: a lost one costs at most NOVA_HOOKS_POLL_MS), a
  task ending, or NOVA_HOOKS_POLL_MS, which also bounds how late a due retry starts.

SIGTERM/SIGINT: no new leases; deliveries in flight get NOVA_SHUTDOWN_GRACE_SECONDS, then are
cancelled and their leases given back. A database error is logged in one line and retried
after a backoff; the work it cut off comes back with its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx

from nova import db, metrics
from nova import hooks_delivery as delivery
from nova.config import Settings, settings_or_exit
from nova.hooks_delivery import Endpoint
from nova.logs import setup_logging
from nova.runtime import (
    DATABASE_ERRORS,
    MAX_BACKOFF,
    connect_pool,
    describe_error,
    run_parts,
    run_process,
)

log = logging.getLogger("nova.hooks")

QUEUE = "hooks"  # its name in `nova failures` / `nova replay` and in the jobs metric
BATCH = 50  # events a task reads at a time, and sends before it gives its stream back
RELISTEN_SECONDS = 30
CLAIM_SHARE = 10  # after an empty claim, the next waits at least 10 times as long as it took
WAKE_CHANNEL = "nova_events"  # the change feed's NOTIFY (sql/140_events.sql)

CLAIM = "SELECT * FROM nova_hook_claim($1, $2, $3)"
ENDPOINTS = """
SELECT id, url, event_kinds, secret,
       CASE WHEN previous_secret_until > now() THEN previous_secret END AS previous_secret
FROM nova_hook_endpoints WHERE id = ANY($1::uuid[]) AND enabled
"""
READ = "SELECT * FROM nova_hook_read($1, $2, $3)"
DONE = "SELECT * FROM nova_hook_done($1, $2, $3, $4, $5, $6)"
REACHABLE = "SELECT nova_hook_reachable($1)"
FAILED = ("SELECT * FROM nova_hook_failed($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
          "$13, $14, $15)")
RELEASE = "SELECT nova_hook_release($1, $2, $3, $4, $5)"
BEHIND = "NV020"  # the change feed's error for a consumer behind pruned events
BEHIND_RETRY = timedelta(minutes=5)  # such a stream is looked at again this often
DEAD_LETTER = "SELECT event_id, body FROM nova_hook_dead_letters WHERE id = $1 AND lease_token = $2"
REPLAY_DONE = "SELECT nova_hook_replay_done($1, $2)"
REPLAY_FAILED = "SELECT * FROM nova_hook_replay_failed($1, $2, $3, $4, $5, $6, $7, $8)"
REPLAY_RELEASE = "SELECT nova_hook_replay_release($1, $2)"


@dataclass(frozen=True)
class Claim:
    endpoint: Endpoint
    inbox_id: uuid.UUID
    token: uuid.UUID
    dead_letter_id: int | None  # a replay of this dead letter, else the inbox's stream


@dataclass
class HookStats:
    delivered: int = 0
    skipped: int = 0  # events of kinds the endpoint does not take: cursor moved, no request
    failed: int = 0  # attempts that failed (each retried or dead-lettered)
    dead_lettered: int = 0
    replayed: int = 0
    disabled: int = 0


class HookDeliverer:
    def __init__(self, settings: Settings, *, pool: asyncpg.Pool | None = None,
                 database_url: str | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.database_url = database_url
        self._pool = pool
        self._own_pool = pool is None
        self._client = client
        self._own_client = client is None
        self.schedule = [timedelta(seconds=s) for s in settings.hooks_schedule]
        self.disable_after = timedelta(days=settings.hooks_disable_after_days)
        # A lease outlives a request and the statements around it; a dead process's come back.
        self.lease = timedelta(seconds=settings.hooks_timeout_seconds * 2 + 15)
        self.poll = settings.hooks_poll_ms / 1000
        self.grace = settings.shutdown_grace_seconds
        self.stats = HookStats()
        self._tasks: dict[asyncio.Task[None], Claim] = {}
        self._stopping = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._relisten_at = 0.0
        self._claimed_at = 0.0
        self.last_claim_seconds = 0.0
        metrics.declare_queue(QUEUE)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "not started"
        return self._pool

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "not started"
        return self._client

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()

    # --- the loop ------------------------------------------------------------------------

    async def run(self, *, until_idle: bool = False) -> HookStats:
        """Deliver until stopped (until_idle: until nothing is due and nothing runs)."""
        url = self.database_url or db.database_url(self.settings)
        if self._pool is None:
            self._pool = await self._connect(url)
            if self._pool is None:
                return self.stats
        if self._client is None:
            n = self.settings.hooks_concurrency
            self._client = httpx.AsyncClient(
                timeout=self.settings.hooks_timeout_seconds, follow_redirects=False,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        log.info("[Hooks] started concurrency=%d per_endpoint=%d timeout=%gs attempts=%d "
                 "over %s disable_after=%gd", self.settings.hooks_concurrency,
                 self.settings.hooks_endpoint_concurrency, self.settings.hooks_timeout_seconds,
                 len(self.schedule) + 1, sum(self.schedule, timedelta()),
                 self.settings.hooks_disable_after_days)
        listen = not until_idle
        backoff = 0.5
        try:
            while not self._stopping.is_set():
                if listen and (self._listener is None or self._listener.is_closed()) \
                        and time.monotonic() >= self._relisten_at:
                    listen = await self._listen(url)
                self._wakeup.clear()
                try:
                    started = await self._claim()
                except DATABASE_ERRORS as exc:
                    log.warning("[Hooks] claiming deliveries failed (%s); retrying in %.1fs",
                                describe_error(exc), backoff)
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                backoff = 0.5
                if until_idle and not started and not self._tasks:
                    break
                if started and len(self._tasks) < self.settings.hooks_concurrency:
                    continue  # more may be due: claim again before waiting
                await self._sleep(self.poll)
                if not started:
                    # A claim looks at every inbox with events (one row each): after one that
                    # found nothing, wake-ups wait long enough to keep claims under a tenth of
                    # the time, however many inboxes there are.
                    gap = min(self.poll, CLAIM_SHARE * self.last_claim_seconds)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(),
                                               gap - (time.monotonic() - self._claimed_at))
        finally:
            await self._drain()
            await self._close()
        return self.stats

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    async def _connect(self, url: str) -> asyncpg.Pool | None:
        return await connect_pool(url, self._stopping, "Hooks",
                                  max_size=min(self.settings.hooks_concurrency, 10))

    async def _listen(self, url: str) -> bool:
        """The change feed's NOTIFY wakes the loop; without it NOVA_HOOKS_POLL_MS paces it.
        False: never here (behind a pooler without NOVA_DATABASE_DIRECT_URL); a listener that
        failed or was lost is tried again RELISTEN_SECONDS later."""
        try:
            target = await db.listen_url(self.settings, url)
            if target is None:
                return False
            self._listener = await asyncpg.connect(target, statement_cache_size=0)
            await self._listener.add_listener(WAKE_CHANNEL, lambda *_: self._wakeup.set())
        except DATABASE_ERRORS as exc:
            log.warning("[Hooks] no wake-ups (%s): looking for events every %gs, listening "
                        "again in %ds", describe_error(exc), self.poll, RELISTEN_SECONDS)
            self._listener = None
            self._relisten_at = time.monotonic() + RELISTEN_SECONDS
        return True

    async def _claim(self) -> int:
        free = self.settings.hooks_concurrency - len(self._tasks)
        if free <= 0:
            return 0
        async with self.pool.acquire() as conn:
            started = time.monotonic()
            rows = await conn.fetch(CLAIM, self.settings.hooks_endpoint_concurrency, free,
                                    self.lease)
            self._claimed_at = time.monotonic()
            self.last_claim_seconds = self._claimed_at - started
            if not rows:
                return 0
            ids = list({r["endpoint_id"] for r in rows})
            endpoints = {r["id"]: Endpoint.from_row(r) for r in await conn.fetch(ENDPOINTS, ids)}
        for r in rows:
            endpoint = endpoints.get(r["endpoint_id"])
            if endpoint is None:  # disabled meanwhile: its lease goes back
                if r["dead_letter_id"] is None:
                    await self.pool.execute(RELEASE, r["endpoint_id"], r["inbox_id"],
                                            r["lease_token"], None, None)
                else:
                    await self.pool.execute(REPLAY_RELEASE, r["dead_letter_id"],
                                            r["lease_token"])
                continue
            claim = Claim(endpoint, r["inbox_id"], r["lease_token"], r["dead_letter_id"])
            work = self._replay(claim) if claim.dead_letter_id is not None else \
                self._stream(claim)
            task = asyncio.create_task(work, name=f"hook:{endpoint.id}:{r['inbox_id']}")
            self._tasks[task] = claim
            task.add_done_callback(self._done)
        return len(rows)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._wakeup.set()
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("[Hooks] delivery task failed: %s", describe_error(error))

    async def _drain(self) -> None:
        if self._tasks:
            log.info("[Hooks] waiting up to %.0fs for %d delivery task(s)", self.grace,
                     len(self._tasks))
            _done, pending = await asyncio.wait(list(self._tasks), timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self._own_client and self._client is not None:
            await self._client.aclose()
        if self._own_pool and self._pool is not None:
            await self._pool.close()
        log.info("[Hooks] stopped delivered=%d dead_lettered=%d", self.stats.delivered,
                 self.stats.dead_lettered)

    # --- one stream: an (endpoint, inbox) pair, in order ---------------------------------

    async def _stream(self, claim: Claim) -> None:
        endpoint, inbox, token = claim.endpoint, claim.inbox_id, claim.token
        delay: timedelta | None = None
        error: str | None = None
        try:
            async with self.pool.acquire() as conn:
                events = await conn.fetch(READ, endpoint.id, inbox, BATCH)
            skipped_to: int | None = None
            for event in events:
                if self._stopping.is_set():
                    break
                if not delivery.wanted(endpoint.kinds, event["kind"]):
                    skipped_to = event["position"]
                    self.stats.skipped += 1
                    continue
                if skipped_to is not None:
                    if not await self._done_upto(claim, skipped_to, delivered=False):
                        return
                    skipped_to = None
                if not await self._send(claim, event):
                    return
            if skipped_to is not None:
                await self._done_upto(claim, skipped_to, delivered=False)
        except DATABASE_ERRORS as exc:
            if getattr(exc, "sqlstate", None) == BEHIND:
                delay, error = BEHIND_RETRY, describe_error(exc)
                log.error("[Hooks] endpoint=%s inbox=%s waits: %s (nova events reset %s)",
                          endpoint.id, inbox, error, delivery.consumer(endpoint.id))
            else:
                log.warning("[Hooks] endpoint=%s inbox=%s: database error (%s); the stream "
                            "comes back with its lease", endpoint.id, inbox,
                            describe_error(exc))
        except Exception as exc:  # a bug must not spin: the stream waits, saying why
            delay, error = BEHIND_RETRY, describe_error(exc)
            log.exception("[Hooks] endpoint=%s inbox=%s: delivery task failed (%s)",
                          endpoint.id, inbox, error)
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):
                await asyncio.shield(self.pool.execute(RELEASE, endpoint.id, inbox, token,
                                                       delay, error))

    async def _done_upto(self, claim: Claim, position: int, *, delivered: bool) -> bool:
        row = await self.pool.fetchrow(DONE, claim.endpoint.id, claim.inbox_id, claim.token,
                                       position, delivered, self.lease)
        if row["recovered"]:
            due = await self.pool.fetchval(REACHABLE, claim.endpoint.id)
            if due:
                log.info("[Hooks] endpoint=%s answers again: %d inbox(es) whose attempts could "
                         "not reach it are due now", claim.endpoint.id, due)
                self._wakeup.set()
        return bool(row["go"])

    async def _send(self, claim: Claim, event: Any) -> bool:
        """One attempt of the stream's next event; whether the stream goes on."""
        endpoint = claim.endpoint
        body = delivery.payload(event)
        answer = await delivery.post(self.client, endpoint.url, delivery.message_id(event), body,
                                     endpoint.secrets)
        if answer.delivered:
            self.stats.delivered += 1
            metrics.job_outcome(QUEUE, "done", answer.elapsed)
            return await self._done_upto(claim, event["position"], delivered=True)
        self.stats.failed += 1
        row = await self.pool.fetchrow(
            FAILED, endpoint.id, claim.inbox_id, claim.token, event["id"], event["position"],
            event["kind"], body.decode(), answer.status, answer.error, self.schedule,
            _seconds(answer.retry_after), answer.gone, self.disable_after, self.lease,
            answer.unreachable)
        self._log_failure(endpoint, f"inbox={claim.inbox_id} event={event['id']} "
                                    f"position={event['position']}", answer, row)
        return row["outcome"] == "dead" and row["disabled_reason"] is None

    def _log_failure(self, endpoint: Endpoint, what: str, answer: delivery.Answer,
                     row: Any) -> None:
        outcome = row["outcome"]
        if outcome == "retry":
            metrics.job_outcome(QUEUE, "retried", answer.elapsed)
            log.warning("[Hooks] endpoint=%s %s attempt=%d failed: %s; next attempt at %s",
                        endpoint.id, what, row["attempts"], answer.error,
                        row["next_attempt_at"].isoformat(timespec="seconds"))
        elif outcome == "dead":
            self.stats.dead_lettered += 1
            metrics.job_outcome(QUEUE, "dead_lettered", answer.elapsed)
            log.error("[Hooks] endpoint=%s %s dead-lettered after %d attempts: %s (nova "
                      "failures --queue hooks; nova replay hooks)", endpoint.id, what,
                      row["attempts"], answer.error)
        elif outcome == "lost":
            metrics.job_outcome(QUEUE, "lost")
            log.warning("[Hooks] endpoint=%s %s: lease lost, outcome not recorded (%s)",
                        endpoint.id, what, answer.error)
        if row["disabled_reason"] is not None:
            self.stats.disabled += 1
            log.error("[Hooks] endpoint=%s url=%s disabled: %s (nova hooks enable %s)",
                      endpoint.id, endpoint.url, row["disabled_reason"], endpoint.id)

    # --- a replayed dead letter ----------------------------------------------------------

    async def _replay(self, claim: Claim) -> None:
        endpoint, dead_id, token = claim.endpoint, claim.dead_letter_id, claim.token
        try:
            row = await self.pool.fetchrow(DEAD_LETTER, dead_id, token)
            if row is None:
                return
            body = row["body"].encode()
            answer = await delivery.post(self.client, endpoint.url, str(row["event_id"]), body,
                                         endpoint.secrets)
            what = f"dead_letter={dead_id} event={row['event_id']} (replay)"
            if answer.delivered:
                if await self.pool.fetchval(REPLAY_DONE, dead_id, token):
                    self.stats.replayed += 1
                    metrics.job_outcome(QUEUE, "done", answer.elapsed)
                    log.info("[Hooks] endpoint=%s %s delivered", endpoint.id, what)
                return
            self.stats.failed += 1
            result = await self.pool.fetchrow(
                REPLAY_FAILED, dead_id, token, answer.status, answer.error, self.schedule,
                _seconds(answer.retry_after), answer.gone, self.disable_after)
            self._log_failure(endpoint, what, answer, result)
        except DATABASE_ERRORS as exc:
            log.warning("[Hooks] endpoint=%s dead_letter=%s: database error (%s); the replay "
                        "comes back with its lease", endpoint.id, dead_id, describe_error(exc))
        finally:
            with contextlib.suppress(*DATABASE_ERRORS):
                await asyncio.shield(self.pool.execute(REPLAY_RELEASE, dead_id, token))


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def main() -> int:
    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    return run_process(run_parts([HookDeliverer(settings),
                                  *metrics.server_parts(settings, "Hooks")]))


__all__ = ["HookDeliverer", "HookStats", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
