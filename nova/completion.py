"""`python -m nova.completion`: progress, completion and self-repair of backfills.

Not a queue processor: a loop.

- Every COMPLETION_CHECK_INTERVAL_MS, the running backfills' figures from the counters, all in
  one statement (`nova_backfill_progress`), and what changed in the log (nova.monitor_progress):
  the seed's line, e.g.
  `[Monitor] Config 12345678... | Status: thread_sync | Progress: 75% (150/200)`, for a backfill
  that starts, changes phase or, with a few running, moves; with many, one summary line per
  check. While discovery runs the total is unknown and the line says
  `discovering (1,200 threads found, ...)` instead of a percentage. When discovery is over and
  the counters say every thread is completed or failed, `complete_backfill_if_done` re-derives
  the counters from the rows (COUNT ... GROUP BY status) under the configuration's lock and
  only then marks it `completed`.
- Every RECOVERY_CHECK_INTERVAL_MS, with ENABLE_AUTO_RECOVERY: premature completions (completed
  with threads still queued/processing) go back to `thread_sync`, timestamps cleared; threads
  no worker will pick up again (queued without a live queue message, or processing past the
  visibility timeout plus a margin) are re-queued; running backfills whose job message vanished
  get it back. Each repair is logged.
- Every check, first: the progress counters' delta rows (appended by the triggers on
  `queued_threads`; no job transaction locks a counter row) are folded into `inbox_sync_stats`
  (`fold_sync_stats_deltas`), so `get_sync_progress` sums at most one interval's changes.
  (The search index step, which ran here, is a part of the thread processes: nova.search_index.)
- Every RECOVERY_CHECK_INTERVAL_MS, with ENABLE_AUTO_RECOVERY and NOVA_THREAD_RETRY_ROUNDS > 0:
  failed threads whose next retry round is due get a new job (`retry_failed_threads`, driven by
  the index of what is due), whether or not their backfill completed meanwhile.
- On the same interval, with NOVA_CATCHUP_GAP_SECONDS > 0: when the webhook intake has been
  silent that long (no notification of any Nylas grant: an outage, not a quiet inbox), an
  active, fully backfilled inbox not heard of for as long gets a catch-up backfill from its last
  sign of life minus NOVA_CATCHUP_OVERLAP_SECONDS, and one more when webhooks come back
  (queue_due_catchups). A quiet inbox in a flowing fleet costs nothing.
- On the same interval, with NOVA_RETENTION_DAYS > 0: rows of work finished that long ago are
  pruned, at most NOVA_RETENTION_BATCH of each kind a pass (nova_prune_finished): processed
  webhook notifications, completed backfills' per-thread rows, resolved dead letters; and
  with NOVA_EVENT_RETENTION_DAYS > 0, change-feed events written that long ago (nova_prune_events).

Every timed statement costs what is active (running backfills, open threads, what is due),
never what is stored (issue #19; benchmarks/bench_periodic.py measures them at 10,000 inboxes),
and runs with JIT off (db.periodic: per transaction, which also holds behind a pooler).

A database error (unreachable, too many connections, a repair raising in a race) never stops
the monitor: the failing step is logged in one line, the other steps of the pass still run, and
a failed pass is tried again after a backoff that doubles up to its interval.

SIGTERM/SIGINT finish the current pass and exit 0 (a second signal exits at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from nova import db, metrics
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.monitor_progress import ProgressLog, progress_line
from nova.runtime import connect_pool, describe_error, run_parts, run_process

log = logging.getLogger("nova.completion")

ACTIVE = "SELECT * FROM nova_backfill_progress('{}', true)"
COMPLETE = "SELECT * FROM complete_backfill_if_done($1)"
PREMATURE = "SELECT * FROM recover_premature_completions()"
STUCK = "SELECT * FROM recover_stuck_threads($1, $2)"
LOST_JOBS = "SELECT * FROM recover_lost_backfill_jobs($1)"
CATCHUPS = "SELECT * FROM queue_due_catchups($1, $2)"
FOLD = "SELECT fold_sync_stats_deltas()"
RETRIES = "SELECT * FROM retry_failed_threads($1, $2, $3)"
RETRY_BATCH = 500
# Counters that drifted low would never say "done": recovery re-counts the running backfills
# whose rows say they may be (no thread open), not every running one.
SYNCING = "SELECT config_id AS id FROM nova_backfills_to_recount()"
# Retention, one statement per kind (sql/065_periodic.sql), each a short transaction.
PRUNE = {"notifications": "SELECT nova_prune_notifications(now() - $1::interval, $2)",
         "threads": "SELECT nova_prune_finished_threads(now() - $1::interval, $2)"}
PRUNE_DEAD = "SELECT nova_prune_dead_letters($3, now() - $1::interval, $2)"
# Change-feed events written NOVA_EVENT_RETENTION_DAYS ago, read or not (sql/140_events.sql).
PRUNE_EVENTS = "SELECT nova_prune_events(now() - $1::interval, $2)"
QUEUE_NAMES = "SELECT queue_name FROM pgmq.meta ORDER BY queue_name"
PRUNE_CHUNK = 100  # rows a retention statement deletes at most
DEAD_LETTER_WINDOW = 250  # archived messages a dead-letter statement looks at
STUCK_BATCH = 1000
# Expired inboxes not heard of for a while: their grants are asked again (recheck_grants).
EXPIRED_INBOXES = """
SELECT id, grant_id FROM flux_inboxes
WHERE status = 'auth_expired' AND provider = $2 AND deleted_at IS NULL
  AND grant_id IS NOT NULL AND coalesce(status_changed_at, updated_at) < now() - $1::interval
