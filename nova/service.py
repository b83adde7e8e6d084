"""`python -m nova` (or `nova run`): every processor (attachments to NOVA_ATTACHMENT_PATH
included) and the webhook receiver in one process.

Start-up brings the database to the current schema first. Production is the default: with a
database URL or any provider's settings, Nova runs on what is configured and nothing else (a
provider without settings is simply not configured: its inboxes' jobs wait untouched). The
demo runs only when nothing real is configured (no NOVA_DATABASE_URL, so the embedded
Postgres, and no provider) or when asked for (NOVA_DEMO=1, `nova demo`), so every path of Nova
runs on a fresh machine with nothing configured:

- the Nylas sandbox (nova.sandbox.nylas) serves a generated mailbox on loopback; its grants
  become inboxes and the first one gets a backfill;
- the Gmail API sandbox (nova.sandbox.gmail, NOVA_SANDBOX_THREADS threads, NOVA_SANDBOX_SEED,
  Google's default quota of 15,000 units per user per minute, so the backfill is paced as it
  would be against Google) serves one generated Gmail user; it becomes a 'gmail' inbox (grant:
  the lower-cased address) whose credentials are stored encrypted, and gets a backfill. Nova's
  own users.watch (the completion monitor, on the sandbox topic) makes the sandbox push that
  user's changes to POST /webhooks/gmail?token=...;
- every NOVA_SANDBOX_EVENT_SECONDS both mailboxes receive a new message (a reply to a recent
  thread or a new thread): Nylas delivers a signed webhook, Gmail a Pub/Sub push, and the
  receiver takes both.

The demo's inboxes are marked `demo`. It refuses, in one line naming them, a database that
holds any inbox it did not create: its sandboxes answer 404 for grants they do not know, and a
real inbox must never meet them. In the demo every provider setting points at the sandboxes
(NYLAS_WEBHOOK_SECRET and GMAIL_PUSH_TOKEN are used when set, else fixed sandbox values,
SANDBOX_SECRET and SANDBOX_PUSH_TOKEN; the credentials key is SANDBOX_CREDENTIALS_KEY): they
guard nothing but the sandboxes' own generated mail and tokens. Each run starts fresh
sandboxes: registering is idempotent (the inboxes are kept, each demo backfill is queued once),
but the Gmail inbox's credentials (their token URI names this run's port), its history cursor
and its watch are reset to the new sandbox's.

On a terminal (stderr a TTY, text logs) the backfills show as live progress bars
(nova.progress_view): the two demo backfills and any other that runs meanwhile, the log lines
scrolling above them. Piped, or with NOVA_LOG_FORMAT=json, the log lines alone. With
NOVA_METRICS_PORT set the process serves /metrics and /healthz (nova.metrics).

SIGTERM or SIGINT stops everything in order (see nova.runtime); a second signal cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sys
import uuid
from typing import Any

import psycopg
from pydantic import SecretStr
from rich.console import Console

from nova import db, metrics
from nova.config import ConfigError, Settings, settings_or_exit
from nova.credentials import CredentialsError
from nova.logs import setup_logging
from nova.migrate import migrate
from nova.progress_view import ProgressView, console_logging

log = logging.getLogger("nova.service")

SANDBOX_API_KEY = "sandbox-api-key"
SANDBOX_SECRET = "sandbox-webhook-secret"
# Without NOVA_CREDENTIALS_KEY, the Gmail sandbox user's credentials are encrypted under this
# public passphrase (HKDF-derived, nova.credentials.cipher). It protects only the sandbox's
# generated refresh token, which opens nothing but the sandbox; never use it for real ones.
SANDBOX_CREDENTIALS_KEY = "nova-sandbox-credentials-key"
# Without GMAIL_PUSH_TOKEN, the shared token of the Gmail sandbox's pushes (?token=...).
SANDBOX_PUSH_TOKEN = "sandbox-gmail-push-token"
# users.watch topic: the sandbox accepts projects/nova-sandbox/topics/* only.
SANDBOX_PUBSUB_TOPIC = "projects/nova-sandbox/topics/nova-gmail"
GMAIL_QUOTA_PER_MINUTE = 15_000  # Google's default per-user quota, in units


class SandboxTicker:
    """New sandbox mail every few seconds in each demo mailbox: `mailboxes` are (sandbox,
    grant) pairs, SandboxNylas with a grant id or SandboxGmail with an address. The sandbox
    then delivers it as a signed Nylas webhook or a Gmail push."""

    def __init__(self, seconds: float, *mailboxes: tuple[Any, str]) -> None:
        self.mailboxes = list(mailboxes)
        self.seconds = seconds
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        rngs = [random.Random(i) for i in range(len(self.mailboxes))]
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.seconds)
                return
            for (sandbox, grant), rng in zip(self.mailboxes, rngs, strict=True):
                threads = sandbox.thread_ids(grant)
                reply_to = rng.choice(threads[:20]) if threads and rng.random() < 0.5 else None
                sandbox.add_message(grant, thread_id=reply_to)

    def stop(self) -> None:
        self._stopping.set()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def _register_sandbox_inboxes(url: str, sandbox: Any) -> uuid.UUID | None:
    """The sandbox's grants as inboxes; a first backfill for the first one. Returns the
    configuration of the first one (its backfill, new or from an earlier run)."""
    pool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        for grant in sandbox.mailbox.grants.values():
            await pool.execute(
                "INSERT INTO flux_inboxes (provider, grant_id, email, demo)"
                " VALUES ('nylas', $1, $2, true)"
                " ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL"
                " DO UPDATE SET demo = true", grant.id, grant.email)
        first = sandbox.grant_ids[0]
        inbox_id = await pool.fetchval("SELECT id FROM flux_inboxes WHERE grant_id = $1", first)
        started = await pool.fetchval(
            "SELECT count(*) FROM flux_inbox_configurations WHERE inbox_id = $1", inbox_id)
        if not started:
            config_id = await pool.fetchval("SELECT queue_inbox_backfill($1)", inbox_id)
            log.info("[Service] sandbox backfill queued inbox=%s config=%s", inbox_id,
                     config_id)
        return await pool.fetchval(  # type: ignore[no-any-return]
            "SELECT id FROM flux_inbox_configurations WHERE inbox_id = $1"
            " AND deleted_at IS NULL", inbox_id)
    finally:
        await pool.close()


# The sandbox's first user as a Gmail inbox (grant: the lower-cased address, as `nova inbox add
# --provider gmail` stores it); an existing one is kept as it is.
GMAIL_INSERT = """
INSERT INTO flux_inboxes (provider, grant_id, email, demo) VALUES ('gmail', $1, $2, true)
ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL DO UPDATE SET demo = true
"""
GMAIL_INBOX = """
SELECT id, status, deleted_at FROM flux_inboxes WHERE provider = 'gmail' AND grant_id = $1
"""
# A fresh sandbox: its history starts at `cursor` with nothing after it, and it has no watch.
# A cursor (or a watch) kept from an earlier run names another sandbox's history.
GMAIL_RESET = """
UPDATE flux_inboxes SET sync_cursor = $2, sync_cursor_at = now(), watch_expires_at = NULL
WHERE id = $1
"""


async def _register_gmail_sandbox_inbox(url: str, sandbox: Any,
                                        settings: Settings) -> uuid.UUID | None:
    """The Gmail sandbox's first user as an inbox, with its credentials (saved again on every
    run: their token URI names this run's port), its history cursor at the sandbox's current
    history id, its watch due; a first backfill once. Returns the inbox's configuration (its
    backfill, new or from an earlier run), None when the inbox is not active."""
    from nova.credentials import authorized_user_from_info, cipher, save_credentials

    email = sandbox.users[0]
    grant = email.lower()
    user = authorized_user_from_info({**sandbox.credentials(email),
                                      "token_uri": sandbox.token_uri},
                                     source="the Gmail sandbox's credentials")
    fernet = cipher(settings)
    pool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(GMAIL_INSERT, grant, email)
            inbox = await conn.fetchrow(GMAIL_INBOX, grant)
            inbox_id = inbox["id"]
            await save_credentials(conn, inbox_id, user, fernet)
            await conn.execute(GMAIL_RESET, inbox_id, str(sandbox.history_id(email)))
            status = inbox["status"]
            if status == "auth_expired" and inbox["deleted_at"] is None:  # fresh credentials
                changed = await conn.fetchrow(
                    "SELECT * FROM nova_set_inbox_status($1, 'active')", inbox_id)
                status = changed["status"]
                log.info("[Service] Gmail sandbox inbox=%s was auth_expired, now %s",
                         inbox_id, status)
            if status != "active" or inbox["deleted_at"] is not None:
                log.warning("[Service] Gmail sandbox inbox=%s is %s: no demo backfill",
                            inbox_id, "deleted" if inbox["deleted_at"] else status)
                return None
            started = await conn.fetchval(
                "SELECT count(*) FROM flux_inbox_configurations WHERE inbox_id = $1", inbox_id)
            if not started:
                config_id = await conn.fetchval("SELECT queue_inbox_backfill($1)", inbox_id)
                log.info("[Service] Gmail sandbox backfill queued inbox=%s config=%s",
                         inbox_id, config_id)
            return await conn.fetchval(  # type: ignore[no-any-return]
                "SELECT id FROM flux_inbox_configurations WHERE inbox_id = $1"
                " AND deleted_at IS NULL", inbox_id)
    finally:
        await pool.close()


class DemoRefused(Exception):
    """The demo will not run here: the database holds inboxes it did not create."""


def demo_wanted(settings: Settings) -> bool:
    """The demo runs when it is asked for (NOVA_DEMO=1, `nova demo`) or when nothing real is
    configured: no database URL (the embedded Postgres) and no provider. A database URL, or
    any provider's settings, means production: no sandbox starts."""
    from nova.providers.registry import configured

    return settings.demo or (settings.database_url is None and not configured(settings))


