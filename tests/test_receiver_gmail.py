"""POST /webhooks/gmail over real HTTP: the Gmail sandbox pushes notifications through its
Pub/Sub look-alike (OIDC JWTs signed by its key, certificates at sb.certs_url, or ?token=) to
the receiver, which must store each one once and refuse whatever is not authenticated."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from psycopg import sql
from servers import ServerThread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nova import db as db_module
from nova.config import ConfigError, load_settings
from nova.gmail_push import (
    CertsUnavailable,
    GoogleCerts,
    OidcVerifier,
    cache_seconds,
    check_push_settings,
    parse_rfc3339,
)
from nova.receiver import create_app
from nova.sandbox.gmail import SandboxGmail
from nova.sandbox.gmail.auth import signing_key

AUDIENCE = "https://nova.example/webhooks/gmail"
ACCOUNT = "gmail-push@nova-test.iam.gserviceaccount.com"
TOPIC = "projects/nova-sandbox/topics/gmail"
USER = "alice.push@example.com"
OIDC = {"gmail_push_audience": AUDIENCE, "gmail_push_service_account": ACCOUNT}
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers
def settings(**kw: Any) -> Any:
    values: dict[str, Any] = {"nylas_webhook_secret": "unused-nylas-secret",
                              "gmail_push_audience": None, "gmail_push_service_account": None,
                              "gmail_push_token": None, "receiver_max_body_bytes": 64 * 1024}
    return load_settings(**{**values, **kw})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def forge(key: rsa.RSAPrivateKey, kid: str, claims: dict[str, Any]) -> str:
    """A JWT signed by a key of our own: RS256 over header.payload."""
    header = b64url(json.dumps({"alg": "RS256", "kid": kid, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{b64url(sig)}"


def claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"aud": AUDIENCE, "azp": "1234", "sub": "1234", "email": ACCOUNT,
            "email_verified": True, "iat": now, "exp": now + 3600,
            "iss": "https://accounts.google.com", **kw}


def google_jwt(**kw: Any) -> str:
    """A JWT signed by the sandbox's key, the one its certificates URL publishes."""
    return signing_key().sign(claims(**kw))


def envelope(data: dict[str, Any] | bytes | str, **message: Any) -> dict[str, Any]:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode("ascii")
    mid = str(uuid.uuid4().int)[:17]
    return {"message": {"data": encoded, "messageId": mid, "message_id": mid,
                        "publishTime": "2026-03-01T10:20:30.123456789Z", "attributes": {},
                        **message},
            "subscription": "projects/nova-test/subscriptions/gmail-push"}


def post(url: str, body: dict[str, Any] | bytes, *, token: str | None = None,
         params: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{url}/webhooks/gmail", content=content, headers=headers,
                      params=params, timeout=10)


def rows(db_url: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(db_url, row_factory=dict_row) as c:
        return c.execute(
            "SELECT webhook_id, provider, notification_type, grant_id, inbox_id, payload,"
            " event_time, status FROM flux_webhook_notifications ORDER BY received_at"
        ).fetchall()


def queued(db_url: str) -> int:
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications").fetchone()
        return int(row[0]) if row else -1


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def db(_admin: psycopg.Connection[Any], template_db: str, pg_server: str) -> Iterator[str]:
    """One migrated database for the module (cloning one per test costs more than the tests);
    every test starts from empty notification and inbox tables and an empty queue."""
    name = f"nova_test_gmail_{uuid.uuid4().hex[:12]}"
    _admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template_db)))
    try:
        yield db_module.url_with_database(pg_server, name)
    finally:
        _admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def db_url(db: str) -> str:
    with psycopg.connect(db, autocommit=True) as c:
        c.execute("TRUNCATE flux_webhook_notifications, flux_inboxes CASCADE")
        c.execute("SELECT pgmq.purge_queue('nylas_webhook_notifications')")
    return db


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxGmail]:
    # No retries: a refused delivery shows in the push log at once, as its only attempt.
    with SandboxGmail(threads=3, users=[USER], seed=5, push_min_interval=0.0,
                      push_retry_delays=()) as sb:
        with httpx.Client(base_url=f"{sb.base_url}/gmail/v1/users/me", headers={
                "Authorization": f"Bearer {sb.access_token(USER)}"}) as api:
            assert api.post("/watch", json={"topicName": TOPIC}).status_code == 200
        yield sb


