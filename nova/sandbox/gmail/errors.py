"""Gmail API and Google OAuth error bodies as the sandbox answers them.

API errors have Google's JSON error shape, ``{"error": {"code", "message", "errors": [{"domain",
"reason", "message"[, "location", "locationType"]}], "status"}}``, from
https://developers.google.com/workspace/gmail/api/guides/handle-errors (the samples there) and
the Cloud APIs error model (``status`` is the google.rpc code name,
https://cloud.google.com/apis/design/errors).  The client library reads ``errors[0].reason``
to decide whether a 403 is worth retrying (``googleapiclient.http._should_retry_response``), so
the reason strings matter:

* 400 ``invalidArgument`` / ``badRequest`` (INVALID_ARGUMENT / FAILED_PRECONDITION)
* 401 ``authError`` "Invalid Credentials" (an expired, revoked or unknown token; the header
  ``WWW-Authenticate: Bearer ... error="invalid_token"`` goes with it) or ``required`` "Login
  Required" (no token at all)
* 403 ``forbidden`` (another user's mailbox: "Delegation denied"), ``insufficientPermissions``
  (the gmail.metadata scope), ``userRateLimitExceeded``, ``rateLimitExceeded``,
  ``dailyLimitExceeded`` -- domain ``usageLimits`` for the last three, as in the handle-errors
  samples
* 404 ``notFound`` "Requested entity was not found." (also a too-old ``startHistoryId``,
  https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.history/list)
* 429 ``rateLimitExceeded`` (quota, and "Too many concurrent requests for user")
* 500 / 503 ``backendError``

OAuth token endpoint errors are RFC 6749 section 5.2 bodies, ``{"error", "error_description"}``
(Google answers ``invalid_grant`` "Token has been expired or revoked." for a revoked refresh
token: https://developers.google.com/identity/protocols/oauth2#expiration).

Every body is serialised with ``ensure_ascii=True`` (hostile header values hold NULs and control
characters) and, like Google's servers, pretty-printed unless ``prettyPrint=false``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE"}
REASON_PHRASES = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
                  403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
                  500: "Internal Server Error", 502: "Bad Gateway",
                  503: "Service Unavailable", 504: "Gateway Timeout"}
JSON_TYPE = "application/json; charset=UTF-8"


def dumps(obj: Any, pretty: bool = True) -> bytes:
    if pretty:
        return json.dumps(obj, indent=2, ensure_ascii=True).encode("ascii")
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass
class Reply:
    """One API answer (a whole HTTP response, or one part of a batch response)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_TYPE

    @classmethod
    def json(cls, obj: Any, status: int = 200, *, pretty: bool = True,
             headers: dict[str, str] | None = None) -> Reply:
        return cls(status, dumps(obj, pretty), dict(headers or {}))


class ApiError(Exception):
    """Raised by handlers; rendered by :func:`error_reply`."""

    def __init__(self, code: int, reason: str, message: str, *, domain: str = "global",
                 status: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.domain = domain
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        detail = {"message": self.message, "domain": self.domain, "reason": self.reason,
                  **self.extra}
        return {"error": {"code": self.code, "message": self.message, "errors": [detail],
                          "status": self.status}}

    def reply(self, pretty: bool = True) -> Reply:
        return Reply(self.code, dumps(self.body(), pretty), dict(self.headers))


def invalid_argument(message: str) -> ApiError:
    return ApiError(400, "invalidArgument", message)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "badRequest", message, status="FAILED_PRECONDITION")


def not_found() -> ApiError:
    return ApiError(404, "notFound", "Requested entity was not found.")


def invalid_credentials() -> ApiError:
    """An expired, revoked or unknown access token (handle-errors: "Resolve a 401 error")."""
    return ApiError(
        401, "authError",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
        "cookie or other valid authentication credential. See "
        "https://developers.google.com/identity/sign-in/web/devconsole-project.",
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                                     'error="invalid_token"'},
        extra={"location": "Authorization", "locationType": "header"})


def login_required() -> ApiError:
    return ApiError(
        401, "required",
        "Request is missing required authentication credential. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential.",
        headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
        extra={"location": "Authorization", "locationType": "header"})


def delegation_denied(email: str) -> ApiError:
    return ApiError(403, "forbidden", f"Delegation denied for {email}")


def insufficient_scope(message: str) -> ApiError:
    return ApiError(403, "insufficientPermissions", message)


def user_rate_limited(retry_at: str | None = None) -> ApiError:
    """403 userRateLimitExceeded (the quota page's "Exceeded reason" for the per-user limit)."""
    msg = "User-rate limit exceeded."
    if retry_at:
        msg += f"  Retry after {retry_at}"
    return ApiError(403, "userRateLimitExceeded", msg, domain="usageLimits")


def quota_exceeded_429(project: str) -> ApiError:
    """429 rateLimitExceeded as Google's quota system words it for a per-user-per-minute
    limit (the form most often reported from gmail.googleapis.com)."""
    return ApiError(
        429, "rateLimitExceeded",
        "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user' of "
        f"service 'gmail.googleapis.com' for consumer 'project_number:{project}'.",
        domain="usageLimits")


def project_rate_limited() -> ApiError:
    return ApiError(403, "rateLimitExceeded", "Rate Limit Exceeded", domain="usageLimits")


def daily_limit() -> ApiError:
    return ApiError(403, "dailyLimitExceeded", "Daily Limit Exceeded", domain="usageLimits")


def too_many_concurrent() -> ApiError:
    return ApiError(429, "rateLimitExceeded", "Too many concurrent requests for user.",
                    domain="usageLimits")


def backend_error(code: int = 500) -> ApiError:
    message = "Backend Error" if code == 500 else "The service is currently unavailable."
    return ApiError(code, "backendError", message)


HTML_502 = (b"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n  <title>Error 502 "
            b"(Server Error)!!1</title>\n  <p><b>502.</b> <ins>That\xe2\x80\x99s an error.</ins>"
            b"\n  <p>The server encountered a temporary error and could not complete your "
            b"request.<p>Please try again in 30 seconds.  <ins>That\xe2\x80\x99s all we know."
            b"</ins>\n")


def html_404(path: str) -> Reply:
    """Google's front end answers an unknown URL with an HTML page, not the JSON error."""
    body = ("<!DOCTYPE html>\n<html lang=en>\n  <title>Error 404 (Not Found)!!1</title>\n"
            f"  <p><b>404.</b> <ins>That's an error.</ins>\n  <p>The requested URL <code>{path}"
            "</code> was not found on this server.  <ins>That's all we know.</ins>\n")
    return Reply(404, body.encode("utf-8", "replace"), content_type="text/html; charset=UTF-8")


def oauth_error(status: int, error: str, description: str) -> Reply:
    return Reply(status, dumps({"error": error, "error_description": description}))
