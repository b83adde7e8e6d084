"""Signed sandbox webhooks through the receiver and the processor, as separate processes.

The Nylas sandbox (20 ms latency per API call) builds signed notifications for new messages;
half the messages are replies in existing threads. As with Nylas, an ordinary reply arrives as
message.created alone (thread.replied is for tracked sends only), and the processor keeps the
thread row current from the stored messages, without a provider request. Two phases:

1. throughput: all notifications POSTed with CONCURRENCY connections -> receiver requests/s,
   then the time for `python -m nova.webhooks` to drain them;
2. latency: notifications POSTed at a steady RATE per second while the processor runs ->
   webhook-to-row latency (POST sent -> message row written; the row's created_at is the
   processor's transaction start, a millisecond or so before its commit), p50 / p99.

The load comes from a small raw HTTP client (benchmarks/_http.py): httpx would saturate a CPU
core long before the receiver does.

Goal: p50 under 100 ms, p99 under 300 ms.

    python benchmarks/bench_webhooks.py [--count 2000] [--latency-count 500] [--rate 50]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(module: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
        await asyncio.sleep(0.05)


async def throughput(url: str, pool: asyncpg.Pool, batches: list[Any],
                     concurrency: int) -> None:
    notes = [n for batch in batches for n in batch]
    requests = [post_request(url, n.body, n.headers) for n in notes]
    t0 = time.perf_counter()
    statuses = await send_all(url, requests, concurrency)
    posted = time.perf_counter() - t0
    await wait_processed(pool, len(notes))
    drained = time.perf_counter() - t0
    print(f"throughput: {len(notes):,} webhooks POSTed with {concurrency} connections in"
          f" {posted:.2f}s = {len(notes) / posted:,.0f} req/s  statuses={statuses}")
    print(f"            processor finished all of them {drained:.2f}s after the first POST"
          f" = {len(notes) / drained:,.0f} events/s")


async def latency(url: str, pool: asyncpg.Pool, batches: list[Any], rate: float) -> None:
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
    print(f"latency:    {len(lat):,} messages at {rate:g}/s:"
          f" webhook-to-row p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms,"
          f" max {lat[-1]:.1f} ms  (goal p50 < 100, p99 < 300)")


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


async def run(args: argparse.Namespace, db_url: str) -> None:
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
               "BATCH_SIZE": str(args.batch_size), "LOG_LEVEL": "warning"}
        procs = [spawn("nova.receiver", env), spawn("nova.webhooks", env)]
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_healthy(base)
            url = f"{base}/webhooks/nylas"
            print(f"sandbox latency {args.sandbox_latency_ms} ms per API call;"
                  f" processor BATCH_SIZE={args.batch_size}; {datetime.now():%Y-%m-%d %H:%M}")
            await throughput(url, pool, build(sandbox, grant, args.count), args.concurrency)
            await latency(url, pool, build(sandbox, grant, args.latency_count), args.rate)
            errors = await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                                         " WHERE status <> 'processed'")
            print(f"notifications not processed: {errors}")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="messages, throughput phase")
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50, help="messages/s, latency phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--sandbox-latency-ms", type=int, default=20)
    args = parser.parse_args()
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}")
        asyncio.run(run(args, url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
