"""Starlette application: Gmail API paths, batch, the OAuth token endpoint, certs, controls.

* ``/gmail/v1/users/{userId}/...`` -- :class:`.api.Api` (the discovery document's paths, joined
  to ``api_endpoint`` by google-api-python-client)
* ``POST /batch/gmail/v1`` and ``POST /batch`` -- :mod:`.batch`
* ``POST /token`` -- :meth:`.auth.OAuth.token_endpoint` (form-encoded, as google-auth posts it;
  JSON is accepted too)
* ``GET /oauth2/v1/certs`` -- ``{kid: x509 PEM}``, the format of
  https://www.googleapis.com/oauth2/v1/certs; ``GET /oauth2/v3/certs`` -- the JWK set
* ``/_sandbox/...`` -- :mod:`.control`

Any other URL answers Google's HTML 404 page, as Google's front end does.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import batch
from .api import Call
from .auth import signing_key
from .errors import HTML_502, Reply, dumps, html_404, oauth_error

if TYPE_CHECKING:
    from .server import SandboxGmail

API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def to_response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, headers=reply.headers,
                    media_type=reply.content_type or None)


def build_app(sb: SandboxGmail) -> Starlette:
    async def api_route(request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        call = Call(request.method, path, list(request.query_params.multi_items()),
                    {k.lower(): v for k, v in request.headers.items()}, await request.body())
        reply = await sb.api.handle(call)
        sb.stats.status(reply.status)
        return to_response(reply)

    async def batch_route(request: Request) -> Response:
        reply = await batch.run(sb, request.headers.get("content-type", ""),
                                await request.body(), request.headers.get("authorization"))
        sb.stats.status(reply.status)
        return to_response(reply)

    async def token_route(request: Request) -> Response:
        sb.stats.hit("token")
        body = await request.body()
        fault = sb.faults.pick("token", None)
        reply: Reply
        if fault is not None:
            sb.stats.fault(fault)
        if fault == "error_5xx":
            reply = oauth_error(500, "internal_failure", "Backend Error")
        elif fault == "html_error":
            reply = Reply(502, HTML_502, content_type="text/html; charset=UTF-8")
        elif fault == "malformed":
            reply = Reply(200, b'{\n  "access_token": "ya29.')
        elif fault == "timeout":
            with contextlib.suppress(TimeoutError):
                await sb.wait_stopped(sb.faults.hang_seconds)
            reply = oauth_error(503, "temporarily_unavailable", "Service unavailable")
        else:
            if "json" in request.headers.get("content-type", ""):
                try:
                    form = {str(k): str(v) for k, v in json.loads(body or b"{}").items()}
                except (ValueError, AttributeError):
                    form = {}
            else:
                form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
            reply = sb.oauth.token_endpoint(form)
        sb.stats.status(reply.status)
        return to_response(reply)

    async def certs(request: Request) -> Response:
        return to_response(Reply(200, dumps(signing_key().x509_certs()),
                                 headers={"Cache-Control": "public, max-age=20000"}))

    async def jwks(request: Request) -> Response:
        return to_response(Reply(200, dumps(signing_key().jwks()),
                                 headers={"Cache-Control": "public, max-age=20000"}))

    from .control import control_routes

    routes = [
        Route("/gmail/v1/{rest:path}", api_route, methods=API_METHODS),
        Route("/batch/gmail/v1", batch_route, methods=["POST"]),
        Route("/batch", batch_route, methods=["POST"]),
        Route("/token", token_route, methods=["POST"]),
        Route("/oauth2/v1/certs", certs, methods=["GET"]),
        Route("/oauth2/v3/certs", jwks, methods=["GET"]),
        *control_routes(sb),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return to_response(html_404(request.url.path))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
