"""Backfill a sandbox mailbox whose per-grant rate limit is R requests/s, with 1, 2 and 4
thread workers (each a `python -m nova.threads` subprocess, plus one `python -m nova.backfill`).

    python benchmarks/bench_backfill.py [--threads 10000] [--rate 50] [--workers 1,2,4]
                                        [--latency-ms 0] [--batch-size 10]

Nova's budget is set to the sandbox's limit and fixed there (NOVA_PROVIDER_RATE_LIMIT and
NOVA_PROVIDER_RATE_CEILING = R, burst R/2: the pacing itself is measured here; bench_budget.py
measures the learned rate against a limit Nova is not told). For each
worker count it prints threads/s, the achieved request rate and its ratio to R, the 429s the
sandbox sent, the time from queueing the backfill to the first synced thread, and the peak RSS
(VmHWM) of every process. Goal: >= 90% of R with 2+ workers, no 429 beyond a first probe, first
thread within 2 s. NOVA_BENCH_DATABASE_URL picks the Postgres server (else an embedded one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db  # noqa: E402
from nova.completion import CompletionMonitor  # noqa: E402
from nova.config import load_settings  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    workers: int
    seconds: float
    threads: int
    requests: int
    throttled: int
    first_thread: float
    rss_kib: dict[str, int]


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def spawn(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def started_count(log: Path) -> int:
    return log.read_text(errors="replace").count("] started queue=")


async def wait_started(log: Path, count: int, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while await asyncio.to_thread(started_count, log) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"workers did not start; see {log}")
        await asyncio.sleep(0.05)


async def run_once(args: argparse.Namespace, workers: int) -> Result:
    with bench_database() as url, SandboxNylas(
            threads=args.threads, seed=1, api_key=API_KEY, rate_limit=args.rate,
            latency_ms=args.latency_ms, anchor=int(time.time()) - 3600) as sb:
        grant = sb.grant_ids[0]
        env = {**os.environ, "NOVA_DATABASE_URL": url, "NYLAS_API_KEY": API_KEY,
               "NYLAS_API_URI": sb.base_url, "NOVA_PROVIDER_RATE_LIMIT": str(args.rate),
               "NOVA_PROVIDER_RATE_CEILING": str(args.rate),  # told the limit: fixed pacing
               "NOVA_PROVIDER_BURST": str(max(1.0, args.rate / 2)),
               "BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "warning",
               "PYTHONPATH": str(ROOT)}
        log = Path(tempfile.mkdtemp(prefix="nova-bench-")) / "procs.log"
        log.write_text("")
        env_info = {**env, "LOG_LEVEL": "info"}
        procs = {"backfill": spawn("nova.backfill", env_info, log)}
        procs |= {f"threads-{i + 1}": spawn("nova.threads", env_info, log)
                  for i in range(workers)}
        pool = await db.create_pool(url, min_size=1, max_size=2)
        monitor = CompletionMonitor(load_settings(database_url=url), pool=pool)
        try:
            await wait_started(log, len(procs))
            sb.reset_stats()
            inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email)"
                                        " VALUES ($1, 'bench@example.com') RETURNING id", grant)
            started = time.time()
            # The whole mailbox (the year before the anchor), inside the day of grace.
            config = await pool.fetchval(
                "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')", inbox)
            first: float | None = None
            while True:
                await asyncio.sleep(0.05)
                if first is None:
                    at = await pool.fetchval("SELECT extract(epoch FROM min(processed_at))"
                                             " FROM queued_threads WHERE status = 'completed'")
                    first = float(at) - started if at is not None else None
                await monitor.check()
                if await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                                       " WHERE id = $1", config) == "completed":
                    break
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited {proc.returncode}; see {log}")
            last = await pool.fetchval("SELECT extract(epoch FROM max(processed_at))"
                                       " FROM queued_threads")
            seconds = float(last) - started
            threads = await pool.fetchval("SELECT count(*) FROM flux_email_threads")
            rss = {name: peak_rss_kib(proc.pid) for name, proc in procs.items()}
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(30)
            await pool.close()
        stats = sb.get_stats()
        return Result(workers, seconds, threads, sum(stats["requests"].values()),
                      int(stats["statuses"].get("429", 0)), first or 0.0, rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=50.0, help="sandbox per-grant limit R (req/s)")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--latency-ms", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=10)
    args = ap.parse_args()

    with bench_database() as url:
        version = server_version(url)
    print(f"PostgreSQL {version}; sandbox mailbox {args.threads} threads, R = {args.rate:g} req/s"
          f" per grant, latency {args.latency_ms} ms, BATCH_SIZE {args.batch_size}")
    print(f"{'workers':>7} {'threads':>8} {'seconds':>8} {'threads/s':>9} {'req/s':>7}"
          f" {'of R':>6} {'429s':>5} {'first':>7}  peak RSS MiB (backfill, threads...)")
    for n in (int(w) for w in args.workers.split(",")):
        r = asyncio.run(run_once(args, n))
        rate = r.requests / r.seconds
        rss = ", ".join(f"{kib / 1024:.0f}" for kib in r.rss_kib.values())
        print(f"{r.workers:>7} {r.threads:>8} {r.seconds:>8.1f} {r.threads / r.seconds:>9.1f}"
              f" {rate:>7.1f} {rate / args.rate:>6.0%} {r.throttled:>5} {r.first_thread:>6.2f}s"
              f"  {rss}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
