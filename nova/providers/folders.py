"""Folders (Nylas) and labels (Gmail) as one provider-neutral object, cleaned where they enter.

A name is data, never a path: it is made storable (nova.providers.clean: no NUL, no lone
surrogate), cut to NAME_LIMIT characters (the name index holds a few thousand bytes) and kept
otherwise as the provider spelled it, slashes, dots and control characters included; whoever
shows it escapes it (nova.folders does). Ids too long for an index entry are refused: such a
folder is skipped with a warning, never the listing. Colours are kept only as ``#rgb`` ..
``#rrggbbaa`` hex, counts only as non-negative 32-bit integers.

Roles are one vocabulary for both providers:

* Nylas ``attributes`` (RFC 6154 / RFC 9051 special-use names; Nylas maps every provider's
  system folders to ``\\Inbox``, ``\\Sent``, ``\\Drafts``, ``\\Junk``, ``\\Trash``,
  ``\\Archive``: https://developer.nylas.com/docs/v3/email/folders/) give inbox, sent, drafts,
  spam, trash, archive, and all, starred, important for ``\\All``, ``\\Flagged``,
  ``\\Important``;
* Gmail's system label ids (https://developers.google.com/workspace/gmail/api/guides/labels)
  give inbox, sent, drafts, trash, spam, starred, important, unread, chat and category_*; a
  Nylas system folder of a Google grant carries the same ids, so it maps the same way.

A user's own folder has no role.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from .clean import clean_text

log = logging.getLogger("nova.providers")

NAME_LIMIT = 400  # characters (migrations/0016_folders.sql)
ID_LIMIT = 512  # characters of a provider id; a longer one is refused
ATTRIBUTE_LIMIT = 32  # attributes kept per folder, each at most 64 characters
COUNT_LIMIT = 2**31 - 1
# The fields a payload may carry, as nova_apply_folders names them (sql/150_folders.sql).
FOLDER_FIELDS = frozenset({"name", "parent", "role", "colour", "counts", "attributes"})

NYLAS_ATTRIBUTE_ROLES = {
    "\\inbox": "inbox", "\\sent": "sent", "\\drafts": "drafts", "\\junk": "spam",
    "\\spam": "spam", "\\trash": "trash", "\\archive": "archive", "\\all": "all",
    "\\flagged": "starred", "\\important": "important",
}
GMAIL_SYSTEM_ROLES = {
    "INBOX": "inbox", "SENT": "sent", "DRAFT": "drafts", "TRASH": "trash", "SPAM": "spam",
    "STARRED": "starred", "IMPORTANT": "important", "UNREAD": "unread", "CHAT": "chat",
    "CATEGORY_PERSONAL": "category_personal", "CATEGORY_SOCIAL": "category_social",
    "CATEGORY_PROMOTIONS": "category_promotions", "CATEGORY_UPDATES": "category_updates",
    "CATEGORY_FORUMS": "category_forums",
}
_COLOUR = re.compile(r"^#(?:[0-9a-f]{3}|[0-9a-f]{4}|[0-9a-f]{6}|[0-9a-f]{8})$")


@dataclass(frozen=True, slots=True)
class Folder:
    """A folder or label. ``present`` names the FOLDER_FIELDS the payload had (a webhook may
    lack some); None means every field (a listing), and then an absent value is no value."""

    id: str
    name: str | None
    parent_id: str | None = None
    role: str | None = None
    system: bool = False
    background_color: str | None = None
    text_color: str | None = None
    total_count: int | None = None
    unread_count: int | None = None
    attributes: tuple[str, ...] | None = None
    present: frozenset[str] | None = None

    def has(self, field: str) -> bool:
        return self.present is None or field in self.present

    @property
    def fields(self) -> frozenset[str]:
        return FOLDER_FIELDS if self.present is None else self.present

    def row(self) -> dict[str, Any]:
        """The object nova_apply_folders reads."""
        return {"id": self.id, "name": self.name, "parent_id": self.parent_id,
                "role": self.role, "system": self.system,
                "attributes": list(self.attributes) if self.attributes is not None else None,
                "background_color": self.background_color, "text_color": self.text_color,
                "total_count": self.total_count, "unread_count": self.unread_count}


def folder_id(value: Any) -> str | None:
    """A provider id as stored, or None when there is none or it is unusable."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    text = clean_text(str(value))
    if not text or len(text) > ID_LIMIT:
        if text:
            log.warning("[Folders] a folder id of %d characters was refused", len(text))
        return None
    return text


def folder_name(value: Any) -> str | None:
    """A display name as stored: storable, at most NAME_LIMIT characters; None when empty."""
    if value is None or isinstance(value, bool | dict | list):
        return None
    text = clean_text(str(value))[:NAME_LIMIT]
    return text if text.strip() else None


