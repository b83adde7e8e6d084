"""NylasProvider against the sandbox over real loopback HTTP (no patching of the client), and
against the official `nylas` SDK: the grant it reads and the trigger names Nova routes."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pypdf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nylas import Client as NylasClient
from nylas.models.errors import NylasApiError
from nylas.models.webhooks import WebhookTriggers

from nova.providers import (
    AttachmentStream,
    GrantNotFound,
    InvalidApiKey,
    MailProvider,
    NotFound,
    Permanent,
    ProviderError,
    RateLimited,
    Transient,
    Unauthorized,
)
from nova.providers.nylas import NylasProvider, error_from_response, parse_retry_after
from nova.providers.nylas_webhooks import parse_notification, verify_signature
from nova.sandbox.nylas import SandboxNylas
from nova.webhooks import CHANGES, HANDLED

KEY = "provider-key"
SDK_TRIGGERS = frozenset(t.value for t in WebhookTriggers)


@pytest.fixture(scope="module")
def sb() -> Iterator[SandboxNylas]:
    with SandboxNylas(threads=230, seed=21, api_key=KEY, hang_seconds=5) as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(sb: SandboxNylas) -> Iterator[None]:
    yield
    sb.clear_faults()
    sb.set_rate_limit(None)


@pytest.fixture
async def nylas(sb: SandboxNylas) -> AsyncIterator[NylasProvider]:
    provider = NylasProvider(KEY, sb.base_url, timeout=2.0)
    yield provider
    await provider.aclose()


def find_attachment(sb: SandboxNylas, gid: str, content_type: str) -> tuple[str, dict]:
    for tid in sb.thread_ids(gid):
        for mid in sb.thread_json(gid, tid)["message_ids"]:
            for att in sb.message_json(gid, mid)["attachments"]:
                if att["content_type"] == content_type:
                    return mid, att
    raise AssertionError(f"no {content_type} attachment")


# ---------------------------------------------------------------- every method
async def test_provider_satisfies_protocol(nylas: NylasProvider) -> None:
    assert isinstance(nylas, MailProvider)


async def test_threads_messages_and_grant(sb: SandboxNylas, nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    page = await nylas.list_threads_page(gid, limit=10)
    assert len(page.items) == 10 and page.next_page_token
    thread = page.items[0]
    raw = sb.thread_json(gid, thread.id)
    assert thread.raw == raw and thread.subject == raw["subject"]
    assert thread.latest_message_received_date == datetime.fromtimestamp(
        raw["latest_message_received_date"], UTC)
    assert thread.latest_message is not None and thread.latest_message.id == raw["message_ids"][-1]
    assert {p.email for p in thread.participants} == {p["email"] for p in raw["participants"]}
    again = await nylas.get_thread(gid, thread.id)
    assert again == thread
    long_tid = next(t for t in sb.thread_ids(gid) if len(sb.thread_json(gid, t)["message_ids"]) > 3)
    msgs = [m async for m in nylas.list_thread_messages(gid, long_tid)]
    assert sorted(m.id for m in msgs) == sorted(sb.thread_json(gid, long_tid)["message_ids"])
    msg = await nylas.get_message(gid, msgs[0].id)
    assert msg.headers is None and msg.body and msg.date and msg.date.tzinfo is UTC
    assert msg.from_ and msg.from_[0].name and "@" in msg.from_[0].email
    with_headers = await nylas.get_message(gid, msgs[0].id, include_headers=True)
    index = int(msgs[0].id[16:18], 16)
    assert with_headers.header("message-id") == f"<{long_tid}.{index}@sandbox.nylas>"
    grant = await nylas.get_grant(gid)
    assert grant.id == gid and grant.is_valid and grant.email == sb.mailbox.grants[gid].email


async def test_attachment_metadata_and_pdf_download(sb: SandboxNylas,
                                                    nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    mid, att = find_attachment(sb, gid, "application/pdf")
    meta = await nylas.get_attachment(gid, att["id"], mid)
    assert (meta.filename, meta.size, meta.content_type) == (
        att["filename"], att["size"], "application/pdf")
    buf = bytearray()
    async with nylas.download_attachment(gid, att["id"], mid) as stream:
        assert isinstance(stream, AttachmentStream)
        # Nylas answers application/octet-stream with no file name: the metadata has them.
        assert stream.filename is None and stream.size == att["size"]
        assert stream.content_type == "application/octet-stream"
        async for chunk in stream:
            buf += chunk
    assert bytes(buf) == sb.attachment_bytes(gid, att["id"], mid)
    text = pypdf.PdfReader(io.BytesIO(bytes(buf))).pages[0].extract_text()
    assert text.startswith("INVOICE ")


async def test_large_download_streams_in_chunks(sb: SandboxNylas, nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    mid, att = find_attachment(sb, gid, "application/octet-stream")
    sizes: list[int] = []
    expected = sb.attachment_bytes(gid, att["id"], mid)
    pos = 0
    async with nylas.download_attachment(gid, att["id"], mid) as stream:
        async for chunk in stream:
            assert chunk == expected[pos : pos + len(chunk)]
            pos += len(chunk)
            sizes.append(len(chunk))
    assert pos == att["size"] > 100_000 and len(sizes) > 2 and max(sizes) <= 64 * 1024


# ---------------------------------------------------------------- paging and windows
async def test_paging_sees_every_thread_exactly_once(sb: SandboxNylas,
                                                     nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    sb.reset_stats()
    seen: list[str] = []
    token, pages = None, 0
    while True:
        page = await nylas.list_threads_page(gid, page_token=token, limit=50)
        seen += [t.id for t in page.items]
        pages += 1
        if page.is_last:
            break
        token = page.next_page_token
    assert seen == sb.thread_ids(gid) and len(set(seen)) == 230 and pages == 5
    per_page = sb.get_stats()["thread_pages"][gid]
    assert len(per_page) == 5 and set(per_page.values()) == {1}


async def test_received_window(sb: SandboxNylas, nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    every = [sb.thread_json(gid, t) for t in sb.thread_ids(gid)]
    after = datetime.fromtimestamp(every[150]["latest_message_received_date"], UTC)
    before = datetime.fromtimestamp(every[30]["latest_message_received_date"], UTC)
    page = await nylas.list_threads_page(gid, limit=200, received_after=after,
                                         received_before=before)
    assert [t.id for t in page.items] == [t["id"] for t in every[31:151]]
    assert all(after <= t.latest_message_received_date < before for t in page.items)
    newer = await nylas.list_threads_page(gid, limit=200, received_after=before)
    assert [t.id for t in newer.items] == [t["id"] for t in every[:31]]
    msgs = await nylas.list_messages_page(gid, limit=200, received_after=after - timedelta(days=1),
                                          received_before=after)
    assert msgs.items and all(after - timedelta(days=1) <= m.date < after for m in msgs.items)


# ---------------------------------------------------------------- error mapping
async def test_rate_limits_of_nylas_and_of_the_provider(sb: SandboxNylas,
                                                       nylas: NylasProvider) -> None:
    gid = sb.grant_ids[1]
    sb.set_rate_limit(2)  # Nylas's own limit: no Retry-After
    with pytest.raises(RateLimited) as err:
        for _ in range(10):
            await nylas.list_threads_page(gid, limit=1)
    assert err.value.retry_after is None
    assert err.value.status == 429 and err.value.error_type == "nylas_rate_limit_exceeded"
    sb.set_rate_limit(2, kind="provider", retry_after_share=1.0)  # relayed, with Retry-After
    with pytest.raises(RateLimited) as err:
        for _ in range(10):
            await nylas.list_threads_page(gid, limit=1)
    assert err.value.retry_after is not None and err.value.retry_after >= 1
    assert err.value.error_type == "rate_limit_error"


@pytest.mark.parametrize(("kind", "status"), [("error_5xx", 500), ("html_error", 502),
                                              ("malformed", 200)])
async def test_faults_are_transient(sb: SandboxNylas, nylas: NylasProvider, kind: str,
                                    status: int) -> None:
    gid = sb.grant_ids[0]
    sb.inject_fault(kind, endpoint="list_threads")
    with pytest.raises(Transient) as err:
        await nylas.list_threads_page(gid)
    assert err.value.status == status
    assert (await nylas.list_threads_page(gid, limit=1)).items  # next request fine


async def test_timeout_is_transient(sb: SandboxNylas) -> None:
    sb.inject_fault("timeout", endpoint="get_message")
    gid = sb.grant_ids[0]
    mid = sb.thread_json(gid, sb.thread_ids(gid)[0])["message_ids"][0]
    async with NylasProvider(KEY, sb.base_url, timeout=0.3) as fast:
        with pytest.raises(Transient, match="timeout"):
            await fast.get_message(gid, mid)


async def test_forced_429_on_download_and_transient_on_download(
        sb: SandboxNylas, nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    mid, att = find_attachment(sb, gid, "application/pdf")
    sb.inject_fault("rate_limit", endpoint="download_attachment")
    with pytest.raises(RateLimited) as err:
        async with nylas.download_attachment(gid, att["id"], mid):
            pass
    assert err.value.retry_after == 1
    sb.inject_fault("error_5xx", endpoint="download_attachment")
    with pytest.raises(Transient):
        async with nylas.download_attachment(gid, att["id"], mid):
            pass
    with pytest.raises(NotFound):
        async with nylas.download_attachment(gid, "missing", mid):
            pass


async def test_optional_transient_retry(sb: SandboxNylas) -> None:
    gid = sb.grant_ids[0]
    sb.inject_fault("error_5xx", count=2, endpoint="get_thread")
    tid = sb.thread_ids(gid)[0]
    async with NylasProvider(KEY, sb.base_url, transient_retries=2, retry_backoff=0.01) as p:
        assert (await p.get_thread(gid, tid)).id == tid
    assert sb.get_stats()["faults"]["error_5xx"] >= 2


async def test_not_found_bad_request_and_bad_key(sb: SandboxNylas, nylas: NylasProvider) -> None:
    gid = sb.grant_ids[0]
    with pytest.raises(NotFound) as nf:
        await nylas.get_thread(gid, "ffffffffffffffff")
    assert nf.value.error_type == "api.not_found_error" and nf.value.request_id
    with pytest.raises(GrantNotFound):
        await nylas.list_threads_page("no-such-grant")
    with pytest.raises(GrantNotFound):
        await nylas.get_grant("no-such-grant")
    with pytest.raises(Permanent) as bad:
        await nylas.list_threads_page(gid, page_token="not-a-token")
    assert bad.value.status == 400 and not isinstance(bad.value, InvalidApiKey)
    async with NylasProvider("wrong", sb.base_url) as wrong:
        # Nylas's 401 does not say whose fault it is: callers confirm with the grant.
        with pytest.raises(Unauthorized) as unauthorized:
            await wrong.list_threads_page(gid)
        assert unauthorized.value.error_type == "api.authentication_error"
        with pytest.raises(Unauthorized):
            await wrong.get_grant(gid)
    with pytest.raises(ValueError):
        await nylas.list_threads_page(gid, limit=500)


async def test_expired_and_deleted_grant() -> None:
    with SandboxNylas(threads=10, seed=2, api_key=KEY) as s:
        gid, other = s.grant_ids[0], s.grant_ids[1]
        async with NylasProvider(KEY, s.base_url) as p:
            s.expire_grant(gid, send=False)
            with pytest.raises(Unauthorized) as err:
                await p.list_threads_page(gid)
            assert err.value.status == 401
            assert (await p.get_grant(gid)).status == "invalid"
            s.delete_grant(other, send=False)
            with pytest.raises(GrantNotFound):
                await p.get_thread(other, "x")


async def test_the_grant_is_what_the_official_sdk_reads() -> None:
    """get_grant sends its own request on the provider's client; the SDK's grants.find, sent to
    the same sandbox, is the reference for what it answers: valid, expired, deleted, bad key."""
    with SandboxNylas(threads=5, seed=4, api_key=KEY) as s:
        valid, expired, deleted = s.grant_ids[:3]
        s.expire_grant(expired, send=False)
        s.delete_grant(deleted, send=False)
        sdk = NylasClient(KEY, s.base_url, timeout=5)
        async with NylasProvider(KEY, s.base_url) as p:
            for gid in (valid, expired):
                theirs = (await asyncio.to_thread(sdk.grants.find, gid)).data
                ours = await p.get_grant(gid)
                assert (ours.id, ours.status, ours.email, ours.provider, ours.scopes) == (
                    theirs.id, theirs.grant_status, theirs.email, theirs.provider,
                    tuple(theirs.scope))
            assert (await p.get_grant(expired)).status == "invalid"
            for key, gid, ours_raises, status, error_type in (
                    (KEY, deleted, GrantNotFound, 404, "grant.not_found"),
                    ("wrong", valid, Unauthorized, 401, "api.authentication_error")):
                with pytest.raises(NylasApiError) as sdk_err:
                    await asyncio.to_thread(NylasClient(key, s.base_url).grants.find, gid)
                assert (sdk_err.value.status_code, sdk_err.value.type) == (status, error_type)
                async with NylasProvider(key, s.base_url) as other:
                    with pytest.raises(ours_raises) as err:
                        await other.get_grant(gid)
                assert (err.value.status, err.value.error_type) == (status, error_type)


def test_the_triggers_nova_routes_are_nylas_trigger_names() -> None:
    """Every Nylas trigger nova.webhooks handles is a name of the SDK's WebhookTriggers (a typo
    there would leave real notifications skipped)."""
    nylas_triggers = set(HANDLED) - {CHANGES}
    assert nylas_triggers and nylas_triggers <= SDK_TRIGGERS, nylas_triggers - SDK_TRIGGERS


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with NylasProvider(KEY, f"http://127.0.0.1:{port}", timeout=1) as p:
        with pytest.raises(Transient):
            await p.list_threads_page("g")
        with pytest.raises(Transient):
            await p.get_grant("g")


def test_error_mapping_of_odd_bodies() -> None:
    assert isinstance(error_from_response(401, b"<html>nope</html>", {}), Unauthorized)
    assert isinstance(error_from_response(503, b"", {}), Transient)
    e = error_from_response(429, b"Too Many", {"retry-after": "7"})
    assert isinstance(e, RateLimited) and e.retry_after == 7.0
    assert isinstance(error_from_response(403, b'{"error": "denied"}', {}), Unauthorized)
    assert isinstance(error_from_response(400, json.dumps(
        {"request_id": "r", "error": {"type": "token.unauthorized_access",
                                      "message": "Invalid API key"}}).encode(), {}),
        InvalidApiKey)
    assert isinstance(error_from_response(422, b"[1, 2]", {}), Permanent)
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 < parse_retry_after(format_datetime(later, usegmt=True)) <= 30
    assert parse_retry_after("soon") is None


@given(status=st.integers(400, 599), body=st.binary(max_size=300),
       retry_after=st.one_of(st.none(), st.text(max_size=20)))
def test_error_mapping_never_crashes(status: int, body: bytes, retry_after: str | None) -> None:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    err = error_from_response(status, body, headers)
    assert isinstance(err, ProviderError) and err.status == status
    if status == 429:
        assert isinstance(err, RateLimited)
    elif status >= 500:
        assert isinstance(err, Transient)


# ---------------------------------------------------------------- webhook helpers
def test_webhook_helpers_verify_and_parse_sandbox_notifications() -> None:
    with SandboxNylas(threads=5, seed=8, api_key=KEY, webhook_secret="s3cret") as s:
        gid = s.grant_ids[0]
        note = s.add_message(gid, body="y" * 1_050_000, send=False).notifications[0]
        assert verify_signature(note.body, note.signature, "s3cret")
        assert not verify_signature(note.body, note.signature, "other")
        assert not verify_signature(note.body + b" ", note.signature, "s3cret")
        event = parse_notification(note.body)
        assert event.truncated and event.trigger == "message.created"
        assert event.trigger in SDK_TRIGGERS
        assert event.grant_id == gid and event.id == note.id and "body" not in event.object
        expired = parse_notification(s.expire_grant(gid, send=False).notifications[0].body)
        assert expired.trigger == "grant.expired" and expired.grant_id == gid
    with pytest.raises(Permanent):
        parse_notification(b"not json")
