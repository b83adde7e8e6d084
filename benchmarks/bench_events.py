"""What the change feed costs: writes with its triggers against writes without, and reads at
two sizes of history.

    python benchmarks/bench_events.py [--runs 400] [--connections 8] [--seconds 5]
                                      [--inboxes 1000] [--history 10000,1000000]

1. Writes. Two databases migrated alike, one with the feed's triggers disabled; the same
   writes alternate between them (in random order each run, so the machine's load falls on
   both alike), on one connection each:
   - a thread sync's write (`nova_write_synced_thread`, a thread of 3 messages of 700
     characters) of a new thread (a thread and 3 messages created: 5 events), the same sync
     again (nothing changes: no event), and again with each message's unread flag flipped
     (3 events);
   - a page of discovery: 200 new threads in one statement (200 events).
   Median ms of each, and on/off.
2. Commits of one inbox one after another. CONNECTIONS connections commit one-event
   transactions (`nova_record_event`) for SECONDS: all of one inbox, then each of its own;
   commits/s of each. The head's lock is held from the numbering to the end of the commit.
3. Reads. One database with HISTORY events spread over INBOXES inboxes (loaded with their
   positions); a consumer acknowledged everything but 10 inboxes' last events. Median ms of
   `nova_events_unread` and of `nova_events_read(consumer, 100)`, per history size: their
   cost follows the inboxes with unread events, not the events kept.

NOVA_BENCH_DATABASE_URL picks the server (else an embedded one).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db  # noqa: E402

TRIGGERS = [("flux_email_messages", "nova_events_message_insert"),
            ("flux_email_messages", "nova_events_message_update"),
            ("flux_email_threads", "nova_events_thread_insert"),
            ("flux_email_threads", "nova_events_thread_update"),
            ("nova_events", "nova_events_number")]
QUEUED = """
INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id, status, queue_msg_id)
VALUES ($1, $2, $3, 'processing', 1)
ON CONFLICT (config_id, provider_thread_id) DO UPDATE SET status = 'processing'
RETURNING id
"""
WRITE = "SELECT nova_write_synced_thread($1, $2, $3::jsonb, $4, $5, $6, $7)"
PAGE = """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id, subject)
SELECT $1, $2 || g, 'page' FROM generate_series(1, 200) g
"""


def messages(thread: str, flip: bool = False) -> list[dict[str, Any]]:
    out = []
    for k in range(3):
        body = f"<div><p>Hi,</p><p>Message {k}. " + "Some text. " * 60 + "</p></div>"
        out.append({
            "provider_message_id": f"{thread}-{k}", "provider_thread_id": thread,
            "subject": "Re: x", "snippet": body[:100],
            "from_addresses": [{"email": "me@example.com", "name": "Me"}],
            "to_addresses": [{"email": "you@example.com", "name": "You"}],
            "cc_addresses": [], "bcc_addresses": [], "reply_to": [],
            "sent_at": datetime.fromtimestamp(1_700_000_000 + k, UTC).isoformat(),
            "body_html": body, "body_text": body, "body_cleaned": None, "folders": ["INBOX"],
            "unread": (k == 2) != flip, "starred": False, "has_attachments": False,
            "headers": None, "raw": {"id": k}, "attachments": []})
    return out


class Side:
    def __init__(self, url: str, feed: bool) -> None:
        self.url, self.feed = url, feed
        self.times: dict[str, list[float]] = {}

    async def open(self) -> None:
        self.pool = await db.create_pool(self.url, min_size=1, max_size=1)
        if not self.feed:
            for table, trigger in TRIGGERS:
                await self.pool.execute(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
        self.inbox = await self.pool.fetchval(
            "INSERT INTO flux_inboxes (grant_id, email) VALUES ('g', 'g@example.com')"
            " RETURNING id")
        self.config = await self.pool.fetchval("SELECT queue_inbox_backfill($1)", self.inbox)

    async def run(self, n: int, keep: bool) -> None:
        thread = f"t{n}"
        async with self.pool.acquire() as conn:
            for phase, rows in (("new", messages(thread)), ("same", messages(thread)),
                                ("flip", messages(thread, True))):
                queued = await conn.fetchval(QUEUED, self.config, self.inbox, thread)
                started = time.perf_counter()
                async with conn.transaction():
                    assert await conn.fetchval(WRITE, self.inbox, thread, rows,
                                               [r["provider_message_id"] for r in rows],
                                               datetime.now(UTC), queued, 1)
                self._note(phase, started, keep)
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(PAGE, self.inbox, f"p{n}-")
            self._note("page", started, keep)

    def _note(self, phase: str, started: float, keep: bool) -> None:
        if keep:
            self.times.setdefault(phase, []).append((time.perf_counter() - started) * 1000)


async def writes(runs: int) -> None:
    with bench_database() as on_url, bench_database() as off_url:
        sides = [Side(on_url, True), Side(off_url, False)]
        for side in sides:
            await side.open()
        try:
            for n in range(runs):
                for side in random.sample(sides, 2):
                    await side.run(n, keep=n >= 20)
            events = await sides[0].pool.fetchval("SELECT count(*) FROM nova_events")
        finally:
            for side in sides:
                await side.pool.close()
    on, off = sides
    print(f"writes: median ms of runs 21-{runs}, feed on / off ({events:,} events written)")
    labels = {"new": "thread sync, new thread (5 events)", "same": "thread sync, no change",
              "flip": "thread sync, 3 flags changed (3 events)",
              "page": "discovery page, 200 new threads"}
    for phase, label in labels.items():
        a, b = statistics.median(on.times[phase]), statistics.median(off.times[phase])
        print(f"  {label:<42} {b:7.3f} {a:7.3f}  x{a / b:4.2f}  (+{a - b:.3f} ms)")


async def _commit_loop(pool: Any, inbox: uuid.UUID, stop_at: float) -> int:
    done = 0
    async with pool.acquire() as conn:
        while time.monotonic() < stop_at:
            await conn.execute("SELECT nova_record_event($1, 'message.updated', 'x', NULL,"
                               " NULL, '{}')", inbox)
            done += 1
    return done


async def commits(connections: int, seconds: float) -> None:
    with bench_database() as url:
        pool = await db.create_pool(url, min_size=connections, max_size=connections)
        try:
            print(f"commits/s of one-event transactions, {connections} connections, "
                  f"{seconds:g} s each")
            for label, shared in (("one inbox", True), ("an inbox each", False)):
                one = uuid.uuid4()
                stop_at = time.monotonic() + seconds
                done = await asyncio.gather(*(
                    _commit_loop(pool, one if shared else uuid.uuid4(), stop_at)
                    for _ in range(connections)))
                print(f"  {label:<14} {sum(done) / seconds:8.0f}")
        finally:
            await pool.close()


LOAD = """
INSERT INTO nova_events (inbox_id, position, kind, object_id)
SELECT i.id, p, 'message.updated', p::text
FROM (SELECT id, row_number() OVER (ORDER BY id) AS k FROM bench_inboxes) i,
     generate_series(1, $1) p
