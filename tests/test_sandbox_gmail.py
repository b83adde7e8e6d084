"""The Gmail API v1 sandbox over real loopback HTTP: plain httpx, and Google's own clients
(google-api-python-client built offline from its bundled discovery document, google-auth
credentials refreshing against the sandbox's token endpoint)."""

from __future__ import annotations

import base64
import email
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import google.auth.exceptions
import google.auth.transport.requests
import httpx
import pypdf
import pytest
from google.oauth2 import id_token
from google.oauth2.credentials import Credentials
from googleapiclient import discovery
from googleapiclient.errors import HttpError
from googleapiclient.http import BatchHttpRequest, _should_retry_response

from nova.sandbox.gmail import METADATA, SandboxGmail

ANCHOR = 1_750_000_000
TOPIC = "projects/nova-sandbox/topics/gmail"


# ---------------------------------------------------------------- helpers
class Receiver:
    """A real HTTP push endpoint recording (path, headers, body); answers ``statuses`` in
    turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((self.path, {k.lower(): v for k, v in
                                                   self.headers.items()}, body))
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/push"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def envelopes(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def client(sb: SandboxGmail, user: str) -> httpx.Client:
    return httpx.Client(base_url=sb.base_url + "/gmail/v1/users/me",
                        headers={"Authorization": f"Bearer {sb.access_token(user)}"},
                        timeout=30)


def credentials(sb: SandboxGmail, user: str) -> Credentials:
    info = sb.credentials(user)
    return Credentials(token=None, refresh_token=info["refresh_token"],
                       client_id=info["client_id"], client_secret=info["client_secret"],
                       token_uri=sb.token_uri)


def service(sb: SandboxGmail, user: str) -> Any:
    return discovery.build("gmail", "v1", credentials=credentials(sb, user),
                           static_discovery=True,
                           client_options={"api_endpoint": sb.api_endpoint})


def walk(part: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield part
    for sub in part.get("parts", []):
        yield from walk(sub)


def unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def header(part: dict[str, Any], name: str) -> str | None:
    return next((h["value"] for h in part["headers"] if h["name"].lower() == name.lower()),
                None)


def error_reason(resp: httpx.Response) -> str:
    return str(resp.json()["error"]["errors"][0]["reason"])


def scan(sb: SandboxGmail, user: str, n: int = 400) -> list[dict[str, Any]]:
    """Full-format JSON of the newest ``n`` messages (built in-process, no quota)."""
    return [sb.message_json(user, mid) for mid in sb.message_ids(user)[:n]]


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxGmail]:
    with SandboxGmail(threads=300, seed=7, anchor=ANCHOR, hostile=0.05,
                      hang_seconds=5) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sb" in request.fixturenames:
        s: SandboxGmail = request.getfixturevalue("sb")
        s.clear_faults()
        s.reset_quota()
        s.set_quota(per_minute=15_000, error="mixed", retry_after=False)
        s.set_max_concurrent(50)
        s.release_hangs()


# ---------------------------------------------------------------- mailbox generation
def test_5000_threads_start_lazily_and_page_through_the_api() -> None:
    with SandboxGmail(threads=5000, seed=3, anchor=ANCHOR) as s:
        assert s.mailbox._gen.cache_info().currsize == 0  # nothing generated at start
        with client(s, s.users[0]) as c:
            first = c.get("/threads").json()
        assert len(first["threads"]) == 100  # maxResults defaults to 100
        assert first["nextPageToken"]
        # only the threads needed for one page (plus a look-ahead) were generated
        assert s.mailbox._gen.cache_info().currsize < 300
        with client(s, s.users[0]) as c:
            page = c.get("/threads", params={"maxResults": 500,
                                             "pageToken": first["nextPageToken"]}).json()
        assert len(page["threads"]) == 500
        assert not {t["id"] for t in page["threads"]} & {t["id"] for t in first["threads"]}


def test_same_seed_same_mailbox_bytes_and_ids() -> None:
    a = SandboxGmail(threads=40, seed=5, anchor=ANCHOR, hostile=0.1)
    b = SandboxGmail(threads=40, seed=5, anchor=ANCHOR, hostile=0.1)
    c = SandboxGmail(threads=40, seed=6, anchor=ANCHOR)
    assert a.users == b.users and a.users != c.users
    ids = a.message_ids(a.users[0])
    assert ids == b.message_ids(b.users[0]) and ids != c.message_ids(c.users[0])
    for mid in ids[:30]:
        assert a.raw_message(a.users[0], mid) == b.raw_message(b.users[0], mid)


def test_thread_sizes_are_mixed_and_thread_id_is_first_message_id(sb: SandboxGmail) -> None:
    user = sb.users[0]
    sizes = Counter()
    for tid in sb.thread_ids(user)[:200]:
        thread = sb.mailbox.thread(user, tid)
        assert thread is not None
        sizes[len(thread.messages)] += 1
        first = min(thread.messages, key=lambda m: m.internal_ms)
        assert first.id == tid
    assert 0.3 <= sizes[1] / 200 <= 0.6  # many single-message threads
    assert max(sizes) >= 4 and sizes[2] > 0


# ---------------------------------------------------------------- profile, labels, lists
def test_profile_and_labels(sb: SandboxGmail) -> None:
    user = sb.users[1]
    with client(sb, user) as c:
        prof = c.get("/profile").json()
        labels = c.get("/labels").json()["labels"]
    assert prof["emailAddress"] == user
    assert prof["messagesTotal"] == len(sb.message_ids(user))
    assert prof["threadsTotal"] == len(sb.thread_ids(user))
    assert prof["historyId"] == str(sb.history_id(user))
    ids = {lb["id"]: lb for lb in labels}
    for system in ("INBOX", "SENT", "UNREAD", "STARRED", "IMPORTANT", "SPAM", "TRASH",
                   "CATEGORY_PERSONAL", "CATEGORY_UPDATES", "CATEGORY_PROMOTIONS"):
        assert ids[system]["type"] == "system"
    user_labels = [lb for lb in labels if lb["type"] == "user"]
    assert user_labels and all(lb["id"].startswith("Label_") for lb in user_labels)


def test_threads_list_paging_filters_and_spam_trash(sb: SandboxGmail) -> None:
    user = sb.users[0]
    seen: list[dict[str, Any]] = []
    token = None
    with client(sb, user) as c:
        while True:
            params: dict[str, Any] = {"maxResults": 37}
            if token:
                params["pageToken"] = token
            page = c.get("/threads", params=params).json()
            assert set(page) <= {"threads", "nextPageToken", "resultSizeEstimate"}
            seen += page["threads"]
            token = page.get("nextPageToken")
            if not token:
                break
        everything = c.get("/threads", params={"maxResults": 500,
                                               "includeSpamTrash": "true"}).json()
        inbox = c.get("/threads", params={"labelIds": "INBOX", "maxResults": 500}).json()
        both = c.get("/threads", params=[("labelIds", "INBOX"), ("labelIds", "UNREAD"),
                                         ("maxResults", "500")]).json()
        assert c.get("/threads", params={"maxResults": 501}).status_code == 400
        bad = c.get("/threads", params={"pageToken": "garbage!"})
        assert bad.status_code == 400 and error_reason(bad) == "invalidArgument"
        assert c.get("/threads", params={"labelIds": "Label_99"}).status_code == 400
    ids = [t["id"] for t in seen]
    assert len(ids) == len(set(ids))
    assert all(set(t) == {"id", "snippet", "historyId"} for t in seen)
    assert all(t["historyId"].isdigit() for t in seen)
    hidden = set(t["id"] for t in everything["threads"]) - set(ids)
    assert hidden  # SPAM/TRASH threads only with includeSpamTrash
    for tid in hidden:
        thread = sb.mailbox.thread(user, tid)
        assert thread is not None
        assert all({"SPAM", "TRASH"} & set(m.labels) for m in thread.messages)
    # newest first: by each thread's newest message
    latest = []
    for tid in ids:
        thread = sb.mailbox.thread(user, tid)
        assert thread is not None
        latest.append(thread.latest_ms)
    assert latest == sorted(latest, reverse=True)
    in_inbox = {t["id"] for t in inbox["threads"]}
    assert in_inbox < set(ids)
    assert {t["id"] for t in both["threads"]} < in_inbox


def test_messages_list_and_q_dates_in_pacific_time(sb: SandboxGmail) -> None:
    user = sb.users[0]
    with client(sb, user) as c:
        listed = c.get("/messages", params={"maxResults": 500}).json()["messages"]
        assert all(set(m) == {"id", "threadId"} for m in listed)
        dated = sb.mailbox.message(user, listed[40]["id"])
        assert dated is not None
        day = datetime.fromtimestamp(dated.internal_ms / 1000, ZoneInfo("America/Los_Angeles"))
        q = f"after:{day:%Y/%m/%d}"
        by_date = c.get("/messages", params={"q": q, "maxResults": 500}).json()["messages"]
        midnight = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo("America/Los_Angeles"))
        by_secs = c.get("/messages", params={"q": f"after:{int(midnight.timestamp())}",
                                             "maxResults": 500}).json()["messages"]
        assert by_date == by_secs and dated.id in {m["id"] for m in by_date}
        window = c.get("/threads", params={"q": f"in:inbox before:{int(midnight.timestamp())}",
                                           "maxResults": 500}).json()["threads"]
        unsupported = c.get("/messages", params={"q": "from:someone@example.com"})
    for m in by_date:
        spec = sb.mailbox.message(user, m["id"])
        assert spec is not None and spec.internal_ms >= midnight.timestamp() * 1000
    for t in window:
        thread = sb.mailbox.thread(user, t["id"])
        assert thread is not None
        assert any(m.internal_ms < midnight.timestamp() * 1000 and "INBOX" in m.labels
                   for m in thread.messages)
    assert unsupported.status_code == 400  # the sandbox refuses searches it cannot run


# ---------------------------------------------------------------- messages and MIME
def test_message_formats_full_metadata_minimal_raw(sb: SandboxGmail) -> None:
    user = sb.users[0]
    mid = sb.message_ids(user)[3]
    raw_bytes = sb.raw_message(user, mid)
    with client(sb, user) as c:
        full = c.get(f"/messages/{mid}").json()
        meta = c.get(f"/messages/{mid}", params=[("format", "metadata"),
                                                 ("metadataHeaders", "subject"),
                                                 ("metadataHeaders", "From")]).json()
        minimal = c.get(f"/messages/{mid}", params={"format": "minimal"}).json()
        raw = c.get(f"/messages/{mid}", params={"format": "raw"}).json()
        assert c.get("/messages/0000000000000000").status_code == 404
        bad = c.get("/messages/not-an-id")
        assert bad.status_code == 400 and error_reason(bad) == "invalidArgument"
        assert c.get(f"/messages/{mid}", params={"format": "fancy"}).status_code == 400
    assert list(full)[:2] == ["id", "threadId"]
    assert full["internalDate"].isdigit() and full["historyId"].isdigit()
    assert full["sizeEstimate"] == len(raw_bytes) == len(unb64(raw["raw"]))
    assert unb64(raw["raw"]) == raw_bytes and "payload" not in raw
    assert full["payload"]["partId"] == "" and full["payload"]["filename"] == ""
    assert header(full["payload"], "Message-ID") == email.message_from_bytes(
        raw_bytes)["Message-ID"]
    assert [h["name"] for h in meta["payload"]["headers"]] == ["Subject", "From"]
    assert set(meta["payload"]) == {"mimeType", "headers"}
    assert "payload" not in minimal and minimal["labelIds"] == full["labelIds"]
    assert minimal["snippet"] == full["snippet"]


def _text_of(part: dict[str, Any]) -> str:
    ctype = header(part, "Content-Type") or ""
    charset = email.message_from_string(f"Content-Type: {ctype}\n\n").get_content_charset()
    return unb64(part["body"]["data"]).decode(charset or "us-ascii")


def test_mime_structures_charsets_and_encoded_headers(sb: SandboxGmail) -> None:
    user = sb.users[0]
    seen_types: Counter[str] = Counter()
    charsets: set[str] = set()
    encoded_subject = False
    for m in scan(sb, user, 500):
        root = m["payload"]
        raw = sb.raw_message(user, m["id"])
        parsed = email.message_from_bytes(raw)
        for part in walk(root):
            seen_types[part["mimeType"]] += 1
            if part["mimeType"].startswith("multipart/"):
                assert part["body"] == {"size": 0} and part["parts"]
                for k, sub in enumerate(part["parts"]):
                    assert sub["partId"] == (f"{part['partId']}.{k}" if part["partId"]
                                             else str(k))
            elif "data" in part["body"]:
                data = unb64(part["body"]["data"])
                assert len(data) == part["body"]["size"]
                if "X-Sandbox-Raw" not in raw.decode("latin-1"):
                    charset = email.message_from_string(
                        f"Content-Type: {header(part, 'Content-Type')}\n\n").get_content_charset()
                    charsets.add(charset or "us-ascii")
                    _text_of(part)  # decodes with its declared charset
        if root["mimeType"] == "multipart/mixed":
            assert root["parts"][0]["mimeType"].startswith(("multipart/", "text/"))
        if "=?" in (parsed["Subject"] or ""):
            subject = header(root, "Subject") or ""
            assert "=?" not in subject and not subject.isascii()
            encoded_subject = True
    assert {"multipart/mixed", "multipart/alternative", "multipart/related", "text/plain",
            "text/html", "application/pdf", "image/png",
            "application/octet-stream"} <= set(seen_types)
    assert {"utf-8", "iso-8859-1", "windows-1252"} <= charsets
    assert encoded_subject


def test_inline_images_and_attachment_kinds(sb: SandboxGmail) -> None:
    user = sb.users[0]
    related = pdf = text = octet = 0
    with client(sb, user) as c:
        for m in scan(sb, user, 600):
            for part in walk(m["payload"]):
                if part["mimeType"] == "multipart/related" and not related:
                    html = next(p for p in walk(part) if p["mimeType"] == "text/html")
                    img = next(p for p in part["parts"] if p["mimeType"] == "image/png")
                    cid = (header(img, "Content-ID") or "").strip("<>")
                    assert cid and f"cid:{cid}" in _text_of(html)
                    got = c.get(f"/messages/{m['id']}/attachments/"
                                f"{img['body']['attachmentId']}").json()
                    assert unb64(got["data"]).startswith(b"\x89PNG\r\n\x1a\n")
                    related += 1
                aid = part["body"].get("attachmentId")
                if aid is None:
                    continue
                if part["mimeType"] == "application/pdf" and not pdf:
                    data = unb64(c.get(f"/messages/{m['id']}/attachments/{aid}").json()["data"])
                    assert data.startswith(b"%PDF")
                    extracted = pypdf.PdfReader(io.BytesIO(data)).pages[0].extract_text()
                    assert "INVOICE" in extracted or "hostile" in extracted
                    pdf += 1
                elif part["mimeType"] in ("text/plain", "text/csv") and part["filename"]:
                    text += 1
                elif part["mimeType"] == "application/octet-stream":
                    octet += 1
    assert related and pdf and text and octet


def test_attachment_ids_change_every_fetch_and_all_keep_working(sb: SandboxGmail) -> None:
    user = sb.users[0]
    target = next(m for m in scan(sb, user, 400)
                  if any("attachmentId" in p["body"] for p in walk(m["payload"])))
    with client(sb, user) as c:
        first = c.get(f"/messages/{target['id']}").json()
        second = c.get(f"/messages/{target['id']}").json()
        a1 = next(p for p in walk(first["payload"]) if "attachmentId" in p["body"])
        a2 = next(p for p in walk(second["payload"]) if p["partId"] == a1["partId"])
        id1, id2 = a1["body"]["attachmentId"], a2["body"]["attachmentId"]
        assert id1 != id2 and len(id1) > 255  # changes per fetch; longer than varchar(255)
        got1 = c.get(f"/messages/{target['id']}/attachments/{id1}").json()
        got2 = c.get(f"/messages/{target['id']}/attachments/{id2}").json()
        assert got1["data"] == got2["data"] and got1["size"] == a1["body"]["size"]
        assert len(unb64(got1["data"])) == got1["size"]
        other = next(mid for mid in sb.message_ids(user) if mid != target["id"])
        wrong = c.get(f"/messages/{other}/attachments/{id1}")
        assert wrong.status_code == 400 and error_reason(wrong) == "invalidArgument"
        sb.set_attachment_id_ttl(-1)  # short-lived tokens: an old id stops working
        try:
            stale = c.get(f"/messages/{target['id']}/attachments/{id1}")
            assert stale.status_code == 400
            assert stale.json()["error"]["message"] == "Invalid attachment token"
        finally:
            sb.set_attachment_id_ttl(3600)


def test_hostile_mail(sb: SandboxGmail) -> None:
    user = sb.users[0]
    hostile = sb.hostile_threads(user)
    assert hostile
    kinds = Counter(k for ks in hostile.values() for k in ks)
    assert kinds["nul"] == len(hostile) and kinds["lying_body_charset"]
    names: set[str] = set()
    lying = False
    with client(sb, user) as c:
        for tid in hostile:
            thread = c.get(f"/threads/{tid}").json()  # valid JSON despite NULs
            for m in thread["messages"]:
                root = m["payload"]
                subject = header(root, "Subject") or ""
                assert "\x00" in subject and "\u202e" in subject
                assert header(root, "X-Sandbox-Raw") == "Gr\u00fc\u00dfe"  # raw 8-bit header
                for part in walk(root):
                    names.add(part["filename"])
                    if part["mimeType"] != "text/plain" or "data" not in part["body"]:
                        continue
                    data = unb64(part["body"]["data"])
                    try:
                        _text_of(part)
                    except UnicodeDecodeError:  # the declared charset lies
                        assert "Gr\u00fc\u00dfe" in data.decode("latin-1")
                        lying = True
    assert lying
    assert {"../../etc/passwd", "..\\..\\boot.ini", "CON", "NUL.txt", "..."} <= names
    assert "notes\x000.txt" in names


# ---------------------------------------------------------------- auth
def test_api_auth_errors_and_user_resolution(sb: SandboxGmail) -> None:
    a, b = sb.users[0], sb.users[1]
    base = sb.base_url + "/gmail/v1/users"
    missing = httpx.get(f"{base}/me/profile")
    assert missing.status_code == 401 and error_reason(missing) == "required"
    bad = httpx.get(f"{base}/me/profile", headers={"Authorization": "Bearer ya29.nope"})
    body = bad.json()["error"]
    assert bad.status_code == 401 and body["status"] == "UNAUTHENTICATED"
    assert body["errors"][0]["reason"] == "authError" and body["code"] == 401
    assert "invalid_token" in bad.headers["www-authenticate"]
    auth = {"Authorization": f"Bearer {sb.access_token(b)}"}
    assert httpx.get(f"{base}/me/profile", headers=auth).json()["emailAddress"] == b
    assert httpx.get(f"{base}/{b}/profile", headers=auth).status_code == 200
    other = httpx.get(f"{base}/{a}/profile", headers=auth)
    assert other.status_code == 403 and error_reason(other) == "forbidden"
    assert "Delegation denied" in other.json()["error"]["message"]
    unknown = httpx.get(sb.base_url + "/gmail/v1/nothing/here", headers=auth)
    assert unknown.status_code == 404 and "text/html" in unknown.headers["content-type"]


def test_token_endpoint_grants_revocation_and_reauthorization() -> None:
    with SandboxGmail(threads=5, seed=2, anchor=ANCHOR, access_token_ttl=1200) as s:
        user = s.users[0]
        info = s.credentials(user)
        assert set(info) >= {"type", "client_id", "client_secret", "refresh_token",
                             "token_uri"}
        assert info["type"] == "authorized_user" and info["token_uri"] == s.token_uri
        form = {"grant_type": "refresh_token", "client_id": info["client_id"],
                "client_secret": info["client_secret"], "refresh_token": info["refresh_token"]}
        ok = httpx.post(s.token_uri, data=form).json()
        assert ok["token_type"] == "Bearer" and ok["expires_in"] == 1200
        assert ok["scope"] == "https://www.googleapis.com/auth/gmail.readonly"
        auth = {"Authorization": f"Bearer {ok['access_token']}"}
        profile = s.base_url + "/gmail/v1/users/me/profile"
        assert httpx.get(profile, headers=auth).status_code == 200
        wrong_secret = httpx.post(s.token_uri, data={**form, "client_secret": "x"})
        assert wrong_secret.status_code == 401
        assert wrong_secret.json()["error"] == "invalid_client"
        unknown = httpx.post(s.token_uri, data={**form, "refresh_token": "1//nope"})
        assert unknown.status_code == 400 and unknown.json()["error"] == "invalid_grant"
        grant = httpx.post(s.token_uri, data={**form, "grant_type": "password"})
        assert grant.json()["error"] == "unsupported_grant_type"
        wide = httpx.post(s.token_uri, data={**form, "scope": "https://mail.google.com/"})
        assert wide.status_code == 400 and wide.json()["error"] == "invalid_scope"
        s.revoke(user)
        revoked = httpx.post(s.token_uri, data=form)
        assert revoked.status_code == 400 and revoked.json() == {
            "error": "invalid_grant", "error_description": "Token has been expired or revoked."}
        assert httpx.get(profile, headers=auth).status_code == 401  # access tokens died too
        fresh = s.reauthorize(user)
        assert fresh["refresh_token"] != info["refresh_token"]
        assert httpx.post(s.token_uri, data=form).status_code == 400  # the old one stays dead
        again = httpx.post(s.token_uri, data={**form, "refresh_token": fresh["refresh_token"]})
        assert again.status_code == 200


# ---------------------------------------------------------------- Google's client libraries
def test_google_client_discovery_offline_and_google_auth_refresh(sb: SandboxGmail) -> None:
    user = sb.users[2]
    before = sb.get_stats()["refreshes"][user]
    svc = service(sb, user)
    try:
        prof = svc.users().getProfile(userId="me").execute()
        assert prof["emailAddress"] == user
        assert sb.get_stats()["refreshes"][user] == before + 1  # google-auth refreshed once
        threads = svc.users().threads().list(userId="me", maxResults=3).execute()["threads"]
        thread = svc.users().threads().get(userId="me", id=threads[0]["id"]).execute()
        assert thread["id"] == threads[0]["id"] and thread["messages"]
        raw = svc.users().messages().get(userId="me", id=thread["messages"][0]["id"],
                                         format="raw").execute()
        assert unb64(raw["raw"]) == sb.raw_message(user, thread["messages"][0]["id"])
        history = svc.users().history().list(userId="me",
                                             startHistoryId=prof["historyId"]).execute()
        assert history == {"historyId": prof["historyId"]}
        # the access token dies server-side: 401, google-auth refreshes, the call succeeds
        statuses = sb.get_stats()["statuses"].get("401", 0)
        sb.expire_access_tokens(user)
        assert svc.users().labels().list(userId="me").execute()["labels"]
        assert sb.get_stats()["statuses"]["401"] == statuses + 1
        assert sb.get_stats()["refreshes"][user] == before + 2
        with pytest.raises(HttpError) as missing:
            svc.users().messages().get(userId="me", id="0000000000000000").execute()
        assert missing.value.status_code == 404
        assert missing.value.error_details[0]["reason"] == "notFound"
    finally:
        svc.close()


def test_from_authorized_user_info_ignores_token_uri(sb: SandboxGmail) -> None:
    """Why the provider must build Credentials itself: google-auth keeps Google's endpoint."""
    info = sb.credentials(sb.users[0])
    assert info["token_uri"] == sb.token_uri
    assert Credentials.from_authorized_user_info(info).token_uri == \
        "https://oauth2.googleapis.com/token"
    assert credentials(sb, sb.users[0]).token_uri == sb.token_uri


