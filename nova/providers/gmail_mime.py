"""Gmail API v1 Message resources (``format=full``) as Nova's provider-neutral :class:`Message`.

Pure functions over JSON that is already loaded: no I/O. Mail is hostile input, so nothing
here raises on bad content: a field that cannot be read falls back to None or empty and the
rest of the message is kept. Every string put into a model goes through
:func:`nova.providers.clean.clean`.

Google documentation relied on
(https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.messages):

* Message: ``id``, ``threadId``, ``labelIds``, ``snippet``, ``historyId``, ``sizeEstimate``,
  ``internalDate`` ("The internal message creation timestamp (epoch ms), which determines
  ordering in the inbox. For normal SMTP-received email, this represents the time the message
  was originally accepted by Google, which is more reliable than the ``Date`` header"), so it
  is the message's date; the ``Date`` header is only a fallback.
* MessagePart: ``partId`` ("The immutable ID of the message part"), ``mimeType``,
  ``filename`` ("Only present if this message part represents an attachment"), ``headers``
  (the top-level part carries the RFC 2822 headers), ``body``, ``parts`` (children of
  container types).
* MessagePartBody: ``data`` is "The body data of a MIME message part as a base64url encoded
  string", ``attachmentId`` is present "if the body data is contained in a separate
  attachment", ``size`` is the number of bytes of the part's body data.

``data`` holds the part's *decoded* bytes: Gmail has already undone the part's
Content-Transfer-Encoding (the sandbox's :func:`nova.sandbox.gmail.mime.payload` models it with
``get_payload(decode=True)``), so a ``Content-Transfer-Encoding: quoted-printable`` header on a
part is ignored here; only the charset of its ``Content-Type`` header applies (``mimeType``
carries no parameters).

Attachment ids: Gmail's ``attachmentId`` changes from one fetch to the next, so an attachment
is identified by its ``partId`` (unique within a message); ``raw`` keeps the ``partId`` and the
``attachmentId`` of this fetch for the downloader (:func:`find_part` finds the part again).
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import policy
from email.headerregistry import HeaderRegistry, UnstructuredHeader
from email.utils import collapse_rfc2231_value, getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

from .clean import clean, text_codec
from .models import Attachment, Message, Participant

__all__ = ["ATTACHMENT_ID_PREFIX", "MAX_DEPTH", "decode_body_data", "find_attachment_part",
           "find_part", "parse_message", "parse_thread_messages"]

# Attachment id of a part without a usable partId (missing, empty as the root's is, or taken
# by an earlier part): this prefix and the part's index in walk order (pre-order, root 0).
# Gmail's part ids are digits and dots, so these never collide with one.
ATTACHMENT_ID_PREFIX = "idx-"
# Parts nested deeper than this are ignored (neither body nor attachment); nothing raises.
MAX_DEPTH = 50

# Resource fields kept in Message.raw: not the payload, or the bodies would be stored twice.
_RAW_KEYS = ("id", "threadId", "historyId", "internalDate", "labelIds", "sizeEstimate")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- base64url
_B64_TO_STD = str.maketrans("-_", "+/")
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]+")
_PADDING = re.compile(r"=+")


def _b64_chunk(chunk: str) -> bytes:
    cut = len(chunk) - len(chunk) % 4
    if len(chunk) % 4 == 1:  # one stray character carries no whole byte: drop it
        chunk = chunk[:cut]
    else:
        chunk += "=" * (-len(chunk) % 4)
    return base64.b64decode(chunk)


def decode_body_data(data: str) -> bytes:
    """The bytes of a base64url string (``MessagePartBody.data``, ``attachments.get``).

    Padding is optional; whitespace, the standard alphabet's ``+/`` and other stray characters
    are tolerated, padding inside the string is taken as the end of a concatenated chunk.
    Never raises: what cannot be decoded is dropped (``b""`` at worst).
    """
    if isinstance(data, bytes | bytearray):
        data = bytes(data).decode("ascii", "ignore")
    if not isinstance(data, str) or not data:
        return b""
    try:  # the usual case: clean base64url, padded or not
        return base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        text = _NOT_B64.sub("", data.translate(_B64_TO_STD))
        return b"".join(_b64_chunk(c) for c in _PADDING.split(text) if c)
    except (binascii.Error, ValueError):
        return b""


# --------------------------------------------------------------------------- charsets
# Labels that browsers decode as windows-1252 (WHATWG Encoding Standard), by Python codec name.
_AS_CP1252 = frozenset({"latin_1", "iso8859-1", "ascii", "cp1252"})
# windows-1252 leaves 0x81 0x8D 0x8F 0x90 0x9D undefined; WHATWG maps them to C1 controls.
_C1_FROM_ESCAPES = {0xDC00 + b: b for b in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}


def _cp1252(data: bytes) -> str:
    return data.decode("cp1252", "surrogateescape").translate(_C1_FROM_ESCAPES)


def _decode_text(data: bytes, charset: str | None) -> str:
    """Body bytes as text, by the part's declared charset; never raises.

    No charset: UTF-8, else windows-1252. ISO-8859-1, US-ASCII and windows-1252 labels:
    windows-1252 (what browsers do: WHATWG Encoding Standard). A charset no codec knows:
    UTF-8 with replacement characters. Declared UTF-8 that is not UTF-8 and has not a single
    well-formed multi-byte sequence: windows-1252, since the label lies (as the sandbox's
    ``lying_charset`` mail does); with one, UTF-8 with replacement characters. A label that
    names a codec but no text encoding (``rot13``, ``hex``, ``zlib``: see
    :func:`nova.providers.clean.text_codec`) counts as unknown.
    """
    declared = charset is not None and charset.strip().strip("\"'").strip() != ""
    codec = text_codec(charset)
    if codec in _AS_CP1252:
        return _cp1252(data)
    if codec is None and declared:
        return data.decode("utf-8", "replace")
    if codec is None or codec == "utf-8":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        if codec is None:
            return _cp1252(data)
        text = data.decode("utf-8", "replace")
        # Anything besides ASCII and U+FFFD came from a well-formed multi-byte sequence.
        return text if not text.replace("\ufffd", "").isascii() else _cp1252(data)
    try:
        return data.decode(codec, "replace")
    except Exception:  # a codec that refuses errors="replace" (or input): some text beats none
        return data.decode("utf-8", "replace")


# --------------------------------------------------------------------------- headers
_FOLDING = re.compile(r"\r?\n(?=[ \t])")
# Header values longer than this are kept as written (cleaned), not decoded: the stdlib's
# header parser is quadratic on some hostile input, and no real encoded header is this long.
_DECODE_MAX = 8_192
# Every header read as unstructured text: decoded as written, not reformatted (an address
# header's str() would be re-quoted, a Date header's re-rendered).
_AS_TEXT = HeaderRegistry(default_class=UnstructuredHeader, use_default_map=False)


def _decoded(value: str) -> str:
    """A header value (or a piece of one: a display name, a file name) with its RFC 2047
    encoded words decoded by the stdlib (:mod:`email.headerregistry`, as ``policy.default``
    reads an unstructured header), then cleaned.

    Adjacent encoded words are joined, so a character split across two survives; a word in a
    charset Python does not know (or in a codec that is no text encoding) is read as ASCII, its
    other bytes becoming U+FFFD. Never raises: whatever the parser chokes on is kept as
    written, cleaned.
    """
    text = clean(_FOLDING.sub("", value))
    if "=?" not in text or len(text) > _DECODE_MAX:
        return text
    try:
        # the registry's header, not the bare parse tree: its str() turns the bytes an
        # encoded word could not decode back into UTF-8 or U+FFFD, joining a character split
        # across two words
        return clean(str(_AS_TEXT("x-nova", text)))
    except Exception:  # a parser bug on hostile input costs the decoding, not the header
        return text


def _header_value(value: Any) -> str:
    return _decoded(value if isinstance(value, str) else ("" if value is None else str(value)))


# --------------------------------------------------------------------------- parts
def _parts(part: dict[str, Any]) -> list[dict[str, Any]]:
    subs = part.get("parts")
    return [p for p in subs if isinstance(p, dict)] if isinstance(subs, list) else []


def find_part(payload: dict[str, Any] | None, part_id: str) -> dict[str, Any] | None:
    """The MessagePart whose ``partId`` is ``part_id`` (depth-first, pre-order), or None."""
    if not isinstance(payload, dict):
        return None
    stack: list[tuple[dict[str, Any], int]] = [(payload, 0)]
    while stack:
        part, depth = stack.pop()
        if part.get("partId") == part_id:
            return part
        if depth < MAX_DEPTH:
            stack.extend((sub, depth + 1) for sub in reversed(_parts(part)))
    return None


def _raw_headers(part: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(name, value) of a part's headers as given, skipping entries that are no headers."""
    heads = part.get("headers")
    for h in heads if isinstance(heads, list) else ():
        if isinstance(h, dict) and isinstance(h.get("name"), str):
            value = h.get("value")
            yield h["name"], value if isinstance(value, str) else (
                "" if value is None else str(value))


