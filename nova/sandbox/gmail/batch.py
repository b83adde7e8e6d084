"""``POST /batch/gmail/v1``: Google's HTTP batch, multipart/mixed in and out.

https://developers.google.com/workspace/gmail/api/guides/batch: each part is
``Content-Type: application/http`` holding one HTTP request (request line, headers, body) and a
``Content-ID``; the answer is multipart/mixed with one ``application/http`` part per call, in
order, ``Content-ID: <response-{the request's id}>`` (google-api-python-client's
``BatchHttpRequest._header_to_id`` insists on the ``<... + ...>`` form its own ids have).
"You're limited to 100 calls in a single batch request"; "each inner call counts against
quota"; an inner call without ``Authorization`` uses the outer request's.  A batch of more than
100 calls is refused whole with 400 (GUESS: the guide states the limit, not the error).

The inner calls run "in parallel" on Google's side, so they take concurrency slots together
(:class:`.state.Gate`): slots are taken for every call before any of them runs.  The
discovery document's own ``batchPath`` is plain ``batch`` (``new_batch_http_request()`` posts to
``rootUrl + "batch"`` and ignores ``api_endpoint``), so ``POST /batch`` is served too.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from email.parser import BytesParser
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from . import errors as E
from .api import Call, Prepared
from .errors import ApiError, Reply
from .mime import POLICY

if TYPE_CHECKING:
    from .server import SandboxGmail

MAX_CALLS = 100
_BLANK = re.compile(r"\r?\n\r?\n")


def parse(content_type: str, body: bytes) -> list[tuple[str, Call]]:
    if not content_type.lower().startswith("multipart/"):
        raise E.invalid_argument("Invalid multipart request: Content-Type must be "
                                 "multipart/mixed")
    msg = BytesParser(policy=POLICY).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    parts = msg.get_payload() if msg.is_multipart() else None
    if not isinstance(parts, list) or not parts:
        raise E.invalid_argument("Invalid multipart request with 0 mime parts.")
    if len(parts) > MAX_CALLS:
        raise E.invalid_argument(f"Too many requests in batch ({len(parts)}); the limit is "
                                 f"{MAX_CALLS}.")
    out: list[tuple[str, Call]] = []
    for k, part in enumerate(parts):
        cid = str(part.get("Content-ID") or f"<{k + 1}>").strip().strip("<>")
        text = part.get_payload()
        if not isinstance(text, str):
            raise E.invalid_argument("Invalid multipart request: nested multipart")
        pieces = _BLANK.split(text.lstrip("\r\n"), 1)
        head = pieces[0]
        rest = pieces[1] if len(pieces) > 1 else ""
        lines = head.splitlines()
        words = lines[0].split() if lines else []
        if len(words) < 2:
            raise E.invalid_argument(f"Invalid request line in batch part {k + 1}")
        target = urlsplit(words[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        out.append((cid, Call(words[0].upper(), target.path,
                              parse_qsl(target.query, keep_blank_values=True), headers,
                              rest.encode("utf-8", "surrogateescape"))))
    return out


def render(results: list[tuple[str, Reply]]) -> tuple[bytes, str]:
    boundary = "batch_" + secrets.token_urlsafe(12).replace("-", "").replace("_", "")
    chunks: list[bytes] = []
    for cid, reply in results:
        phrase = E.REASON_PHRASES.get(reply.status, "Unknown")
        head = [f"HTTP/1.1 {reply.status} {phrase}"]
        if reply.content_type:
            head.append(f"Content-Type: {reply.content_type}")
        head += [f"{k}: {v}" for k, v in reply.headers.items()]
        head.append(f"Content-Length: {len(reply.body)}")
        part = (f"--{boundary}\r\nContent-Type: application/http\r\n"
                f"Content-ID: <response-{cid}>\r\n\r\n" + "\r\n".join(head) + "\r\n\r\n")
        chunks.append(part.encode("latin-1") + reply.body + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/mixed; boundary={boundary}"


async def run(sb: SandboxGmail, content_type: str, body: bytes, outer_auth: str | None,
              ) -> Reply:
    sb.stats.hit("batch")
    try:
        calls = parse(content_type, body)
    except ApiError as exc:
        return exc.reply()
    sb.stats.batch(len(calls))
    prepared: list[Prepared | Reply] = [sb.api.prepare(call, outer_auth) for _, call in calls]
    try:
        if sb.latency_ms:
            await asyncio.sleep(sb.latency_ms / 1000)

        async def one(p: Prepared | Reply) -> Reply:
            return p if isinstance(p, Reply) else await sb.api.execute(p, latency=False)

        replies = await asyncio.gather(*(one(p) for p in prepared))
    finally:
        for p in prepared:
            if not isinstance(p, Reply):
                sb.api.finish(p)
    for reply in replies:
        sb.stats.status(reply.status)
    data, ctype = render([(cid, r) for (cid, _), r in zip(calls, replies, strict=True)])
    return Reply(200, data, content_type=ctype)
