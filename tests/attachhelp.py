"""Helpers for the attachment tests: settings with a NAS root of the test's own, a synced
sandbox mailbox, consumers, and the files a row should have produced."""

from __future__ import annotations

import hashlib
import io
import uuid
import zlib
from pathlib import Path
from typing import Any

import asyncpg
from synchelp import add_inbox, settings, start_backfill

from nova import store
from nova.attachments import AttachmentJanitor, AttachmentProcessor
from nova.backfill import BackfillProcessor
from nova.config import Settings
from nova.providers.nylas import parse_message
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor


def att_settings(sb: SandboxNylas, tmp: Path, **kw: Any) -> Settings:
    values: dict[str, Any] = {"attachment_path": tmp / "nas",
                              "attachment_temp_path": tmp / "tmp"}
    values.update(kw)
    return settings(sb, **values)


async def sync_mailbox(pool: asyncpg.Pool, sb: SandboxNylas, grant: int = 0) -> uuid.UUID:
    """Backfill and thread sync of one sandbox grant (attachment rows stored, not fetched)."""
    inbox = await add_inbox(pool, sb.grant_ids[grant])
    await start_backfill(pool, inbox)
    s = settings(sb)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
    return inbox


async def store_message(pool: asyncpg.Pool, sb: SandboxNylas, inbox: uuid.UUID,
                        message_id: str, grant: int = 0) -> None:
    """Write one sandbox message (and so its attachment rows) as a sync would."""
    gid = sb.grant_ids[grant]
    data = sb.message_json(gid, message_id)
    assert data is not None
    async with pool.acquire() as conn, conn.transaction():
        await store.upsert_message(conn, inbox, parse_message(data, gid), store.sync_version())


def consumer(pool: asyncpg.Pool, s: Settings) -> Worker:
    return Worker(AttachmentProcessor(s, retry_base_delay=0.02, retry_max_delay=0.05), s,
                  pool=pool)


async def drain(pool: asyncpg.Pool, s: Settings, rounds: int = 50) -> None:
    """Run a consumer until the queue is empty (retries included)."""
    for _ in range(rounds):
        await consumer(pool, s).run(burst=True)
        if not await pool.fetchval("SELECT count(*) FROM pgmq.q_attachment_downloads"):
            return
        await __import__("asyncio").sleep(0.06)
    raise AssertionError("the attachment queue did not drain")


def janitor(pool: asyncpg.Pool, s: Settings) -> AttachmentJanitor:
    return AttachmentJanitor(s, pool=pool)


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        "SELECT a.*, i.grant_id, m.sent_at FROM flux_email_attachments a"
        " JOIN flux_inboxes i ON i.id = a.inbox_id"
        " JOIN flux_email_messages m ON m.id = a.message_id ORDER BY a.created_at, a.id"))


def downloads(sb: SandboxNylas) -> int:
    return sum(g.get("download_attachment", 0) for g in sb.get_stats()["by_grant"].values())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob(".nova-*.part")]


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def exists(path: Path) -> bool:
    return path.exists()


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def all_names(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*")}


# --------------------------------------------------------------------------- hostile PDFs
def raw_pdf(content: bytes, *, compress: bool = True, pages: int = 1) -> bytes:
    """A PDF whose every page draws `content` (a content stream), FlateDecode'd."""
    body = zlib.compress(content, 9) if compress else content
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + i} 0 R" for i in range(pages))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode())
    objects.append(b"<< /Length " + str(len(body)).encode()
                   + (b" /Filter /FlateDecode" if compress else b"") + b" >>\nstream\n" + body
                   + b"\nendstream")
    font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    for _ in range(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources"
                       b" << /Font << /F1 " + str(4 + pages).encode() + b" 0 R >> >>"
                       b" /Contents 3 0 R >>")
    objects.append(font)
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def slow_pdf(operators: int = 3_000_000) -> bytes:
    """One page of millions of text operators: small on the wire, minutes for a parser."""
    return raw_pdf(b"BT /F1 1 Tf " + b"(a) Tj 1 0 Td " * operators + b"ET")


def encrypted_pdf(lines: list[str], user_password: str) -> bytes:
    from pypdf import PdfReader, PdfWriter

    from nova.sandbox.nylas.blobs import make_pdf

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(make_pdf(lines))).pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password="owner-secret",
                   algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
