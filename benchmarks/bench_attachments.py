"""Download a 1 GB sandbox attachment with `python -m nova.attachments` and, in the same run,
with a plain httpx stream-to-file of the same bytes from the same endpoint.

    python benchmarks/bench_attachments.py [--size-mb 1024] [--rounds 2]
    python benchmarks/bench_attachments.py --backfill 1000 [--hostile 0.25] [--consumers 2]

The sandbox (`python -m nova.sandbox.nylas`, its own process) serves an attachment whose bytes
are generated as they are sent. Each round runs the baseline (httpx `client.stream` +
`aiter_bytes` + `file.write`, no hashing, no fsync) and then the consumer: a real
`python -m nova.attachments` process, started idle before the message is stored; the job is
queued by the storing transaction and the clock runs from that commit to the row's
`downloaded_at` (claim, the shared budget's slot, download, SHA-256, fsync, rename, commit).
Both start with no dirty pages (`sync` before each, not timed): the baseline leaves its
gigabyte to the kernel's writeback, which would otherwise slow whatever runs next. Which of the
two goes first alternates by round. Printed: MB/s of each, their ratio, the CPU seconds each
spent (on a busy machine the one that needs more CPU falls behind: the consumer also hashes
every byte and has it on the disk before it counts as done), the consumer's RSS when idle and
its peak (VmHWM), and that the two files are the same bytes. Goal: ratio >= 0.8, RSS growth
< 64 MB.

With --backfill N: a sandbox mailbox of N threads (a --hostile share carrying NULs, control
characters and file names such as ../../etc/passwd, CON, NUL.txt, .hidden, 300-byte and
NFC/NFD names) is backfilled and thread-synced, then --consumers attachment consumers drain
the queue. Printed: attachments on disk, skipped by reason, failed; text extracted or why not;
files found outside the NAS root (must be 0) and rows whose file is missing (must be 0).

NOVA_BENCH_DATABASE_URL picks the Postgres server (else an embedded one).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402

from nova import db, store  # noqa: E402
from nova.attachments import AttachmentProcessor  # noqa: E402
from nova.backfill import BackfillProcessor  # noqa: E402
from nova.config import load_settings  # noqa: E402
from nova.providers.nylas import parse_message  # noqa: E402
from nova.runtime import Worker  # noqa: E402
from nova.sandbox.nylas import SandboxNylas  # noqa: E402
from nova.threads import ThreadSyncProcessor  # noqa: E402

API_KEY = "bench-key"
ROOT = Path(__file__).resolve().parent.parent
MB = 1_000_000


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_sandbox(log: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "nova.sandbox.nylas", "--threads", "1",
                             "--grants", "1", "--api-key", API_KEY], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=log.open("w"))
    assert proc.stdout is not None
    url = proc.stdout.readline().strip().split("=", 1)[1]
    grant = proc.stdout.readline().split()[1]
    return proc, url, grant


def spawn_consumer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nova.attachments"], env=env, cwd=ROOT,
                            stdout=log.open("a"), stderr=subprocess.STDOUT)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


async def baseline(url: str, grant: str, aid: str, mid: str,
                   out: Path) -> tuple[float, float]:
    """The plainest correct download: stream to a file, nothing else. (seconds, CPU s)"""
    await asyncio.to_thread(os.sync)  # start clean: no dirty pages of the previous run
    cpu = time.process_time()
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
            "GET", f"{url}/v3/grants/{grant}/attachments/{aid}/download",
            params={"message_id": mid}, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
        resp.raise_for_status()
        with out.open("wb") as f:
            async for chunk in resp.aiter_bytes():
                f.write(chunk)
    return time.perf_counter() - started, time.process_time() - cpu


async def new_message(sandbox_url: str, grant: str, size: int) -> dict[str, object]:
    """A sandbox message with one generated attachment of `size` bytes."""
    async with httpx.AsyncClient() as control:
        made = (await control.post(f"{sandbox_url}/_sandbox/grants/{grant}/messages", json={
            "send": False, "subject": "one big attachment",
            "generated": [["backup.bin", "application/octet-stream", size]]})).json()
    return made["message"]  # type: ignore[no-any-return]


async def consumer_round(db_url: str, sandbox_url: str, grant: str, size: int, nas: Path,
                         log: Path, made: dict[str, object],
                         ) -> tuple[float, float, int, int, str, Path]:
    env = {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": API_KEY,
           "NYLAS_API_URI": sandbox_url, "NOVA_ATTACHMENT_PATH": str(nas), "LOG_LEVEL": "info",
           "PYTHONPATH": str(ROOT)}
    proc = spawn_consumer(env, log)
    pool = await db.create_pool(db_url, min_size=1, max_size=2)
    try:
        deadline = time.monotonic() + 30
        while "[Attachments] started" not in await asyncio.to_thread(log.read_text):
            assert proc.poll() is None and time.monotonic() < deadline, "consumer did not start"
            await asyncio.sleep(0.1)
        inbox = await pool.fetchval("SELECT id FROM flux_inboxes WHERE grant_id = $1", grant)

        async def download(made: dict[str, object]) -> tuple[float, Any]:
            message = parse_message(made, grant)
            await asyncio.to_thread(os.sync)  # start clean: no dirty pages of a previous run
            async with pool.acquire() as conn, conn.transaction():
                await store.upsert_message(conn, inbox, message, store.sync_version())
            queued = time.perf_counter()
            row_id = await pool.fetchval("SELECT id FROM flux_email_attachments"
                                         " WHERE provider_message_id = $1", message.id)
            while True:
                row = await pool.fetchrow(
                    "SELECT status, error_message, checksum, local_path, size"
                    " FROM flux_email_attachments WHERE id = $1", row_id)
                if row["status"] in ("completed", "failed"):
                    return time.perf_counter() - queued, row
                assert proc.poll() is None, f"the consumer died: see {log}"
                await asyncio.sleep(0.02)

        # A first small download warms the process up (imports, pools, the budget's row):
        # the growth measured next is what a gigabyte costs.
        await download(await new_message(sandbox_url, grant, 256 * 1024))
        await asyncio.sleep(0.5)
        idle_kib = proc_kib(proc.pid, "VmRSS")
        cpu = cpu_seconds(proc.pid)
        seconds, row = await download(made)
        cpu = cpu_seconds(proc.pid) - cpu
        peak_kib = proc_kib(proc.pid, "VmHWM")
        assert row["status"] == "completed" and row["size"] == size, row["error_message"]
        return seconds, cpu, idle_kib, peak_kib, row["checksum"], nas / row["local_path"]
    finally:
        await pool.close()
        proc.terminate()
        proc.wait(30)


async def run(size_mb: int, rounds: int) -> None:
    size = size_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="nova-bench-att-") as tmp_name, \
            bench_database() as db_url:
        tmp = Path(tmp_name)
        sandbox, url, grant = start_sandbox(tmp / "sandbox.log")
        try:
            pool = await db.create_pool(db_url, min_size=1, max_size=1)
            await pool.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, 'b@x')",
                               grant)
            await pool.close()
            print(f"PostgreSQL {server_version(db_url)}, attachment {size / MB:,.0f} MB "
                  f"({size_mb} MiB), {rounds} round(s), files in {tmp}")
            print(f"{'round':>5} {'httpx MB/s':>11} {'nova MB/s':>10} {'ratio':>6} "
                  f"{'CPU s httpx/nova':>17} {'idle RSS':>9} {'peak RSS':>9} {'growth':>7}  "
                  f"same bytes")
            ratios, growths, bases, novas = [], [], [], []
            base = base_cpu = 0.0
            for n in range(1, rounds + 1):
                nas = tmp / f"nas{n}"
                plain = tmp / f"plain{n}.bin"
                made = await new_message(url, grant, size)
                aid = made["attachments"][0]["id"]  # type: ignore[index]
                mid = str(made["id"])
                if n % 2 == 0:  # alternate which goes first: a fair share of the noise
                    base, base_cpu = await baseline(url, grant, aid, mid, plain)
                took, cpu, idle, peak, checksum, path = await consumer_round(
                    db_url, url, grant, size, nas, tmp / "consumer.log", made)
                if n % 2 == 1:
                    base, base_cpu = await baseline(url, grant, aid, mid, plain)
                same = (await asyncio.to_thread(file_sha256, plain) == checksum
                        == await asyncio.to_thread(file_sha256, path))
                ratio = base / took
                ratios.append(ratio)
                bases.append(size / MB / base)
                novas.append(size / MB / took)
                growths.append((peak - idle) / 1024)
                print(f"{n:>5} {size / MB / base:>11.0f} {size / MB / took:>10.0f} "
                      f"{ratio:>6.2f} {base_cpu:>8.2f}/{cpu:<8.2f} "
                      f"{idle / 1024:>7.0f}MB {peak / 1024:>7.0f}MB "
                      f"{(peak - idle) / 1024:>5.0f}MB  {same}")
                await asyncio.to_thread(plain.unlink)
                await asyncio.to_thread(path.unlink)
            half = len(ratios) // 2
            print(f"median: httpx {sorted(bases)[half]:.0f} MB/s, nova "
                  f"{sorted(novas)[half]:.0f} MB/s, ratio of medians "
                  f"{sorted(novas)[half] / sorted(bases)[half]:.2f}, median ratio "
                  f"{sorted(ratios)[half]:.2f} (goal >= 0.80); largest RSS growth "
                  f"{max(growths):.0f} MB (goal < 64 MB)")
        finally:
            sandbox.terminate()
            sandbox.wait(30)


def files_under(folder: Path) -> set[Path]:
    return {p.resolve() for p in folder.rglob("*") if p.is_file()}


async def backfill(threads: int, hostile: float, consumers: int) -> None:
    with tempfile.TemporaryDirectory(prefix="nova-bench-att-") as tmp_name, \
            bench_database() as db_url, SandboxNylas(
                threads=threads, seed=3, api_key=API_KEY, hostile=hostile,
                anchor=int(time.time()) - 3600) as sb:
        tmp = Path(tmp_name)
        root = (tmp / "nas").resolve()
        s = load_settings(database_url=db_url, nylas_api_key=API_KEY, nylas_api_uri=sb.base_url,
                          provider_rate_limit=2000, provider_burst=200, batch_size=10,
                          attachment_path=root, log_level="warning")
        pool = await db.create_pool(db_url, min_size=1, max_size=4)
        try:
            grant = sb.grant_ids[0]
            inbox = await pool.fetchval(
                "INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, 'h@x') RETURNING id",
                grant)
            await pool.execute(
                "SELECT queue_inbox_backfill($1, now() - interval '1 year 2 hours')", inbox)
            started = time.perf_counter()
            await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
            await asyncio.gather(*(Worker(ThreadSyncProcessor(s), s, database_url=db_url)
                                   .run(burst=True) for _ in range(2)))
            synced = time.perf_counter() - started
            total = await pool.fetchval("SELECT count(*) FROM flux_email_attachments")
            started = time.perf_counter()
            while await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads"):
                await asyncio.gather(*(
                    Worker(AttachmentProcessor(s, retry_base_delay=0.05, retry_max_delay=0.2),
                           s, database_url=db_url).run(burst=True) for _ in range(consumers)))
                await asyncio.sleep(0.1)
            took = time.perf_counter() - started
            stored = await pool.fetch(
                "SELECT status, skipped_reason, local_path, size, original_filename,"
                " extracted_text IS NOT NULL AS has_text FROM flux_email_attachments")
        finally:
            await pool.close()
        hostile_threads = len(sb.hostile_threads(grant))
        expected = {(root / r["local_path"]).resolve() for r in stored if r["local_path"]}
        on_disk = await asyncio.to_thread(files_under, root)
        everything = await asyncio.to_thread(files_under, tmp)
        outside = everything - on_disk
        missing = {p for p in expected if p not in on_disk}
        count = Counter(r["status"] for r in stored)
        skipped = Counter(r["skipped_reason"] for r in stored if r["status"] == "skipped")
        no_text = Counter(r["skipped_reason"] for r in stored
                          if r["status"] == "completed" and not r["has_text"])
        weird = sum(1 for r in stored if r["original_filename"] is not None and (
            "/" in r["original_filename"] or "\\" in r["original_filename"]
            or r["original_filename"].startswith(".") or r["original_filename"] in ("", "CON")
            or len(r["original_filename"].encode()) > 255))
        print(f"PostgreSQL {server_version(db_url)}; sandbox mailbox of {threads:,} threads, "
              f"{hostile_threads:,} hostile; synced in {synced:.1f}s")
        print(f"attachments {total:,}: on disk {count['completed']:,}, skipped {dict(skipped)}, "
              f"failed {count['failed']:,}, other {total - sum(count.values()):,} "
              f"({total / took:,.0f}/s with {consumers} consumer(s), "
              f"{sum(r['size'] or 0 for r in stored) / 1e6:,.0f} MB)")
        print(f"names with separators, leading dots, reserved or over 255 bytes: {weird:,}")
        print(f"text extracted: {sum(1 for r in stored if r['has_text']):,}; "
              f"on disk without text, by reason: {dict(no_text)}")
        print(f"files outside the NAS root: {len(outside)}; rows whose file is missing: "
              f"{len(missing)}; files on disk: {len(on_disk):,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="MiB (default 1024: 1 GiB)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backfill", type=int, default=0, metavar="THREADS",
                    help="instead: backfill a (hostile) sandbox mailbox of THREADS threads")
    ap.add_argument("--hostile", type=float, default=0.25)
    ap.add_argument("--consumers", type=int, default=2)
    args = ap.parse_args()
    if args.backfill:
        asyncio.run(backfill(args.backfill, args.hostile, args.consumers))
    else:
        asyncio.run(run(args.size_mb, args.rounds))


if __name__ == "__main__":
    main()