def receiver(db_url: str, sb: SandboxGmail | None = None, **kw: Any) -> ServerThread:
    if sb is not None:
        kw.setdefault("gmail_push_certs_url", sb.certs_url)
    return ServerThread(create_app(settings(**kw), database_url=db_url))


@pytest.fixture(scope="module")
def oidc(db: str, sandbox: SandboxGmail) -> Iterator[str]:
    """A receiver expecting Pub/Sub's OIDC JWTs for AUDIENCE from ACCOUNT."""
    with receiver(db, sandbox, **OIDC) as server:
        yield server.url


def push(sb: SandboxGmail, url: str, **config: Any) -> dict[str, Any]:
    """Point the sandbox at the receiver, change the mailbox, return the delivery attempt."""
    settings = {"endpoint": f"{url}/webhooks/gmail", "auth": "oidc", "token": "",
                "audience": AUDIENCE, "service_account": ACCOUNT, "number_share": 0.5,
                **config}
    sb.set_push(**settings)
    before = len(sb.push_log)
    sb.add_message(USER, subject="pushed")
    sb.wait_push(10)
    log = sb.push_log[before:]
    assert len(log) == 1, log
    return log[0]


# ---------------------------------------------------------------- accepted
def test_google_signed_push_is_stored_once_with_its_fields(sandbox: SandboxGmail, oidc: str,
                                                           db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        inbox = c.execute("INSERT INTO flux_inboxes (provider, grant_id, email) VALUES"
                          " ('gmail', %s, %s) RETURNING id", (USER, USER)).fetchone()
        c.execute("INSERT INTO flux_inboxes (provider, grant_id, email) VALUES"
                  " ('nylas', %s, %s)", (USER, USER))
    assert inbox is not None
    attempt = push(sandbox, oidc, number_share=1.0)  # historyId as a JSON number
    assert attempt["status"] == 200 and attempt["outcome"] == "delivered"
    note = sandbox.push.published[-1]
    assert note.data["historyId"] == note.history_id  # a number on the wire
    (row,) = rows(db_url)
    assert row["webhook_id"] == f"gmail:{note.message_id}"
    assert (row["provider"], row["notification_type"], row["status"]) == \
        ("gmail", "gmail.history", "pending")
    assert row["grant_id"] == USER and row["inbox_id"] == inbox[0]
    assert row["payload"] == {"emailAddress": USER, "historyId": str(note.history_id),
                              "messageId": note.message_id, "publishTime": note.publish_time,
                              "subscription": "projects/nova-sandbox/subscriptions/gmail-push"}
    assert row["event_time"] == datetime.fromisoformat(note.publish_time.replace("Z", "+00:00"))
    assert queued(db_url) == 1

    # Pub/Sub redelivers a message it thinks unacknowledged with the same messageId.
    again = post(oidc, sandbox.push.envelope(note), token=sandbox.push.jwt(AUDIENCE))
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(rows(db_url)) == 1 and queued(db_url) == 1

    second = push(sandbox, oidc, number_share=0.0)  # a new message: a new row
    assert second["status"] == 200 and sandbox.push.published[-1].data["historyId"] == \
        str(sandbox.push.published[-1].history_id)
    assert [r["payload"]["historyId"] for r in rows(db_url)] == \
        [str(n.history_id) for n in sandbox.push.published[-2:]]
    assert queued(db_url) == 2


def test_nul_in_the_address_is_cleaned_and_the_grant_lowercased(oidc: str,
                                                                db_url: str) -> None:
    data = {"emailAddress": "Bo\u0000b@Example.COM", "historyId": "0042", "x": "???"}
    # URL-safe base64 without padding is read as well as the standard alphabet
    urlsafe = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    assert "_" in urlsafe and len(urlsafe) % 4
    ok = post(oidc, envelope(urlsafe), token=google_jwt())
    assert ok.status_code == 200, ok.text
    (row,) = rows(db_url)
    assert row["payload"]["emailAddress"] == "Bob@Example.COM"
    assert row["grant_id"] == "bob@example.com" and row["payload"]["historyId"] == "42"
    assert row["inbox_id"] is None
    # nanoseconds in publishTime are cut to microseconds, not refused
    assert row["event_time"] == parse_rfc3339("2026-03-01T10:20:30.123456Z")


def test_token_mode_stores_the_right_token_only(sandbox: SandboxGmail, db_url: str) -> None:
    with receiver(db_url, sandbox, gmail_push_token="s3cret-push-token-value") as server:
        ok = push(sandbox, server.url, auth="token", token="s3cret-push-token-value")
        assert ok["status"] == 200 and len(rows(db_url)) == 1
        wrong = push(sandbox, server.url, auth="token", token="s3cret-push-token-valuE")
        assert wrong["status"] == 401
        missing = post(server.url, envelope({"emailAddress": USER, "historyId": 7}))
        assert missing.status_code == 401
        # a Google JWT does not replace the token when only the token is configured
        assert post(server.url, envelope({"emailAddress": USER, "historyId": 7}),
                    token=google_jwt()).status_code == 401
    assert len(rows(db_url)) == 1 and queued(db_url) == 1


def test_an_audience_without_a_service_account_is_refused_at_start() -> None:
    """Google signs a token for any project's subscription with whatever audience it names:
    without GMAIL_PUSH_SERVICE_ACCOUNT a stranger's pushes would pass, so no receiver starts."""
    with pytest.raises(ConfigError) as err:
        create_app(settings(gmail_push_audience=AUDIENCE),
                   database_url="postgresql://x@127.0.0.1:1/x")
    message = str(err.value)
    assert "GMAIL_PUSH_AUDIENCE is set but GMAIL_PUSH_SERVICE_ACCOUNT is not" in message
    assert "\n" not in message
    with pytest.raises(ConfigError):  # a token besides does not change it
        check_push_settings(settings(gmail_push_audience=AUDIENCE,
                                     gmail_push_token="a-token-long-enough-to-use"))
    check_push_settings(settings(**OIDC))  # both: fine
    check_push_settings(settings(gmail_push_token="a-token-long-enough-to-use"))  # no OIDC
    with pytest.raises(ValueError, match="service account"):  # nor can one be built by hand
        OidcVerifier(GoogleCerts("http://127.0.0.1:1/certs"), AUDIENCE, "")


@pytest.mark.parametrize("module", ["nova.receiver", "nova"])
def test_a_process_with_an_audience_and_no_service_account_exits_2_with_one_line(
        module: str, db: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "GMAIL_", "DATABASE_URL"))}
    env.update({"NOVA_DATABASE_URL": db, "GMAIL_PUSH_AUDIENCE": AUDIENCE,
                "NYLAS_API_KEY": "k", "NYLAS_API_URI": "http://127.0.0.1:9",
                "NYLAS_WEBHOOK_SECRET": "a-nylas-secret-long-enough",
                "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": "0",
                "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas"), "PYTHONPATH": str(ROOT)})
    run = subprocess.run([sys.executable, "-m", module], env=env, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode == 2, (run.stdout, run.stderr)
    refused = [line for line in (run.stdout + run.stderr).splitlines()
               if "ERROR" in line or "Traceback" in line]
    assert len(refused) == 1, refused
    assert "GMAIL_PUSH_AUDIENCE is set but GMAIL_PUSH_SERVICE_ACCOUNT is not" in refused[0]


# ---------------------------------------------------------------- refused
def test_jwt_signed_by_another_key_is_401(oidc: str, db_url: str,
                                          other_key: rsa.RSAPrivateKey) -> None:
    note = envelope({"emailAddress": USER, "historyId": 5})
    for kid in (signing_key().kid, "f" * 40):  # the sandbox's key id, and one it never had
        r = post(oidc, note, token=forge(other_key, kid, claims()))
        assert r.status_code == 401, kid
    assert rows(db_url) == [] and queued(db_url) == 0
    # the same claims under the sandbox's key pass: only the signature was wrong
    assert post(oidc, note, token=google_jwt()).status_code == 200
    assert len(rows(db_url)) == 1


def test_wrong_audience_is_403(sandbox: SandboxGmail, oidc: str, db_url: str) -> None:
    attempt = push(sandbox, oidc, audience="https://someone.else/push")
    assert attempt["status"] == 403 and rows(db_url) == []


def test_wrong_service_account_or_unverified_email_is_403(sandbox: SandboxGmail, oidc: str,
                                                          db_url: str) -> None:
    attempt = push(sandbox, oidc, service_account="intruder@evil.iam.gserviceaccount.com")
    assert attempt["status"] == 403
    unverified = post(oidc, envelope({"emailAddress": USER, "historyId": 5}),
                      token=google_jwt(email_verified=False))
    assert unverified.status_code == 403
    assert rows(db_url) == []


def test_invalid_credentials_are_401(oidc: str, db_url: str) -> None:
    now = int(time.time())
    unsigned = (b64url(b'{"alg":"none","kid":"x"}') + "." + b64url(json.dumps(claims()).encode())
                + ".")
    valid = google_jwt()
    cases = {
        "expired": f"Bearer {google_jwt(iat=now - 7200, exp=now - 3600)}",
        "not yet valid": f"Bearer {google_jwt(iat=now + 3600, exp=now + 7200)}",
        "other issuer": f"Bearer {google_jwt(iss='https://evil.example')}",
        "no exp": "Bearer " + signing_key().sign({k: v for k, v in claims().items()
                                                  if k != "exp"}),
        "tampered": "Bearer " + valid.split(".")[0] + "." + b64url(json.dumps(
            claims(email="x@y.z")).encode()) + "." + valid.split(".")[2],
        "alg none": f"Bearer {unsigned}",
        "garbage": "Bearer a.b.c",
        "basic": "Basic " + base64.b64encode(b"user:pass").decode(),
        "empty bearer": "Bearer",
        "missing": None,
    }
    for name, authorization in cases.items():
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        r = httpx.post(f"{oidc}/webhooks/gmail", headers=headers, timeout=10,
                       content=json.dumps(envelope({"emailAddress": USER, "historyId": 5})))
        assert r.status_code == 401, name
    assert rows(db_url) == [] and queued(db_url) == 0


def test_missing_authorization_from_the_sandbox_is_401(sandbox: SandboxGmail, oidc: str,
                                                       db_url: str) -> None:
    attempt = push(sandbox, oidc, auth="none")
    assert attempt["status"] == 401 and rows(db_url) == []


def test_unconfigured_endpoint_refuses_everything_and_says_so_once(
        sandbox: SandboxGmail, db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nova.receiver")
    with receiver(db_url, sandbox, gmail_push_token="") as server:
        assert push(sandbox, server.url)["status"] == 401
        assert push(sandbox, server.url, auth="token", token="")["status"] == 401
        assert post(server.url, envelope({"emailAddress": USER, "historyId": 5}),
                    params={"token": ""}).status_code == 401
    assert rows(db_url) == []
    said = [r for r in caplog.records if "not configured" in r.getMessage()
            and "refuses every delivery" in r.getMessage()]
    assert len(said) == 1


def test_refusals_never_log_the_token(sandbox: SandboxGmail, oidc: str, db_url: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nova")
    secret_jwt = google_jwt(aud="https://someone.else/")
    with receiver(db_url, sandbox, gmail_push_token="sekrit-value-long-1") as token_server:
        assert post(token_server.url, envelope({"emailAddress": USER, "historyId": 5}),
                    params={"token": "sekrit-value-long-2"}).status_code == 401
    assert post(oidc, envelope({"emailAddress": USER, "historyId": 5}),
                token=secret_jwt).status_code == 403
    assert post(oidc, envelope({"emailAddress": USER, "historyId": 5}),
                token=secret_jwt[:-8]).status_code == 401
    assert post(oidc, envelope({"emailAddress": USER, "historyId": 5}),
                token="x" + secret_jwt).status_code == 401  # google-auth would quote this one
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("nova"))
    assert text.count("rejected a Gmail push") == 4
    for secret in ("sekrit-value", *(part[:16] for part in secret_jwt.split("."))):
        assert secret not in text


MALFORMED: dict[str, bytes] = {
    "not JSON": b"{not json",
    "a list": b"[]",
    "no message": json.dumps({"subscription": "x"}).encode(),
    "data not base64": json.dumps(envelope("%%%not base64%%%")).encode(),
    "data not JSON": json.dumps(envelope(b"not json")).encode(),
    "data a list": json.dumps(envelope(b"[1]")).encode(),
    "no emailAddress": json.dumps(envelope({"historyId": "5"})).encode(),
    "emailAddress a number": json.dumps(envelope({"emailAddress": 5, "historyId": "5"})).encode(),
    "emailAddress only NUL": json.dumps(envelope({"emailAddress": "\u0000",
                                                  "historyId": "5"})).encode(),
    "no historyId": json.dumps(envelope({"emailAddress": USER})).encode(),
    "historyId letters": json.dumps(envelope({"emailAddress": USER, "historyId": "12a"})).encode(),
    "historyId negative": json.dumps(envelope({"emailAddress": USER, "historyId": -1})).encode(),
    "historyId fraction": json.dumps(envelope({"emailAddress": USER, "historyId": 1.5})).encode(),
    "historyId boolean": json.dumps(envelope({"emailAddress": USER, "historyId": True})).encode(),
    "historyId too long": json.dumps(envelope({"emailAddress": USER,
                                               "historyId": "9" * 21})).encode(),
    "no messageId": json.dumps(envelope({"emailAddress": USER, "historyId": "5"}, messageId="",
                                        message_id="")).encode(),
    "no data": json.dumps({"message": {"messageId": "1"}}).encode(),
}


def test_malformed_authenticated_body_is_400(oidc: str, db_url: str) -> None:
    for name, body in MALFORMED.items():
        r = post(oidc, body, token=google_jwt())
        assert r.status_code == 400 and r.text, name
    assert rows(db_url) == []
    # and the same envelope, well formed, is stored
    good = envelope({"emailAddress": USER, "historyId": "5"})
    assert post(oidc, good, token=google_jwt()).status_code == 200
    assert len(rows(db_url)) == 1


def test_body_over_the_cap_is_413_before_anything_else(oidc: str, db_url: str) -> None:
    big = envelope({"emailAddress": USER, "historyId": 5}, pad="x" * (70 * 1024))
    assert post(oidc, big, token=google_jwt()).status_code == 413
    assert post(oidc, big).status_code == 413  # size is checked first
    small = envelope({"emailAddress": USER, "historyId": 5}, pad="x" * (40 * 1024))
    assert post(oidc, small, token=google_jwt()).status_code == 200
    assert len(rows(db_url)) == 1


def test_database_unreachable_is_503_which_pubsub_retries(sandbox: SandboxGmail) -> None:
    dead = "postgresql://postgres@127.0.0.1:1/nowhere"
    with receiver(dead, sandbox, **OIDC) as server:
        r = post(server.url, envelope({"emailAddress": USER, "historyId": 5}),
                 token=google_jwt())
    assert r.status_code == 503 and r.headers["retry-after"]


def test_certificates_unreachable_is_503_not_401(db_url: str) -> None:
    with receiver(db_url, None, gmail_push_certs_url="http://127.0.0.1:1/certs", **OIDC) as server:
        r = post(server.url, envelope({"emailAddress": USER, "historyId": 5}),
                 token=google_jwt())
    assert r.status_code == 503 and rows(db_url) == []


# ---------------------------------------------------------------- the certificate cache
class CertsServer:
    """Serves a {kid: PEM} map with a given Cache-Control, counting the fetches."""

    def __init__(self) -> None:
        self.certs = signing_key().x509_certs()
        self.cache_control = "public, max-age=3600"
        self.fetches = 0

        async def certs(_request: Request) -> Response:
            self.fetches += 1
            return JSONResponse(self.certs, headers={"Cache-Control": self.cache_control})

        self.app = Starlette(routes=[Route("/certs", certs)])


async def test_certificates_are_cached_by_max_age_and_refetched_for_an_unknown_kid() -> None:
    served = CertsServer()
    kid = signing_key().kid
    with ServerThread(served.app, lifespan="off") as server:
        now = [1000.0]
        certs = GoogleCerts(f"{server.url}/certs", min_refetch_seconds=30,
                            clock=lambda: now[0])
        try:
            assert await certs.for_kid(kid) == {kid: served.certs[kid]}
            assert await certs.for_kid(kid) is not None and served.fetches == 1
            # an unknown kid refetches once; again within 30 s, no fetch
            now[0] += 31
            assert await certs.for_kid("unknown") is None and served.fetches == 2
            assert await certs.for_kid("unknown") is None and served.fetches == 2
            # a key published meanwhile is found by the next refetch
            served.certs = {**served.certs, "new-kid": served.certs[kid]}
            now[0] += 31
            assert await certs.for_kid("new-kid") is not None and served.fetches == 3
            # max-age runs out: one refetch; with max-age=0 every use refetches
            served.cache_control = "max-age=0"
            now[0] += 3600
            assert await certs.for_kid(kid) is not None and served.fetches == 4
            now[0] += 1
            assert await certs.for_kid(kid) is not None and served.fetches == 5
            # an outage keeps the cached certificates in use
            served.certs = {}
            now[0] += 1
            assert await certs.for_kid(kid) is not None and served.fetches == 6
        finally:
            await certs.aclose()
    empty = GoogleCerts("http://127.0.0.1:1/certs")
    with pytest.raises(CertsUnavailable):
        await empty.for_kid(kid)
    await empty.aclose()


def test_cache_control_parsing() -> None:
    assert cache_seconds("public, max-age=19800, must-revalidate, no-transform") == 19800
    assert cache_seconds("public, max-age=100", age="40") == 60
    assert cache_seconds("no-store") == 0 and cache_seconds("private") is None
    assert cache_seconds(None) is None and cache_seconds("max-age=999999999") == 86400