ORDER BY coalesce(status_changed_at, updated_at)
LIMIT 50
"""
SET_STATUS = "SELECT * FROM nova_set_inbox_status($1, $2, now(), $3)"
STRANDED = "SELECT nova_release_stranded_notifications()"
FOLLOW_RESYNCS = "SELECT * FROM nova_follow_resyncs()"
END_PARKED = "SELECT * FROM nova_end_parked_backfills($1)"
# Gmail inboxes not synced from their history for GMAIL_HISTORY_POLL_SECONDS: a change sync
# (nova.changes) through the webhooks queue, at most one asked per interval.
POLL_CHANGES = """
WITH due AS (
    UPDATE flux_inboxes SET changes_requested_at = now()
    WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL
      AND grant_id IS NOT NULL
      AND greatest(coalesce(changes_synced_at, '-infinity'::timestamptz),
                   coalesce(changes_requested_at, '-infinity'::timestamptz))
          < now() - $1::interval  -- flux_inboxes_gmail_poll_idx
    RETURNING id
)
SELECT id, pgmq.send('nylas_webhook_notifications', jsonb_build_object('changes_inbox_id', id))
FROM due
"""
# users.watch (GMAIL_PUBSUB_TOPIC) lasts 7 days; renewed once a day. Inboxes removed, disabled
# or revoked are stopped.
WATCH_DUE = """
SELECT id, grant_id FROM flux_inboxes
WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL AND grant_id IS NOT NULL
  AND (watch_expires_at IS NULL OR watch_expires_at < now() + interval '6 days')
ORDER BY watch_expires_at NULLS FIRST LIMIT 100  -- flux_inboxes_gmail_watch_idx
"""
WATCH_STOP = """
SELECT id, grant_id, status FROM flux_inboxes
WHERE provider = 'gmail' AND watch_expires_at IS NOT NULL
  AND (deleted_at IS NOT NULL OR status IN ('disabled', 'revoked'))
