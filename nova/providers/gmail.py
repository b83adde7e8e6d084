"""Gmail API v1 provider.

Requests are built from the discovery document's paths and parameters (nova.providers.gmail_api,
checked in the tests against google-api-python-client's discovery client) and sent with Nova's
shared ``httpx.AsyncClient``, so they go through the per-user quota budget (nova.ratelimit)
like every provider request, and never block the event loop. Each request
carries its budget entry in ``request.extensions["nova_budget"]``: the user (``gmail:<email>``)
and the quota units of its method.

Google documentation relied on:

* Resources and parameters: https://developers.google.com/workspace/gmail/api/reference/rest
  (``userId`` is the user's address or ``me``; Nova sends the address, so the budget and the
  logs name the user). threads.list ``maxResults`` at most 500, ``includeSpamTrash``, ``q``
  with ``after:``/``before:`` in epoch seconds
  (https://developers.google.com/workspace/gmail/api/guides/filtering).
* Quota: 15,000 units per user per minute (projects created since 1 May 2026 get 6,000), and
  the per-method units of https://developers.google.com/workspace/gmail/api/reference/quota
  (``DEFAULT_COSTS``; GMAIL_QUOTA_COSTS overrides, e.g. the 2026 model's reported
  messages.get 20 and threads.get 40).
* Errors: https://developers.google.com/workspace/gmail/api/guides/handle-errors -- 401
  invalid credentials (refresh the token), 403 ``userRateLimitExceeded`` / ``rateLimitExceeded``
  / ``dailyLimitExceeded`` and 429 ``rateLimitExceeded`` or "Too many concurrent requests"
  (back off), 403 ``insufficientPermissions`` (the grant lacks a scope: re-authorise), 404 not
  found (for history.list: ``startHistoryId`` too old, "perform a full sync"), 5xx backend
  (nova.providers.gmail_errors).
* History: https://developers.google.com/workspace/gmail/api/guides/sync (partial sync,
  history records valid for at least a week, 404 -> full sync).
* Attachments: a part's ``body.attachmentId`` for users.messages.attachments.get, or its
  ``body.data`` inline; attachment ids are not stable across fetches, so Nova keeps the part
  id and looks the part up again when it downloads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from . import gmail_api
from .clean import clean, loads
from .errors import AuthExpired, NotFound, Transient
from .folders import Folder, parse_gmail_label, with_parents
from .gmail_errors import QUOTA_HOLD_SECONDS as QUOTA_HOLD_SECONDS
from .gmail_errors import error_from_response
from .gmail_errors import is_rate_refusal as is_rate_refusal
from .gmail_mime import (
    decode_body_data,
    find_attachment_part,
    parse_message,
    parse_thread_messages,
)
from .models import Attachment, Grant, Message, Page, Thread

DEFAULT_API_URI = "https://gmail.googleapis.com"
MAX_LIST = 500  # threads.list / history.list maxResults maximum
DEFAULT_COSTS: dict[str, int] = {
    "getProfile": 1, "watch": 100, "stop": 50, "labels.list": 1, "labels.get": 1,
    "history.list": 2, "messages.list": 5, "messages.get": 5, "messages.attachments.get": 5,
    "threads.list": 10, "threads.get": 10,
}
HISTORY_TYPES = ("messageAdded", "messageDeleted", "labelAdded", "labelRemoved")


class TokenProvider(Protocol):
    """Access tokens per user (nova.credentials.TokenSource)."""

    async def token(self, grant_id: str) -> str: ...

    def invalidate(self, grant_id: str, token: str | None = None) -> None: ...


class _StaleToken(AuthExpired):
    """The API refused the access token (401): refreshed once, then it is the grant's."""


class CursorExpired(NotFound):
    """history.list answered 404: the start historyId is too old; a full sync is needed."""


