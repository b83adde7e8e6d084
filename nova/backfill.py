"""`python -m nova.backfill`: discover an inbox's threads for a backfill (`inbox_backfill_jobs`).

A job (from `queue_inbox_backfill`) pages through the inbox's threads, newest first, 200 per
page (the Nylas maximum), starting from the checkpoint saved on the configuration, so a crash
or a retry resumes where it stopped instead of at page one. Each page commits in ONE
transaction of its own: `queue_discovered_threads` adds the new threads and sends their
`thread_sync_jobs` (thread sync starts while discovery goes on), and
`update_backfill_orchestration_progress` saves the checkpoint. Its rows are taken in the one
lock order (sql/030_backfill.sql): the configuration, the thread rows the listing describes (in
id order), then the queued threads (in id order); the counters take no lock. Only one page is
in memory at a time. The job's own message stays in the queue (kept invisible by the runtime's
heartbeat) until discovery ends: the last page commits with `transition_to_thread_sync` and the
message's delete.

Threads that move. Nylas lists threads by their latest message, so a thread on a later page
that gets a reply while discovery runs jumps to page one, already read, and would never be
seen. So discovery has two parts:
- the main pass lists the range up to `discovery_cutoff`, the moment the backfill was queued:
  a reply after it takes its thread out of this listing instead of moving it under it;
- then rounds list every thread changed since (latest message after the cutoff, less the
  clock skew; each later round from the start of the previous one), queueing again, even if
  synced already, each thread whose latest message the previous listing had not seen, until a
  round finds no such change or MAX_CHANGE_ROUNDS ran. Webhooks,
  where they are configured, also queue any thread a message names while the backfill runs.
A page token the provider rejects (an expired cursor) restarts the current listing from its
first page; queueing is idempotent.

Before its first page, discovery stores the inbox's folders or labels (nova.folders).

A provider with a change feed (Gmail's history) needs no rounds: before its first page,
discovery takes the feed's current position as the inbox's `sync_cursor` (unless it has one),
and every change from then on, threads that move included, arrives by incremental sync
(nova.changes). Its listing carries no thread summaries (Gmail lists ids and snippets), so
nothing is written from it: each listed thread gets a job, except in the resync after a history
expiry, which lists the mailbox's messages first and queues only the threads that may differ
from the store (nova.gmail_resync).

Failures: a 429 waits out Retry-After (shared with every worker through nova.ratelimit) and
goes on; a 401 confirmed by the grant marks the inbox `auth_expired` (or `revoked`) and the
configuration `failed`. Past 3 attempts the configuration is `failed` with `last_error`,
checkpoint kept: `python -m nova.backfill --resume CONFIG_ID` continues it. The one-year limit
is checked when a backfill is queued, not when it resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import ClassVar, TypeVar

import asyncpg

from nova import folders, gmail_resync, store
from nova.processor import ProviderProcessor, refuse_inbox
from nova.providers import AuthExpired, ChangeFeed, GrantNotFound, NotFound, Permanent
from nova.providers.models import Page, Thread
from nova.runtime import (
    GiveUp,
    Job,
    JobContext,
    RetryLater,
)
from nova.store import VERSION_SKEW_SECONDS

log = logging.getLogger("nova.backfill")
T = TypeVar("T")

PAGE_LIMIT = 200  # Nylas' maximum page size
MAX_CHANGE_ROUNDS = 5
SKEW = timedelta(seconds=VERSION_SKEW_SECONDS)

LOAD = """
SELECT c.id, c.inbox_id, c.backfill_status, c.backfill_kind, c.backfill_since, c.backfill_until,
       c.checkpoint_page_token, c.checkpoint_pages_done, c.checkpoint_threads_found,
       c.discovery_completed_at, coalesce(c.discovery_cutoff, c.updated_at) AS discovery_cutoff,
       c.changes_since, c.changes_rounds, c.changes_round_started_at,
       c.history_expired_at, c.resync_messages_listed_at,
       i.grant_id, i.status AS inbox_status, i.provider, i.sync_cursor
