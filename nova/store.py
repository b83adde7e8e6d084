"""The SQL that writes mailbox rows: threads, messages, attachment metadata.

Every write is an idempotent upsert keyed on the provider's id, and every write carries a
*version*: the moment the provider state it holds was observed (a webhook's event `time`, or
the instant before an API fetch). A row keeps the newest version it has seen; a write with an
older version changes nothing, so a late webhook or a slow thread sync never rolls data back.
Equal versions apply (replaying the same event is harmless). Soft deletes are versioned writes
too: an older create cannot resurrect a newer delete.

The functions take an asyncpg connection so they join the caller's transaction: a job's rows
and its queue delete commit together. The connection must come from `nova.db.create_pool`
(its JSON codec turns Python lists and dicts into jsonb).
"""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from nova.providers.models import Attachment, Message, Participant, Thread

# Stub thread for a message whose thread has not been synced yet; its NULL version lets the
# first real thread write through.
_ENSURE_THREAD = """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id)
VALUES ($1, $2)
ON CONFLICT (inbox_id, provider_thread_id) DO UPDATE SET inbox_id = EXCLUDED.inbox_id
RETURNING id
"""

_UPSERT_THREAD = """
INSERT INTO flux_email_threads AS t
    (inbox_id, provider_thread_id, subject, snippet, participants, folders, unread, starred,
     has_attachments, message_count, first_message_at, last_message_at, provider_updated_at,
     raw, synced_at, deleted_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now(), NULL)
ON CONFLICT (inbox_id, provider_thread_id) DO UPDATE
SET subject = EXCLUDED.subject, snippet = EXCLUDED.snippet,
    participants = EXCLUDED.participants, folders = EXCLUDED.folders,
    unread = EXCLUDED.unread, starred = EXCLUDED.starred,
    has_attachments = EXCLUDED.has_attachments, message_count = EXCLUDED.message_count,
    first_message_at = EXCLUDED.first_message_at, last_message_at = EXCLUDED.last_message_at,
    provider_updated_at = EXCLUDED.provider_updated_at, raw = EXCLUDED.raw,
    synced_at = now(), deleted_at = NULL, updated_at = now()
WHERE t.provider_updated_at IS NULL OR t.provider_updated_at <= EXCLUDED.provider_updated_at
RETURNING id
"""

_UPSERT_MESSAGE = """
INSERT INTO flux_email_messages AS m
    (inbox_id, thread_id, provider_message_id, provider_thread_id, subject, snippet,
     from_addresses, to_addresses, cc_addresses, bcc_addresses, reply_to, body_html, body_text,
     folders, unread, starred, has_attachments, sent_at, headers, provider_updated_at, raw,
     deleted_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
        $20, $21, NULL)
ON CONFLICT (inbox_id, provider_message_id) DO UPDATE
SET thread_id = EXCLUDED.thread_id, provider_thread_id = EXCLUDED.provider_thread_id,
    subject = EXCLUDED.subject, snippet = EXCLUDED.snippet,
    from_addresses = EXCLUDED.from_addresses, to_addresses = EXCLUDED.to_addresses,
    cc_addresses = EXCLUDED.cc_addresses, bcc_addresses = EXCLUDED.bcc_addresses,
    reply_to = EXCLUDED.reply_to,
    -- a truncated event carries no body: keep the one we have
    body_html = coalesce(EXCLUDED.body_html, m.body_html),
    body_text = coalesce(EXCLUDED.body_text, m.body_text),
    folders = EXCLUDED.folders, unread = EXCLUDED.unread, starred = EXCLUDED.starred,
    has_attachments = EXCLUDED.has_attachments, sent_at = EXCLUDED.sent_at,
    headers = coalesce(EXCLUDED.headers, m.headers),
    provider_updated_at = EXCLUDED.provider_updated_at, raw = EXCLUDED.raw,
    deleted_at = NULL, updated_at = now()
WHERE m.provider_updated_at IS NULL OR m.provider_updated_at <= EXCLUDED.provider_updated_at
RETURNING id
"""

_UPSERT_ATTACHMENTS = """
INSERT INTO flux_email_attachments AS a
    (inbox_id, message_id, provider_attachment_id, provider_message_id, original_filename,
     original_url, content_type, content_id, is_inline, size)
SELECT $1, $2, x.id, $3, x.filename, x.url, x.content_type, x.content_id, x.is_inline, x.size
FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::boolean[],
            $10::bigint[]) AS x(id, filename, url, content_type, content_id, is_inline, size)
ON CONFLICT (message_id, provider_attachment_id) DO UPDATE
SET original_filename = EXCLUDED.original_filename, original_url = EXCLUDED.original_url,
    content_type = EXCLUDED.content_type, content_id = EXCLUDED.content_id,
    is_inline = EXCLUDED.is_inline,
    -- the downloader's measured size wins over the provider's announced one
    size = CASE WHEN a.status = 'completed' THEN a.size ELSE EXCLUDED.size END,
    deleted_at = NULL, updated_at = now()
RETURNING id
"""

