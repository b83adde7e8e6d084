"""Nova's fleet at 10,000 inboxes, against the Nylas sandbox, under webhook load (issue #19, 8).

Two runs on one PostgreSQL server, the same fleet and load in each: "empty" (a freshly migrated
database: the baseline) and "scale" (seeded with plain SQL by _seed.py, as bench_periodic.py:
INBOXES inboxes, RUNNING of them with a running backfill, MESSAGES messages in threads of 3,
a million processed webhook notifications and a million dead letters). In each, the fleet runs
as separate processes: 1 `nova.receiver`, 1 `nova.webhooks`, 1 `nova.backfill`, THREAD_WORKERS
`nova.threads`, 1 `nova.completion`, 1 `nova.attachments`, default settings; BACKFILLS real
backfills of sandbox mailboxes (BACKFILL_THREADS threads each, RATE requests/s per grant, Nova
told it) run while signed `message.created` webhooks of another sandbox grant are POSTed to the
receiver at RATE_HOOKS/s for HOOK_SECONDS. For SECONDS from the backfills' start it reports:

- the completion monitor's database time a minute and its slowest statement's mean, from
  pg_stat_statements (the monitor connects as its own role, nova_bench_monitor, so its
  statements are told apart), over a window of one minute that holds 12 checks and 1 recovery
  pass, and whether it queued a catch-up backfill for any seeded (merely quiet) inbox;
- webhook-to-row p50/p99 (POST sent -> the message row's created_at);
- threads/s of the real backfills, and CPU per synced thread: every Nova process (receiver
  workers included) and the whole PostgreSQL server (postmaster and all its children, exited
  ones too: meaningful only on a server nobody else uses); CPU per webhook of receiver +
  processor;
- the peak of client connections (pg_stat_activity, sampled every 0.2 s) and how many were
  refused ("too many clients" / "remaining connection slots" in the processes' logs);
- `nova queues`' database time (run as role nova_bench_cli, pg_stat_statements);
- after the run: a webhook's message and a 3-message thread sync written into a BIG-thread
  mailbox vs a SMALL-thread one (bench_thread_cost.write_cost, in the same database), and table
  sizes (pg_total_relation_size) with bytes per message.

Without pg_stat_statements in shared_preload_libraries the database-time figures are "n/a"
(bench_periodic.py times the same statements one by one). The roles need a server where the
bench's role may CREATE ROLE. The machine's load average is printed before and after.

    NOVA_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:55432/postgres \\
        python benchmarks/bench_scale.py [--messages 10000000] [--inboxes 10000] [--running 1000]
        [--seconds 75] [--hook-seconds 40] [--rate-hooks 50] [--backfills 3] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _db import bench_database, server_version  # noqa: E402
from _http import post_request, send_all  # noqa: E402
from _seed import Scale, seed, sizes  # noqa: E402
from bench_thread_cost import load_store, parent, server_cpu, write_cost  # noqa: E402
from bench_webhooks import build, cpu_seconds, free_port, load, wait_healthy, with_children  # noqa: E402

from nova import db  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECRET, API_KEY = "bench-webhook-secret", "bench-api-key"
MONITOR_ROLE, CLI_ROLE = "nova_bench_monitor", "nova_bench_cli"
REFUSED = ("too many clients", "remaining connection slots")
TABLES = ("flux_email_messages", "flux_email_threads", "flux_email_attachments",
          "flux_email_message_search",
          "queued_threads", "flux_webhook_notifications", "flux_inboxes",
          "flux_inbox_configurations", "inbox_sync_stats", "pgmq.q_thread_sync_jobs",
          "pgmq.a_thread_sync_jobs", "pgmq.a_nylas_webhook_notifications")


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def prepare_server(url: str) -> bool:
    """The two roles, and pg_stat_statements in this database; False without it."""
    with psycopg.connect(url, autocommit=True) as conn:
        for role in (MONITOR_ROLE, CLI_ROLE):
            conn.execute(f"DO $$ BEGIN CREATE ROLE {role} LOGIN SUPERUSER;"
                         " EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        loaded = conn.execute("SELECT 'pg_stat_statements' = ANY(string_to_array(replace("
                              "current_setting('shared_preload_libraries'), ' ', ''), ','))"
                              ).fetchone()
        if loaded and loaded[0]:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            return True
    return False


STATEMENTS = """
SELECT coalesce(sum(s.total_exec_time), 0), coalesce(sum(s.calls), 0),
       coalesce(max(s.mean_exec_time), 0),
       (array_agg(left(regexp_replace(s.query, '\\s+', ' ', 'g'), 70)
                  ORDER BY s.mean_exec_time DESC))[1]
FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
WHERE r.rolname = %s AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
# The search index step (sql/130_search.sql), run by the thread processes since it left the
# monitor (nova/search_index.py): work in proportion to new mail, reported apart.
SEARCH_STEP = """
SELECT coalesce(sum(s.total_exec_time), 0), coalesce(sum(s.calls), 0)
FROM pg_stat_statements s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND s.query LIKE '%nova_search_index_pending%'
"""


def statements(url: str, role: str) -> tuple[float, int, float, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(STATEMENTS, (role,)).fetchone()
    assert row is not None
    return float(row[0]), int(row[1]), float(row[2]), str(row[3] or "")


def search_step(url: str) -> tuple[float, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(SEARCH_STEP).fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


TOP = """
SELECT s.calls, s.total_exec_time, s.mean_exec_time,
       left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60)
FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
WHERE r.rolname = %s AND s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY s.total_exec_time DESC LIMIT %s
"""


def top_statements(url: str, role: str, n: int = 6) -> list[tuple[int, float, float, str]]:
    with psycopg.connect(url) as conn:
        return [(int(r[0]), float(r[1]), float(r[2]), str(r[3]))
                for r in conn.execute(TOP, (role, n)).fetchall()]


def reset_statements(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database"
                     " WHERE datname = current_database()), 0)")


@dataclass
class Fleet:
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, proc in self.procs.items():
            group = name.split("-")[0]
            out[group] = out.get(group, 0.0) + sum(cpu_seconds(p)
                                                   for p in with_children(proc.pid))
        return out

    def refused(self) -> int:
        return sum(log.read_text(errors="replace").count(text)
                   for log in self.logs.values() for text in REFUSED)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_fleet(url: str, sandbox: SandboxNylas, port: int, workers: int,
                rate: float) -> Fleet:
    base = {**os.environ, "NOVA_DATABASE_URL": url, "NYLAS_API_KEY": API_KEY,
            "NYLAS_API_URI": sandbox.base_url, "NYLAS_WEBHOOK_SECRET": SECRET,
            "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(port),
            "NOVA_PROVIDER_RATE_LIMIT": str(rate), "NOVA_PROVIDER_RATE_CEILING": str(rate),
            "NOVA_ATTACHMENT_PATH": tempfile.mkdtemp(prefix="nova-bench-att-"),
            "LOG_LEVEL": "info", "PYTHONPATH": str(ROOT)}
    fleet = Fleet()
    logdir = Path(tempfile.mkdtemp(prefix="nova-bench-scale-"))
    names = ["receiver", "webhooks", "backfill", *[f"threads-{i}" for i in range(workers)],
             "completion", "attachments"]
    for name in names:
        env = dict(base)
        if name == "completion":
            env["NOVA_DATABASE_URL"] = as_role(url, MONITOR_ROLE)
        log = fleet.logs[name] = logdir / f"{name}.log"
        fleet.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"nova.{name.split('-')[0]}"], env=env, cwd=ROOT,
            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return fleet


async def post_hooks(url: str, batches: list[Any], rate: float) -> dict[str, float]:
    """One notification batch (a message.created) every 1/rate s; the send time of each."""
    sent_at: dict[str, float] = {}
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        stamps: dict[int, float] = {}
        statuses = await send_all(url, [post_request(url, n.body, n.headers) for n in batch],
                                  1, stamps)
        assert statuses == {200: len(batch)}, statuses
        sent_at[batch[0].payload["data"]["object"]["id"]] = stamps[0]
    return sent_at


async def sample_connections(pool: Any, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        n = await pool.fetchval("SELECT count(*) FROM pg_stat_activity"
                                " WHERE backend_type = 'client backend'")
        peak[0] = max(peak[0], n)
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


def nova_queues(url: str) -> None:
    subprocess.run([sys.executable, "-m", "nova", "queues"], cwd=ROOT, check=True,
                   capture_output=True,
                   env={**os.environ, "NOVA_DATABASE_URL": as_role(url, CLI_ROLE),
                        "PYTHONPATH": str(ROOT)})


async def run_fleet(url: str, args: argparse.Namespace, stats: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with SandboxNylas(threads=args.backfill_threads, other_threads=args.backfill_threads,
                      grants=args.backfills + 1, seed=1, api_key=API_KEY, webhook_secret=SECRET,
                      rate_limit=args.rate, latency_ms=args.latency_ms,
                      anchor=int(time.time()) - 3600) as sandbox:
        *grants, hook_grant = sandbox.grant_ids
        pool = await db.create_pool(url, min_size=1, max_size=3)
        postmaster = parent(await pool.fetchval("SELECT pg_backend_pid()"))
        hook_inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                                         " ($1, 'hooks@example.com') RETURNING id", hook_grant)
        batches = build(sandbox, hook_grant, int(args.rate_hooks * args.hook_seconds))
        port = free_port()
        fleet = start_fleet(url, sandbox, port, args.thread_workers, args.rate)
        stop, peak = asyncio.Event(), [0]
        sampler = asyncio.create_task(sample_connections(pool, stop, peak))
        try:
            await wait_healthy(f"http://127.0.0.1:{port}")
            await asyncio.sleep(3)  # the workers up, the monitor's first recovery pass done
            started = await pool.fetchval("SELECT now()")
            configs = [await pool.fetchval(
                "WITH x AS (INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, $1 ||"
                " '@example.com') RETURNING id)"
                " SELECT queue_inbox_backfill(x.id, now() - interval '1 year 2 hours') FROM x",
                g) for g in grants]
            cpu0, pg0, t0 = fleet.cpu(), server_cpu(postmaster), time.monotonic()
            if stats:
                reset_statements(url)
            hooks = asyncio.create_task(post_hooks(f"http://127.0.0.1:{port}/webhooks/nylas",
                                                   batches, args.rate_hooks))
            await asyncio.sleep(min(30.0, args.seconds / 2))
            await asyncio.to_thread(nova_queues, url)
            await asyncio.sleep(max(0.0, t0 + 62 - time.monotonic()))
            window = time.monotonic() - t0
            if stats:
                total, calls, worst, query = statements(url, MONITOR_ROLE)
                out["monitor"] = (total * 60 / window, calls, worst, query)
                indexing, index_calls = search_step(url)
                out["search"] = (indexing * 60 / window, index_calls * 60 / window)
                out["window"] = window
                out["monitor_top"] = top_statements(url, MONITOR_ROLE)
                out["queues"] = statements(url, CLI_ROLE)[0]
            sent_at = await hooks
            await asyncio.sleep(max(0.0, t0 + args.seconds - time.monotonic()))
            cpu1, pg1, elapsed = fleet.cpu(), server_cpu(postmaster), time.monotonic() - t0
            for name, proc in fleet.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited {proc.returncode}; see {fleet.logs[name]}")
        finally:
            stop.set()
            await sampler
            fleet.stop()
        done = await pool.fetchrow(
            "SELECT count(*) AS threads, coalesce(sum(message_count), 0) AS messages,"
            " extract(epoch FROM max(processed_at) - $2) AS span FROM queued_threads"
            " WHERE config_id = ANY($1) AND status = 'completed'", configs, started)
        rows = await pool.fetch("SELECT provider_message_id, created_at FROM flux_email_messages"
                                " WHERE inbox_id = $1 AND provider_message_id = ANY($2)",
                                hook_inbox, list(sent_at))
        lat = sorted((r["created_at"].timestamp() - sent_at[r["provider_message_id"]]) * 1000
                     for r in rows)
        out["catchups"] = await pool.fetchval(
            "SELECT count(*) FROM flux_inbox_configurations WHERE created_at >= $1"
            " AND NOT (id = ANY($2))", started, configs)
        out["status"] = await pool.fetch("SELECT backfill_status, count(*) FROM"
                                         " flux_inbox_configurations WHERE id = ANY($1)"
                                         " GROUP BY 1", configs)
        await pool.close()
    hooks_n = len(sent_at)
    nova = sum(cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1)
    intake = sum(cpu1[k] - cpu0[k] for k in ("receiver", "webhooks"))
    threads = max(int(done["threads"]), 1)
    monitor_log = fleet.logs["completion"].read_text(errors="replace").count("[Monitor]")
    out.update(
        threads=done["threads"], messages=done["messages"],
        threads_s=done["threads"] / float(done["span"] or elapsed), elapsed=elapsed,
        nova_ms=nova * 1000 / threads, pg_ms=(pg1 - pg0) * 1000 / threads,
        sync_ms=sum(cpu1[k] - cpu0[k] for k in ("threads", "backfill")) * 1000 / threads,
        intake_ms=intake * 1000 / max(hooks_n, 1), hooks=hooks_n, stored=len(lat),
        p50=statistics.median(lat) if lat else float("nan"),
        p99=lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan"),
        peak=peak[0], refused=fleet.refused(), monitor_lines=monitor_log)
    return out


def table_sizes(url: str) -> tuple[list[tuple[str, int, int]], float, float]:
    """(table, rows, bytes) of the main tables; bytes per message of the messages table alone
    and of all mail tables (messages, threads, attachments, search documents) per message."""
    out = []
    with psycopg.connect(url) as conn:
        conn.execute("ANALYZE flux_email_messages, flux_email_threads, flux_email_attachments")
        for table in TABLES:
            row = conn.execute(f"SELECT (SELECT count(*) FROM {table}),"
                               f" pg_total_relation_size('{table}')").fetchone()
            assert row is not None
            out.append((table, int(row[0]), int(row[1])))
    by = {t: (n, b) for t, n, b in out}
    msgs = max(by["flux_email_messages"][0], 1)
    mail = sum(by[t][1] for t in ("flux_email_messages", "flux_email_threads",
                                  "flux_email_attachments", "flux_email_message_search"))
    return out, by["flux_email_messages"][1] / msgs, mail / msgs


def synced_bytes(url: str) -> float:
    """Average row bytes (pg_column_size, TOAST compressed) of messages synced from the
    sandbox (those with a raw body), a realistic message unlike the seeded ones."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT avg(pg_column_size(m.*)) FROM flux_email_messages m"
                           " WHERE raw IS NOT NULL").fetchone()
    return float(row[0] or 0) if row else 0.0


def measure(label: str, url: str, args: argparse.Namespace, stats: bool) -> dict[str, Any]:
    print(f"[{label}] fleet run ({args.seconds:g} s), load average {load()}", flush=True)
    result = asyncio.run(run_fleet(url, args, stats))
    result["synced_bytes"] = synced_bytes(url)
    result["sizes"], result["msg_bytes"], result["mail_bytes"] = table_sizes(url)
    print(f"[{label}] message writes: {args.big:,} vs {args.small} threads", flush=True)
    wargs = argparse.Namespace(others=0, big=args.big, small=args.small, runs=args.runs)
    result["writes"] = asyncio.run(write_cost(url, load_store(ROOT), wargs))
    print(f"[{label}] done, load average {load()}", flush=True)
    return result


def report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    def f(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)
    labels = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, get: Any, fmt: str) -> None:
        rows.append((name, [f(get(results[k]), fmt) for k in labels]))
    row("monitor: DB ms a minute (goal < 1,000)",
        lambda r: r["monitor"][0] if "monitor" in r else None, ",.0f")
    row("monitor: slowest statement mean ms (< 25)",
        lambda r: r["monitor"][2] if "monitor" in r else None, ".1f")
    row("search index step (thread processes): DB ms a minute",
        lambda r: r["search"][0] if "search" in r else None, ",.0f")
    row("  its statements a minute",
        lambda r: r["search"][1] if "search" in r else None, ",.0f")
    row("monitor: log lines over the run", lambda r: r["monitor_lines"], ",")
    row("catch-ups for quiet inboxes (goal 0)", lambda r: r["catchups"], ",")
    row("nova queues: DB ms (goal < 100)", lambda r: r.get("queues"), ".1f")
    row(f"webhooks posted at {args.rate_hooks:g}/s / stored", lambda r:
        f"{r['hooks']:,}/{r['stored']:,}", "")
    row("webhook-to-row p50 ms", lambda r: r["p50"], ".1f")
    row("webhook-to-row p99 ms (goal <= 100)", lambda r: r["p99"], ".1f")
    row("threads synced (real backfills)", lambda r: r["threads"], ",")
    row("threads/s", lambda r: r["threads_s"], ".1f")
    row("CPU ms/thread: all Nova processes", lambda r: r["nova_ms"], ".2f")
    row("CPU ms/thread: backfill + threads only", lambda r: r["sync_ms"], ".2f")
    row("CPU ms/thread: PostgreSQL server", lambda r: r["pg_ms"], ".2f")
    row("CPU ms/webhook: receiver + processor", lambda r: r["intake_ms"], ".2f")
    row("peak client connections (< 100)", lambda r: r["peak"], ",")
    row("connections refused (goal 0)", lambda r: r["refused"], ",")
    row(f"webhook write ms, {args.small} threads", lambda r: r["writes"]["hook small"], ".2f")
    row(f"webhook write ms, {args.big:,} threads", lambda r: r["writes"]["hook big"], ".2f")
    row("  ratio big/small (goal <= 1.5)",
        lambda r: r["writes"]["hook big"] / r["writes"]["hook small"], ".2f")
    row("3-msg thread write ratio big/small",
        lambda r: r["writes"]["big"] / r["writes"]["small"], ".2f")
    row("bytes/message, messages table", lambda r: r["msg_bytes"], ",.0f")
    row("bytes/message, mail tables", lambda r: r["mail_bytes"], ",.0f")
    row("row bytes of a sandbox-synced message", lambda r: r["synced_bytes"], ",.0f")
    width = max(len(n) for n, _ in rows)
    print(f"\n{'':<{width}} " + " ".join(f"{k:>14}" for k in labels))
    for name, values in rows:
        print(f"{name:<{width}} " + " ".join(f"{v:>14}" for v in values))
    for k in labels:
        if "monitor" in results[k]:
            print(f"{k}: monitor's slowest statement: {results[k]['monitor'][3]}; top by"
                  f" time over the {results[k]['window']:.0f} s window:")
            for calls, total, mean, query in results[k]["monitor_top"]:
                print(f"    {calls:>5} calls {total:>9,.1f} ms (mean {mean:>7.1f})  {query}")
        print(f"{k}: real backfills at the end: "
              + ", ".join(f"{r[0]} {r[1]}" for r in results[k]["status"]))
    print("\ntable sizes (pg_total_relation_size, after the run):")
    print(f"{'table':<38} " + " ".join(f"{k + ' rows':>14} {k + ' MB':>10}" for k in labels))
    for i, (table, _n, _b) in enumerate(results[labels[0]]["sizes"]):
        print(f"{table:<38} " + " ".join(
            f"{results[k]['sizes'][i][1]:>14,} {results[k]['sizes'][i][2] / 2**20:>10,.1f}"
            for k in labels))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inboxes", type=int, default=10_000)
    ap.add_argument("--running", type=int, default=1_000)
    ap.add_argument("--messages", type=int, default=10_000_000,
                    help="seeded messages (3 per thread); 10M seed in about 8 min on 2 cores")
    ap.add_argument("--notifications", type=int, default=1_000_000)
    ap.add_argument("--archived", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=75, help="fleet run, from the backfills'"
                    " start (at least 65: the monitor's window is one minute)")
    ap.add_argument("--hook-seconds", type=float, default=40)
    ap.add_argument("--rate-hooks", type=float, default=50, help="webhooks per second")
    ap.add_argument("--backfills", type=int, default=3)
    ap.add_argument("--backfill-threads", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=100, help="sandbox limit per grant, req/s")
    ap.add_argument("--latency-ms", type=int, default=20, help="sandbox latency per call")
    ap.add_argument("--thread-workers", type=int, default=4)
    ap.add_argument("--big", type=int, default=60_000)
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--no-baseline", action="store_true", help="only the seeded database")
    args = ap.parse_args()
    if args.seconds < 65:
        ap.error("--seconds must be at least 65")
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, load average {load()}")
    results: dict[str, dict[str, Any]] = {}
    scale = Scale(args.inboxes, args.running, 120, 180, 80, args.messages, args.notifications,
                  args.archived)
    for label in (["scale"] if args.no_baseline else ["empty", "scale"]):
        with bench_database() as url:
            stats = prepare_server(url)
            if not results:
                with psycopg.connect(url) as conn:
                    settings = conn.execute(
                        "SELECT string_agg(name || '=' || setting, ', ') FROM pg_settings WHERE"
                        " name IN ('max_connections', 'jit', 'shared_buffers')").fetchone()
                print(f"PostgreSQL {server_version(url)} ({settings[0] if settings else '?'});"
                      f" pg_stat_statements {'on' if stats else 'not loaded: n/a'}")
            if label == "scale":
                print(f"[scale] seeding {scale}", flush=True)
                took = seed(url, scale)
                print(f"[scale] seeded in {took:.0f}s: {sizes(url)}", flush=True)
            results[label] = measure(label, url, args, stats)
    report(args, results)
    print(f"\nload average after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