def test_google_client_sees_revocation_as_refresh_error() -> None:
    with SandboxGmail(threads=5, seed=4, anchor=ANCHOR) as s:
        user = s.users[0]
        svc = service(s, user)
        try:
            assert svc.users().labels().list(userId="me").execute()["labels"]
            s.revoke(user)
            with pytest.raises(google.auth.exceptions.RefreshError) as err:
                svc.users().labels().list(userId="me").execute()
            assert "invalid_grant" in str(err.value)
        finally:
            svc.close()


def test_google_client_batch_needs_batch_uri(sb: SandboxGmail) -> None:
    user = sb.users[2]
    svc = service(sb, user)
    try:
        # the trap: the service's own batch ignores api_endpoint and posts to Google, and
        # takes no batch_uri
        assert svc.new_batch_http_request()._batch_uri == "https://gmail.googleapis.com/batch"
        with pytest.raises(TypeError):
            svc.new_batch_http_request(batch_uri=sb.batch_uri)
        ids = sb.message_ids(user)[:10]
        got: dict[str, Any] = {}

        def collect(request_id: str, response: Any, exc: Exception | None) -> None:
            got[request_id] = exc if exc is not None else response

        before = sb.get_stats()
        batch = BatchHttpRequest(callback=collect, batch_uri=sb.batch_uri)
        for mid in ids:
            batch.add(svc.users().messages().get(userId="me", id=mid, format="minimal"),
                      request_id=mid)
        batch.add(svc.users().messages().get(userId="me", id="0000000000000000"),
                  request_id="missing")
        batch.execute()
        after = sb.get_stats()
        assert [got[mid]["id"] for mid in ids] == ids
        assert isinstance(got["missing"], HttpError) and got["missing"].status_code == 404
        assert after["batch_calls"] - before["batch_calls"] == 11
        units = after["units"][user].get("messages.get", 0) - \
            before["units"].get(user, {}).get("messages.get", 0)
        assert units == 11 * 5  # each inner call is charged, the 404 too
    finally:
        svc.close()