@dataclass(frozen=True)
class HistoryPage:
    """One page of history.list, in the order Gmail gives it."""

    records: list[dict[str, Any]]
    next_page_token: str | None
    history_id: str | None  # the mailbox's current history id (the response's historyId)

    @property
    def last_record_id(self) -> str | None:
        ids = [int(r["id"]) for r in self.records if str(r.get("id", "")).isdigit()]
        return str(max(ids)) if ids else None


@dataclass(frozen=True)
class MessageRef:
    """A messages.list item: the message's id and its thread's."""

    id: str
    thread_id: str


@dataclass(frozen=True)
class Watch:
    history_id: str | None
    expiration: datetime | None
    raw: dict[str, Any] = field(default_factory=dict)


def budget_key(request: httpx.Request) -> tuple[str, float] | None:
    """Whose quota a request spends and how many units: set by the provider on the request."""
    entry = request.extensions.get("nova_budget")
    return entry if isinstance(entry, tuple) else None


def user_key(email: str) -> str:
    return "gmail:" + email.lower()


class GmailProvider:
    """:class:`~nova.providers.base.MailProvider` for the Gmail API; ``grant_id`` is the
    user's address. Also the change feed (history.list) and users.watch / users.stop."""

    name = "gmail"
    lists_thread_summaries = False  # threads.list gives ids and snippets only

    def __init__(self, tokens: TokenProvider, api_uri: str = DEFAULT_API_URI, *,
                 client: httpx.AsyncClient, costs: Mapping[str, int] | None = None,
                 transient_retries: int = 0, retry_backoff: float = 0.5,
                 timeout: float = 60.0) -> None:
        self.tokens = tokens
        self.api_uri = api_uri.rstrip("/")
        self.costs = {**DEFAULT_COSTS, **(costs or {})}
        self.transient_retries = transient_retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self._client = client

    # --- transport --------------------------------------------------------------------------
    async def _api(self, grant_id: str, method: str, /, body: Mapping[str, Any] | None = None,
                   **params: Any) -> dict[str, Any]:
        """Call ``method`` of the Gmail API (nova.providers.gmail_api) with ``params``."""
        return await self._call(grant_id, method,
                                gmail_api.build(self.api_uri, method, body, **params))

    async def _call(self, grant_id: str, method: str, built: Any) -> dict[str, Any]:
        """Send a request (nova.providers.gmail_api); JSON answer. Transient errors are
        tried again ``transient_retries`` times; a 401 once more with a fresh token."""
        attempt = 0
        refreshed = False
        while True:
            try:
                return await self._send(grant_id, method, built)
            except _StaleToken as exc:
                if refreshed:
                    raise AuthExpired(str(exc), status=401, error_type=exc.error_type,
                                      provider="gmail") from exc
                refreshed = True  # the token expired early or was revoked: refresh, try again
            except Transient:
                if attempt >= self.transient_retries:
                    raise
                await asyncio.sleep(self.retry_backoff * 2**attempt)
                attempt += 1

    async def _send(self, grant_id: str, method: str, built: Any) -> dict[str, Any]:
        token = await self.tokens.token(grant_id)
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if built.body is not None:
            headers["Content-Type"] = "application/json"
        request = self._client.build_request(
            built.method, built.uri, content=built.body, headers=headers,
            extensions={"nova_budget": (user_key(grant_id), float(self.costs.get(method, 1)))})
        try:
            resp = await self._client.send(request)
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout: {method}", provider="gmail") from exc
        except httpx.TransportError as exc:
            raise Transient(f"transport error: {exc!r}", provider="gmail") from exc
        if resp.status_code == 401:
            self.tokens.invalidate(grant_id, token)
            error = error_from_response(resp.status_code, resp.content, resp.headers)
            raise _StaleToken(str(error), status=401, error_type=error.error_type,
                              provider="gmail")
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, resp.headers)
        if resp.status_code == 204 or not resp.content:
            return {}
        try:
            data = loads(resp.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Transient(f"malformed JSON from {method}", status=resp.status_code,
                            provider="gmail") from exc
        if not isinstance(data, dict):
            raise Transient(f"unexpected answer from {method}", provider="gmail")
        return data

    # --- MailProvider -----------------------------------------------------------------------
    async def list_threads_page(self, grant_id: str, *, page_token: str | None = None,
                                limit: int = 50, received_after: datetime | None = None,
                                received_before: datetime | None = None) -> Page[Thread]:
        data = await self._api(grant_id, "threads.list", **_list_params(
            grant_id, page_token, limit, received_after, received_before))
        threads = [_listed_thread(t, grant_id) for t in data.get("threads") or ()
                   if isinstance(t, dict) and t.get("id")]
        return Page(threads, _token(data))

    async def list_message_refs(self, grant_id: str, *, page_token: str | None = None,
                                limit: int = MAX_LIST, received_after: datetime | None = None,
                                received_before: datetime | None = None) -> Page[MessageRef]:
        """messages.list: each message's id and thread id, no more (5 units a page of up to
        500), over the same mailbox as threads.list (spam and trash included, as threads.get
        gives a thread's messages wherever they are) and the same ``after:``/``before:``."""
        data = await self._api(grant_id, "messages.list", **_list_params(
            grant_id, page_token, limit, received_after, received_before))
        refs = [MessageRef(str(m["id"]), str(m["threadId"])) for m in data.get("messages") or ()
                if isinstance(m, dict) and m.get("id") and m.get("threadId")]
        return Page(refs, _token(data))

    async def get_thread(self, grant_id: str, thread_id: str) -> Thread:
        messages = await self._thread_messages(grant_id, thread_id)
        return thread_of(thread_id, grant_id, messages)

    async def _thread_messages(self, grant_id: str, thread_id: str) -> list[Message]:
        data = await self._api(grant_id, "threads.get", userId=grant_id, id=thread_id,
                               format="full")
        return parse_thread_messages(data, grant_id)

    async def list_messages_page(self, grant_id: str, *, thread_id: str | None = None,
                                 page_token: str | None = None, limit: int = 50,
                                 ) -> Page[Message]:
        """With ``thread_id``: the whole thread in one threads.get (format=full). Without:
        messages.list, then a messages.get per listed message."""
        if thread_id is not None:
            return Page(await self._thread_messages(grant_id, thread_id), None)
        refs = await self.list_message_refs(grant_id, page_token=page_token, limit=limit)
        found = await asyncio.gather(*(self._get_or_none(grant_id, r.id) for r in refs.items))
        return Page([m for m in found if m is not None], refs.next_page_token)

    async def _get_or_none(self, grant_id: str, message_id: str) -> Message | None:
        try:
            return await self.get_message(grant_id, message_id)
        except NotFound:
            return None

    async def list_thread_messages(self, grant_id: str,
                                   thread_id: str) -> AsyncIterator[Message]:
        for message in await self._thread_messages(grant_id, thread_id):
            yield message

    async def _message(self, grant_id: str, message_id: str) -> dict[str, Any]:
        """The Message resource, format full (headers, labels and every part)."""
        return await self._api(grant_id, "messages.get", userId=grant_id, id=message_id,
                               format="full")

    async def get_message(self, grant_id: str, message_id: str, *,
                          include_headers: bool = False) -> Message:
        return parse_message(await self._message(grant_id, message_id), grant_id)

    async def _part(self, grant_id: str, attachment_id: str,
                    message_id: str) -> dict[str, Any]:
        data = await self._message(grant_id, message_id)
        part = find_attachment_part(data.get("payload"), attachment_id)
        if part is None:
            raise NotFound(f"message {message_id} has no part {attachment_id}", status=404,
                           provider="gmail")
        return part

    async def get_attachment(self, grant_id: str, attachment_id: str,
                             message_id: str) -> Attachment:
        message = await self.get_message(grant_id, message_id)
        for attachment in message.attachments:
            if attachment.id == attachment_id:
                return attachment
        raise NotFound(f"message {message_id} has no attachment {attachment_id}", status=404,
                       provider="gmail")

    @asynccontextmanager
    async def download_attachment(self, grant_id: str, attachment_id: str, message_id: str,
                                  ) -> AsyncIterator[_Download]:
        """The part's bytes: inline ``body.data``, else users.messages.attachments.get with
        the part's current attachmentId (ids change between fetches: looked up afresh)."""
        part = await self._part(grant_id, attachment_id, message_id)
        body: dict[str, Any] = part["body"] if isinstance(part.get("body"), dict) else {}
        if body.get("attachmentId"):
            got = await self._api(grant_id, "messages.attachments.get", userId=grant_id,
                                  messageId=message_id, id=str(body["attachmentId"]))
            data = decode_body_data(str(got.get("data") or ""))
        else:
            data = decode_body_data(str(body.get("data") or ""))
        yield _Download(data, _str(part.get("mimeType")), _str(part.get("filename")))

    async def get_grant(self, grant_id: str) -> Grant:
        """The user's standing: valid when a token refreshes and getProfile answers; invalid
        when the refresh token or the scope is refused."""
        try:
            data = await self.profile(grant_id)
        except AuthExpired as exc:
            return Grant(grant_id, "gmail", grant_id, "invalid", None,
                         raw={"error": str(exc)})
        return Grant(grant_id, "gmail", _str(data.get("emailAddress")) or grant_id, "valid",
                     None, raw=data)

    async def aclose(self) -> None:
        """The client belongs to the caller."""

    # --- change feed and push ---------------------------------------------------------------
    async def profile(self, grant_id: str) -> dict[str, Any]:
        return await self._api(grant_id, "getProfile", userId=grant_id)

    async def current_cursor(self, grant_id: str) -> str:
        """Where a change feed read from now starts: the mailbox's current historyId."""
        history_id = (await self.profile(grant_id)).get("historyId")
        if history_id is None or not str(history_id).isdigit():
            raise Transient("getProfile answered without a historyId", provider="gmail")
        return str(history_id)

    async def list_changes(self, grant_id: str, cursor: str, *,
                           page_token: str | None = None) -> HistoryPage:
        """One page of history records after ``cursor``; CursorExpired when it is too old."""
        params: dict[str, Any] = {"userId": grant_id, "startHistoryId": cursor,
                                  "maxResults": MAX_LIST, "historyTypes": list(HISTORY_TYPES)}
        if page_token:
            params["pageToken"] = page_token
        try:
            data = await self._api(grant_id, "history.list", **params)
        except NotFound as exc:
            raise CursorExpired(f"history from {cursor} is no longer available: {exc}",
                                status=404, provider="gmail") from exc
        records = [r for r in data.get("history") or () if isinstance(r, dict)]
        history_id = data.get("historyId")
        return HistoryPage(records, _token(data),
                           str(history_id) if str(history_id or "").isdigit() else None)

    async def watch(self, grant_id: str, topic: str) -> Watch:
        data = await self._api(grant_id, "watch", userId=grant_id, body={
            "topicName": topic, "labelFilterBehavior": "exclude", "labelIds": []})
        expiration = str(data.get("expiration") or "")
        when = (datetime.fromtimestamp(int(expiration) / 1000, UTC)
                if expiration.isdigit() else None)
        history_id = data.get("historyId")
        return Watch(str(history_id) if history_id is not None else None, when, data)

    async def stop(self, grant_id: str) -> None:
        await self._api(grant_id, "stop", userId=grant_id)

    # --- labels (nova.folders) --------------------------------------------------------------
    async def list_folders(self, grant_id: str) -> list[Folder]:
        """Every label (labels.list, 1 unit): ids, names and types; parents from the names.
        The list carries no colours or counts (get_folder does)."""
        data = await self._api(grant_id, "labels.list", userId=grant_id)
        items = data.get("labels") or []
        if not isinstance(items, list):
            raise Transient("labels.list answered without a list", provider="gmail")
        return with_parents([f for f in map(parse_gmail_label, items) if f is not None])

    async def get_folder(self, grant_id: str, folder_id: str) -> Folder | None:
        """One label in full (labels.get, 1 unit): colour and counts. None when gone."""
        try:
            data = await self._api(grant_id, "labels.get", userId=grant_id, id=folder_id)
        except NotFound:
            return None
        return parse_gmail_label(data, detailed=True)


class _Download:
    """:class:`~nova.providers.base.AttachmentStream` over bytes Gmail sent as JSON (at most
    the 25 MB a Gmail message can carry)."""

    def __init__(self, data: bytes, content_type: str | None, filename: str | None,
                 chunk_size: int = 64 * 1024) -> None:
        self._data = data
        self._chunk_size = chunk_size
        self.content_type = content_type
        self.filename = filename
        self.size: int | None = len(data)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        view = memoryview(self._data)
        for start in range(0, len(view), self._chunk_size):
            yield bytes(view[start:start + self._chunk_size])


def _str(value: Any) -> str | None:
    return None if value is None else str(clean(value))


def _token(data: Mapping[str, Any]) -> str | None:
    token = data.get("nextPageToken")
    return str(token) if token else None


def _list_params(grant_id: str, page_token: str | None, limit: int, after: datetime | None,
                 before: datetime | None) -> dict[str, Any]:
    """threads.list / messages.list: the whole mailbox, spam and trash included, between
    ``after:`` and ``before:`` in epoch seconds (the filtering guide's form)."""
    terms = [f"{name}:{int(when.timestamp())}"
             for name, when in (("after", after), ("before", before)) if when is not None]
    params: dict[str, Any] = {"userId": grant_id, "maxResults": max(1, min(limit, MAX_LIST)),
                              "includeSpamTrash": True}
    if terms:
        params["q"] = " ".join(terms)
    if page_token:
        params["pageToken"] = page_token
    return params


def _listed_thread(item: Mapping[str, Any], grant_id: str) -> Thread:
    """A threads.list item: id, snippet and historyId only."""
    return Thread(id=str(item["id"]), grant_id=grant_id, subject=None,
                  snippet=_str(item.get("snippet")), participants=(), message_ids=(),
                  draft_ids=(), folders=(), has_attachments=False, unread=False, starred=False,
                  earliest_message_date=None, latest_message_received_date=None,
                  latest_message_sent_date=None, raw=dict(item))


def thread_of(thread_id: str, grant_id: str, messages: list[Message]) -> Thread:
    """A thread summary from its messages (Gmail has no thread object of its own)."""
    dated = sorted((m for m in messages if m.date is not None),
                   key=lambda m: m.date or datetime.min.replace(tzinfo=UTC))
    latest = dated[-1] if dated else (messages[-1] if messages else None)
    people: dict[str, Any] = {}
    folders: dict[str, None] = {}
    for m in messages:
        for p in (*m.from_, *m.to, *m.cc):
            people.setdefault(p.email.lower(), p)
        folders.update(dict.fromkeys(m.folders))
    return Thread(id=thread_id, grant_id=grant_id,
                  subject=messages[0].subject if messages else None,
                  snippet=latest.snippet if latest else None,
                  participants=tuple(people.values()),
                  message_ids=tuple(m.id for m in messages if "DRAFT" not in m.folders),
                  draft_ids=tuple(m.id for m in messages if "DRAFT" in m.folders),
                  folders=tuple(folders), has_attachments=any(m.attachments for m in messages),
                  unread=any(m.unread for m in messages),
                  starred=any(m.starred for m in messages),
                  earliest_message_date=dated[0].date if dated else None,
                  latest_message_received_date=latest.date if latest else None,
                  latest_message_sent_date=None, latest_message=latest)
