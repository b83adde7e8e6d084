"""The sandbox follows the documented Nylas v3 behaviour, harshly, over real loopback HTTP.

Each test names the behaviour; the doc pages are cited in the sandbox modules
(nova/sandbox/nylas/webhooks.py, errors.py, app.py, mailbox.py, generate.py).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from servers import ServerThread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nova.sandbox.nylas import FAULT_KINDS, SandboxNylas
from nova.sandbox.nylas.clean import html_to_markdown
from nova.sandbox.nylas.generate import LONG_NAME, NFC_NAME, NFD_NAME
from nova.sandbox.nylas.mailbox import Mailbox

KEY = "docs-key"
SECRET = "docs-secret"
ANCHOR = 1_750_000_000
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = (0.2, 0.4)


# ---------------------------------------------------------------- a scripted webhook endpoint
class Hook:
    """A real HTTP endpoint: records every POST and answers what ``script`` says.

    ``script(payload, attempt)`` returns a status code, or ``("hang", seconds)`` to answer
    only after that long (past the sandbox's webhook timeout).
    """

    def __init__(self, script: Callable[[dict[str, Any], int], Any] | None = None) -> None:
        self.script = script or (lambda payload, attempt: 200)
        self.received: list[tuple[dict[str, str], bytes, dict[str, Any]]] = []
        self.lock = threading.Lock()

        async def post(request: Request) -> Response:
            raw = await request.body()
            headers = {k.lower(): v for k, v in request.headers.items()}
            plain = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
            payload = json.loads(plain)
            with self.lock:
                self.received.append((headers, raw, payload))
            answer = self.script(payload, payload["webhook_delivery_attempt"])
            if isinstance(answer, tuple):
                await asyncio.sleep(answer[1])
                return Response(status_code=200)
            return Response(status_code=answer)

        self.server = ServerThread(Starlette(routes=[Route("/hook", post, methods=["POST"])]),
                                   lifespan="off")
        self.url = self.server.url + "/hook"

    def payloads(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p for _, _, p in self.received]

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.payloads()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.payloads())} POSTs, wanted {count}")
            time.sleep(0.01)
        return self.payloads()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    with h.server:
        yield h


def sandbox(hook: Hook | None = None, **kw: Any) -> SandboxNylas:
    kw.setdefault("threads", 30)
    kw.setdefault("seed", 5)
    return SandboxNylas(api_key=KEY, webhook_secret=SECRET, anchor=ANCHOR,
                        webhook_url=hook.url if hook else None, **kw)


def get(sb: SandboxNylas, path: str, **params: Any) -> httpx.Response:
    return httpx.get(sb.base_url + path, params=params, headers=AUTH, timeout=10)


def thread_of(sb: SandboxNylas, gid: str, tid: str) -> dict[str, Any]:
    t = sb.thread_json(gid, tid)
    assert t is not None
    return t


def message_of(sb: SandboxNylas, gid: str, mid: str) -> dict[str, Any]:
    m = sb.message_json(gid, mid)
    assert m is not None
    return m


def signed(headers: dict[str, str], raw: bytes) -> bool:
    expected = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return headers["x-nylas-signature"] == expected


# ---------------------------------------------------------------- 1. thread.replied is tracking
def test_ordinary_reply_is_message_created_alone_and_tracked_reply_adds_thread_replied(
        hook: Hook) -> None:
    with sandbox(hook) as sb:
        gid = sb.grant_ids[0]
        tid = sb.thread_ids(gid)[3]
        plain = sb.add_message(gid, thread_id=tid)
        tracked = sb.add_message(gid, thread_id=tid, tracked=True)
        fresh = sb.add_message(gid, tracked=True)  # a new thread: nothing was replied to
        sb.wait_webhooks()
    assert [n.type for n in plain.notifications] == ["message.created"]
    assert [n.type for n in tracked.notifications] == ["message.created", "thread.replied"]
    assert [n.type for n in fresh.notifications] == ["message.created"]
    replied = [p for p in hook.payloads() if p["type"] == "thread.replied"]
    assert tracked.message is not None
    assert len(replied) == 1 and replied[0]["source"] == "/com/nylas/tracking"
    assert replied[0]["data"]["object"]["message_id"] == tracked.message["id"]
    assert replied[0]["data"]["object"]["thread_id"] == tid


# ---------------------------------------------------------------- 2. delivery and retries
@pytest.mark.parametrize("code", [408, 429, 502, 503, 504, 507])
def test_retryable_answers_are_retried_with_a_re_signed_attempt_number(code: int) -> None:
    hook = Hook(lambda payload, attempt: code if attempt == 1 else 200)
    with hook.server, sandbox(hook, webhook_retry_delays=FAST) as sb:
        note = sb.add_message(sb.grant_ids[0], subject="retry me").notifications[0]
        sb.wait_webhooks()
        log = sb.webhook_log
    first, second = hook.received
    assert [p["webhook_delivery_attempt"] for _, _, p in hook.received] == [1, 2]
    assert first[2]["id"] == second[2]["id"] == note.id
    assert first[1] != second[1]  # the body carries the attempt, so it differs ...
    assert signed(first[0], first[1]) and signed(second[0], second[1])  # ... and is re-signed
    assert {k: v for k, v in first[2].items() if k != "webhook_delivery_attempt"} == \
        {k: v for k, v in second[2].items() if k != "webhook_delivery_attempt"}
    assert [(e["id"], e["attempt"], e["status"], e["outcome"]) for e in log] == [
        (note.id, 1, code, "retrying"), (note.id, 2, 200, "delivered")]


@pytest.mark.parametrize("code", [500, 400, 401, 413, 404])
def test_other_failures_are_not_retried_the_notification_is_gone(code: int) -> None:
    hook = Hook(lambda payload, attempt: code)
    with hook.server, sandbox(hook, webhook_retry_delays=FAST) as sb:
        sb.add_message(sb.grant_ids[0])
        sb.wait_webhooks()
        log = sb.webhook_log
    assert len(hook.received) == 1
    assert [(e["attempt"], e["status"], e["outcome"]) for e in log] == [(1, code, "dropped")]


def test_three_attempts_in_all_then_nylas_gives_up() -> None:
    hook = Hook(lambda payload, attempt: 503)
    with hook.server, sandbox(hook, webhook_retry_delays=FAST) as sb:
        sb.add_message(sb.grant_ids[0])
        sb.wait_webhooks()
        log = sb.webhook_log
    assert [p["webhook_delivery_attempt"] for p in hook.payloads()] == [1, 2, 3]
    assert [e["outcome"] for e in log] == ["retrying", "retrying", "exhausted"]
    assert [e.get("retry_in") for e in log] == [0.2, 0.4, None]


def test_connection_errors_are_retried_and_logged() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    with sandbox(webhook_retry_delays=FAST) as sb:
        sb.outbox.url = dead
        note = sb.add_message(sb.grant_ids[0]).notifications[0]
        sb.wait_webhooks()
        log = sb.webhook_log
    assert [(e["id"], e["attempt"]) for e in log] == [(note.id, 1), (note.id, 2), (note.id, 3)]
    assert all("error" in e and "status" not in e for e in log)
    assert log[-1]["outcome"] == "exhausted"


def test_an_endpoint_slower_than_the_timeout_gets_a_retry() -> None:
    hook = Hook(lambda payload, attempt: ("hang", 2.0) if attempt == 1 else 200)
    with hook.server, sandbox(hook, webhook_retry_delays=FAST, webhook_timeout=0.3) as sb:
        sb.add_message(sb.grant_ids[0])
        sb.wait_webhooks()
        log = sb.webhook_log
    assert [e["attempt"] for e in log] == [1, 2]
    assert "Timeout" in log[0]["error"] and log[1]["outcome"] == "delivered"


def test_a_waiting_retry_does_not_hold_back_later_notifications() -> None:
    hook = Hook(lambda p, attempt: 503 if p["data"]["object"]["subject"] == "A" else 200)
    # an hour before A's second attempt: B must get through long before that
    with hook.server, sandbox(hook, webhook_retry_delays=(3600.0, 3600.0)) as sb:
        gid = sb.grant_ids[0]
        a = sb.add_message(gid, subject="A").notifications[0]
        b = sb.add_message(gid, subject="B").notifications[0]
        got = hook.wait_for(2)
        log = sb.webhook_log
        with pytest.raises(TimeoutError):  # A's retry is still scheduled
            sb.wait_webhooks(timeout=0.2)
    assert [p["id"] for p in got] == [a.id, b.id]
    assert [(e["id"], e["outcome"]) for e in log] == [(a.id, "retrying"), (b.id, "delivered")]


def test_every_post_carries_its_attempt_and_the_log_has_one_entry_per_attempt(
        hook: Hook) -> None:
    with sandbox(hook) as sb:
        gid = sb.grant_ids[0]
        sb.add_message(gid, duplicate=True)
        sb.expire_grant(gid)
        sb.wait_webhooks()
        log = sb.webhook_log
    assert [p["webhook_delivery_attempt"] for p in hook.payloads()] == [1, 1, 1]
    assert [(e["type"], e["attempt"], e["status"]) for e in log] == [
        ("message.created", 1, 200), ("message.created", 1, 200), ("grant.expired", 1, 200)]


# ---------------------------------------------------------------- 3. gzip delivery
def test_gzip_delivery_signs_the_compressed_bytes() -> None:
    hook = Hook(lambda payload, attempt: 502 if attempt == 1 else 200)
    with hook.server, sandbox(hook, webhook_gzip=True, webhook_retry_delays=FAST) as sb:
        note = sb.add_message(sb.grant_ids[0], body="<p>" + "zip " * 2000 + "</p>")\
            .notifications[0]
        sb.wait_webhooks()
    assert len(hook.received) == 2
    for headers, raw, payload in hook.received:
        assert headers["content-encoding"] == "gzip" and raw[:2] == b"\x1f\x8b"
        assert signed(headers, raw)  # over the gzip bytes ...
        expected = hmac.new(SECRET.encode(), gzip.decompress(raw), hashlib.sha256).hexdigest()
        assert headers["x-nylas-signature"] != expected  # ... not over the JSON inside
        assert payload["id"] == note.id and len(raw) < len(gzip.decompress(raw))
    assert [p["webhook_delivery_attempt"] for _, _, p in hook.received] == [1, 2]
    body, headers = note.encode(2, gzipped=True)
    assert json.loads(gzip.decompress(body))["webhook_delivery_attempt"] == 2
    assert headers["X-Nylas-Signature"] == hmac.new(SECRET.encode(), body,
                                                    hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- 4. two kinds of 429
def error_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 429, r.text[:300]
    body = r.json()
    assert set(body) == {"request_id", "error"}
    return body["error"]  # type: ignore[no-any-return]


def burst(sb: SandboxNylas, gid: str, n: int = 12) -> list[httpx.Response]:
    return [r for r in (get(sb, f"/v3/grants/{gid}") for _ in range(n)) if r.status_code == 429]


def test_provider_limit_is_rate_limit_error_with_provider_error() -> None:
    with sandbox(rate_limit=2, rate_limit_kind="provider", retry_after_share=1.0) as sb:
        google, microsoft = sb.grant_ids[0], sb.grant_ids[1]
        g429, m429 = burst(sb, google), burst(sb, microsoft)
        sb.set_rate_limit(2, retry_after_share=0.0)
        bare = burst(sb, sb.grant_ids[2])
    assert g429 and m429 and bare
    for r in g429 + m429:
        err = error_of(r)
        assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    assert error_of(g429[0])["provider_error"]["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert error_of(m429[0])["provider_error"]["error"]["code"] == "ApplicationThrottled"
    assert all("retry-after" not in r.headers for r in bare)
    assert all(error_of(r)["type"] == "rate_limit_error" for r in bare)


def test_provider_retry_after_comes_only_sometimes() -> None:
    with sandbox(rate_limit=1, rate_limit_kind="provider", retry_after_share=0.5) as sb:
        limited = burst(sb, sb.grant_ids[0], 60)
    with_header = sum("retry-after" in r.headers for r in limited)
    assert len(limited) >= 20 and 0 < with_header < len(limited)


def test_forced_rate_limit_faults_model_both_layers() -> None:
    assert {"rate_limit", "nylas_rate_limit", "provider_rate_limit"} <= set(FAULT_KINDS)
    with sandbox(retry_after=7) as sb:
        gid = sb.grant_ids[0]
        sb.inject_fault("rate_limit", endpoint="get_grant")
        forced = get(sb, f"/v3/grants/{gid}")
        sb.inject_fault("nylas_rate_limit", endpoint="get_grant")
        ours = get(sb, f"/v3/grants/{gid}")
        sb.inject_fault("provider_rate_limit", endpoint="get_grant")
        theirs = get(sb, f"/v3/grants/{gid}")
    assert error_of(forced)["type"] == "rate_limit_error" and forced.headers["retry-after"] == "7"
    assert "provider_error" in error_of(forced)
    assert error_of(ours) == {"type": "nylas_rate_limit_exceeded",
                              "message": error_of(ours)["message"]}
    assert "retry-after" not in ours.headers
    assert error_of(theirs)["type"] == "rate_limit_error" and "retry-after" not in theirs.headers


def test_rate_limit_kind_over_the_control_api() -> None:
    with sandbox() as sb:
        ctl = httpx.post(f"{sb.base_url}/_sandbox/config", json={
            "rate_limit": 1, "rate_limit_kind": "provider", "retry_after_share": 1.0}).json()
        limited = burst(sb, sb.grant_ids[0], 5)
        bad = httpx.post(f"{sb.base_url}/_sandbox/config", json={"rate_limit_kind": "both"})
    assert ctl["rate_limit_kind"] == "provider" and ctl["retry_after_share"] == 1.0
    assert limited and error_of(limited[0])["type"] == "rate_limit_error"
    assert bad.status_code == 400


# ---------------------------------------------------------------- 5. attachments
def all_attachments(sb: SandboxNylas, gid: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for tid in sb.thread_ids(gid):
        for mid in thread_of(sb, gid, tid)["message_ids"]:
            out += [(mid, a) for a in message_of(sb, gid, mid)["attachments"]]
    return out


def test_download_is_octet_stream_without_a_name_and_charsets_are_real() -> None:
    with sandbox(threads=400, seed=8) as sb:
        gid = sb.grant_ids[0]
        atts = all_attachments(sb, gid)
        types = {a["content_type"] for _, a in atts}
        latin = [(m, a) for m, a in atts if a["content_type"] == 'text/plain; charset="ISO-8859-1"']
        assert latin and 'image/png; name="image.png"' in types and "image/png" in types
        mid, att = latin[0]
        meta = get(sb, f"/v3/grants/{gid}/attachments/{att['id']}", message_id=mid).json()
        r = get(sb, f"/v3/grants/{gid}/attachments/{att['id']}/download", message_id=mid)
    assert meta["data"]["filename"] == "notes.txt"
    assert meta["data"]["content_type"] == 'text/plain; charset="ISO-8859-1"'
    assert r.headers["content-type"] == "application/octet-stream"
    assert "content-disposition" not in r.headers and "notes" not in str(r.headers)
    with pytest.raises(UnicodeDecodeError):
        r.content.decode("utf-8")
    assert any(w in r.content.decode("latin-1") for w in ("Grüße", "café", "Zürich", "señor",
                                                           "naïve", "Åsa", "façade", "Ñandú",
                                                           "Øresund", "crème brûlée"))


# ---------------------------------------------------------------- 6. grants
def test_reauthentication_and_updates_emit_grant_updated(hook: Hook) -> None:
    with sandbox(hook) as sb:
        gid = sb.grant_ids[0]
        sb.expire_grant(gid)
        revived = sb.revive_grant(gid)
        updated = sb.update_grant(gid)
        ctl = httpx.post(f"{sb.base_url}/_sandbox/grants/{gid}/revive").json()
        ctl_update = httpx.post(f"{sb.base_url}/_sandbox/grants/{gid}/update").json()
        sb.wait_webhooks()
        status = get(sb, f"/v3/grants/{gid}").json()["data"]["grant_status"]
    got = hook.payloads()
    assert [p["type"] for p in got] == ["grant.expired"] + ["grant.updated"] * 4
    reauth, plain = got[1], got[2]
    assert reauth["id"] == revived.notifications[0].id and reauth["source"] == "/nylas/system"
    assert reauth["data"]["object"]["code"] == 25027
    assert reauth["data"]["object"]["reauthentication_flag"] is True
    assert plain["id"] == updated.notifications[0].id
    assert plain["data"]["object"]["code"] == 25014
    assert plain["data"]["object"]["reauthentication_flag"] is False
    for p in got:
        assert isinstance(p["time"], int) and abs(p["time"] - time.time()) < 600
        assert {"grant_id", "integration_id", "provider", "email", "code"} <= \
            set(p["data"]["object"])
    assert ctl["notifications"][0]["data"]["object"]["code"] == 25027
    assert ctl_update["notifications"][0]["data"]["object"]["code"] == 25014
    assert status == "valid" and revived.grant is not None


# ---------------------------------------------------------------- 7. message variants
def created(sb: SandboxNylas, **kw: Any) -> dict[str, Any]:
    note = sb.add_message(sb.grant_ids[kw.pop("grant", 0)], send=False, **kw).notifications[0]
    assert json.loads(note.body) == note.payload
    return note.payload


def test_transformed_keeps_only_the_selected_fields() -> None:
    with sandbox(message_variant="transformed") as sb:
        default = created(sb)
        sb.set_message_variant("transformed", ["subject", "body"])
        chosen = created(sb, body="<p>short</p>")
        updated = sb.update_message(sb.grant_ids[0], chosen["data"]["object"]["id"],
                                    unread=False, send=False).notifications[0].payload
    assert default["type"] == "message.created.transformed"
    assert set(default["data"]["object"]) == {"id", "grant_id", "object", "thread_id",
                                              "subject", "from", "date", "unread"}
    assert chosen["type"] == "message.created.transformed"
    assert set(chosen["data"]["object"]) == {"id", "grant_id", "object", "subject", "body"}
    assert updated["type"] == "message.updated.transformed"
    assert set(updated["data"]["object"]) == {"id", "grant_id", "object", "subject", "body"}


def test_transformed_and_truncated_combine_in_the_documented_order() -> None:
    with sandbox(message_variant="transformed", transformed_fields=["body"],
                 truncate_at=5_000) as sb:
        small = created(sb, body="<p>tiny</p>")
        big = created(sb, body="<p>" + "x" * 6_000 + "</p>")
    assert small["type"] == "message.created.transformed"
    assert big["type"] == "message.created.transformed.truncated"
    assert set(big["data"]["object"]) == {"id", "grant_id", "object"}


def test_metadata_variant_has_headers_but_no_body_snippet_or_attachments() -> None:
    with sandbox(message_variant="metadata") as sb:
        google = created(sb, body="<p>secret body</p>",
                         attachments=[("a.txt", "text/plain", b"x")])
        microsoft = created(sb, grant=1)
        upd = sb.update_message(sb.grant_ids[0], google["data"]["object"]["id"], starred=True,
                                send=False).notifications[0].payload
    obj = google["data"]["object"]
    assert google["type"] == "message.created.metadata"
    assert not {"body", "snippet", "attachments"} & set(obj)
    assert {h["name"] for h in obj["headers"]} >= {"Message-ID", "Subject"}
    assert obj["subject"] and obj["from"] and obj["thread_id"]
    assert upd["type"] == "message.updated.metadata" and "body" not in upd["data"]["object"]
    assert microsoft["type"] == "message.created"  # gmail.metadata is a Google scope
    assert "body" in microsoft["data"]["object"] and "headers" not in microsoft["data"]["object"]


def test_cleaned_variant_carries_markdown_and_falls_back_to_html() -> None:
    html = ("<div><p>Hi <b>Ann</b>,</p><script>alert(1)</script><p>See the <a href='x'>plan</a>"
            " &amp; notes.</p><blockquote>old quoted text</blockquote><p>Best,<br>Bo</p></div>")
    with sandbox(message_variant="cleaned", truncate_at=50_000) as sb:
        clean = created(sb, body=html)
        broken = created(sb, body="<div>" * 50_000)
        upd = sb.update_message(sb.grant_ids[0], clean["data"]["object"]["id"], unread=False,
                                send=False).notifications[0].payload
    obj = clean["data"]["object"]
    assert clean["type"] == "message.created.cleaned" and obj["cleaning_status"] == "success"
    assert "<" not in obj["body"] and "alert" not in obj["body"] and "quoted" not in obj["body"]
    assert "Hi **Ann**," in obj["body"] and "See the plan & notes." in obj["body"]
    assert "Best," not in obj["body"]
    assert broken["type"] == "message.created.cleaned.truncated"
    assert broken["data"]["object"]["cleaning_status"] == "failed"
    assert "body" not in broken["data"]["object"]
    assert upd["type"] == "message.updated"  # the docs define .cleaned for message.created
    assert upd["data"]["object"]["body"] == html


def test_html_to_markdown_of_generated_bodies() -> None:
    mb = Mailbox(seed=3, threads=20, anchor=ANCHOR)
    threads, _ = mb.list_threads(mb.grant_ids[0], limit=20)
    for t in threads:
        for m in t.messages:
            md = html_to_markdown(m.body)
            assert md is not None and "<" not in md and md.startswith("Hi ")
    assert html_to_markdown("<div>" * 1_000) is None  # too many unclosed elements


def test_variant_over_the_control_api_and_bad_variant_refused() -> None:
    with sandbox() as sb:
        ok = httpx.post(f"{sb.base_url}/_sandbox/config",
                        json={"message_variant": "metadata"}).json()
        note = created(sb)
        bad = httpx.post(f"{sb.base_url}/_sandbox/config", json={"message_variant": "raw"})
    assert ok["message_variant"] == "metadata" and note["type"] == "message.created.metadata"
    assert bad.status_code == 400


# ---------------------------------------------------------------- 8. hostile mail
def test_hostile_share_is_exact_deterministic_and_leaves_other_threads_alone() -> None:
    plain = Mailbox(seed=4, threads=80, anchor=ANCHOR)
    a = Mailbox(seed=4, threads=80, anchor=ANCHOR, hostile=0.25)
    b = Mailbox(seed=4, threads=80, anchor=ANCHOR, hostile=0.25)
    gid = a.grant_ids[0]
    hostile = a.hostile_threads(gid)
    assert len(hostile) == 20 and hostile == b.hostile_threads(gid)
    assert plain.hostile_threads(gid) == {}
    for tid in plain.list_threads(gid, limit=200)[0]:
        mine, twin, base = a.thread(gid, tid.id), b.thread(gid, tid.id), plain.thread(gid, tid.id)
        assert mine is not None and twin is not None and base is not None
        assert mine.to_json(gid) == twin.to_json(gid)
        assert (mine.to_json(gid) == base.to_json(gid)) is (tid.id not in hostile)
    kinds = {k for ks in hostile.values() for k in ks}
    assert kinds == {"nul", "control_chars", "rtl_override", "nul_filename", "broken_charset",
                     "lone_surrogate", "path_traversal", "reserved_names", "unicode_names",
                     "degenerate_names", "huge_body"}
    with pytest.raises(ValueError):
        Mailbox(seed=4, threads=10, hostile=1.5)


def test_hostile_threads_serialise_over_http_with_escaped_surrogates() -> None:
    with sandbox(threads=40, hostile=0.3) as sb:
        gid = sb.grant_ids[0]
        hostile = sb.hostile_threads(gid)
        assert httpx.get(f"{sb.base_url}/_sandbox/grants/{gid}/hostile").json() == hostile
        listed = get(sb, f"/v3/grants/{gid}/threads", limit=200)
        assert listed.status_code == 200 and len(listed.json()["data"]) == 40
        names: list[str] = []
        seen: dict[str, bool] = {"nul_subject": False, "surrogate": False, "huge": False,
                                 "nul_header": False, "nul_name": False, "rtl": False}
        for tid, kinds in hostile.items():
            r = get(sb, f"/v3/grants/{gid}/threads/{tid}")
            assert r.status_code == 200
            thread = r.json()["data"]
            seen["nul_subject"] |= "\x00" in thread["subject"]
            seen["surrogate"] |= ("lone_surrogate" in kinds
                                  and b"\\ud800" in r.content and "\ud800" in thread["subject"])
            for mid in thread["message_ids"]:
                m = get(sb, f"/v3/grants/{gid}/messages/{mid}", fields="include_headers")
                assert m.status_code == 200
                msg = m.json()["data"]
                assert "\x00" in msg["snippet"] and "\x00" in msg["body"] or \
                    msg["body"].startswith("<div><div>")
                seen["huge"] |= len(msg["body"]) >= 300_000 and "</div>" not in msg["body"]
                seen["nul_header"] |= any("\x00" in h["value"] for h in msg["headers"])
                seen["nul_name"] |= "\x00" in msg["from"][0]["name"]
                seen["rtl"] |= "\u202e" in msg["subject"]
                names += [a["filename"] for a in msg["attachments"]]
    assert all(seen.values()), seen
    for name in ("../../etc/passwd", "..\\..\\boot.ini", "/abs/path.pdf", "CON", "NUL.txt",
                 ".hidden", "", "...", LONG_NAME, NFC_NAME, NFD_NAME):
        assert name in names, name
    assert NFC_NAME != NFD_NAME == unicodedata.normalize("NFD", NFC_NAME)
    assert len(LONG_NAME.encode()) > 300
    assert any("\x00" in n for n in names)


def test_hostile_attachment_bytes_really_have_broken_charsets() -> None:
    with sandbox(threads=40, hostile=0.3) as sb:
        gid = sb.grant_ids[0]
        broken = []
        for tid in sb.hostile_threads(gid):
            for mid in thread_of(sb, gid, tid)["message_ids"]:
                for att in message_of(sb, gid, mid)["attachments"]:
                    if "\x00" in att["filename"] and att["filename"].startswith("notes"):
                        r = get(sb, f"/v3/grants/{gid}/attachments/{att['id']}/download",
                                message_id=mid)
                        assert r.status_code == 200 and len(r.content) == att["size"]
                        broken.append((att["content_type"], r.content))
    by_type = dict(broken)
    with pytest.raises(UnicodeDecodeError):
        by_type['text/plain; charset="utf-8"'].decode("utf-8")
    with pytest.raises(LookupError):
        by_type['text/plain; charset="x-sandbox-nonexistent"'].decode("x-sandbox-nonexistent")
    with pytest.raises(UnicodeDecodeError):
        by_type['text/plain; charset="utf-16"'].decode("utf-16")


def test_webhooks_carry_hostile_strings_escaped(hook: Hook) -> None:
    evil = "bad\x00\ud800\u202e"
    with sandbox(hook, message_variant="cleaned") as sb:
        note = sb.add_message(sb.grant_ids[0], subject=evil, body=f"<p>{evil}</p>")\
            .notifications[0]
        sb.wait_webhooks()
    (headers, raw, payload), = hook.received
    assert b"\\u0000" in raw and b"\\ud800" in raw and signed(headers, raw)
    assert payload["data"]["object"]["subject"] == evil and payload["id"] == note.id


# ---------------------------------------------------------------- 9. expiring page tokens
def assert_expired(r: httpx.Response) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "api.invalid_request_error" and "page_token" in err["message"]


def test_expire_cursors_invalidates_every_issued_token() -> None:
    with sandbox(threads=60) as sb:
        gid = sb.grant_ids[0]
        threads_token = get(sb, f"/v3/grants/{gid}/threads", limit=10).json()["next_cursor"]
        msgs_token = get(sb, f"/v3/grants/{gid}/messages", limit=10).json()["next_cursor"]
        assert get(sb, f"/v3/grants/{gid}/threads", limit=10,
                   page_token=threads_token).status_code == 200
        sb.expire_cursors()
        assert_expired(get(sb, f"/v3/grants/{gid}/threads", limit=10, page_token=threads_token))
        assert_expired(get(sb, f"/v3/grants/{gid}/messages", limit=10, page_token=msgs_token))
        fresh = get(sb, f"/v3/grants/{gid}/threads", limit=10).json()["next_cursor"]
        assert fresh != threads_token
        page2 = get(sb, f"/v3/grants/{gid}/threads", limit=10, page_token=fresh)
        assert page2.status_code == 200 and len(page2.json()["data"]) == 10
        assert httpx.post(f"{sb.base_url}/_sandbox/cursors/expire").status_code == 200
        assert_expired(get(sb, f"/v3/grants/{gid}/threads", limit=10, page_token=fresh))


def test_cursor_ttl_expires_old_tokens_and_unknown_ones() -> None:
    with sandbox(threads=60, cursor_ttl_seconds=60.0) as sb:
        gid = sb.grant_ids[0]
        token = get(sb, f"/v3/grants/{gid}/threads", limit=10).json()["next_cursor"]
        assert get(sb, f"/v3/grants/{gid}/threads", limit=10,
                   page_token=token).status_code == 200
        # a well-formed token this sandbox never issued (e.g. from before a restart)
        other = Mailbox(seed=5, threads=60, anchor=ANCHOR)
        _, foreign = other.list_threads(other.grant_ids[0], limit=17)
        assert foreign is not None
        assert_expired(get(sb, f"/v3/grants/{gid}/threads", page_token=foreign))
        ctl = httpx.post(f"{sb.base_url}/_sandbox/config", json={"cursor_ttl_seconds": 0.05})
        assert ctl.json()["cursor_ttl_seconds"] == 0.05
        time.sleep(0.2)  # older than its lifetime
        assert_expired(get(sb, f"/v3/grants/{gid}/threads", limit=10, page_token=token))
        sb.set_cursor_ttl(None)
        assert get(sb, f"/v3/grants/{gid}/threads", limit=10,
                   page_token=token).status_code == 200
        assert_expired(get(sb, f"/v3/grants/{gid}/threads", page_token="garbage!"))


# ---------------------------------------------------------------- 10. replies during discovery
def test_reply_to_random_threads_moves_far_threads_to_page_one(hook: Hook) -> None:
    with sandbox(hook, threads=120) as sb:
        gid = sb.grant_ids[0]
        before = sb.thread_ids(gid)
        picked = sb.reply_to_random_threads(gid, 5, older_than_rank=50, seed=9)
        sb.wait_webhooks()
        top = [t["id"] for t in get(sb, f"/v3/grants/{gid}/threads", limit=5).json()["data"]]
        again = httpx.post(f"{sb.base_url}/_sandbox/grants/{gid}/replies",
                           json={"n": 2, "older_than_rank": 100}).json()["thread_ids"]
        with pytest.raises(ValueError):
            sb.reply_to_random_threads(gid, 200, older_than_rank=10)
    assert len(set(picked)) == 5 and all(before.index(t) >= 50 for t in picked)
    assert top == picked[::-1]  # the last reply is the newest
    got = hook.payloads()
    assert [p["type"] for p in got] == ["message.created"] * 7  # untracked: no thread.replied
    assert [p["data"]["object"]["thread_id"] for p in got[:5]] == picked
    assert len(again) == 2
    twin = sandbox(threads=120)
    with twin:
        assert twin.reply_to_random_threads(twin.grant_ids[0], 5, older_than_rank=50,
                                            seed=9) == picked


# ---------------------------------------------------------------- 11. control API
def test_config_reports_every_knob() -> None:
    with sandbox(hostile=0.1, webhook_gzip=True, webhook_retry_delays=FAST) as sb:
        cfg = httpx.get(f"{sb.base_url}/_sandbox/config").json()
        new = httpx.post(f"{sb.base_url}/_sandbox/config", json={
            "webhook_gzip": False, "webhook_retry_delays": [1, 2], "retry_after": 3}).json()
    assert cfg["hostile"] == 0.1 and cfg["webhook_gzip"] is True
    assert cfg["webhook_retry_delays"] == [0.2, 0.4] and cfg["rate_limit_kind"] == "nylas"
    assert cfg["message_variant"] is None and cfg["cursor_ttl_seconds"] is None
    assert new["webhook_gzip"] is False and new["webhook_retry_delays"] == [1.0, 2.0]
    assert new["retry_after"] == 3 and sb.forced_retry_after == 3


def test_defaults_model_nylas_real_retry_schedule() -> None:
    sb = SandboxNylas(threads=5)
    delays = sb.outbox.retry_delays
    assert len(delays) == 2 and 600 <= sum(delays) <= 1200  # last attempt 10-20 min after
    assert sb.outbox.timeout == 10.0 and sb.outbox.gzipped is False
    assert sb.limiter.kind == "nylas" and sb.webhooks.message_variant is None
