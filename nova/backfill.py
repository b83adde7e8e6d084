"""`python -m nova.backfill`: discover an inbox's threads for a backfill (`inbox_backfill_jobs`).

A job (from `queue_inbox_backfill`) pages through the inbox's threads in the configured range,
newest first, 200 per page (the Nylas maximum), starting from the checkpoint saved on the
configuration, so a crash or a retry resumes where it stopped instead of at page one. Each page
commits in ONE transaction of its own: `queue_discovered_threads` adds the new threads and sends
their `thread_sync_jobs` (thread sync starts while discovery goes on), and
`update_backfill_orchestration_progress` saves the checkpoint. Only one page is in memory at a
time. The job's own message stays in the queue (kept invisible by the runtime's heartbeat)
until discovery ends: the last transaction runs `transition_to_thread_sync` together with the
message's delete.

A catch-up (kind `catch_up`) also re-queues threads this configuration had already synced:
being listed in the catch-up window means they changed.

Failures: a 429 waits out Retry-After (shared with every worker through nova.ratelimit) and
goes on; an expired grant marks the inbox `auth_expired` and the configuration `failed`; a range
reaching more than a year back is refused. Past 3 attempts the configuration is `failed` with
`last_error`, checkpoint kept: `python -m nova.backfill --resume CONFIG_ID` continues it.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import asyncpg

from nova.providers import AuthExpired, Permanent
from nova.ratelimit import ProviderProcessor
from nova.runtime import (
    GiveUp,
    Job,
    JobContext,
    RetryLater,
)

log = logging.getLogger("nova.backfill")

PAGE_LIMIT = 200  # Nylas' maximum page size

LOAD = """
SELECT c.id, c.inbox_id, c.backfill_status, c.backfill_kind, c.backfill_since, c.backfill_until,
       c.checkpoint_page_token, c.checkpoint_pages_done, c.checkpoint_threads_found,
       c.discovery_completed_at, i.grant_id, i.status AS inbox_status
FROM flux_inbox_configurations c JOIN flux_inboxes i ON i.id = c.inbox_id
WHERE c.id = $1 AND c.deleted_at IS NULL
"""
LOCK_CHECKPOINT = """
SELECT backfill_status, checkpoint_pages_done FROM flux_inbox_configurations
WHERE id = $1 FOR UPDATE
"""
QUEUE_PAGE = "SELECT count(*) FROM queue_discovered_threads($1, $2::text[], $3)"
CHECKPOINT = "SELECT 1 FROM update_backfill_orchestration_progress($1, $2, $3, $4)"
TRANSITION = "SELECT transition_to_thread_sync($1)"
RECORD_ERROR = """
UPDATE flux_inbox_configurations
SET last_error = $2, backfill_attempts = greatest(backfill_attempts, $3),
    backfill_status = CASE WHEN $4 THEN 'failed' ELSE backfill_status END, updated_at = now()
WHERE id = $1 AND backfill_status IN ('queued', 'discovering')
"""
EXPIRE_INBOX = """
UPDATE flux_inboxes SET status = 'auth_expired', auth_expired_at = coalesce(auth_expired_at, now()),
       updated_at = now()
WHERE id = $1 AND status = 'active'
"""
class GrantExpired(GiveUp):
    """The provider refused the grant: the inbox needs re-authentication."""


class Superseded(RetryLater):
    """Another orchestrator advanced this backfill's checkpoint: it owns the job now."""


