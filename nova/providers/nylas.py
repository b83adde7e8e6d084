"""Nylas v3 provider.

Every request -- thread pages, thread messages, single messages, attachment metadata and
downloads, the grant -- goes through ONE shared ``httpx.AsyncClient`` (HTTP keep-alive, bounded
connection pool, one timeout policy); the processors give it the budgeted client of
:mod:`nova.ratelimit`, so every answer is paced, counted in the metrics and learned from. The
official ``nylas`` SDK is not used for requests: it is synchronous (``requests``), opens a
connection per call, retries nothing, ignores ``Retry-After`` and cannot share that async
client, so its calls would bypass the budget and the metrics. The tests use it as the reference
client the provider's answers are checked against, and the sandbox names its webhook triggers
with the SDK's ``WebhookTriggers``.

Nylas documentation relied on:

* Base URL / auth: ``Authorization: Bearer <NYLAS_API_KEY>`` against ``https://api.us.nylas.com``
  (``nylas.config.DEFAULT_SERVER_URL``), grant-scoped paths ``/v3/grants/{grant_id}/...``
  (https://developer.nylas.com/docs/reference/api/).
* Lists answer ``{"request_id", "data": [...], "next_cursor"}``; pass ``next_cursor`` back as
  ``page_token``; ``limit`` max 200 (https://developer.nylas.com/docs/api/v3/#pagination,
  SDK ``ListQueryParams``).
* Threads filter by ``latest_message_after`` / ``latest_message_before`` (unix seconds; SDK
  ``ListThreadsQueryParams``); messages by ``thread_id``, ``received_after``,
  ``received_before``, and ``fields=include_headers`` returns ``headers``
  (https://developer.nylas.com/docs/reference/api/messages/, SDK ``ListMessagesQueryParams``).
* Attachments: ``GET /v3/grants/{g}/attachments/{id}?message_id=`` (metadata) and
  ``.../download?message_id=`` (bytes) (https://developer.nylas.com/docs/reference/api/attachments/).
* Folders: ``GET /v3/grants/{g}/folders`` (``limit``, ``page_token``; one list for folders
  and labels) (https://developer.nylas.com/docs/reference/api/folders/).
* Grants: ``GET /v3/grants/{grant_id}`` answers the grant, ``grant_status`` ``valid`` or
  ``invalid`` (expired) (https://developer.nylas.com/docs/reference/api/manage-grants/; the
  SDK's ``grants.find``).
* Errors: ``{"request_id", "error": {"type", "message", "provider_error"?}}`` with the type
  table at https://developer.nylas.com/docs/api/errors/ (``grant.not_found`` 404,
  ``api.authentication_error`` 401, ``token.unauthorized_access`` 400 "Invalid API key",
  ``grant.access_denied`` 403 ...); 401/403 for a grant mean re-authenticate
  (https://developer.nylas.com/docs/v3/auth/troubleshooting/); 429 carries ``Retry-After``
  (https://developer.nylas.com/docs/dev-guide/platform/rate-limits/).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote

import httpx

from .clean import clean, loads
from .errors import (
    GrantNotFound,
    InvalidApiKey,
    NotFound,
    Permanent,
    ProviderError,
    RateLimited,
    Transient,
    Unauthorized,
)
from .folders import Folder, parse_nylas_folder
from .models import MESSAGE_FIELDS, Attachment, Grant, Message, Page, Participant, Thread

DEFAULT_API_URI = "https://api.us.nylas.com"
MAX_LIMIT = 200
# 400 "Invalid API key" is unambiguous; a 401 is not (see error_from_response).
_API_KEY_ERRORS = {"token.unauthorized_access"}


# --------------------------------------------------------------------------- parsing
def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _people(value: Any) -> tuple[Participant, ...]:
    out = []
    for p in value if isinstance(value, list) else ():
        if isinstance(p, Mapping) and p.get("email"):
            name = p.get("name")
            out.append(Participant(email=str(p["email"]),
                                   name=str(name) if name else None))
    return tuple(out)


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def parse_attachment(data: Mapping[str, Any], grant_id: str,
                     message_id: str | None = None, *, storable: bool = False) -> Attachment:
    """``storable``: `data` came from `loads` (or Postgres), already clean (see parse_message)."""
    d: dict[str, Any] = dict(data) if storable else clean(dict(data))
    size = d.get("size")
    return Attachment(
        id=str(d["id"]), grant_id=str(d.get("grant_id") or grant_id),
        filename=_str(d.get("filename")), content_type=_str(d.get("content_type")),
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0
        else None,
        is_inline=bool(d.get("is_inline")), content_id=_str(d.get("content_id")),
        message_id=message_id, raw=d)


# Payload keys behind each MESSAGE_FIELDS name that differs from its key.
_KEY_OF = {"body_cleaned": "body"}


def parse_message(data: Mapping[str, Any], grant_id: str, *, partial: bool = False,
                  cleaned: bool = False, storable: bool = False) -> Message:
    """A message from an API answer, or (``partial``) from a webhook payload that may lack
    fields. ``cleaned``: the payload is a `.cleaned` one, whose ``body`` is Nylas's markdown
    rendering (unless ``cleaning_status`` says the cleaning failed: then it is the HTML)
    (https://developer.nylas.com/docs/reference/notifications/messages/message-created-cleaned/).
    ``storable``: `data` was decoded by `loads`, which cleaned it already: it is not walked
    again (the walk cost more than the rest of the parsing).
    """
    d: dict[str, Any] = dict(data) if storable else clean(dict(data))
    markdown = cleaned and d.get("cleaning_status") != "failed"
    present: frozenset[str] | None = None
    if partial:
        keys = {f for f in MESSAGE_FIELDS if _KEY_OF.get(f, f) in d}
        if "body" in keys:
            keys.discard("body_cleaned" if not markdown else "body")
        present = frozenset(keys)
    elif markdown:
        present = MESSAGE_FIELDS - {"body"}
    headers = d.get("headers")
    body = d.get("body")
    return Message(
        id=str(d["id"]), grant_id=str(d.get("grant_id") or grant_id),
        thread_id=_str(d.get("thread_id")), subject=_str(d.get("subject")),
        from_=_people(d.get("from")), to=_people(d.get("to")), cc=_people(d.get("cc")),
        bcc=_people(d.get("bcc")), reply_to=_people(d.get("reply_to")),
        date=_dt(d.get("date")), snippet=_str(d.get("snippet")),
        body=None if markdown or body is None else str(body),
        body_cleaned=str(body) if markdown and body is not None else None,
        folders=tuple(str(f) for f in d.get("folders") or ()), unread=bool(d.get("unread")),
        starred=bool(d.get("starred")),
        attachments=tuple(parse_attachment(a, grant_id, str(d["id"]), storable=True)
                          for a in d.get("attachments") or () if isinstance(a, Mapping)),
        headers=None if not isinstance(headers, list) else tuple(
            (str(h.get("name")), str(h.get("value"))) for h in headers
            if isinstance(h, Mapping)),
        created_at=_dt(d.get("created_at")), present=present, raw=d)


def parse_thread(data: Mapping[str, Any], grant_id: str, *, storable: bool = False) -> Thread:
    """A thread object; ``storable`` as for `parse_message`."""
    d: dict[str, Any] = dict(data) if storable else clean(dict(data))
    latest = d.get("latest_draft_or_message")
    return Thread(
        id=str(d["id"]), grant_id=str(d.get("grant_id") or grant_id),
        subject=_str(d.get("subject")), snippet=_str(d.get("snippet")),
        participants=_people(d.get("participants")),
        message_ids=tuple(str(m) for m in d.get("message_ids") or ()),
        draft_ids=tuple(str(m) for m in d.get("draft_ids") or ()),
        folders=tuple(str(f) for f in d.get("folders") or ()),
        has_attachments=bool(d.get("has_attachments")),
        unread=bool(d.get("unread")), starred=bool(d.get("starred")),
        earliest_message_date=_dt(d.get("earliest_message_date")),
        latest_message_received_date=_dt(d.get("latest_message_received_date")),
        latest_message_sent_date=_dt(d.get("latest_message_sent_date")),
        latest_message=parse_message(latest, grant_id, storable=True)
        if isinstance(latest, Mapping) and latest.get("object") == "message" else None,
        raw=d)


def parse_grant(data: Mapping[str, Any]) -> Grant:
    d: dict[str, Any] = clean(dict(data))
    return Grant(id=str(d["id"]), provider=d.get("provider"), email=d.get("email"),
                 status=d.get("grant_status"), created_at=_dt(d.get("created_at")),
                 updated_at=_dt(d.get("updated_at")), scopes=tuple(d.get("scope") or ()),
                 raw=dict(d))


# --------------------------------------------------------------------------- budget
def grant_of(path: str) -> str | None:
    """The grant of a grant-scoped Nylas path (/v3/grants/{grant}/...); None otherwise (the
    grant object itself, /v3/grants/{grant}, is an application call with its own limit)."""
    parts = path.split("?", 1)[0].split("/")
    if len(parts) >= 5 and parts[1] == "v3" and parts[2] == "grants" and parts[3]:
        return unquote(parts[3])
    return None


def budget_key(request: httpx.Request) -> tuple[str, float] | None:
    """Whose budget a request spends and how much: its grant, one request."""
    grant = grant_of(request.url.raw_path.decode("ascii", "replace"))
    return None if grant is None else (grant, 1.0)


# --------------------------------------------------------------------------- errors
def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is delta-seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> ProviderError:
    """Classify an HTTP error answer; tolerate bodies that are not Nylas JSON at all."""
    error_type: str | None = None
    request_id: str | None = None
    message = ""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
        err = data.get("error")
        if isinstance(err, dict):
            error_type = err.get("type") if isinstance(err.get("type"), str) else None
            message = str(err.get("message") or "")
        elif isinstance(err, str):
            message = err
        if not error_type and isinstance(data.get("type"), str):
            error_type = data["type"]
        message = message or str(data.get("message") or "")
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    kw: dict[str, Any] = {"status": status, "error_type": error_type, "request_id": request_id}
    if status == 429:
        return RateLimited(message, retry_after=parse_retry_after(headers.get("retry-after")),
                           **kw)
    if error_type in _API_KEY_ERRORS and status in (400, 401):
        return InvalidApiKey(message, **kw)
    if status in (401, 403):
        # Nylas documents one 401 type, api.authentication_error, for a bad API key, a grant of
        # another region and an expired grant alike (https://developer.nylas.com/docs/api/
        # errors/); the caller confirms with the grant itself before acting on it.
        return Unauthorized(message, **kw)
    if status == 404:
        return (GrantNotFound if error_type == "grant.not_found" else NotFound)(message, **kw)
    if status == 408 or status >= 500:
        return Transient(message, **kw)
    return Permanent(message, **kw)


class _Download:
    """:class:`~nova.providers.base.AttachmentStream` over a streamed httpx response."""

    def __init__(self, response: httpx.Response, chunk_size: int) -> None:
        self._response = response
        self._chunk_size = chunk_size
        self.content_type = response.headers.get("content-type")
        length = response.headers.get("content-length")
        self.size = int(length) if length and length.isdigit() else None
        self.filename = _filename(response.headers.get("content-disposition"))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes(self._chunk_size):
                yield chunk
        except httpx.TransportError as exc:
            raise Transient(f"download interrupted: {exc!r}") from exc


def _filename(disposition: str | None) -> str | None:
    if not disposition:
        return None
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return value.strip().strip('"')
    return None


# --------------------------------------------------------------------------- provider
class NylasProvider:
    """:class:`~nova.providers.base.MailProvider` for Nylas v3."""

    name = "nylas"
    lists_thread_summaries = True  # thread objects carry subject, dates, latest message

    def __init__(self, api_key: str, api_uri: str = DEFAULT_API_URI, *, timeout: float = 30.0,
                 client: httpx.AsyncClient | None = None, max_connections: int = 20,
                 transient_retries: int = 0, retry_backoff: float = 0.2,
                 chunk_size: int = 64 * 1024) -> None:
        self.api_key = api_key
        self.api_uri = api_uri.rstrip("/")
        self.timeout = timeout
        self.transient_retries = transient_retries
        self.retry_backoff = retry_backoff
        self.chunk_size = chunk_size
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            headers={"User-Agent": "nova-nylas-provider"})
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}

    def _url(self, path: str) -> str:
        return self.api_uri + path

    @staticmethod
    def _g(grant_id: str) -> str:
        return "/v3/grants/" + quote(grant_id, safe="")

    async def _get_json(self, path: str, params: Mapping[str, Any] | None = None,
                        ) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                return await self._get_json_once(path, params)
            except Transient:
                if attempt >= self.transient_retries:
                    raise
                await asyncio.sleep(self.retry_backoff * 2**attempt)
                attempt += 1

    async def _get_json_once(self, path: str, params: Mapping[str, Any] | None,
                             ) -> dict[str, Any]:
        try:
            resp = await self._client.get(self._url(path), params=params, headers=self._headers)
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout after {self.timeout}s: GET {path}") from exc
        except httpx.TransportError as exc:
            raise Transient(f"transport error: {exc!r}") from exc
        if resp.status_code >= 400:
            raise error_from_response(resp.status_code, resp.content, resp.headers)
        try:
            data = loads(resp.content)
        except ValueError as exc:
            raise Transient(f"malformed JSON body (HTTP {resp.status_code})",
                            status=resp.status_code) from exc
        if not isinstance(data, dict) or "data" not in data:
            raise Transient("response without 'data'", status=resp.status_code)
        return data

    @staticmethod
    def _check_limit(limit: int) -> int:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be within 1..{MAX_LIMIT}")
        return limit

    # ------------------------------------------------------------------ threads
    async def list_threads_page(self, grant_id: str, *, page_token: str | None = None,
                                limit: int = 50, received_after: datetime | None = None,
                                received_before: datetime | None = None,
                                folder: str | None = None) -> Page[Thread]:
        """Threads newest first; the window maps to ``latest_message_after/before``."""
        params: dict[str, Any] = {"limit": self._check_limit(limit)}
        if page_token:
            params["page_token"] = page_token
        if received_after is not None:
            params["latest_message_after"] = math.floor(received_after.timestamp())
        if received_before is not None:
            params["latest_message_before"] = math.floor(received_before.timestamp())
        if folder:
            params["in"] = folder
        try:
            data = await self._get_json(self._g(grant_id) + "/threads", params)
            items = [parse_thread(t, grant_id, storable=True) for t in data["data"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"malformed thread list: {exc!r}") from exc
        return Page(items=items, next_page_token=data.get("next_cursor") or None)

    async def get_thread(self, grant_id: str, thread_id: str) -> Thread:
        data = await self._get_json(f"{self._g(grant_id)}/threads/{quote(thread_id, safe='')}")
        return self._parse(parse_thread, data["data"], grant_id)

    # ------------------------------------------------------------------ messages
    async def list_messages_page(self, grant_id: str, *, thread_id: str | None = None,
                                 page_token: str | None = None, limit: int = 50,
                                 received_after: datetime | None = None,
                                 received_before: datetime | None = None,
                                 include_headers: bool = False) -> Page[Message]:
        params: dict[str, Any] = {"limit": self._check_limit(limit)}
        if thread_id:
            params["thread_id"] = thread_id
        if page_token:
            params["page_token"] = page_token
        if received_after is not None:
            params["received_after"] = math.floor(received_after.timestamp())
        if received_before is not None:
            params["received_before"] = math.floor(received_before.timestamp())
        if include_headers:
            params["fields"] = "include_headers"
        try:
            data = await self._get_json(self._g(grant_id) + "/messages", params)
            items = [parse_message(m, grant_id, storable=True) for m in data["data"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"malformed message list: {exc!r}") from exc
        return Page(items=items, next_page_token=data.get("next_cursor") or None)

    async def list_thread_messages(self, grant_id: str, thread_id: str, *,
                                   include_headers: bool = False) -> AsyncIterator[Message]:
        token: str | None = None
        while True:
            page = await self.list_messages_page(grant_id, thread_id=thread_id,
                                                 page_token=token, limit=MAX_LIMIT,
                                                 include_headers=include_headers)
            for msg in page.items:
                yield msg
            if page.next_page_token is None:
                return
            token = page.next_page_token

    async def get_message(self, grant_id: str, message_id: str, *,
                          include_headers: bool = False) -> Message:
        params = {"fields": "include_headers"} if include_headers else None
        data = await self._get_json(
            f"{self._g(grant_id)}/messages/{quote(message_id, safe='')}", params)
        return self._parse(parse_message, data["data"], grant_id)

    # ------------------------------------------------------------------ attachments
    async def get_attachment(self, grant_id: str, attachment_id: str,
                             message_id: str) -> Attachment:
        data = await self._get_json(
            f"{self._g(grant_id)}/attachments/{quote(attachment_id, safe='')}",
            {"message_id": message_id})
        try:
            return parse_attachment(data["data"], grant_id, message_id)
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"malformed attachment: {exc!r}") from exc

    @asynccontextmanager
    async def download_attachment(self, grant_id: str, attachment_id: str, message_id: str,
                                  ) -> AsyncIterator[_Download]:
        path = f"{self._g(grant_id)}/attachments/{quote(attachment_id, safe='')}/download"
        try:
            async with self._client.stream("GET", self._url(path),
                                           params={"message_id": message_id},
                                           headers=self._headers) as resp:
                if resp.status_code >= 400:
                    body = await resp.aread()
                    raise error_from_response(resp.status_code, body, resp.headers)
                yield _Download(resp, self.chunk_size)
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout after {self.timeout}s: GET {path}") from exc
        except httpx.TransportError as exc:
            raise Transient(f"transport error: {exc!r}") from exc

    # ------------------------------------------------------------------ folders
    async def list_folders(self, grant_id: str) -> list[Folder]:
        """Every folder (label) of the grant: ``GET /v3/grants/{g}/folders``, every page
        (https://developer.nylas.com/docs/reference/api/folders/get-folder/: sub-folders
        flattened into one list, ``parent_id`` on a child). A folder without a usable id is
        left out."""
        params: dict[str, Any] = {"limit": MAX_LIMIT}
        out: list[Folder] = []
        while True:
            data = await self._get_json(self._g(grant_id) + "/folders", params)
            items = data["data"]
            if not isinstance(items, list):
                raise Transient("malformed folder list: data is not a list")
            out += [f for f in (parse_nylas_folder(item) for item in items) if f is not None]
            token = data.get("next_cursor")
            if not token:
                return out
            params = {"limit": MAX_LIMIT, "page_token": str(token)}

    # ------------------------------------------------------------------ grants
    async def get_grant(self, grant_id: str) -> Grant:
        """The grant object, answered even for an expired grant (``grant_status`` says so).
        An application call: it spends no grant's budget (:func:`grant_of`)."""
        data = await self._get_json(self._g(grant_id))
        try:
            return parse_grant(data["data"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Transient(f"malformed grant: {exc!r}") from exc

    # ------------------------------------------------------------------ misc
    @staticmethod
    def _parse(fn: Any, payload: Any, grant_id: str) -> Any:
        try:
            return fn(payload, grant_id)
        except (KeyError, TypeError, AttributeError) as exc:
            raise Transient(f"malformed object: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> NylasProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