def _batch_body(calls: list[tuple[str, str | None]], boundary: str = "b0undary") -> bytes:
    parts = []
    for k, (path, auth) in enumerate(calls):
        head = f"GET {path} HTTP/1.1\r\n" + (f"Authorization: Bearer {auth}\r\n" if auth else "")
        parts.append(f"--{boundary}\r\nContent-Type: application/http\r\n"
                     f"Content-ID: <item{k}>\r\n\r\n{head}\r\n")
    return ("".join(parts) + f"--{boundary}--\r\n").encode()


def _batch_replies(resp: httpx.Response) -> list[tuple[str, int, Any]]:
    msg = email.message_from_bytes(
        f"Content-Type: {resp.headers['content-type']}\r\n\r\n".encode() + resp.content)
    out = []
    for part in msg.get_payload():
        assert isinstance(part, Message)
        text = part.get_payload()
        assert isinstance(text, str)
        status = int(text.split(" ", 2)[1])
        body = text.split("\r\n\r\n", 1)[1].strip()
        out.append((str(part["Content-ID"]), status, json.loads(body) if body else None))
    return out


def test_raw_batch_auth_fallback_limits_and_concurrency(sb: SandboxGmail) -> None:
    a, b = sb.users[0], sb.users[1]
    ta, tb = sb.access_token(a), sb.access_token(b)
    ctype = {"Content-Type": "multipart/mixed; boundary=b0undary"}
    resp = httpx.post(sb.batch_uri, content=_batch_body(
        [("/gmail/v1/users/me/profile", None), ("/gmail/v1/users/me/profile", tb)]),
        headers={**ctype, "Authorization": f"Bearer {ta}"})
    replies = _batch_replies(resp)
    assert resp.status_code == 200
    assert [r[0] for r in replies] == ["<response-item0>", "<response-item1>"]
    assert replies[0][2]["emailAddress"] == a and replies[1][2]["emailAddress"] == b
    too_many = httpx.post(sb.batch_uri, headers={**ctype, "Authorization": f"Bearer {ta}"},
                          content=_batch_body([("/gmail/v1/users/me/profile", None)] * 101))
    assert too_many.status_code == 400 and error_reason(too_many) == "invalidArgument"
    # inner calls run in parallel at Google: they share the per-user concurrency limit
    sb.set_max_concurrent(5)
    before = sb.get_stats()["units_total"].get(a, 0)
    resp = httpx.post(sb.batch_uri, headers={**ctype, "Authorization": f"Bearer {ta}"},
                      content=_batch_body([("/gmail/v1/users/me/labels", None)] * 8))
    statuses = [r[1] for r in _batch_replies(resp)]
    assert statuses == [200] * 5 + [429] * 3
    refused = _batch_replies(resp)[-1][2]["error"]
    assert refused["message"] == "Too many concurrent requests for user."
    assert sb.get_stats()["units_total"][a] - before == 5  # refusals are not charged


