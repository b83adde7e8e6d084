"""Per-inbox OAuth credentials (Gmail): read, encrypted at rest, turned into access tokens.

An inbox's credentials are Google's ``authorized_user`` info: the OAuth client (id and secret)
and the user's refresh token, as ``gcloud auth application-default login`` or
google-auth-oauthlib write them. ``nova inbox add --provider gmail --credentials FILE`` reads
the file (:func:`load_authorized_user`) and stores it in ``flux_inbox_credentials``
(:func:`save_credentials`); workers get access tokens from a :class:`TokenSource`.

At rest: ``secret`` is a Fernet token (AES-128-CBC + HMAC-SHA256, ``cryptography``) of
``{"client_id", "token_uri", "client_secret", "refresh_token"}``; only ``scopes`` is a plain
column. A dump of the database alone gives none of them away, and what is sealed cannot be
altered without the key (the token is authenticated). Rows saved before migrations/0009 hold
``client_id`` and ``token_uri`` in plain columns and a token of the two secrets only: they are
read as they are, and sealed whole the next time they are saved (``nova inbox add`` again, or
a rotated refresh token). The key is NOVA_CREDENTIALS_KEY (:func:`cipher`), either

* a Fernet key (url-safe base64 of 32 bytes, 44 characters), used as it is; make one with
  ``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``
* or a passphrase of at least 16 characters, from which the key is derived with HKDF-SHA256
  (RFC 5869), salt ``b"nova-credentials-key-v1"``, info ``b"nova flux_inbox_credentials
  secret"``, 32 bytes. HKDF does not stretch a weak passphrase: give it a random one. The salt
  and info never change; stored secrets depend on them.

Access tokens (:class:`TokenSource`): the refresh-token grant of RFC 6749 section 6, as Google
documents it (https://developers.google.com/identity/protocols/oauth2/web-server#offline):
``POST`` to the token endpoint with the form ``grant_type=refresh_token, client_id,
client_secret, refresh_token``, answered with ``{"access_token", "expires_in", ...}``. Tokens,
refresh tokens and client secrets are never logged; log lines name the grant and the outcome
only.

The token endpoint is GMAIL_TOKEN_URI (Google's unless set), never one that credentials name:
whoever could write a ``token_uri`` into a credentials file or a row would otherwise receive the
client secret and the refresh token with the next refresh. Credentials naming another endpoint
are refused where they enter (:func:`authorized_user_from_info` given the setting, as ``nova
inbox add`` does) and where they are read (:class:`TokenSource`), with an error that names
GMAIL_TOKEN_URI. Google's older endpoints (:data:`GOOGLE_TOKEN_URIS`), still written by older
tools, count as Google's.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nova.config import Settings
from nova.providers.errors import AuthExpired, Permanent, ProviderError, Transient

log = logging.getLogger("nova.credentials")

GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# Google's token endpoint by the names older tools (oauth2client, old client_secret.json
# downloads) still write into credentials files: one service, the same as GOOGLE_TOKEN_URI.
GOOGLE_TOKEN_URIS = frozenset({GOOGLE_TOKEN_URI, "https://accounts.google.com/o/oauth2/token",
                               "https://www.googleapis.com/oauth2/v4/token"})
KIND = "authorized_user"
MIN_PASSPHRASE = 16
HKDF_SALT = b"nova-credentials-key-v1"
HKDF_INFO = b"nova flux_inbox_credentials secret"
MAKE_KEY = ('python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"')
# What Google answers when expires_in is left out (RFC 6749 leaves it optional).
DEFAULT_EXPIRES_IN = 3599
_FERNET_KEY = re.compile(r"^[A-Za-z0-9_-]{43}=$")


class CredentialsError(ValueError):
    """Credentials that cannot be used: a bad file, a missing or wrong key."""


@dataclass(frozen=True)
class AuthorizedUser:
    """Google ``authorized_user`` credentials. The secrets stay out of ``repr``."""

    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_uri: str = GOOGLE_TOKEN_URI
    scopes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the file
def load_authorized_user(path: str | PathLike[str], *, account: str | None = None,
                         token_uri: str | None = None) -> AuthorizedUser:
    """The ``authorized_user`` JSON file at ``path``. With ``account`` given, a file that
    names another account (its ``account`` key, when present and not empty) is refused; with
    ``token_uri`` (GMAIL_TOKEN_URI) given, one that names another token endpoint is (see
    :func:`authorized_user_from_info`)."""
    name = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {name}: "
                               f"{exc.strerror or exc}") from None
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"credentials file {name} is not JSON: {exc}") from None
    if not isinstance(info, dict):
        raise CredentialsError(f"credentials file {name}: expected a JSON object, "
                               f"got {type(info).__name__}")
    user = authorized_user_from_info(info, source=f"credentials file {name}",
                                     token_uri=token_uri)
    named = info.get("account")
    if account and isinstance(named, str) and named.strip() \
            and named.strip().lower() != account.strip().lower():
        raise CredentialsError(f"credentials file {name} is for {named.strip()}, "
                               f"not {account.strip()}")
    return user


def authorized_user_from_info(info: Mapping[str, Any], *, source: str = "credentials",
                              token_uri: str | None = None) -> AuthorizedUser:
    """``authorized_user`` info (the parsed file) checked key by key. With ``token_uri``
    (GMAIL_TOKEN_URI) given, the info's own ``token_uri`` must be that endpoint (or absent:
    gcloud writes none) and the credentials carry ``token_uri``; CredentialsError otherwise."""
    kind = info.get("type")
    if kind is not None and kind != KIND:
        if kind == "service_account":
            raise CredentialsError(
                f"{source}: type is 'service_account'; service accounts are not supported, "
                f"give the user's own authorized_user credentials (OAuth client and refresh "
                f"token)")
        raise CredentialsError(f"{source}: type is {kind!r}, expected {KIND!r}")

    def text(key: str) -> str:
        value = info.get(key)
        if value is None:
            raise CredentialsError(f"{source}: missing key {key!r}")
        if not isinstance(value, str) or not value.strip():
            raise CredentialsError(f"{source}: key {key!r} must be a non-empty string")
        return value.strip()

    client_id, client_secret, refresh_token = (
        text("client_id"), text("client_secret"), text("refresh_token"))
    named = info.get("token_uri")
    if named is None or named == "":
        named = token_uri or GOOGLE_TOKEN_URI
    if not isinstance(named, str):
        raise CredentialsError(f"{source}: key 'token_uri' must be a string")
    parts = urlsplit(named.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CredentialsError(f"{source}: key 'token_uri' must be an http(s) URL, "
                               f"got {named!r}")
    named = named.strip() if token_uri is None else allowed_token_uri(named, token_uri,
                                                                      source=source)
    scopes = info.get("scopes")
    if scopes is None:
        scopes = ()
    elif isinstance(scopes, str):  # google-auth accepts a space-separated string too
        scopes = tuple(scopes.split())
    elif isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
        scopes = tuple(s.strip() for s in scopes if s.strip())
    else:
        raise CredentialsError(f"{source}: key 'scopes' must be a list of strings")
    return AuthorizedUser(client_id, client_secret, refresh_token, named, scopes)


def allowed_token_uri(named: str, configured: str, *, source: str) -> str:
    """The endpoint to post ``source``'s refresh token to: ``configured`` (GMAIL_TOKEN_URI),
    when ``named`` (what the credentials say) is that endpoint, or both are Google's.
    CredentialsError naming GMAIL_TOKEN_URI otherwise: a refresh token goes nowhere else."""
    ours, theirs = configured.strip().rstrip("/"), named.strip().rstrip("/")
    if theirs == ours or (theirs in GOOGLE_TOKEN_URIS and ours in GOOGLE_TOKEN_URIS):
        return ours
    raise CredentialsError(
        f"{source}: token_uri {named.strip()!r} is not GMAIL_TOKEN_URI ({ours}); refresh "
        f"tokens are posted to GMAIL_TOKEN_URI only: set it to that endpoint if it is yours, "
        f"or use credentials issued for {ours}")


# --------------------------------------------------------------------------- encryption
def cipher(settings: Settings) -> Fernet:
    """The Fernet of NOVA_CREDENTIALS_KEY (a Fernet key, or a passphrase: module docstring)."""
    secret = settings.credentials_key
    value = secret.get_secret_value().strip() if secret is not None else ""
    if not value:
        raise CredentialsError(f"NOVA_CREDENTIALS_KEY is not set; make a key with {MAKE_KEY}")
    if _FERNET_KEY.match(value):
        return Fernet(value.encode("ascii"))
    if len(value) < MIN_PASSPHRASE:
        raise CredentialsError(
            f"NOVA_CREDENTIALS_KEY is too short: give a Fernet key (make one with {MAKE_KEY}) "
            f"or a passphrase of at least {MIN_PASSPHRASE} characters")
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT,
                   info=HKDF_INFO).derive(value.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(derived))


def seal(user: AuthorizedUser, fernet: Fernet) -> bytes:
    """The ``secret`` column: a Fernet token of the OAuth client (id and secret), the token
    endpoint and the refresh token."""
    return fernet.encrypt(json.dumps({
        "client_id": user.client_id, "token_uri": user.token_uri,
        "client_secret": user.client_secret, "refresh_token": user.refresh_token,
    }).encode("utf-8"))


def unsealed(secret: bytes, fernet: Fernet, *, owner: str) -> dict[str, str]:
    """Everything a ``secret`` column holds, by key: ``client_secret`` and ``refresh_token``
    always, ``client_id`` and ``token_uri`` unless the row predates migrations/0009. ``owner``
    names the inbox in the error of a wrong key."""
    try:
        data = json.loads(fernet.decrypt(bytes(secret)))
        sealed = {key: data[key] for key in SEALED if key in data}
        if not all(isinstance(v, str) and v for v in sealed.values()) \
                or not {"client_secret", "refresh_token"} <= sealed.keys():
            raise ValueError("incomplete")
        return sealed
    except InvalidToken:
        raise CredentialsError(
            f"NOVA_CREDENTIALS_KEY does not decrypt the stored credentials of {owner}: the key "
            f"is not the one they were saved with (or the row was altered); set that key, or "
            f"add the inbox again (nova inbox add --provider gmail)") from None
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"the stored credentials of {owner} are not readable; "
                               f"add the inbox again (nova inbox add --provider gmail)") from None


def unseal(secret: bytes, fernet: Fernet, *, owner: str) -> tuple[str, str]:
    """(client_secret, refresh_token) from a ``secret`` column (see :func:`unsealed`)."""
    data = unsealed(secret, fernet, owner=owner)
    return data["client_secret"], data["refresh_token"]


# --------------------------------------------------------------------------- the table
# What a ``secret`` column may hold; client_id and token_uri are in it from migrations/0009 on.
SEALED = ("client_id", "token_uri", "client_secret", "refresh_token")
# Saving seals the whole credentials and empties the plain columns a row from before
# migrations/0009 still has.
SAVE = """
INSERT INTO flux_inbox_credentials (inbox_id, kind, client_id, token_uri, scopes, secret)
VALUES ($1, 'authorized_user', NULL, NULL, $2, $3)
ON CONFLICT (inbox_id) DO UPDATE
SET kind = EXCLUDED.kind, client_id = NULL, token_uri = NULL, scopes = EXCLUDED.scopes,
    secret = EXCLUDED.secret, updated_at = now()
