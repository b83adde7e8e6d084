"""Folders of the Nylas sandbox: ``GET /v3/grants/{grant_id}/folders`` and the ``folder.*``
notifications of a folder created, renamed (or recoloured, moved) and deleted.

Modelled on https://developer.nylas.com/docs/reference/api/folders/get-folder/ ("returns all
folders for all providers. Nylas flattens sub-folders into a single list"; ``limit``,
``page_token`` in, ``next_cursor`` out) and the Folder object (``id``, ``grant_id``, ``name``,
``object: "folder"``, ``parent_id``, ``attributes``, ``system_folder``, ``background_color``,
``text_color`` (Google only), ``total_count``, ``unread_count``, ``child_count``). System
folders carry the common attributes Nylas maps them to (``\\Inbox``, ``\\Sent``, ``\\Drafts``,
``\\Junk``, ``\\Trash``, ``\\Archive``: https://developer.nylas.com/docs/v3/email/folders/).

Ids: the sandbox's messages name their folders with Gmail-style ids (``INBOX``,
``CATEGORY_UPDATES``, ``Label_Projects``) whatever the grant's provider, so every grant's
folders carry those ids; a Microsoft or IMAP grant gets display names ("Inbox", "Sent Items").

Counts are the mailbox's own when the grant has at most COUNT_LIMIT threads (counting means
generating every thread); above that the count fields are left out, as the optional fields they
are.

Notifications (https://developer.nylas.com/docs/reference/notifications/folders/): object
``{grant_id, id, name, object: "folder", system_folder}``, source
``/<provider>/emails/incremental``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from nylas.models.webhooks import WebhookTriggers

from .mailbox import MAX_LIMIT, GrantRec, Mailbox
from .webhooks import Notification, WebhookBuilder

COUNT_LIMIT = 5000
# (id, Google name, other providers' name, attributes)
SYSTEM = [
    ("INBOX", "INBOX", "Inbox", ["\\Inbox"]), ("SENT", "SENT", "Sent Items", ["\\Sent"]),
    ("DRAFT", "DRAFT", "Drafts", ["\\Drafts"]), ("TRASH", "TRASH", "Deleted Items", ["\\Trash"]),
    ("SPAM", "SPAM", "Junk Email", ["\\Junk"]), ("IMPORTANT", "IMPORTANT", "Important", []),
    ("STARRED", "STARRED", "Flagged", []), ("UNREAD", "UNREAD", "Unread", []),
    ("CATEGORY_PERSONAL", "CATEGORY_PERSONAL", "Personal", []),
    ("CATEGORY_UPDATES", "CATEGORY_UPDATES", "Updates", []),
]
USER = [("Label_Projects", "Projects", None, "#16a766", "#ffffff"),
        ("Label_Projects_2024", "2024", "Label_Projects", None, None)]


@dataclass
class FolderRec:
    id: str
    name: str
    system: bool = False
    attributes: list[str] = field(default_factory=list)
    parent_id: str | None = None
    background_color: str | None = None
    text_color: str | None = None

    def to_json(self, grant: GrantRec, counts: dict[str, tuple[int, int]] | None,
                children: int) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "grant_id": grant.id, "name": self.name,
                               "object": "folder", "system_folder": self.system,
                               "attributes": list(self.attributes), "child_count": children}
        if self.parent_id is not None:
            out["parent_id"] = self.parent_id
        if grant.provider == "google":  # background_color and text_color: Google only
            for key in ("background_color", "text_color"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
        if counts is not None:
            total, unread = counts.get(self.id, (0, 0))
            out["total_count"], out["unread_count"] = total, unread
        return out


class Folders:
    """Every grant's folders, made when first asked for. Thread-safe."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.lock = threading.Lock()
        self._by_grant: dict[str, dict[str, FolderRec]] = {}
        self._counter = 0

    def _of(self, gid: str) -> dict[str, FolderRec]:
        found = self._by_grant.get(gid)
        if found is None:
            google = self.mailbox.grants[gid].provider == "google"
            found = {fid: FolderRec(fid, gname if google else other, True, list(attrs))
                     for fid, gname, other, attrs in SYSTEM}
            for fid, name, parent, bg, text in USER:
                found[fid] = FolderRec(fid, name, parent_id=parent, background_color=bg,
                                       text_color=text)
            self._by_grant[gid] = found
        return found

    def of_grant(self, gid: str) -> list[FolderRec]:
        with self.lock:
            return sorted(self._of(gid).values(), key=lambda f: f.id)

    def get(self, gid: str, fid: str) -> FolderRec | None:
        with self.lock:
            return self._of(gid).get(fid)

    def create(self, gid: str, name: str, *, parent_id: str | None = None,
               background_color: str | None = None, text_color: str | None = None,
               folder_id: str | None = None) -> FolderRec:
        with self.lock:
            folders = self._of(gid)
            if parent_id is not None and parent_id not in folders:
                raise KeyError(parent_id)
            self._counter += 1
            fid = folder_id or f"Label_{self._counter:04d}"
            if fid in folders:
                raise ValueError(f"folder {fid} exists")
            rec = FolderRec(fid, name, parent_id=parent_id, background_color=background_color,
                            text_color=text_color)
            folders[fid] = rec
            return rec

    def update(self, gid: str, fid: str, **changes: Any) -> FolderRec:
        """``name``, ``parent_id``, ``background_color``, ``text_color``."""
        with self.lock:
            rec = self._of(gid)[fid]
            for key, value in changes.items():
                if key not in ("name", "parent_id", "background_color", "text_color"):
                    raise TypeError(f"a folder has no {key!r} to change")
                setattr(rec, key, value)
            return rec

    def delete(self, gid: str, fid: str) -> FolderRec:
        with self.lock:
            return self._of(gid).pop(fid)

    def counts(self, gid: str) -> dict[str, tuple[int, int]] | None:
        """Messages and unread messages per folder id; None past COUNT_LIMIT threads."""
        mb = self.mailbox
        with mb.lock:
            keys = mb._thread_keys(gid)
            if len(keys) > COUNT_LIMIT:
                return None
            out: dict[str, list[int]] = {}
            for _, tid in keys:
                thread = mb.thread(gid, tid)
                for m in thread.messages if thread is not None else ():
                    for fid in m.folders:
                        pair = out.setdefault(fid, [0, 0])
                        pair[0] += 1
                        pair[1] += int(m.unread)
            return {k: (v[0], v[1]) for k, v in out.items()}

    def page(self, grant: GrantRec, *, limit: int = 50, cursor: str | None = None,
             ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the list, by id, with ``next_cursor`` (the mailbox's expiring tokens)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        mb = self.mailbox
        with mb.lock:
            after = mb._redeem("f", cursor)
        folders = self.of_grant(grant.id)
        children: dict[str, int] = {}
        for f in folders:
            if f.parent_id is not None:
                children[f.parent_id] = children.get(f.parent_id, 0) + 1
        rest = [f for f in folders if after is None or f.id > after[1]]
        items, more = rest[:limit], len(rest) > limit
        counts = self.counts(grant.id)
        data = [f.to_json(grant, counts, children.get(f.id, 0)) for f in items]
        with mb.lock:
            nxt = mb._issue("f", (0, items[-1].id)) if more else None
        return data, nxt


def folder_event(builder: WebhookBuilder, trigger: WebhookTriggers, grant: GrantRec,
                 folder: FolderRec) -> Notification:
    obj = {"grant_id": grant.id, "id": folder.id, "name": folder.name, "object": "folder",
           "system_folder": folder.system}
    return builder.build(trigger.value, f"/{grant.provider}/emails/incremental", obj)
