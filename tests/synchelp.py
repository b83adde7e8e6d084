"""Helpers for the backfill / thread sync / completion tests: settings, in-process workers,
subprocess workers, and the comparison of the database with the sandbox mailbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from nova.backfill import BackfillProcessor
from nova.completion import CompletionMonitor
from nova.config import Settings, load_settings
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor

API_KEY = "sync-test-key"
ROOT = Path(__file__).resolve().parent.parent


def make_sandbox(threads: int, **kw: Any) -> SandboxNylas:
    """A sandbox whose mailbox lies wholly inside the default one-year range."""
    return SandboxNylas(threads=threads, seed=kw.pop("seed", 11), api_key=API_KEY,
                        anchor=int(time.time()) - 3600, **kw)


def settings(sb: SandboxNylas, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "nylas_api_key": API_KEY, "nylas_api_uri": sb.base_url, "batch_size": 10,
        "poll_interval_ms": 500, "visibility_timeout": 4, "provider_rate_limit": 2000,
        "provider_burst": 200, "completion_check_interval_ms": 100,
        "recovery_check_interval_ms": 300, "catchup_gap_seconds": 0,
        "shutdown_grace_seconds": 2, "revoke_confirm_seconds": 0.2}
    values.update(kw)
    return load_settings(**values)


def env(db_url: str, sb: SandboxNylas, **extra: str) -> dict[str, str]:
    """Environment of a subprocess worker (small timeouts, a generous budget)."""
    out = {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": API_KEY,
           "NYLAS_API_URI": sb.base_url, "VISIBILITY_TIMEOUT": "2", "POLL_INTERVAL_MS": "500",
           "BATCH_SIZE": "10", "NOVA_PROVIDER_RATE_LIMIT": "2000",
           "NOVA_PROVIDER_BURST": "200", "LOG_LEVEL": "info", "PYTHONPATH": str(ROOT)}
    out.update(extra)
    return out


def spawn(module: str, environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", module], env=environment, stdout=handle,
                            stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float = 60,
                   interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def add_inbox(pool: asyncpg.Pool, grant_id: str) -> uuid.UUID:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, $1 || '@example.com')"
        " RETURNING id", grant_id)


# The sandbox mailbox spans the year before its anchor (an hour ago); `now() - 1 year`, the
# default start, would cut off that hour's oldest threads, so start within the day of grace.
FULL_YEAR = timedelta(days=365, hours=2)


async def start_backfill(pool: asyncpg.Pool, inbox_id: uuid.UUID, kind: str = "full",
                         since: Any = None) -> uuid.UUID:
    since = since if since is not None else datetime.now(UTC) - FULL_YEAR
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT queue_inbox_backfill($1, $2, NULL, $3)", inbox_id, since, kind)


async def discover(pool: asyncpg.Pool, sb: SandboxNylas) -> tuple[uuid.UUID, uuid.UUID]:
    """An inbox of the sandbox's first grant with a backfill whose discovery is done (its
    threads queued, none synced)."""
    inbox = await add_inbox(pool, sb.grant_ids[0])
    config = await start_backfill(pool, inbox)
    s = settings(sb)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    return inbox, config


async def status(pool: asyncpg.Pool, config_id: uuid.UUID) -> str:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT backfill_status FROM flux_inbox_configurations WHERE id = $1", config_id)


@contextlib.asynccontextmanager
async def running(db_url: str, s: Settings, *, backfill: int = 1, threads: int = 2,
                  monitor: bool = True,
                  thread_kw: dict[str, Any] | None = None) -> AsyncIterator[list[Worker]]:
    """Backfill and thread workers (each with its own pool, as separate processes would have)
    plus a completion monitor, running in this event loop until the block ends."""
    workers = [Worker(BackfillProcessor(s), s, database_url=db_url) for _ in range(backfill)]
    workers += [Worker(ThreadSyncProcessor(s, **(thread_kw or {})), s, database_url=db_url)
                for _ in range(threads)]
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(w.run()) for w in workers]
    mon = CompletionMonitor(s, database_url=db_url) if monitor else None
    if mon is not None:
        tasks.append(asyncio.create_task(mon.run()))
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        if mon is not None:
            mon.stop()
        await asyncio.gather(*tasks)


async def assert_db_equals_mailbox(pool: asyncpg.Pool, sb: SandboxNylas, grant_id: str,
                                   inbox_id: uuid.UUID) -> int:
    """Every thread and message of the mailbox is stored, once, under the right thread."""
    expected: dict[str, set[str]] = {}
    for tid in sb.thread_ids(grant_id):
        thread = sb.thread_json(grant_id, tid)
        assert thread is not None
        expected[tid] = set(thread["message_ids"])
    threads = await pool.fetch(
        "SELECT provider_thread_id, message_count FROM flux_email_threads WHERE inbox_id = $1",
        inbox_id)
    assert sorted(r["provider_thread_id"] for r in threads) == sorted(expected)
    rows = await pool.fetch(
        "SELECT m.provider_message_id, t.provider_thread_id FROM flux_email_messages m"
        " JOIN flux_email_threads t ON t.id = m.thread_id WHERE m.inbox_id = $1", inbox_id)
    stored: dict[str, set[str]] = {}
    for r in rows:
        stored.setdefault(r["provider_thread_id"], set()).add(r["provider_message_id"])
    assert len(rows) == sum(len(v) for v in expected.values())
    assert stored == expected
    return len(rows)
