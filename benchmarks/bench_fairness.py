"""Fair across inboxes: small backfills queued behind a big one (issue #19's fairness check).

    python benchmarks/bench_fairness.py [--big 4000] [--small 8] [--small-threads 40]
                                        [--rate 20] [--workers 2]

A sandbox with one big mailbox and N small ones, every grant limited to R requests/s (Nylas
limits per grant). One `python -m nova.backfill` and W `python -m nova.threads` processes. The
big inbox's backfill is queued first; once its thread sync is under way, the N small inboxes'
backfills are queued. Printed: each small backfill's time from queueing to `completed`, the
requests/s the provider answered while the small ones ran against the sum of the busy grants'
limits, and, as the baseline measured in the same run, one small inbox's backfill alone.
Every inbox is checked exact (threads stored = threads in its sandbox mailbox).
Goal: every small backfill completed within 30 s, the provider answering at least half of the
busy grants' summed limits. NOVA_BENCH_DATABASE_URL picks the Postgres server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402
from bench_backfill import spawn, wait_started  # noqa: E402

from nova import db  # noqa: E402
from nova.completion import CompletionMonitor  # noqa: E402
from nova.config import load_settings  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent
QUEUE = "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')"
STATUS = ("SELECT backfill_status, extract(epoch FROM backfill_completed_at)"
          " FROM flux_inbox_configurations WHERE id = $1")


def answered(sb: SandboxNylas) -> int:
    stats = sb.get_stats()
    return sum(stats["requests"].values()) - int(stats["statuses"].get("429", 0))


def by_grant(sb: SandboxNylas) -> dict[str, int]:
    return {g: sum(c.values()) for g, c in sb.get_stats()["by_grant"].items()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    grants = 1 + args.small + 1  # the big one, the small ones, one more small one alone
    with bench_database() as url, SandboxNylas(
            threads=args.big, other_threads=args.small_threads, grants=grants, seed=1,
            api_key=API_KEY, rate_limit=args.rate, anchor=int(time.time()) - 3600) as sb:
        env = {**os.environ, "NOVA_DATABASE_URL": url, "NYLAS_API_KEY": API_KEY,
               "NYLAS_API_URI": sb.base_url, "NOVA_PROVIDER_RATE_LIMIT": str(args.rate),
               "NOVA_PROVIDER_RATE_CEILING": str(args.rate),  # told the limit: fixed pacing
               "NOVA_PROVIDER_BURST": str(max(1.0, args.rate / 2)),
               "BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "info",
               "PYTHONPATH": str(ROOT)}
        log = Path(tempfile.mkdtemp(prefix="nova-bench-")) / "procs.log"
        log.write_text("")
        procs = [spawn("nova.backfill", env, log)]
        procs += [spawn("nova.threads", env, log) for _ in range(args.workers)]
        pool = await db.create_pool(url, min_size=1, max_size=2)
        monitor = CompletionMonitor(load_settings(database_url=url), pool=pool)
        ids = list(sb.grant_ids)
        inboxes = [await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                                       " ($1, $2) RETURNING id", g, f"{g}@example.com")
                   for g in ids]

        async def until_done(configs: list[Any], limit: float) -> dict[Any, float]:
            done: dict[Any, float] = {}
            deadline = time.monotonic() + limit
            while len(done) < len(configs):
                if time.monotonic() > deadline:
                    raise SystemExit(f"backfills not completed in {limit:.0f}s; see {log}")
                await asyncio.sleep(0.05)
                await monitor.check()
                for config in configs:
                    status, at = await pool.fetchrow(STATUS, config)
                    if status == "completed" and config not in done:
                        done[config] = float(at)
                    elif status == "failed":
                        raise SystemExit(f"backfill {config} failed; see {log}")
                for proc in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"a process exited {proc.returncode}; see {log}")
            return done

        try:
            await wait_started(log, len(procs))
            # Baseline: one small inbox alone.
            started = time.time()
            alone = await pool.fetchval(QUEUE, inboxes[-1])
            alone_s = (await until_done([alone], 120))[alone] - started
            # The big one first; the small ones once its thread sync is under way.
            big = await pool.fetchval(QUEUE, inboxes[0])
            synced = ("SELECT count(*) FROM queued_threads"
                      " WHERE config_id = $1 AND status = 'completed'")
            while True:
                if await pool.fetchval(synced, big) >= args.head_start:
                    break
                await asyncio.sleep(0.05)
            before, grants_before = answered(sb), by_grant(sb)
            started = time.time()
            smalls = [await pool.fetchval(QUEUE, inbox) for inbox in inboxes[1:-1]]
            starts = {c: time.time() for c in smalls}
            done = await until_done(smalls, 600)
            window = max(done.values()) - started
            during = answered(sb) - before
            grants_after = by_grant(sb)
            big_rate = (grants_after.get(ids[0], 0) - grants_before.get(ids[0], 0)) / window
            small_requests = sum(grants_after.get(g, 0) - grants_before.get(g, 0)
                                 for g in ids[1:-1])
            small_s = sorted(done[c] - starts[c] for c in smalls)
            await until_done([big], 3600)
            exact = []
            for grant, inbox in zip(ids, inboxes, strict=True):
                stored = await pool.fetchval("SELECT count(*) FROM flux_email_threads"
                                             " WHERE inbox_id = $1", inbox)
                exact.append(stored == sb.mailbox.grants[grant].n_threads)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            await pool.close()
        return {"alone": alone_s, "small": small_s, "window": window, "big_rate": big_rate,
                "small_requests": small_requests,
                "rate": during / window, "busy_limit": (1 + args.small) * args.rate,
                "exact": all(exact), "inboxes": len(exact)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--big", type=int, default=4000)
    ap.add_argument("--small", type=int, default=8)
    ap.add_argument("--small-threads", type=int, default=40)
    ap.add_argument("--rate", type=float, default=20.0, help="the sandbox's limit per grant")
    ap.add_argument("--workers", type=int, default=2, help="python -m nova.threads processes")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--head-start", type=int, default=200,
                    help="threads of the big inbox synced before the small ones are queued")
    args = ap.parse_args()
    with bench_database() as url:
        version = server_version(url)
    print(f"PostgreSQL {version}; big inbox {args.big} threads, {args.small} small inboxes of"
          f" {args.small_threads}, {args.rate:g} req/s per grant, {args.workers} thread"
          f" workers, BATCH_SIZE {args.batch_size}")
    r = asyncio.run(run(args))
    small = r["small"]
    print(f"one small backfill alone (baseline): {r['alone']:.1f} s")
    print(f"small backfills behind the big one: min {small[0]:.1f} s, median"
          f" {small[len(small) // 2]:.1f} s, max {small[-1]:.1f} s"
          f" ({small[-1] / r['alone']:.1f}x the baseline; goal: every one within 30 s)")
    share = r["rate"] / r["busy_limit"]
    print(f"provider answered {r['rate']:.1f} req/s while they ran, {share:.0%}"
          f" of the busy grants' summed limit {r['busy_limit']:g} req/s (goal: at least 50%)")
    print(f"  of it the big inbox's grant {r['big_rate']:.1f} req/s (its limit {args.rate:g});"
          f" the small inboxes needed {r['small_requests']} requests in all over"
          f" {r['window']:.1f} s")
    print(f"all {r['inboxes']} inboxes exact: {r['exact']}")
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
