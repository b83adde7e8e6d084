"""`python -m nova.receiver`: the HTTP endpoint providers deliver notifications to.

    GET  /webhooks/nylas?challenge=X   answers X, as the raw body (Nylas's endpoint check)
    POST /webhooks/nylas               a Nylas notification
    POST /webhooks/gmail               a Gmail notification, as a Cloud Pub/Sub push delivers it
    GET  /healthz                      200 `ok` when the database answers, else 503
                                       `unavailable` (why: in the log, once per change)

A Nylas POST is checked in this order, and nothing is stored before the signature holds:
1. size: over NOVA_RECEIVER_MAX_BODY_BYTES -> 413 (read in chunks; never buffered past the cap);
2. signature: X-Nylas-Signature must be the hex HMAC-SHA256 of the raw body (for a gzip
   delivery, of the compressed bytes) under NYLAS_WEBHOOK_SECRET, compared in constant time
   -> 401;
3. body: gzip is inflated (with the same cap -> 413); it must be a JSON notification with an
   id and a type -> 400;
4. it is written through queue_nylas_webhook_notification(), whose trigger queues it, and
   committed before the 200. A repeated webhook id is answered 200 and stored once.

When the database cannot be reached the answer is 503: Nylas retries 408, 429, 502, 503, 504
and 507 (three attempts in all), so an outage delays notifications instead of losing them.
Source: https://developer.nylas.com/docs/v3/notifications/webhooks/ (challenge, signature,
retries).

A Gmail POST (nova.gmail_push) is checked in this order, and nothing is stored before the
sender is authenticated:
1. size: the same cap -> 413;
2. authentication, by the settings:
   - GMAIL_PUSH_AUDIENCE set: `Authorization: Bearer <JWT>` must be an OIDC token signed by a
     key at GMAIL_PUSH_CERTS_URL (Google's `{kid: PEM}` certificates, fetched asynchronously,
     cached per Cache-Control max-age, refetched once for an unknown kid), unexpired (60 s
     clock skew), issued by accounts.google.com -> else 401; with `aud` = GMAIL_PUSH_AUDIENCE,
     `email` = GMAIL_PUSH_SERVICE_ACCOUNT and `email_verified` true -> else 403. Certificates
     that cannot be fetched (and none cached that fit) -> 503. An audience without a service
     account is refused at start (nova.gmail_push.check_push_settings): any Google-signed
     token for the audience would pass, whichever project's service account asked for it;
   - else GMAIL_PUSH_TOKEN set: the query parameter `token` must equal it (constant time)
     -> 401;
   - neither: every delivery is refused (401), and the log says so once.
   A refusal is logged with its reason, never with the token;
3. body: JSON whose message.data is base64 (standard or URL-safe) of JSON with a string
   emailAddress and a historyId (a number or a string of digits), and whose message has a
   messageId -> else 400; strings are cleaned (NUL, lone surrogates);
4. it is written through queue_gmail_push_notification() (sql/110_gmail_push.sql) as a
   'gmail.history' notification of provider 'gmail' (webhook id 'gmail:<messageId>', grant id
   the lower-cased address), whose trigger queues it, and committed before the 200. A
   redelivery of the same messageId is answered 200 and stored once. Database unreachable
   -> 503.
Pub/Sub acknowledges 102, 200, 201, 202 and 204 and retries anything else with back-off, so
an outage (503) delays notifications instead of losing them. Sources:
https://cloud.google.com/pubsub/docs/push, https://cloud.google.com/pubsub/docs/authenticate-
push-subscriptions, https://developers.google.com/workspace/gmail/api/guides/push.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import zlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from nova import db
from nova.config import ConfigError, Settings, settings_or_exit
from nova.gmail_push import (
    BadPush,
    CertsUnavailable,
    GoogleCerts,
    OidcVerifier,
    PushRejected,
    check_push_settings,
    parse_push,
    token_matches,
)
from nova.logs import setup_logging
from nova.providers.clean import loads
from nova.providers.nylas_webhooks import verify_signature
from nova.runtime import CONNECTION_ERRORS

log = logging.getLogger("nova.receiver")

STORE = "SELECT notification_id, is_new FROM queue_nylas_webhook_notification($1, $2, $3)"
STORE_GMAIL = ("SELECT notification_id, is_new"
               " FROM queue_gmail_push_notification($1, $2, $3, $4, $5, $6)")


POOL_CONNECTIONS = 20  # database connections of the receiver, all its workers together


class TooLarge(Exception):
    pass


def unavailable() -> Response:
    return PlainTextResponse("temporarily unavailable", status_code=503,
                             headers={"Retry-After": "5"})


class AlwaysRetryable:
    """ASGI middleware: an unexpected error anywhere answers 503 (retried by Nylas and by
    Pub/Sub), never 500 (https://developer.nylas.com/docs/v3/notifications/webhooks/: only
    408, 429, 502, 503, 504 and 507 are retried)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("[Receiver] unexpected error: %r", exc)
            if not started:
                await unavailable()(scope, receive, send)


