"""A Gmail backfill against the per-user quota: threads/s beside the quota's ceiling.

The Gmail sandbox enforces QUOTA units per user per sliding minute (default 15,000, Google's
published per-user limit) with Google's method costs, and refuses the excess (429 or 403
userRateLimitExceeded, chosen at random, as Google's errors vary). Nova runs on its default
settings (GMAIL_QUOTA_UNITS_PER_MINUTE told the same quota) as separate processes:
`python -m nova.backfill`, WORKERS x `python -m nova.threads`, `python -m nova.completion`.

The ceiling is what the quota allows when every unit goes to threads.get, the one call per
thread: QUOTA / 60 units/s / threads.get's cost (10) = 25 threads/s at 15,000. Printed: wall
time (backfill queued -> last thread synced), threads/s and its share of the ceiling, units
spent per thread, the busiest sliding minute of units as the sandbox charged them, and quota
refusals. Goals: >= 90% of the ceiling, no refusals.

    python benchmarks/bench_gmail.py [--threads 5000] [--quota 15000] [--workers 2]
NOVA_BENCH_DATABASE_URL picks the Postgres server (else an embedded one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from cryptography.fernet import Fernet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db  # noqa: E402
from nova.credentials import authorized_user_from_info, save_credentials  # noqa: E402
from nova.providers.gmail import DEFAULT_COSTS  # noqa: E402
from nova.sandbox.gmail import SandboxGmail  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


async def run(url: str, args: argparse.Namespace) -> None:
    key = Fernet.generate_key()
    with SandboxGmail(threads=args.threads, seed=1, users=1, quota_per_minute=args.quota,
                      quota_error="mixed", anchor=int(time.time()) - 3600) as sb:
        email = sb.users[0]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NOVA_", "NYLAS_", "GMAIL_"))}
        env |= {"NOVA_DATABASE_URL": url, "NOVA_CREDENTIALS_KEY": key.decode(),
                "GMAIL_API_URI": sb.base_url, "GMAIL_TOKEN_URI": sb.token_uri,
                "GMAIL_QUOTA_UNITS_PER_MINUTE": str(args.quota),
                "LOG_LEVEL": "warning"}
        log = Path(tempfile.mkdtemp(prefix="nova-bench-")) / "gmail.log"
        modules = ["nova.backfill", *["nova.threads"] * args.workers, "nova.completion"]
        # Started before anything is measured: blocking here costs the run nothing.
        procs = [subprocess.Popen([sys.executable, "-m", m], env=env, cwd=ROOT,  # noqa: ASYNC220
                                  stdout=log.open("ab"), stderr=subprocess.STDOUT)
                 for m in modules]
        pool = await db.create_pool(url, min_size=1, max_size=2)
        minute: deque[tuple[float, int]] = deque()
        busiest = 0
        try:
            await asyncio.sleep(2)  # the processes start and connect
            user = authorized_user_from_info({**sb.credentials(email), "token_uri": sb.token_uri})
            async with pool.acquire() as conn, conn.transaction():
                inbox = await conn.fetchval(
                    "INSERT INTO flux_inboxes (provider, grant_id, email)"
                    " VALUES ('gmail', $1, $1) RETURNING id", email)
                await save_credentials(conn, inbox, user, Fernet(key))
            sb.reset_stats()
            started = time.time()
            config = await pool.fetchval(
                "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')", inbox)
            while await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                                      " WHERE id = $1", config) != "completed":
                await asyncio.sleep(0.25)
                now, units = time.time(), units_of(sb, email)
                minute.append((now, units))
                while minute and minute[0][0] < now - 60:
                    minute.popleft()
                busiest = max(busiest, units - minute[0][1])
                for proc in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"a processor exited; see {log}")
            ended = float(await pool.fetchval(
                "SELECT extract(epoch FROM max(processed_at)) FROM queued_threads"))
            threads = int(await pool.fetchval(
                "SELECT count(*) FROM queued_threads WHERE status = 'completed'"))
            failed = int(await pool.fetchval(
                "SELECT count(*) FROM queued_threads WHERE status = 'failed'"))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            await pool.close()
        stats = sb.get_stats()
        refused = sum(stats["refusals"].get(email, {}).values())
        units = stats["units_total"].get(email, 0)
        seconds = ended - started
        ceiling = args.quota / 60 / DEFAULT_COSTS["threads.get"]
        rate = threads / seconds
        print(f"{'seconds':>8} {'threads':>8} {'failed':>6} {'threads/s':>9} {'ceiling':>8}"
              f" {'share':>6} {'units/thr':>9} {'max units/min':>13} {'refused':>7}")
        print(f"{seconds:>8.1f} {threads:>8} {failed:>6} {rate:>9.2f} {ceiling:>8.2f}"
              f" {rate / ceiling:>6.1%} {units / max(threads, 1):>9.2f} {busiest:>13}"
              f" {refused:>7}")
        print(f"ratio to the quota's ceiling: {rate / ceiling:.3f} (goal >= 0.90); busiest"
              f" sliding minute {busiest} of {args.quota} units; {refused} refusals"
              f" (goal 0); log: {log}")


def units_of(sb: SandboxGmail, email: str) -> int:
    return int(sb.get_stats()["units_total"].get(email, 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=5000)
    ap.add_argument("--quota", type=int, default=15_000, help="units per user per minute")
    ap.add_argument("--workers", type=int, default=2, help="python -m nova.threads processes")
    args = ap.parse_args()
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}; Gmail sandbox mailbox {args.threads} threads,"
              f" quota {args.quota} units/user/minute (sliding), threads.get"
              f" {DEFAULT_COSTS['threads.get']} units; Nova default settings,"
              f" {args.workers} thread workers")
        asyncio.run(run(url, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
