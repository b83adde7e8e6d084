"""Nylas v3 error bodies as the sandbox answers them.

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
* 429 ``nylas_rate_limit_exceeded`` -- https://developer.nylas.com/docs/dev-guide/platform/
  rate-limits/: "check error.type to see which layer limited you: nylas_rate_limit_exceeded is
  Nylas, rate_limit_error is the provider"; Retry-After is sent with the 429.
* 500 ``api.internal_error`` "Internal error, contact administrator."
* 504 ``api.provider_error`` "Provider error message."
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import JSONResponse


def request_id() -> str:
    return str(uuid.uuid4())


def error_body(type_: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id(), "error": {"type": type_, "message": message, **extra}}


def error_response(status: int, type_: str, message: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(type_, message, **extra), status_code=status, headers=headers)


def bad_request(message: str = "Bad request") -> JSONResponse:
    return error_response(400, "api.invalid_request_error", message)


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


def rate_limited(retry_after: int) -> JSONResponse:
    return error_response(429, "nylas_rate_limit_exceeded",
                          "Too many requests. Please try again later.",
                          headers={"Retry-After": str(retry_after)})


def internal_error(status: int = 500) -> JSONResponse:
    if status == 504:
        return error_response(504, "api.provider_error", "Provider error message.")
    return error_response(status, "api.internal_error", "Internal error, contact administrator.")
