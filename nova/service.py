"""`python -m nova` (or `nova run`): every processor and the webhook receiver in one process.

Start-up brings the database to the current schema first. With no NYLAS_API_KEY, Nova runs
against its Nylas sandbox instead of the real API: the sandbox serves a generated mailbox on
loopback, its grants become inboxes, the first inbox gets a backfill, and every
NOVA_SANDBOX_EVENT_SECONDS the sandbox receives a new message and delivers the signed webhook
to the receiver, so every path of Nova runs on a fresh machine with nothing configured.

SIGTERM or SIGINT stops everything in order (see nova.runtime); a second signal cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from typing import Any

import uvicorn
from pydantic import SecretStr

from nova import db
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging
from nova.migrate import migrate

log = logging.getLogger("nova.service")

SANDBOX_API_KEY = "sandbox-api-key"
SANDBOX_SECRET = "sandbox-webhook-secret"


class ReceiverServer:
    """The receiver as a Runnable (uvicorn in this event loop)."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        from nova.receiver import create_app

        config = uvicorn.Config(create_app(settings, database_url=database_url),
                                host=settings.receiver_host, port=settings.receiver_port,
                                log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        # uvicorn would take over SIGTERM/SIGINT and raise them again when it stops; the
        # service's own handlers stop every part in order instead.
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    async def run(self) -> None:
        await self.server.serve()

    def stop(self) -> None:
        self.server.should_exit = True


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


async def _register_sandbox_inboxes(url: str, sandbox: Any) -> None:
    """The sandbox's grants as inboxes; a first backfill for the first one."""
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
    finally:
        await pool.close()


async def serve(settings: Settings) -> None:
    from nova.backfill import BackfillProcessor
    from nova.completion import CompletionMonitor
    from nova.runtime import Runnable, Worker, run_parts
    from nova.threads import ThreadSyncProcessor
    from nova.webhooks import WebhookProcessor

    url = await asyncio.to_thread(db.database_url, settings)
    result = await asyncio.to_thread(migrate, url)
    log.info("[Service] database %s ready (%d migration(s) applied)", db.describe(url),
             len(result.applied))

    receiving = settings.nylas_api_key is None or settings.nylas_webhook_secret is not None
    if receiving and not _port_free(settings.receiver_host, settings.receiver_port):
        raise SystemExit(f"NOVA_RECEIVER_PORT {settings.receiver_port} is already in use")
    runnables: list[Runnable] = []
    sandbox: Any = None
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
        await _register_sandbox_inboxes(url, sandbox)
        if settings.sandbox_event_seconds > 0:
            runnables.append(SandboxTicker(sandbox, sandbox.grant_ids[0],
                                           settings.sandbox_event_seconds))

    if receiving:
        runnables.append(ReceiverServer(settings, url))
    else:
        log.warning("[Service] NYLAS_WEBHOOK_SECRET is not set: the receiver is not started")

    workers = [Worker(WebhookProcessor(settings), settings, database_url=url),
               Worker(BackfillProcessor(settings), settings, database_url=url),
               Worker(ThreadSyncProcessor(settings), settings, database_url=url)]
    runnables += [*workers, CompletionMonitor(settings, database_url=url)]
    try:
        await run_parts(runnables)
    finally:
        if sandbox is not None:
            await asyncio.to_thread(sandbox.stop)


def main(settings: Settings | None = None) -> int:
    settings = settings or settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(serve(settings))
    return 0