"""
# client_id and token_uri: a row from before migrations/0009 (NULL once sealed whole).
LOAD = """
SELECT i.id AS inbox_id, i.email, c.client_id, c.token_uri, c.scopes, c.secret
FROM flux_inbox_credentials c
JOIN flux_inboxes i ON i.id = c.inbox_id
WHERE i.grant_id = $1 AND i.provider = 'gmail' AND i.deleted_at IS NULL
"""
# A refresh answer carried a new refresh token: it replaces the one that was used, unless the
# row changed meanwhile (new credentials added: they win).
ROTATE = """
UPDATE flux_inbox_credentials SET secret = $2, client_id = NULL, token_uri = NULL,
    updated_at = now()
WHERE inbox_id = $1 AND secret = $3
"""


async def save_credentials(conn: Any, inbox_id: Any, user: AuthorizedUser,
                           fernet: Fernet) -> None:
    """Store (or replace) the inbox's credentials; ``conn`` is an asyncpg connection (or
    pool), so the write can join the caller's transaction."""
    await conn.execute(SAVE, inbox_id, list(user.scopes), seal(user, fernet))


@dataclass(frozen=True)
class _Stored:
    inbox_id: Any
    email: str
    user: AuthorizedUser
    secret: bytes


async def _load(conn: Any, grant_id: str, fernet: Fernet,
                token_uri: str | None = None) -> _Stored | None:
    row = await conn.fetchrow(LOAD, grant_id)
    if row is None:
        return None
    owner = row["email"]
    sealed = unsealed(row["secret"], fernet, owner=owner)
    client_id = sealed.get("client_id") or row["client_id"]
    named = sealed.get("token_uri") or row["token_uri"]
    if not client_id or not named:
        raise CredentialsError(f"the stored credentials of {owner} are not readable; "
                               f"add the inbox again (nova inbox add --provider gmail)")
    if token_uri is not None:
        named = allowed_token_uri(named, token_uri, source=f"the stored credentials of {owner}")
    user = AuthorizedUser(client_id, sealed["client_secret"], sealed["refresh_token"], named,
                          tuple(row["scopes"] or ()))
    return _Stored(row["inbox_id"], owner, user, bytes(row["secret"]))