FROM flux_inbox_configurations c JOIN flux_inboxes i ON i.id = c.inbox_id
WHERE c.id = $1 AND c.deleted_at IS NULL
"""
# The page's first lock (the lock order of sql/030_backfill.sql): FOR NO KEY UPDATE excludes
# another orchestrator of this backfill, but not a webhook or history sync adding a thread to it.
LOCK_CHECKPOINT = """
SELECT backfill_status, checkpoint_pages_done FROM flux_inbox_configurations
WHERE id = $1 FOR NO KEY UPDATE
"""
QUEUE_PAGE = "SELECT count(*) FROM queue_discovered_threads($1, $2::text[], $3, $4::text[])"
CHECKPOINT = "SELECT 1 FROM update_backfill_orchestration_progress($1, $2, $3, $4)"
FOUND = "SELECT threads_queued FROM get_sync_progress($1)"
SAVE_ROUNDS = """
UPDATE flux_inbox_configurations
SET changes_since = $2, changes_rounds = $3, changes_round_started_at = $4
WHERE id = $1
"""
TRANSITION = "SELECT transition_to_thread_sync($1)"
RECORD_ERROR = """
UPDATE flux_inbox_configurations
SET last_error = $2, backfill_attempts = greatest(backfill_attempts, $3),
    backfill_status = CASE WHEN $4 THEN 'failed' ELSE backfill_status END, updated_at = now()
WHERE id = $1 AND backfill_status IN ('queued', 'discovering')
"""


class GrantExpired(GiveUp):
    """The grant itself confirmed the refusal: the inbox needs re-authentication."""

    inbox_status = "auth_expired"


class GrantDeleted(GrantExpired):
    inbox_status = "revoked"


class Superseded(RetryLater):
    """Another orchestrator advanced this backfill's checkpoint: it owns the job now."""


Change = tuple[str, float]  # a thread and the time of its latest message


@dataclass(frozen=True)
class Cursor:
    """Where discovery stands: the checkpoint, plus which listing it is in and (in memory) the
    recent changes it listed, so a round ends when it finds nothing the last listing had not."""

    token: str | None
    pages: int
    found: int
    since: datetime | None  # None: the main pass; else the current round lists changes since
    rounds: int  # rounds of changes completed
    round_started: datetime | None
    seen: frozenset[Change] = frozenset()  # this listing's changes inside the skew window
    prev: frozenset[Change] = frozenset()  # the previous listing's
    fresh: int = 0  # changes this round listed that the previous listing had not
    unchanged: int = 0  # threads a resync found as stored and recorded done (this run)

    @property
    def in_main(self) -> bool:
        return self.since is None


