"""`python -m nova.completion`: progress, completion and self-repair of backfills.

Not a queue processor: a loop.

- Every COMPLETION_CHECK_INTERVAL_MS, for each running backfill: one progress line from the
  counters (`get_sync_progress`, constant time), e.g.
  `[Monitor] Config 12345678... | Status: thread_sync | Progress: 75% (150/200)`; while discovery
  runs the total is unknown and the line says `discovering (1,200 threads found, ...)` instead
  of a percentage. When discovery is over and the counters say every thread is completed or
  failed, `complete_backfill_if_done` re-derives the counters from the rows (COUNT ... GROUP BY
  status) under the configuration's lock and only then marks it `completed`.
- Every RECOVERY_CHECK_INTERVAL_MS, with ENABLE_AUTO_RECOVERY: premature completions (completed
  with threads still queued/processing) go back to `thread_sync`, timestamps cleared; threads
  no worker will pick up again (queued without a live queue message, or processing past the
  visibility timeout plus a margin) are re-queued; running backfills whose job message vanished
  get it back. Each repair is logged.
- On the same interval, with NOVA_CATCHUP_GAP_SECONDS > 0: an active, fully backfilled inbox
  that has not had a webhook for longer than that gets a catch-up backfill from its last sign of
  life minus NOVA_CATCHUP_OVERLAP_SECONDS.

SIGTERM/SIGINT finish the current pass and exit 0 (a second signal exits at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from nova import db
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.runtime import CONNECTION_ERRORS, run_parts

log = logging.getLogger("nova.completion")

ACTIVE = """
SELECT p.* FROM flux_inbox_configurations c
CROSS JOIN LATERAL get_sync_progress(c.id) p
WHERE c.backfill_status IN ('queued', 'discovering', 'thread_sync') AND c.deleted_at IS NULL
ORDER BY c.created_at, c.id
"""
COMPLETE = "SELECT * FROM complete_backfill_if_done($1)"
PREMATURE = "SELECT * FROM recover_premature_completions()"
STUCK = "SELECT * FROM recover_stuck_threads($1, $2)"
LOST_JOBS = "SELECT * FROM recover_lost_backfill_jobs($1)"
CATCHUPS = "SELECT * FROM queue_due_catchups($1, $2)"
# Counters that drifted low would never say "done": recovery re-counts every waiting backfill.
SYNCING = """
SELECT id FROM flux_inbox_configurations
WHERE backfill_status = 'thread_sync' AND discovery_completed_at IS NOT NULL AND deleted_at IS NULL
"""
STUCK_BATCH = 1000


def progress_line(p: Mapping[str, Any]) -> str:
    """The seed's monitor line; never a percentage of a total that is not known yet."""
    status = p["backfill_status"]
    done = int(p["threads_completed"]) + int(p["threads_failed"])
    failed = f", {p['threads_failed']:,} failed" if p["threads_failed"] else ""
    if status == "queued":
        progress = "waiting for discovery"
    elif not p["discovery_complete"]:
        progress = (f"discovering ({p['threads_discovered']:,} threads found, "
                    f"{done:,} synced{failed})")
    else:
        pct = p["percent_complete"]
        shown = 100 if pct is None else int(pct)  # floor: 99.6% is not "100%"
        progress = f"{shown}% ({done:,}/{int(p['threads_queued']):,}{failed})"
    config = str(p["config_id"])[:8]
    return f"[Monitor] Config {config}... | Status: {status} | Progress: {progress}"


