"""`nova verify` for Nylas inboxes: the listing and the per-page comparison.

Over the window it lists the provider's threads, 200 per page (the Nylas maximum), newest
first. A thread object carries its `message_ids` and its latest message date, so LIST calls are
all it needs: no thread or message is fetched one by one. Every request reserves a slot of the
grant's shared budget (`provider_rate_limits`, nova.ratelimit) and a 429 holds the grant for
every worker, exactly as the processors' requests do.

Only one page is in Python at a time: each page is compared with the database in one
REPEATABLE READ transaction of two statements (the stored rows of that page's threads and
messages) and its verdicts land in the session temp tables of nova.verify_core.

Per thread: `missing` (no live row), `stale` (the stored set of live message ids differs from
the provider's `message_ids`, or `last_message_at` differs from the provider's latest message
date). Per message: `missing` (no live row), `stale` (stored under another thread, or without a
live thread row).

Mail that arrives while verify runs is not drift: threads whose latest message is at or after
the moment verify started (less VERSION_SKEW_SECONDS) are counted apart as "changed during the
run". After the main listing one more listing of those threads catches a thread that got a
reply while the main pass ran (it jumped to the first page, already read); the same technique
as discovery's rounds in nova.backfill.

Measured against the sandbox (tests' `make_sandbox`, default budget 10/s burst 5): 1,000 threads
in 6 requests and 0.4 s; 10,000 in 51 requests and 5 s; 100,000 (238,232 messages) in 501
requests and 60 s, the CLI's resident memory ~72 MB at every size.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from nova.providers import (
    GrantNotFound,
    InvalidApiKey,
    Permanent,
    ProviderError,
    RateLimited,
    Unauthorized,
)
from nova.providers.models import Page, Thread
from nova.verify_core import (
    MAX_RATE_LIMITED_IN_A_ROW,
    MESSAGE_VERDICTS,
    Restart,
    Verification,
    VerifyError,
)

log = logging.getLogger("nova.verify")

PAGE_LIMIT = 200  # the Nylas maximum

_TS = "to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"

# One page of the main listing: each provider thread against its stored row and live messages.
PAGE_THREADS = f"""
WITH p AS (
    SELECT * FROM unnest($2::text[], $3::timestamptz[]) AS p(thread_id, latest)
), pa AS (
    SELECT pm.thread_id, array_agg(pm.message_id ORDER BY pm.message_id) AS ids
    FROM unnest($4::text[], $5::text[]) AS pm(message_id, thread_id)
    GROUP BY pm.thread_id
), r AS (
    SELECT p.thread_id, t.id AS row_id, t.last_message_at
    FROM p JOIN flux_email_threads t
      ON t.inbox_id = $1 AND t.provider_thread_id = p.thread_id AND t.deleted_at IS NULL
), da AS (
    SELECT r.thread_id, array_agg(m.provider_message_id ORDER BY m.provider_message_id) AS ids
    FROM r JOIN flux_email_messages m ON m.thread_id = r.row_id AND m.deleted_at IS NULL
    GROUP BY r.thread_id
), v AS (
    SELECT p.thread_id, p.latest, coalesce(cardinality(pa.ids), 0) AS n,
           r.row_id IS NOT NULL AS stored,
           r.last_message_at IS DISTINCT FROM p.latest AS date_differs,
           coalesce(da.ids, '{{}}') <> coalesce(pa.ids, '{{}}') AS set_differs,
           coalesce(cardinality(da.ids), 0) AS stored_n, r.last_message_at
    FROM p LEFT JOIN pa USING (thread_id) LEFT JOIN r USING (thread_id)
    LEFT JOIN da USING (thread_id)
)
INSERT INTO verify_threads (thread_id, latest, messages, state, detail)
SELECT v.thread_id, v.latest, v.n,
       CASE WHEN v.latest >= $6 THEN 'changed'
            WHEN NOT v.stored THEN 'missing'
            WHEN v.date_differs OR v.set_differs THEN 'stale'
            ELSE 'ok' END,
       CASE WHEN v.stored AND (v.date_differs OR v.set_differs) THEN concat_ws('; ',
            CASE WHEN v.set_differs THEN format('messages: %s live stored, %s at the provider',
                                                v.stored_n, v.n) END,
            CASE WHEN v.date_differs THEN format('last message: %s stored, %s at the provider',
                 coalesce({_TS % 'v.last_message_at'}, 'none'),
                 coalesce({_TS % 'v.latest'}, 'none')) END) END
FROM v
ON CONFLICT (thread_id) DO UPDATE
SET latest = EXCLUDED.latest, messages = EXCLUDED.messages,
    state = CASE WHEN verify_threads.state = 'changed' THEN 'changed' ELSE EXCLUDED.state END,
    detail = EXCLUDED.detail
