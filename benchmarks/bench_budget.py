"""A backfill against a grant whose real limit Nova is not told: the learned budget and the
fewest requests per thread, beside the code path before them, in the same run.

The sandbox allows LIMIT requests/s per grant (default 60) and answers the excess with 429s
relayed from the provider, half of them with a Retry-After and half without. Nova runs with
its default settings (NOVA_PROVIDER_RATE_LIMIT 10 is only where the learning starts) and two
`python -m nova.threads` processes, plus `python -m nova.backfill`. The same mailbox is then
backfilled by the code of a baseline revision (default: the last one before the learned
budget, which paced a fixed 10/s and spent a thread GET plus a messages list per thread), from
a git worktree with its own database migrated by that code.

For each it prints: wall time (backfill queued -> completed), threads/s, requests per thread,
the answered request rate after the first 10 s as a share of LIMIT, and 429s as a share of
requests. Goals: >= 0.9 of LIMIT, <= 3% 429s, <= 0.8 requests per thread.

    python benchmarks/bench_budget.py [--threads 2000] [--limit 60] [--baseline REV]
                                      [--no-baseline]
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent
BASELINE = "d105a43"  # pacing at a fixed NOVA_PROVIDER_RATE_LIMIT, 2 requests per thread
SETTLE = 10.0  # the answered rate is measured after this many seconds


@dataclass
class Result:
    label: str
    seconds: float
    threads: int
    requests: int
    limited: int
    answered_after: float  # answered requests/s after SETTLE seconds
    learned: float | None  # the grant's rate in provider_rate_limits at the end


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nova-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                       check=False, capture_output=True)


@contextmanager
def empty_database(server_url: str) -> Iterator[str]:
    name = f"nova_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield db.url_with_database(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def answered(sb: SandboxNylas) -> tuple[int, int]:
    statuses = sb.get_stats()["statuses"]
    total = sum(int(n) for n in statuses.values())
    limited = int(statuses.get("429", 0))
    return total - limited, limited


async def backfill(label: str, url: str, source: Path, args: argparse.Namespace) -> Result:
    with SandboxNylas(threads=args.threads, seed=1, api_key=API_KEY, rate_limit=args.limit,
                      rate_limit_kind="provider", retry_after_share=0.5,
                      anchor=int(time.time()) - 3600) as sb:
        grant = sb.grant_ids[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVA_", "NYLAS_"))}
        env |= {"NOVA_DATABASE_URL": url, "NYLAS_API_KEY": API_KEY,
                "NYLAS_API_URI": sb.base_url, "LOG_LEVEL": "warning",
                "PYTHONPATH": str(source)}
        log = Path(tempfile.mkdtemp(prefix="nova-bench-")) / f"{label}.log"
        # Started once, before anything is measured: blocking here costs the run nothing.
        procs = [subprocess.Popen([sys.executable, "-m", module],  # noqa: ASYNC220
                                  env=env, cwd=source, stdout=log.open("ab"),
                                  stderr=subprocess.STDOUT)
                 for module in ("nova.backfill", "nova.threads", "nova.threads",
                                "nova.completion")]
        pool = await db.create_pool(url, min_size=1, max_size=2)
        try:
            await asyncio.sleep(2)  # the processes start and connect
            sb.reset_stats()
            inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email)"
                                        " VALUES ($1, 'bench@example.com') RETURNING id", grant)
            started = time.time()
            config = await pool.fetchval(
                "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')", inbox)
            settled: tuple[float, int] | None = None
            while await pool.fetchval("SELECT backfill_status FROM flux_inbox_configurations"
                                      " WHERE id = $1", config) != "completed":
                await asyncio.sleep(0.1)
                if settled is None and time.time() - started >= SETTLE:
                    settled = (time.time(), answered(sb)[0])
                for proc in procs:
                    if proc.poll() is not None:
                        raise SystemExit(f"{label}: a processor exited; see {log}")
            # The work ended with the last thread synced (the monitor notices a little later).
            ended = float(await pool.fetchval(
                "SELECT extract(epoch FROM max(processed_at)) FROM queued_threads"))
            threads = int(await pool.fetchval("SELECT count(*) FROM flux_email_threads"))
            try:
                learned = await pool.fetchval("SELECT rate FROM provider_rate_limits"
                                              " WHERE grant_id = $1", grant)
            except asyncpg.UndefinedColumnError:  # a baseline from before the learned rate
                learned = None
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            await pool.close()
        ok, limited = answered(sb)
        after = ((ok - settled[1]) / (ended - settled[0])
                 if settled is not None and ended > settled[0] else float("nan"))
        return Result(label, ended - started, threads, ok + limited, limited, after, learned)


def report(r: Result, limit: float) -> None:
    print(f"{r.label:>9} {r.seconds:>8.1f} {r.threads:>8} {r.threads / r.seconds:>9.1f}"
          f" {r.requests / r.threads:>8.2f} {r.answered_after:>8.1f}"
          f" {r.answered_after / limit:>6.0%} {r.limited:>6} {r.limited / r.requests:>6.1%}"
          f"  {'' if r.learned is None else f'learned {r.learned:.1f}/s'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2000)
    ap.add_argument("--limit", type=float, default=60.0, help="the sandbox's per-grant limit")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the baseline")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()

    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}; sandbox mailbox {args.threads} threads,"
              f" limit {args.limit:g} req/s per grant (429s half with Retry-After), Nova on"
              f" default settings, 2 thread workers")
        print(f"{'code':>9} {'seconds':>8} {'threads':>8} {'threads/s':>9} {'req/thr':>8}"
              f" {'ans/s':>8} {'of lim':>6} {'429s':>6} {'share':>6}"
              f"   (ans/s: answered requests/s after the first {SETTLE:g} s)")
        current = asyncio.run(backfill("current", url, ROOT, args))
        report(current, args.limit)
        if args.no_baseline:
            return 0
        server = db.url_with_database(url, "postgres")
        with worktree(args.baseline) as tree, empty_database(server) as base_url:
            subprocess.run([sys.executable, "-m", "nova.migrate"], cwd=tree, check=True,
                           capture_output=True,
                           env={**os.environ, "NOVA_DATABASE_URL": base_url,
                                "PYTHONPATH": str(tree)})
            baseline = asyncio.run(backfill(args.baseline, base_url, tree, args))
        report(baseline, args.limit)
        print(f"wall time {current.seconds:.1f}s vs {baseline.seconds:.1f}s:"
              f" {baseline.seconds / current.seconds:.1f}x faster; requests per thread"
              f" {current.requests / current.threads:.2f} vs"
              f" {baseline.requests / baseline.threads:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