# ------------------------------------------------------------------ MIME parameters
# Content-Type / Content-Disposition values longer than this are cut before parsing: real ones
# are far shorter (a long RFC 2231 file name is about a kilobyte), and the stdlib's parameter
# parser is quadratic on hostile input such as a megabyte of semicolons.
_PARAMS_MAX = 2_048


def _mime_params(name: str, value: str | None) -> tuple[str, dict[str, str]]:
    """(lower-cased leading token, {lower-cased parameter: value}) of a Content-Type or
    Content-Disposition header (``name``), as ``policy.default`` parses it: RFC 2231 extended
    (``name*=utf-8''...``) and continued (``name*0*=``, ``name*1*=``) parameters are joined and
    decoded, so are RFC 2047 words inside quoted values. Never raises: a value the parser
    chokes on gives ("", {})."""
    if not value:
        return "", {}
    value = clean(value[:_PARAMS_MAX])
    try:
        header: Any = policy.default.header_factory(name, value)
        params = {clean(k): clean(v) for k, v in header.params.items()}
        if name == "content-type":
            # The stdlib assumes text/plain for a missing or broken type: only a real one counts.
            head = header.content_type if "/" in value.partition(";")[0] else ""
        else:
            head = header.content_disposition or ""
    except Exception:  # stdlib parser bugs (IndexError, RecursionError) on hostile input
        return "", {}
    return clean(head), params