class BackfillProcessor(ProviderProcessor):
    queue: ClassVar[str] = "inbox_backfill_jobs"
    component: ClassVar[str] = "Backfill"
    max_attempts: ClassVar[int] = 3

    transient_retries = 3
    patience_factor = 3.0  # a listing page goes ahead of its own thread syncs' requests

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

        cur = Cursor(token=cfg["checkpoint_page_token"], pages=cfg["checkpoint_pages_done"],
                     found=cfg["checkpoint_threads_found"], since=cfg["changes_since"],
                     rounds=cfg["changes_rounds"], round_started=cfg["changes_round_started_at"],
                     # resumed inside a round: what it listed before is unknown, assume news
                     fresh=1 if cfg["changes_since"] and cfg["checkpoint_page_token"] else 0)
        resumed = cur.pages > 0
        if resumed:
            log.info("[Backfill] resuming config=%s page=%d threads=%d %s", _short(config_id),
                     cur.pages + 1, cur.found, _phase(cur))
        provider = self.provider_for(cfg["provider"])
        feed = isinstance(provider, ChangeFeed)
        if feed and cfg["sync_cursor"] is None:
            await self._start_feed(ctx, cfg)
        if not resumed:
            await self._list_folders(ctx, cfg)
        # A resync after a history expiry fetches only the threads that may differ: it lists
        # the mailbox's messages first, to compare each page of threads with (nova.gmail_resync).
        resync = gmail_resync.applies(cfg, feed)
        if resync and not gmail_resync.listed(cfg):
            await gmail_resync.list_messages(
                ctx.pool, cfg, provider, lambda request: self._listing_call(cfg, request),
                ctx.hold_lease)
        restarted = False
        # The next page is requested while this one is written: listing and writing overlap.
        fetching = self._prefetch(cfg, cur, feed)
        while True:
            try:
                page, version = await fetching
            except Permanent as exc:
                # A page token the provider no longer accepts: list this part again from its
                # first page (queueing is idempotent). Once per run; then it is an error.
                if cur.token is None or restarted or exc.status != 400:
                    raise GiveUp(f"{type(exc).__name__}: {exc}") from exc
                log.warning("[Backfill] page token rejected config=%s (%s): listing again from "
                            "the first page", _short(config_id), exc)
                cur, restarted = replace(cur, token=None), True
                fetching = self._prefetch(cfg, cur, feed)
                continue
            nxt, done, ids = _advance(cfg, cur, page, feed=feed)
            work = await PageWork.build(
                page, ids, version,
                summaries=bool(getattr(provider, "lists_thread_summaries", True)),
                versions=gmail_resync.history_ids(page) if resync else None)
            if done:
                break
            fetching = self._prefetch(cfg, nxt, feed)
            try:
                async with ctx.pool.acquire() as conn, conn.transaction():
                    await ctx.hold_lease(conn)  # a page commits only while the job is ours
                    nxt = await self._save_page(conn, cfg, cur, nxt, work)
            except BaseException:
                fetching.cancel()
                await asyncio.gather(fetching, return_exceptions=True)
                raise
            log.info("[Backfill] page saved config=%s page=%d threads=%d found=%d %s%s",
                     _short(config_id), nxt.pages, len(page.items), nxt.found, _phase(cur),
                     f" unchanged={nxt.unchanged - cur.unchanged}" if resync else "")
            cur = nxt

        async with ctx.transaction() as conn:  # the last page, the transition, the job's delete
            nxt = await self._save_page(conn, cfg, cur, nxt, work)
            await conn.fetchval(TRANSITION, config_id)
            if feed:
                await gmail_resync.finish(conn, config_id)
        return (f"config={_short(config_id)} discovered pages={nxt.pages} threads={nxt.found} "
                f"change_rounds={nxt.rounds}{' (resumed)' if resumed else ''}"
                + (f" unchanged={nxt.unchanged} (resync)" if resync else ""))

    async def _start_feed(self, ctx: JobContext, cfg: asyncpg.Record) -> None:
        """The change feed's position before the first page is listed: what changes from now
        on comes by incremental sync."""
        grant_id, kind = cfg["grant_id"], cfg["provider"]
        try:
            provider = self.provider_for(kind)
            assert isinstance(provider, ChangeFeed)
            cursor = await self.call(lambda: provider.current_cursor(grant_id), grant_id, kind)
        except AuthExpired as exc:
            raise GrantExpired(f"AuthExpired: {exc}") from exc
        except GrantNotFound as exc:
            raise GrantDeleted(f"GrantNotFound: {exc}") from exc
        await ctx.pool.execute(
            "UPDATE flux_inboxes SET sync_cursor = $2, sync_cursor_at = now()"
            " WHERE id = $1 AND sync_cursor IS NULL", cfg["inbox_id"], cursor)

    async def _list_folders(self, ctx: JobContext, cfg: asyncpg.Record) -> None:
        """The inbox's folders or labels, by name (nova.folders), before its first page. A
        provider that refuses them (a scope it lacks) costs the names, not the backfill."""
        grant_id, kind = cfg["grant_id"], cfg["provider"]
        try:
            note = await folders.sync_folders(
                ctx.pool, self.provider_for(kind),
                lambda request: self.call(request, grant_id, kind), cfg["inbox_id"], grant_id)
        except AuthExpired as exc:
            raise GrantExpired(f"AuthExpired: {exc}") from exc
        except GrantNotFound as exc:
            raise GrantDeleted(f"GrantNotFound: {exc}") from exc
        except (NotFound, Permanent) as exc:
            log.warning("[Backfill] folders not listed config=%s: %s: %s", _short(cfg["id"]),
                        type(exc).__name__, exc)
            return
        log.info("[Backfill] config=%s %s", _short(cfg["id"]), note)

    def _prefetch(self, cfg: asyncpg.Record, cur: Cursor,
                  feed: bool) -> asyncio.Task[tuple[Page[Thread], datetime]]:
        """The page at ``cur``, requested now, with the version of what it read."""

        async def fetch() -> tuple[Page[Thread], datetime]:
            with store.fetch_version() as fetched:
                page = await self._page(cfg, cur, feed=feed)
            return page, fetched()

        return asyncio.create_task(fetch(), name=f"backfill:{_short(cfg['id'])}:page")

    async def _page(self, cfg: asyncpg.Record, cur: Cursor, *, feed: bool) -> Page[Thread]:
        if cur.in_main:  # the range, bounded at the moment the backfill was queued
            until = cfg["backfill_until"]
            after = cfg["backfill_since"]
            before = min(until, cfg["discovery_cutoff"]) if until else cfg["discovery_cutoff"]
            if feed:
                # The feed's position was taken before this listing: list the mailbox as it
                # is now, up to the range's own end only. A bound at the cutoff would drop
                # mail of its last second (`before:` counts whole seconds) that the feed,
                # positioned after it, will not bring either (a history expiry's resync).
                before = until
        else:
            after, before = cur.since, cfg["backfill_until"]
        provider = self.provider_for(cfg["provider"])
        return await self._listing_call(cfg, lambda: provider.list_threads_page(
            cfg["grant_id"], page_token=cur.token, limit=PAGE_LIMIT, received_after=after,
            received_before=before))

    async def _listing_call(self, cfg: asyncpg.Record, request: Callable[[], Awaitable[T]]) -> T:
        """A listing request of this backfill's grant; a refusal the grant confirms ends it."""
        try:
            return await self.call(request, cfg["grant_id"], cfg["provider"])
        except AuthExpired as exc:
            raise GrantExpired(f"AuthExpired: {exc}") from exc
        except GrantNotFound as exc:
            raise GrantDeleted(f"GrantNotFound: {exc}") from exc

    async def _save_page(self, conn: asyncpg.Connection, cfg: asyncpg.Record, cur: Cursor,
                         nxt: Cursor, work: PageWork) -> Cursor:
        config_id = cfg["id"]
        current = await conn.fetchrow(LOCK_CHECKPOINT, config_id)
        if (current["backfill_status"] not in ("queued", "discovering")
                or current["checkpoint_pages_done"] != cur.pages):
            raise Superseded(f"checkpoint moved to page {current['checkpoint_pages_done']} "
                             f"({current['backfill_status']}) under this orchestrator",
                             delay=self.settings.visibility_timeout)
        # The listing's thread objects are written as they are (no second request for them);
        # a thread whose one message came whole with it is done here, the rest get a job.
        # Rounds list changed threads: queued again even when already synced.
        await store.upsert_threads(conn, cfg["inbox_id"], work.threads, work.version)
        await store.upsert_messages(conn, cfg["inbox_id"], work.messages, work.version)
        unchanged = 0
        if work.versions is not None:  # a resync: threads as stored are done (nova.gmail_resync)
            unchanged = await gmail_resync.queue_page(conn, config_id, work.queue, work.versions)
        else:
            await conn.fetchval(QUEUE_PAGE, config_id, work.queue, not cur.in_main, work.done)
        found = int(await conn.fetchval(FOUND, config_id) or 0)
        await conn.execute(CHECKPOINT, config_id, nxt.token, nxt.pages, found)
        if (nxt.since, nxt.rounds, nxt.round_started) != (cur.since, cur.rounds,
                                                           cur.round_started):
            await conn.execute(SAVE_ROUNDS, config_id, nxt.since, nxt.rounds,
                               nxt.round_started)
        return replace(nxt, found=found, unchanged=nxt.unchanged + unchanged)

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
                await refuse_inbox(conn, inbox_id, error.inbox_status)