async def read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip_capped(data: bytes, cap: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, cap + 1)
    if len(out) > cap or inflater.unconsumed_tail:
        raise TooLarge
    return out


def receives(settings: Settings) -> bool:
    """Whether any delivery can be verified: a Nylas secret or a Gmail push check."""
    return (settings.nylas_webhook_secret is not None
            or settings.gmail_push_audience is not None
            or bool(settings.gmail_push_token and settings.gmail_push_token.get_secret_value()))


class Receiver:
    def __init__(self, settings: Settings, *, database_url: str | None = None) -> None:
        if not receives(settings):
            raise ValueError("neither NYLAS_WEBHOOK_SECRET nor GMAIL_PUSH_AUDIENCE / "
                             "GMAIL_PUSH_TOKEN is set: the receiver could verify no delivery")
        check_push_settings(settings)  # ConfigError, a ValueError too
        self.settings = settings
        # Unset: Nylas deliveries are refused (a Gmail-only deployment).
        self.secret = (settings.nylas_webhook_secret.get_secret_value()
                       if settings.nylas_webhook_secret is not None else None)
        self.cap = settings.receiver_max_body_bytes
        # POOL_CONNECTIONS for the receiver as a whole, shared by its worker processes.
        self.pool_size = max(2, -(-POOL_CONNECTIONS // settings.receiver_workers))
        self.database_url = database_url
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._gmail_certs: GoogleCerts | None = None
        self._gmail_oidc: OidcVerifier | None = None
        token = settings.gmail_push_token
        self._gmail_token = token.get_secret_value() if token is not None else ""
        if settings.gmail_push_audience is not None:
            assert settings.gmail_push_service_account is not None  # check_push_settings
            self._gmail_certs = GoogleCerts(settings.gmail_push_certs_url)
            self._gmail_oidc = OidcVerifier(self._gmail_certs, settings.gmail_push_audience,
                                            settings.gmail_push_service_account)
        self._gmail_unconfigured_logged = False
        self._health_error: str | None = None  # what /healthz last logged; None: healthy
        self.app = Starlette(
            routes=[
                Route("/webhooks/nylas", self.challenge, methods=["GET"]),
                Route("/webhooks/nylas", self.deliver, methods=["POST"]),
                Route("/webhooks/gmail", self.deliver_gmail, methods=["POST"]),
                Route("/healthz", self.health, methods=["GET"]),
            ],
            middleware=[Middleware(AlwaysRetryable)],
            lifespan=self.lifespan,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        if self.database_url is None:
            self.database_url = db.database_url(self.settings)
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self.pool()  # connect early when we can; a later request retries otherwise
        log.info("[Receiver] ready on /webhooks/nylas and /webhooks/gmail (gmail auth: %s)",
                 self.gmail_auth_mode)
        if self.gmail_auth_mode == "none":
            self._log_gmail_unconfigured()
        yield
        if self._gmail_certs is not None:
            await self._gmail_certs.aclose()
        if self._pool is not None:
            await self._pool.close()

    @property
    def gmail_auth_mode(self) -> str:
        """How Gmail push deliveries are authenticated: oidc, token or none (all refused)."""
        if self._gmail_oidc is not None:
            return "oidc"
        return "token" if self._gmail_token else "none"

    def _log_gmail_unconfigured(self) -> None:
        if not self._gmail_unconfigured_logged:
            self._gmail_unconfigured_logged = True
            log.warning("[Receiver] the Gmail push endpoint is not configured (set "
                        "GMAIL_PUSH_AUDIENCE, or GMAIL_PUSH_TOKEN): POST /webhooks/gmail "
                        "refuses every delivery")

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    assert self.database_url is not None
                    self._pool = await asyncio.wait_for(
                        db.create_pool(self.database_url, min_size=1,
                                       max_size=self.pool_size), 10)
        return self._pool

    async def challenge(self, request: Request) -> Response:
        value = request.query_params.get("challenge")
        if not value:
            return PlainTextResponse("missing challenge", status_code=400)
        return Response(value.encode(), media_type="text/plain")

    async def health(self, _request: Request) -> Response:
        """A bare status: whoever can reach the port learns nothing of the database (an error
        names its host and port). The reason is logged once per change, not once per probe."""
        try:
            pool = await self.pool()
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 5)
        except Exception as exc:  # whatever it is, the answer is the same
            text = " ".join(str(exc).split())
            error = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            if error != self._health_error:
                log.warning("[Receiver] /healthz answers 503: the database does not answer "
                            "(%s)", error)
            self._health_error = error
            return PlainTextResponse("unavailable", status_code=503)
        if self._health_error is not None:
            log.info("[Receiver] /healthz answers 200 again: the database answers")
            self._health_error = None
        return PlainTextResponse("ok")

    async def deliver(self, request: Request) -> Response:
        try:
            raw = await read_capped(request, self.cap)
        except TooLarge:
            return PlainTextResponse("payload too large", status_code=413)
        if self.secret is None:
            log.warning("[Receiver] refused a Nylas delivery: NYLAS_WEBHOOK_SECRET is not set")
            return PlainTextResponse("Nylas webhooks are not configured", status_code=401)
        if not verify_signature(raw, request.headers.get("x-nylas-signature"), self.secret):
            log.warning("[Receiver] rejected a delivery with a bad signature")
            return PlainTextResponse("invalid signature", status_code=401)
        body = raw
        if request.headers.get("content-encoding", "").lower() == "gzip":
            try:
                body = gunzip_capped(raw, self.cap)
            except TooLarge:
                return PlainTextResponse("payload too large", status_code=413)
            except zlib.error:
                return PlainTextResponse("bad gzip body", status_code=400)
        try:
            payload = loads(body)  # cleaned: a NUL or a lone surrogate costs only itself
        except ValueError:
            return PlainTextResponse("body is not JSON", status_code=400)
        if not isinstance(payload, dict):
            return PlainTextResponse("body is not a JSON object", status_code=400)
        webhook_id, kind = payload.get("id"), payload.get("type")
        if not isinstance(webhook_id, str) or not webhook_id or \
                not isinstance(kind, str) or not kind:
            return PlainTextResponse("notification needs a string id and type", status_code=400)
        return await self._store(webhook_id, kind, STORE, webhook_id, kind, payload)

    async def deliver_gmail(self, request: Request) -> Response:
        try:
            raw = await read_capped(request, self.cap)
        except TooLarge:
            return PlainTextResponse("payload too large", status_code=413)
        try:
            await self._authenticate_gmail(request)
        except PushRejected as exc:
            log.warning("[Receiver] rejected a Gmail push (%d): %s", exc.status, exc.reason)
            text = "unauthenticated" if exc.status == 401 else "forbidden"
            return PlainTextResponse(text, status_code=exc.status)
        except CertsUnavailable as exc:
            log.error("[Receiver] cannot verify a Gmail push: %s", exc)
            return unavailable()
        try:
            push = parse_push(raw)
        except BadPush as exc:
            log.warning("[Receiver] refused a Gmail push (400): %s", exc)
            return PlainTextResponse(str(exc), status_code=400)
        return await self._store(f"gmail:{push.message_id}", "gmail.history", STORE_GMAIL,
                                 push.message_id, push.email_address, push.history_id,
                                 push.publish_time, push.subscription, push.event_time)

    async def _authenticate_gmail(self, request: Request) -> None:
        """Raises PushRejected (401, 403) or CertsUnavailable."""
        if self._gmail_oidc is not None:
            await self._gmail_oidc.verify(request.headers.get("authorization"))
        elif self._gmail_token:
            if not token_matches(request.query_params.get("token"), self._gmail_token):
                raise PushRejected(401, "missing or wrong ?token=")
        else:
            self._log_gmail_unconfigured()
            raise PushRejected(401, "the Gmail push endpoint is not configured")

    async def _store(self, webhook_id: str, kind: str, query: str, *args: Any) -> Response:
        try:
            pool = await self.pool()
            row = await pool.fetchrow(query, *args)
        except Exception as exc:
            # Whatever failed before the commit, the answer is one Nylas (and Pub/Sub) retries:
            # Nylas never retries a 500 (or a 400) and the notification would be gone.
            log.error("[Receiver] could not store webhook %s (%s): %r", webhook_id, kind, exc)
            return unavailable()
        assert row is not None
        if row["is_new"]:
            log.info("[Receiver] stored %s id=%s", kind, webhook_id)
        else:
            log.info("[Receiver] duplicate %s id=%s", kind, webhook_id)
        return JSONResponse({"status": "ok", "notification_id": str(row["notification_id"]),
                             "duplicate": not row["is_new"]})


def create_app(settings: Settings | None = None, *, database_url: str | None = None) -> Starlette:
    return Receiver(settings or settings_or_exit(), database_url=database_url).app


class ReceiverServer:
    """The receiver as a part of a process (nova.runtime.run_parts): uvicorn in its event loop.
    The process's own signal handlers stop it: left to itself, uvicorn takes over SIGTERM and
    SIGINT and raises them again once it has stopped, so the process would end 143, not 0.

    Settings that would let unauthenticated pushes in (check_push_settings) end the process
    here, exit status 2 and one line, in `python -m nova.receiver` and `python -m nova` alike:
    nothing has started serving yet."""

    def __init__(self, settings: Settings, database_url: str | None = None, *,
                 sock: socket.socket | None = None) -> None:
        import uvicorn

        try:
            check_push_settings(settings)
        except ConfigError as exc:
            log.error("[Receiver] %s", exc)
            raise SystemExit(2) from None
        config = uvicorn.Config(create_app(settings, database_url=database_url),
                                host=settings.receiver_host, port=settings.receiver_port,
                                log_level="warning", access_log=False, lifespan="on",
                                http="httptools",  # C parser: a third of a request's CPU
                                timeout_graceful_shutdown=max(1, int(
                                    settings.shutdown_grace_seconds)))
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self.sock = sock  # a worker of nova.receiver_workers: the socket it was handed

    async def run(self) -> None:
        await self.server.serve(sockets=[self.sock] if self.sock is not None else None)

    def stop(self) -> None:
        self.server.should_exit = True


def main() -> int:
    """`python -m nova.receiver`: until SIGTERM/SIGINT, then exit 0 once in-flight deliveries
    are answered. NOVA_RECEIVER_WORKERS > 1: a supervisor of that many worker processes on
    the one port (nova.receiver_workers)."""
    from nova import metrics
    from nova.receiver_workers import ReceiverWorkers, inherited_socket
    from nova.runtime import Runnable, run_parts, run_process

    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    sock = inherited_socket()
    try:
        if sock is None and settings.receiver_workers > 1:
            Receiver(settings, database_url="")  # settings it refuses end it here, once
            part: Runnable = ReceiverWorkers(settings, settings.receiver_workers)
        else:
            part = ReceiverServer(settings, sock=sock)
    except ValueError as exc:  # ConfigError too
        log.error("[Receiver] %s", exc)
        return 2
    return run_process(run_parts([part, *metrics.server_parts(settings, "Receiver")]))


if __name__ == "__main__":
    raise SystemExit(main())