def _rfc2231_filename(name: str) -> str | None:
    """A ``filename`` field that is still an RFC 2231 extended value (``utf-8''na%C3%AFve.pdf``)
    decoded, by :func:`email.utils.collapse_rfc2231_value`; None when it is none (a name such as
    ``Bob's and Al's.pdf`` names no charset before its first quote)."""
    charset, quote, rest = name.partition("'")
    if not quote or "'" not in rest:
        return None
    codec = text_codec(charset)
    if codec is None:
        return None
    language, _, text = rest.partition("'")
    try:  # as email.message decodes parameters: percent escapes to bytes, then the charset
        return collapse_rfc2231_value((codec, language, unquote(text, encoding="latin-1")))
    except Exception:
        return None


class _Part:
    """What the walk needs to know about one leaf MessagePart."""

    __slots__ = ("part", "index", "mime", "body", "filename", "charset", "disposition",
                 "content_id")

    def __init__(self, part: dict[str, Any], index: int) -> None:
        self.part = part
        self.index = index
        ctype = disposition = cid = None
        for name, value in _raw_headers(part):
            key = name.lower()
            if key == "content-type" and ctype is None:
                ctype = value
            elif key == "content-disposition" and disposition is None:
                disposition = value
            elif key == "content-id" and cid is None:
                cid = value
        type_head, type_params = _mime_params("content-type", ctype)
        disp_head, disp_params = _mime_params("content-disposition", disposition)
        mime = part.get("mimeType")
        self.mime = mime.strip().lower() if isinstance(mime, str) and mime.strip() else type_head
        self.charset = type_params.get("charset")
        self.disposition = disp_head or None
        cid = clean(cid.strip().strip("<>").strip()) if cid is not None else None
        self.content_id = cid or None
        body = part.get("body")
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        self.filename = _filename(part, disp_params.get("filename") or type_params.get("name"))

    @property
    def attachment_id(self) -> str | None:
        aid = self.body.get("attachmentId")
        return aid if isinstance(aid, str) and aid else None

    @property
    def data(self) -> str | None:
        data = self.body.get("data")
        return data if isinstance(data, str) else None