@dataclass(frozen=True)
class PageWork:
    """What a page writes: its threads, the messages of those that came whole, the jobs."""

    threads: list[Thread]
    done: list[str]
    queue: list[str]
    messages: list[store.PreparedMessage]
    version: datetime
    versions: dict[str, str] | None = None  # a resync's listed thread historyIds

    @classmethod
    async def build(cls, page: Page[Thread], ids: list[str], version: datetime, *,
                    summaries: bool = True, versions: dict[str, str] | None = None) -> PageWork:
        wanted = set(ids)
        threads = [t for t in page.items if t.id in wanted] if summaries else []
        whole = [t for t in threads if _whole(t)]
        done = {t.id for t in whole}
        return cls(threads=threads, done=sorted(done),
                   queue=[i for i in dict.fromkeys(ids) if i not in done],
                   messages=await store.prepare_messages(
                       [t.latest_message for t in whole if t.latest_message is not None]),
                   version=version, versions=versions)


def _whole(thread: Thread) -> bool:
    """A thread whose only message came with the listing, body included
    (latest_draft_or_message): nothing left to fetch."""
    latest = thread.latest_message
    return (latest is not None and thread.message_ids == (latest.id,)
            and latest.body is not None and latest.thread_id == thread.id)


def _phase(cur: Cursor) -> str:
    return "main pass" if cur.in_main else f"changes round {cur.rounds + 1}"


