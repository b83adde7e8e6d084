"""The search index step, run by every `python -m nova.threads` process beside its jobs.

A message write only queues its id (the triggers of sql/130_search.sql); this part builds the
queued messages' search rows (`nova_search_index_pending`, up to SEARCH_INDEX_BATCH a
statement, its own short transaction) while batches come back full, then looks again every
SEARCH_INDEX_IDLE_SECONDS. Any number of thread processes may run it: the statement takes a
transaction-level advisory lock, so one batch runs at a time and the others find it taken
(0 rows) and wait for their next look.

Why here and not in the completion monitor, where it ran before: indexing is work in
proportion to the mail arriving (0.47-0.58 ms of database time a message, bench_search.py),
not a periodic look at what is open. During a fleet's backfills it is seconds of database
time a minute, which drowned the monitor's periodic budget (issue #19), and a monitor check
gave it at most a second every COMPLETION_CHECK_INTERVAL_MS, so a burst of mail left the index
behind for as long as the burst lasted. The thread processes are where most mail is written,
every deployment runs them, and their pacing is the mail's.

The log says what it did once a minute at most (`[Search] indexed N message(s) in the last
60s`), not once a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from nova import db
from nova.runtime import MAX_BACKOFF, describe_error

log = logging.getLogger("nova.search")

INDEX = "SELECT nova_search_index_pending($1)"
SEARCH_INDEX_BATCH = 500  # queued rows a statement takes at most
SEARCH_INDEX_IDLE_SECONDS = 1.0  # the next look after a batch that was not full
REPORT_SECONDS = 60.0  # the log line sums this long


class SearchIndexer:
    """Drains the search queue (see the module's docstring) on a pool it shares with its
    process's worker: a batch holds one connection for its statement, no more, so the part
    adds no connection to the process's budget. It never stops its process: an error (the
    database unreachable, a statement failing) is logged and tried again after a bounded
    backoff."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._stopping = asyncio.Event()
        self.indexed = 0  # queued rows taken since start (messages and attachments)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        reported, since, backoff = self.indexed, time.monotonic(), 0.5
        while not self._stopping.is_set():
            try:
                await self.drain()
                delay, backoff = SEARCH_INDEX_IDLE_SECONDS, 0.5
            except Exception as exc:  # the database's (DATABASE_ERRORS) or a statement's
                log.warning("[Search] index step failed (%s); trying again in %.1fs",
                            describe_error(exc), backoff)
                delay, backoff = backoff, min(backoff * 2, MAX_BACKOFF)
            if time.monotonic() - since >= REPORT_SECONDS:
                if self.indexed > reported:
                    log.info("[Search] indexed %d message(s) in the last %.0fs",
                             self.indexed - reported, time.monotonic() - since)
                reported, since = self.indexed, time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def drain(self) -> int:
        """Batches until one comes back short (the queue is empty, or another process holds the
        step); returns the queued rows taken."""
        done = 0
        while not self._stopping.is_set():
            async with db.periodic(self.pool) as conn:
                n = int(await conn.fetchval(INDEX, SEARCH_INDEX_BATCH))
            done += n
            self.indexed += n
            if n < SEARCH_INDEX_BATCH:
                break
        return done
