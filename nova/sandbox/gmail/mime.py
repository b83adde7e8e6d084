"""Real RFC 822 messages built with :mod:`email`, and Gmail's JSON view of them.

:func:`render` turns a :class:`.generate.MessageSpec` into the bytes Gmail would hold (what
``format=raw`` returns, base64url): ``text/plain`` alone, ``text/html`` alone, or
``multipart/alternative`` (plain + html); inline images wrap that in ``multipart/related``
(``Content-ID``, ``cid:`` references in the HTML); attachments wrap everything in
``multipart/mixed``.  Bodies are UTF-8 (base64 or quoted-printable), ISO-8859-1
(quoted-printable) or Windows-1252 (base64); non-ASCII subjects and display names are RFC 2047
encoded words; non-ASCII filenames are RFC 2231 (``filename*=utf-8''...``) or RFC 2047 inside
the quoted parameter, as mail in the wild has both.  Boundaries are derived from the message
id, so the bytes are deterministic.

:func:`payload` parses those bytes back the way the Gmail API presents a message
(https://developers.google.com/workspace/gmail/api/reference/rest/v1/users.messages#MessagePart):
``{partId, mimeType, filename, headers, body: {size, data | attachmentId}, parts}`` with the
root's ``partId`` ``""``, its children ``"0"``, ``"1"`` and grandchildren ``"0.1"``; header
values unfolded and RFC 2047-decoded (undecodable ones are passed through as they are); body
``data`` base64url (https://developers.google.com/workspace/gmail/api/reference/rest/v1/
users.messages.attachments#MessagePartBody: "The body data of a MIME message part as a
base64url encoded string").  A leaf part with a filename, a disposition or a non-text type is
an "external attachment": ``attachmentId`` and ``size``, no ``data``; :func:`fill` mints the
ids into a copy of the parsed template (they change on every fetch, see :mod:`.mailbox`).
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Callable
from datetime import UTC, datetime
from email import charset as email_charset
from email import policy as email_policy
from email.generator import BytesGenerator
from email.header import Header, decode_header, make_header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.utils import encode_rfc2231, format_datetime, formataddr
from io import BytesIO
from typing import Any

from ..nylas.blobs import make_pdf, make_png, random_chunks
from ..nylas.generate import LATIN1_WORDS, SENTENCES, stable_hex
from .generate import MessageSpec, PartSpec, Person

POLICY = email_policy.compat32.clone(linesep="\r\n")
SNIPPET_CHARS = 200
_FOLD = re.compile(r"\r?\n[ \t]+")
_TAGS = re.compile(r"<[^>]*>")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def part_bytes(p: PartSpec) -> bytes:
    """An attachment's bytes, made from its seed (the same bytes every time)."""
    rng = random.Random(p.seed)
    if p.kind == "invoice":
        subject, number = p.lines[:2]
        lines = [f"INVOICE {number}", f"Re: {subject}",
                 f"Total due: {rng.randint(100, 50000)}.{rng.randint(0, 99):02d} USD"]
        lines += [f"Item {k + 1}: {rng.choice(SENTENCES)}" for k in range(rng.randint(1, 50))]
        return make_pdf(lines)
    if p.kind == "pdf":
        return make_pdf(p.lines)
    if p.kind.startswith("notes"):
        text = "\n".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 30))) + "\n"
        if p.kind == "notes-latin1":
            return (text + " ".join(rng.sample(LATIN1_WORDS, 3)) + "\n").encode("latin-1")
        if p.kind == "notes-utf8":
            return ("\u65e5\u672c\u8a9e " + text).encode()
        return text.encode()
    if p.kind == "csv":
        rows = ["date,amount,category"] + [
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.randint(1, 999)},"
            f"{rng.choice(['travel', 'software', 'meals'])}" for _ in range(rng.randint(5, 150))]
        return ("\n".join(rows) + "\n").encode()
    if p.kind == "png":
        rgb = rng.randrange(1 << 24)
        return make_png(rng.randint(4, 48), rng.randint(4, 48),
                        ((rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255))
    if p.kind == "bin":
        return b"".join(random_chunks(p.seed, p.size))
    return p.data or b""


# ---------------------------------------------------------------------- rendering
def _header_text(value: str, charset: str = "utf-8") -> str:
    """ASCII stays as is; anything else becomes RFC 2047 encoded words."""
    if value.isascii():
        return value
    try:
        value.encode(charset)
    except UnicodeEncodeError:
        charset = "utf-8"
    return Header(value, charset).encode()


def _addr(p: Person) -> str:
    name, email = p
    if name.isascii():
        return formataddr((name, email))
    return f"{_header_text(name)} <{email}>"


def _name_param(name: str, style: str) -> str:
    if style == "rfc2231":
        return f"*={encode_rfc2231(name, 'utf-8')}"
    if style == "rfc2047":
        return f'="{Header(name, "utf-8").encode()}"'
    return '="' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text_part(text: str, subtype: str, charset: str, qp: bool, lying: bool) -> Message:
    if lying:  # declared UTF-8, written in Latin-1: a decoder must not trust the label
        part = MIMENonMultipart("text", subtype, charset="UTF-8")
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(base64.encodebytes(text.encode("latin-1", "replace")).decode("ascii"))
        return part
    cs = email_charset.Charset(charset)
    if charset == "utf-8":
        cs.body_encoding = email_charset.QP if qp else email_charset.BASE64
    part = MIMEText("", subtype, None)
    del part["Content-Transfer-Encoding"]
    part.set_payload(text, cs)
    return part


def _attachment(p: PartSpec, disposition: str) -> Message:
    data = part_bytes(p)
    part = Message()
    part["Content-Type"] = f"{p.content_type}; name{_name_param(p.filename, p.name_style)}"
    part["Content-Disposition"] = f"{disposition}; filename{_name_param(p.filename, p.name_style)}"
    part["Content-Transfer-Encoding"] = "base64"
    if p.content_id:
        part["Content-ID"] = f"<{p.content_id}>"
        part["X-Attachment-Id"] = p.content_id
    part.set_payload(base64.encodebytes(data).decode("ascii"))
    return part


def render(spec: MessageSpec, delivered_to: str | None = None) -> bytes:
    """The message's RFC 822 bytes (CRLF line ends)."""
    qp = int(stable_hex(spec.id, "qp", n=2), 16) % 3 == 0
    bounds = iter(f"000000000000{stable_hex(spec.id, spec.version, k, n=14)}" for k in range(4))
    plain = _text_part(spec.text, "plain", spec.charset, qp, spec.lying_charset)
    body: Message
    if spec.layout == "plain" or spec.html is None:
        body = plain
    else:
        html = _text_part(spec.html, "html", spec.charset, qp, spec.lying_charset)
        if spec.layout == "html":
            body = html
        else:
            body = MIMEMultipart("alternative", next(bounds), [plain, html])
    if spec.inline:
        body = MIMEMultipart("related", next(bounds),
                             [body, *(_attachment(p, "inline") for p in spec.inline)])
    if spec.attachments:
        body = MIMEMultipart("mixed", next(bounds),
                             [body, *(_attachment(p, "attachment") for p in spec.attachments)])
    root = body
    headers: list[tuple[str, str]] = []
    if delivered_to:
        headers.append(("Delivered-To", delivered_to))
        headers.append(("Received", f"by 2002:a05:sandbox with SMTP id {spec.id};\r\n        "
                                    + format_datetime(_when(spec))))
    headers.append(("MIME-Version", "1.0"))
    headers.append(("Date", format_datetime(_when(spec))))
    headers.append(("Message-ID", spec.msgid))
    if spec.in_reply_to:
        headers += [("In-Reply-To", spec.in_reply_to), ("References", spec.references or "")]
    subj_cs = "iso-8859-1" if spec.charset == "iso-8859-1" else "utf-8"
    headers.append(("Subject", _header_text(spec.subject, subj_cs)))
    headers.append(("From", _addr(spec.sender)))
    headers.append(("To", ", ".join(_addr(p) for p in spec.to)))
    if spec.cc:
        headers.append(("Cc", ", ".join(_addr(p) for p in spec.cc)))
    if spec.hostile is not None:
        headers.append(("X-Sandbox-Hostile", _header_text("a\x00b\x07\x1b[31m\u202e")))
        # raw 8-bit UTF-8 in a header, no encoded word: surrogateescape keeps the bytes
        headers.append(("X-Sandbox-Raw", "Gr\u00fc\u00dfe".encode().decode("ascii",
                                                                          "surrogateescape")))
    for sub in root.walk():
        if sub is not root:
            del sub["MIME-Version"]  # only the top of a message carries it
    del root["MIME-Version"]
    own = list(root.items())  # Content-Type etc. go after the message headers
    for name in {k for k, _ in own}:
        del root[name]
    for name, value in [*headers, *own]:
        root[name] = value
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=POLICY).flatten(root)
    return out.getvalue()