async def load_credentials(conn_or_pool: Any, grant_id: str, fernet: Fernet, *,
                           token_uri: str | None = None) -> AuthorizedUser | None:
    """The credentials of the live Gmail inbox whose grant is ``grant_id``; None without.
    With ``token_uri`` (GMAIL_TOKEN_URI), credentials naming another endpoint raise
    CredentialsError."""
    stored = await _load(conn_or_pool, grant_id, fernet, token_uri)
    return stored.user if stored is not None else None


# --------------------------------------------------------------------------- access tokens
@dataclass
class _Grant:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    token: str | None = None
    expires: float = 0.0  # time.monotonic() from which the token is no longer handed out
    finished: int = 0  # refreshes ended (done, failed or cancelled)
    outcome: str | Exception | None = None  # of the last refresh, for those who waited on it


class TokenSource:
    """Access tokens per grant: cached until ``expires_in - early_seconds``, then refreshed
    with the stored refresh token. One refresh at a time per grant; callers that waited on it
    share its outcome (the token, or the error).

    Refreshes are posted to ``token_uri`` (GMAIL_TOKEN_URI) alone, whatever the stored
    credentials name (module docstring).

    Errors: AuthExpired when the refresh token (``invalid_grant``) or the OAuth client
    (``invalid_client``, ``unauthorized_client``) is refused, or no credentials are stored;
    Transient for 408, 429, 5xx, network errors and a malformed answer; Permanent for any
    other refusal; CredentialsError when NOVA_CREDENTIALS_KEY does not open the stored ones,
    or they name another token endpoint than ``token_uri`` (a setting to fix, or credentials
    to add again: not the grant's fault, so the inbox is left as it is).
    """

    def __init__(self, pool: Any, fernet: Fernet, client: httpx.AsyncClient, *,
                 token_uri: str, early_seconds: float = 60) -> None:
        self.pool = pool
        self.fernet = fernet
        self.client = client
        self.token_uri = token_uri.strip().rstrip("/")
        self.early_seconds = early_seconds
        self._grants: dict[str, _Grant] = {}

    async def token(self, grant_id: str) -> str:
        state = self._grants.setdefault(grant_id, _Grant())
        if state.token is not None and time.monotonic() < state.expires:
            return state.token
        seen = state.finished
        async with state.lock:
            if state.finished != seen and state.outcome is not None:
                if isinstance(state.outcome, Exception):  # the refresh we waited on failed
                    raise _again(state.outcome)
                return state.outcome
            if state.token is not None and time.monotonic() < state.expires:
                return state.token
            state.outcome = None  # stays None when cancelled: those waiting refresh then
            try:
                token, expires_in = await self._refresh(grant_id)
                state.token, state.outcome = token, token
                state.expires = time.monotonic() + expires_in - self.early_seconds
                return token
            except Exception as exc:
                state.outcome = exc
                raise
            finally:
                state.finished += 1

    def invalidate(self, grant_id: str, token: str | None = None) -> None:
        """Forget the cached token (the API answered 401 to it), unless it was replaced."""
        state = self._grants.get(grant_id)
        if state is not None and (token is None or state.token == token):
            state.token, state.expires = None, 0.0

    async def _refresh(self, grant_id: str) -> tuple[str, float]:
        try:
            stored = await _load(self.pool, grant_id, self.fernet, self.token_uri)
        except CredentialsError:
            log.warning("[Credentials] refresh grant=%s outcome=credentials_refused", grant_id)
            raise
        if stored is None:
            log.warning("[Credentials] refresh grant=%s outcome=no_credentials", grant_id)
            raise AuthExpired(f"no credentials stored for {grant_id}", provider="gmail")
        user = stored.user
        form = {"grant_type": "refresh_token", "client_id": user.client_id,
                "client_secret": user.client_secret, "refresh_token": user.refresh_token}
        try:
            resp = await self.client.post(self.token_uri, data=form,
                                          headers={"Accept": "application/json"})
        except httpx.RequestError as exc:
            log.warning("[Credentials] refresh grant=%s outcome=network_error error=%s",
                        grant_id, type(exc).__name__)
            raise Transient(f"token endpoint of {grant_id} did not answer: "
                            f"{type(exc).__name__}", provider="gmail") from None
        if resp.status_code == 200:
            token, expires_in, rotated = _success(resp.content, grant_id)
            if rotated and rotated != user.refresh_token:
                await self._rotate(grant_id, stored, rotated)
            log.info("[Credentials] refresh grant=%s outcome=ok expires_in=%s", grant_id,
                     int(expires_in))
            return token, expires_in
        raise _refusal(resp, grant_id, user)

    async def _rotate(self, grant_id: str, stored: _Stored, refresh_token: str) -> None:
        secret = seal(replace(stored.user, refresh_token=refresh_token), self.fernet)
        done = await self.pool.execute(ROTATE, stored.inbox_id, secret, stored.secret)
        log.info("[Credentials] new refresh token grant=%s outcome=%s", grant_id,
                 "saved" if str(done).endswith(" 1") else "kept_newer_credentials")