def colour(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    return text if _COLOUR.match(text) else None


def count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if 0 <= number <= COUNT_LIMIT else None


def attributes(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    out = [clean_text(str(v))[:64] for v in value if isinstance(v, str) and v.strip()]
    return tuple(dict.fromkeys(out))[:ATTRIBUTE_LIMIT]


def nylas_role(attrs: tuple[str, ...] | None, system: bool, fid: str) -> str | None:
    """The role of a Nylas folder: from its attributes, else (a system folder of a Google
    grant, whose id is Gmail's label id) from its id."""
    for attr in attrs or ():
        role = NYLAS_ATTRIBUTE_ROLES.get(attr.lower())
        if role is not None:
            return role
    return GMAIL_SYSTEM_ROLES.get(fid) if system else None


def gmail_role(label_id: str, system: bool) -> str | None:
    return GMAIL_SYSTEM_ROLES.get(label_id) if system else None


# --------------------------------------------------------------------------- Nylas
def parse_nylas_folder(data: Any, *, partial: bool = False) -> Folder | None:
    """A Nylas v3 Folder object (https://developer.nylas.com/docs/reference/api/folders/: id,
    grant_id, name, parent_id, attributes, system_folder, background_color, text_color,
    total_count, unread_count, child_count) or a folder.* notification's object (id, name,
    system_folder, grant_id: https://developer.nylas.com/docs/reference/notifications/folders/
    folder-updated/). ``partial``: the fields it lacks are unknown, not empty. None without a
    usable id."""
    if not isinstance(data, dict):
        return None
    fid = folder_id(data.get("id"))
    if fid is None:
        return None
    attrs = attributes(data.get("attributes")) or ()
    # system_folder is documented for Google grants; elsewhere a special-use attribute says it
    system = data.get("system_folder") is True or any(
        a.lower() in NYLAS_ATTRIBUTE_ROLES for a in attrs)
    name = folder_name(data.get("name"))
    has_counts = "total_count" in data or "unread_count" in data
    if partial:
        keys = {"name"} if name is not None else set()
        keys |= {"parent"} if "parent_id" in data else set()
        # system_folder is documented for Google grants only: its false, without attributes,
        # does not say a Microsoft folder has no role
        keys |= {"role"} if "attributes" in data or system else set()
        keys |= {"attributes"} if "attributes" in data else set()
        keys |= {"colour"} if "background_color" in data or "text_color" in data else set()
        keys |= {"counts"} if has_counts else set()
        present: frozenset[str] | None = frozenset(keys)
    else:  # a listing: an absent field is no value, but counts only when they were sent
        present = None if has_counts else FOLDER_FIELDS - {"counts"}
    return Folder(
        id=fid, name=name, parent_id=folder_id(data.get("parent_id")),
        role=nylas_role(attrs, system, fid), system=system,
        background_color=colour(data.get("background_color")),
        text_color=colour(data.get("text_color")), total_count=count(data.get("total_count")),
        unread_count=count(data.get("unread_count")), attributes=attrs, present=present)


# --------------------------------------------------------------------------- Gmail
def parse_gmail_label(data: Any, *, detailed: bool = False) -> Folder | None:
    """A Gmail Label resource (https://developers.google.com/workspace/gmail/api/reference/
    rest/v1/users.labels: id, name, type system | user, color {backgroundColor, textColor},
    messagesTotal, messagesUnread ...). labels.list gives "only id, name,
    messageListVisibility, labelListVisibility and type" (its reference), so a listed label's
    colour and counts are unknown, not empty; ``detailed`` (a labels.get answer): an absent
    colour is none. The parent is set by `with_parents`."""
    if not isinstance(data, dict):
        return None
    fid = folder_id(data.get("id"))
    if fid is None:
        return None
    system = data.get("type") == "system"
    raw_color = data.get("color")
    color: dict[str, Any] = raw_color if isinstance(raw_color, dict) else {}
    has_counts = "messagesTotal" in data or "messagesUnread" in data
    keys = {"name", "parent", "role"}
    keys |= {"colour"} if detailed or "color" in data else set()
    keys |= {"counts"} if has_counts else set()
    return Folder(
        id=fid, name=folder_name(data.get("name")), role=gmail_role(fid, system),
        system=system, background_color=colour(color.get("backgroundColor")),
        text_color=colour(color.get("textColor")), total_count=count(data.get("messagesTotal")),
        unread_count=count(data.get("messagesUnread")), present=frozenset(keys))


def with_parents(labels: list[Folder]) -> list[Folder]:
    """Gmail nests labels by name ("Clients/Acme" sits under "Clients"): each label's parent is
    the label named by its name's longest prefix before a '/' that names one."""
    by_name = {f.name: f.id for f in labels if f.name}
    out = []
    for f in labels:
        parent = None
        name = f.name or ""
        while "/" in name and parent is None:
            name = name.rsplit("/", 1)[0]
            parent = by_name.get(name)
        out.append(replace(f, parent_id=None if parent == f.id else parent))
    return out