@dataclass
class Repairs:
    premature: list[Any] = field(default_factory=list)
    threads: list[Any] = field(default_factory=list)
    jobs: list[Any] = field(default_factory=list)
    recounted: list[Any] = field(default_factory=list)
    catchups: list[Any] = field(default_factory=list)


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
        self._stopping = asyncio.Event()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "monitor not started"
        return self._pool

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        if self._pool is None:
            url = self.database_url or db.database_url(self.settings)
            self._pool = await db.create_pool(url, min_size=1, max_size=2)
        log.info("[Monitor] started check=%.1fs recovery=%s catchup_gap=%ss",
                 self.check_interval,
                 f"{self.recovery_interval:.1f}s" if self.settings.enable_auto_recovery
                 else "off", self.settings.catchup_gap_seconds or "off")
        next_check = next_recovery = time.monotonic()
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                try:
                    if now >= next_recovery:
                        next_recovery = now + self.recovery_interval
                        await self.recover()
                    if now >= next_check:
                        next_check = now + self.check_interval
                        await self.check()
                except CONNECTION_ERRORS as exc:
                    log.warning("[Monitor] database unreachable (%s); next pass as scheduled",
                                exc)
                wait = max(0.0, min(next_check, next_recovery) - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
        finally:
            if self._own_pool:
                await self.pool.close()
            log.info("[Monitor] stopped")

    async def check(self) -> list[Any]:
        """One pass: a progress line per running backfill; completes the finished ones."""
        completed = []
        for p in await self.pool.fetch(ACTIVE):
            log.info(progress_line(p))
            finished = (p["backfill_status"] == "thread_sync" and p["discovery_complete"]
                        and p["threads_pending"] + p["threads_processing"] == 0
                        and p["threads_completed"] + p["threads_failed"] == p["threads_queued"])
            if not finished:
                continue
            result = await self.pool.fetchrow(COMPLETE, p["config_id"])
            if result["outcome"] == "completed":
                completed.append(p["config_id"])
                log.info("[Monitor] Config %s... completed threads=%d failed=%d messages=%d",
                         str(p["config_id"])[:8], result["threads_queued"],
                         p["threads_failed"], p["messages_synced"])
            else:
                log.warning("[Monitor] Config %s... counters said done, rows say %s open: "
                            "counters re-derived", str(p["config_id"])[:8],
                            result["threads_open"])
        return completed

    async def recover(self) -> Repairs:
        repairs = Repairs()
        if self.settings.enable_auto_recovery:
            repairs.premature = await self.pool.fetch(PREMATURE)
            for r in repairs.premature:
                log.warning("[Recovery] premature completion repaired config=%s open_threads=%d "
                            "completed_at=%s -> thread_sync", r["config_id"], r["threads_open"],
                            r["completed_at"].isoformat() if r["completed_at"] else None)
            repairs.threads = await self.pool.fetch(STUCK, self.stuck_after, STUCK_BATCH)
            for r in repairs.threads:
                log.warning("[Recovery] thread re-queued config=%s thread=%s was=%s job=%d",
                            r["config_id"], r["provider_thread_id"], r["was"], r["msg_id"])
            repairs.jobs = await self.pool.fetch(LOST_JOBS, self.stuck_after)
            for r in repairs.jobs:
                log.warning("[Recovery] backfill job re-sent config=%s job=%d", r["config_id"],
                            r["msg_id"])
            for config_id in [r["id"] for r in await self.pool.fetch(SYNCING)]:
                result = await self.pool.fetchrow(COMPLETE, config_id)
                if result["outcome"] == "completed":
                    repairs.recounted.append(config_id)
                    log.warning("[Recovery] config=%s completed after re-counting its threads",
                                config_id)
        if self.settings.catchup_gap_seconds > 0:
            repairs.catchups = await self.pool.fetch(
                CATCHUPS, timedelta(seconds=self.settings.catchup_gap_seconds),
                timedelta(seconds=self.settings.catchup_overlap_seconds))
            for r in repairs.catchups:
                if r["config_id"] is not None:
                    log.info("[Monitor] catch-up queued inbox=%s config=%s since=%s "
                             "last_seen=%s", r["inbox_id"], r["config_id"],
                             r["since"].isoformat(), r["last_seen"].isoformat())
        return repairs


def main() -> int:
    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    asyncio.run(run_parts([CompletionMonitor(settings)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
