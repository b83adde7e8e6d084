"""The SQL that writes mailbox rows: threads, messages, attachment metadata.

Versions. Every write carries a *version*, the moment the provider state it holds was
observed. A row keeps the newest version it has seen; an older write changes nothing, so a
late webhook or a slow thread sync never rolls data back. Equal versions apply (replaying an
event is harmless, and see below). Soft deletes are versioned writes too: an older create
cannot resurrect a newer delete.

One clock. Webhooks are versioned with Nylas's event `time`, whole seconds. A thread sync is
versioned with `sync_version()` of the moment its first request left (`fetch_version`: after the
wait for a budget slot, not before it), rounded down to the second, less
VERSION_SKEW_SECONDS. A change that lands in the same second as the fetch (or a little before
it, with clocks that disagree by up to the skew) then arrives by webhook with a version at
least the sync's, and applies. The price is the other direction: within that window a webhook
about an older state can overwrite what the sync read, until the next event or sync. Losing a
newer change silently is worse than briefly showing an older one, so the margin goes that way.

Partial payloads. A message whose `present` names its fields (a `.transformed`, `.metadata`,
`.truncated` or `.cleaned` webhook) writes only those columns: an absent field never blanks a
stored value. The statement is built from the column set (a fixed list of column names, never
input), so a missing column is simply not in it.

Threads are what their messages say. After messages are written (by sync or webhook) the
thread row's message_count, first/last message time, snippet, unread, starred, participants,
folders and has_attachments are derived from the stored messages (`nova_refresh_threads`), so a
reply that arrives as `message.created` alone keeps its thread current without a provider
request, and a message for a thread never seen leaves a real thread row.

Bodies. HTML is rendered to text with lxml (libxml2: a C parser, linear time, forgiving with
broken markup; the regex rendering it replaces was quadratic on unclosed tags) on at most
TEXT_INPUT_LIMIT characters, in a worker thread (`prepare_messages`), before the job's
transaction opens.

The functions take an asyncpg connection so they join the caller's transaction: a job's rows
and its queue delete commit together. The connection must come from `nova.db.create_pool`
(its JSON codec turns Python lists and dicts into jsonb).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from lxml import etree
from lxml import html as lxml_html

from nova.providers.models import MESSAGE_FIELDS, Message, Participant, Thread

VERSION_SKEW_SECONDS = 2
TEXT_INPUT_LIMIT = 2_000_000  # characters of HTML rendered to text; the HTML is kept whole


def sync_version(now: datetime | None = None) -> datetime:
    """The version of what a fetch starting now will read (see the module doc)."""
    now = now or datetime.now(UTC)
    second = math.floor(now.timestamp()) - VERSION_SKEW_SECONDS
    return datetime.fromtimestamp(second, UTC)


# The moment the first provider request of a fetch left (nova.ratelimit notes it once the
# request has its budget slot); per asyncio task, so concurrent jobs never mix theirs up.
_first_request: ContextVar[list[datetime] | None] = ContextVar("nova_first_request",
                                                               default=None)


def request_sent(at: datetime) -> None:
    """A provider request leaves now, its wait for the budget over."""
    sent = _first_request.get()
    if sent is not None and not sent:
        sent.append(at)


@contextlib.contextmanager
def fetch_version() -> Iterator[Callable[[], datetime]]:
    """The version of what the provider requests made inside the block read: `sync_version()`
    of the moment the first of them left, after its wait for a budget slot, not of the moment
    the block began. Under throttling that wait is long, and a version from before it would
    let an event older than what was read overwrite it. Without a budgeted request: the
    block's start."""
    started = datetime.now(UTC)
    sent: list[datetime] = []
    token = _first_request.set(sent)
    try:
        yield lambda: sync_version(sent[0] if sent else started)
    finally:
        _first_request.reset(token)


# --------------------------------------------------------------------------- bodies
_PARSER = lxml_html.HTMLParser(encoding="utf-8", remove_comments=True)
_BLOCKS = ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
           "pre", "table", "ul", "ol", "hr")
