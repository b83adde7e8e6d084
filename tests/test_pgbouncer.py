"""Nova through PgBouncer in transaction mode, with a server pool of 5 connections that every
client shares: consecutive transactions of one client run on different server connections, so
a named prepared statement (`prepared statement "__asyncpg_stmt_1__" does not exist`), a LISTEN,
a session advisory lock or a temp table kept across transactions breaks here (nova.db).

Each test starts a pgbouncer of its own on a free loopback port in front of its database, and
is skipped where the binary is absent (Debian: apt-get install pgbouncer).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from servers import ServerThread
from synchelp import (
    add_inbox,
    assert_db_equals_mailbox,
    make_sandbox,
    running,
    settings,
    start_backfill,
    status,
    wait_for,
)
from test_gmail_sync import assert_matches_mailbox, backfilled, gmail_settings, sync_changes
from test_gmail_sync import make_sandbox as gmail_sandbox
from test_verify import verify
from test_webhooks import API_KEY, SECRET, notifications

from nova import db
from nova.config import Settings, load_settings
from nova.migrate import migrate
from nova.receiver import create_app
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.webhooks import WebhookProcessor

# Debian installs it in /usr/sbin, which is not on every PATH.
PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer",
                                                      path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(PGBOUNCER is None,
                                reason="pgbouncer is not installed (apt-get install pgbouncer)")

SERVER_POOL = 5  # server connections per database, shared by all of a test's clients


class PgBouncer:
    """A pgbouncer process in front of the server of `url`, pool_mode=transaction."""

    def __init__(self, url: str, workdir: Path) -> None:
        info = conninfo_to_dict(url)
        self.dbname = str(info["dbname"])
        self.user = str(info.get("user") or getpass.getuser())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql://{quote(self.user)}@127.0.0.1:{self.port}/{quote(self.dbname)}"
        self.log = workdir / "pgbouncer.log"
        # trust: pgbouncer asks clients for nothing; it logs into the server with the password
        # of the auth_file, the test server's own if it has one.
        users = workdir / "pgbouncer_users.txt"
        users.write_text(f'"{self.user}" "{info.get("password") or ""}"\n')
        host = str(info.get("host") or "localhost")
        server = f"host={host} port={info.get('port') or 5432}"
        # pgbouncer refuses to run as root: it reads its files, then becomes this user, who
        # must reach the server's socket directory when the server listens on one (embedded).
        self.run_as = (pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/")
                       else "nobody")
        lines = ["[databases]", f"* = {server}", "", "[pgbouncer]",
                 "listen_addr = 127.0.0.1", f"listen_port = {self.port}", "unix_socket_dir =",
                 "auth_type = trust", f"auth_file = {users}", "pool_mode = transaction",
                 f"default_pool_size = {SERVER_POOL}", f"min_pool_size = {SERVER_POOL}",
                 # every server connection open and taken in turn: a client's next
                 # transaction runs on another one even when it is the only client
                 "server_round_robin = 1", "max_client_conn = 1000"]
        if _version() >= (1, 21):  # protocol-level prepared statements: off, as before 1.21
            lines.append("max_prepared_statements = 0")
        self.config = workdir / "pgbouncer.ini"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        assert PGBOUNCER is not None
        user = ["-u", self.run_as] if os.geteuid() == 0 else []
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([PGBOUNCER, *user, str(self.config)], stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log.read_text()}"
                                       ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # what SIGTERM means changed across versions; nothing to keep
            self.proc.wait(10)


def _version() -> tuple[int, ...]:
    assert PGBOUNCER is not None
    out = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True).stdout
    return tuple(int(x) for x in out.split()[1].split(".")[:2])


@pytest.fixture
def bouncer(db_url: str, tmp_path: Path) -> Iterator[str]:
    """The test's database through a PgBouncer of its own."""
    with PgBouncer(db_url, tmp_path) as pgb:
        yield pgb.url