# Inboxes the demo did not create: not marked demo, and not one of this run's sandbox
# mailboxes (a database demoed before the mark existed has those unmarked).
FOREIGN_INBOXES = """
SELECT provider, grant_id, email FROM flux_inboxes
WHERE NOT demo AND (provider, coalesce(grant_id, '')) NOT IN
      (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY created_at, id
"""


async def _refuse_foreign_inboxes(url: str, own: list[tuple[str, str]]) -> None:
    """DemoRefused, naming them, when the database holds an inbox the demo did not make:
    its sandboxes would answer for real grants (a 404 for a grant they do not know)."""
    pool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        rows = await pool.fetch(FOREIGN_INBOXES, [p for p, _ in own], [g for _, g in own])
    finally:
        await pool.close()
    if rows:
        named = ", ".join(f"{r['email']} ({r['provider']})" for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise DemoRefused(
            f"the demo will not run on {db.describe(url)}: it holds {len(rows)} inbox(es) "
            f"it did not create: {named}{more}. Configure their provider (NYLAS_API_KEY, "
            f"NOVA_CREDENTIALS_KEY) to run Nova on them, or give the demo a database of "
            f"its own")


def _demo_sandboxes(settings: Settings) -> tuple[Any, Any]:
    """The two demo sandboxes, built (mailboxes generated) but not started."""
    try:
        from nova.sandbox.gmail import SandboxGmail
        from nova.sandbox.nylas import SandboxNylas
    except ModuleNotFoundError as exc:  # a production install: no nova/sandbox, no demo extra
        raise DemoRefused(f"the demo is not installed here ({exc.name} is missing): set "
                          "NOVA_DATABASE_URL and a provider's settings, or pip install "
                          "'.[demo]' in a checkout of Nova") from None

    secret = (settings.nylas_webhook_secret.get_secret_value()
              if settings.nylas_webhook_secret else SANDBOX_SECRET)
    token = (settings.gmail_push_token.get_secret_value()
             if settings.gmail_push_token else SANDBOX_PUSH_TOKEN)
    receiver = f"http://127.0.0.1:{settings.receiver_port}/webhooks"
    nylas = SandboxNylas(threads=settings.sandbox_threads, seed=settings.sandbox_seed,
                         api_key=SANDBOX_API_KEY, webhook_secret=secret,
                         webhook_url=f"{receiver}/nylas")
    gmail = SandboxGmail(
        threads=settings.sandbox_threads, seed=settings.sandbox_seed, users=1,
        quota_per_minute=GMAIL_QUOTA_PER_MINUTE, push_endpoint=f"{receiver}/gmail",
        push_auth="token", push_token=token)
    return nylas, gmail


async def _start_demo(settings: Settings, url: str, started: list[Any],
                      ) -> tuple[Settings, list[tuple[Any, str]], list[uuid.UUID]]:
    """Both sandboxes running (appended to `started`), the settings pointing at them only,
    their mailboxes registered as demo inboxes with a first backfill each. Returns the
    settings, the (sandbox, grant) pairs of the ticker, and the demo configurations."""
    nylas, gmail = _demo_sandboxes(settings)
    own = [("nylas", g) for g in nylas.grant_ids] + [("gmail", e.lower()) for e in gmail.users]
    await _refuse_foreign_inboxes(url, own)
    for sandbox in (nylas, gmail):
        await asyncio.to_thread(sandbox.start)
        started.append(sandbox)
    log.info("[Service] demo: using the Nylas sandbox at %s (grants %s)", nylas.base_url,
             ", ".join(nylas.grant_ids))
    log.info("[Service] demo: using the Gmail sandbox at %s (user %s)", gmail.base_url,
             gmail.users[0])
    settings = settings.model_copy(update={
        "nylas_api_key": SecretStr(SANDBOX_API_KEY), "nylas_api_uri": nylas.base_url,
        "nylas_webhook_secret": SecretStr(nylas.webhook_secret),
        "gmail_api_uri": gmail.base_url, "gmail_token_uri": gmail.token_uri,
        "credentials_key": SecretStr(SANDBOX_CREDENTIALS_KEY),
        "gmail_push_token": SecretStr(gmail.push.config.token), "gmail_push_audience": None,
        "gmail_push_service_account": None, "gmail_pubsub_topic": SANDBOX_PUBSUB_TOPIC})
    pinned = [await _register_sandbox_inboxes(url, nylas),
              await _register_gmail_sandbox_inbox(url, gmail, settings)]
    return (settings, [(nylas, nylas.grant_ids[0]), (gmail, gmail.users[0])],
            [config for config in pinned if config is not None])


async def serve(settings: Settings, console: Console | None = None) -> int:
    """Every part of Nova in this process; with `console` (a terminal), the live progress
    view of the backfills above the log."""
    from nova.attachments import AttachmentJanitor, AttachmentProcessor
    from nova.backfill import BackfillProcessor
    from nova.completion import CompletionMonitor
    from nova.gmail_push import check_push_settings
    from nova.providers.registry import KINDS, configured
    from nova.receiver import ReceiverServer, receives
    from nova.runtime import Runnable, Worker, run_parts
    from nova.threads import ThreadSyncProcessor
    from nova.webhooks import WebhookProcessor

    demo = demo_wanted(settings)
    if not demo and not configured(settings):
        names = " or ".join(kind.setting for kind in KINDS.values())
        log.error("[Service] no provider is configured: set %s (NOVA_DEMO=1 runs the demo "
                  "sandboxes instead)", names)
        return 2
    if not demo:
        try:
            check_push_settings(settings)  # refused before anything is touched
        except ConfigError as exc:
            log.error("[Service] %s", exc)
            return 2
    url = await asyncio.to_thread(db.database_url, settings)
    # DDL over the direct URL when there is one: away from a pooler's query timeouts.
    result = await asyncio.to_thread(migrate, settings.database_direct_url or url)
    log.info("[Service] database %s ready (%d migration(s) applied)", db.describe(url),
             len(result.applied))

    receiving = demo or receives(settings)
    if receiving and not _port_free(settings.receiver_host, settings.receiver_port):
        raise SystemExit(f"NOVA_RECEIVER_PORT {settings.receiver_port} is already in use")
    runnables: list[Runnable] = [*metrics.server_parts(settings, "Service", database_url=url)]
    sandboxes: list[Any] = []  # started, stopped in reverse order
    pinned: list[uuid.UUID] = []
    try:
        if demo:
            settings, mailboxes, pinned = await _start_demo(settings, url, sandboxes)
            if settings.sandbox_event_seconds > 0:
                runnables.append(SandboxTicker(settings.sandbox_event_seconds, *mailboxes))
        elif settings.credentials_key is not None:  # real Gmail inboxes: the key must work
            from nova.credentials import cipher

            cipher(settings)

        if receiving:
            runnables.append(ReceiverServer(settings, url))
        else:
            log.warning("[Service] neither NYLAS_WEBHOOK_SECRET nor GMAIL_PUSH_AUDIENCE / "
                        "GMAIL_PUSH_TOKEN is set: the receiver is not started")

        workers = [Worker(WebhookProcessor(settings), settings, database_url=url),
                   Worker(BackfillProcessor(settings), settings, database_url=url),
                   Worker(ThreadSyncProcessor(settings), settings, database_url=url),
                   Worker(AttachmentProcessor(settings), settings, database_url=url)]
        runnables += [*workers, CompletionMonitor(settings, database_url=url),
                      AttachmentJanitor(settings, database_url=url)]
        if console is not None:
            runnables.append(ProgressView(console, url, settings.provider_rate_limit,
                                          pinned=pinned))
        return await run_parts(runnables)  # 2 when a processor stopped on runtime.Fatal
    finally:
        for sandbox in reversed(sandboxes):
            await asyncio.to_thread(sandbox.stop)


def terminal_console(settings: Settings) -> Console | None:
    """A rich console on stderr when it is a terminal and logs are text: the live view goes
    there, with the log lines printed through it. Piped (or NOVA_LOG_FORMAT=json): None, and
    plain log lines."""
    if settings.log_format != "text" or not sys.stderr.isatty():
        return None
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal or console.is_dumb_terminal:
        return None
    console_logging(console)
    return console


def main(settings: Settings | None = None) -> int:
    settings = settings or settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    console = terminal_console(settings)
    status = 0
    try:
        with contextlib.suppress(asyncio.CancelledError):
            status = asyncio.run(serve(settings, console))
    except psycopg.OperationalError as exc:  # at start-up: migrating, registering the sandbox
        log.error("[Service] the database did not answer: %s", " ".join(str(exc).split()))
        return 1
    except (CredentialsError, DemoRefused) as exc:  # a key unusable; real inboxes
        log.error("[Service] %s", " ".join(str(exc).split()))
        return 2
    return status
