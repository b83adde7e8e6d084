"""Opaque tokens: list page tokens and Gmail-style attachment ids.

Page tokens encode the sort key of the last item returned (keyset paging), so a page stays
stable while new mail arrives at the top; a token this sandbox did not issue answers 400
``invalidArgument`` "Invalid pageToken".

Attachment ids (:class:`AttachmentTokens`): the reference only says ``attachmentId`` "contains
the ID of an external attachment that can be retrieved in a separate messages.attachments.get
request" (https://developers.google.com/workspace/gmail/api/reference/rest/v1/
users.messages.attachments#MessagePartBody).  In practice they are ephemeral: a different id
for the same part on every fetch (taylorwilsdon/google_workspace_mcp#237, "Gmail attachment IDs
are ephemeral and change between API calls for the same message") and short-lived
(dust-tt/dust#27314, "Gmail attachment IDs are short-lived tokens", failing with an invalid
token error).  So the sandbox mints a new id on every fetch; an id works for the message it was
minted for until ``attachment_id_ttl`` runs out (GUESS: one hour by default; Google publishes
no lifetime), then answers 400 "Invalid attachment token".  Clients must identify an
attachment by message and part id and refetch the message for a fresh id.  The ids are longer
than 255 characters, as real ones often are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time

from .errors import invalid_argument

Key = tuple[int, str]


class BadPageToken(ValueError):
    pass


def encode_token(kind: str, key: Key) -> str:
    raw = json.dumps([kind, key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(kind: str, token: str) -> Key:
    try:
        got, neg, ident = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if got != kind or not isinstance(neg, int) or not isinstance(ident, str):
            raise BadPageToken(token)
        return neg, ident
    except (ValueError, TypeError) as exc:
        raise BadPageToken(token) from exc


class AttachmentTokens:
    """Opaque, ever-changing attachment ids that all decode to (message id, part id)."""

    def __init__(self, seed: int, ttl: float | None = None) -> None:
        self.secret = hashlib.sha256(f"gmail-sandbox-attachments:{seed}".encode()).digest()
        self.ttl = ttl
        self._n = 0
        self._lock = threading.Lock()

    def _stream(self, nonce: bytes, n: int) -> bytes:
        out = b""
        block = 0
        while len(out) < n:
            out += hashlib.sha256(self.secret + nonce + block.to_bytes(4, "big")).digest()
            block += 1
        return out[:n]

    def mint(self, email: str, mid: str, part_id: str) -> str:
        with self._lock:
            self._n += 1
            n = self._n
        nonce = hashlib.sha256(f"{n}:{time.time_ns()}".encode()).digest()[:12]
        plain = json.dumps([mid, part_id, int(time.time())]).encode()
        plain += b" " * (200 - len(plain) % 200)  # pad: real ids are long, often > 255 chars
        cipher = bytes(a ^ b for a, b in zip(plain, self._stream(nonce, len(plain)),
                                             strict=True))
        mac = hmac.new(self.secret + email.encode(), nonce + cipher, hashlib.sha256).digest()
        return "ANGjdJ" + base64.urlsafe_b64encode(nonce + cipher + mac[:16]).decode()

    def open(self, email: str, mid: str, token: str) -> str:
        """The part id an attachment id was minted for; ApiError(400) when it is not one of
        this message's ids (or has outlived ``ttl``)."""
        bad = invalid_argument("Invalid attachment token")
        try:
            raw = base64.urlsafe_b64decode(token.removeprefix("ANGjdJ"))
        except (ValueError, TypeError) as exc:
            raise bad from exc
        nonce, cipher, mac = raw[:12], raw[12:-16], raw[-16:]
        want = hmac.new(self.secret + email.encode(), nonce + cipher, hashlib.sha256).digest()
        if len(raw) < 29 or not hmac.compare_digest(mac, want[:16]):
            raise bad
        plain = bytes(a ^ b for a, b in zip(cipher, self._stream(nonce, len(cipher)),
                                            strict=True))
        got_mid, part_id, issued = json.loads(plain.decode().strip())
        if got_mid != mid or (self.ttl is not None and time.time() - issued > self.ttl):
            raise bad
        return str(part_id)
