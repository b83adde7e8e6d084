"""CPU per synced thread (Nova and PostgreSQL), and the cost of a message write by mailbox size.

    python benchmarks/bench_thread_cost.py [--threads 1500] [--rate 2000] [--big 80000]
                                           [--small 20] [--others 5000] [--runs 40]
                                           [--baseline REV] [--no-baseline] [--profile FILE]

1. CPU per thread. A sandbox mailbox of THREADS threads (a grant limit of RATE requests/s,
   Nova told it: no pacing in the way) is discovered by `python -m nova.backfill` in a
   database that already holds OTHERS small inboxes (analyzed: plans are made with real
   statistics); its thread-sync jobs are then held invisible while one `python -m nova.threads`
   process starts, and released at once. Columns, in ms per thread the worker synced:
   "Nova" the worker process's CPU (utime + stime of /proc/<pid>/stat, all its threads) and
   "PG" its PostgreSQL backends' (found by the client ports of its sockets), from release to
   the last thread (and, for code whose thread processes index new mail for search, until the
   search queue is empty: the index step's cost is in these figures); "Nova run" adds the
   backfill process's CPU during discovery, "PG run" is every process of the PostgreSQL
   server (postmaster, backends, background workers, those that exited) over discovery and
   sync: only meaningful on a server nobody else uses (the default, an embedded one). Threads
   whose one message came whole with the listing get no job and are not counted.
2. A message write by mailbox size. One inbox seeded by plain SQL (generate_series) with BIG
   threads of one message each, one with SMALL, beside the OTHERS. RUNS times each, on one
   connection (prepared statements: from the sixth run PostgreSQL may use a generic plan): a
   thread sync writing 3 messages in a transaction (`store.write_synced_thread` where that
   code has it, COMPLETE included; without the job's queue delete, which `nova.threads` now
   runs in the same statement), and a webhook's one message (`store.upsert_message`).
   Median wall time of the runs after the tenth, and the ratio big/small.

Both are run for this tree and for the code of a baseline revision (default HEAD: the last
commit, i.e. before uncommitted changes), unpacked with `git archive` into a temporary
directory and migrated by its own SQL into a database of its own. NOVA_BENCH_DATABASE_URL picks
the PostgreSQL server (else an embedded one); the server must run on this machine (its
processes' /proc entries are read).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import server_version  # noqa: E402

from nova import db  # noqa: E402
from nova.providers.models import Message, Participant  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402

API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Cost:
    threads: int  # synced by the worker
    messages: int
    seconds: float
    nova_cpu: float  # the thread worker, from release to the last thread
    pg_cpu: float  # its PostgreSQL backends, the same span
    run_nova: float  # the backfill process during discovery + the thread worker
    run_pg: float  # every process of the PostgreSQL server, discovery + sync


def cpu_seconds(pid: int, children: bool = False) -> float | None:
    """utime + stime of a process (all its threads; `children`: plus its waited-for
    children's), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def server_cpu(postmaster: int) -> float:
    """CPU of the whole server: the postmaster, its live children and those gone (exited
    backends, autovacuum workers). Meaningful only on a server nobody else uses."""
    total = cpu_seconds(postmaster, children=True) or 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent(int(entry.name)) == postmaster:
                    total += cpu_seconds(int(entry.name)) or 0.0
            except (OSError, ValueError, IndexError):
                continue
    return total


PROFILED = """
import cProfile, runpy, sys, time
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    runpy.run_module(sys.argv[1], run_name="__main__")
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(sys.argv[2])
"""


def spawn(code: Path, module: str, env: dict[str, str], log: Path,
          profile: str | None = None) -> subprocess.Popen[bytes]:
    # A profile counts CPU time (time.process_time), not time spent waiting.
    args = ["-c", PROFILED, module, profile] if profile else ["-m", module]
    return subprocess.Popen([sys.executable, *args], env={**env, "PYTHONPATH": str(code)},
                            cwd=code, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def wait_for(check: object, what: str, log: Path, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; see {log}")
        await asyncio.sleep(0.1)


def socket_ports(pid: int) -> list[int]:
    """Local TCP ports of a process's sockets (its PostgreSQL connections among them)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def backends(pool: Any, pid: int) -> list[int]:
    """The PostgreSQL backends serving process `pid` (matched by client port)."""
    try:
        ports = socket_ports(pid)
    except OSError:
        return []
    rows = await pool.fetch("SELECT pid FROM pg_stat_activity WHERE client_port = ANY ($1)"
                            " AND client_addr IS NOT NULL", ports)
    return [r["pid"] for r in rows]


async def cpu_cost(url: str, code: Path, args: argparse.Namespace,
                   profile: str | None = None) -> Cost:
    """Discover a sandbox mailbox with `nova.backfill`, then sync every thread job with one
    `nova.threads` worker, both of `code`. Where that worker indexes the mail for search (code
    with nova/search_index.py), the run lasts until the index has caught up too."""
    indexes = (code / "nova" / "search_index.py").exists()
    with SandboxNylas(threads=args.threads, seed=1, api_key=API_KEY, rate_limit=args.rate,
                      anchor=int(time.time()) - 3600) as sb:
        env = {**os.environ, "NOVA_DATABASE_URL": url,
               "NYLAS_API_KEY": API_KEY, "NYLAS_API_URI": sb.base_url,
               "NOVA_PROVIDER_RATE_LIMIT": str(args.rate),
               "NOVA_PROVIDER_RATE_CEILING": str(args.rate),
               "NOVA_PROVIDER_BURST": str(args.rate / 2), "LOG_LEVEL": "info"}
        log = Path(tempfile.mkdtemp(prefix="nova-bench-")) / "procs.log"
        log.write_text("")
        pool = await db.create_pool(url, min_size=1, max_size=1)
        # Other inboxes' mail, analyzed: plans are made with the statistics of a database in
        # use, not of empty tables (a fresh database is analyzed only after a minute or so).
        await pool.execute(OTHERS, args.others)
        await pool.execute("ANALYZE")
        postmaster = parent(await pool.fetchval("SELECT pg_backend_pid()"))
        procs: list[subprocess.Popen[bytes]] = []

        def started(count: int) -> Any:
            async def check() -> bool:
                return log.read_text(errors="replace").count("] started queue=") >= count
            return check
        try:
            backfill = spawn(code, "nova.backfill", env, log)
            procs.append(backfill)
            await wait_for(started(1), "the backfill worker", log, 60)
            await asyncio.sleep(0.5)
            discovery_nova0, server0 = cpu_seconds(backfill.pid) or 0.0, server_cpu(postmaster)
            inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                                        " ($1, 'bench@example.com') RETURNING id", sb.grant_ids[0])
            config = await pool.fetchval(
                "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')", inbox)

            async def discovered() -> bool:
                return await pool.fetchval(
                    "SELECT discovery_completed_at IS NOT NULL FROM flux_inbox_configurations"
                    " WHERE id = $1", config) is True
            await wait_for(discovered, "discovery", log)
            # The jobs wait, invisible, until the worker has started: its start-up is not
            # counted.
            await pool.execute("UPDATE pgmq.q_thread_sync_jobs SET vt = now() + interval '1 day'")
            discovery_nova = (cpu_seconds(backfill.pid) or 0.0) - discovery_nova0
            discovery_pg = server_cpu(postmaster) - server0
            backfill.terminate()
            backfill.wait(30)
            worker = spawn(code, "nova.threads", env, log, profile)
            procs.append(worker)
            await wait_for(started(2), "the thread worker", log, 60)
            await asyncio.sleep(1.0)
            nova0, server0 = cpu_seconds(worker.pid) or 0.0, server_cpu(postmaster)
            pg0 = {pid: cpu_seconds(pid) or 0.0 for pid in await backends(pool, worker.pid)}
            pg_last = dict(pg0)
            t0 = time.monotonic()
            released = await pool.fetchval("SELECT clock_timestamp()")
            await pool.execute("UPDATE pgmq.q_thread_sync_jobs SET vt = now()")
            await pool.execute("NOTIFY nova_q_thread_sync_jobs")
            while True:
                await asyncio.sleep(0.25)
                for pid in await backends(pool, worker.pid):
                    value = cpu_seconds(pid)
                    if value is not None:
                        pg_last[pid] = value
                left = await pool.fetchval(
                    "SELECT count(*) FROM queued_threads WHERE config_id = $1"
                    " AND status IN ('queued', 'processing')", config)
                if indexes:  # and the mail indexed for search, where the thread process does
                    left += await pool.fetchval(INDEX_WAITING)  # it (nova/search_index.py)
                if left == 0:
                    break
                if worker.poll() is not None:
                    raise SystemExit(f"the thread worker exited {worker.returncode}; see {log}")
            seconds = time.monotonic() - t0
            nova1, server1 = cpu_seconds(worker.pid) or 0.0, server_cpu(postmaster)
            for pid in await backends(pool, worker.pid):
                value = cpu_seconds(pid)
                if value is not None:
                    pg_last[pid] = value
            done = await pool.fetchrow(
                "SELECT count(*) AS threads, coalesce(sum(message_count), 0) AS messages"
                " FROM queued_threads WHERE config_id = $1 AND status = 'completed'"
                " AND processed_at >= $2", config, released)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait(30)
            await pool.close()
        pg = sum(v - pg0.get(pid, 0.0) for pid, v in pg_last.items())
        return Cost(done["threads"], done["messages"], seconds, nova1 - nova0, pg,
                    discovery_nova + nova1 - nova0, discovery_pg + server1 - server0)


INDEX_WAITING = "SELECT count(*) FROM flux_email_search_pending"


# --------------------------------------------------------------------------- mailbox size
SEED = """
WITH t AS (
    INSERT INTO flux_email_threads (inbox_id, provider_thread_id, subject, message_count,
                                    first_message_at, last_message_at, provider_updated_at)
    SELECT $1, $2 || g, 'Seeded thread ' || g, 1, now() - g * interval '1 minute',
           now() - g * interval '1 minute', now() - interval '1 day'
    FROM generate_series(1, $3) AS g
    RETURNING id, provider_thread_id, first_message_at
)
INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id, provider_thread_id,
                                 subject, snippet, body_html, body_text, sent_at,
                                 provider_updated_at, raw)
SELECT $1, t.id, t.provider_thread_id || '-m1', t.provider_thread_id, 'Seeded',
       'Hi there, seeded', '<div><p>Hi there,</p><p>' || repeat('seeded text ', 40) || '</p></div>',
       'Hi there, ' || repeat('seeded text ', 40), t.first_message_at, now() - interval '1 day',
       jsonb_build_object('id', t.provider_thread_id || '-m1')
FROM t
"""

OTHERS = """
WITH i AS (
    INSERT INTO flux_inboxes (grant_id, email)
    SELECT 'other-' || g, 'other-' || g || '@example.com' FROM generate_series(1, $1) AS g
    RETURNING id
), t AS (
    INSERT INTO flux_email_threads (inbox_id, provider_thread_id, message_count)
    SELECT i.id, 'o-' || k, 1 FROM i, generate_series(1, 4) AS k
    RETURNING id, inbox_id, provider_thread_id
)
INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id, provider_thread_id,
                                 subject, sent_at, provider_updated_at)
SELECT t.inbox_id, t.id, t.provider_thread_id || '-m1', t.provider_thread_id, 'Other', now(),
       now() - interval '1 day'
FROM t
"""


def load_store(code: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_store_{uuid.uuid4().hex[:6]}",
                                                  code / "nova" / "store.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def three_messages(thread: str, run: int) -> list[Message]:
    me, you = Participant("me@example.com", "Me"), Participant("you@example.com", "You")
    out = []
    for k in range(3):
        body = (f"<div><p>Hi You,</p><p>Message {k} of run {run}. " + "Some text. " * 60
                + "</p><p>Best,<br>Me</p></div>")
        raw = {"id": f"{thread}-r{run}-{k}", "thread_id": thread, "object": "message",
               "subject": "Re: seeded", "body": body, "snippet": body[:100],
               "from": [{"email": me.email, "name": me.name}],
               "to": [{"email": you.email, "name": you.name}], "folders": ["INBOX"],
               "date": 1_700_000_000 + run * 10 + k, "unread": k == 2, "starred": False}
        out.append(Message(
            id=raw["id"], grant_id="g", thread_id=thread, subject="Re: seeded",
            from_=(me,), to=(you,), cc=(), bcc=(), reply_to=(),
            date=datetime.fromtimestamp(raw["date"], UTC), snippet=body[:100], body=body,
            folders=("INBOX",), unread=k == 2, starred=False, attachments=(), raw=raw))
    return out


OLD_COMPLETE = """
UPDATE queued_threads
SET status = 'completed', message_count = $3, processed_at = now(), error_message = NULL,
    retry_at = NULL
WHERE id = $1 AND queue_msg_id = $2 AND status = 'processing'
RETURNING id
"""


async def sync_write(conn: Any, store: ModuleType, inbox: uuid.UUID, thread: str,
                     messages: list[Message], prepared: list[Any], version: datetime,
                     job: Any) -> None:
    """A thread sync's write of that code, in a transaction (the queue delete left out)."""
    async with conn.transaction():
        if hasattr(store, "write_synced_thread"):
            assert await store.write_synced_thread(conn, inbox, thread, prepared, version,
                                                   job["id"], job["queue_msg_id"])
        else:  # before: statement by statement, in a savepoint
            async with conn.transaction():
                await store.upsert_messages(conn, inbox, prepared, version)
                await store.delete_absent_messages(conn, inbox, thread,
                                                   [m.id for m in messages], version)
                assert await conn.fetchval(OLD_COMPLETE, job["id"], job["queue_msg_id"],
                                           len(messages)) is not None


async def write_cost(url: str, store: ModuleType,
                     args: argparse.Namespace) -> dict[str, float]:
    """Median ms of a thread sync writing a thread's 3 messages ("small", "big") and of a
    webhook's one message ("hook small", "hook big"), per mailbox size."""
    pool = await db.create_pool(url, min_size=1, max_size=1)
    out: dict[str, float] = {}
    try:
        # Many small inboxes besides: the planner's estimate of one inbox's rows (its generic
        # plans) is then far below the big one's real count, as in a real deployment.
        await pool.execute(OTHERS, args.others)
        for label, count in (("small", args.small), ("big", args.big)):
            inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                                        " ($1, $1 || '@example.com') RETURNING id",
                                        f"{label}-{uuid.uuid4().hex[:8]}")
            await pool.execute(SEED, inbox, f"{label}-", count)
        await pool.execute("ANALYZE")
        for label, count in (("small", args.small), ("big", args.big)):
            inbox = await pool.fetchval("SELECT id FROM flux_inboxes WHERE grant_id LIKE $1",
                                        f"{label}-%")
            threads = [f"{label}-{run % count + 1}" for run in range(args.runs)]
            config = await pool.fetchval("SELECT queue_inbox_backfill($1)", inbox)
            await pool.execute("UPDATE flux_inbox_configurations SET backfill_status ="
                               " 'thread_sync' WHERE id = $1", config)
            times: dict[str, list[float]] = {label: [], f"hook {label}": []}
            for run, thread in enumerate(threads):
                await pool.execute("UPDATE queued_threads SET status = 'completed'"
                                   " WHERE config_id = $1", config)
                await pool.fetch("SELECT * FROM queue_discovered_threads($1, $2, true)",
                                 config, [thread])
                job = await pool.fetchrow(
                    "UPDATE queued_threads SET status = 'processing' WHERE config_id = $1"
                    " AND provider_thread_id = $2 RETURNING id, queue_msg_id", config, thread)
                messages = three_messages(thread, run)
                prepared = await store.prepare_messages(messages)
                version = datetime.now(UTC)
                async with pool.acquire() as conn:
                    started = time.perf_counter()
                    await sync_write(conn, store, inbox, thread, messages, prepared, version,
                                     job)
                    times[label].append((time.perf_counter() - started) * 1000)
                    hook = three_messages(thread, run + args.runs)[0]
                    started = time.perf_counter()
                    async with conn.transaction():
                        await store.upsert_message(conn, inbox, hook, version)
                    times[f"hook {label}"].append((time.perf_counter() - started) * 1000)
            out |= {k: statistics.median(v[10:]) for k, v in times.items()}
    finally:
        await pool.close()
    return out


