"""The interface every mail provider implements (Nylas today; Gmail API later).

Providers never sleep on rate limits; they raise :class:`~nova.providers.errors.RateLimited`
with ``retry_after`` and let the runtime schedule the retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from .folders import Folder
from .models import Attachment, Grant, Message, Page, Thread


@runtime_checkable
class AttachmentStream(Protocol):
    """An open download.  Iterate for byte chunks; the file is never held in memory whole."""

    content_type: str | None
    filename: str | None
    size: int | None  # from Content-Length when the server sends it

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@runtime_checkable
class MailProvider(Protocol):
    name: str

    async def list_threads_page(self, grant_id: str, *, page_token: str | None = None,
                                limit: int = 50, received_after: datetime | None = None,
                                received_before: datetime | None = None) -> Page[Thread]:
        """One page of threads, newest first.  Feed ``next_page_token`` back to continue."""
        ...

    async def get_thread(self, grant_id: str, thread_id: str) -> Thread: ...

    async def list_messages_page(self, grant_id: str, *, thread_id: str | None = None,
                                 page_token: str | None = None, limit: int = 50,
                                 ) -> Page[Message]:
        """One page of messages, newest first; with ``thread_id``, that thread's only."""
        ...

    def list_thread_messages(self, grant_id: str, thread_id: str) -> AsyncIterator[Message]:
        """Every message of a thread across all pages."""
        ...

    async def get_message(self, grant_id: str, message_id: str, *,
                          include_headers: bool = False) -> Message: ...

    async def get_attachment(self, grant_id: str, attachment_id: str,
                             message_id: str) -> Attachment: ...

    def download_attachment(self, grant_id: str, attachment_id: str, message_id: str,
                            ) -> AbstractAsyncContextManager[AttachmentStream]:
        """``async with p.download_attachment(...) as s: async for chunk in s: ...``"""
        ...

    async def get_grant(self, grant_id: str) -> Grant: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """A provider that lists a mailbox's changes since a cursor (Gmail: history.list). Its
    inboxes sync incrementally (nova.changes) and their backfills need no change rounds."""

    async def current_cursor(self, grant_id: str) -> str:
        """The feed's position now: changes after it are listed from it."""
        ...

    async def list_changes(self, grant_id: str, cursor: str, *,
                           page_token: str | None = None) -> Any:
        """One page of changes after ``cursor`` (CursorExpired when it is too old)."""
        ...


@runtime_checkable
class FolderSource(Protocol):
    """A provider that lists a mailbox's folders or labels (nova.folders)."""

    async def list_folders(self, grant_id: str) -> list[Folder]:
        """Every folder: a complete listing (one not listed is gone)."""
        ...


@runtime_checkable
class FolderDetails(Protocol):
    """A provider whose listing lacks colours and counts (Gmail's labels.list): one folder in
    full, None when it is gone."""

    async def get_folder(self, grant_id: str, folder_id: str) -> Folder | None: ...