@pytest.fixture
def nova_log(caplog: pytest.LogCaptureFixture,
             monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Nova's log lines; what nova.db says once per process may be said again in this test."""
    monkeypatch.setattr(db, "_said", set())
    caplog.set_level(logging.INFO, logger="nova")
    return caplog


def no_statement_errors(log: pytest.LogCaptureFixture) -> None:
    bad = [r.getMessage() for r in log.records
           if "prepared statement" in r.getMessage() or "does not exist" in r.getMessage()]
    assert bad == []


async def _is(pool: asyncpg.Pool, config: object, wanted: str) -> bool:
    return await status(pool, config) == wanted  # type: ignore[arg-type]


async def test_a_300_thread_backfill_through_pgbouncer_is_exact_and_verifies_clean(
        pool: asyncpg.Pool, db_url: str, bouncer: str,
        nova_log: pytest.LogCaptureFixture) -> None:
    assert await db.behind_pooler(bouncer) and not await db.behind_pooler(db_url)
    with make_sandbox(300) as sb:
        grant = sb.grant_ids[0]
        pooled = await db.create_pool(bouncer, min_size=1, max_size=4)
        try:
            inbox = await add_inbox(pooled, grant)
            config = await start_backfill(pooled, inbox)
            # One backfill worker, two thread workers and the monitor: 40 client connections
            # over 5 server connections, and no NOVA_DATABASE_DIRECT_URL: they poll.
            async with running(bouncer, settings(sb, database_direct_url=None), threads=2):
                await wait_for(lambda: _is(pool, config, "completed"), 90, what="completion")
            messages = await assert_db_equals_mailbox(pool, sb, grant, inbox)
            p = await pool.fetchrow("SELECT * FROM get_sync_progress($1)", config)
            assert p["threads_queued"] == p["threads_completed"] == 300
            assert p["threads_failed"] == 0 and p["messages_synced"] == messages
            # verify's temp tables live in one transaction behind the pooler
            report = await verify(pooled, sb, inbox)
        finally:
            await pooled.close()
    assert report.drift == 0 and report.threads.expected == report.threads.present == 300
    assert report.messages.present == messages
    polling = [r for r in nova_log.records if "without NOVA_DATABASE_DIRECT_URL" in r.getMessage()]
    assert len(polling) == 1, "said once per process, not per worker"
    no_statement_errors(nova_log)


async def test_webhooks_through_pgbouncer_apply_exactly_with_listen_on_the_direct_url(
        pool: asyncpg.Pool, db_url: str, bouncer: str,
        nova_log: pytest.LogCaptureFixture) -> None:
    with SandboxNylas(threads=20, seed=7, api_key=API_KEY, webhook_secret=SECRET) as sb:
        # A poll ceiling of 30 s: only the LISTEN on the direct URL wakes the idle worker fast.
        s = load_settings(batch_size=4, poll_interval_ms=30_000, nylas_api_key=API_KEY,
                          nylas_api_uri=sb.base_url, nylas_webhook_secret=SECRET,
                          database_url=bouncer, database_direct_url=db_url)
        with ServerThread(create_app(s, database_url=bouncer)) as receiver:
            sb.outbox.url = f"{receiver.url}/webhooks/nylas"
            ids, starred, late, woke = await _deliver(sb, s, pool, bouncer)
    inbox = await pool.fetchval("SELECT id FROM flux_inboxes")
    rows = await pool.fetch("SELECT provider_message_id, subject, starred FROM"
                            " flux_email_messages WHERE inbox_id = $1", inbox)
    assert sorted(r["provider_message_id"] for r in rows) == sorted([*ids, late])
    assert {r["provider_message_id"] for r in rows if r["starred"]} == set(starred)
    notes = await notifications(pool)
    assert len(notes) == 51 and {n["status"] for n in notes} == {"processed"}
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0
    assert woke < 2.0, f"the idle worker took {woke:.1f}s to wake"
    no_statement_errors(nova_log)


async def _deliver(sb: SandboxNylas, s: Settings, pool: asyncpg.Pool,
                   bouncer: str) -> tuple[list[str], list[str], str, float]:
    """40 new messages (every fourth delivered twice), 10 of them starred, through the receiver
    and a webhooks worker on the pooler; then, with the worker idle, one more. Returns the
    message ids, the starred ones, the last one and how long the idle worker took to store it."""
    grant = sb.grant_ids[0]
    await add_inbox(pool, grant)
    worker = Worker(WebhookProcessor(s), s, database_url=bouncer)
    task = asyncio.create_task(worker.run())
    try:
        created = [sb.add_message(grant, subject=f"pooled {i}", duplicate=i % 4 == 0).message
                   for i in range(40)]
        ids = [str(m["id"]) for m in created if m is not None]
        starred = ids[::4]
        for mid in starred:
            sb.update_message(grant, mid, starred=True)
        await sb.await_webhooks()
        await wait_for(lambda: _all_processed(pool, 50), 60, what="50 notifications")
        await asyncio.sleep(0.5)  # idle now
        t0 = time.monotonic()
        late = sb.add_message(grant, subject="late").message
        assert late is not None
        await wait_for(lambda: pool.fetchval(
            "SELECT 1 FROM flux_email_messages WHERE provider_message_id = $1", late["id"]),
            10, interval=0.01, what="the late message")
        return ids, starred, str(late["id"]), time.monotonic() - t0
    finally:
        worker.stop()
        await task


async def _all_processed(pool: asyncpg.Pool, count: int) -> bool:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT count(*) = $1 AND bool_and(status = 'processed')"
        " FROM flux_webhook_notifications", count)


