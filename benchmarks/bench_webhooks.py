"""Signed sandbox webhooks through the receiver and the processor, as separate processes.

The Nylas sandbox (20 ms latency per API call) builds signed notifications for new messages;
half the messages are replies in existing threads. As with Nylas, an ordinary reply arrives as
message.created alone (thread.replied is for tracked sends only), and the processor keeps the
thread row current from the stored messages, without a provider request. Each configuration
runs on a fresh database, `python -m nova.receiver` and `python -m nova.webhooks` side by side:

1. burst: all notifications POSTed at once over CONCURRENCY keep-alive connections while the
   processor runs -> requests/s answered (first POST to last answer) and events/s stored
   (first POST to the last notification processed); every event must be stored exactly once
   (one message row per event, every notification processed once, the queue empty);
2. latency (the configuration under test only): notifications POSTed at a steady RATE per
   second -> webhook-to-row latency (POST sent -> message row written; the row's created_at
   is the processor's transaction start, a millisecond or so before its commit), p50 / p99.

Two configurations in the same run, on the same machine: the baseline, as intake was before
(NOVA_RECEIVER_WORKERS=1, NOVA_WEBHOOK_BATCH_MAX=1: one receiver process, one transaction per
notification), and the defaults (several receiver workers, batched writes); the ratio is
defaults / baseline. CPU seconds per event of each side (receiver processes, processor,
PostgreSQL backends of the bench database) come from /proc. The machine's load average is
printed before and after: other work on the cores shows there.

The load comes from a small raw HTTP client (benchmarks/_http.py): httpx would saturate a CPU
core long before the receiver does.

Goal (issue 19): at least 1,000 requests/s answered and 400 events/s stored, p99 at most
100 ms at 50/s, with both processes on a 2-core machine.

    python benchmarks/bench_webhooks.py [--count 3000] [--concurrency 32] [--latency-count 500]
        [--rate 50] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402
from _http import post_request, send_all  # noqa: E402

from nova import db  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

SECRET = "bench-webhook-secret"
API_KEY = "bench-api-key"
BASELINE = {"NOVA_RECEIVER_WORKERS": "1", "NOVA_WEBHOOK_BATCH_MAX": "1"}
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def with_children(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(p for c in children for p in with_children(int(c)))]


@dataclass
class Cpu:
    """CPU seconds of the receiver (with its workers), the processor and the database's
    backends, from a start mark."""

    receiver: int
    processor: int
    pool: asyncpg.Pool
    start: dict[str, float] = field(default_factory=dict)

    async def read(self) -> dict[str, float]:
        backends = await self.pool.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return {"receiver": sum(cpu_seconds(p) for p in with_children(self.receiver)),
                "processor": cpu_seconds(self.processor),
                "postgres": sum(cpu_seconds(r["pid"]) for r in backends)}

    async def mark(self) -> None:
        self.start = await self.read()

    async def per_event(self, events: int) -> dict[str, float]:
        now = await self.read()
        return {k: (now[k] - self.start.get(k, 0.0)) * 1000 / events for k in now}


def build(sandbox: SandboxNylas, grant: str, n: int) -> list[Any]:
    threads = sandbox.thread_ids(grant)
    notes = []
    for i in range(n):
        reply_to = threads[i % len(threads)] if i % 2 else None
        mutation = sandbox.add_message(grant, thread_id=reply_to, subject=f"bench {i}",
                                       body=f"<p>message {i}</p>", send=False)
        notes.append(mutation.notifications)
    return notes


async def wait_processed(pool: asyncpg.Pool, total: int) -> None:
    deadline = time.monotonic() + 600
    while await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                              " WHERE status IN ('processed', 'skipped', 'error')") < total:
        if time.monotonic() > deadline:
            raise TimeoutError("notifications were not processed in time")
        await asyncio.sleep(0.02)


async def stored_once(pool: asyncpg.Pool, notes: list[Any]) -> str:
    """Every event stored exactly once: a row per message, each notification processed once
    (one attempt), nothing left in the queue."""
    ids = [n.payload["data"]["object"]["id"] for n in notes]
    rows = await pool.fetchval("SELECT count(*) FROM flux_email_messages"
                               " WHERE provider_message_id = ANY($1::text[])", ids)
    once = await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                               " WHERE status = 'processed' AND attempts = 1")
    total = await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications")
    queued = await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications")
    ok = rows == len(set(ids)) == len(notes) and once == total == len(notes) and queued == 0
    return (f"{'yes' if ok else 'NO'} ({rows:,} message rows for {len(notes):,} events,"
            f" {once:,}/{total:,} notifications processed in one attempt, {queued} queued)")


async def burst(url: str, pool: asyncpg.Pool, cpu: Cpu, batches: list[Any],
                concurrency: int) -> dict[str, Any]:
    notes = [n for batch in batches for n in batch]
    requests = [post_request(url, n.body, n.headers) for n in notes]
    await cpu.mark()
    t0 = time.perf_counter()
    statuses = await send_all(url, requests, concurrency)
    posted = time.perf_counter() - t0
    await wait_processed(pool, len(notes))
    drained = time.perf_counter() - t0
    return {"events": len(notes), "statuses": statuses, "req_s": len(notes) / posted,
            "posted": posted, "ev_s": len(notes) / drained, "drained": drained,
            "once": await stored_once(pool, notes), "cpu": await cpu.per_event(len(notes))}


async def latency(url: str, pool: asyncpg.Pool, batches: list[Any],
                  rate: float) -> tuple[float, float, float, int]:
    """One batch (a message.created) every 1/rate seconds."""
    sent_at: dict[str, float] = {}
    before = await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications")
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        stamps: dict[int, float] = {}
        statuses = await send_all(url, [post_request(url, n.body, n.headers) for n in batch],
                                  1, stamps)
        assert statuses == {200: len(batch)}, statuses
        sent_at[batch[0].payload["data"]["object"]["id"]] = stamps[0]
    await wait_processed(pool, before + sum(len(b) for b in batches))
    rows = await pool.fetch("SELECT provider_message_id, created_at FROM flux_email_messages"
                            " WHERE provider_message_id = ANY($1::text[])", list(sent_at))
    lat = sorted((r["created_at"].timestamp() - sent_at[r["provider_message_id"]]) * 1000
                 for r in rows)
    assert len(lat) == len(sent_at), (len(lat), len(sent_at))
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    return statistics.median(lat), p99, lat[-1], len(lat)


async def wait_healthy(base: str) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("receiver did not come up")
            await asyncio.sleep(0.1)


async def run(args: argparse.Namespace, db_url: str, name: str, extra: dict[str, str],
              with_latency: bool) -> dict[str, Any]:
    with SandboxNylas(threads=200, seed=1, api_key=API_KEY, webhook_secret=SECRET,
                      latency_ms=args.sandbox_latency_ms) as sandbox:
        grant = sandbox.grant_ids[0]
        pool = await db.create_pool(db_url, min_size=1, max_size=4)
        await pool.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, 'b@x.com')",
                           grant)
        port = free_port()
        env = {"NOVA_DATABASE_URL": db_url, "NYLAS_WEBHOOK_SECRET": SECRET,
               "NYLAS_API_KEY": API_KEY, "NYLAS_API_URI": sandbox.base_url,
               "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(port),
               "LOG_LEVEL": "warning", **extra}
        receiver, processor = spawn("nova.receiver", env), spawn("nova.webhooks", env)
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(base)
            url = f"{base}/webhooks/nylas"
            settings = " ".join(f"{k}={v}" for k, v in extra.items()) or "defaults"
            result = await burst(url, pool, Cpu(receiver.pid, processor.pid, pool),
                                 build(sandbox, grant, args.count), args.concurrency)
            result["name"] = name
            c = result["cpu"]
            print(f"{name} ({settings}):\n"
                  f"  burst:    {result['events']:,} webhooks over {args.concurrency} connections:"
                  f" {result['req_s']:,.0f} requests/s answered ({result['posted']:.2f}s,"
                  f" statuses {result['statuses']}), {result['ev_s']:,.0f} events/s stored"
                  f" (all stored {result['drained']:.2f}s after the first POST)\n"
                  f"            stored exactly once: {result['once']}\n"
                  f"            CPU per event: receiver {c['receiver']:.2f} ms, processor"
                  f" {c['processor']:.2f} ms, PostgreSQL backends {c['postgres']:.2f} ms")
            if with_latency:
                p50, p99, worst, n = await latency(
                    url, pool, build(sandbox, grant, args.latency_count), args.rate)
                result.update(p50=p50, p99=p99)
                print(f"  latency:  {n:,} messages at {args.rate:g}/s: webhook-to-row p50"
                      f" {p50:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms (goal p99 <= 100)")
            return result
        finally:
            for p in (receiver, processor):
                p.terminate()
            for p in (receiver, processor):
                p.wait(30)
            await pool.close()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="messages, burst phase")
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50, help="messages/s, latency phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sandbox-latency-ms", type=int, default=20)
    parser.add_argument("--no-baseline", action="store_true",
                        help="only the defaults (no baseline run, no ratio)")
    args = parser.parse_args()
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, load average {load()};"
          f" sandbox latency {args.sandbox_latency_ms} ms per API call")
    results = []
    configs = [("baseline", BASELINE, False)] if not args.no_baseline else []
    configs.append(("defaults", {}, True))
    for name, extra, with_latency in configs:
        with bench_database() as url:
            if not results:
                print(f"PostgreSQL {server_version(url)}")
            results.append(asyncio.run(run(args, url, name, extra, with_latency)))
    if len(results) == 2:
        base, new = results
        print(f"ratio defaults / baseline: requests/s {new['req_s'] / base['req_s']:.2f}x,"
              f" events/s {new['ev_s'] / base['ev_s']:.2f}x")
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
