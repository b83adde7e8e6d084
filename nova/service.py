"""`python -m nova` (or `nova run`): every processor (attachments to NOVA_ATTACHMENT_PATH
included) and the webhook receiver in one process.

Start-up brings the database to the current schema first. With no NYLAS_API_KEY, Nova runs
against its Nylas sandbox instead of the real API: the sandbox serves a generated mailbox on
loopback, its grants become inboxes, the first inbox gets a backfill, and every
NOVA_SANDBOX_EVENT_SECONDS the sandbox receives a new message and delivers the signed webhook
to the receiver, so every path of Nova runs on a fresh machine with nothing configured.

On a terminal (stderr a TTY, text logs) the backfills show as live progress bars
(nova.progress_view): the demo backfill's and any other that runs meanwhile, the log lines
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
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.migrate import migrate
from nova.progress_view import ProgressView, console_logging

log = logging.getLogger("nova.service")

SANDBOX_API_KEY = "sandbox-api-key"
SANDBOX_SECRET = "sandbox-webhook-secret"


class SandboxTicker:
    """New sandbox mail every few seconds, delivered as signed webhooks."""

    def __init__(self, sandbox: Any, grant_id: str, seconds: float) -> None:
        self.sandbox = sandbox
        self.grant_id = grant_id
        self.seconds = seconds
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        rng = random.Random(0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.seconds)
                return
            threads = self.sandbox.thread_ids(self.grant_id)
            reply_to = rng.choice(threads[:20]) if threads and rng.random() < 0.5 else None
            self.sandbox.add_message(self.grant_id, thread_id=reply_to)

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
                "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES ('nylas', $1, $2)"
                " ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL DO NOTHING",
                grant.id, grant.email)
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


async def serve(settings: Settings, console: Console | None = None) -> int:
    """Every part of Nova in this process; with `console` (a terminal), the live progress
    view of the backfills above the log."""
    from nova.attachments import AttachmentJanitor, AttachmentProcessor
    from nova.backfill import BackfillProcessor
    from nova.completion import CompletionMonitor
    from nova.runtime import Runnable, Worker, run_parts
    from nova.threads import ThreadSyncProcessor
    from nova.webhooks import WebhookProcessor

    url = await asyncio.to_thread(db.database_url, settings)
    result = await asyncio.to_thread(migrate, url)
    log.info("[Service] database %s ready (%d migration(s) applied)", db.describe(url),
             len(result.applied))

    from nova.receiver import receives

    receiving = settings.nylas_api_key is None or receives(settings)
    if receiving and not _port_free(settings.receiver_host, settings.receiver_port):
        raise SystemExit(f"NOVA_RECEIVER_PORT {settings.receiver_port} is already in use")
    runnables: list[Runnable] = [*metrics.server_parts(settings, "Service", database_url=url)]
    sandbox: Any = None
    pinned: list[uuid.UUID] = []
    if settings.nylas_api_key is None:
        from nova.sandbox.nylas import SandboxNylas

        secret = (settings.nylas_webhook_secret.get_secret_value()
                  if settings.nylas_webhook_secret else SANDBOX_SECRET)
        receiver_url = f"http://127.0.0.1:{settings.receiver_port}/webhooks/nylas"
        sandbox = SandboxNylas(threads=settings.sandbox_threads, seed=settings.sandbox_seed,
                               api_key=SANDBOX_API_KEY, webhook_secret=secret,
                               webhook_url=receiver_url)
        await asyncio.to_thread(sandbox.start)
        log.info("[Service] no NYLAS_API_KEY: using the Nylas sandbox at %s (grants %s)",
                 sandbox.base_url, ", ".join(sandbox.grant_ids))
        settings = settings.model_copy(update={
            "nylas_api_key": SecretStr(SANDBOX_API_KEY), "nylas_api_uri": sandbox.base_url,
            "nylas_webhook_secret": SecretStr(secret)})
        demo = await _register_sandbox_inboxes(url, sandbox)
        pinned += [demo] if demo is not None else []
        if settings.sandbox_event_seconds > 0:
            runnables.append(SandboxTicker(sandbox, sandbox.grant_ids[0],
                                           settings.sandbox_event_seconds))

    if receiving:
        from nova.receiver import ReceiverServer

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
    try:
        return await run_parts(runnables)  # 2 when a processor stopped on runtime.Fatal
    finally:
        if sandbox is not None:
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
    return status