_TAGS = re.compile(r"<[^<>]*>")  # stops at the next '<': linear even on unclosed tags
_SPACES = re.compile(r"[ \t\r\f\v\xa0]+")


def html_to_text(body: str) -> str:
    """A plain-text rendering of an HTML body, for search and previews."""
    data = body[:TEXT_INPUT_LIMIT]
    try:
        root = lxml_html.document_fromstring(data.encode("utf-8", "replace"), parser=_PARSER)
    except (etree.ParserError, ValueError):  # empty document, or nothing lxml can use
        import html

        text = html.unescape(_TAGS.sub(" ", data))
    else:
        etree.strip_elements(root, "script", "style", "head", "title", with_tail=False)
        for el in root.iter(*_BLOCKS):
            el.tail = "\n" + (el.tail or "")
        text = root.text_content()
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _bodies(body: str | None) -> tuple[str | None, str | None]:
    if body is None:
        return None, None
    if "<" in body and ">" in body:
        return body, html_to_text(body)
    return None, body


# --------------------------------------------------------------------------- messages
# (field of a partial payload, columns it writes, SQL type of each)
_COLUMNS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("thread_id", (("provider_thread_id", "text"),)),
    ("subject", (("subject", "text"),)),
    ("snippet", (("snippet", "text"),)),
    ("from", (("from_addresses", "jsonb"),)),
    ("to", (("to_addresses", "jsonb"),)),
    ("cc", (("cc_addresses", "jsonb"),)),
    ("bcc", (("bcc_addresses", "jsonb"),)),
    ("reply_to", (("reply_to", "jsonb"),)),
    ("date", (("sent_at", "timestamptz"),)),
    ("body", (("body_html", "text"), ("body_text", "text"))),
    ("body_cleaned", (("body_cleaned", "text"),)),
    ("folders", (("folders", "text[]"),)),
    ("unread", (("unread", "boolean"),)),
    ("starred", (("starred", "boolean"),)),
    ("attachments", (("has_attachments", "boolean"),)),
    ("headers", (("headers", "jsonb"),)),
)
assert {f for f, _ in _COLUMNS} == MESSAGE_FIELDS


@dataclass(frozen=True)
class PreparedMessage:
    """A message as rows: what `upsert_messages` writes. Built off the event loop."""

    fields: frozenset[str]
    row: dict[str, Any]


# Bodies live in their columns (body_html, body_text, body_cleaned); `raw` keeps the rest of the
# provider's object. A copy there doubled a message's size (and a thread's latest message).
_BODY_KEYS = frozenset({"body"})


def _raw(raw: dict[str, Any] | None) -> dict[str, Any]:
    if not raw or _BODY_KEYS.isdisjoint(raw):
        return raw or {}
    return {k: v for k, v in raw.items() if k not in _BODY_KEYS}