"""

# The same page's messages.
PAGE_MESSAGES = MESSAGE_VERDICTS.format(
    source="unnest($2::text[], $3::text[])")

# The listing of threads that changed during the run: known to the provider, not compared.
CHANGED_THREADS = """
INSERT INTO verify_threads (thread_id, latest, messages, state)
SELECT t, l, 0, 'changed' FROM unnest($1::text[], $2::timestamptz[]) AS p(t, l)
ON CONFLICT (thread_id) DO UPDATE SET latest = EXCLUDED.latest, state = 'changed'
"""
CHANGED_MESSAGES = """
INSERT INTO verify_messages (message_id, thread_id, state)
SELECT m, t, 'ok' FROM unnest($1::text[], $2::text[]) AS p(m, t)
ON CONFLICT (message_id) DO UPDATE SET thread_id = EXCLUDED.thread_id
"""


@dataclass
class _Listing:
    after: datetime | None
    before: datetime | None


class NylasVerifier(Verification):
    """Lists a Nylas grant's threads page by page and compares each page as it arrives."""

    async def _list_all(self, conn: asyncpg.Connection) -> None:
        r = self.report
        main = _Listing(r.since, r.until)
        await self._listing(conn, main, changed=False)
        # Threads that got mail during the main pass moved to its first page, already read:
        # list what changed since the start (none can move into a range that ended before).
        if r.until is None or r.until > r.changed_after:
            await self._listing(conn, _Listing(r.changed_after, r.until), changed=True)

    async def _listing(self, conn: asyncpg.Connection, listing: _Listing, *,
                       changed: bool) -> None:
        restarted = False
        while True:
            try:
                await self._pages(conn, listing, changed)
                return
            except Restart as exc:
                if restarted:
                    raise VerifyError(f"the provider rejected a page token twice: "
                                      f"{exc.__cause__}") from exc
                log.warning("[Verify] page token rejected (%s): listing again from the first "
                            "page", exc.__cause__)
                restarted = True

    async def _pages(self, conn: asyncpg.Connection, listing: _Listing, changed: bool) -> None:
        # The next page is fetched while this one is compared with the database.
        fetch = asyncio.ensure_future(self._page(listing, None))
        try:
            while True:
                page = await fetch
                self.report.pages += 1
                if page.next_page_token is not None:
                    fetch = asyncio.ensure_future(self._page(listing, page.next_page_token))
                if changed:
                    await self._save_changed(conn, page)
                else:
                    await self._compare(conn, page)
                if self.report.pages % 25 == 0:
                    log.info("[Verify] inbox=%s pages=%d requests=%d", self.inbox.id,
                             self.report.pages, self.requests)
                if page.next_page_token is None:
                    return
        finally:
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)

    async def _page(self, listing: _Listing, token: str | None) -> Page[Thread]:
        """One page, trying again after a 429: the budget holds the grant for its Retry-After,
        so the next try waits by itself (as ProviderProcessor.call does)."""
        limited = 0
        while True:
            try:
                self.requests += 1
                return await self.provider.list_threads_page(
                    self.grant_id, page_token=token, limit=PAGE_LIMIT,
                    received_after=listing.after, received_before=listing.before)
            except RateLimited as exc:
                self.report.rate_limited += 1
                limited += 1
                if limited >= MAX_RATE_LIMITED_IN_A_ROW:
                    raise VerifyError(f"rate limited {limited} times in a row by the provider "
                                      f"(last: {exc}); try again later") from exc
            except InvalidApiKey as exc:
                raise VerifyError(f"the provider refused the API key (NYLAS_API_KEY / "
                                  f"NYLAS_API_URI): {exc}") from exc
            except GrantNotFound as exc:
                raise VerifyError(f"grant {self.grant_id} does not exist at the provider "
                                  f"(deleted): {exc}") from exc
            except Unauthorized as exc:
                raise VerifyError(await self._unauthorized(exc)) from exc
            except Permanent as exc:
                if token is not None and exc.status == 400:
                    raise Restart() from exc
                raise VerifyError(f"the provider refused the listing: {exc!r}") from exc
            except ProviderError as exc:
                raise VerifyError(f"the provider failed: {exc!r}") from exc

    async def _unauthorized(self, error: Unauthorized) -> str:
        """What a 401/403 means, asked of the grant (as nova.ratelimit confirms it)."""
        head = f"the provider answered {error.status} ({error.error_type or 'unauthorized'})"
        try:
            grant = await self.provider.get_grant(self.grant_id)
        except (Unauthorized, InvalidApiKey):
            return f"{head}: the API key is refused (check NYLAS_API_KEY / NYLAS_API_URI)"
        except GrantNotFound:
            return f"{head}: grant {self.grant_id} no longer exists (deleted)"
        except ProviderError as exc:
            return f"{head}; the grant check failed too ({exc}): try again later"
        if grant.is_valid:
            return f"{head} although grant {self.grant_id} is valid: try again later"
        return (f"{head}: grant {self.grant_id} is {grant.status or 'not valid'}; the user must "
                "re-authenticate")

    # ------------------------------------------------------------------ comparison
    async def _compare(self, conn: asyncpg.Connection, page: Page[Thread]) -> None:
        threads: dict[str, datetime | None] = {}
        messages: dict[str, str] = {}
        for t in page.items:
            threads[t.id] = t.latest_message_date
            for mid in t.message_ids:
                messages[mid] = t.id
        if not threads:
            return
        mids, mtids = list(messages), list(messages.values())
        # One snapshot for both statements: the thread and message verdicts agree.
        async with conn.transaction(isolation=self.isolation):
            await conn.execute(PAGE_THREADS, self.inbox.id, list(threads),
                               list(threads.values()), mids, mtids, self.report.changed_after)
            await conn.execute(PAGE_MESSAGES, self.inbox.id, mids, mtids)

    async def _save_changed(self, conn: asyncpg.Connection, page: Page[Thread]) -> None:
        threads = {t.id: t.latest_message_date for t in page.items}
        messages = {mid: t.id for t in page.items for mid in t.message_ids}
        if threads:
            async with conn.transaction():
                await conn.execute(CHANGED_THREADS, list(threads), list(threads.values()))
                await conn.execute(CHANGED_MESSAGES, list(messages), list(messages.values()))