def _when(spec: MessageSpec) -> datetime:
    return datetime.fromtimestamp(spec.internal_ms / 1000, UTC)


# ---------------------------------------------------------------------- Gmail's JSON view
def decode_value(value: str) -> str:
    """A header value as the Gmail API shows it: unfolded, encoded words decoded."""
    if any("\udc80" <= c <= "\udcff" for c in value):  # raw 8-bit bytes in the header
        value = value.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    value = _FOLD.sub(" ", value)
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, ValueError, UnicodeError):
        return value  # an unknown charset or a broken encoded word: passed through


def parse(raw: bytes) -> Message:
    return BytesParser(policy=POLICY).parsebytes(raw)


def _filename(part: Message) -> str:
    name = part.get_filename()
    return "" if name is None else decode_value(name)


def payload(raw: bytes) -> dict[str, Any]:
    """The ``payload`` of a message, attachment ids left empty (see :func:`fill`)."""
    return _part(parse(raw), "")


def fill(template: dict[str, Any], mint: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a payload template with a freshly minted id for every external part."""
    out = dict(template)
    body = dict(template["body"])
    if "attachmentId" in body:
        body["attachmentId"] = mint(template["partId"])
    out["body"] = body
    if "parts" in template:
        out["parts"] = [fill(sub, mint) for sub in template["parts"]]
    return out


def metadata(template: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
    """format=metadata's reduced payload: the top-level type and (selected) headers."""
    wanted = {h.lower() for h in only} if only else None
    return {"mimeType": template["mimeType"],
            "headers": [h for h in template["headers"]
                        if wanted is None or h["name"].lower() in wanted]}


def _part(part: Message, part_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "partId": part_id, "mimeType": part.get_content_type(), "filename": _filename(part),
        "headers": [{"name": k, "value": decode_value(v)} for k, v in part.raw_items()],
    }
    if part.is_multipart():
        out["body"] = {"size": 0}
        subs = part.get_payload()
        assert isinstance(subs, list)
        out["parts"] = [_part(sub, f"{part_id}.{k}" if part_id else str(k))
                        for k, sub in enumerate(subs)]
        return out
    data = part.get_payload(decode=True)
    data = data if isinstance(data, bytes) else b""
    external = (part.get_filename() is not None or part.get("Content-Disposition") is not None
                or part.get_content_maintype() != "text")
    if external:
        out["body"] = {"attachmentId": "", "size": len(data)}
    elif data:
        out["body"] = {"size": len(data), "data": b64url(data)}
    else:
        out["body"] = {"size": 0}
    return out


def leaf_bytes(raw: bytes, part_id: str) -> bytes | None:
    """The decoded bytes of the part ``part_id`` (None: no such leaf)."""
    node: Message = parse(raw)
    if part_id:
        for step in part_id.split("."):
            subs = node.get_payload() if node.is_multipart() else None
            if not isinstance(subs, list) or not step.isdigit() or int(step) >= len(subs):
                return None
            child = subs[int(step)]
            if not isinstance(child, Message):
                return None
            node = child
    if node.is_multipart():
        return None
    data = node.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def snippet(spec: MessageSpec) -> str:
    """Gmail's snippet: the start of the body text, HTML-escaped as Gmail sends it."""
    text = spec.text if spec.layout != "html" or spec.html is None else _TAGS.sub(" ", spec.html)
    text = " ".join(text.split())[:SNIPPET_CHARS]
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))
