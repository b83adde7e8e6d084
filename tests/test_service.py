"""`python -m nova`: the demo (NOVA_DEMO=1, here on a test database) backfills the Nylas and
Gmail sandbox mailboxes, sandbox webhooks and Gmail pushes flow through the receiver, and
SIGTERM stops everything with exit code 0; production (a database URL and a provider's
settings) starts no sandbox, leaves the inboxes of unconfigured providers as they are, and a
demo refuses a database holding inboxes it did not create."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from servers import free_port

# What differs on the embedded Postgres: CI runs these there too (README's test command).
pytestmark = pytest.mark.embedded


def completed_providers(conn: psycopg.Connection[Any]) -> list[str]:
    """The providers of the inboxes whose backfill has completed, one entry per backfill."""
    return [r[0] for r in conn.execute(
        "SELECT i.provider FROM flux_inbox_configurations c"
        " JOIN flux_inboxes i ON i.id = c.inbox_id"
        " WHERE c.backfill_status = 'completed' ORDER BY 1").fetchall()]


def nova_env(db_url: str, tmp_path: Path, **settings: str) -> dict[str, str]:
    """`python -m nova`'s environment: this machine's, less any Nova, Nylas or Gmail setting,
    on the test's database and NAS folder, plus ``settings``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "GMAIL_", "DATABASE_URL"))}
    return {**env, "NOVA_DATABASE_URL": db_url, "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas"),
            **settings}