# --------------------------------------------------------------------------- baseline code
def unpack(rev: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="nova-bench-code-"))
    archive = subprocess.run(["git", "archive", rev, "nova", "migrations", "sql"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def server() -> str:
    url = os.environ.get("NOVA_BENCH_DATABASE_URL")
    if url:
        return url
    tmp = tempfile.mkdtemp(prefix="nova-bench-pg-")
    os.chmod(tmp, 0o755)
    return str(db.start_embedded(Path(tmp) / "pgdata").get_uri("postgres"))


@contextmanager
def database(server_url: str, code: Path) -> Iterator[str]:
    """A new database migrated by the code of `code` (its migrations, its functions)."""
    name = f"nova_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = db.url_with_database(server_url, name)
    try:
        subprocess.run([sys.executable, "-c", "import sys; from nova.migrate import migrate;"
                        " migrate(sys.argv[1])", url], cwd=code, check=True,
                       env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


async def measure(label: str, server_url: str, code: Path, args: argparse.Namespace,
                  profile: str | None) -> tuple[Cost, dict[str, float]]:
    with database(server_url, code) as url:
        cost = await cpu_cost(url, code, args, profile)
    with database(server_url, code) as url:
        writes = await write_cost(url, load_store(code), args)
    t = max(cost.threads, 1) / 1000  # thousands: seconds per thread read as ms
    w = writes
    print(f"{label:>9} {cost.threads:>7} {cost.messages / t / 1000:>6.2f}"
          f" {cost.threads / cost.seconds:>6.0f} {cost.nova_cpu / t:>7.2f} {cost.pg_cpu / t:>7.2f}"
          f" {cost.run_nova / t:>8.2f} {cost.run_pg / t:>7.2f}"
          f"   {w['small']:>6.2f} {w['big']:>6.2f}"
          f" {w['big'] / w['small']:>5.2f}   {w['hook small']:>6.2f} {w['hook big']:>6.2f}"
          f" {w['hook big'] / w['hook small']:>5.2f}", flush=True)
    return cost, writes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1500, help="sandbox mailbox size")
    ap.add_argument("--rate", type=float, default=2000.0, help="per-grant limit (req/s)")
    ap.add_argument("--big", type=int, default=80_000, help="threads of the big mailbox")
    ap.add_argument("--small", type=int, default=20, help="threads of the small mailbox")
    ap.add_argument("--others", type=int, default=5000,
                    help="other inboxes (4 threads each) seeded beside them")
    ap.add_argument("--runs", type=int, default=40, help="writes per mailbox (> 10)")
    ap.add_argument("--baseline", default="HEAD", help="revision measured beside this tree")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--profile", help="cProfile output of this tree's thread worker")
    args = ap.parse_args()
    if args.runs <= 10:
        ap.error("--runs must be above 10 (the first ten are not counted)")

    server_url = server()
    version = server_version(server_url)
    print(f"PostgreSQL {version}; sandbox {args.threads} threads at {args.rate:g} req/s; "
          f"message writes: {args.big} vs {args.small} threads, median of runs 11-{args.runs}")
    print("CPU ms per synced thread: worker = the thread worker and its backends; run = the"
          " backfill process in discovery + the worker, and the whole PostgreSQL server")
    print(f"{'':>43} {'':>15}   {'thread sync write ms':>20}   {'webhook write ms':>20}")
    print(f"{'code':>9} {'threads':>7} {'msg/th':>6} {'thr/s':>6} {'Nova':>7} {'PG':>7}"
          f" {'Nova run':>8} {'PG run':>7}   {'small':>6} {'big':>6} {'ratio':>5}"
          f"   {'small':>6} {'big':>6} {'ratio':>5}")
    rows = {}
    if not args.no_baseline:
        rows["baseline"] = asyncio.run(measure(args.baseline[:9], server_url,
                                               unpack(args.baseline), args, None))
    rows["this"] = asyncio.run(measure("this tree", server_url, ROOT, args, args.profile))
    if "baseline" in rows:
        (old, old_w), (new, new_w) = rows["baseline"], rows["this"]

        def ratio(f: Callable[[Cost], float]) -> str:
            before = f(old) / max(old.threads, 1)
            return f"{f(new) / max(new.threads, 1) / before:.2f}" if before else "-"
        print(f"this tree / baseline, per thread: Nova {ratio(lambda c: c.nova_cpu)},"
              f" PostgreSQL {ratio(lambda c: c.pg_cpu)}, Nova run {ratio(lambda c: c.run_nova)},"
              f" PostgreSQL run {ratio(lambda c: c.run_pg)};"
              f" big-mailbox writes: thread sync {new_w['big'] / old_w['big']:.2f},"
              f" webhook {new_w['hook big'] / old_w['hook big']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
