"""The processor runtime alone: a no-op job over 20,000 queued messages, next to a raw PGMQ
read-and-delete loop over the same database in the same run.

Both sides do what a job needs at minimum: take the message and delete it in a transaction.
The raw loop reads BATCH messages at a time on one connection and deletes each in its own
transaction (a second raw loop deletes a whole batch in one statement, for reference); the
runtime runs its real machinery (NOTIFY listener, BATCH_SIZE jobs in flight,
heartbeat task, one transaction per job with the delete, a log line per job). Goal: the runtime
reaches at least half the raw rate, so it is never the bottleneck.

    python benchmarks/bench_runtime.py [--messages 20000] [--batch-size 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import ClassVar

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db  # noqa: E402
from nova.config import load_settings  # noqa: E402
from nova.runtime import Job, JobContext, Processor, Worker  # noqa: E402

QUEUE = "thread_sync_jobs"


class NoOp(Processor):
    queue: ClassVar[str] = QUEUE
    component: ClassVar[str] = "Bench"

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        return None


async def fill(pool: asyncpg.Pool, n: int) -> None:
    await pool.execute(
        "SELECT pgmq.send_batch($1, array_agg(jsonb_build_object('n', g)))"
        " FROM generate_series(1, $2) g", QUEUE, n)


async def raw_loop(url: str, batch: int, *, per_message: bool) -> int:
    """Read `batch` at a time; delete each in its own transaction (a job's unit of work), or
    the whole batch in one statement (no per-job transaction at all: an upper bound)."""
    conn = await asyncpg.connect(url)
    done = 0
    try:
        while True:
            rows = await conn.fetch("SELECT msg_id FROM pgmq.read($1, 30, $2)", QUEUE, batch)
            if not rows:
                return done
            ids = [r["msg_id"] for r in rows]
            if per_message:
                for msg_id in ids:
                    async with conn.transaction():
                        await conn.execute("SELECT pgmq.delete($1, $2::bigint)", QUEUE, msg_id)
            else:
                await conn.execute("SELECT pgmq.delete($1, $2::bigint[])", QUEUE, ids)
            done += len(ids)
    finally:
        await conn.close()


async def timed_raw(pool: asyncpg.Pool, url: str, n: int, batch: int,
                    per_message: bool) -> float:
    await fill(pool, n)
    t0 = time.perf_counter()
    done = await raw_loop(url, batch, per_message=per_message)
    elapsed = time.perf_counter() - t0
    assert done == n, done
    return elapsed


async def run(url: str, n: int, batch: int) -> None:
    pool = await db.create_pool(url, min_size=2, max_size=batch + 4)
    try:
        raw_s = await timed_raw(pool, url, n, batch, per_message=True)
        bulk_s = await timed_raw(pool, url, n, batch, per_message=False)

        await fill(pool, n)
        settings = load_settings(batch_size=batch, visibility_timeout=30)
        worker = Worker(NoOp(), settings, pool=pool, database_url=url)
        t0 = time.perf_counter()
        stats = await worker.run(burst=True)
        rt_s = time.perf_counter() - t0
        assert stats.processed == n, stats
        left = await pool.fetchval(f"SELECT count(*) FROM pgmq.q_{QUEUE}")
        assert left == 0, left
    finally:
        await pool.close()
    raw_rate, rt_rate, bulk_rate = n / raw_s, n / rt_s, n / bulk_s
    print(f"raw read+delete loop : {n:,} messages in {raw_s:6.2f}s = {raw_rate:8,.0f} msg/s"
          "  (one transaction per message, as a job has)")
    print(f"raw read+bulk delete : {n:,} messages in {bulk_s:6.2f}s = {bulk_rate:8,.0f} msg/s"
          "  (one statement per batch: no unit of work at all)")
    print(f"runtime, no-op job   : {n:,} jobs     in {rt_s:6.2f}s = {rt_rate:8,.0f} jobs/s"
          f" (BATCH_SIZE={batch})")
    print(f"runtime / raw        : {rt_rate / raw_rate:.2f}  (goal >= 0.50)")
    print(f"runtime / bulk       : {rt_rate / bulk_rate:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    # The per-job log line is formatted and written, as in production, but not to the terminal.
    logging.basicConfig(level=logging.INFO, handlers=[logging.FileHandler("/dev/null")])
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}")
        asyncio.run(run(url, args.messages, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
