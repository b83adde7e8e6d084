"""Outbound webhooks (`python -m nova.hooks`, a process of its own) against a local endpoint
(tests/hook_receiver.py) that verifies every signature with the Standard Webhooks reference
library (`standardwebhooks`).

1. burst: BURST events over INBOXES inboxes written at once, a reliable endpoint -> deliveries
   per second (first event written to the last one delivered) and the processor's CPU per
   delivery;
2. outage (issue #20's Must-show): a new endpoint that fails FAIL_RATE of deliveries (500, 502,
   503, 504) and is down (its port closed: connections refused) for OUTAGE seconds, while
   events keep coming at RATE per second: every event delivered? every signature verified?
   order kept per inbox (no event ever sent before the one before it was delivered)? duplicate
   deliveries (at least once), dead letters, how long the backlog took to drain after the
   endpoint came back, and the latency from an event to its delivery before, during and after
   the outage.

The retry schedule is shortened (SCHEDULE: 16 attempts over about 6 minutes, so that the
outage uses some of them and leaves enough for the 30% failures after it) so that the run takes
minutes, not the default's three days; the other settings are the defaults.

    python benchmarks/bench_hooks.py [--inboxes 20] [--burst 2000] [--rate 20] [--outage 60]
        [--before 20] [--after 30] [--fail-rate 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _db import bench_database, server_version  # noqa: E402
from hook_receiver import Receiver, ReceiverServer  # noqa: E402

from nova import db  # noqa: E402
from nova import hooks_delivery as delivery  # noqa: E402

# 16 attempts over about 6 minutes: the default's three days would make the run last them.
SCHEDULE = "1s,5s,10s,20s," + ",".join(["30s"] * 11)
RECORD = "SELECT nova_record_event($1, $2, $3, NULL, NULL, '{\"unread\": true}'::jsonb)"
KINDS = ("message.created", "message.updated", "thread.updated")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nova.hooks"], env=env,
                            stdout=subprocess.DEVNULL)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


async def add_endpoint(pool: Any, url: str) -> tuple[uuid.UUID, str]:
    secret = delivery.new_secret()
    endpoint = await pool.fetchval("SELECT nova_hook_add($1, '{}', $2)", url, secret)
    return endpoint, secret


async def write(pool: Any, inboxes: list[uuid.UUID], n: int, per_tx: int = 1,
                start: int = 0) -> None:
    """Events start .. start + n - 1, round-robin over the inboxes, per_tx to a transaction."""
    i = start
    while i < start + n:
        async with pool.acquire() as c, c.transaction():
            for _ in range(min(per_tx, start + n - i)):
                await c.execute(RECORD, inboxes[i % len(inboxes)], KINDS[i % 3], str(i))
                i += 1


async def wait_delivered(receiver: Receiver, expected: int, limit_s: float) -> float:
    started = time.monotonic()
    while len({d.msg_id for d in receiver.accepted()}) < expected:
        if time.monotonic() - started > limit_s:
            raise SystemExit(f"timed out: {len({d.msg_id for d in receiver.accepted()})} of "
                             f"{expected} delivered")
        await asyncio.sleep(0.05)
    return time.monotonic()


async def main(args: argparse.Namespace) -> None:
    load = os.getloadavg()
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}, {os.cpu_count()} CPU(s), load average "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
        pool = await db.create_pool(url, min_size=1, max_size=4)
        inboxes = [uuid.uuid4() for _ in range(args.inboxes)]
        env = {**os.environ, "NOVA_DATABASE_URL": url, "LOG_LEVEL": "error",
               "NOVA_HOOKS_RETRY_SCHEDULE": args.schedule, "NOVA_HOOKS_POLL_MS": "200",
               "NOVA_SHUTDOWN_GRACE_SECONDS": "5"}
        env.pop("NOVA_METRICS_PORT", None)
        proc = spawn(env)
        try:
            await burst(pool, inboxes, proc.pid, args)
            await outage(pool, inboxes, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            await pool.close()
        print(f"processor exit status after SIGTERM: {code}")
        load = os.getloadavg()
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end (other work "
              f"on the cores shows here)")


async def burst(pool: Any, inboxes: list[uuid.UUID], pid: int,
                args: argparse.Namespace) -> None:
    receiver = Receiver()
    with ReceiverServer(receiver) as server:
        endpoint, secret = await add_endpoint(pool, server.url)
        receiver.secrets.append(secret)
        await asyncio.sleep(1.0)  # the processor is up
        cpu0 = cpu_seconds(pid)
        started = time.monotonic()
        await write(pool, inboxes, args.burst, per_tx=50)
        written = time.monotonic()
        done = await wait_delivered(receiver, args.burst, 600)
        cpu = cpu_seconds(pid) - cpu0
        await pool.execute("SELECT nova_hook_remove($1)", endpoint)
    print(f"\n1. burst: {args.burst:,} events over {len(inboxes)} inboxes, written in "
          f"{written - started:.1f} s; all delivered in {done - started:.1f} s: "
          f"{args.burst / (done - started):,.0f} deliveries/s; processor CPU "
          f"{cpu * 1000 / args.burst:.2f} ms per delivery; unverified signatures "
          f"{len(receiver.unverified)}")


async def outage(pool: Any, inboxes: list[uuid.UUID], args: argparse.Namespace) -> None:
    receiver = Receiver(fail_rate=args.fail_rate, seed=20)
    with ReceiverServer(receiver) as server:
        _, secret = await add_endpoint(pool, server.url)
        receiver.secrets.append(secret)
        before = await pool.fetchval("SELECT coalesce(max(id), 0) FROM nova_events")
        total_s = args.before + args.outage + args.after
        count = int(total_s * args.rate)
        started = time.monotonic()
        down_at = up_at = 0.0
        written = 0
        while written < count:
            now = time.monotonic() - started
            if not down_at and now >= args.before:
                server.down()
                down_at = time.monotonic()
                print(f"\n2. outage: endpoint down at {now:.1f} s")
            if down_at and not up_at and now >= args.before + args.outage:
                server.up()
                up_at = time.monotonic()
                print(f"   endpoint up again at {now:.1f} s")
            due = int(now * args.rate) + 1
            if written < min(due, count):
                await write(pool, inboxes, min(due, count) - written, start=written)
                written = min(due, count)
            await asyncio.sleep(0.02)
        if not up_at:
            server.up()
            up_at = time.monotonic()
        done = await wait_delivered(receiver, count, 900)
        dead = await pool.fetchval("SELECT count(*) FROM nova_hook_dead_letters")
        occurred = {str(r["id"]): r["occurred_at"].timestamp() for r in await pool.fetch(
            "SELECT id, occurred_at FROM nova_events WHERE id > $1", before)}
    accepted = receiver.accepted()
    first: dict[str, float] = {}
    for d in accepted:
        first.setdefault(d.msg_id, d.wall)
    statuses = Counter(d.status for d in receiver.deliveries)
    violations = sum(1 for positions in receiver.attempted_positions().values()
                     for a, b in zip(positions, positions[1:], strict=False) if b < a)
    down_wall = time.time() - (time.monotonic() - down_at)
    up_wall = time.time() - (time.monotonic() - up_at)
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for msg_id, at in occurred.items():
        phase = "before" if at < down_wall else "during" if at < up_wall else "after"
        phases[phase].append(first[msg_id] - at)
    every = set(first) == set(occurred)
    print(f"   {count:,} events at {args.rate}/s over {len(inboxes)} inboxes, "
          f"{args.fail_rate:.0%} failed answers, down {up_at - down_at:.0f} s")
    print(f"   every event delivered: {'yes' if every else 'NO'} ({len(first):,}/"
          f"{len(occurred):,}); signatures verified by the reference library: "
          f"{len(receiver.deliveries) - len(receiver.unverified):,}/{len(receiver.deliveries):,}"
          f"; order violations per inbox: {violations}; dead letters: {dead}")
    print(f"   requests answered: {len(receiver.deliveries):,} ("
          + ", ".join(f"{s}: {n:,}" for s, n in sorted(statuses.items()))
          + f"); duplicate deliveries (2xx twice): {len(accepted) - len(first)}")
    print(f"   backlog drained {done - up_at:.1f} s after the endpoint came back "
          f"(attempts on the retry schedule {args.schedule})")
    for phase, values in phases.items():
        if values:
            print(f"   latency event -> delivered, events written {phase} the outage: "
                  f"p50 {statistics.median(values):.2f} s, p99 {pct(values, 99):.2f} s "
                  f"({len(values):,} events)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inboxes", type=int, default=20)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--before", type=float, default=20.0)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--after", type=float, default=30.0)
    parser.add_argument("--fail-rate", type=float, default=0.3)
    parser.add_argument("--schedule", default=SCHEDULE, help="NOVA_HOOKS_RETRY_SCHEDULE")
    asyncio.run(main(parser.parse_args()))