# ---------------------------------------------------------------- quota and concurrency
def test_quota_per_user_per_minute_refusals_not_charged(sb: SandboxGmail) -> None:
    a, b = sb.users[0], sb.users[1]
    sb.set_quota(per_minute=100, error="429")
    with client(sb, a) as c:
        before = sb.get_stats()["units_total"].get(a, 0)
        assert [c.get("/threads", params={"maxResults": 1}).status_code
                for _ in range(10)] == [200] * 10
        refused = c.get("/threads", params={"maxResults": 1})
        assert refused.status_code == 429 and error_reason(refused) == "rateLimitExceeded"
        assert refused.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
        assert "Retry-After" not in refused.headers
        assert c.get("/profile").status_code == 429  # 1 unit does not fit either
        assert sb.get_stats()["units_total"][a] - before == 100
        sb.set_quota(error="403", retry_after=True)
        refused = c.get("/labels")
        assert refused.status_code == 403 and error_reason(refused) == "userRateLimitExceeded"
        assert "Retry after" in refused.json()["error"]["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        # google-api-python-client would retry both refusals (num_retries)
        assert _should_retry_response(403, refused.content)
        assert _should_retry_response(429, b"")
        assert sb.get_stats()["refusals"][a]["quota:429"] == 2
    with client(sb, b) as c:
        assert c.get("/profile").status_code == 200  # the limit is per user
    sb.set_quota(per_minute=1_000, costs={"messages.get": 20})
    sb.reset_quota()
    with client(sb, a) as c:
        mid = sb.message_ids(a)[0]
        before = sb.get_stats()["units"][a].get("messages.get", 0)
        assert c.get(f"/messages/{mid}", params={"format": "minimal"}).status_code == 200
        assert sb.get_stats()["units"][a]["messages.get"] - before == 20
    sb.set_quota(costs={"messages.get": 5})


def test_concurrency_limit_for_direct_requests(sb: SandboxGmail) -> None:
    user = sb.users[1]
    sb.set_max_concurrent(2)
    sb.inject_fault("timeout", 2, endpoint="getProfile", user=user)
    results: list[int] = []

    def hang() -> None:
        with client(sb, user) as c:
            results.append(c.get("/profile").status_code)

    hangers = [threading.Thread(target=hang) for _ in range(2)]
    for t in hangers:
        t.start()
    while sb.gate.in_flight[user] < 2:  # both are inside the sandbox now
        threading.Event().wait(0.01)
    with client(sb, user) as c:
        refused = c.get("/labels")
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == "Too many concurrent requests for user."
    sb.release_hangs()
    for t in hangers:
        t.join(10)
    assert results == [503, 503]  # the hung calls end as backendError
    with client(sb, user) as c:
        assert c.get("/labels").status_code == 200


# ---------------------------------------------------------------- faults
def test_injected_faults(sb: SandboxGmail) -> None:
    user = sb.users[0]
    with client(sb, user) as c:
        sb.inject_fault("error_5xx", 2, endpoint="labels.list")
        first, second = c.get("/labels"), c.get("/labels")
        assert (first.status_code, second.status_code) == (500, 503)
        assert error_reason(first) == error_reason(second) == "backendError"
        sb.inject_fault("malformed", endpoint="getProfile")
        with pytest.raises(json.JSONDecodeError):
            c.get("/profile").json()
        sb.inject_fault("html_error")
        page = c.get("/profile")
        assert page.status_code == 502 and page.text.startswith("<!DOCTYPE html>")
        sb.inject_fault("unauthorized")
        assert error_reason(c.get("/profile")) == "authError"
        for kind, status, reason in [("user_rate_limit", 403, "userRateLimitExceeded"),
                                     ("daily_limit", 403, "dailyLimitExceeded"),
                                     ("project_rate_limit", 403, "rateLimitExceeded"),
                                     ("rate_limit", 429, "rateLimitExceeded")]:
            sb.inject_fault(kind)
            got = c.get("/profile")
            assert (got.status_code, error_reason(got)) == (status, reason)
        other = sb.users[1]
        sb.inject_fault("error_5xx", user=other)
        assert c.get("/profile").status_code == 200  # aimed at another user
        ctl = httpx.post(sb.base_url + "/_sandbox/faults",
                         json={"inject": [{"kind": "error_5xx", "endpoint": "labels.list"}]})
        assert ctl.status_code == 200 and c.get("/labels").status_code == 500
    stats = sb.get_stats()
    assert stats["faults"]["error_5xx"] == 3 and stats["faults"]["malformed"] == 1
    token_fault = SandboxGmail(threads=3, seed=1)
    with token_fault as s:
        s.inject_fault("error_5xx", endpoint="token")
        form = {**s.credentials(s.users[0]), "grant_type": "refresh_token"}
        assert httpx.post(s.token_uri, data=form).status_code == 500
        assert httpx.post(s.token_uri, data=form).status_code == 200


def test_metadata_scope_limits(sb: SandboxGmail) -> None:
    user = sb.users[2]
    sb.set_scope(user, METADATA)
    try:
        mid = sb.message_ids(user)[0]
        with client(sb, user) as c:
            full = c.get(f"/messages/{mid}")
            assert full.status_code == 403
            assert error_reason(full) == "insufficientPermissions"
            assert c.get(f"/messages/{mid}", params={"format": "metadata"}).status_code == 200
            q = c.get("/messages", params={"q": "in:inbox"})
            assert q.status_code == 403 and "'q'" in q.json()["error"]["message"]
            assert c.get("/messages").status_code == 200
    finally:
        sb.set_scope(user, "https://www.googleapis.com/auth/gmail.readonly")


# ---------------------------------------------------------------- mutations and history
def test_history_records_mutations_with_gaps_filters_and_paging() -> None:
    with SandboxGmail(threads=30, seed=8, anchor=ANCHOR) as s:
        user = s.users[0]
        start = s.history_id(user)
        generated = s.mailbox.message(user, s.message_ids(user)[5])
        assert generated is not None and generated.history_id < start
        old_tid = s.thread_ids(user)[-1]
        new = s.add_message(user, subject="Fresh thread", text="Hello there\n",
                            attachments=[("a.txt", "text/plain", b"attached bytes")])
        reply = s.add_message(user, thread_id=old_tid, text="A reply\n")
        labelled = s.modify_labels(user, reply["id"], add=["STARRED"], remove=["UNREAD"])
        assert s.modify_labels(user, reply["id"], add=["STARRED"])["records"] == []  # no-op
        gone = s.delete_message(user, new["id"])
        with client(s, user) as c:
            hist = c.get("/history", params={"startHistoryId": start}).json()
            kinds = [next(k for k in r if k not in ("id", "messages")) for r in hist["history"]]
            assert kinds == ["messagesAdded", "messagesAdded", "labelsAdded", "labelsRemoved",
                             "messagesDeleted"]
            ids = [int(r["id"]) for r in hist["history"]]
            assert ids == sorted(ids) and ids[-1] == gone["historyId"]
            assert hist["historyId"] == str(s.history_id(user)) == str(ids[-1])
            assert any(b - a > 1 for a, b in zip([start, *ids], ids, strict=False))
            added = hist["history"][0]["messagesAdded"][0]["message"]
            assert added == {"id": new["id"], "threadId": new["id"],
                             "labelIds": ["UNREAD", "CATEGORY_PERSONAL", "INBOX"]}
            assert hist["history"][2]["labelsAdded"][0]["labelIds"] == ["STARRED"]
            assert hist["history"][3]["labelsRemoved"][0]["labelIds"] == ["UNREAD"]
            assert labelled["records"] == ids[2:4]
            only = c.get("/history", params=[("startHistoryId", start),
                                             ("historyTypes", "labelAdded"),
                                             ("historyTypes", "messageDeleted")]).json()
            assert [int(r["id"]) for r in only["history"]] == [ids[2], ids[4]]
            starred = c.get("/history", params={"startHistoryId": start,
                                                "labelId": "STARRED"}).json()
            assert [int(r["id"]) for r in starred["history"]] == [ids[2], ids[3]]
            page = c.get("/history", params={"startHistoryId": start, "maxResults": 2}).json()
            rest = c.get("/history", params={"startHistoryId": start,
                                             "pageToken": page["nextPageToken"]}).json()
            assert [r["id"] for r in page["history"] + rest["history"]] == \
                [str(i) for i in ids]
            from_generated = c.get("/history", params={"startHistoryId": generated.history_id})
            assert from_generated.status_code == 200
            assert c.get("/history").status_code == 400
            future = c.get("/history", params={"startHistoryId": s.history_id(user) + 10})
            assert future.status_code == 404
            # the mailbox reflects the changes
            top = c.get("/threads", params={"maxResults": 1}).json()["threads"][0]
            assert top["id"] == old_tid  # the reply made it the newest thread
            assert c.get(f"/messages/{new['id']}").status_code == 404
            got = c.get(f"/messages/{reply['id']}").json()
            assert "STARRED" in got["labelIds"] and "UNREAD" not in got["labelIds"]
            assert got["historyId"] == str(ids[3])
            # expiry: an old start id answers 404, a current one still works
            s.expire_history(user)
            expired = c.get("/history", params={"startHistoryId": start})
            assert expired.status_code == 404 and error_reason(expired) == "notFound"
            assert c.get("/history", params={"startHistoryId": s.history_id(user)}
                         ).status_code == 200


def test_history_retention_by_count_and_age() -> None:
    with SandboxGmail(threads=10, seed=9, anchor=ANCHOR, history_max_records=3) as s:
        user = s.users[0]
        start = s.history_id(user)
        made = [s.add_message(user, subject=f"m{i}")["historyId"] for i in range(5)]
        with client(s, user) as c:
            assert c.get("/history", params={"startHistoryId": start}).status_code == 404
            assert c.get("/history", params={"startHistoryId": made[0]}).status_code == 404
            kept = c.get("/history", params={"startHistoryId": made[1]}).json()["history"]
            assert [int(r["id"]) for r in kept] == made[2:]
            s.set_history_retention(max_records=None, max_age=0)
            assert c.get("/history", params={"startHistoryId": made[1]}).status_code == 404
            assert c.get("/history", params={"startHistoryId": made[-1]}).status_code == 200


def test_control_api_mutations_and_config() -> None:
    with SandboxGmail(threads=10, seed=10, anchor=ANCHOR) as s:
        user = s.users[0]
        ctl = s.base_url + "/_sandbox"
        users = httpx.get(ctl + "/users").json()
        assert [u["email"] for u in users] == s.users
        assert users[0]["credentials"]["refresh_token"] == s.credentials(user)["refresh_token"]
        added = httpx.post(f"{ctl}/users/{user}/messages",
                           json={"subject": "via control", "generated": [["big.bin",
                                 "application/octet-stream", 300_000]]}).json()
        labelled = httpx.post(f"{ctl}/users/{user}/messages/{added['id']}/labels",
                              json={"add": ["Label_1"]}).json()
        assert "Label_1" in labelled["labelIds"]
        with client(s, user) as c:
            msg = c.get(f"/messages/{added['id']}").json()
            big = next(p for p in walk(msg["payload"]) if p["filename"] == "big.bin")
            assert big["body"]["size"] == 300_000
            data = c.get(f"/messages/{added['id']}/attachments/"
                         f"{big['body']['attachmentId']}").json()["data"]
            assert len(unb64(data)) == 300_000
        deleted = httpx.delete(f"{ctl}/users/{user}/messages/{added['id']}").json()
        assert deleted["id"] == added["id"]
        floor = httpx.post(f"{ctl}/users/{user}/history/expire", json={}).json()["floor"]
        assert floor == str(s.history_id(user))
        cfg = httpx.post(ctl + "/config", json={"quota_per_minute": 6000, "max_concurrent": 3,
                                                "method_costs": {"threads.get": 40},
                                                "push": {"min_interval": 2.0}}).json()
        assert cfg["quota_per_minute"] == 6000 and cfg["max_concurrent"] == 3
        assert cfg["method_costs"]["threads.get"] == 40 and cfg["push"]["min_interval"] == 2.0
        assert httpx.post(f"{ctl}/users/nobody@example.com/revoke").status_code == 404
        assert httpx.post(f"{ctl}/users/{user}/revoke").json() == {"revoked": True}
        form = {**s.credentials(user), "grant_type": "refresh_token"}
        assert httpx.post(s.token_uri, data=form).json()["error"] == "invalid_grant"
        stats = httpx.get(ctl + "/stats").json()
        assert stats["requests"]["messages.get"] == 1 and stats["requests"]["token"] == 1


# ---------------------------------------------------------------- watch and push
@pytest.fixture
def pushed() -> Iterator[tuple[SandboxGmail, Receiver]]:
    rec = Receiver()
    with SandboxGmail(threads=20, seed=12, anchor=ANCHOR, push_endpoint=rec.url,
                      push_auth="oidc", push_audience="https://nova.example/gmail/push",
                      push_min_interval=0.2, push_retry_delays=(0.05, 0.05)) as s:
        yield s, rec
    rec.close()


def _decode(envelope: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(envelope["message"]["data"])))


