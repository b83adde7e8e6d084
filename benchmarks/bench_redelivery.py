"""How long a SIGKILLed worker's jobs wait before they run in another worker.

Each round: worker process A reads N jobs (a processor that holds its first attempt of a job
for an hour), an idle worker process B waits beside it, A is SIGKILLed (nothing released,
nothing logged: as the OOM killer or a chaos run would), and the time from the kill to each
job's start in B is measured with the database's clock. Every setting is Nova's default except
the database: the figure is what a deployment gets without tuning. The bound is
VISIBILITY_TIMEOUT (the lease A renewed last, at most that long ago) plus B's read.

    python benchmarks/bench_redelivery.py [--jobs 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova.config import Settings, load_settings  # noqa: E402
from nova.runtime import Job, JobContext, Processor, Worker, run_parts  # noqa: E402

QUEUE = "thread_sync_jobs"
STARTS = """
CREATE TABLE IF NOT EXISTS bench_starts (
    msg_id bigint NOT NULL, read_ct int NOT NULL, pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


class Hold(Processor):
    """Notes each start; holds a job's first attempt for an hour, finishes later ones at once."""

    queue: ClassVar[str] = QUEUE
    component: ClassVar[str] = "Bench"

    async def setup(self, worker: Worker) -> None:
        print("READY", flush=True)

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        await ctx.pool.execute("INSERT INTO bench_starts (msg_id, read_ct, pid)"
                               " VALUES ($1, $2, $3)", job.msg_id, job.read_ct, os.getpid())
        if job.read_ct == 1:
            await asyncio.sleep(3600)
        return None


def default_settings() -> Settings:
    """Nova's defaults: no .env, no NOVA_* or seed variables (the parent strips them)."""
    return load_settings(_env_file=None)


def worker_main(url: str) -> int:
    from nova.logs import setup_logging

    settings = default_settings()
    setup_logging("info")
    return asyncio.run(run_parts([Worker(Hold(), settings, database_url=url)]))


def child_env() -> dict[str, str]:
    names = set()
    for info in Settings.model_fields.values():
        alias: Any = info.validation_alias
        names.update(str(c).upper() for c in getattr(alias, "choices", [alias]) if c)
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


def spawn(url: str, log_dir: Path, name: str) -> subprocess.Popen[str]:
    log = (log_dir / f"{name}.log").open("w")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", url], env=child_env(),
                            cwd=log_dir, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        raise RuntimeError(f"worker {name} did not start; see {log.name}")
    return proc


async def wait_rows(pool: asyncpg.Pool, query: str, args: tuple[Any, ...], want: int,
                    within: float) -> None:
    deadline = time.monotonic() + within
    while await pool.fetchval(query, *args) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {query} {args} < {want}")
        await asyncio.sleep(0.01)


async def one_round(pool: asyncpg.Pool, url: str, n: int, log_dir: Path, rnd: int,
                    rng: random.Random, vt: int) -> list[float]:
    ids = [r[0] for r in await pool.fetch(
        "SELECT * FROM pgmq.send_batch($1, (SELECT array_agg(jsonb_build_object('round', $2::int))"
        " FROM generate_series(1, $3)))", QUEUE, rnd, n)]
    started = "SELECT count(*) FROM bench_starts WHERE msg_id = ANY($1) AND pid = $2"
    a = spawn(url, log_dir, f"round{rnd}-a")
    b = None
    try:
        await wait_rows(pool, started, (ids, a.pid), n, 60)
        b = spawn(url, log_dir, f"round{rnd}-b")  # idle: every job is A's
        # kill at a random point of A's heartbeat period (it renews every third of vt)
        await asyncio.sleep(0.5 + rng.uniform(0, vt / 3))
        killed_at = await pool.fetchval("SELECT clock_timestamp()")
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        await wait_rows(pool, started, (ids, b.pid), n, 10 * vt + 60)
        rows = await pool.fetch("SELECT at FROM bench_starts WHERE msg_id = ANY($1)"
                                " AND pid = $2", ids, b.pid)
        await wait_rows(pool, f"SELECT count(*) = 0 FROM pgmq.q_{QUEUE}"
                              " WHERE msg_id = ANY($1)", (ids,), 1, 60)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
    return sorted((r["at"] - killed_at).total_seconds() for r in rows)


def spread(values: list[float]) -> str:
    return (f"min {min(values):5.2f}s  median {statistics.median(values):5.2f}s  "
            f"max {max(values):5.2f}s")


async def run(url: str, n: int, rounds: int) -> None:
    settings = default_settings()
    vt = settings.visibility_timeout
    print(f"defaults: VISIBILITY_TIMEOUT={vt}s (heartbeat every {vt / 3:.1f}s) "
          f"POLL_INTERVAL_MS={settings.poll_interval_ms} BATCH_SIZE={settings.batch_size}")
    if n > settings.batch_size:
        raise SystemExit(f"--jobs {n} > BATCH_SIZE {settings.batch_size}: A could not hold them")
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    rng = random.Random(1)
    firsts, lasts, every = [], [], []
    try:
        await pool.execute(STARTS)
        with tempfile.TemporaryDirectory(prefix="nova-bench-redelivery-") as tmp:
            for rnd in range(1, rounds + 1):
                latencies = await one_round(pool, url, n, Path(tmp), rnd, rng, vt)
                firsts.append(latencies[0])
                lasts.append(latencies[-1])
                every += latencies
                print(f"round {rnd}: SIGKILL -> first of {n} jobs running in B "
                      f"{latencies[0]:5.2f}s, all {n} {latencies[-1]:5.2f}s")
    finally:
        await pool.close()
    for label, values in ((f"SIGKILL -> first job running elsewhere ({rounds} rounds)", firsts),
                          (f"SIGKILL -> all {n} jobs running elsewhere", lasts),
                          (f"SIGKILL -> each job ({len(every)} jobs)", every)):
        print(f"{label:<48}: {spread(values)}")
    print(f"bound: VISIBILITY_TIMEOUT ({vt}s) + a read; goal < 15s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10, help="in-flight jobs of the killed worker")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args.worker)
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}")
        asyncio.run(run(url, args.jobs, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