def _advance(cfg: asyncpg.Record, cur: Cursor, page: Page[Thread], *,
             feed: bool = False) -> tuple[Cursor, bool, list[str]]:
    """The cursor after `page`, whether discovery is over with it, and the threads to queue:
    every thread of the main pass; in a round, those with a change the last listing had not
    (a thread listed again with the same latest message is already queued)."""
    cutoff: datetime = cfg["discovery_cutoff"]
    changes = [(t.id, (t.latest_message_date or cutoff).timestamp()) for t in page.items]
    if cur.in_main:
        recent = set() if feed else {c for c in changes
                                     if c[1] >= (cutoff - SKEW).timestamp()}
        ids = [c[0] for c in changes]
        nxt = replace(cur, seen=cur.seen | recent)
    else:
        new = [c for c in changes if c not in cur.prev]
        ids = [c[0] for c in new]
        nxt = replace(cur, seen=cur.seen | set(changes), fresh=cur.fresh + len(new))
    nxt = replace(nxt, token=page.next_page_token, pages=cur.pages + 1)
    if page.next_page_token is not None:
        return nxt, False, ids
    now = datetime.now(cutoff.tzinfo)
    if cur.in_main:
        until = cfg["backfill_until"]
        if feed:
            return nxt, True, ids  # a change feed carries what moves from here on
        if until is not None and until <= cutoff:
            return nxt, True, ids  # a closed range in the past: nothing can move into it
        return replace(nxt, since=cutoff - SKEW, round_started=now, prev=nxt.seen,
                       seen=frozenset(), fresh=0), False, ids
    rounds = cur.rounds + 1
    if nxt.fresh == 0 or rounds >= MAX_CHANGE_ROUNDS:
        return replace(nxt, rounds=rounds), True, ids
    assert cur.round_started is not None
    return replace(nxt, since=cur.round_started - SKEW, rounds=rounds, round_started=now,
                   prev=nxt.seen, seen=frozenset(), fresh=0), False, ids


def _check_range(since: datetime | None, until: datetime | None) -> None:
    if since is None:
        raise GiveUp("backfill range has no start")
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