def test_push_notification_with_verifiable_oidc_jwt(pushed: tuple[SandboxGmail, Receiver],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s, rec = pushed
    user = s.users[0]
    svc = service(s, user)
    try:
        watch = svc.users().watch(userId="me", body={"topicName": TOPIC,
                                                     "labelIds": ["INBOX"]}).execute()
    finally:
        svc.close()
    assert watch["historyId"] == str(s.history_id(user)) and watch["expiration"].isdigit()
    added = s.add_message(user, subject="push me")
    s.wait_push()
    ((path, headers, _),) = rec.received
    (envelope,) = rec.envelopes()
    assert path == "/push"  # no ?token= under OIDC
    assert envelope["subscription"] == "projects/nova-sandbox/subscriptions/gmail-push"
    msg = envelope["message"]
    assert msg["messageId"] == msg["message_id"] and msg["publishTime"].endswith("Z")
    data = _decode(envelope)
    assert data["emailAddress"] == user and int(data["historyId"]) == added["historyId"]
    token = headers["authorization"].removeprefix("Bearer ")
    request = google.auth.transport.requests.Request()
    claims = id_token.verify_token(token, request, audience="https://nova.example/gmail/push",
                                   certs_url=s.certs_url)
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["email"] == "gmail-push@nova-sandbox.iam.gserviceaccount.com"
    assert claims["email_verified"] is True and claims["exp"] > claims["iat"]
    # verify_oauth2_token has no certs_url argument: point its module constant at the sandbox
    monkeypatch.setattr(id_token, "_GOOGLE_OAUTH2_CERTS_URL", s.certs_url)
    assert id_token.verify_oauth2_token(token, request,
                                        "https://nova.example/gmail/push")["sub"]
    with pytest.raises(ValueError):
        id_token.verify_token(token, request, audience="https://someone.else/",
                              certs_url=s.certs_url)
    head, body, sig = token.split(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    with pytest.raises(ValueError):
        id_token.verify_token(f"{head}.{forged}.{sig}", request, certs_url=s.certs_url)
    kid = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
    assert [k["kid"] for k in httpx.get(s.jwks_url).json()["keys"]] == [kid]


def test_push_coalesces_filters_drops_and_retries(pushed: tuple[SandboxGmail, Receiver],
                                                  ) -> None:
    s, rec = pushed
    user = s.users[0]
    with client(s, user) as c:
        assert c.post("/watch", json={"topicName": TOPIC, "labelIds": ["INBOX"]}
                      ).status_code == 200
        bad = c.post("/watch", json={"topicName": "projects/other/topics/gmail"})
        assert bad.status_code == 400 and "projects/nova-sandbox" in bad.text
    s.hold_push()
    last = [s.add_message(user, subject=f"burst {i}")["historyId"] for i in range(5)][-1]
    s.release_push()
    s.wait_push()
    assert [int(_decode(e)["historyId"]) for e in rec.envelopes()] == [last]  # one, coalesced
    # a change the watch's label filter does not want sends nothing
    outside = [mid for mid in s.message_ids(user)
               if "INBOX" not in s.message_json(user, mid, "minimal").get("labelIds", [])]
    s.modify_labels(user, outside[0], add=["STARRED"])
    s.wait_push()
    assert len(rec.received) == 1
    # drops: forced, then by share
    s.drop_next_push()
    s.add_message(user, subject="dropped")
    s.wait_push()
    assert len(rec.received) == 1 and s.push_log[-1]["outcome"] == "dropped"
    # retries: 503 then 200, same messageId, a fresh JWT each attempt
    rec.statuses = [503]
    s.add_message(user, subject="retried")
    s.wait_push()
    first, second = rec.envelopes()[-2:]
    assert first["message"]["messageId"] == second["message"]["messageId"]
    assert [e["outcome"] for e in s.push_log[-2:]] == ["retrying", "delivered"]
    # consecutive notifications of a user are at least min_interval apart
    published = {e["message"]["messageId"]: datetime.fromisoformat(
        e["message"]["publishTime"].replace("Z", "+00:00")) for e in rec.envelopes()}
    times = sorted(published.values())
    assert len(times) == 2 and (times[1] - times[0]).total_seconds() >= 0.19
    # stop ends the watch
    with client(s, user) as c:
        assert c.post("/stop").status_code == 204
    s.add_message(user, subject="unwatched")
    s.wait_push()
    assert len(rec.received) == 3


def test_push_token_auth_and_history_id_as_number_or_string() -> None:
    rec = Receiver()
    try:
        with SandboxGmail(threads=5, seed=13, anchor=ANCHOR, push_endpoint=rec.url,
                          push_auth="token", push_token="s3cret", push_number_share=1.0,
                          push_min_interval=0.0) as s:
            user = s.users[0]
            with client(s, user) as c:
                assert c.post("/watch", json={"topicName": TOPIC}).status_code == 200
            s.add_message(user)
            s.wait_push()
            s.set_push(number_share=0.0)
            s.add_message(user)
            s.wait_push()
        (p1, h1, _), (p2, _, _) = rec.received
        assert p1 == p2 == "/push?token=s3cret" and "authorization" not in h1
        first, second = (_decode(e)["historyId"] for e in rec.envelopes())
        assert isinstance(first, int) and isinstance(second, str)
    finally:
        rec.close()


def test_push_excess_drop_mode_and_expired_watch() -> None:
    rec = Receiver()
    try:
        with SandboxGmail(threads=5, seed=14, anchor=ANCHOR, push_endpoint=rec.url,
                          push_excess="drop", push_min_interval=60.0) as s:
            user = s.users[0]
            with client(s, user) as c:
                assert c.post("/watch", json={"topicName": TOPIC}).status_code == 200
            s.add_message(user)
            s.wait_push()
            s.add_message(user)  # within the minute: dropped, as the push guide words it
            s.wait_push()
            assert len(rec.received) == 1
            assert s.push_log[-1]["outcome"] == "dropped_rate"
            s.set_push(watch_ttl=-1.0)
            with client(s, user) as c:
                expiration = c.post("/watch", json={"topicName": TOPIC}).json()["expiration"]
            assert int(expiration) < datetime.now().timestamp() * 1000
            s.set_push(min_interval=0.0)
            s.add_message(user)
            s.wait_push()
            assert len(rec.received) == 1  # an expired watch sends nothing
    finally:
        rec.close()


# ---------------------------------------------------------------- async use and CLI
async def test_async_context_manager() -> None:
    async with SandboxGmail(threads=5, seed=15, anchor=ANCHOR) as s:
        auth = {"Authorization": f"Bearer {s.access_token(s.users[0])}"}
        async with httpx.AsyncClient(base_url=s.base_url) as c:
            r = await c.get("/gmail/v1/users/me/profile", headers=auth)
        assert r.json()["threadsTotal"] == 5


def test_cli_prints_endpoint_and_credentials_and_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-m", "nova.sandbox.gmail", "--port", "0",
                           "--threads", "12", "--seed", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        try:
            assert proc.stdout is not None
            endpoint = proc.stdout.readline().strip().split("=", 1)
            token_uri = proc.stdout.readline().strip().split("=", 1)[1]
            batch_uri = proc.stdout.readline().strip().split("=", 1)[1]
            lines = [proc.stdout.readline().split(" ", 3) for _ in range(3)]
            assert endpoint[0] == "GMAIL_API_ENDPOINT"
            assert token_uri == endpoint[1] + "/token"
            assert batch_uri == endpoint[1] + "/batch/gmail/v1"
            assert [ln[1] for ln in lines] == SandboxGmail(seed=4).users
            assert lines[0][2] == "threads=12"
            info = json.loads(lines[0][3])
            form = {**info, "grant_type": "refresh_token"}
            token = httpx.post(token_uri, data=form).json()["access_token"]
            prof = httpx.get(endpoint[1] + "/gmail/v1/users/me/profile",
                             headers={"Authorization": f"Bearer {token}"}).json()
            assert prof["emailAddress"] == lines[0][1] and prof["threadsTotal"] == 12
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
