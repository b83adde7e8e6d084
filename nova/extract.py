"""Attachment text extraction, with the ephemeral-attachments seed's thresholds.

What gets text: PDF (`application/pdf`, or an octet-stream named `*.pdf`) through pypdf, and
`text/*` decoded by its declared charset (an unknown or lying charset falls back to UTF-8 with
replacement characters: some text beats none). Everything else is metadata only
(`skipped_reason` `unsupported_type`). Sizes: up to NOVA_EXTRACT_MEMORY_MAX_BYTES (10 MB) may be
handled in memory, up to NOVA_EXTRACT_MAX_BYTES (50 MB) through a file, larger is metadata only
(`too_large`). At most NOVA_EXTRACT_MAX_CHARS characters of text are kept.

A PDF is hostile input: a page tree that loops, a content stream of millions of operators, a
compressed stream that inflates to gigabytes. So pypdf never runs in a Nova worker: it runs in
child processes (`python -m nova.extract --serve`) with an address-space limit
(NOVA_EXTRACT_MEMORY_MB), at most NOVA_EXTRACT_MAX_PAGES pages, and a wall-clock limit
(NOVA_EXTRACT_TIMEOUT_SECONDS) after which the child is killed and a new one started. The
worker's event loop only waits on a pipe, so the runtime's heartbeats go on. An encrypted PDF
that the empty password does not open is `encrypted`; one pypdf cannot read is `corrupt`; one
that runs out of time or memory is `timeout` / `too_complex`. None of it fails the download.

Protocol with a child: one JSON line per request (`{"path"}` to read a file, or `{"size"}`
followed by that many raw bytes), one JSON line per answer.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from nova.providers.clean import clean_text, text_codec

log = logging.getLogger("nova.extract")

PDF, TEXT = "pdf", "text"
RECYCLE_AFTER = 200  # requests per child: a slow leak in a parser never adds up
STARTUP_SECONDS = 60.0
_OCTET = {"", "application/octet-stream", "binary/octet-stream", "application/x-download",
          "application/force-download"}


@dataclass(frozen=True)
class Extraction:
    text: str | None
    skipped_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def content_type_parts(content_type: str | None) -> tuple[str, dict[str, str]]:
    """`text/plain; charset="ISO-8859-1"` -> ("text/plain", {"charset": "ISO-8859-1"})."""
    base, *params = (content_type or "").split(";")
    out: dict[str, str] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if eq:
            out[key.strip().lower()] = value.strip().strip('"').strip("'").strip()
    return base.strip().lower(), out


def kind_of(content_type: str | None, filename: str | None) -> str | None:
    """PDF, TEXT, or None (metadata only)."""
    base, _ = content_type_parts(content_type)
    if base == "application/pdf" or (
            base in _OCTET and (filename or "").lower().rstrip(" .").endswith(".pdf")):
        return PDF
    if base.startswith("text/"):
        return TEXT
    return None


# --------------------------------------------------------------------------- text/*
def decode_text(source: bytes | Path, charset: str | None, max_chars: int) -> Extraction:
    """Text of a text/* attachment: at most `max_chars` characters, never more than about
    four bytes per character read (so a 50 MB file costs at most that much memory)."""
    meta: dict[str, Any] = {"charset": charset or "utf-8"}
    codec = "utf-8"
    if charset:
        # Only a real text codec: a declared rot13 or hex would make the decoder raise.
        found = text_codec(charset)
        if found is None:
            meta["charset_unknown"] = True
        else:
            codec = found
    budget = max_chars * 4 + 4
    if isinstance(source, Path):
        with source.open("rb") as f:
            data = f.read(budget + 1)
    else:
        data = source[:budget + 1]
    more = len(data) > budget
    data = data[:budget]
    if data.startswith(codecs.BOM_UTF8) and codec == "utf-8":
        data = data[len(codecs.BOM_UTF8):]
    if codec in ("utf-16", "utf-32") and not data.startswith(
            (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        codec += "-le"  # no byte order mark: the codec would refuse it; mail means LE
        meta["byte_order_guessed"] = True
    try:
        text = codecs.getincrementaldecoder(codec)(errors="replace").decode(data, final=not more)
    except UnicodeError:  # a codec that refuses even with errors="replace"
        meta["charset_failed"] = True
        text = data.decode("utf-8", "replace")
    if "\ufffd" in text:
        meta["replacement_chars"] = True
    if more or len(text) > max_chars:
        meta["truncated"] = True
        text = text[:max_chars]
    text = clean_text(text)
    meta["chars"] = len(text)
    return Extraction(text, None, meta)


# --------------------------------------------------------------------------- PDF (child side)
def pdf_text(stream: BinaryIO, max_pages: int, max_chars: int) -> Extraction:
    """Text of a PDF with pypdf. Runs in a child process (see `serve`)."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(stream, strict=False)
        encrypted = reader.is_encrypted
    except Exception as exc:
        return Extraction(None, "corrupt", {"error": _short(exc)})
    meta: dict[str, Any] = {}
    if encrypted:
        meta["encrypted"] = True
        try:
            opened = reader.decrypt("")
        except Exception as exc:
            return Extraction(None, "encrypted", {**meta, "error": _short(exc)})
        if not opened:
            return Extraction(None, "encrypted", meta)
    try:
        pages = len(reader.pages)
    except Exception as exc:
        return Extraction(None, "corrupt", {**meta, "error": _short(exc)})
    parts: list[str] = []
    chars = failed = read = 0
    for number in range(min(pages, max_pages)):
        read += 1
        try:
            text = reader.pages[number].extract_text() or ""
        except Exception:
            failed += 1
            continue
        parts.append(text)
        chars += len(text) + 1
        if chars >= max_chars:
            break
    meta.update(pages=pages, pages_read=read)
    if failed:
        meta["pages_failed"] = failed
    if read and failed == read:
        return Extraction(None, "corrupt", meta)
    text = "\n".join(parts)
    if len(text) > max_chars or read < pages:
        meta["truncated"] = True
    text = clean_text(text[:max_chars])
    meta["chars"] = len(text)
    return Extraction(text, None, meta)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def serve(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """The child's loop: a request line (+ bytes), an answer line, until stdin closes."""
    while True:
        line = stdin.readline()
        if not line:
            return 0
        try:
            request = json.loads(line)
            size = int(request.get("size") or 0)
            data = stdin.read(size) if size else b""
            max_pages, max_chars = int(request["max_pages"]), int(request["max_chars"])
            started = time.monotonic()
            if request.get("path"):
                with open(request["path"], "rb") as f:
                    result = pdf_text(f, max_pages, max_chars)
            else:
                result = pdf_text(io.BytesIO(data), max_pages, max_chars)
            del data
            answer: dict[str, Any] = {"text": result.text, "skipped_reason": result.skipped_reason,
                                      "meta": {**result.meta, "seconds": round(
                                          time.monotonic() - started, 3)}}
        except MemoryError:
            # The address-space limit: answer, then end this child (its heap may be a mess).
            stdout.write(json.dumps({"text": None, "skipped_reason": "too_complex",
                                     "meta": {"error": "memory limit"}}).encode() + b"\n")
            stdout.flush()
            return 3
        except Exception as exc:
            answer = {"text": None, "skipped_reason": "extract_failed",
                      "meta": {"error": _short(exc)}}
        stdout.write(json.dumps(answer).encode() + b"\n")
        stdout.flush()


def child_main(argv: list[str]) -> int:
    import argparse
    import warnings

    ap = argparse.ArgumentParser(prog="python -m nova.extract")
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--memory-mb", type=int, default=0)
    args = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)  # pypdf warns about every oddity of every file
    warnings.simplefilter("ignore")
    import pypdf  # noqa: F401 - imported before the limit, which it would count

    if args.memory_mb > 0:
        import resource

        limit = args.memory_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(OSError):
        os.nice(5)  # downloads and the database come first
    sys.stdout.buffer.write(b'{"ready": true}\n')  # the time limit counts from here
    sys.stdout.buffer.flush()
    return serve(sys.stdin.buffer, sys.stdout.buffer)


# --------------------------------------------------------------------------- PDF (worker side)
class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.uses = 0

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def ask(self, request: dict[str, Any], data: bytes | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        if data:
            self.proc.stdin.write(data)
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise EOFError("extractor process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class PdfExtractor:
    """Up to `workers` child processes extracting PDF text, each cut off after `timeout`."""

    def __init__(self, *, workers: int = 2, timeout: float = 30.0, memory_mb: int = 1024,
                 max_pages: int = 200, max_chars: int = 1_000_000) -> None:
        self.workers = max(1, workers)
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_pages = max_pages
        self.max_chars = max_chars
        self._slots = asyncio.Semaphore(self.workers)
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self.killed = 0  # children cut off (timeouts, crashes, cancellations)

    async def _spawn(self) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nova.extract", "--serve", "--memory-mb", str(self.memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, limit=self.max_chars * 8 + (1 << 20))
        child = _Child(proc)
        try:  # start-up (Python, pypdf) is not the PDF's time
            assert proc.stdout is not None
            ready = await asyncio.wait_for(proc.stdout.readline(), STARTUP_SECONDS)
        except BaseException:
            await _reap(child)
            raise
        if not ready:
            await _reap(child)
            raise RuntimeError("the PDF extractor process did not start")
        return child

    async def extract(self, *, path: Path | None = None, data: bytes | None = None,
                      ) -> Extraction:
        request: dict[str, Any] = {"max_pages": self.max_pages, "max_chars": self.max_chars,
                                   "path": str(path) if path is not None else None,
                                   "size": len(data) if data is not None else 0}
        async with self._slots:
            try:
                child = self._idle.pop() if self._idle else await self._spawn()
            except (OSError, RuntimeError, TimeoutError) as exc:
                return Extraction(None, "extract_failed", {"error": f"no extractor: {exc}"})
            self._busy.add(child)
            keep = False
            try:
                answer = await asyncio.wait_for(child.ask(request, data), self.timeout)
                keep = child.alive and answer.get("skipped_reason") != "too_complex"
            except TimeoutError:
                log.warning("[Extract] PDF extraction cut off after %.0fs", self.timeout)
                return Extraction(None, "timeout", {"timeout_seconds": self.timeout})
            except (EOFError, BrokenPipeError, ConnectionResetError, ValueError) as exc:
                return Extraction(None, "too_complex", {"error": f"extractor died: {exc}"})
            finally:
                self._busy.discard(child)
                child.uses += 1
                if keep and child.uses < RECYCLE_AFTER:
                    self._idle.append(child)
                else:  # also on cancellation: a child mid-answer cannot take another request
                    self.killed += not keep
                    await _reap(child)
        return Extraction(answer.get("text"), answer.get("skipped_reason"),
                          answer.get("meta") or {})

    async def aclose(self) -> None:
        children = [*self._idle, *self._busy]
        self._idle.clear()
        for child in children:
            await _reap(child)


async def _reap(child: _Child) -> None:
    child.kill()
    if child.proc.stdin is not None:
        child.proc.stdin.close()
    with contextlib.suppress(Exception):
        await asyncio.shield(asyncio.wait_for(child.proc.wait(), 5))


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
