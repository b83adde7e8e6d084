"""Nylas v3 error bodies as the sandbox answers them, and the JSON response class it uses.

Shape (``{"request_id": ..., "error": {"type": ..., "message": ..., "provider_error"?}}``)
from https://developer.nylas.com/docs/api/errors/ ("Error messages include a JSON object that
contains ... the error's type and a human-readable message") and the SDK's
``nylas.models.errors.NylasApiErrorResponse``.  Types and status codes from the table on that
page (also https://developer.nylas.com/docs/api/errors/event-codes/):

* 400 ``api.invalid_request_error`` "Bad request"
* 401 ``api.authentication_error`` "Unauthorized" (bad or missing API key)
* 401 ``grant.refresh_token_invalid`` "Invalid refresh_token supplied to Grant." -- what an
  expired grant answers; https://developer.nylas.com/docs/v3/auth/troubleshooting/ and
  https://developer.nylas.com/docs/cookbook/use-cases/build/handle-grant-expiry/ say requests
  for an expired grant fail with 401 until the user re-authenticates.
* 403 ``grant.access_denied`` "Access to Grant denied."
* 404 ``api.not_found_error`` "Resource not found." / ``grant.not_found`` "Grant not found."
* 429, two kinds (https://developer.nylas.com/docs/developer-tools/api/rate-limits/, "check
  error.type to see which layer limited you"):

  - Nylas's own limit: ``nylas_rate_limit_exceeded`` and no ``provider_error``.  The page says
    nothing of a Retry-After for this layer; the sandbox takes the harsher reading and sends
    none (:func:`nylas_rate_limited`).
  - the provider's limit relayed: ``rate_limit_error`` with a ``provider_error`` (the
    provider's own body), "includes Retry-After when the provider sends one"
    (:func:`provider_rate_limited`; the provider bodies are modelled on Google's and Microsoft
    Graph's throttling errors).
* 500 ``api.internal_error`` "Internal error, contact administrator."
* 504 ``api.provider_error`` "Provider error message."

Every JSON body is serialised with ``ensure_ascii=True``: strings in hostile mail may hold lone
surrogates (``\\ud800``), which cannot be encoded as UTF-8 and would crash Starlette's own
``JSONResponse`` (``ensure_ascii=False``); escaped, they reach the client as ``"\\ud800"`` just
as a JSON-escaping server would send them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.responses import JSONResponse


class SafeJSONResponse(JSONResponse):
    """``JSONResponse`` that escapes non-ASCII, so lone surrogates serialise as ``\\udXXX``."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


def request_id() -> str:
    return str(uuid.uuid4())


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id(), "error": {"type": type_, "message": message, **extra}}


def error_response(status: int, type_: str, message: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return SafeJSONResponse(error_body(type_, message, **extra), status_code=status,
                            headers=headers)


def bad_request(message: str = "Bad request") -> JSONResponse:
    return error_response(400, "api.invalid_request_error", message)


def expired_page_token() -> JSONResponse:
    """A page token past its lifetime (or from before ``expire_cursors()``).

    The Nylas docs describe ``page_token`` / ``next_cursor``
    (https://developer.nylas.com/docs/api/v3/#pagination) but not what a stale token answers.
    GUESS, documented as such: the same 400 ``api.invalid_request_error`` a malformed token
    gets, with a message naming the page token, so a client cannot tell "expired" from
    "garbage" by type and must restart the listing from the first page either way.
    """
    return bad_request("Invalid or expired page_token: start again from the first page.")


def unauthorized() -> JSONResponse:
    return error_response(401, "api.authentication_error", "Unauthorized")


def grant_expired() -> JSONResponse:
    return error_response(
        401, "grant.refresh_token_invalid", "Invalid refresh_token supplied to Grant.",
        provider_error={"error": "invalid_grant",
                        "error_description": "Token has been expired or revoked."})


def grant_not_found() -> JSONResponse:
    return error_response(404, "grant.not_found", "Grant not found.")


def not_found(what: str = "Resource") -> JSONResponse:
    return error_response(404, "api.not_found_error", f"{what} not found.")


def nylas_rate_limited() -> JSONResponse:
    """Nylas's own per-grant limit: ``nylas_rate_limit_exceeded``, no Retry-After, no
    ``provider_error`` (https://developer.nylas.com/docs/developer-tools/api/rate-limits/)."""
    return error_response(429, "nylas_rate_limit_exceeded",
                          "Too many requests. Please try again later.")


def provider_error_body(provider: str, retry_after: int | None) -> dict[str, Any]:
    """The provider's throttling body as Nylas relays it in ``provider_error``.

    Google: the Gmail API error object (``code``, ``message``, ``errors[{domain, reason}]``,
    ``status``; https://developers.google.com/workspace/gmail/api/guides/handle-errors).
    Microsoft: the Graph error object (``code``, ``message``, ``innerError``;
    https://learn.microsoft.com/en-us/graph/throttling).  Other providers: a bare message.
    """
    if provider == "google":
        return {"error": {
            "code": 429, "message": "Too many concurrent requests for user.",
            "errors": [{"domain": "global", "reason": "rateLimitExceeded",
                        "message": "Too many concurrent requests for user."}],
            "status": "RESOURCE_EXHAUSTED"}}
    if provider == "microsoft":
        wait = f" Try again in {retry_after} seconds." if retry_after is not None else ""
        return {"error": {
            "code": "ApplicationThrottled",
            "message": "Application is over its MailboxConcurrency limit." + wait,
            "innerError": {"request-id": request_id(), "date": "sandbox"}}}
    return {"message": "Account throttled by the mail server."}


def provider_rate_limited(provider: str, retry_after: int | None) -> JSONResponse:
    """A provider's limit relayed: ``rate_limit_error`` + ``provider_error``; Retry-After only
    when the provider sent one (https://developer.nylas.com/docs/developer-tools/api/
    rate-limits/: "Includes Retry-After when the provider sends one")."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return error_response(429, "rate_limit_error", "Provider rate limit exceeded.",
                          headers=headers,
                          provider_error=provider_error_body(provider, retry_after))


def rate_limited(retry_after: int | None = None, *, provider: str = "google") -> JSONResponse:
    """Backwards-compatible name: a relayed provider 429 carrying ``Retry-After``.

    Before the two kinds were told apart this answered ``nylas_rate_limit_exceeded`` *with*
    Retry-After, which no Nylas layer does; callers that want Nylas's own limit use
    :func:`nylas_rate_limited`.
    """
    return provider_rate_limited(provider, retry_after)


def internal_error(status: int = 500) -> JSONResponse:
    if status == 504:
        return error_response(504, "api.provider_error", "Provider error message.")
    return error_response(status, "api.internal_error", "Internal error, contact administrator.")
