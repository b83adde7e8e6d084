"""OAuth 2.0 for the sandbox: the token endpoint, access tokens, and the push signing key.

Token endpoint (``POST /token``, what google-auth's ``Credentials.refresh`` calls:
``grant_type=refresh_token``, ``client_id``, ``client_secret``, ``refresh_token``, optional
``scope``, form-encoded; https://developers.google.com/identity/protocols/oauth2/web-server#
offline and RFC 6749 section 6):

* success: ``{"access_token", "expires_in", "scope", "token_type": "Bearer"}``; access tokens
  live ``access_token_ttl`` seconds (Google: 3599).  google-auth treats a token as expired 3
  min 45 s before ``expires_in`` runs out (``google.auth._helpers.REFRESH_THRESHOLD``), so a
  TTL under 225 s makes it refresh before *every* request; to exercise the 401 path, expire
  tokens server-side instead (:meth:`OAuth.expire_access_tokens`).
* a refresh token that was revoked, or never issued: 400 ``invalid_grant`` ("Token has been
  expired or revoked." / "Bad Request"; https://developers.google.com/identity/protocols/
  oauth2#expiration lists revocation, six months unused, password change, the 100-token limit).
  Revoking also kills the user's outstanding access tokens, as revoking a grant does.
* a wrong client: 401 ``invalid_client``; a wrong ``grant_type``: 400
  ``unsupported_grant_type``; a missing parameter: 400 ``invalid_request``; a ``scope`` wider
  than the grant: 400 ``invalid_scope``.

Push signing key: Pub/Sub signs push requests with a Google-owned RSA key, RS256 with a ``kid``
(https://cloud.google.com/pubsub/docs/authenticate-push-subscriptions).  The sandbox makes one
2048-bit key per process and publishes it the two ways Google does: x509 PEM certificates keyed
by kid at ``/oauth2/v1/certs`` (the format google-auth's ``jwt.decode`` and
``id_token.verify_token(certs_url=...)`` read without extra packages) and a JWK set at
``/oauth2/v3/certs`` (google-auth needs ``pyjwt`` for that one).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from ..nylas.generate import stable_hex
from .errors import Reply, dumps, invalid_credentials, oauth_error

READONLY = "https://www.googleapis.com/auth/gmail.readonly"
METADATA = "https://www.googleapis.com/auth/gmail.metadata"
MODIFY = "https://www.googleapis.com/auth/gmail.modify"
FULL = "https://mail.google.com/"
SCOPES = (READONLY, METADATA, MODIFY, FULL)


@dataclass
class Grant:
    email: str
    refresh_token: str
    scope: str = READONLY
    revoked: bool = False


@dataclass
class AccessToken:
    email: str
    expires: float
    scope: str


class OAuth:
    def __init__(self, seed: int, emails: list[str], *, client_id: str, client_secret: str,
                 access_token_ttl: int = 3599) -> None:
        self.seed = seed
        self.client_id, self.client_secret = client_id, client_secret
        self.ttl = access_token_ttl
        self._lock = threading.Lock()
        self.grants = {e: Grant(e, self._refresh_token(e, 0)) for e in emails}
        self._by_refresh = {g.refresh_token: e for e, g in self.grants.items()}
        self._tokens: dict[str, AccessToken] = {}
        self._issued: dict[str, int] = {e: 0 for e in emails}
        self.refreshes: dict[str, int] = {e: 0 for e in emails}

    def _refresh_token(self, email: str, generation: int) -> str:
        return f"1//0sandbox{stable_hex(self.seed, email, 'refresh', generation, n=40)}"

    # ---------------------------------------------------------------- token endpoint
    def token_endpoint(self, form: Mapping[str, str]) -> Reply:
        grant_type = form.get("grant_type")
        if not grant_type:
            return oauth_error(400, "invalid_request", "Missing required parameter: grant_type")
        if grant_type != "refresh_token":
            return oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        if form.get("client_id") != self.client_id:
            return oauth_error(401, "invalid_client", "The OAuth client was not found.")
        if form.get("client_secret") != self.client_secret:
            return oauth_error(401, "invalid_client", "Unauthorized")
        refresh = form.get("refresh_token")
        if not refresh:
            return oauth_error(400, "invalid_request",
                               "Missing required parameter: refresh_token")
        with self._lock:
            email = self._by_refresh.get(refresh)
            grant = self.grants.get(email) if email else None
            if grant is None:
                return oauth_error(400, "invalid_grant", "Bad Request")
            if grant.revoked or grant.refresh_token != refresh:
                return oauth_error(400, "invalid_grant", "Token has been expired or revoked.")
            wanted = set((form.get("scope") or "").split())
            if wanted - _implied(grant.scope):
                return oauth_error(400, "invalid_scope", "Bad Request")
            token = "ya29.a0" + secrets.token_urlsafe(96)
            self._tokens[token] = AccessToken(email or "", time.time() + self.ttl, grant.scope)
            self.refreshes[grant.email] += 1
        return Reply(200, dumps({"access_token": token, "expires_in": self.ttl,
                                 "scope": grant.scope, "token_type": "Bearer"}))

    # ---------------------------------------------------------------- API side
    def resolve(self, token: str) -> AccessToken:
        """The live access token, or ApiError 401 authError."""
        with self._lock:
            at = self._tokens.get(token)
            if at is None:
                raise invalid_credentials()
            grant = self.grants.get(at.email)
            if grant is None or grant.revoked or at.expires <= time.time():
                raise invalid_credentials()
            return at

    def mint_access_token(self, email: str) -> str:
        """An access token issued without a refresh round trip (tests, CLI)."""
        with self._lock:
            grant = self.grants[email]
            token = "ya29.a0" + secrets.token_urlsafe(96)
            self._tokens[token] = AccessToken(email, time.time() + self.ttl, grant.scope)
            return token

    # ---------------------------------------------------------------- knobs
    def revoke(self, email: str) -> None:
        with self._lock:
            self.grants[email].revoked = True
            for token in [t for t, at in self._tokens.items() if at.email == email]:
                del self._tokens[token]

    def reauthorize(self, email: str, scope: str | None = None) -> str:
        """The user consents again: a new refresh token (the old one stays revoked)."""
        with self._lock:
            self._issued[email] += 1
            grant = self.grants[email]
            new = Grant(email, self._refresh_token(email, self._issued[email]),
                        scope or grant.scope)
            self.grants[email] = new
            self._by_refresh[new.refresh_token] = email
            return new.refresh_token

    def expire_access_tokens(self, email: str | None = None) -> int:
        with self._lock:
            gone = [t for t, at in self._tokens.items() if email is None or at.email == email]
            for token in gone:
                del self._tokens[token]
            return len(gone)

    def set_scope(self, email: str, scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        with self._lock:
            self.grants[email].scope = scope
            for at in self._tokens.values():
                if at.email == email:
                    at.scope = scope

    def authorized_user(self, email: str, token_uri: str) -> dict[str, Any]:
        """The ``authorized_user`` JSON a user's consent yields.  Beware:
        ``Credentials.from_authorized_user_info`` ignores its ``token_uri`` (google-auth 2.x
        always sets Google's), so build ``Credentials(..., token_uri=...)`` from the fields."""
        grant = self.grants[email]
        return {"type": "authorized_user", "client_id": self.client_id,
                "client_secret": self.client_secret, "refresh_token": grant.refresh_token,
                "token_uri": token_uri, "scopes": [grant.scope], "account": email}


def _implied(scope: str) -> set[str]:
    """Scopes a grant covers when a refresh asks for a subset."""
    order = [METADATA, READONLY, MODIFY, FULL]
    if scope not in order:
        return {scope}
    return set(order[: order.index(scope) + 1])


# ---------------------------------------------------------------------- push signing key
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True)
class SigningKey:
    key: rsa.RSAPrivateKey
    kid: str
    cert_pem: str

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "RS256", "kid": self.kid, "typ": "JWT"}
        signing = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                   + _b64(json.dumps(dict(claims), separators=(",", ":")).encode()))
        sig = self.key.sign(signing.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing + "." + _b64(sig)

    def x509_certs(self) -> dict[str, str]:
        return {self.kid: self.cert_pem}

    def jwks(self) -> dict[str, Any]:
        pub = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                          "n": _uint(pub.n), "e": _uint(pub.e)}]}


@lru_cache(maxsize=1)
def signing_key() -> SigningKey:
    """One RSA key and self-signed certificate per process (generation takes ~0.1 s)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    kid = hashlib.sha1(der).hexdigest()  # noqa: S324 - a key id, as Google's are 40 hex
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nova-sandbox-pubsub-push")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return SigningKey(key, kid, pem)
