"""Gmail push deliveries (Cloud Pub/Sub push): who sent them, and what they say.

Gmail publishes a notification to a Pub/Sub topic whenever a watched mailbox changes; a push
subscription POSTs it to Nova (`POST /webhooks/gmail`, nova.receiver). This module holds what
the receiver needs to trust and read such a delivery, without I/O of its own except fetching
Google's certificates (asynchronously, with httpx).

Authentication (https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions): a push
subscription with authentication sends `Authorization: Bearer <JWT>`, an OpenID Connect token
signed by Google (RS256, a `kid` naming the key) whose claims are `aud` (the audience set on
the subscription, by default the push endpoint URL), `email` (the subscription's service
account), `email_verified`, `iss` (accounts.google.com), `iat`/`exp`. The public keys are
published as x509 certificates by key id at https://www.googleapis.com/oauth2/v1/certs, with a
Cache-Control max-age telling how long they may be kept. google-auth's `jwt.decode` checks the
signature and the lifetime against such a `{kid: PEM}` mapping; the fetch is done here so the
event loop never waits on a blocking HTTP client. Subscriptions without authentication can
carry a shared secret in the endpoint's query string (`?token=...`), the pattern of the Gmail
push guide's older versions; it is compared in constant time.

Google signs such a token for any push subscription of any project, with whatever audience
that subscription names, and the audience is usually the public endpoint URL: a token of the
right audience proves only that someone's subscription points at Nova. Only `email`, the
service account the subscription runs as, says it is ours. An audience is therefore never
checked without a service account (`check_push_settings`, called when a receiver is built).

Body (https://developers.google.com/workspace/gmail/api/guides/push, "Receiving
notifications", and https://cloud.google.com/pubsub/docs/push): `{"message": {"data",
"messageId", "message_id", "publishTime", "publish_time", "attributes"}, "subscription"}`,
where `data` is base64 of `{"emailAddress", "historyId"}`; `historyId` has been seen both as a
string and as a number. Pub/Sub acknowledges on 102, 200, 201, 202 and 204 and retries
anything else with back-off, redelivering the same `messageId`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
from google.auth import exceptions as google_exceptions
from google.auth import jwt as google_jwt

from nova.config import ConfigError, Settings
from nova.providers.clean import clean_text, loads

log = logging.getLogger("nova.receiver")

GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
CLOCK_SKEW_SECONDS = 60
DEFAULT_CERTS_MAX_AGE = 300.0  # when the certificate answer carries no max-age
MAX_CERTS_MAX_AGE = 86_400.0
MIN_REFETCH_SECONDS = 30.0  # an unknown kid refetches the certificates at most this often
MAX_HISTORY_ID_DIGITS = 20  # history ids are unsigned 64-bit integers


class PushRejected(Exception):
    """The delivery is not accepted: `status` is the answer (401, 403), `reason` a short,
    secret-free text for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class CertsUnavailable(Exception):
    """Google's certificates could not be fetched and none that fit are cached."""


class BadPush(ValueError):
    """The body is not a Gmail push notification; the message says why (short, for a 400)."""


# ---------------------------------------------------------------------- certificates
def cache_seconds(cache_control: str | None, age: str | None = None) -> float | None:
    """How long a response may be kept by its Cache-Control (max-age, less Age); None when it
    says nothing, 0 for no-store / no-cache."""
    if not cache_control:
        return None
    max_age: float | None = None
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return 0.0
        if name == "max-age":
            value = value.strip().strip('"')
            if value.isdigit():
                max_age = float(value)
    if max_age is None:
        return None
    if age and age.strip().isdigit():
        max_age -= float(age.strip())
    return max(0.0, min(max_age, MAX_CERTS_MAX_AGE))