_DELETE_MESSAGE = """
INSERT INTO flux_email_messages AS m (inbox_id, provider_message_id, provider_updated_at,
                                      deleted_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (inbox_id, provider_message_id) DO UPDATE
SET deleted_at = coalesce(m.deleted_at, now()), provider_updated_at = EXCLUDED.provider_updated_at,
    updated_at = now()
WHERE m.provider_updated_at IS NULL OR m.provider_updated_at <= EXCLUDED.provider_updated_at
RETURNING id
"""

_DELETE_THREAD = """
UPDATE flux_email_threads
SET deleted_at = coalesce(deleted_at, now()), provider_updated_at = $3, updated_at = now()
WHERE inbox_id = $1 AND provider_thread_id = $2
  AND (provider_updated_at IS NULL OR provider_updated_at <= $3)
RETURNING id
"""

_TAG = re.compile(r"<[^>]+>")
_BLOCK = re.compile(r"<\s*(br|/p|/div|/li|/tr|/h[1-6])\b[^>]*>", re.I)
_DROP = re.compile(r"<\s*(script|style|head)\b.*?<\s*/\s*\1\s*>", re.I | re.S)
_SPACES = re.compile(r"[ \t\r\f\v]+")


def html_to_text(body: str) -> str:
    """A plain-text rendering of an HTML body, for search and previews."""
    text = _DROP.sub(" ", body)
    text = _BLOCK.sub("\n", text)
    text = html.unescape(_TAG.sub(" ", text))
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _people(participants: Iterable[Participant]) -> list[dict[str, str | None]]:
    return [{"name": p.name, "email": p.email} for p in participants]


def _bodies(body: str | None) -> tuple[str | None, str | None]:
    if body is None:
        return None, None
    if "<" in body and ">" in body:
        return body, html_to_text(body)
    return None, body


async def upsert_thread(conn: Any, inbox_id: uuid.UUID, thread: Thread,
                        version: datetime) -> uuid.UUID | None:
    """Write a thread; returns its row id, or None when a newer version is already stored."""
    row_id = await conn.fetchval(
        _UPSERT_THREAD, inbox_id, thread.id, thread.subject, thread.snippet,
        _people(thread.participants), list(thread.folders), thread.unread, thread.starred,
        thread.has_attachments, len(thread.message_ids), thread.earliest_message_date,
        thread.latest_message_date, version, thread.raw or None,
    )
    return row_id  # type: ignore[no-any-return]


async def thread_row_id(conn: Any, inbox_id: uuid.UUID, provider_thread_id: str) -> uuid.UUID:
    """The row id of a thread, creating a stub row if the thread is not stored yet."""
    return await conn.fetchval(_ENSURE_THREAD, inbox_id, provider_thread_id)  # type: ignore[no-any-return]


async def upsert_message(conn: Any, inbox_id: uuid.UUID, message: Message,
                         version: datetime) -> uuid.UUID | None:
    """Write a message and its attachment rows; None when a newer version is stored.

    A message whose body is None (a truncated webhook) keeps the body already stored.
    """
    thread_id = (await thread_row_id(conn, inbox_id, message.thread_id)
                 if message.thread_id else None)
    body_html, body_text = _bodies(message.body)
    headers = ([{"name": k, "value": v} for k, v in message.headers]
               if message.headers is not None else None)
    row_id: uuid.UUID | None = await conn.fetchval(
        _UPSERT_MESSAGE, inbox_id, thread_id, message.id, message.thread_id, message.subject,
        message.snippet, _people(message.from_), _people(message.to), _people(message.cc),
        _people(message.bcc), _people(message.reply_to), body_html, body_text,
        list(message.folders), message.unread, message.starred, bool(message.attachments),
        message.date, headers, version, message.raw or None,
    )
    if row_id is not None and message.attachments:
        await upsert_attachments(conn, inbox_id, row_id, message.id, message.attachments)
    return row_id


async def upsert_attachments(conn: Any, inbox_id: uuid.UUID, message_row_id: uuid.UUID,
                             provider_message_id: str,
                             attachments: Sequence[Attachment]) -> list[uuid.UUID]:
    """Attachment metadata rows (status pending until the downloader takes them)."""
    rows = await conn.fetch(
        _UPSERT_ATTACHMENTS, inbox_id, message_row_id, provider_message_id,
        [a.id for a in attachments], [a.filename for a in attachments],
        [a.raw.get("url") if a.raw else None for a in attachments],
        [a.content_type for a in attachments], [a.content_id for a in attachments],
        [a.is_inline for a in attachments], [a.size for a in attachments],
    )
    return [r["id"] for r in rows]


async def soft_delete_message(conn: Any, inbox_id: uuid.UUID, provider_message_id: str,
                              version: datetime) -> bool:
    """Mark a message deleted (a tombstone row if it was never stored). False when stale."""
    return await conn.fetchval(_DELETE_MESSAGE, inbox_id, provider_message_id,
                               version) is not None


async def soft_delete_thread(conn: Any, inbox_id: uuid.UUID, provider_thread_id: str,
                             version: datetime) -> bool:
    return await conn.fetchval(_DELETE_THREAD, inbox_id, provider_thread_id,
                               version) is not None