LIMIT 100
"""
WATCHED = "UPDATE flux_inboxes SET watch_expires_at = $2 WHERE id = $1"
RESUME_FAILED = "SELECT * FROM resume_failed_backfills($1, $2)"


@dataclass
class Repairs:
    premature: list[Any] = field(default_factory=list)
    threads: list[Any] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    recounted: list[Any] = field(default_factory=list)
    catchups: list[Any] = field(default_factory=list)
    grants: list[Any] = field(default_factory=list)  # (inbox, status after the check)
    watches: list[Any] = field(default_factory=list)  # (inbox, "watch" | "stop")
    resumed: list[Any] = field(default_factory=list)
    retried: list[Any] = field(default_factory=list)  # threads whose retry round started
    released: int = 0  # 'waiting' notifications whose inbox is usable, queued again
    resyncs: list[Any] = field(default_factory=list)  # (inbox, config) owed by a history expiry
    ended: list[Any] = field(default_factory=list)  # (inbox, threads) of long-expired inboxes
    pruned: dict[str, int] = field(default_factory=dict)  # retention: rows pruned, by kind


class CompletionMonitor:
    def __init__(self, settings: Settings, *, pool: asyncpg.Pool | None = None,
                 database_url: str | None = None) -> None:
        self.settings = settings
        self.database_url = database_url
        self._pool = pool
        self._own_pool = pool is None
        self.check_interval = settings.completion_check_interval_ms / 1000
        self.recovery_interval = settings.recovery_check_interval_ms / 1000
        vt = settings.visibility_timeout
        self.stuck_after = timedelta(seconds=vt * 1.5 + 5)  # a margin past the timeout
        # Retry rounds of failed threads (nova.threads schedules them): a round in flight is
        # watched like a job's lease; an inactive inbox's threads are looked at again after
        # the first round's delay.
        self.retry_rounds = settings.thread_retry_rounds
        self.retry_idle = timedelta(seconds=settings.thread_retry_seconds)
        self._stopping = asyncio.Event()
        self._failed_steps = 0
        self.progress_log = ProgressLog()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "monitor not started"
        return self._pool

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        if self._pool is None:
            pool = await self._connect()
            if pool is None:  # stopped before the database ever answered
                return
            self._pool = pool
        log.info("[Monitor] started check=%.1fs recovery=%s catchup_gap=%ss",
                 self.check_interval,
                 f"{self.recovery_interval:.1f}s" if self.settings.enable_auto_recovery
                 else "off", self.settings.catchup_gap_seconds or "off")
        next_check = next_recovery = time.monotonic()
        check_backoff = recovery_backoff = 0.5
        try:
            while not self._stopping.is_set():
                # A pass that failed (all or some of its steps) is tried again after a bounded
                # exponential backoff, never later than its interval.
                now = time.monotonic()
                if now >= next_recovery:
                    if await self._pass("recovery", self.recover):
                        next_recovery, recovery_backoff = now + self.recovery_interval, 0.5
                    else:
                        next_recovery = now + min(recovery_backoff, self.recovery_interval)
                        recovery_backoff = min(recovery_backoff * 2, self.recovery_interval)
                if now >= next_check:
                    if await self._pass("check", self.check):
                        next_check, check_backoff = now + self.check_interval, 0.5
                    else:
                        next_check = now + min(check_backoff, self.check_interval)
                        check_backoff = min(check_backoff * 2, self.check_interval)
                wait = max(0.0, min(next_check, next_recovery) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
        finally:
            if self._own_pool:
                await self.pool.close()
            log.info("[Monitor] stopped")

    async def _connect(self) -> asyncpg.Pool | None:
        url = self.database_url or db.database_url(self.settings)
        return await connect_pool(url, self._stopping, "Monitor", max_size=2)

    async def _pass(self, name: str, run: Callable[[], Awaitable[Any]]) -> bool:
        """One pass; False when it (or one of its steps) failed. A pass never kills the
        monitor: the database failing, or a repair raising in a race, is logged and retried."""
        self._failed_steps = 0
        try:
            await run()
        except Exception as exc:
            log.warning("[Monitor] %s pass failed (%s); trying again shortly", name,
                        describe_error(exc))
            return False
        return self._failed_steps == 0

    # Every statement of a pass in a transaction of its own with JIT off (db.periodic).
    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        async with db.periodic(self.pool) as conn:
            return list(await conn.fetch(query, *args))

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        async with db.periodic(self.pool) as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: Any) -> Any:
        async with db.periodic(self.pool) as conn:
            return await conn.fetchval(query, *args)

    @contextlib.asynccontextmanager
    async def _step(self, component: str, what: str) -> AsyncIterator[None]:
        """One step of a pass: when it fails, the next steps still run."""
        try:
            yield
        except Exception as exc:
            self._failed_steps += 1
            log.warning("[%s] %s failed (%s); the other steps go on", component, what,
                        describe_error(exc))

    async def check(self) -> list[Any]:
        """One pass: what changed in the running backfills goes to the log; completes the
        finished ones; asks for the change syncs that are due."""
        if self.settings.gmail_history_poll_seconds > 0 and self.settings.credentials_key:
            async with self._step("Monitor", "history poll"):
                await self._fetch(
                    POLL_CHANGES, timedelta(seconds=self.settings.gmail_history_poll_seconds))
        async with self._step("Monitor", "counter fold"):
            await self._fetchval(FOLD)
        completed = []
        running = await self._fetch(ACTIVE)
        self.progress_log.log(running)
        for p in running:
            finished = (p["backfill_status"] == "thread_sync" and p["discovery_complete"]
                        and p["threads_pending"] + p["threads_processing"] == 0
                        and p["threads_completed"] + p["threads_failed"] == p["threads_queued"])
            if not finished:
                continue
            async with self._step("Monitor", f"completion of config {p['config_id']}"):
                result = await self._fetchrow(COMPLETE, p["config_id"])
                if result["outcome"] == "completed":
                    completed.append(p["config_id"])
                    log.info("[Monitor] Config %s... completed threads=%d failed=%d "
                             "messages=%d", str(p["config_id"])[:8], result["threads_queued"],
                             p["threads_failed"], p["messages_synced"])
                elif result["outcome"] == "waiting":
                    log.warning("[Monitor] Config %s... counters said done, rows say %s open: "
                                "counters re-derived", str(p["config_id"])[:8],
                                result["threads_open"])
                # 'not_ready': no longer in thread_sync, completed by its last thread meanwhile
        return completed

    async def recover(self) -> Repairs:
        repairs = Repairs()
        if self.settings.enable_auto_recovery:
            async with self._step("Recovery", "premature completions"):
                repairs.premature = await self._fetch(PREMATURE)
                for r in repairs.premature:
                    log.warning("[Recovery] premature completion repaired config=%s "
                                "open_threads=%d completed_at=%s -> thread_sync",
                                r["config_id"], r["threads_open"],
                                r["completed_at"].isoformat() if r["completed_at"] else None)
            async with self._step("Recovery", "stuck threads"):
                repairs.threads = await self._fetch(STUCK, self.stuck_after, STUCK_BATCH)
                for r in repairs.threads:
                    log.warning("[Recovery] thread re-queued config=%s thread=%s was=%s job=%d",
                                r["config_id"], r["provider_thread_id"], r["was"], r["msg_id"])
            async with self._step("Recovery", "lost backfill jobs"):
                repairs.jobs = await self._fetch(LOST_JOBS, self.stuck_after)
                for r in repairs.jobs:
                    log.warning("[Recovery] backfill job re-sent config=%s job=%d",
                                r["config_id"], r["msg_id"])
            if self.retry_rounds > 0:
                async with self._step("Recovery", "failed thread retries"):
                    repairs.retried = await self._fetch(
                        RETRIES, self.stuck_after, self.retry_idle, RETRY_BATCH)
                    for r in repairs.retried:
                        log.warning("[Recovery] thread retried config=%s thread=%s was=%s "
                                    "round=%d/%d job=%d", r["config_id"],
                                    r["provider_thread_id"], r["was"], r["retry_round"],
                                    self.retry_rounds, r["msg_id"])
            if self.settings.backfill_max_resumes > 0:
                async with self._step("Recovery", "failed backfills"):
                    repairs.resumed = await self._fetch(
                        RESUME_FAILED, timedelta(seconds=self.settings.backfill_resume_seconds),
                        self.settings.backfill_max_resumes)
                    for r in repairs.resumed:
                        log.warning("[Recovery] failed backfill resumed config=%s resume=%d/%d"
                                    " last_error=%s", r["config_id"], r["resumes"],
                                    self.settings.backfill_max_resumes,
                                    (r["last_error"] or "")[:200])
            syncing: list[Any] = []
            async with self._step("Recovery", "listing backfills to re-count"):
                syncing = [r["id"] for r in await self._fetch(SYNCING)]
            for config_id in syncing:
                async with self._step("Recovery", f"re-count of config {config_id}"):
                    result = await self._fetchrow(COMPLETE, config_id)
                    if result["outcome"] == "completed":
                        repairs.recounted.append(config_id)
                        log.warning("[Recovery] config=%s completed after re-counting its "
                                    "threads", config_id)
            async with self._step("Recovery", "owed resyncs"):
                repairs.resyncs = await self._fetch(FOLLOW_RESYNCS)
                for r in repairs.resyncs:
                    log.warning("[Recovery] inbox=%s resync queued after its backfill (its "
                                "history expired meanwhile) config=%s", r["inbox_id"],
                                r["config_id"])
            async with self._step("Recovery", "stranded notifications"):
                repairs.released = await self._fetchval(STRANDED)
                if repairs.released:
                    log.warning("[Recovery] %d waiting notification(s) of active inboxes "
                                "queued again", repairs.released)
            if self.settings.parked_backfill_seconds > 0:
                async with self._step("Recovery", "backfills parked on expired inboxes"):
                    repairs.ended = await self._fetch(
                        END_PARKED, timedelta(seconds=self.settings.parked_backfill_seconds))
                    for r in repairs.ended:
                        log.warning("[Recovery] inbox=%s expired for over %ds: %d thread(s) "
                                    "of its backfill ended (a re-authentication syncs them)",
                                    r["inbox_id"], self.settings.parked_backfill_seconds,
                                    r["threads"])
        if self.settings.catchup_gap_seconds > 0:
            async with self._step("Monitor", "catch-up scan"):
                repairs.catchups = await self._fetch(
                    CATCHUPS, timedelta(seconds=self.settings.catchup_gap_seconds),
                    timedelta(seconds=self.settings.catchup_overlap_seconds))
                for r in repairs.catchups:
                    if r["config_id"] is not None:
                        log.info("[Monitor] catch-up queued inbox=%s config=%s since=%s "
                                 "last_seen=%s", r["inbox_id"], r["config_id"],
                                 r["since"].isoformat(), r["last_seen"].isoformat())
        if self.settings.retention_days > 0 or self.settings.event_retention_days > 0:
            async with self._step("Retention", "pruning finished work"):
                repairs.pruned = await self.prune()
        if self.settings.grant_recheck_seconds > 0:
            async with self._step("Monitor", "grant checks"):
                repairs.grants = await self.recheck_grants()
        if self.settings.gmail_pubsub_topic and self.settings.credentials_key:
            async with self._step("Monitor", "Gmail watches"):
                repairs.watches = await self.renew_watches(self.settings.gmail_pubsub_topic)
        return repairs

    async def prune(self) -> dict[str, int]:
        """Rows of work finished NOVA_RETENTION_DAYS ago and change-feed events written
        NOVA_EVENT_RETENTION_DAYS ago (either 0: not pruned), at most NOVA_RETENTION_BATCH of
        each kind: one line when anything went."""
        age = timedelta(days=self.settings.retention_days)
        batch = self.settings.retention_batch
        pruned: dict[str, int] = {}
        if self.settings.retention_days > 0:
            for kind, statement in PRUNE.items():
                pruned[kind] = await self._prune_chunked(statement, age, batch)
            for row in await self._fetch(QUEUE_NAMES):
                queue = row["queue_name"]
                # each call looks at the next `chunk` archived messages; a pass at `batch`
                n = seen = 0
                while seen < batch:
                    chunk = min(DEAD_LETTER_WINDOW, batch - seen)
                    n += int(await self._fetchval(PRUNE_DEAD, age, chunk, queue))
                    seen += chunk
                pruned[f"dead_letters:{queue}"] = n
        if self.settings.event_retention_days > 0:
            pruned["events"] = await self._prune_chunked(
                PRUNE_EVENTS, timedelta(days=self.settings.event_retention_days), batch)
        pruned = {kind: n for kind, n in pruned.items() if n}
        if pruned:
            log.info("[Retention] pruned %s (finished over %gd ago; events over %gd)",
                     " ".join(f"{k}={n:,}" for k, n in sorted(pruned.items())),
                     self.settings.retention_days, self.settings.event_retention_days)
        return pruned

    async def _prune_chunked(self, statement: str, age: timedelta, batch: int) -> int:
        """At most `batch` rows in statements of PRUNE_CHUNK rows, each its own short
        transaction, until one comes back short: deleting 1,000 rows spread over as many pages
        was one 115 ms statement under load, 250 still 43 ms (issue #19)."""
        done = 0
        while done < batch:
            chunk = min(PRUNE_CHUNK, batch - done)
            n = int(await self._fetchval(statement, age, chunk))
            done += n
            if n < chunk:
                break
        return done

    async def renew_watches(self, topic: str) -> list[tuple[Any, str]]:
        """users.watch for active Gmail inboxes whose watch is missing or a day old;
        users.stop for removed, disabled or revoked ones
        (https://developers.google.com/workspace/gmail/api/guides/push: "you must re-call
        watch at least every 7 days"; "we recommend calling watch once per day")."""
        from nova.providers import ProviderError
        from nova.providers.gmail import GmailProvider
        from nova.ratelimit import ProviderBudget, provider_from_settings

        due = await self._fetch(WATCH_DUE)
        gone = await self._fetch(WATCH_STOP)
        done: list[tuple[Any, str]] = []
        if not due and not gone:
            return done
        budget = ProviderBudget.from_settings(self.pool, self.settings, "gmail")
        provider, client = provider_from_settings(self.settings, budget, kind="gmail")
        assert isinstance(provider, GmailProvider)
        try:
            for row in due:
                try:
                    watch = await provider.watch(row["grant_id"], topic)
                except ProviderError as exc:
                    log.warning("[Monitor] Gmail watch of inbox=%s failed: %s", row["id"], exc)
                    continue
                await self.pool.execute(WATCHED, row["id"], watch.expiration)
                done.append((row["id"], "watch"))
                log.info("[Monitor] Gmail watch inbox=%s until %s", row["id"],
                         watch.expiration.isoformat() if watch.expiration else "?")
            for row in gone:
                try:
                    await provider.stop(row["grant_id"])
                except ProviderError as exc:  # a revoked grant cannot stop: it lapses
                    log.info("[Monitor] Gmail stop of inbox=%s: %s", row["id"], exc)
                await self.pool.execute(WATCHED, row["id"], None)
                done.append((row["id"], "stop"))
        finally:
            await client.aclose()
        return done

    async def recheck_grants(self) -> list[tuple[Any, str]]:
        """Expired inboxes whose grant was not heard of for NOVA_GRANT_RECHECK_SECONDS: ask
        the grant, for every configured provider (Nylas: GET /v3/grants/{id}; Gmail: a token
        refresh and getProfile). A re-authentication whose webhook never came (lost, or no
        receiver configured), or new Gmail credentials, must not leave the inbox expired for
        good. A 404 revokes only when confirmed (nova.processor.grant_gone)."""
        from nova.processor import grant_gone
        from nova.providers import GrantNotFound, ProviderError
        from nova.providers.registry import configured
        from nova.ratelimit import ProviderBudget, provider_from_settings

        done: list[tuple[Any, str]] = []
        for kind in configured(self.settings):
            rows = await self._fetch(
                EXPIRED_INBOXES, timedelta(seconds=self.settings.grant_recheck_seconds),
                kind.name)
            if not rows:
                continue
            budget = ProviderBudget.from_settings(self.pool, self.settings, kind.name)
            provider, client = provider_from_settings(self.settings, budget, kind=kind.name)
            try:
                for row in rows:
                    try:
                        grant = await provider.get_grant(row["grant_id"])
                        target = "active" if grant.is_valid else "auth_expired"
                    except GrantNotFound as exc:
                        answer = await grant_gone(provider, row["grant_id"], exc,
                                                  self.settings.revoke_confirm_seconds)
                        if not isinstance(answer, GrantNotFound):
                            log.info("[Monitor] grant of inbox=%s: %s", row["id"], answer)
                            continue
                        target = "revoked"
                    except ProviderError as exc:
                        log.warning("[Monitor] grant check of inbox=%s failed: %s", row["id"],
                                    exc)
                        continue
                    result = await self.pool.fetchrow(
                        SET_STATUS, row["id"], target,
                        timedelta(seconds=self.settings.catchup_overlap_seconds))
                    done.append((row["id"], result["status"]))
                    if result["was"] != result["status"]:
                        log.warning("[Monitor] inbox=%s %s -> %s after a grant check%s",
                                    row["id"], result["was"], result["status"],
                                    f" catch-up={result['catchup_config_id']}"
                                    if result["catchup_config_id"] else "")
            finally:
                await provider.aclose()
                await client.aclose()
        return done


def main() -> int:
    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    return run_process(run_parts([CompletionMonitor(settings),
                                  *metrics.server_parts(settings, "Monitor")]))


__all__ = ["CompletionMonitor", "Repairs", "main", "progress_line"]


if __name__ == "__main__":
    raise SystemExit(main())
