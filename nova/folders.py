"""Folders and labels by name: filling `flux_email_folders` and showing it.

Messages keep their provider folder ids (`flux_email_messages.folders`); this module keeps the
folders themselves (sql/150_folders.sql: the views `nova_folders` and `nova_message_folders`,
`nova_find_folders(inbox, name_or_role)`):

| when                                   | what                                             |
| -------------------------------------- | ------------------------------------------------ |
| a backfill starts (nova.backfill)      | the complete listing (Nylas folders list; Gmail  |
|                                        | labels.list, and labels.get for each label:      |
|                                        | colour and counts); folders not listed are       |
|                                        | soft-deleted                                     |
| Nylas folder.created / folder.updated  | the folder upserted from the payload, only the   |
| (nova.webhooks)                        | fields it carries                                |
| Nylas folder.deleted                   | soft delete (a tombstone if never seen)          |
| a Gmail push or poll (nova.webhooks)   | labels.list again (1 quota unit), labels.get for |
|                                        | a label not seen before: Gmail's history has no  |
|                                        | record of a label renamed, created or deleted    |

So a folder renamed at the provider shows its new name once the next webhook of its inbox is
processed: Nylas announces the rename itself; for Gmail the next push (or the poll every
GMAIL_HISTORY_POLL_SECONDS) lists the labels again.

Every write is versioned (a webhook's time, a listing's fetch version, as in nova.store) and
written only when something differs, so a replayed webhook or a repeated listing changes no
row and records no change-feed event (the trigger of sql/150_folders.sql).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from nova import store
from nova.providers.base import FolderDetails, FolderSource
from nova.providers.folders import Folder, folder_id, folder_name, parse_nylas_folder

log = logging.getLogger("nova.folders")

T = TypeVar("T")
Call = Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]
DETAIL_CONCURRENCY = 8
FOLDER_TRIGGERS = ("folder.created", "folder.updated", "folder.deleted")

APPLY = "SELECT inserted, updated FROM nova_apply_folders($1, $2::jsonb, $3::text[], $4)"
DELETE = "SELECT nova_delete_folder($1, $2, $3, $4)"
PRUNE = "SELECT nova_prune_folders($1, $2::text[], $3)"
KNOWN = """
SELECT provider_folder_id FROM flux_email_folders WHERE inbox_id = $1 AND deleted_at IS NULL
"""


@dataclass
class Written:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    def __str__(self) -> str:
        return f"new={self.inserted} changed={self.updated} gone={self.deleted}"


# --------------------------------------------------------------------------- writing
async def write_folders(conn: asyncpg.Connection, inbox_id: uuid.UUID,
                        folders: Sequence[Folder], version: datetime, *,
                        complete: bool) -> Written:
    """Upsert ``folders`` (one statement per field set); ``complete``: a whole listing, so
    the live folders it lacks are soft-deleted. Joins the caller's transaction."""
    out = Written()
    groups: dict[frozenset[str], list[Folder]] = {}
    for folder in folders:
        groups.setdefault(folder.fields, []).append(folder)
    for fields, group in sorted(groups.items(), key=lambda kv: sorted(kv[0])):
        row = await conn.fetchrow(APPLY, inbox_id, [f.row() for f in group], sorted(fields),
                                  version)
        out.inserted += row["inserted"]
        out.updated += row["updated"]
    if complete:
        out.deleted = await conn.fetchval(PRUNE, inbox_id, [f.id for f in folders], version)
    return out


async def apply_event(conn: asyncpg.Connection, inbox_id: uuid.UUID, trigger: str,
                      obj: dict[str, Any], version: datetime) -> str:
    """A Nylas folder.created / folder.updated / folder.deleted notification: the note for
    the notification's row."""
    if trigger == "folder.deleted":
        fid = folder_id(obj.get("id"))
        if fid is None:
            return "folder.deleted without a usable id: nothing to delete"
        changed = await conn.fetchval(DELETE, inbox_id, fid, folder_name(obj.get("name")),
                                      version)
        return f"folder={fid}{'' if changed else ' (already deleted or newer, ignored)'}"
    folder = parse_nylas_folder(obj, partial=True)
    if folder is None:
        return f"{trigger} without a usable id: nothing to write"
    written = await write_folders(conn, inbox_id, [folder], version, complete=False)
    same = written.inserted + written.updated == 0
    return f"folder={folder.id}{' (unchanged or older, ignored)' if same else ''}"


async def sync_folders(pool: asyncpg.Pool, provider: Any, call: Call[Any],
                       inbox_id: uuid.UUID, grant_id: str, *, details: str = "all") -> str:
    """List the inbox's folders and store them (a complete listing). ``call`` wraps each
    provider request (ProviderProcessor.call). ``details``: for a provider whose listing lacks
    colours and counts (Gmail), ask labels.get for "all" labels or only the "new" ones (those
    Nova has no live row of). Returns a note for the log."""
    if not isinstance(provider, FolderSource):
        return "no folders at this provider"
    with store.fetch_version() as fetched:
        listed: list[Folder] = await call(lambda: provider.list_folders(grant_id))
        if isinstance(provider, FolderDetails):
            listed = await _detailed(pool, provider, call, inbox_id, grant_id, listed, details)
    version = fetched()
    async with pool.acquire() as conn, conn.transaction():
        written = await write_folders(conn, inbox_id, listed, version, complete=True)
    if written.inserted or written.updated or written.deleted:
        log.info("[Folders] inbox=%s folders=%d %s", inbox_id, len(listed), written)
    return f"folders={len(listed)} {written}"


