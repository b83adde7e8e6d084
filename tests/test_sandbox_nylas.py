"""The Nylas v3 sandbox over real loopback HTTP: shapes, paging, auth, faults, webhooks, CLI."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pypdf
import pytest

from nova.sandbox.nylas import SandboxNylas
from nova.sandbox.nylas.blobs import make_pdf
from nova.sandbox.nylas.mailbox import Mailbox

KEY = "test-key"
SECRET = "whsec-test"
ANCHOR = 1_750_000_000
AUTH = {"Authorization": f"Bearer {KEY}"}


class Receiver:
    """A real HTTP webhook endpoint recording (headers, raw body) of every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxNylas]:
    with SandboxNylas(threads=150, seed=11, api_key=KEY, anchor=ANCHOR, hang_seconds=5) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sb" in request.fixturenames:
        s = request.getfixturevalue("sb")
        s.clear_faults()
        s.set_rate_limit(None)


@pytest.fixture
def hooks() -> Iterator[tuple[SandboxNylas, Receiver]]:
    rec = Receiver()
    with SandboxNylas(threads=20, seed=3, api_key=KEY, webhook_url=rec.url,
                      webhook_secret=SECRET) as s:
        yield s, rec
    rec.close()


def get(sb: SandboxNylas, path: str, **params: Any) -> httpx.Response:
    return httpx.get(sb.base_url + path, params=params, headers=AUTH, timeout=10)


def strip_ids(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != "request_id"}


# ---------------------------------------------------------------- generation
def test_same_seed_same_mailbox_and_different_seed_differs() -> None:
    a = Mailbox(seed=42, threads=300, anchor=ANCHOR)
    b = Mailbox(seed=42, threads=300, anchor=ANCHOR)
    c = Mailbox(seed=43, threads=300, anchor=ANCHOR)
    assert a.grant_ids == b.grant_ids != c.grant_ids
    ga, gb = a.grant_ids[0], b.grant_ids[0]
    ta, _ = a.list_threads(ga, limit=200)
    tb, _ = b.list_threads(gb, limit=200)
    assert [t.to_json(ga) for t in ta] == [t.to_json(gb) for t in tb]
    mid = next(m.id for t in ta for m in t.messages if m.attachments)
    att = a.message(ga, mid).attachments[0]
    assert att.data == b.message(gb, mid).attachments[0].data


def test_mailbox_shape_is_realistic() -> None:
    mb = Mailbox(seed=1, threads=2000, anchor=ANCHOR)
    gid = mb.grant_ids[0]
    assert len(mb.grant_ids) == 3
    assert [mb.grants[g].n_threads for g in mb.grant_ids] == [2000, 200, 200]
    threads, _ = mb.list_threads(gid, limit=200)
    all_threads = []
    cursor = None
    while True:
        page, cursor = mb.list_threads(gid, limit=200, cursor=cursor)
        all_threads += page
        if cursor is None:
            break
    counts = [len(t.messages) for t in all_threads]
    assert 0.35 < counts.count(1) / len(counts) < 0.55
    assert max(counts) >= 12 and max(counts) <= 20
    dates = [t.latest_ts for t in all_threads]
    assert dates == sorted(dates, reverse=True)
    assert ANCHOR - 366 * 86400 < min(dates) and max(dates) <= ANCHOR
    msgs = [m for t in all_threads for m in t.messages]
    kinds = {a.content_type for m in msgs for a in m.attachments}
    assert {"application/pdf", "text/plain", "image/png", "application/octet-stream"} <= kinds
    assert any("SENT" in m.folders for m in msgs) and any(m.unread for m in msgs)
    assert all(m.from_[0]["name"] and "@" in m.from_[0]["email"] for m in msgs)


def test_hand_built_pdf_text_extracts_with_pypdf() -> None:
    lines = ["Quarterly report (draft)", "Revenue: 1,000 EUR"] + [f"row {i}" for i in range(70)]
    reader = pypdf.PdfReader(io.BytesIO(make_pdf(lines)), strict=True)
    text = "\n".join(p.extract_text() for p in reader.pages)
    assert len(reader.pages) == 2
    assert "Quarterly report (draft)" in text and "row 69" in text


