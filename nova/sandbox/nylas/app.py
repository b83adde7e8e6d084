"""Starlette application: the Nylas v3 endpoints Nova uses, plus ``/_sandbox`` controls.

Endpoints (paths as in the SDK's ``nylas.resources.*`` and
https://developer.nylas.com/docs/reference/api/):

* ``GET /v3/grants/{grant_id}`` -- grant object (``data``), answered even for an expired grant
  (``grant_status: "invalid"``).
* ``GET /v3/grants/{grant_id}/folders`` -- ``limit``, ``page_token``: every folder
  (:mod:`.folders`).
* ``GET /v3/grants/{grant_id}/threads`` -- ``limit`` (1..200, default 50), ``page_token``,
  ``latest_message_after`` / ``latest_message_before`` (Nylas' thread filters; the sandbox
  also accepts ``received_after`` / ``received_before``), ``in``, ``unread``, ``starred``.
  Newest first; ``{"request_id", "data", "next_cursor"}`` with no ``next_cursor`` on the
  last page (https://developer.nylas.com/docs/api/v3/#pagination).
* ``GET /v3/grants/{grant_id}/threads/{thread_id}``
* ``GET /v3/grants/{grant_id}/messages`` -- ``thread_id``, ``limit``, ``page_token``,
  ``received_after``, ``received_before``, ``in``, ``unread``, ``starred``, ``fields``.
* ``GET /v3/grants/{grant_id}/messages/{message_id}`` -- ``fields=include_headers`` adds
  ``headers`` (SDK ``FindMessageQueryParams.fields``).
* ``GET /v3/grants/{grant_id}/attachments/{attachment_id}?message_id=`` -- metadata.
* ``GET /v3/grants/{grant_id}/attachments/{attachment_id}/download?message_id=`` -- bytes,
  streamed as ``application/octet-stream`` with no ``Content-Disposition`` and so no
  filename: name and type come only from the metadata endpoint
  (https://developer.nylas.com/docs/reference/api/attachments/ and
  https://developer.nylas.com/docs/cookbook/email/attachments/download-attachments/, which
  take the filename and content type from the message's ``attachments`` metadata).

Auth is ``Authorization: Bearer <api key>``; see :mod:`.errors` for the error bodies.  Every
JSON body escapes non-ASCII (:class:`.errors.SafeJSONResponse`), so hostile strings with lone
surrogates serialise as ``\ud800`` instead of crashing the response.

Rate limiting (:class:`.state.RateLimiter`, https://developer.nylas.com/docs/developer-tools/
api/rate-limits/): with ``rate_limit_kind="nylas"`` a refused request is Nylas's own 429
(``nylas_rate_limit_exceeded``, no Retry-After); with ``"provider"`` it is the provider's 429
relayed (``rate_limit_error`` + ``provider_error``, Retry-After on ``retry_after_share`` of
them).  A stale ``page_token`` answers :func:`.errors.expired_page_token`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import errors
from .blobs import random_chunks, split_chunks
from .mailbox import MAX_LIMIT, BadCursor, ExpiredCursor, GrantRec

if TYPE_CHECKING:
    from .server import SandboxNylas

Handler = Callable[[Request, GrantRec], Awaitable[Response]]


class _BadParam(Exception):
    pass


def _int(q: Any, name: str, default: int | None = None, lo: int | None = None,
         hi: int | None = None) -> int | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise _BadParam(f"Invalid value for {name}: {raw!r}") from exc
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _BadParam(f"{name} must be between {lo} and {hi}")
    return value


def _bool(q: Any, name: str) -> bool | None:
    raw = q.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise _BadParam(f"Invalid value for {name}: {raw!r}")


def _ok(data: Any, **extra: Any) -> Response:
    return errors.SafeJSONResponse({"request_id": errors.request_id(), "data": data, **extra})


def build_app(sb: SandboxNylas) -> Starlette:
    mb = sb.mailbox

    def api(endpoint: str, handler: Handler, *, allow_expired: bool = False,
            ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            gid = request.path_params["grant_id"]
            token = request.query_params.get("page_token")
            sb.stats.hit(endpoint, gid, token)
            resp = await guarded(request, gid, endpoint, handler, allow_expired)
            sb.stats.status(resp.status_code)
            return resp
        return route

    async def guarded(request: Request, gid: str, endpoint: str, handler: Handler,
                      allow_expired: bool) -> Response:
        if sb.latency_ms:
            await asyncio.sleep(sb.latency_ms / 1000)
        if request.headers.get("authorization") != f"Bearer {sb.api_key}":
            return errors.unauthorized()
        grant = mb.grant(gid)
        if grant is None or grant.deleted:
            return errors.grant_not_found()
        throttle = sb.limiter.verdict(gid)
        if throttle is not None:
            if throttle.kind == "nylas":
                return errors.nylas_rate_limited()
            return errors.provider_rate_limited(grant.provider, throttle.retry_after)
        fault = sb.faults.pick(endpoint, gid)
        if fault is not None:
            sb.stats.fault(fault)
            injected = await fault_response(fault, endpoint, grant)
            if injected is not None:
                return injected
        if grant.status != "valid" and not allow_expired:
            return errors.grant_expired()
        try:
            return await handler(request, grant)
        except _BadParam as exc:
            return errors.bad_request(str(exc))
        except ExpiredCursor:
            return errors.expired_page_token()
        except BadCursor:
            return errors.bad_request("Invalid page_token")

    async def fault_response(kind: str, endpoint: str, grant: GrantRec) -> Response | None:
        if kind == "error_5xx":
            return errors.internal_error(sb.faults.next_5xx())
        if kind == "rate_limit":  # the provider's 429 *with* Retry-After (see FAULT_KINDS)
            return errors.provider_rate_limited(grant.provider, sb.forced_retry_after)
        if kind == "provider_rate_limit":
            return errors.provider_rate_limited(grant.provider, None)
        if kind == "nylas_rate_limit":
            return errors.nylas_rate_limited()
        if kind == "unauthorized":
            return errors.unauthorized()
        if kind == "grant_not_found":
            return errors.grant_not_found()
        if kind == "html_error":
            return Response("<html><head><title>502 Bad Gateway</title></head><body><center>"
                            "<h1>502 Bad Gateway</h1></center></body></html>",
                            status_code=502, media_type="text/html")
        if kind == "malformed" and endpoint != "download_attachment":
            return Response(b'{"request_id": "x", "data": [{"id": "trunc', status_code=200,
                            media_type="application/json")
        if kind == "timeout":
            with contextlib.suppress(TimeoutError):
                assert sb.stop_event is not None
                await asyncio.wait_for(sb.stop_event.wait(), sb.faults.hang_seconds)
            return errors.internal_error(504)
        return None

    async def get_grant(request: Request, grant: GrantRec) -> Response:
        return _ok(grant.to_json())

    async def list_folders(request: Request, grant: GrantRec) -> Response:
        q = request.query_params
        data, nxt = sb.folders.page(grant, limit=_int(q, "limit", 50, 1, MAX_LIMIT) or 50,
                                    cursor=q.get("page_token") or None)
        return _ok(data, **({"next_cursor": nxt} if nxt else {}))

    def thread_pred(q: Any) -> Callable[[Any], bool] | None:
        folder, unread, starred = q.get("in"), _bool(q, "unread"), _bool(q, "starred")
        if folder is None and unread is None and starred is None:
            return None

        def pred(t: Any) -> bool:
            msgs = t.messages
            return ((folder is None or any(folder in m.folders for m in msgs))
                    and (unread is None or any(m.unread for m in msgs) == unread)
                    and (starred is None or any(m.starred for m in msgs) == starred))
        return pred

    def message_pred(q: Any) -> Callable[[Any], bool] | None:
        folder, unread, starred = q.get("in"), _bool(q, "unread"), _bool(q, "starred")
        if folder is None and unread is None and starred is None:
            return None
        return lambda m: ((folder is None or folder in m.folders)
                          and (unread is None or m.unread == unread)
                          and (starred is None or m.starred == starred))

    async def list_threads(request: Request, grant: GrantRec) -> Response:
        q = request.query_params
        after = _int(q, "latest_message_after", _int(q, "received_after"))
        before = _int(q, "latest_message_before", _int(q, "received_before"))
        items, nxt = mb.list_threads(
            grant.id, limit=_int(q, "limit", 50, 1, MAX_LIMIT) or 50,
            cursor=q.get("page_token") or None, after=after, before=before,
            pred=thread_pred(q))
        extra = {"next_cursor": nxt} if nxt else {}
        return _ok([t.to_json(grant.id, latest_body=sb.thread_bodies) for t in items], **extra)

    async def get_thread(request: Request, grant: GrantRec) -> Response:
        thread = mb.thread(grant.id, request.path_params["thread_id"])
        if thread is None:
            return errors.not_found("Thread")
        return _ok(thread.to_json(grant.id, latest_body=sb.thread_bodies))

    async def list_messages(request: Request, grant: GrantRec) -> Response:
        q = request.query_params
        items, nxt = mb.list_messages(
            grant.id, thread_id=q.get("thread_id"),
            limit=_int(q, "limit", 50, 1, MAX_LIMIT) or 50, cursor=q.get("page_token") or None,
            after=_int(q, "received_after"), before=_int(q, "received_before"),
            pred=message_pred(q))
        headers = q.get("fields") == "include_headers"
        extra = {"next_cursor": nxt} if nxt else {}
        return _ok([m.to_json(grant.id, include_headers=headers) for m in items], **extra)

    async def get_message(request: Request, grant: GrantRec) -> Response:
        msg = mb.message(grant.id, request.path_params["message_id"])
        if msg is None:
            return errors.not_found("Message")
        headers = request.query_params.get("fields") == "include_headers"
        return _ok(msg.to_json(grant.id, include_headers=headers))

    def find_attachment(request: Request, grant: GrantRec) -> Any:
        mid = request.query_params.get("message_id")
        if not mid:
            raise _BadParam("message_id is required")
        return mb.attachment(grant.id, request.path_params["attachment_id"], mid)

    async def get_attachment(request: Request, grant: GrantRec) -> Response:
        att = find_attachment(request, grant)
        if att is None:
            return errors.not_found("Attachment")
        return _ok(att.to_json(grant.id))

    async def download(request: Request, grant: GrantRec) -> Response:
        att = find_attachment(request, grant)
        if att is None:
            return errors.not_found("Attachment")
        data = att.data if att.data is not None else mb.blob(att.id)

        async def body() -> AsyncIterator[bytes]:
            chunks = split_chunks(data) if data is not None else random_chunks(att.id, att.size)
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0)

        # Bytes only: no filename, no real type (both live in the attachment metadata).
        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"Content-Length": str(att.size)})

    from .control import control_routes

    routes = [
        Route("/v3/grants/{grant_id}", api("get_grant", get_grant, allow_expired=True)),
        Route("/v3/grants/{grant_id}/folders", api("list_folders", list_folders)),
        Route("/v3/grants/{grant_id}/threads", api("list_threads", list_threads)),
        Route("/v3/grants/{grant_id}/threads/{thread_id}", api("get_thread", get_thread)),
        Route("/v3/grants/{grant_id}/messages", api("list_messages", list_messages)),
        Route("/v3/grants/{grant_id}/messages/{message_id}", api("get_message", get_message)),
        Route("/v3/grants/{grant_id}/attachments/{attachment_id}",
              api("get_attachment", get_attachment)),
        Route("/v3/grants/{grant_id}/attachments/{attachment_id}/download",
              api("download_attachment", download)),
        *control_routes(sb),
    ]

    async def not_found_route(request: Request, exc: Exception) -> Response:
        return errors.not_found("Route")

    return Starlette(routes=routes, exception_handlers={404: not_found_route})