def _filename(part: dict[str, Any], from_headers: str | None) -> str | None:
    """The part's file name: ``filename``, else (or when it is still encoded) the file name
    its Content-Disposition (``filename``) or Content-Type (``name``) parameters give."""
    given = part.get("filename")
    name = given if isinstance(given, str) else ""
    encoded = _rfc2231_filename(name)
    if not name or "=?" in name or encoded is not None:
        if from_headers:
            name = from_headers
        elif encoded is not None:
            name = encoded
    name = _decoded(name)
    return name or None


class _Walk:
    """One pass over a payload: body texts by kind, attachments in walk order."""

    def __init__(self, message_id: str, grant_id: str) -> None:
        self.message_id = message_id
        self.grant_id = grant_id
        self.index = 0
        self.attachments: list[Attachment] = []
        self.ids: set[str] = set()
        self.parts: dict[str, dict[str, Any]] = {}  # attachment id -> its MessagePart

    def walk(self, part: dict[str, Any], depth: int) -> tuple[list[str], list[str]]:
        """(html texts, plain texts) of the body under ``part``; collects attachments."""
        index = self.index
        self.index += 1
        mime = part.get("mimeType")
        mime = mime.lower() if isinstance(mime, str) else ""
        subs = _parts(part)
        if mime.startswith("multipart/") or (subs and not mime.startswith("message/")):
            html_parts: list[str] = []
            plain_parts: list[str] = []
            if depth >= MAX_DEPTH:
                return html_parts, plain_parts
            alternative = mime == "multipart/alternative"
            for sub in subs:
                h, p = self.walk(sub, depth + 1)
                if alternative:  # one rendering of each kind: the first one there is
                    html_parts = html_parts or h
                    plain_parts = plain_parts or p
                else:
                    html_parts += h
                    plain_parts += p
            return html_parts, plain_parts
        leaf = _Part(part, index)
        if self._is_attachment(leaf):
            self._attach(leaf)
            return [], []
        if leaf.mime in ("text/html", "text/plain"):
            text = clean(_decode_text(decode_body_data(leaf.data or ""), leaf.charset))
            return ([text], []) if leaf.mime == "text/html" else ([], [text])
        return [], []

    @staticmethod
    def _is_attachment(leaf: _Part) -> bool:
        if leaf.mime.startswith("message/"):  # a forwarded message is a file, not our body
            return True
        if leaf.filename or leaf.attachment_id or leaf.disposition == "attachment":
            return True
        if leaf.mime in ("text/plain", "text/html"):
            return False
        # Not a body text: a Content-ID makes it a (related) file, and so does any non-text
        # content Gmail gave inline, rather than losing it.
        return leaf.content_id is not None or (
            not leaf.mime.startswith("text/") and bool(leaf.data))

    def _attach(self, leaf: _Part) -> None:
        part_id = leaf.part.get("partId")
        part_id = part_id if isinstance(part_id, str) else None
        att_id = clean(part_id) if part_id else ""
        if not att_id or att_id in self.ids:
            att_id = f"{ATTACHMENT_ID_PREFIX}{leaf.index}"
        self.ids.add(att_id)
        self.parts[att_id] = leaf.part
        size = leaf.body.get("size")
        cid = leaf.content_id
        disposition = leaf.disposition
        self.attachments.append(Attachment(
            id=att_id, grant_id=self.grant_id, filename=leaf.filename,
            content_type=clean(leaf.mime) or None,
            size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0
            else None,
            is_inline=disposition == "inline" or (cid is not None and disposition != "attachment"),
            content_id=cid, message_id=self.message_id,
            raw={"partId": clean(part_id) if part_id is not None else None,
                 "attachmentId": clean(leaf.attachment_id),
                 "inline_data": leaf.data is not None and leaf.attachment_id is None}))


def find_attachment_part(payload: dict[str, Any] | None,
                         attachment_id: str) -> dict[str, Any] | None:
    """The MessagePart behind an :class:`Attachment` id made by :func:`parse_message`: its
    ``partId``, or an ``idx-<n>`` id (a part whose partId is missing, empty or repeated), which
    :func:`find_part` cannot resolve. None: no such attachment."""
    if not isinstance(payload, dict):
        return None
    walk = _Walk("", "")
    walk.walk(payload, 0)
    return walk.parts.get(attachment_id)


def _joined(texts: list[str]) -> str | None:
    if not texts:
        return None
    if len(texts) == 1:
        return texts[0]
    return "\n".join(t for t in texts if t)


