"""Provider-neutral mail objects.  Dates are timezone-aware UTC datetimes; ``raw`` keeps the
provider's original dict so nothing is lost when the store wants more fields later.

Strings in these objects are always storable (see :mod:`nova.providers.clean`): the provider
modules clean every payload before they build a model.

A message may be *partial*: webhook payloads of the ``.transformed`` (only the fields chosen in
the dashboard), ``.metadata`` (headers, no body, snippet or attachments) and ``.truncated`` (no
body) kinds lack fields. ``present`` then names the fields the payload really had; the store
writes only those, so an absent field never blanks a stored value. ``present is None`` means a
complete object (an API answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Participant:
    email: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    id: str
    grant_id: str
    filename: str | None
    content_type: str | None
    size: int | None
    is_inline: bool = False
    content_id: str | None = None
    message_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


# The fields of a message that a partial payload may lack, as the store names them.
MESSAGE_FIELDS = frozenset({
    "thread_id", "subject", "snippet", "from", "to", "cc", "bcc", "reply_to", "date", "body",
    "body_cleaned", "folders", "unread", "starred", "attachments", "headers"})


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    grant_id: str
    thread_id: str | None
    subject: str | None
    from_: tuple[Participant, ...]
    to: tuple[Participant, ...]
    cc: tuple[Participant, ...]
    bcc: tuple[Participant, ...]
    reply_to: tuple[Participant, ...]
    date: datetime | None
    snippet: str | None
    body: str | None
    folders: tuple[str, ...]
    unread: bool
    starred: bool
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...] | None = None  # None: not requested
    created_at: datetime | None = None
    # A `.cleaned` payload's body: markdown made by Nylas, not the message's HTML.
    body_cleaned: str | None = None
    # The message's own text/plain body, where the provider gives the MIME parts (Gmail):
    # stored as body_text instead of a rendering of `body`, which is then its HTML part only.
    text: str | None = None
    present: frozenset[str] | None = None  # None: complete; else the MESSAGE_FIELDS it had
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def has(self, name: str) -> bool:
        """Whether the payload carried field ``name`` (one of MESSAGE_FIELDS)."""
        return self.present is None or name in self.present

    def header(self, name: str) -> str | None:
        for key, value in self.headers or ():
            if key.lower() == name.lower():
                return value
        return None


@dataclass(frozen=True, slots=True)
class Thread:
    id: str
    grant_id: str
    subject: str | None
    snippet: str | None
    participants: tuple[Participant, ...]
    message_ids: tuple[str, ...]
    draft_ids: tuple[str, ...]
    folders: tuple[str, ...]
    has_attachments: bool
    unread: bool
    starred: bool
    earliest_message_date: datetime | None
    latest_message_received_date: datetime | None
    latest_message_sent_date: datetime | None
    latest_message: Message | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def latest_message_date(self) -> datetime | None:
        dates = [d for d in (self.latest_message_received_date, self.latest_message_sent_date)
                 if d is not None]
        return max(dates) if dates else None


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    provider: str | None
    email: str | None
    status: str | None  # "valid" | "invalid" ...
    created_at: datetime | None
    updated_at: datetime | None = None
    scopes: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_valid(self) -> bool:
        return self.status == "valid"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str | None

    @property
    def is_last(self) -> bool:
        return self.next_page_token is None
