"""nova.credentials: the authorized_user file, encryption at rest, and access tokens refreshed
at a real token endpoint over HTTP (the Gmail sandbox; one tiny server for token rotation, or
playing the endpoint a forged token_uri names). Refreshes go to GMAIL_TOKEN_URI alone: every
TokenSource here is given the endpoint it may post to."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr

from nova.config import Settings
from nova.credentials import (
    GOOGLE_TOKEN_URI,
    AuthorizedUser,
    CredentialsError,
    TokenSource,
    authorized_user_from_info,
    cipher,
    load_authorized_user,
    load_credentials,
    save_credentials,
)
from nova.providers.errors import AuthExpired, Transient
from nova.sandbox.gmail import SandboxGmail

KEY = Fernet.generate_key().decode()
SECRET = "GOCSPX-client-secret-value"
REFRESH = "1//0refresh-token-value-never-shown"
USER = AuthorizedUser("cid.apps.googleusercontent.com", SECRET, REFRESH,
                      scopes=("https://www.googleapis.com/auth/gmail.readonly",))


def settings(key: str | None) -> Settings:
    return Settings(credentials_key=None if key is None else SecretStr(key))


def write(tmp_path: Path, info: Any, name: str = "creds.json") -> Path:
    path = tmp_path / name
    path.write_text(info if isinstance(info, str) else json.dumps(info))
    return path


# --- the object and the file ------------------------------------------------------------------

def test_repr_and_str_hide_the_client_secret_and_the_refresh_token() -> None:
    for shown in (repr(USER), str(USER), repr([USER]), f"{USER}"):
        assert SECRET not in shown and REFRESH not in shown
        assert USER.client_id in shown and "gmail.readonly" in shown
    assert USER.token_uri == GOOGLE_TOKEN_URI == "https://oauth2.googleapis.com/token"


def test_reads_gcloud_and_google_auth_oauthlib_files(tmp_path: Path) -> None:
    gcloud = {"account": "", "client_id": "c1", "client_secret": "s1", "refresh_token": "r1",
              "type": "authorized_user", "universe_domain": "googleapis.com"}
    assert load_authorized_user(write(tmp_path, gcloud)) == AuthorizedUser(
        "c1", "s1", "r1", GOOGLE_TOKEN_URI, ())
    # google-auth-oauthlib's Credentials.to_json(): no "type", a token and an expiry besides
    oauthlib = {"token": "ya29.x", "refresh_token": "r2", "token_uri": "http://127.0.0.1:9/token",
                "client_id": "c2", "client_secret": "s2", "expiry": "2030-01-01T00:00:00Z",
                "scopes": ["https://mail.google.com/", "openid"], "account": "Me@Example.com"}
    user = load_authorized_user(write(tmp_path, oauthlib), account="me@example.com")
    assert user == AuthorizedUser("c2", "s2", "r2", "http://127.0.0.1:9/token",
                                  ("https://mail.google.com/", "openid"))
    spaced = {**oauthlib, "scopes": "a b"}
    assert load_authorized_user(write(tmp_path, spaced)).scopes == ("a", "b")


GOOD = {"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}


@pytest.mark.parametrize(("info", "expected"), [
    ("{not json", "is not JSON"),
    (b"\xff\xfe".decode("latin-1"), "is not JSON"),
    ([GOOD], "expected a JSON object"),
    ({**GOOD, "type": "service_account"}, "service accounts are not supported"),
    ({**GOOD, "type": "external_account"}, "type is 'external_account'"),
    ({k: v for k, v in GOOD.items() if k != "client_id"}, "missing key 'client_id'"),
    ({**GOOD, "client_secret": "  "}, "key 'client_secret' must be a non-empty string"),
    ({**GOOD, "refresh_token": 12}, "key 'refresh_token' must be a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "refresh_token"}, "missing key 'refresh_token'"),
    ({**GOOD, "token_uri": "ftp://example.com/token"}, "'token_uri' must be an http(s) URL"),
    ({**GOOD, "token_uri": "oauth2.googleapis.com/token"}, "'token_uri' must be an http(s)"),
    ({**GOOD, "scopes": [1]}, "'scopes' must be a list of strings"),
], ids=["not-json", "not-utf8", "a-list", "service-account", "other-type", "no-client-id",
        "blank-secret", "number-token", "no-refresh-token", "ftp-uri", "no-scheme",
        "bad-scopes"])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path: Path, info: Any,
                                                           expected: str) -> None:
    path = write(tmp_path, info)
    with pytest.raises(CredentialsError) as err:
        load_authorized_user(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_an_unreadable_file_or_another_account_is_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.json", tmp_path):
        with pytest.raises(CredentialsError, match="cannot read credentials file") as err:
            load_authorized_user(path)
        assert str(path) in str(err.value)
    path = write(tmp_path, {**GOOD, "account": "a@example.com"})
    with pytest.raises(CredentialsError, match="is for a@example.com, not b@example.com"):
        load_authorized_user(path, account="b@example.com")
    assert load_authorized_user(path, account="A@Example.com").client_id == "c"


def test_a_file_naming_another_token_endpoint_is_refused_naming_gmail_token_uri(
        tmp_path: Path) -> None:
    ours = "http://127.0.0.1:9/token"  # GMAIL_TOKEN_URI, as a test or the demo sets it
    forged = write(tmp_path, {**GOOD, "token_uri": "https://collector.example/token"})
    with pytest.raises(CredentialsError) as err:
        load_authorized_user(forged, token_uri=ours)
    message = str(err.value)
    assert str(forged) in message and "'https://collector.example/token'" in message
    assert f"is not GMAIL_TOKEN_URI ({ours})" in message
    # a sandbox's file where Google's endpoint is the setting (the default)
    with pytest.raises(CredentialsError, match=r"GMAIL_TOKEN_URI \(https://oauth2"):
        load_authorized_user(write(tmp_path, {**GOOD, "token_uri": ours}),
                             token_uri=GOOGLE_TOKEN_URI)
    # no token_uri (gcloud writes none), or the setting's own: the setting's
    assert load_authorized_user(write(tmp_path, GOOD), token_uri=ours).token_uri == ours
    same = write(tmp_path, {**GOOD, "token_uri": ours + "/"})
    assert load_authorized_user(same, token_uri=ours).token_uri == ours
    # Google's older name for its endpoint is Google's, and only Google's
    older = {**GOOD, "token_uri": "https://accounts.google.com/o/oauth2/token"}
    assert authorized_user_from_info(older, token_uri=GOOGLE_TOKEN_URI).token_uri == \
        GOOGLE_TOKEN_URI
    with pytest.raises(CredentialsError, match="GMAIL_TOKEN_URI"):
        authorized_user_from_info(older, token_uri=ours)


# --- the key ----------------------------------------------------------------------------------

def test_a_fernet_key_is_used_as_it_is() -> None:
    token = Fernet(KEY.encode()).encrypt(b"x")
    assert cipher(settings(KEY)).decrypt(token) == b"x"
    assert cipher(settings(f"  {KEY}\n")).decrypt(token) == b"x"


def test_a_passphrase_derives_the_documented_hkdf_key() -> None:
    phrase = "correct horse battery staple"
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"nova-credentials-key-v1",
                   info=b"nova flux_inbox_credentials secret").derive(phrase.encode())
    token = Fernet(base64.urlsafe_b64encode(derived)).encrypt(b"y")
    assert cipher(settings(phrase)).decrypt(token) == b"y"
    other = cipher(settings(phrase + "!")).encrypt(b"y")
    with pytest.raises(InvalidToken):
        cipher(settings(phrase)).decrypt(other)


@pytest.mark.parametrize("key", [None, "", "   ", "short passphrase"[:15]])
def test_no_key_or_a_short_one_says_how_to_make_one(key: str | None) -> None:
    with pytest.raises(CredentialsError) as err:
        cipher(settings(key))
    message = str(err.value)
    assert "NOVA_CREDENTIALS_KEY" in message
    assert "Fernet.generate_key().decode()" in message


# --- the table --------------------------------------------------------------------------------

async def add_inbox(pool: Any, email: str, provider: str = "gmail") -> Any:
    return await pool.fetchval("INSERT INTO flux_inboxes (provider, grant_id, email)"
                               " VALUES ($1, $2, $3) RETURNING id", provider, email.lower(),
                               email)


async def test_the_stored_secret_is_encrypted_and_loads_back(pool: Any) -> None:
    fernet = cipher(settings(KEY))
    inbox = await add_inbox(pool, "Owner@Example.com")
    await save_credentials(pool, inbox, USER, fernet)
    row = await pool.fetchrow("SELECT * FROM flux_inbox_credentials WHERE inbox_id = $1", inbox)
    for plain in (REFRESH, SECRET, USER.client_id, GOOGLE_TOKEN_URI):
        assert plain.encode() not in row["secret"]
    # the client and the token endpoint are sealed with the secrets, not plain columns
    assert (row["kind"], row["client_id"], row["token_uri"], row["scopes"]) == (
        "authorized_user", None, None, list(USER.scopes))
    assert json.loads(fernet.decrypt(row["secret"])) == {
        "client_id": USER.client_id, "token_uri": GOOGLE_TOKEN_URI, "client_secret": SECRET,
        "refresh_token": REFRESH}
    assert await load_credentials(pool, "owner@example.com", fernet) == USER

    newer = AuthorizedUser("cid2", "s2", "r2", "http://127.0.0.1:1/token")
    async with pool.acquire() as conn, conn.transaction():  # an upsert, in the caller's tx
        await save_credentials(conn, inbox, newer, fernet)
    assert await load_credentials(pool, "owner@example.com", fernet) == newer
    assert await pool.fetchval("SELECT count(*) FROM flux_inbox_credentials") == 1


async def test_only_a_live_gmail_inbox_has_credentials(pool: Any) -> None:
    fernet = cipher(settings(KEY))
    nylas = await add_inbox(pool, "n@example.com", provider="nylas")
    await save_credentials(pool, nylas, USER, fernet)
    assert await load_credentials(pool, "n@example.com", fernet) is None
    gone = await add_inbox(pool, "gone@example.com")
    await save_credentials(pool, gone, USER, fernet)
    assert await load_credentials(pool, "gone@example.com", fernet) == USER
    await pool.execute("UPDATE flux_inboxes SET deleted_at = now() WHERE id = $1", gone)
    assert await load_credentials(pool, "gone@example.com", fernet) is None
    assert await load_credentials(pool, "nobody@example.com", fernet) is None


async def test_a_wrong_key_names_the_inbox_and_the_setting(pool: Any) -> None:
    inbox = await add_inbox(pool, "Keyed@Example.com")
    await save_credentials(pool, inbox, USER, cipher(settings(KEY)))
    wrong = cipher(settings("another passphrase entirely"))
    with pytest.raises(CredentialsError) as err:
        await load_credentials(pool, "keyed@example.com", wrong)
    assert str(err.value).startswith(
        "NOVA_CREDENTIALS_KEY does not decrypt the stored credentials of Keyed@Example.com: ")
    assert REFRESH not in str(err.value)


# --- access tokens ----------------------------------------------------------------------------

@pytest.fixture
def sb() -> Iterator[SandboxGmail]:
    with SandboxGmail(threads=3, users=2, seed=11, hang_seconds=5) as s:
        yield s


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def gmail_inbox(pool: Any, sb: SandboxGmail, fernet: Fernet, email: str | None = None,
                      **changes: Any) -> str:
    email = email or sb.users[0]
    info = {**sb.credentials(email), **changes}
    user = AuthorizedUser(info["client_id"], info["client_secret"], info["refresh_token"],
                          info["token_uri"], tuple(info["scopes"]))
    await save_credentials(pool, await add_inbox(pool, email), user, fernet)
    return email.lower()


def token_requests(sb: SandboxGmail) -> int:
    return int(sb.get_stats()["requests"].get("token", 0))


async def profile(http: httpx.AsyncClient, sb: SandboxGmail, grant: str, token: str) -> int:
    resp = await http.get(f"{sb.base_url}/gmail/v1/users/{grant}/profile",
                          headers={"Authorization": f"Bearer {token}"})
    return resp.status_code


async def test_a_token_is_refreshed_once_then_cached(pool: Any, sb: SandboxGmail,
                                                     http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
    first = await tokens.token(grant)
    assert await profile(http, sb, grant, first) == 200  # a real token of that user
    assert await tokens.token(grant) == first
    assert token_requests(sb) == 1


async def test_a_token_past_expires_in_less_early_seconds_is_refreshed(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    # the sandbox's tokens live 3599 s: with early_seconds 3599 each is due at once
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri, early_seconds=3599)
    first = await tokens.token(grant)
    second = await tokens.token(grant)
    assert first != second and token_requests(sb) == 2
    assert await profile(http, sb, grant, second) == 200


async def test_invalidate_drops_only_the_token_it_names(pool: Any, sb: SandboxGmail,
                                                        http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
    first = await tokens.token(grant)
    sb.expire_access_tokens()
    assert await profile(http, sb, grant, first) == 401
    tokens.invalidate(grant, "ya29.some-older-token")  # already replaced: nothing to drop
    assert await tokens.token(grant) == first and token_requests(sb) == 1
    tokens.invalidate(grant, first)
    second = await tokens.token(grant)
    assert second != first and token_requests(sb) == 2
    assert await profile(http, sb, grant, second) == 200
    tokens.invalidate(grant)
    assert await tokens.token(grant) != second and token_requests(sb) == 3


async def test_concurrent_callers_share_one_refresh(pool: Any, sb: SandboxGmail,
                                                    http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    other = await gmail_inbox(pool, sb, fernet, sb.users[1])
    # never served from cache
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri, early_seconds=3599)
    got = await asyncio.gather(*(tokens.token(g) for g in [grant] * 20 + [other] * 5))
    assert len(set(got[:20])) == 1 and len(set(got[20:])) == 1 and got[0] != got[20]
    assert sb.get_stats()["refreshes"] == {grant: 1, other: 1}

    sb.revoke(grant)  # a failed refresh is shared too: one request, every caller told

    async def outcome() -> str:
        try:
            return await tokens.token(grant)
        except AuthExpired as exc:
            return f"raised {exc.error_type}"

    assert await asyncio.gather(*(outcome() for _ in range(10))) == ["raised invalid_grant"] * 10
    assert token_requests(sb) == 3


async def test_a_cancelled_refresh_leaves_the_waiting_callers_to_refresh(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
    sb.inject_fault("timeout", 1, endpoint="token")  # the first refresh hangs
    first = asyncio.create_task(tokens.token(grant))
    while token_requests(sb) < 1:
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(tokens.token(grant))
    await asyncio.sleep(0.05)
    first.cancel()
    token = await asyncio.wait_for(waiting, 10)
    assert first.cancelled() and await profile(http, sb, grant, token) == 200
    assert token_requests(sb) == 2
    sb.release_hangs()


async def test_a_revoked_refresh_token_is_auth_expired(pool: Any, sb: SandboxGmail,
                                                       http: httpx.AsyncClient,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    refresh = sb.credentials(grant)["refresh_token"]
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
    caplog.set_level(logging.DEBUG)
    token = await tokens.token(grant)
    sb.revoke(grant)
    tokens.invalidate(grant, token)
    with pytest.raises(AuthExpired) as err:
        await tokens.token(grant)
    assert err.value.error_type == "invalid_grant" and err.value.status == 400
    assert err.value.provider == "gmail" and grant in str(err.value)
    assert refresh not in str(err.value)
    assert f"grant={grant} outcome=refused" in caplog.text
    for secret in (token, refresh, sb.oauth.client_secret):
        assert secret not in caplog.text


async def test_a_refused_oauth_client_is_auth_expired_and_says_so(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet, client_secret="not-the-secret")
    with pytest.raises(AuthExpired, match="OAuth client .* was refused") as err:
        await TokenSource(pool, fernet, http, token_uri=sb.token_uri).token(grant)
    assert err.value.error_type == "invalid_client"


async def test_no_stored_credentials_is_auth_expired(pool: Any, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    await add_inbox(pool, "bare@example.com")
    with pytest.raises(AuthExpired, match="^no credentials stored for bare@example.com$"):
        await TokenSource(pool, fernet, http, token_uri=GOOGLE_TOKEN_URI).token(
            "bare@example.com")


@pytest.mark.parametrize("fault", ["error_5xx", "html_error", "malformed"])
async def test_a_failing_token_endpoint_is_transient_then_recovers(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient, fault: str) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
    sb.inject_fault(fault, 1, endpoint="token")
    with pytest.raises(Transient):
        await tokens.token(grant)
    assert sb.get_stats()["faults"] == {fault: 1}
    assert await profile(http, sb, grant, await tokens.token(grant)) == 200


async def test_an_unreachable_or_hanging_token_endpoint_is_transient(
        pool: Any, sb: SandboxGmail) -> None:
    fernet = cipher(settings(KEY))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = f"http://127.0.0.1:{closed}/token"
    grant = await gmail_inbox(pool, sb, fernet, token_uri=down)
    async with httpx.AsyncClient(timeout=0.5) as client:
        with pytest.raises(Transient, match="did not answer: ConnectError"):
            await TokenSource(pool, fernet, client, token_uri=down).token(grant)
        other = await gmail_inbox(pool, sb, fernet, sb.users[1])
        sb.inject_fault("timeout", 1, endpoint="token")
        with pytest.raises(Transient, match="did not answer: ReadTimeout"):
            await TokenSource(pool, fernet, client, token_uri=sb.token_uri).token(other)
        sb.release_hangs()


class RotatingTokenEndpoint:
    """A token endpoint that answers every refresh with a new refresh token, as Google may."""

    def __init__(self) -> None:
        self.forms: list[dict[str, str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.forms.append(dict(parse_qsl(body.decode())))
                n = len(endpoint.forms)
                answer = json.dumps({"access_token": f"at-{n}", "expires_in": 3599,
                                     "refresh_token": f"rt-{n}", "token_type": "Bearer"})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_a_new_refresh_token_in_the_answer_is_saved_encrypted(
        pool: Any, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    endpoint = RotatingTokenEndpoint()
    try:
        inbox = await add_inbox(pool, "rot@example.com")
        await save_credentials(pool, inbox, AuthorizedUser("c", "s", "rt-0", endpoint.url),
                               fernet)
        tokens = TokenSource(pool, fernet, http, token_uri=endpoint.url)
        assert await tokens.token("rot@example.com") == "at-1"
        assert endpoint.forms[0] == {"grant_type": "refresh_token", "client_id": "c",
                                     "client_secret": "s", "refresh_token": "rt-0"}
        stored = await load_credentials(pool, "rot@example.com", fernet)
        assert stored is not None and stored.refresh_token == "rt-1"
        secret = await pool.fetchval("SELECT secret FROM flux_inbox_credentials")
        assert b"rt-1" not in secret
        tokens.invalidate("rot@example.com")
        assert await tokens.token("rot@example.com") == "at-2"
        assert endpoint.forms[1]["refresh_token"] == "rt-1"
    finally:
        endpoint.close()


# --- the token endpoint and what is sealed ----------------------------------------------------

async def test_a_stored_token_uri_other_than_gmail_token_uri_is_refused_and_nothing_is_posted(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient,
        caplog: pytest.LogCaptureFixture) -> None:
    fernet = cipher(settings(KEY))
    collector = RotatingTokenEndpoint()  # whoever a forged token_uri names
    try:
        grant = await gmail_inbox(pool, sb, fernet, token_uri=collector.url)
        refresh = sb.credentials(grant)["refresh_token"]
        tokens = TokenSource(pool, fernet, http, token_uri=sb.token_uri)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(CredentialsError) as err:
            await tokens.token(grant)
        message = str(err.value)
        assert message.startswith(f"the stored credentials of {grant}: token_uri "
                                  f"'{collector.url}' is not GMAIL_TOKEN_URI ({sb.token_uri})")
        assert refresh not in message and refresh not in caplog.text
        assert f"grant={grant} outcome=credentials_refused" in caplog.text
        with pytest.raises(CredentialsError, match="GMAIL_TOKEN_URI"):
            await load_credentials(pool, grant, fernet, token_uri=sb.token_uri)
        assert collector.forms == [] and token_requests(sb) == 0
    finally:
        collector.close()


async def test_a_token_uri_written_into_a_sealed_rows_columns_changes_nothing(
        pool: Any, sb: SandboxGmail, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    grant = await gmail_inbox(pool, sb, fernet)
    collector = RotatingTokenEndpoint()
    try:
        await pool.execute("UPDATE flux_inbox_credentials SET token_uri = $1,"
                           " client_id = 'forged-client'", collector.url)
        token = await TokenSource(pool, fernet, http, token_uri=sb.token_uri).token(grant)
        assert await profile(http, sb, grant, token) == 200
        assert collector.forms == [] and token_requests(sb) == 1
    finally:
        collector.close()


def legacy_secret(fernet: Fernet, refresh_token: str) -> bytes:
    """A ``secret`` as saves before migrations/0009 wrote it: the two secrets only."""
    return fernet.encrypt(json.dumps({"client_secret": "s",
                                      "refresh_token": refresh_token}).encode())


LEGACY = ("INSERT INTO flux_inbox_credentials (inbox_id, client_id, token_uri, scopes, secret)"
          " VALUES ($1, 'c-old', $2, '{}', $3)")


async def test_a_row_saved_before_0009_is_read_and_sealed_whole_when_saved_again(
        pool: Any, http: httpx.AsyncClient) -> None:
    fernet = cipher(settings(KEY))
    endpoint = RotatingTokenEndpoint()
    try:
        inbox = await add_inbox(pool, "legacy@example.com")
        await pool.execute(LEGACY, inbox, endpoint.url, legacy_secret(fernet, "rt-0"))
        assert await load_credentials(pool, "legacy@example.com", fernet) == AuthorizedUser(
            "c-old", "s", "rt-0", endpoint.url)
        tokens = TokenSource(pool, fernet, http, token_uri=endpoint.url)
        assert await tokens.token("legacy@example.com") == "at-1"
        assert endpoint.forms == [{"grant_type": "refresh_token", "client_id": "c-old",
                                   "client_secret": "s", "refresh_token": "rt-0"}]
        # the answer carried a new refresh token: saving it sealed the whole row
        row = await pool.fetchrow("SELECT client_id, token_uri, secret"
                                  " FROM flux_inbox_credentials WHERE inbox_id = $1", inbox)
        assert (row["client_id"], row["token_uri"]) == (None, None)
        assert json.loads(fernet.decrypt(row["secret"])) == {
            "client_id": "c-old", "token_uri": endpoint.url, "client_secret": "s",
            "refresh_token": "rt-1"}

        # an old row naming another endpoint is refused when read; adding the inbox again
        # (save_credentials, as `nova inbox add` does) replaces and seals it
        other = await add_inbox(pool, "old-elsewhere@example.com")
        await pool.execute(LEGACY, other, "https://collector.example/token",
                           legacy_secret(fernet, "rt-x"))
        with pytest.raises(CredentialsError, match="is not GMAIL_TOKEN_URI"):
            await tokens.token("old-elsewhere@example.com")
        await save_credentials(pool, other, AuthorizedUser("c-new", "s2", "rt-y", endpoint.url),
                               fernet)
        assert await pool.fetchval("SELECT count(*) FROM flux_inbox_credentials"
                                   " WHERE client_id IS NOT NULL OR token_uri IS NOT NULL") == 0
        assert await tokens.token("old-elsewhere@example.com") == "at-2"
        assert endpoint.forms[1]["client_id"] == "c-new" and len(endpoint.forms) == 2
    finally:
        endpoint.close()
