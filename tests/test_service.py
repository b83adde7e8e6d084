"""`python -m nova` with nothing configured but a database: the sandbox mailbox is backfilled,
sandbox webhooks flow through the receiver, and SIGTERM stops everything with exit code 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_everything_in_one_process_against_the_sandbox(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "DATABASE_URL"))}
    env.update({"NOVA_DATABASE_URL": db_url, "NOVA_RECEIVER_HOST": "127.0.0.1",
                "NOVA_RECEIVER_PORT": str(port), "NOVA_SANDBOX_THREADS": "20",
                "NOVA_SANDBOX_EVENT_SECONDS": "0.5", "NOVA_PROVIDER_RATE_LIMIT": "200",
                "COMPLETION_CHECK_INTERVAL_MS": "300",
                "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas")})
    proc = subprocess.Popen([sys.executable, "-m", "nova"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "sandbox backfill did not complete"
                done = conn.execute(
                    "SELECT count(*) FROM flux_inbox_configurations"
                    " WHERE backfill_status = 'completed'").fetchone()
                hooks = conn.execute(
                    "SELECT count(*) FROM flux_webhook_notifications"
                    " WHERE status = 'processed'").fetchone()
                if done == (1,) and hooks and hooks[0] >= 2:
                    break
                time.sleep(0.2)
            threads = conn.execute("SELECT count(*) FROM flux_email_threads").fetchone()
            assert threads is not None and threads[0] >= 20
            while True:  # the backfilled mailbox's attachments, on disk
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "attachments were not downloaded"
                files = conn.execute(
                    "SELECT local_path, size FROM flux_email_attachments"
                    " WHERE status = 'completed'").fetchall()
                left = conn.execute("SELECT count(*) FROM flux_email_attachments"
                                    " WHERE status <> 'completed'").fetchone()
                if files and left == (0,):
                    break
                time.sleep(0.2)
            for local_path, size in files:
                assert (tmp_path / "nas" / local_path).stat().st_size == size
            assert conn.execute("SELECT count(*) FROM flux_inboxes").fetchone() == (3,)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/webhooks/nylas",
                         params={"challenge": "c"}).text == "c"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "[Monitor] Config" in out and "completed" in out
    assert "using the Nylas sandbox" in out


def test_with_credentials_but_no_webhook_secret_the_processors_run_without_receiver(
        db_url: str, tmp_path: Path) -> None:
    from nova.sandbox.nylas import SandboxNylas

    with SandboxNylas(threads=5, seed=2, api_key="real-looking-key") as sandbox:
        port = free_port()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NYLAS_", "NOVA_", "DATABASE_URL"))}
        env.update({"NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": "real-looking-key",
                    "NYLAS_API_URI": sandbox.base_url, "NOVA_RECEIVER_PORT": str(port),
                    "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas")})
        proc = subprocess.Popen([sys.executable, "-m", "nova"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                inbox = conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                                     " (%s, 'r@x.com') RETURNING id",
                                     (sandbox.grant_ids[0],)).fetchone()
                assert inbox is not None
                conn.execute("SELECT queue_inbox_backfill(%s, now() - interval '1 year 23 hours')",
                             (inbox[0],))
                deadline = time.monotonic() + 60
                while conn.execute("SELECT count(*) FROM flux_email_threads").fetchone() != (5,):
                    assert proc.poll() is None, proc.communicate()[0]
                    assert time.monotonic() < deadline, "threads were not synced"
                    time.sleep(0.2)
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                raise AssertionError("a receiver answered without a webhook secret")
            except httpx.TransportError:
                pass
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "the receiver is not started" in out and "using the Nylas sandbox" not in out