def _thread_raw(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    latest = raw.get("latest_draft_or_message") if raw else None
    if not isinstance(latest, dict) or _BODY_KEYS.isdisjoint(latest):
        return raw or None
    return {**raw, "latest_draft_or_message": _raw(latest)}  # type: ignore[dict-item]


def _people(participants: Iterable[Participant]) -> list[dict[str, str | None]]:
    return [{"name": p.name, "email": p.email} for p in participants]


def _prepare(message: Message) -> PreparedMessage:
    fields = set(message.present if message.present is not None else MESSAGE_FIELDS)
    if message.present is None:  # a complete object: None here means "not sent", keep ours
        for name, value in (("body", message.body if message.text is None else message.text),
                            ("headers", message.headers),
                            ("body_cleaned", message.body_cleaned)):
            if value is None:
                fields.discard(name)
    body_html, body_text = (_bodies(message.body) if message.text is None
                            else (message.body, message.text))
    row: dict[str, Any] = {
        "provider_message_id": message.id, "provider_thread_id": message.thread_id,
        "subject": message.subject, "snippet": message.snippet,
        "from_addresses": _people(message.from_), "to_addresses": _people(message.to),
        "cc_addresses": _people(message.cc), "bcc_addresses": _people(message.bcc),
        "reply_to": _people(message.reply_to),
        "sent_at": _iso(message.date),
        "body_html": body_html, "body_text": body_text, "body_cleaned": message.body_cleaned,
        "folders": list(message.folders), "unread": message.unread, "starred": message.starred,
        "has_attachments": bool(message.attachments),
        "headers": [{"name": k, "value": v} for k, v in message.headers]
        if message.headers is not None else None,
        "raw": _raw(message.raw),
        "partial": message.present is not None,
        "attachments": [{
            "id": a.id, "filename": a.filename, "url": a.raw.get("url") if a.raw else None,
            "content_type": a.content_type, "content_id": a.content_id,
            "is_inline": a.is_inline, "size": a.size} for a in message.attachments]
        if "attachments" in fields else [],
    }
    return PreparedMessage(frozenset(fields), row)


# Bodies up to this many characters in all are rendered on the event loop: lxml takes some
# microseconds for them, less than the hand-over to a worker thread and back costs.
INLINE_BODY_CHARS = 64_000


async def prepare_messages(messages: Sequence[Message]) -> list[PreparedMessage]:
    """Render bodies and build rows; large bodies in a worker thread, so CPU work stays off
    the event loop."""
    if not messages:
        return []
    if sum(len(m.body or "") for m in messages) <= INLINE_BODY_CHARS:
        return [_prepare(m) for m in messages]
    return await asyncio.to_thread(lambda: [_prepare(m) for m in messages])


# Threads are created when missing (DO NOTHING: an existing row is neither rewritten nor
# locked by it), then locked in id order before any message, together with the threads the
# messages are stored under now (nova_lock_threads, sql/080_mailbox.sql): every writer takes
# the threads before their messages, so writers of one thread serialize and never deadlock,
# also when they move messages across each other's threads.
_ENSURE_THREADS = """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id)
SELECT DISTINCT $1::uuid, t FROM unnest($2::text[]) AS t
ORDER BY 2
ON CONFLICT (inbox_id, provider_thread_id) DO NOTHING
"""
# $1 the inbox, $2 its threads, $3 the provider ids of the messages about to be written.
_LOCK_THREADS = """
SELECT id, provider_thread_id FROM nova_lock_threads(
    array_fill($1::uuid, ARRAY[cardinality($2::text[])]), $2::text[],
    array_fill($1::uuid, ARRAY[cardinality($3::text[])]), $3::text[])
"""

_ATTACHMENTS = """
, a AS (
    INSERT INTO flux_email_attachments AS a
        (inbox_id, message_id, provider_attachment_id, provider_message_id, original_filename,
         original_url, content_type, content_id, is_inline, size)
    SELECT $1, m.id, y.id, m.provider_message_id, y.filename, y.url, y.content_type,
           y.content_id, coalesce(y.is_inline, false), y.size
    FROM m JOIN x ON x.provider_message_id = m.provider_message_id
    CROSS JOIN LATERAL jsonb_to_recordset(x.attachments) AS y(
        id text, filename text, url text, content_type text, content_id text,
        is_inline boolean, size bigint)
    ON CONFLICT (message_id, provider_attachment_id) DO UPDATE
    SET original_filename = EXCLUDED.original_filename, original_url = EXCLUDED.original_url,
        content_type = EXCLUDED.content_type, content_id = EXCLUDED.content_id,
        is_inline = EXCLUDED.is_inline,
        -- the downloader's measured size wins over the provider's announced one
        size = CASE WHEN a.status = 'completed' THEN a.size ELSE EXCLUDED.size END,
        deleted_at = NULL, updated_at = now()
    RETURNING a.id
)"""


@lru_cache(maxsize=64)
def _upsert_sql(fields: frozenset[str], partial: bool) -> str:
    """One statement writing a batch of messages with the same field set, and their
    attachment rows. Only the columns of `fields` are written."""
    cols = [(c, t) for f, cs in _COLUMNS if f in fields for c, t in cs]
    record = ", ".join(f"{c} {t}" for c, t in cols)
    names = [c for c, _ in cols]
    insert_cols = ["inbox_id", "provider_message_id", "provider_updated_at", "raw",
                   "deleted_at", *names]
    values = ["$1", "x.provider_message_id", "$3", "x.raw", "NULL", *(f"x.{c}" for c in names)]
    updates = [f"{c} = EXCLUDED.{c}" for c in names]
    if "thread_id" in fields:
        # The thread's row id comes with the row (upsert_messages locked the threads first): a
        # join on (inbox_id, provider_thread_id) here got, once prepared, a generic plan that
        # read every thread of the inbox.
        record += ", thread_row_id uuid"
        insert_cols.append("thread_id")
        values.append("x.thread_row_id")
        updates.append("thread_id = EXCLUDED.thread_id")
    # (a body kept in raw by an older Nova goes: its columns hold it)
    raw = ("(coalesce(m.raw, '{}'::jsonb) - 'body') || EXCLUDED.raw" if partial
           else "EXCLUDED.raw")
    sql = f"""
WITH x AS (
    SELECT * FROM jsonb_to_recordset($2::jsonb) AS x(
        provider_message_id text, raw jsonb, attachments jsonb{', ' + record if record else ''})
), before AS (  -- the thread each message was under (the statement's snapshot: before it)
    -- one probe per message by its whole unique key (OFFSET 0 keeps the probe a probe): with
    -- `= ANY`, a generic plan took the (inbox_id, provider_thread_id) index, the whole inbox
    SELECT k.provider_message_id, b.thread_id
    FROM unnest($4::text[]) AS k(provider_message_id)
    CROSS JOIN LATERAL (SELECT thread_id FROM flux_email_messages
                        WHERE inbox_id = $1 AND provider_message_id = k.provider_message_id
                        OFFSET 0) b
), m AS (
    INSERT INTO flux_email_messages AS m ({', '.join(insert_cols)})
    SELECT {', '.join(values)} FROM x
    ON CONFLICT (inbox_id, provider_message_id) DO UPDATE
    SET provider_updated_at = EXCLUDED.provider_updated_at, raw = {raw}, deleted_at = NULL,
        updated_at = now(){''.join(', ' + u for u in updates)}
    WHERE m.provider_updated_at IS NULL OR m.provider_updated_at <= EXCLUDED.provider_updated_at
    RETURNING m.id, m.provider_message_id, m.thread_id
){_ATTACHMENTS if 'attachments' in fields else ''}
SELECT m.id, m.provider_message_id, m.thread_id, b.thread_id AS left_thread_id
FROM m LEFT JOIN before b ON b.provider_message_id = m.provider_message_id
"""
    return sql


REFRESH_THREADS = "SELECT nova_refresh_threads($1::uuid[])"


async def upsert_messages(conn: Any, inbox_id: uuid.UUID,
                          messages: Sequence[PreparedMessage],
                          version: datetime) -> dict[str, uuid.UUID]:
    """Write messages and their attachment rows, then re-derive their threads.

    Returns the row id of each message written; one refused as older than the stored version
    is not in it. One statement per distinct field set (a thread sync has one).
    """
    threads = sorted({p.row["provider_thread_id"] for p in messages
                      if "thread_id" in p.fields and p.row["provider_thread_id"]})
    row_ids: dict[str, str] = {}
    if threads:
        await conn.execute(_ENSURE_THREADS, inbox_id, threads)
        locked = await conn.fetch(_LOCK_THREADS, inbox_id, threads,
                                  [p.row["provider_message_id"] for p in messages])
        row_ids = {r["provider_thread_id"]: str(r["id"]) for r in locked}
    groups: dict[tuple[frozenset[str], bool], list[dict[str, Any]]] = {}
    for p in messages:
        row = p.row
        if "thread_id" in p.fields:
            row = {**row, "thread_row_id": row_ids.get(row["provider_thread_id"] or "")}
        groups.setdefault((p.fields, p.row["partial"]), []).append(row)
    written: dict[str, uuid.UUID] = {}
    touched: set[uuid.UUID] = set()
    for (fields, partial), rows in groups.items():
        ids = [r["provider_message_id"] for r in rows]
        for r in await conn.fetch(_upsert_sql(fields, partial), inbox_id, rows, version, ids):
            written[r["provider_message_id"]] = r["id"]
            # a message that moved leaves a thread to re-derive too
            touched.update(t for t in (r["thread_id"], r["left_thread_id"]) if t is not None)
    if touched:
        await conn.execute(REFRESH_THREADS, sorted(touched))
    return written


WRITE_SYNCED_THREAD = "SELECT nova_write_synced_thread($1, $2, $3::jsonb, $4::text[], $5, $6, $7)"


async def write_synced_thread(conn: Any, inbox_id: uuid.UUID, provider_thread_id: str,
                              messages: Sequence[PreparedMessage], version: datetime,
                              queued_id: int, msg_id: int) -> bool:
    """A thread sync's write in one round trip (sql/080_mailbox.sql): the thread row, its
    messages (complete ones, as the provider's API lists them) and attachment rows, the stored
    messages it no longer lists soft-deleted, the thread derived again, then queued thread
    `queued_id` completed for job `msg_id`. False when that job no longer owns the queued thread:
    nothing is written then."""
    return bool(await conn.fetchval(WRITE_SYNCED_THREAD, *synced_thread_args(
        inbox_id, provider_thread_id, messages, version, queued_id, msg_id)))


def synced_thread_args(inbox_id: uuid.UUID, provider_thread_id: str,
                       messages: Sequence[PreparedMessage], version: datetime,
                       queued_id: int, msg_id: int) -> tuple[Any, ...]:
    """WRITE_SYNCED_THREAD's parameters (see `write_synced_thread`)."""
    if any(p.row["partial"] for p in messages):
        raise ValueError("a thread sync writes complete messages, not partial payloads")
    rows = [p.row for p in messages]
    return (inbox_id, provider_thread_id, rows, [r["provider_message_id"] for r in rows],
            version, queued_id, msg_id)


async def upsert_message(conn: Any, inbox_id: uuid.UUID, message: Message,
                         version: datetime) -> uuid.UUID | None:
    """Write one message (see `upsert_messages`); None when a newer version is stored."""
    written = await upsert_messages(conn, inbox_id, [_prepare(message)], version)
    return written.get(message.id)


# --------------------------------------------------------------------------- threads
# Threads are what their messages say: a thread with message rows whose listing brings no news
# (the same message count and latest message) keeps its derived summary (nova_refresh_threads)
# and deletion; the listing's view goes into a thread with no message row yet, or one that
# changed at the provider (its sync derives it again). Written over an unchanged derived one,
# whose columns differ only in form (folders' order, participants'), a page listed twice (a
# repeated page, a new backfill) changed every thread's row twice for nothing, and the change
# feed recorded both.
_UPSERT_THREADS = """
INSERT INTO flux_email_threads AS t
    (inbox_id, provider_thread_id, subject, snippet, participants, folders, unread, starred,
     has_attachments, message_count, first_message_at, last_message_at, provider_updated_at,
     raw, synced_at, deleted_at)
SELECT $1, x.provider_thread_id, x.subject, x.snippet, x.participants, x.folders, x.unread,
       x.starred, x.has_attachments, x.message_count, x.first_message_at, x.last_message_at, $3,
       x.raw, now(), NULL
FROM jsonb_to_recordset($2::jsonb) AS x(
    provider_thread_id text, subject text, snippet text, participants jsonb, folders text[],
    unread boolean, starred boolean, has_attachments boolean, message_count integer,
    first_message_at timestamptz, last_message_at timestamptz, raw jsonb)
ON CONFLICT (inbox_id, provider_thread_id) DO UPDATE
SET (subject, snippet, participants, folders, unread, starred, has_attachments, message_count,
     first_message_at, last_message_at, deleted_at) = (
        SELECT CASE WHEN k.kept THEN t.subject ELSE EXCLUDED.subject END,
               CASE WHEN k.kept THEN t.snippet ELSE EXCLUDED.snippet END,
               CASE WHEN k.kept THEN t.participants ELSE EXCLUDED.participants END,
               CASE WHEN k.kept THEN t.folders ELSE EXCLUDED.folders END,
               CASE WHEN k.kept THEN t.unread ELSE EXCLUDED.unread END,
               CASE WHEN k.kept THEN t.starred ELSE EXCLUDED.starred END,
               CASE WHEN k.kept THEN t.has_attachments ELSE EXCLUDED.has_attachments END,
               CASE WHEN k.kept THEN t.message_count ELSE EXCLUDED.message_count END,
               CASE WHEN k.kept THEN t.first_message_at ELSE EXCLUDED.first_message_at END,
               CASE WHEN k.kept THEN t.last_message_at ELSE EXCLUDED.last_message_at END,
               CASE WHEN k.kept THEN t.deleted_at END
        FROM (SELECT EXCLUDED.message_count = t.message_count
                     AND EXCLUDED.last_message_at IS NOT DISTINCT FROM t.last_message_at
                     AND EXISTS (SELECT 1 FROM flux_email_messages m WHERE m.thread_id = t.id)
                     AS kept) k),
    provider_updated_at = EXCLUDED.provider_updated_at, raw = EXCLUDED.raw,
    synced_at = now(), updated_at = now()
WHERE t.provider_updated_at IS NULL OR t.provider_updated_at <= EXCLUDED.provider_updated_at
RETURNING id, provider_thread_id
"""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def upsert_threads(conn: Any, inbox_id: uuid.UUID, threads: Sequence[Thread],
                         version: datetime) -> dict[str, uuid.UUID]:
    """Write threads as the provider describes them, in one statement (a page of discovery);
    returns the row id of each written (not refused as older than the stored version). Writing
    a thread's messages afterwards re-derives its summary columns from them; a thread that has
    message rows and no news in the listing keeps its derived summary (see _UPSERT_THREADS)."""
    if not threads:
        return {}
    # Locked in id order first, as every writer of threads takes them (see _LOCK_THREADS): the
    # upsert then visits the page's rows in its own order without waiting for any of them.
    ids = sorted({t.id for t in threads})
    await conn.execute(_ENSURE_THREADS, inbox_id, ids)
    await conn.execute(_LOCK_THREADS, inbox_id, ids, [])
    rows = [{"provider_thread_id": t.id, "subject": t.subject, "snippet": t.snippet,
             "participants": _people(t.participants), "folders": list(t.folders),
             "unread": t.unread, "starred": t.starred, "has_attachments": t.has_attachments,
             "message_count": len(t.message_ids),
             "first_message_at": _iso(t.earliest_message_date),
             "last_message_at": _iso(t.latest_message_date), "raw": _thread_raw(t.raw)}
            for t in {t.id: t for t in threads}.values()]
    return {r["provider_thread_id"]: r["id"]
            for r in await conn.fetch(_UPSERT_THREADS, inbox_id, rows, version)}


async def upsert_thread(conn: Any, inbox_id: uuid.UUID, thread: Thread,
                        version: datetime) -> uuid.UUID | None:
    """One thread (see `upsert_threads`); None when a newer version is stored."""
    return (await upsert_threads(conn, inbox_id, [thread], version)).get(thread.id)


async def refresh_threads(conn: Any, thread_row_ids: Iterable[uuid.UUID]) -> None:
    """Re-derive the summary of threads from their stored messages."""
    ids = sorted(set(thread_row_ids))
    if ids:
        await conn.execute(REFRESH_THREADS, ids)


# --------------------------------------------------------------------------- deletes
_DELETE_MESSAGE = """
INSERT INTO flux_email_messages AS m (inbox_id, provider_message_id, provider_updated_at,
                                      deleted_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (inbox_id, provider_message_id) DO UPDATE
SET deleted_at = coalesce(m.deleted_at, now()), provider_updated_at = EXCLUDED.provider_updated_at,
    updated_at = now()
WHERE m.provider_updated_at IS NULL OR m.provider_updated_at <= EXCLUDED.provider_updated_at
RETURNING id, thread_id
"""

_DELETE_THREAD = """
UPDATE flux_email_threads
SET deleted_at = coalesce(deleted_at, now()), provider_updated_at = $3, updated_at = now()
WHERE inbox_id = $1 AND provider_thread_id = $2
  AND (provider_updated_at IS NULL OR provider_updated_at <= $3)
RETURNING id
"""


_LOCK_THREAD_OF_MESSAGE = """
SELECT t.id FROM flux_email_threads t
JOIN flux_email_messages m ON m.thread_id = t.id
WHERE m.inbox_id = $1 AND m.provider_message_id = $2
FOR UPDATE OF t
"""


async def soft_delete_message(conn: Any, inbox_id: uuid.UUID, provider_message_id: str,
                              version: datetime) -> bool:
    """Mark a message deleted (a tombstone row if it was never stored) and re-derive its
    thread. False when a newer version is stored."""
    await conn.execute(_LOCK_THREAD_OF_MESSAGE, inbox_id, provider_message_id)
    row = await conn.fetchrow(_DELETE_MESSAGE, inbox_id, provider_message_id, version)
    if row is None:
        return False
    if row["thread_id"] is not None:
        await refresh_threads(conn, [row["thread_id"]])
    return True


_DELETE_ABSENT = """
UPDATE flux_email_messages m
SET deleted_at = now(), provider_updated_at = $4, updated_at = now()
FROM flux_email_threads t
WHERE t.inbox_id = $1 AND t.provider_thread_id = $2 AND m.thread_id = t.id
  AND m.deleted_at IS NULL AND m.provider_message_id <> ALL ($3::text[])
  AND (m.provider_updated_at IS NULL OR m.provider_updated_at < $4)
RETURNING m.thread_id
"""


async def delete_absent_messages(conn: Any, inbox_id: uuid.UUID, provider_thread_id: str,
                                 present: Sequence[str], version: datetime) -> int:
    """After a sync of a thread: its stored messages the provider no longer lists were
    deleted there (Nylas announces deletes by webhook, but a webhook can be lost). Only those
    older than the sync's version: one written since (a webhook about mail newer than the
    fetch) is kept. Re-derives the thread; returns how many were deleted."""
    rows = await conn.fetch(_DELETE_ABSENT, inbox_id, provider_thread_id, list(present),
                            version)
    await refresh_threads(conn, [r["thread_id"] for r in rows])
    return len(rows)


async def soft_delete_thread(conn: Any, inbox_id: uuid.UUID, provider_thread_id: str,
                             version: datetime) -> bool:
    """A thread gone at the provider: the thread and its messages (older than `version`)."""
    await delete_absent_messages(conn, inbox_id, provider_thread_id, [], version)
    return await conn.fetchval(_DELETE_THREAD, inbox_id, provider_thread_id,
                               version) is not None


# A thread named by a message while the inbox's backfill runs, and not yet listed by it:
# discovery may miss a thread that moves under it, so it is queued for a whole sync.
_FOLLOW_BACKFILL = """
SELECT queue_thread_sync(c.id, t.tid, 0, true)
FROM flux_inbox_configurations c, unnest($2::text[]) AS t(tid)
WHERE c.inbox_id = $1 AND c.deleted_at IS NULL
  AND c.backfill_status IN ('queued', 'discovering', 'thread_sync')
  AND NOT EXISTS (SELECT 1 FROM queued_threads q
                  WHERE q.config_id = c.id AND q.provider_thread_id = t.tid)
"""


async def follow_backfill(conn: Any, inbox_id: uuid.UUID, thread_ids: Sequence[str]) -> None:
    """Queue the threads a running backfill of the inbox has not listed (webhooks, history)."""
    if thread_ids:
        await conn.fetch(_FOLLOW_BACKFILL, inbox_id, list(thread_ids))