class GoogleCerts:
    """Google's signing certificates (`{kid: PEM}`), fetched with httpx and cached as long as
    Cache-Control allows. A token naming a key id that is not cached refetches them once (at
    most every MIN_REFETCH_SECONDS, so forged kids cannot turn into a flood of fetches).
    Concurrent requests share one fetch."""

    def __init__(self, url: str, *, timeout: float = 10.0,
                 min_refetch_seconds: float = MIN_REFETCH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout = timeout
        self.min_refetch_seconds = min_refetch_seconds
        self.clock = clock
        self.fetches = 0
        self._certs: dict[str, str] = {}
        self._expires = float("-inf")
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None

    async def for_kid(self, kid: str | None) -> Mapping[str, str] | None:
        """The certificates to check a token against (the one for `kid`; all of them when the
        token names none); None when `kid` is not among them even after a refetch. Raises
        CertsUnavailable when they cannot be fetched and the cache cannot answer."""
        if not self._certs or self.clock() >= self._expires:
            await self._refresh(force=False)
        if not self._certs:
            raise CertsUnavailable("no certificates cached and the fetch failed")
        if kid is None:
            return dict(self._certs)
        if kid not in self._certs and self.clock() - self._fetched_at >= self.min_refetch_seconds:
            if not await self._refresh(force=True):
                raise CertsUnavailable(f"unknown kid and the refetch failed kid={kid!r}")
        if kid in self._certs:
            return {kid: self._certs[kid]}
        return None

    async def _refresh(self, *, force: bool) -> bool:
        """Fetch unless another request did meanwhile; False when the fetch failed (what was
        cached stays)."""
        asked = self.clock()
        async with self._lock:
            if self._fetched_at >= asked or (
                    not force and self._certs and self.clock() < self._expires):
                return True
            try:
                certs, ttl = await self._fetch()
            except CertsUnavailable as exc:
                # Keep what is cached (Google publishes a key well before it signs with it and
                # keeps it well after it stops) and try again shortly.
                self._fetched_at = self.clock()
                self._expires = self._fetched_at + min(self.min_refetch_seconds, 30.0)
                log.warning("[Receiver] could not fetch Google's certificates from %s: %s",
                            self.url, exc)
                return False
            self._certs = certs
            self._fetched_at = self.clock()
            self._expires = self._fetched_at + ttl
            log.info("[Receiver] fetched Google's certificates kids=%s max_age=%ds",
                     ",".join(sorted(certs)), int(ttl))
            return True

    async def _fetch(self) -> tuple[dict[str, str], float]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self.fetches += 1
        try:
            resp = await self._client.get(self.url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise CertsUnavailable(f"{type(exc).__name__}") from exc
        if resp.status_code != 200:
            raise CertsUnavailable(f"HTTP {resp.status_code}")
        try:
            body = resp.json()
        except ValueError as exc:
            raise CertsUnavailable("the answer is not JSON") from exc
        if not isinstance(body, dict) or not body or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in body.items()):
            raise CertsUnavailable("the answer is not a {kid: PEM} object")
        ttl = cache_seconds(resp.headers.get("cache-control"), resp.headers.get("age"))
        return dict(body), DEFAULT_CERTS_MAX_AGE if ttl is None else ttl

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# ---------------------------------------------------------------------- authentication
def check_push_settings(settings: Settings) -> None:
    """Raise ConfigError (one line, naming the variables) for Gmail push settings that would
    let strangers in: GMAIL_PUSH_AUDIENCE without GMAIL_PUSH_SERVICE_ACCOUNT accepts a token
    that any Google Cloud project can have minted for that audience (module docstring).
    Every receiver calls it when it is built; a process that starts one can call it first."""
    if settings.gmail_push_audience is not None and not (
            settings.gmail_push_service_account or "").strip():
        raise ConfigError(
            "GMAIL_PUSH_AUDIENCE is set but GMAIL_PUSH_SERVICE_ACCOUNT is not: any Google-"
            "signed token for that audience would be accepted; set GMAIL_PUSH_SERVICE_ACCOUNT "
            "to the push subscription's service account e-mail")


def _segment(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class OidcVerifier:
    """Checks `Authorization: Bearer <JWT>` as Pub/Sub sends it: signed by a key at the
    certificates URL (401 otherwise), not expired (401), issued by Google (401), for
    `audience` (403), by `service_account` (403), whose email is verified (403). Returns the
    claims. Both the audience and the service account are required (module docstring)."""

    def __init__(self, certs: GoogleCerts, audience: str, service_account: str, *,
                 clock_skew: int = CLOCK_SKEW_SECONDS) -> None:
        if not audience or not service_account:
            raise ValueError("an OIDC push check needs both an audience and a service account")
        self.certs = certs
        self.audience = audience
        self.service_account = service_account
        self.clock_skew = clock_skew

    async def verify(self, authorization: str | None) -> Mapping[str, Any]:
        token = bearer_token(authorization)
        if token is None:
            raise PushRejected(401, "no bearer token")
        parts = token.split(".")
        try:
            if len(parts) != 3:
                raise ValueError
            header, unverified = _segment(parts[0]), _segment(parts[1])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise PushRejected(401, "the bearer token is not a JWT") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise PushRejected(401, "the bearer token is not a JWT")
        if header.get("alg") != "RS256":
            raise PushRejected(401, f"unexpected JWT algorithm {header.get('alg')!r}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise PushRejected(401, "the JWT key id is not a string")
        certs = await self.certs.for_kid(kid)
        if certs is None:
            raise PushRejected(401, f"the JWT is signed by an unknown key kid={kid!r}")
        try:
            claims = google_jwt.decode(token, certs=certs, verify=True,
                                       clock_skew_in_seconds=self.clock_skew)
        except (google_exceptions.GoogleAuthError, ValueError, TypeError):
            # google-auth's messages may quote the token: log a reason of our own.
            raise PushRejected(401, self._why_undecodable(unverified)) from None
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise PushRejected(401, f"the JWT is not issued by Google iss={claims.get('iss')!r}")
        if claims.get("aud") != self.audience:
            raise PushRejected(403, f"the JWT is for another audience aud={claims.get('aud')!r}")
        email = claims.get("email")
        if email != self.service_account:
            raise PushRejected(403, f"the JWT is from another service account email={email!r}")
        if claims.get("email_verified") is not True:
            raise PushRejected(403, f"the JWT's email is not verified email={email!r}")
        return claims

    def _why_undecodable(self, unverified: Mapping[str, Any]) -> str:
        now = time.time()
        exp, iat = unverified.get("exp"), unverified.get("iat")
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            return "the JWT lacks exp or iat, or its signature is invalid"
        if exp < now - self.clock_skew:
            return "the JWT has expired (or its signature is invalid)"
        if iat > now + self.clock_skew:
            return "the JWT is not valid yet (or its signature is invalid)"
        return "the JWT signature is invalid"


def token_matches(given: str | None, expected: str) -> bool:
    """`?token=` against GMAIL_PUSH_TOKEN, in constant time."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------- the body
@dataclass(frozen=True)
class GmailPush:
    """One Gmail notification as a Pub/Sub push delivered it (strings cleaned)."""

    message_id: str
    email_address: str
    history_id: str  # decimal digits
    publish_time: str | None
    subscription: str | None
    event_time: datetime | None  # publish_time parsed; None when absent or unreadable


_RFC3339 = re.compile(r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?"
                      r"([Zz]|[+-]\d{2}:\d{2})$")


def parse_rfc3339(value: str | None) -> datetime | None:
    """A Pub/Sub publishTime (RFC 3339, up to nanoseconds) as an aware datetime, or None."""
    if not value:
        return None
    m = _RFC3339.match(value.strip())
    if m is None:
        return None
    date, clock, fraction, zone = m.groups()
    text = f"{date}T{clock}"
    if fraction:
        text += "." + (fraction[:6]).ljust(6, "0")
    text += "+00:00" if zone in ("Z", "z") else zone
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def decode_base64(data: str) -> bytes:
    """Standard or URL-safe base64, padded or not. Raises BadPush."""
    text = data.strip()
    urlsafe = "-" in text or "_" in text
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        raise BadPush("message.data is not base64") from None


def _history_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        text = str(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        text = str(int(value))
    else:
        raise BadPush("historyId must be a non-negative integer or a string of digits")
    if len(text) > MAX_HISTORY_ID_DIGITS:
        raise BadPush("historyId is out of range")
    return text


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_push(raw: bytes) -> GmailPush:
    """The notification in a push body. Raises BadPush with a short reason."""
    try:
        body = loads(raw)  # cleaned: NUL and lone surrogates cost only themselves
    except ValueError:
        raise BadPush("body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("message"), dict):
        raise BadPush("body needs a message object")
    message = body["message"]
    message_id = message.get("messageId") or message.get("message_id")
    if not isinstance(message_id, str) or not message_id.strip():
        raise BadPush("message needs a messageId")
    data = message.get("data")
    if not isinstance(data, str) or not data.strip():
        raise BadPush("message needs data")
    try:
        notification = loads(decode_base64(data))
    except ValueError as exc:
        raise BadPush(str(exc) if isinstance(exc, BadPush) else "message.data is not JSON"
                      ) from None
    if not isinstance(notification, dict):
        raise BadPush("message.data is not a JSON object")
    email = notification.get("emailAddress")
    if not isinstance(email, str) or not clean_text(email).strip():
        raise BadPush("message.data needs an emailAddress string")
    history_id = _history_id(notification.get("historyId"))
    publish_time = _opt_str(message.get("publishTime")) or _opt_str(message.get("publish_time"))
    return GmailPush(message_id=message_id.strip(), email_address=clean_text(email).strip(),
                     history_id=history_id, publish_time=publish_time,
                     subscription=_opt_str(body.get("subscription")),
                     event_time=parse_rfc3339(publish_time))