# --------------------------------------------------------------------------- fields
def _people(values: list[str]) -> tuple[Participant, ...]:
    out: list[Participant] = []
    for value in values:
        try:  # each header value alone: a garbage one costs only itself
            pairs = getaddresses([value])
        except Exception:
            continue
        for name, address in pairs:
            email = clean(address).strip()  # an addr-spec holds no encoded words (RFC 2047 5)
            if "@" not in email:
                continue
            display = _decoded(name).strip()
            out.append(Participant(email=email, name=display or None))
    return tuple(out)


def _internal_date(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    try:
        ms = int(value)
        return _EPOCH + timedelta(milliseconds=ms) if ms > 0 else None
    except (ValueError, OverflowError):
        return None


def _header_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _str(value: Any) -> str | None:
    return clean(value) if isinstance(value, str) else None


# --------------------------------------------------------------------------- messages
def parse_message(resource: dict[str, Any], grant_id: str) -> Message:
    """A Gmail Message resource (``format=full``) as a complete :class:`Message`.

    Raises ValueError only when the resource is no dict or has no id; any other defect costs
    the field it is in.
    """
    if not isinstance(resource, dict):
        raise ValueError("a Gmail message resource must be an object")
    mid = resource.get("id")
    if not isinstance(mid, str | int) or isinstance(mid, bool) or not str(mid):
        raise ValueError("a Gmail message resource without an id")
    message_id = clean(str(mid))
    grant = clean(str(grant_id))
    payload = resource.get("payload")
    payload = payload if isinstance(payload, dict) else None

    headers: tuple[tuple[str, str], ...] | None = None
    if payload is not None and isinstance(payload.get("headers"), list):
        headers = tuple((clean(name), _header_value(value))
                        for name, value in _raw_headers(payload))

    def first(name: str) -> str | None:
        return next((v for k, v in headers or () if k.lower() == name), None)

    def every(name: str) -> list[str]:
        # Addresses are split before their words are decoded: an encoded comma stays a name.
        return [clean(_FOLDING.sub("", v)) for k, v in _raw_headers(payload or {})
                if k.lower() == name]

    html_parts: list[str] = []
    plain_parts: list[str] = []
    walk = _Walk(message_id, grant)
    if payload is not None:
        html_parts, plain_parts = walk.walk(payload, 0)

    labels = resource.get("labelIds")
    folders = tuple(clean(x) for x in labels if isinstance(x, str)) \
        if isinstance(labels, list) else ()
    snippet = resource.get("snippet")
    date = _internal_date(resource.get("internalDate")) or _header_date(first("date"))
    return Message(
        id=message_id, grant_id=grant, thread_id=_str(resource.get("threadId")),
        subject=first("subject"),
        from_=_people(every("from")), to=_people(every("to")), cc=_people(every("cc")),
        bcc=_people(every("bcc")), reply_to=_people(every("reply-to")),
        date=date, snippet=clean(html.unescape(snippet)) if isinstance(snippet, str) else None,
        body=_joined(html_parts), text=_joined(plain_parts),
        folders=folders, unread="UNREAD" in folders, starred="STARRED" in folders,
        attachments=tuple(walk.attachments), headers=headers, created_at=date, present=None,
        raw={k: clean(resource[k]) for k in _RAW_KEYS if k in resource})


def parse_thread_messages(resource: dict[str, Any], grant_id: str) -> list[Message]:
    """The messages of a Gmail Thread resource (``{"id", "historyId", "messages"}``), in the
    order given. Items that are no message objects (or have no id) are skipped; never raises.
    A message without ``threadId`` gets the thread's id."""
    if not isinstance(resource, dict):
        return []
    items = resource.get("messages")
    tid = resource.get("id")
    # The thread's own historyId, the last record that touched it (a deletion included, which
    # no remaining message carries): kept on each message for `nova verify` (nova.verify_gmail).
    hid = resource.get("historyId")
    thread_hid = {"threadHistoryId": str(hid)} if isinstance(hid, (str, int)) else {}
    out: list[Message] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        if not isinstance(item.get("threadId"), str) and isinstance(tid, str):
            item = {**item, "threadId": tid}
        try:
            message = parse_message(item, grant_id)
        except Exception:
            continue
        message.raw.update(thread_hid)
        out.append(message)
    return out