"""


async def reads(inboxes: int, sizes: list[int], reps: int = 50) -> None:
    print(f"reads: median ms of {reps}, {inboxes:,} inboxes, a consumer 10 inboxes behind")
    print(f"  {'events kept':>12} {'unread':>8} {'read 100':>9}")
    for size in sizes:
        per_inbox = max(1, size // inboxes)
        with bench_database() as url:
            pool = await db.create_pool(url, min_size=1, max_size=1)
            try:
                await pool.execute("CREATE TABLE bench_inboxes AS SELECT gen_random_uuid() AS id"
                                   " FROM generate_series(1, $1)", inboxes)
                await pool.execute(LOAD, per_inbox)
                await pool.execute("INSERT INTO nova_event_heads (inbox_id, position, oldest_at)"
                                   " SELECT id, $1, now() FROM bench_inboxes", per_inbox)
                await pool.execute("INSERT INTO nova_event_cursors (consumer, inbox_id, position)"
                                   " SELECT 'c', id, $1 FROM bench_inboxes", per_inbox)
                await pool.execute("UPDATE nova_event_cursors SET position = position - 1"
                                   " WHERE inbox_id IN (SELECT id FROM bench_inboxes LIMIT 10)")
                await pool.execute("VACUUM ANALYZE nova_events")
                await pool.execute("ANALYZE")
                times: dict[str, list[float]] = {"unread": [], "read": []}
                for _ in range(reps):
                    for label, query in (("unread", "SELECT * FROM nova_events_unread('c')"),
                                         ("read", "SELECT * FROM nova_events_read('c', 100)")):
                        started = time.perf_counter()
                        rows = await pool.fetch(query)
                        times[label].append((time.perf_counter() - started) * 1000)
                        assert len(rows) == 10, (label, len(rows))
                total = await pool.fetchval("SELECT count(*) FROM nova_events")
            finally:
                await pool.close()
        print(f"  {total:>12,} {statistics.median(times['unread']):8.3f}"
              f" {statistics.median(times['read']):9.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--inboxes", type=int, default=1000)
    ap.add_argument("--history", default="10000,1000000")
    args = ap.parse_args()
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}")
    asyncio.run(writes(args.runs))
    asyncio.run(commits(args.connections, args.seconds))
    asyncio.run(reads(args.inboxes, [int(x) for x in args.history.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