def test_everything_in_one_process_against_the_sandbox(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = nova_env(db_url, tmp_path, NOVA_DEMO="1", NOVA_RECEIVER_HOST="127.0.0.1",
                   NOVA_RECEIVER_PORT=str(port), NOVA_SANDBOX_THREADS="20",
                   NOVA_SANDBOX_EVENT_SECONDS="0.5", NOVA_PROVIDER_RATE_LIMIT="200",
                   COMPLETION_CHECK_INTERVAL_MS="300")
    proc = subprocess.Popen([sys.executable, "-m", "nova"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "sandbox backfill did not complete"
                hooks = conn.execute(
                    "SELECT count(*) FROM flux_webhook_notifications"
                    " WHERE status = 'processed' AND provider = 'nylas'").fetchone()
                if completed_providers(conn) == ["gmail", "nylas"] and hooks and hooks[0] >= 2:
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
            assert conn.execute(
                "SELECT provider, count(*) FROM flux_inboxes GROUP BY 1 ORDER BY 1").fetchall() \
                == [("gmail", 1), ("nylas", 3)]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/webhooks/nylas",
                         params={"challenge": "c"}).text == "c"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "[Monitor] Config" in out and "completed" in out
    assert "using the Nylas sandbox" in out and "using the Gmail sandbox" in out


def test_with_credentials_but_no_webhook_secret_the_processors_run_without_receiver(
        db_url: str, tmp_path: Path) -> None:
    from nova.sandbox.nylas import SandboxNylas

    with SandboxNylas(threads=5, seed=2, api_key="real-looking-key") as sandbox:
        port = free_port()
        env = nova_env(db_url, tmp_path, NYLAS_API_KEY="real-looking-key",
                       NYLAS_API_URI=sandbox.base_url, NOVA_RECEIVER_PORT=str(port))
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


class Nova:
    """`python -m nova` as a subprocess; its output read as it comes (a full pipe would
    block it), so a test can wait for a log line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "nova"], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> None:
        assert self.proc.poll() is None, "nova exited:\n" + self.output

    def line(self, pattern: str, deadline: float) -> re.Match[str]:
        while True:
            for line in list(self.lines):
                if (found := re.search(pattern, line)) is not None:
                    return found
            self.alive()
            assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n{self.output}"
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._reader.join(10)
        return code


def wait_until(nova: Nova, deadline: float, what: str, check: Any) -> Any:
    while not (result := check()):
        nova.alive()
        assert time.monotonic() < deadline, f"{what}:\n{nova.output}"
        time.sleep(0.1)
    return result


GMAIL_INBOX = ("SELECT id, grant_id, email, status FROM flux_inboxes"
               " WHERE provider = 'gmail'")
GMAIL_CREDENTIALS = """
SELECT c.token_uri, c.secret FROM flux_inbox_credentials c
JOIN flux_inboxes i ON i.id = c.inbox_id WHERE i.provider = 'gmail'
"""
GMAIL_PUSHES = """
SELECT count(*) FILTER (WHERE status = 'processed'), count(*) FROM flux_webhook_notifications
WHERE provider = 'gmail' AND notification_type = 'gmail.history' AND received_at >= %s
"""


def test_the_gmail_sandbox_is_a_second_demo_inbox_fed_by_pushes_across_restarts(
        db_url: str, tmp_path: Path) -> None:
    """Without NYLAS_API_KEY the Gmail sandbox's user is an inbox too: backfilled with its
    credentials stored encrypted, watched, and its new mail (the ticker's, a message added at
    the sandbox) arrives by push alone (GMAIL_HISTORY_POLL_SECONDS=0). A second run on the same
    database keeps the inbox and its backfill, saves the new sandbox's credentials and takes
    its pushes as new ones."""
    from pydantic import SecretStr

    from nova.config import Settings
    from nova.credentials import cipher, unseal, unsealed
    from nova.service import SANDBOX_CREDENTIALS_KEY

    threads = 6
    env = nova_env(db_url, tmp_path, NOVA_DEMO="1", NOVA_RECEIVER_HOST="127.0.0.1",
                   NOVA_SANDBOX_THREADS=str(threads), NOVA_SANDBOX_EVENT_SECONDS="0.4",
                   GMAIL_HISTORY_POLL_SECONDS="0", COMPLETION_CHECK_INTERVAL_MS="300")
    fernet = cipher(Settings(credentials_key=SecretStr(SANDBOX_CREDENTIALS_KEY)))

    # ---- first run
    started = datetime.now(UTC) - timedelta(seconds=2)
    nova = Nova({**env, "NOVA_RECEIVER_PORT": str(free_port())})
    try:
        deadline = time.monotonic() + 25
        base, email = nova.line(r"using the Gmail sandbox at (http://\S+) \(user (\S+@\S+)\)",
                                deadline).groups()
        users = httpx.get(f"{base}/_sandbox/users").json()
        assert [u["email"] for u in users] == [email]
        refresh_token = users[0]["credentials"]["refresh_token"]
        with psycopg.connect(db_url, autocommit=True) as conn:
            wait_until(nova, deadline, "both demo backfills did not complete",
                       lambda: completed_providers(conn) == ["gmail", "nylas"])
            inboxes = conn.execute(GMAIL_INBOX).fetchall()
            assert len(inboxes) == 1, inboxes
            inbox_id, grant_id, stored_email, status = inboxes[0]
            assert (grant_id, stored_email, status) == (email.lower(), email, "active")
            synced = conn.execute("SELECT count(*) FROM flux_email_threads WHERE inbox_id = %s",
                                  (inbox_id,)).fetchone()
            assert synced is not None and synced[0] >= threads
            creds = conn.execute(GMAIL_CREDENTIALS).fetchall()
            assert len(creds) == 1 and creds[0][0] is None  # sealed, not a plain column
            assert unsealed(creds[0][1], fernet, owner=email)["token_uri"] == f"{base}/token"
            assert refresh_token.encode() not in bytes(creds[0][1])  # encrypted at rest
            assert unseal(creds[0][1], fernet, owner=email)[1] == refresh_token

            # the ticker's mail (dated now; the generated mailbox ends before today)
            def ticked() -> bool:
                row = conn.execute("SELECT count(*) FROM flux_email_messages"
                                   " WHERE inbox_id = %s AND sent_at >= %s",
                                   (inbox_id, started)).fetchone()
                return row is not None and row[0] > 0
            wait_until(nova, deadline, "no ticker mail reached the Gmail inbox", ticked)

            # a message added at the sandbox after the backfill: only a push can bring it
            probe = f"probe {uuid.uuid4()}"
            added = httpx.post(f"{base}/_sandbox/users/{email}/messages",
                               json={"subject": probe, "text": "pushed"}).json()

            def probed() -> list[Any]:
                return conn.execute(
                    "SELECT provider_message_id, provider_thread_id FROM flux_email_messages"
                    " WHERE inbox_id = %s AND subject = %s", (inbox_id, probe)).fetchall()
            assert wait_until(nova, deadline, "the added message did not arrive", probed) \
                == [(added["id"], added["threadId"])]
            pushes = conn.execute(GMAIL_PUSHES, (started,)).fetchone()
            assert pushes is not None and pushes[0] >= 1
        delivered = [e for e in httpx.get(f"{base}/_sandbox/push").json()
                     if e["outcome"] == "delivered"]
        assert delivered and all(e["email"] == email for e in delivered)
    finally:
        code = nova.stop()
    assert code == 0, nova.output
    assert nova.output.count("Gmail sandbox backfill queued") == 1

    # ---- second run, same database: a fresh sandbox
    restarted = datetime.now(UTC)
    again = Nova({**env, "NOVA_RECEIVER_PORT": str(free_port())})
    try:
        deadline = time.monotonic() + 20
        base2, email2 = again.line(
            r"using the Gmail sandbox at (http://\S+) \(user (\S+@\S+)\)", deadline).groups()
        assert email2 == email and base2 != base
        with psycopg.connect(db_url, autocommit=True) as conn:
            def fresh_pushes_processed() -> bool:
                row = conn.execute(GMAIL_PUSHES, (restarted,)).fetchone()
                return row is not None and row[0] >= 2
            wait_until(again, deadline, "no push of the second run was processed",
                       fresh_pushes_processed)
            assert [r[0] for r in conn.execute(GMAIL_INBOX).fetchall()] == [inbox_id]
            assert conn.execute("SELECT count(*) FROM flux_inbox_configurations"
                                " WHERE inbox_id = %s", (inbox_id,)).fetchone() == (1,)
            creds = conn.execute(GMAIL_CREDENTIALS).fetchall()
            assert len(creds) == 1 and creds[0][0] is None
            assert unsealed(creds[0][1], fernet, owner=email)["token_uri"] == f"{base2}/token"
            assert unseal(creds[0][1], fernet, owner=email)[1] == refresh_token
            watched = conn.execute("SELECT watch_expires_at FROM flux_inboxes WHERE id = %s",
                                   (inbox_id,)).fetchone()
            assert watched is not None and watched[0] is not None and watched[0] > restarted
    finally:
        code = again.stop()
    assert code == 0, again.output
    assert "Gmail sandbox backfill queued" not in again.output
    assert "duplicate gmail.history" not in again.output


def test_a_gmail_only_deployment_leaves_nylas_inboxes_as_they_are(
        db_url: str, tmp_path: Path) -> None:
    """A database URL and NOVA_CREDENTIALS_KEY without NYLAS_API_KEY: Nylas is simply not
    configured. No sandbox starts, no demo row appears, and a Nylas inbox with a queued
    backfill stays exactly as it was: its backfill job waits in the queue, no attempt spent."""
    from cryptography.fernet import Fernet

    with psycopg.connect(db_url, autocommit=True) as conn:
        inbox = conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                             " ('real-grant-1', 'real@example.com') RETURNING id").fetchone()
        assert inbox is not None
        config = conn.execute("SELECT queue_inbox_backfill(%s)", (inbox[0],)).fetchone()
    env = nova_env(db_url, tmp_path, NOVA_RECEIVER_PORT=str(free_port()),
                   NOVA_CREDENTIALS_KEY=Fernet.generate_key().decode(),
                   NOVA_SANDBOX_THREADS="3", NOVA_SANDBOX_EVENT_SECONDS="0.2")
    nova = Nova(env)
    try:
        nova.line(r"\[Backfill\] job \d+ deferred .*provider nylas is not configured",
                  time.monotonic() + 30)
        time.sleep(1)  # time for anything else to happen that should not
    finally:
        code = nova.stop()
    assert code == 0, nova.output
    assert "sandbox" not in nova.output.lower(), nova.output
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT grant_id, status, demo FROM flux_inboxes").fetchall() \
            == [("real-grant-1", "active", False)]
        assert conn.execute("SELECT backfill_status, backfill_attempts, last_error"
                            " FROM flux_inbox_configurations").fetchall() \
            == [("queued", 0, None)]
        assert conn.execute("SELECT read_ct, message->>'config_id'"
                            " FROM pgmq.q_inbox_backfill_jobs").fetchall() \
            == [(0, str(config[0]))]
        assert conn.execute("SELECT count(*) FROM flux_email_threads").fetchone() == (0,)


def test_a_demo_refuses_a_database_with_inboxes_it_did_not_create(
        db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES"
                     " ('real-grant-1', 'real@example.com')")
    env = nova_env(db_url, tmp_path, NOVA_DEMO="1", NOVA_RECEIVER_PORT=str(free_port()),
                   NOVA_SANDBOX_THREADS="3")
    done = subprocess.run([sys.executable, "-m", "nova"], env=env, text=True, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 2, done.stdout
    refusals = [line for line in done.stdout.splitlines() if "will not run" in line]
    assert len(refusals) == 1 and "real@example.com (nylas)" in refusals[0], done.stdout
    assert "Traceback" not in done.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT email FROM flux_inboxes").fetchall() \
            == [("real@example.com",)]


def test_a_database_url_and_no_provider_is_refused_without_a_sandbox(
        db_url: str, tmp_path: Path) -> None:
    env = nova_env(db_url, tmp_path, NOVA_RECEIVER_PORT=str(free_port()),
                   NYLAS_API_KEY="", NOVA_CREDENTIALS_KEY=" ")  # blank is unset
    done = subprocess.run([sys.executable, "-m", "nova"], env=env, text=True, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 2, done.stdout
    assert "no provider is configured" in done.stdout and "sandbox at" not in done.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM flux_inboxes").fetchone() == (0,)


def test_an_unusable_credentials_key_stops_nova_with_exit_code_2(
        db_url: str, tmp_path: Path) -> None:
    env = nova_env(db_url, tmp_path, NOVA_RECEIVER_PORT=str(free_port()),
                   NOVA_CREDENTIALS_KEY="too-short", NOVA_SANDBOX_THREADS="3")
    done = subprocess.run([sys.executable, "-m", "nova"], env=env, text=True, timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert done.returncode == 2, done.stdout
    assert "NOVA_CREDENTIALS_KEY is too short" in done.stdout
    assert "Traceback" not in done.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM flux_inboxes").fetchone() == (0,)
