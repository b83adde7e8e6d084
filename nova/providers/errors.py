"""Provider-neutral errors.  The runtime decides what to do; providers only classify.

=================  ==========================================================  ============
class              raised for                                                  retry?
=================  ==========================================================  ============
RateLimited        HTTP 429 (``retry_after`` from Retry-After, seconds)        after wait
Unauthorized       401/403: a bad API key, a grant of another region or an      confirm
                   expired grant alike; the caller asks the grant itself
AuthExpired        the grant is confirmed unusable (expired/revoked)           re-auth
NotFound           404 for an object; ``GrantNotFound`` for a deleted grant     no
Transient          5xx, 408, timeouts, connection errors, malformed 2xx body   yes
Permanent          any other 4xx (bad request ...); ``InvalidApiKey`` for a    no
                   rejected application API key (not a grant problem)
=================  ==========================================================  ============
"""

from __future__ import annotations


class ProviderError(Exception):
    """Base class.  ``status``/``error_type``/``request_id`` come from the HTTP answer."""

    def __init__(self, message: str, *, status: int | None = None,
                 error_type: str | None = None, request_id: str | None = None,
                 provider: str = "nylas") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.request_id = request_id
        self.provider = provider

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.message!r}, status={self.status}, "
                f"error_type={self.error_type!r})")


class RateLimited(ProviderError):
    def __init__(self, message: str, *, retry_after: float | None = None,
                 status: int | None = 429, error_type: str | None = None,
                 request_id: str | None = None, provider: str = "nylas") -> None:
        super().__init__(message, status=status, error_type=error_type, request_id=request_id,
                         provider=provider)
        self.retry_after = retry_after


class AuthExpired(ProviderError):
    """The grant can no longer be used until the user re-authenticates."""


class Unauthorized(ProviderError):
    """A 401/403 that does not say whose fault it is: confirm with the grant before acting."""


class NotFound(ProviderError):
    pass


class GrantNotFound(NotFound):
    """The grant itself does not exist (deleted)."""


class Transient(ProviderError):
    """Worth retrying: server errors, timeouts, network failures, garbage success bodies."""


class Permanent(ProviderError):
    """Retrying the same request will fail the same way."""


class InvalidApiKey(Permanent):
    """The application API key was rejected (configuration error, affects every grant)."""
