"""Provider data made storable, once, where it enters Nova.

JSON may carry text that Postgres cannot hold: `\\u0000` (legal in JSON, refused by both `text`
and `jsonb`) and lone UTF-16 surrogates such as `\\ud800` (they have no UTF-8 form, so the
driver cannot even send them). Real mail carries both, in subjects, bodies, display names,
file names and headers. One such character must cost that character, never the field, the
message or the thread: NUL is dropped, a lone surrogate becomes U+FFFD, everything else is
kept. Dictionary keys are cleaned as well.

`loads` is the decoder for provider bytes (API answers and webhook deliveries): invalid UTF-8
is replaced rather than refused, raw control characters inside strings are accepted (Python's
strict mode would refuse the whole document), and the result is cleaned.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

# Only an escape (or, leniently decoded, a raw NUL byte) can put a NUL or a surrogate into
# decoded JSON: the walk is skipped when neither is there.
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def clean_text(value: str) -> str:
    if "\x00" in value:
        value = value.replace("\x00", "")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Paired surrogates were already joined by the JSON decoder: what is left is lone.
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


# Python codecs that are text encodings but no mail charset (or slow on hostile input).
_NOT_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape",
                           "undefined", "charmap", "mbcs", "oem"})


def text_codec(charset: str | None) -> str | None:
    """Python's codec name for a charset that mail declares, or None when it names none.

    A declared charset is hostile input: `codecs.lookup` also finds bytes-to-bytes and
    str-to-str transforms (``rot13``, ``hex``, ``base64``, ``zlib``...) whose decoders raise
    TypeError or AssertionError instead of decoding, and a few text codecs that are no charset
    at all (``punycode``, ``unicode_escape``). Only a real text encoding is returned; the
    caller falls back (UTF-8 with replacement characters) on None. Never raises.
    """
    if not isinstance(charset, str):
        return None
    name = charset.strip().strip("\"'").strip()
    if not name:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    # `_is_text_encoding` is how bytes.decode itself refuses the transforms.
    if not getattr(info, "_is_text_encoding", True):
        return None
    found = info.name
    return None if found.replace("_", "-") in _NOT_CHARSETS else found


def clean(value: Any) -> Any:
    """A copy of a decoded JSON value whose every string (keys too) Postgres can store."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def loads(raw: bytes | str) -> Any:
    """Decode provider JSON leniently and clean it. Raises ValueError when it is not JSON."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    value = json.loads(data.decode("utf-8", "replace"), strict=False)
    return clean(value) if b"\x00" in data or _SUSPECT.search(data) else value