async def _detailed(pool: asyncpg.Pool, provider: FolderDetails, call: Call[Any],
                    inbox_id: uuid.UUID, grant_id: str, listed: list[Folder],
                    details: str) -> list[Folder]:
    if details == "all":
        wanted = {f.id for f in listed}
    else:
        known = {r["provider_folder_id"] for r in await pool.fetch(KNOWN, inbox_id)}
        wanted = {f.id for f in listed} - known
    gate = asyncio.Semaphore(DETAIL_CONCURRENCY)

    async def one(fid: str) -> Folder | None:
        async with gate:
            found: Folder | None = await call(lambda: provider.get_folder(grant_id, fid))
            return found

    ids = sorted(wanted)
    found = dict(zip(ids, await asyncio.gather(*(one(fid) for fid in ids)), strict=True))
    out = []
    for f in listed:
        more = found.get(f.id)
        if more is None:
            out.append(f)
            continue
        extra = more.fields & {"colour", "counts"}
        out.append(replace(f, background_color=more.background_color,
                           text_color=more.text_color, total_count=more.total_count,
                           unread_count=more.unread_count, present=f.fields | extra))
    return out


# --------------------------------------------------------------------------- showing
FIND_INBOX = """
SELECT id, email, provider, grant_id, status, last_event_at FROM flux_inboxes
WHERE deleted_at IS NULL AND (id::text = %(ref)s OR grant_id = %(ref)s
                              OR lower(email) = lower(%(ref)s))
"""
FOLDERS = """
SELECT f.provider_folder_id, f.name, f.role, f.system_folder, f.provider_parent_id,
       f.background_color, f.total_count, f.unread_count, f.counts_at,
       coalesce(c.messages, 0) AS messages, coalesce(c.unread, 0) AS unread
FROM flux_email_folders f
LEFT JOIN nova_folder_message_counts(%(inbox)s) c
       ON c.provider_folder_id = f.provider_folder_id
WHERE f.inbox_id = %(inbox)s AND f.deleted_at IS NULL
"""
ROLE_ORDER = ("inbox", "starred", "important", "sent", "drafts", "archive", "all", "spam",
              "trash", "unread", "chat")
NAME_WIDTH = 40


def shown(text: str, width: int = NAME_WIDTH) -> str:
    """A name made safe for one terminal cell: control and format characters (newlines, escape
    sequences, bidi overrides) escaped, cut to ``width`` with an ellipsis."""
    out = "".join(map(_cell, text))
    return out if len(out) <= width else out[:width - 1] + "\u2026"


def _cell(ch: str) -> str:
    if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"):
        return ch
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def _path(folder: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    """The folder's name under its parents' (Nylas parent_id; Gmail names are paths already)."""
    parts = [folder["name"]]
    seen = {folder["provider_folder_id"]}
    parent = folder["provider_parent_id"]
    while parent and parent in by_id and parent not in seen and len(parts) < 10:
        seen.add(parent)
        above = by_id[parent]["name"]
        if not parts[0].startswith(above + "/"):  # a Gmail child's name holds its parent's
            parts.insert(0, above)
        parent = by_id[parent]["provider_parent_id"]
    return "/".join(parts)


def _order(folder: dict[str, Any]) -> tuple[int, int, str]:
    role = folder["role"]
    rank = ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)
    return (0 if role else 1, rank, folder["path"].lower())


def show_inbox(conn: Any, ref: str, *, as_json: bool = False) -> int:
    """`nova inbox show INBOX`: the inbox and its folders by name, with Nova's message counts
    and the provider's. ``conn``: a psycopg connection with dict rows. Exit code."""
    rows = conn.execute(FIND_INBOX, {"ref": ref}).fetchall()
    if len(rows) != 1:
        what = "no inbox" if not rows else f"{len(rows)} inboxes match"
        print(f"nova: {what} {ref!r} (give its id, grant id or email)", file=sys.stderr)
        return 1
    inbox = rows[0]
    folders = conn.execute(FOLDERS, {"inbox": inbox["id"]}).fetchall()
    by_id = {f["provider_folder_id"]: f for f in folders}
    for f in folders:
        f["path"] = _path(f, by_id)
    folders.sort(key=_order)
    if as_json:
        print(json.dumps({**inbox, "folders": folders}, default=str, indent=2))
        return 0
    print(f"inbox {inbox['id']}  {shown(inbox['email'], 60)}  ({inbox['provider']}, "
          f"{inbox['status']})")
    if not folders:
        print("no folders stored yet (they are listed when a backfill starts)")
        return 0
    print(f"{'folder':<{NAME_WIDTH}}  {'role':<19} {'messages':>9} {'unread':>7}  "
          f"{'provider total/unread':>21}  id")
    for f in folders:
        provider = "-" if f["total_count"] is None and f["unread_count"] is None else \
            f"{_n(f['total_count'])}/{_n(f['unread_count'])}"
        print(f"{shown(f['path']):<{NAME_WIDTH}}  {f['role'] or '-':<19} {f['messages']:>9,} "
              f"{f['unread']:>7,}  {provider:>21}  {shown(f['provider_folder_id'], 60)}")
    print(f"{len(folders)} folder(s)")
    return 0


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"