def _again(exc: Exception) -> Exception:
    """The error of a refresh for another caller that waited on it (its own traceback)."""
    try:
        return copy.copy(exc)
    except Exception:  # an exception type that does not copy: the same object
        return exc


def _success(body: bytes, grant_id: str) -> tuple[str, float, str | None]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    token = data.get("access_token") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(token, str) or not token:
        log.warning("[Credentials] refresh grant=%s outcome=malformed_answer", grant_id)
        raise Transient(f"token endpoint of {grant_id} answered 200 without an access token",
                        status=200, provider="gmail")
    expires_in = data.get("expires_in", DEFAULT_EXPIRES_IN)
    try:
        seconds = float(expires_in)
    except (TypeError, ValueError):
        seconds = float(DEFAULT_EXPIRES_IN)
    rotated = data.get("refresh_token")
    return token, max(seconds, 0.0), rotated if isinstance(rotated, str) and rotated else None


def _refusal(resp: httpx.Response, grant_id: str, user: AuthorizedUser) -> ProviderError:
    status = resp.status_code
    try:
        data = json.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, str) else None
    described = data.get("error_description") if isinstance(data, dict) else None
    detail = error + (f": {described}" if isinstance(described, str) and described else "") \
        if error else f"HTTP {status}"
    log.warning("[Credentials] refresh grant=%s outcome=refused status=%s error=%s", grant_id,
                status, error or "-")
    if status in (408, 429) or status >= 500:
        return Transient(f"token endpoint answered {detail} for {grant_id}", status=status,
                         error_type=error, provider="gmail")
    if status in (400, 401) and error == "invalid_grant":
        return AuthExpired(f"the refresh token of {grant_id} was refused ({detail}): revoked "
                           f"or expired; add the inbox again with new credentials (nova inbox "
                           f"add --provider gmail)", status=status, error_type=error,
                           provider="gmail")
    if status in (400, 401) and error in ("invalid_client", "unauthorized_client"):
        return AuthExpired(f"the OAuth client {user.client_id} was refused for {grant_id} "
                           f"({detail}): deleted, its secret changed, or not allowed this "
                           f"grant; add the inbox again with the client's current credentials",
                           status=status, error_type=error, provider="gmail")
    return Permanent(f"token endpoint refused the refresh of {grant_id} ({detail})",
                     status=status, error_type=error, provider="gmail")