async def test_gmail_change_syncs_through_pgbouncer_run_one_after_another(
        pool: asyncpg.Pool, db_url: str, bouncer: str,
        nova_log: pytest.LogCaptureFixture) -> None:
    # Each sync holds the inbox's lock in a transaction through the pooler: were it a session
    # lock, its unlock could reach another server connection and the next sync never run.
    with gmail_sandbox(20) as sb:
        s = gmail_settings(sb, database_direct_url=None)
        inbox, _ = await backfilled(pool, bouncer, sb, s)
        email = sb.users[0]
        for i in range(3):
            sb.add_message(email, subject=f"pooled change {i}", html="<p>new</p>")
            await sync_changes(pool, bouncer, s, inbox)
            await assert_matches_mailbox(pool, sb, inbox, email)
    no_statement_errors(nova_log)


def test_concurrent_migrations_through_pgbouncer_are_serialized_and_leave_no_lock(
        empty_db_url: str, tmp_path: Path) -> None:
    with PgBouncer(empty_db_url, tmp_path) as pgb:
        results, errors = [], []

        def run() -> None:
            try:
                results.append(migrate(pgb.url))
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        # More runs than the pooler has server connections: a waiting run holds none.
        threads = [threading.Thread(target=run) for _ in range(SERVER_POOL + 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == [] and len(results) == SERVER_POOL + 2
        assert sum(1 for r in results if r.applied) == 1
        assert sum(1 for r in results if r.pgmq_installed) == 1
        assert not migrate(pgb.url).changed
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND"
                         " database = (SELECT oid FROM pg_database"
                         " WHERE datname = current_database())").fetchone() == (0,)


def test_metrics_scrapes_through_pgbouncer_read_the_figures(bouncer: str) -> None:
    """The scrape's connection passes no startup `options` (refused by the pooler) and
    prepares nothing: through PgBouncer the figures are read, scrape after scrape."""
    from nova.metrics import PostgresCollector

    collector = PostgresCollector(bouncer, 10.0, min_interval=0.0)
    for _ in range(8):  # past psycopg's default prepare threshold of 5
        families = {m.name: m for m in collector.collect()}
        assert [s.value for s in families["nova_database_up"].samples] == [1], \
            collector.last_error
        assert "nova_queue_depth" in families