class BackfillProcessor(ProviderProcessor):
    queue: ClassVar[str] = "inbox_backfill_jobs"
    component: ClassVar[str] = "Backfill"
    max_attempts: ClassVar[int] = 3

    transient_retries = 3

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        config_id = _config_id(job)
        cfg = await ctx.pool.fetchrow(LOAD, config_id)
        if cfg is None:
            raise GiveUp(f"configuration {config_id} does not exist")
        if cfg["backfill_status"] not in ("queued", "discovering"):
            return f"config={_short(config_id)} is {cfg['backfill_status']}: nothing to discover"
        _check_range(cfg["backfill_since"], cfg["backfill_until"])
        if cfg["inbox_status"] != "active":
            raise GiveUp(f"inbox is {cfg['inbox_status']}")
        if not cfg["grant_id"]:
            raise GiveUp("inbox has no grant")

        pages, found = cfg["checkpoint_pages_done"], cfg["checkpoint_threads_found"]
        token: str | None = cfg["checkpoint_page_token"]
        resumed = pages > 0
        if resumed:
            log.info("[Backfill] resuming config=%s page=%d threads=%d", _short(config_id),
                     pages + 1, found)
        # pages > 0 without a token: the last page was saved, only the transition is missing.
        while pages == 0 or token is not None:
            page = await self._page(cfg, token)
            ids = [t.id for t in page.items]
            async with ctx.pool.acquire() as conn, conn.transaction():
                await self._save_page(conn, cfg["id"], cfg["backfill_kind"], pages, found,
                                      ids, page.next_page_token)
            pages, found, token = pages + 1, found + len(ids), page.next_page_token
            log.info("[Backfill] page saved config=%s page=%d threads=%d found=%d more=%s",
                     _short(config_id), pages, len(ids), found, token is not None)

        async with ctx.transaction() as conn:
            await conn.fetchval(TRANSITION, config_id)
        return (f"config={_short(config_id)} discovered pages={pages} threads={found}"
                f"{' (resumed)' if resumed else ''}")

    async def _page(self, cfg: asyncpg.Record, token: str | None) -> Any:
        try:
            return await self.call(lambda: self.api.list_threads_page(
                cfg["grant_id"], page_token=token, limit=PAGE_LIMIT,
                received_after=cfg["backfill_since"], received_before=cfg["backfill_until"]))
        except AuthExpired as exc:
            raise GrantExpired(f"AuthExpired: {exc}") from exc
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc

    async def _save_page(self, conn: asyncpg.Connection, config_id: uuid.UUID, kind: str,
                         pages_done: int, found: int, ids: list[str],
                         next_token: str | None) -> None:
        current = await conn.fetchrow(LOCK_CHECKPOINT, config_id)
        if (current["backfill_status"] not in ("queued", "discovering")
                or current["checkpoint_pages_done"] != pages_done):
            raise Superseded(f"checkpoint moved to page {current['checkpoint_pages_done']} "
                             f"({current['backfill_status']}) under this orchestrator",
                             delay=self.settings.visibility_timeout)
        await conn.fetchval(QUEUE_PAGE, config_id, ids, kind == "catch_up")
        await conn.execute(CHECKPOINT, config_id, next_token, pages_done + 1, found + len(ids))

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        if isinstance(error, Superseded):
            return
        try:
            config_id = _config_id(job)
        except GiveUp:
            return
        message = f"{type(error).__name__}: {error}"[:2000]
        await conn.execute(RECORD_ERROR, config_id, message, job.read_ct, final)
        if isinstance(error, GrantExpired):
            inbox_id = await conn.fetchval(
                "SELECT inbox_id FROM flux_inbox_configurations WHERE id = $1", config_id)
            if inbox_id is not None:
                await conn.execute(EXPIRE_INBOX, inbox_id)


def earliest_start(now: datetime) -> datetime:
    """`now - interval '1 year 1 day'` as Postgres computes it (29 February -> 28th)."""
    try:
        year_ago = now.replace(year=now.year - 1)
    except ValueError:
        year_ago = now.replace(year=now.year - 1, day=28)
    return year_ago - timedelta(days=1)


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is None:
        raise GiveUp("backfill range has no start")
    if since < earliest_start(datetime.now(UTC)):
        raise GiveUp(f"range starts {since.isoformat()}, more than one year back")
    if until is not None and until <= since:
        raise GiveUp(f"empty range ({since.isoformat()} .. {until.isoformat()})")


def _config_id(job: Job) -> uuid.UUID:
    try:
        return uuid.UUID(str(job.message["config_id"]))
    except (KeyError, ValueError) as exc:
        raise GiveUp(f"queue message without a config id: {job.message}") from exc


def _short(config_id: uuid.UUID) -> str:
    return str(config_id)[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nova.backfill", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--resume", metavar="CONFIG_ID", type=uuid.UUID,
                        help="continue a failed backfill from its checkpoint, then exit")
    args = parser.parse_args(argv)
    if args.resume is not None:  # the same as `nova backfill resume CONFIG_ID`
        from nova.cli import main as cli

        return cli(["backfill", "resume", str(args.resume)])
    return BackfillProcessor.main()


if __name__ == "__main__":
    raise SystemExit(main())
