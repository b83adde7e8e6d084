"""get_sync_progress against COUNT(*) ... GROUP BY status, as one configuration grows.

Fills one configuration with queued_threads (through the real counter triggers, in batches) up
to --rows (default 1,000,000) and, at each checkpoint size, times both ways of answering "how far
is this backfill": the counters (get_sync_progress) and a scan (COUNT(*) GROUP BY status).
Prints median and p95 of each, and their ratio. Goal: get_sync_progress under 5 ms and flat.

    python benchmarks/bench_sync_progress.py [--rows 1000000] [--repeat 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

PROGRESS = "SELECT * FROM get_sync_progress(%s)"
SCAN = "SELECT status, count(*) FROM queued_threads WHERE config_id = %s GROUP BY status"


def timed_ms(conn: psycopg.Connection, query: str, arg: object, repeat: int) -> list[float]:
    conn.execute(query, (arg,)).fetchall()  # warm the plan and the cache
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        conn.execute(query, (arg,)).fetchall()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def p95(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.95) - 1]


def fill(conn: psycopg.Connection, config_id: object, inbox_id: object, start: int,
         stop: int) -> None:
    # A realistic mid-backfill mix: 60% completed, 25% queued, 10% processing, 5% failed.
    conn.execute(
        """
        INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id, status, message_count)
        SELECT %(c)s, %(i)s, 'thread-' || g,
               CASE WHEN g %% 20 < 12 THEN 'completed' WHEN g %% 20 < 17 THEN 'queued'
                    WHEN g %% 20 < 19 THEN 'processing' ELSE 'failed' END,
               1 + g %% 7
        FROM generate_series(%(a)s, %(b)s - 1) g
        """,
        {"c": config_id, "i": inbox_id, "a": start, "b": stop},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    checkpoints = sorted({n for n in (1_000, 10_000, 100_000, args.rows) if n <= args.rows})

    with bench_database() as url, psycopg.connect(url, autocommit=True) as conn:
        print(f"PostgreSQL {server_version(url)}; one configuration filled to {args.rows:,} rows")
        inbox_id = conn.execute(
            "INSERT INTO flux_inboxes (grant_id, email) VALUES ('bench', 'bench@example.com')"
            " RETURNING id").fetchone()[0]
        config_id = conn.execute("SELECT queue_inbox_backfill(%s)", (inbox_id,)).fetchone()[0]
        conn.execute("SELECT transition_to_thread_sync(%s)", (config_id,))

        print(f"{'rows':>10} | {'progress p50':>12} {'p95':>7} | {'COUNT(*) p50':>12} {'p95':>8}"
              f" | {'scan/progress':>13} | fill s")
        filled = 0
        for target in checkpoints:
            t0 = time.perf_counter()
            while filled < target:
                step = min(100_000, target - filled)
                fill(conn, config_id, inbox_id, filled, filled + step)
                filled += step
            conn.execute("VACUUM ANALYZE queued_threads")
            fill_s = time.perf_counter() - t0
            prog = timed_ms(conn, PROGRESS, config_id, args.repeat)
            scan = timed_ms(conn, SCAN, config_id, max(5, args.repeat // 5))
            print(f"{target:>10,} | {statistics.median(prog):>10.3f}ms {p95(prog):>5.2f}ms"
                  f" | {statistics.median(scan):>10.2f}ms {p95(scan):>6.1f}ms"
                  f" | {statistics.median(scan) / statistics.median(prog):>12.0f}x | {fill_s:.1f}")

        # The counters must agree with the scan, or the speed is worthless.
        real = dict(conn.execute(SCAN, (config_id,)).fetchall())
        prog_row = conn.execute(PROGRESS, (config_id,)).fetchone()
        cols = [d.name for d in conn.execute(PROGRESS, (config_id,)).description]
        p = dict(zip(cols, prog_row, strict=True))
        agree = (p["threads_completed"] == real.get("completed", 0)
                 and p["threads_pending"] == real.get("queued", 0)
                 and p["threads_processing"] == real.get("processing", 0)
                 and p["threads_failed"] == real.get("failed", 0)
                 and p["threads_queued"] == sum(real.values()))
        print(f"counters agree with COUNT(*): {agree}  ({p['threads_queued']:,} threads,"
              f" {p['percent_complete']}% complete)")
        return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
