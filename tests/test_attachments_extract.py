"""Text extraction through the consumer: corrupt, encrypted, oversized and endless PDFs cost
their text, never the download or the worker; charsets; the ephemeral mode keeps no file;
plain-URL downloads (the Missive rows)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from attachhelp import (
    all_files,
    att_settings,
    downloads,
    drain,
    encrypted_pdf,
    part_files,
    rows,
    sha256,
    slow_pdf,
    store_message,
    sync_mailbox,
)
from servers import ServerThread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from synchelp import add_inbox, make_sandbox

from nova.extract import decode_text
from nova.sandbox.nylas import SandboxNylas
from nova.sandbox.nylas.blobs import make_pdf


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(3) as sb:
        yield sb


async def deliver(pool: asyncpg.Pool, sb: SandboxNylas,
                  files: list[tuple[str, str, bytes]]) -> dict[str, asyncpg.Record]:
    """A new sandbox message with these attachments, stored as a sync stores it."""
    gid = sb.grant_ids[0]
    inbox = await pool.fetchval("SELECT id FROM flux_inboxes WHERE grant_id = $1", gid)
    inbox = inbox or await add_inbox(pool, gid)
    created = sb.add_message(gid, send=False, attachments=files)
    assert created.message is not None
    await store_message(pool, sb, inbox, created.message["id"])
    return {r["original_filename"]: r for r in await rows(pool)}


def by_name(stored: list[asyncpg.Record]) -> dict[str, asyncpg.Record]:
    return {r["original_filename"]: r for r in stored}


async def test_broken_pdfs_are_downloaded_and_say_why_they_have_no_text(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    files = [
        ("corrupt.pdf", "application/pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage"),
        ("locked.pdf", "application/pdf", encrypted_pdf(["the secret"], "user-password")),
        ("owner-only.pdf", "application/pdf", encrypted_pdf(["readable line"], "")),
        ("empty.pdf", "application/pdf", b""),
        ("named.pdf", "application/octet-stream", make_pdf(["typed as octets"])),
        ("long.pdf", "application/pdf", make_pdf([f"line {i}" for i in range(400)],
                                                 lines_per_page=1)),
    ]
    await deliver(pool, sandbox, files)
    await drain(pool, att_settings(sandbox, tmp_path, extract_max_pages=5))
    got = by_name(await rows(pool))
    for name, _, data in files:
        r = got[name]
        assert r["status"] == "completed", (name, r["error_message"])
        assert (tmp_path / "nas" / r["local_path"]).read_bytes() == data
        assert r["checksum"] == sha256(data)
    assert (got["corrupt.pdf"]["skipped_reason"], got["corrupt.pdf"]["extracted_text"]) == (
        "corrupt", None)
    assert (got["empty.pdf"]["skipped_reason"], got["empty.pdf"]["size"]) == ("corrupt", 0)
    assert got["locked.pdf"]["skipped_reason"] == "encrypted"
    assert got["locked.pdf"]["extracted_text"] is None
    assert got["owner-only.pdf"]["skipped_reason"] is None
    assert "readable line" in got["owner-only.pdf"]["extracted_text"]
    assert got["owner-only.pdf"]["metadata"]["encrypted"] is True
    assert "typed as octets" in got["named.pdf"]["extracted_text"]
    long = got["long.pdf"]
    assert (long["metadata"]["pages"], long["metadata"]["pages_read"]) == (400, 5)
    assert long["metadata"]["truncated"] is True
    assert "line 4" in long["extracted_text"] and "line 5" not in long["extracted_text"]


async def test_a_pdf_that_would_run_for_minutes_is_cut_off_and_the_worker_goes_on(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    endless = slow_pdf()
    await deliver(pool, sandbox, [("endless.pdf", "application/pdf", endless),
                                  ("fine.pdf", "application/pdf", make_pdf(["still fine"]))])
    await drain(pool, att_settings(sandbox, tmp_path, extract_timeout_seconds=1,
                                   extract_workers=1, visibility_timeout=2))
    got = by_name(await rows(pool))
    assert got["endless.pdf"]["status"] == "completed"
    assert got["endless.pdf"]["skipped_reason"] == "timeout"
    assert got["endless.pdf"]["size"] == len(endless)
    assert got["fine.pdf"]["skipped_reason"] is None
    assert "still fine" in got["fine.pdf"]["extracted_text"]


async def test_files_over_the_extraction_limit_are_kept_without_text(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    big = ("\n".join(f"row {i}" for i in range(2000))).encode()
    await deliver(pool, sandbox, [("big.txt", "text/plain", big),
                                  ("big.pdf", "application/pdf",
                                   make_pdf([f"l{i}" for i in range(2000)])),
                                  ("small.txt", "text/plain", b"small enough")])
    await drain(pool, att_settings(sandbox, tmp_path, extract_max_bytes=5000,
                                   extract_max_chars=5))
    got = by_name(await rows(pool))
    for name in ("big.txt", "big.pdf"):
        assert (got[name]["status"], got[name]["skipped_reason"]) == ("completed", "too_large")
        assert got[name]["extracted_text"] is None
        assert (tmp_path / "nas" / got[name]["local_path"]).stat().st_size == got[name]["size"]
    assert got["small.txt"]["extracted_text"] == "small"
    assert got["small.txt"]["metadata"]["truncated"] is True


async def test_text_is_decoded_by_its_declared_charset_and_lies_cost_characters_only(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    await deliver(pool, sandbox, [
        ("latin.txt", 'text/plain; charset="ISO-8859-1"', "Grüße aus Zürich".encode("latin-1")),
        ("utf16.txt", "text/plain; charset=utf-16", "ça va".encode("utf-16")),
        ("nobom.txt", 'text/plain; charset="utf-16"', "half".encode("utf-16-le") + b"\x00"),
        ("liar.txt", 'text/plain; charset="utf-8"', b"caf\xe9 \x00au lait"),
        ("unknown.csv", "text/csv; charset=x-nonexistent", b"a,b\n1,2\n"),
        ("page.html", "text/html", "<p>hé</p>".encode()),
    ])
    await drain(pool, att_settings(sandbox, tmp_path))
    got = {n: r["extracted_text"] for n, r in by_name(await rows(pool)).items()}
    assert got["latin.txt"] == "Grüße aus Zürich"
    assert got["utf16.txt"] == "ça va"
    assert got["nobom.txt"] == "half\ufffd"
    assert got["liar.txt"] == "caf\ufffd au lait"  # the NUL is gone: Postgres cannot hold it
    assert got["unknown.csv"] == "a,b\n1,2\n"
    assert got["page.html"] == "<p>hé</p>"


async def test_the_ephemeral_mode_keeps_derived_data_and_no_file(
        pool: asyncpg.Pool, tmp_path: Path) -> None:
    with make_sandbox(25) as sb:
        await sync_mailbox(pool, sb)
        s = att_settings(sb, tmp_path, attachment_store="none", extract_max_bytes=100_000,
                         extract_memory_max_bytes=2_000)
        await drain(pool, s)
        stored = await rows(pool)
        announced_large = [r for r in stored if r["size"] > 100_000]
        assert announced_large and all(
            (r["status"], r["skipped_reason"]) == ("skipped", "too_large")
            for r in announced_large)
        done = [r for r in stored if r["size"] <= 100_000]
        assert downloads(sb) == len(done)
        where = set()
        for r in done:
            data = sb.attachment_bytes(r["grant_id"], r["provider_attachment_id"],
                                       r["provider_message_id"])
            assert r["status"] == "completed"
            assert (r["checksum"], r["size"]) == (sha256(data), len(data))
            assert (r["local_filename"], r["local_path"]) == (None, None)
            rec = sb.mailbox.attachment(r["grant_id"], r["provider_attachment_id"],
                                        r["provider_message_id"])
            assert rec is not None
            if rec.kind == "pdf":
                assert all(line in r["extracted_text"] for line in rec.text)
                where.add(r["metadata"]["processed_in"])
        assert where == {"memory", "temp_file"}  # small PDFs in memory, larger via a file
        assert not (tmp_path / "nas").exists()
        assert all_files(tmp_path) == [] and part_files(tmp_path) == []


def _url_app(payloads: dict[str, bytes]) -> Starlette:
    async def serve(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in payloads:
            return Response(b"no such file", status_code=404)
        return Response(payloads[name], media_type="application/octet-stream")

    return Starlette(routes=[Route("/files/{name}", serve)])


async def test_rows_with_a_plain_url_are_downloaded_from_it(
        pool: asyncpg.Pool, sandbox: SandboxNylas, tmp_path: Path) -> None:
    pdf = make_pdf(["Missive invoice"])
    with ServerThread(_url_app({"inv.pdf": pdf})) as server:
        inbox = await pool.fetchval("INSERT INTO flux_inboxes (email) VALUES ('m@x') RETURNING id")
        message = await pool.fetchval(
            "INSERT INTO flux_email_messages (inbox_id, provider_message_id, sent_at)"
            " VALUES ($1, 'missive-1', '2024-12-05T10:00:00Z') RETURNING id", inbox)
        await pool.execute(
            "INSERT INTO flux_email_attachments (inbox_id, message_id, provider_attachment_id,"
            " provider_message_id, original_filename, original_url, content_type) VALUES"
            " ($1, $2, 'a1', 'missive-1', 'Invoice-December.pdf', $3, 'application/pdf'),"
            " ($1, $2, 'a2', 'missive-1', 'Gone.pdf', $4, 'application/pdf')",
            inbox, message, f"{server.url}/files/inv.pdf", f"{server.url}/files/gone.pdf")
        await drain(pool, att_settings(sandbox, tmp_path))
    got = by_name(await rows(pool))
    ok = got["Invoice-December.pdf"]
    assert ok["status"] == "completed"
    assert ok["local_path"] == f"2024-12/Invoice-December_{ok['id']}.pdf"
    assert (tmp_path / "nas" / ok["local_path"]).read_bytes() == pdf
    assert "Missive invoice" in ok["extracted_text"]
    gone = got["Gone.pdf"]
    assert (gone["status"], gone["retry_count"]) == ("failed", 1)
    assert "HTTP 404" in gone["error_message"]
    assert downloads(sandbox) == 0


def test_attachment_text_with_a_lying_charset_is_decoded_not_failed() -> None:
    # The attachment extractor shares the charset lookup: a rot13 or hex label used to raise
    # (TypeError / AssertionError) inside the decoder and fail the attachment.
    for charset in ("rot13", "hex", "x-made-up"):
        out = decode_text(b"Hello \xff world", charset, 100)
        assert out.text == "Hello \ufffd world", charset
        assert out.meta["charset_unknown"] is True and out.skipped_reason is None