def test_ten_thousand_thread_mailbox_serves_full_pages() -> None:
    # How fast it starts is printed by benchmarks/bench_provider_paging.py, not asserted here.
    with SandboxNylas(threads=10_000, seed=5, api_key=KEY) as big:
        r = get(big, f"/v3/grants/{big.grant_ids[0]}/threads", limit=200)
    assert r.status_code == 200 and len(r.json()["data"]) == 200
    assert r.json()["next_cursor"]


# ---------------------------------------------------------------- API shapes
def test_thread_and_message_shapes(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    body = get(sb, f"/v3/grants/{gid}/threads", limit=3).json()
    assert set(body) == {"request_id", "data", "next_cursor"}
    thread = body["data"][0]
    for key in ("id", "grant_id", "subject", "snippet", "participants", "message_ids",
                "draft_ids", "folders", "has_attachments", "unread", "starred",
                "earliest_message_date", "latest_message_received_date",
                "latest_message_sent_date", "latest_draft_or_message"):
        assert key in thread
    assert thread["object"] == "thread" and thread["grant_id"] == gid
    one = get(sb, f"/v3/grants/{gid}/threads/{thread['id']}").json()["data"]
    assert strip_ids(one) == strip_ids(thread)
    msgs = get(sb, f"/v3/grants/{gid}/messages", thread_id=thread["id"]).json()["data"]
    assert {m["id"] for m in msgs} == set(thread["message_ids"])
    msg = msgs[0]
    for key in ("id", "grant_id", "thread_id", "subject", "from", "to", "cc", "bcc",
                "reply_to", "date", "snippet", "body", "folders", "unread", "starred",
                "attachments", "created_at"):
        assert key in msg
    assert msg["object"] == "message" and "headers" not in msg
    full = get(sb, f"/v3/grants/{gid}/messages/{msg['id']}", fields="include_headers").json()
    names = {h["name"] for h in full["data"]["headers"]}
    assert {"Message-ID", "Subject", "From"} <= names
    grant = get(sb, f"/v3/grants/{gid}").json()["data"]
    assert grant["id"] == gid and grant["grant_status"] == "valid" and "@" in grant["email"]


def test_paging_is_newest_first_stable_and_ends(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    first = get(sb, f"/v3/grants/{gid}/threads", limit=40).json()
    again = get(sb, f"/v3/grants/{gid}/threads", limit=40).json()
    assert first["next_cursor"] == again["next_cursor"]
    seen, token, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 40}
        if token:
            params["page_token"] = token
        body = get(sb, f"/v3/grants/{gid}/threads", **params).json()
        seen += body["data"]
        pages += 1
        token = body.get("next_cursor")
        if not token:
            assert "next_cursor" not in body
            break
    assert pages == 4 and len(seen) == 150 == len({t["id"] for t in seen})
    dates = [t["latest_message_received_date"] for t in seen]
    assert dates == sorted(dates, reverse=True)


def test_date_window_and_flag_filters(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    every = [sb.thread_json(gid, t) for t in sb.thread_ids(gid)]
    lo, hi = every[100]["latest_message_received_date"], every[20]["latest_message_received_date"]
    got = get(sb, f"/v3/grants/{gid}/threads", limit=200, latest_message_after=lo,
              latest_message_before=hi).json()["data"]
    assert [t["id"] for t in got] == [t["id"] for t in every[21:101]]
    alias = get(sb, f"/v3/grants/{gid}/threads", limit=200, received_after=lo,
                received_before=hi).json()["data"]
    assert [t["id"] for t in alias] == [t["id"] for t in got]
    unread = get(sb, f"/v3/grants/{gid}/threads", limit=200, unread="true").json()["data"]
    assert unread and all(t["unread"] for t in unread)
    assert len(unread) == sum(t["unread"] for t in every)
    sent = get(sb, f"/v3/grants/{gid}/messages", limit=200, **{"in": "SENT"}).json()["data"]
    assert sent and all("SENT" in m["folders"] for m in sent)


def test_attachment_metadata_and_download(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    found = None
    for tid in sb.thread_ids(gid):
        for mid in sb.thread_json(gid, tid)["message_ids"]:
            for att in sb.message_json(gid, mid)["attachments"]:
                if att["content_type"] == "application/pdf":
                    found = (mid, att)
    assert found is not None
    mid, att = found
    meta = get(sb, f"/v3/grants/{gid}/attachments/{att['id']}", message_id=mid).json()["data"]
    assert meta == att and meta["grant_id"] == gid
    r = get(sb, f"/v3/grants/{gid}/attachments/{att['id']}/download", message_id=mid)
    # bytes only: the name and the real type are in the metadata, not in the download
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert "content-disposition" not in r.headers
    assert len(r.content) == att["size"] == int(r.headers["content-length"])
    text = pypdf.PdfReader(io.BytesIO(r.content)).pages[0].extract_text()
    assert text.startswith("INVOICE ")
    missing = get(sb, f"/v3/grants/{gid}/attachments/nope/download", message_id=mid)
    assert missing.status_code == 404


# ---------------------------------------------------------------- errors
def assert_error(r: httpx.Response, status: int, type_: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"request_id", "error"} and body["request_id"]
    assert body["error"]["type"] == type_ and body["error"]["message"]


def test_auth_and_not_found_errors(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    url = f"{sb.base_url}/v3/grants/{gid}/threads"
    assert_error(httpx.get(url), 401, "api.authentication_error")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401,
                 "api.authentication_error")
    assert_error(get(sb, "/v3/grants/no-such-grant/threads"), 404, "grant.not_found")
    assert_error(get(sb, f"/v3/grants/{gid}/threads/ffffffffffffffff"), 404,
                 "api.not_found_error")
    assert_error(get(sb, f"/v3/grants/{gid}/messages/nope"), 404, "api.not_found_error")
    assert_error(get(sb, f"/v3/grants/{gid}/threads", limit=500), 400,
                 "api.invalid_request_error")
    assert_error(get(sb, f"/v3/grants/{gid}/threads", page_token="garbage!"), 400,
                 "api.invalid_request_error")
    assert_error(get(sb, f"/v3/grants/{gid}/attachments/x"), 400, "api.invalid_request_error")


def test_nylas_rate_limit_answers_429_without_retry_after(sb: SandboxNylas) -> None:
    gid, other = sb.grant_ids[0], sb.grant_ids[1]
    sb.set_rate_limit(3)
    codes = [get(sb, f"/v3/grants/{gid}/threads", limit=1) for _ in range(6)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and [r.status_code for r in codes[:3]] == [200, 200, 200]
    assert_error(limited[0], 429, "nylas_rate_limit_exceeded")
    assert "retry-after" not in limited[0].headers
    assert "provider_error" not in limited[0].json()["error"]
    assert get(sb, f"/v3/grants/{other}/threads", limit=1).status_code == 200  # per grant


def test_injected_faults_over_control_api(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    ctl = httpx.post(f"{sb.base_url}/_sandbox/faults", json={"inject": [
        {"kind": "error_5xx", "count": 1, "endpoint": "list_threads"},
        {"kind": "malformed", "count": 1, "endpoint": "list_threads"},
        {"kind": "html_error", "count": 1, "endpoint": "list_threads"}]})
    assert ctl.status_code == 200
    r1 = get(sb, f"/v3/grants/{gid}/threads")
    assert_error(r1, 500, "api.internal_error")
    r2 = get(sb, f"/v3/grants/{gid}/threads")
    assert r2.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r2.json()
    r3 = get(sb, f"/v3/grants/{gid}/threads")
    assert r3.status_code == 502 and r3.headers["content-type"].startswith("text/html")
    assert get(sb, f"/v3/grants/{gid}/threads").status_code == 200
    stats = httpx.get(f"{sb.base_url}/_sandbox/stats").json()
    assert stats["faults"]["error_5xx"] >= 1 and stats["faults"]["malformed"] >= 1


def test_timeout_fault_hangs_past_client_timeout(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    sb.inject_fault("timeout", endpoint="get_grant")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{sb.base_url}/v3/grants/{gid}", headers=AUTH, timeout=0.3)


def test_random_fault_rates_hit_roughly_the_share(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[1]
    sb.set_fault_rates(error_5xx=0.5)
    codes = [get(sb, f"/v3/grants/{gid}").status_code for _ in range(60)]
    assert 10 < sum(c >= 500 for c in codes) < 50
    assert {c for c in codes if c >= 500} <= {500, 503, 504}


def test_stats_count_endpoints_and_pages(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[2]
    httpx.post(f"{sb.base_url}/_sandbox/stats/reset")
    body = get(sb, f"/v3/grants/{gid}/threads", limit=10).json()
    get(sb, f"/v3/grants/{gid}/threads", limit=10, page_token=body["next_cursor"])
    get(sb, f"/v3/grants/{gid}/threads/{body['data'][0]['id']}")
    stats = httpx.get(f"{sb.base_url}/_sandbox/stats").json()
    assert stats["requests"] == {"list_threads": 2, "get_thread": 1}
    assert stats["thread_pages"][gid] == {"<first>": 1, body["next_cursor"]: 1}
    assert stats == sb.get_stats()


def test_expired_and_deleted_grants() -> None:
    with SandboxNylas(threads=10, seed=9, api_key=KEY) as s:
        gid, gone = s.grant_ids[0], s.grant_ids[1]
        assert httpx.post(f"{s.base_url}/_sandbox/grants/{gid}/expire").status_code == 200
        assert_error(get(s, f"/v3/grants/{gid}/threads"), 401, "grant.refresh_token_invalid")
        assert get(s, f"/v3/grants/{gid}").json()["data"]["grant_status"] == "invalid"
        s.revive_grant(gid)
        assert get(s, f"/v3/grants/{gid}/threads").status_code == 200
        assert httpx.delete(f"{s.base_url}/_sandbox/grants/{gone}").status_code == 200
        assert_error(get(s, f"/v3/grants/{gone}"), 404, "grant.not_found")


# ---------------------------------------------------------------- mutations and webhooks
def verify(headers: dict[str, str], body: bytes) -> None:
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-nylas-signature"] == expected


def test_mutations_send_signed_webhooks(hooks: tuple[SandboxNylas, Receiver]) -> None:
    s, rec = hooks
    gid = s.grant_ids[0]
    tid = s.thread_ids(gid)[5]
    created = s.add_message(gid, subject="Brand new", body="<p>hello</p>")
    reply = s.add_message(gid, thread_id=tid)
    s.update_message(gid, reply.message["id"], unread=False, starred=True, folders=["Archive"])
    s.delete_message(gid, created.message["id"])
    s.expire_grant(gid)
    s.delete_grant(s.grant_ids[1])
    s.wait_webhooks()
    for headers, body in rec.received:
        verify(headers, body)
    got = rec.payloads()
    # an ordinary reply is message.created alone (thread.replied needs reply tracking)
    assert [p["type"] for p in got] == ["message.created", "message.created",
                                        "message.updated", "message.deleted", "grant.expired",
                                        "grant.deleted"]
    for p in got:
        assert p["specversion"] == "1.0" and p["webhook_delivery_attempt"] == 1
        assert isinstance(p["time"], int) and p["id"]
        assert p["data"]["application_id"] == s.application_id
    assert len({p["id"] for p in got}) == len(got)
    new = got[0]["data"]["object"]
    assert got[0]["source"] == "/google/emails/realtime"
    assert new["object"] == "message" and new["subject"] == "Brand new"
    assert new["body"] == "<p>hello</p>" and new["grant_id"] == gid
    assert got[1]["data"]["object"]["thread_id"] == tid
    assert got[1]["data"]["object"]["id"] == reply.message["id"]
    updated = got[2]["data"]["object"]
    assert updated["starred"] is True and updated["folders"] == ["Archive"]
    assert got[3]["data"]["object"] == {"grant_id": gid, "id": created.message["id"],
                                        "object": "message"}
    assert got[4]["source"] == "/nylas/system"
    assert got[4]["data"]["object"]["grant_id"] == gid
    assert got[4]["data"]["object"]["code"] == 25009
    assert got[5]["data"]["object"]["code"] == 25013
    # the API reflects the mutations
    assert get(s, f"/v3/grants/{gid}/threads").status_code == 401  # expired now
    s.revive_grant(gid)
    top = get(s, f"/v3/grants/{gid}/threads", limit=2).json()["data"]
    assert top[0]["id"] == tid  # the reply made it the newest thread
    assert get(s, f"/v3/grants/{gid}/messages/{created.message['id']}").status_code == 404


def test_truncated_variant_drops_body(hooks: tuple[SandboxNylas, Receiver]) -> None:
    s, rec = hooks
    gid = s.grant_ids[0]
    s.add_message(gid, body="x" * 1_100_000)
    s.wait_webhooks()
    (payload,) = rec.payloads()
    assert payload["type"] == "message.created.truncated"
    assert "body" not in payload["data"]["object"] and payload["data"]["object"]["id"]
    verify(*rec.received[0])


def test_duplicate_and_out_of_order_delivery(hooks: tuple[SandboxNylas, Receiver]) -> None:
    s, rec = hooks
    gid = s.grant_ids[0]
    s.add_message(gid, duplicate=True)
    s.wait_webhooks()
    first, second = rec.received
    assert first == second  # same id, same bytes, same signature
    rec.received.clear()
    s.hold_webhooks()
    built = [s.add_message(gid, subject=f"n{i}").notifications[0] for i in range(3)]
    s.wait_webhooks()
    assert rec.received == []  # held
    httpx.post(f"{s.base_url}/_sandbox/webhooks/release", json={"order": "reverse"})
    s.wait_webhooks()
    assert [p["id"] for p in rec.payloads()] == [n.id for n in reversed(built)]


def test_payloads_can_be_built_without_sending(hooks: tuple[SandboxNylas, Receiver]) -> None:
    s, rec = hooks
    gid = s.grant_ids[0]
    m = s.update_message(gid, s.thread_json(gid, s.thread_ids(gid)[0])["message_ids"][0],
                         unread=True, send=False)
    s.wait_webhooks()
    assert rec.received == []
    (note,) = m.notifications
    verify({"x-nylas-signature": note.signature}, note.body)
    assert json.loads(note.body) == note.payload and note.type == "message.updated"
    httpx.post(rec.url, content=note.body, headers=note.headers)  # the test posts it itself
    verify(*rec.received[0])
    ctl = httpx.post(f"{s.base_url}/_sandbox/grants/{gid}/messages",
                     json={"subject": "via control", "send": False}).json()
    assert ctl["notifications"][0]["type"] == "message.created"
    assert ctl["message"]["subject"] == "via control"


def test_latency_knob_and_added_attachments_round_trip() -> None:
    pdf = make_pdf(["Added by a test"])
    with SandboxNylas(threads=5, seed=6, api_key=KEY, latency_ms=150) as s:
        gid = s.grant_ids[0]
        started = time.perf_counter()
        assert get(s, f"/v3/grants/{gid}").status_code == 200
        assert time.perf_counter() - started >= 0.15
        s.set_latency(0)
        m = s.add_message(gid, body="<p>see <b>attached</b></p>", send=False,
                          attachments=[("added.pdf", "application/pdf", pdf)]).message
        assert m is not None and m["snippet"] == "see attached"
        (att,) = m["attachments"]
        r = get(s, f"/v3/grants/{gid}/attachments/{att['id']}/download", message_id=m["id"])
        assert r.content == pdf and att["size"] == len(pdf)
        thread = get(s, f"/v3/grants/{gid}/threads", limit=1).json()["data"][0]
        assert thread["id"] == m["thread_id"] and thread["has_attachments"] is True


# ---------------------------------------------------------------- CLI
def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "nova.sandbox.nylas", "--port", "0", "--threads", "30",
         "--seed", "4", "--api-key", KEY, "--rate-limit", "100"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        run_cli(proc)


def run_cli(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip().split("=", 1)[1]
        grants = [proc.stdout.readline().split()[1] for _ in range(3)]
        assert grants == Mailbox(seed=4, threads=30).grant_ids
        for _ in range(100):
            try:
                r = httpx.get(f"{base}/v3/grants/{grants[0]}/threads", headers=AUTH)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert r.status_code == 200 and len(r.json()["data"]) == 30
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
