"""Attachment files on the NAS: safe names, paths that stay inside the root, writes that are
whole or absent, and the sweep of orphaned temporary files.

Names. A file is `NOVA_ATTACHMENT_PATH/YYYY-MM/{stem}_{attachment_id}{ext}` (the Missive
downloader's format, with the month of the message). The stem and extension come from the
attachment's own name, which is hostile input: it is normalized to NFC (one name for the NFC
and NFD spellings), stripped of NUL, control and format characters (the RTL override that
disguises an extension), of path separators and the characters Windows and SMB refuse, of
leading dots (hidden files, `..`) and trailing dots and spaces; a Windows device name (CON,
NUL.txt ...) gets a prefix. The name is cut at a character boundary so that the whole file
name fits NOVA_ATTACHMENT_MAX_NAME_BYTES bytes of UTF-8 (255 on ext4, XFS, btrfs; less on
encrypted NAS shares). The attachment's row id (a UUID) in every name means two attachments
never share a file, whatever their names. The final path is checked to be inside the root.

Writes. A download streams into a temporary file in the destination folder (`.nova-*.part`,
created with O_EXCL), hashed (SHA-256) and counted as it goes; then fsync, an atomic rename
onto the final name, and an fsync of the folder. A reader (FileMetadataSync, a person) sees the
whole file or none. Chunks are hashed as they arrive and written in batches of 1 MiB by a worker
thread while the next batch arrives (at most two batches in memory per download); every 8 MiB
the written range is handed to the disk (posix_fadvise DONTNEED), so the final fsync is short
and a large download neither floods the page cache nor meets the kernel's dirty-page throttle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TEMP_PREFIX = ".nova-"
TEMP_SUFFIX = ".part"
BATCH_BYTES = 1 << 20  # fits a core's L2: chunks are still cached when written
ADVISE_BYTES = 8 << 20
DEFAULT_STEM = "attachment"
MONTH_DIR = re.compile(r"^\d{4}-\d{2}$")

# Characters Windows (and so SMB shares of a NAS) refuse in a name, plus both separators.
_FORBIDDEN = set('/\\:*?"<>|')
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10)),
             "COM\u00b9", "COM\u00b2", "COM\u00b3", "LPT\u00b9", "LPT\u00b2", "LPT\u00b3"}
_EXTENSION = re.compile(r"^[A-Za-z0-9]{1,10}$")
_UNDERSCORES = re.compile(r"_{2,}")
_SPACES = re.compile(r"\s+")


class UnsafePath(Exception):  # noqa: N818 - a verdict on a path
    """A computed path would leave the attachment root (never expected: names are cleaned)."""


def _clean_chars(text: str) -> str:
    out = []
    for ch in unicodedata.normalize("NFC", text):
        category = unicodedata.category(ch)
        if ch in _FORBIDDEN:
            out.append("_")
        elif category in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            continue  # NUL, controls, bidi overrides, surrogates, private and unassigned
        else:
            out.append(ch)
    return _SPACES.sub(" ", "".join(out))


def _cut(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 form fits `max_bytes` (never half a char)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore")


def split_name(name: str | None, content_type: str | None = None) -> tuple[str, str]:
    """(stem, extension) of an attachment name, both safe for any filesystem. The extension
    (with its dot, or "") is the name's own when it is a plain one, else guessed from the
    content type."""
    cleaned = _clean_chars(name or "")
    stem, dot, ext = cleaned.rpartition(".")
    if not dot or not _EXTENSION.match(ext) or not stem.strip(" ."):
        stem, ext = cleaned, ""
    stem = stem.strip(" .")  # leading dots hide a file (and spell ..); trailing ones vanish
    stem = _UNDERSCORES.sub("_", re.sub(r"\.{2,}", ".", stem)).strip(" ._") or DEFAULT_STEM
    if stem.split(".", 1)[0].upper().rstrip(" ") in _RESERVED:
        stem = "_" + stem
    suffix = f".{ext.lower()}" if ext else (guess_extension(content_type) or "")
    return stem, suffix


def guess_extension(content_type: str | None) -> str | None:
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if not base:
        return None
    ext = mimetypes.guess_extension(base, strict=False)
    return ext if ext and _EXTENSION.match(ext[1:]) else None


def safe_filename(name: str | None, attachment_id: str, content_type: str | None = None, *,
                  max_bytes: int = 255) -> str:
    """`{stem}_{attachment_id}{ext}`, at most `max_bytes` bytes of UTF-8."""
    stem, ext = split_name(name, content_type)
    tail = f"_{attachment_id}{ext}"
    room = max_bytes - len(tail.encode("utf-8"))
    if room < 1:
        raise ValueError(f"NOVA_ATTACHMENT_MAX_NAME_BYTES {max_bytes} leaves no room for a name")
    stem = _cut(stem, room).rstrip(" .") or DEFAULT_STEM[:room]
    return stem + tail


def month_folder(when: datetime) -> str:
    return f"{when.year:04d}-{when.month:02d}"


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that would resolve outside `root`."""
    base = root.resolve()
    path = (base / relative).resolve()
    if path == base or not path.is_relative_to(base):
        raise UnsafePath(f"{relative!r} is outside {base}")
    return path


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Written:
    sha256: str
    size: int
    data: bytes | None  # the bytes, when they were kept in memory
    path: Path | None  # the temporary file holding them, when there is one


class TooLarge(Exception):  # noqa: N818
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class Spool:
    """Bytes of one download: hashed and counted, kept in memory up to `memory_max` bytes,
    beyond that (or always, with `memory_max=0`) written to a temporary file in `folder`;
    with `folder=None` and nothing kept in memory they are only hashed. `limit` ends the
    download with `TooLarge` once more bytes than that have arrived.

    Cost per byte is what a plain stream-to-file pays plus SHA-256: chunks are hashed as they
    arrive (OpenSSL, gigabytes a second) and kept as they are, never copied into a growing
    buffer; every BATCH_BYTES they go to the file in one `os.writev` in a worker thread while
    the next batch arrives, so a slow NAS never blocks the event loop (nor its heartbeats)."""

    def __init__(self, folder: Path | None, *, memory_max: int = 0, limit: int | None = None,
                 tag: str = "") -> None:
        self.folder = folder
        self.memory_max = memory_max
        self.limit = limit
        self.tag = re.sub(r"[^A-Za-z0-9-]", "", tag)[:40]
        self.size = 0
        self._sha = hashlib.sha256()
        self._in_memory = memory_max > 0  # until the bytes outgrow memory_max
        self._fd: int | None = None
        self.path: Path | None = None
        self._batch: list[bytes] = []
        self._batched = 0
        self._pending: asyncio.Future[None] | None = None
        self._offset = self._advised = 0  # bytes in the file; bytes handed to the disk

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise TooLarge(self.limit)
        self._sha.update(chunk)
        if self._in_memory:
            if self.size <= self.memory_max:
                self._batch.append(chunk)
                return
            self._in_memory = False  # spill: what was kept goes out with this batch
        if self.folder is None:
            self._batch.clear()
            return
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= BATCH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._pending is not None:  # one batch in the thread while the next one fills
            pending, self._pending = self._pending, None
            await pending
        if self._batch:
            batch, self._batch, self._batched = self._batch, [], 0
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._write, batch))

    def _write(self, batch: list[bytes]) -> None:
        assert self.folder is not None
        if self._fd is None:
            self.path = self.folder / f"{TEMP_PREFIX}{self.tag}-{secrets.token_hex(6)}{TEMP_SUFFIX}"
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                               | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                               0o644)
        views = [memoryview(b) for b in batch if b]
        while views:
            written = os.writev(self._fd, views[:1024])  # IOV_MAX
            self._offset += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        if self._offset - self._advised >= ADVISE_BYTES and hasattr(os, "posix_fadvise"):
            # Hand what was written to the disk now (and drop the pages of the window before,
            # clean by now): the final fsync has little left to do, and a gigabyte download
            # neither floods the page cache nor runs into the kernel's dirty-page throttling.
            start = max(0, self._advised - ADVISE_BYTES)
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, start, self._offset - start, os.POSIX_FADV_DONTNEED)
            self._advised = self._offset

    async def finish(self) -> Written:
        """Flush everything; the file (if any) is fsync'd and closed."""
        if self._in_memory:
            memory = b"".join(self._batch)
            self._batch = []
            return Written(self._sha.hexdigest(), self.size, memory, None)
        if self.folder is not None:
            await self._flush()
            if self._pending is not None:
                pending, self._pending = self._pending, None
                await pending
            if self._fd is None:
                await asyncio.to_thread(self._write, [])  # an empty file is a file too
            fd, self._fd = self._fd, None
            assert fd is not None
            await asyncio.to_thread(_sync_close, fd)
        return Written(self._sha.hexdigest(), self.size, None, self.path)

    async def discard(self) -> None:
        """Drop whatever was written (an error, a cancellation): no temporary file remains."""
        self._batch = []
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                # The batch is still being written in its thread: close the file after it.
                pending.add_done_callback(lambda _f: self._remove())
                raise
            except Exception:  # the error that matters is the caller's
                pass
        self._remove()

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


def _sync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(temp: Path, final: Path) -> None:
    """Atomic rename of a finished temporary file onto its final name, then the folder's own
    fsync so the rename survives a power cut (some network filesystems refuse it: ignored)."""
    os.replace(temp, final)
    with contextlib.suppress(OSError):
        fd = os.open(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path, size: int | None = None) -> str | None:
    """The SHA-256 of a file, or None when it is absent or not `size` bytes long."""
    try:
        with path.open("rb") as f:
            if size is not None and os.fstat(f.fileno()).st_size != size:
                return None
            digest = hashlib.sha256()
            while block := f.read(BATCH_BYTES):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def sweep_temp_files(folders: list[Path], max_age: float, *, now: float | None = None,
                     month_folders: bool = False) -> list[Path]:
    """Delete the `.nova-*.part` files not written for `max_age` seconds (a consumer died
    mid-download) in `folders` (with `month_folders`, in their YYYY-MM sub-folders as well).
    A download in progress writes its file continuously, so it is never taken."""
    cutoff = (time.time() if now is None else now) - max_age
    removed: list[Path] = []
    dirs: list[Path] = []
    for folder in folders:
        dirs.append(folder)
        if month_folders:
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                dirs += [Path(e.path) for e in entries
                         if MONTH_DIR.match(e.name) and e.is_dir(follow_symlinks=False)]
    for folder in dirs:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if not (entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX)):
                    continue
                with contextlib.suppress(OSError):
                    if (entry.is_file(follow_symlinks=False)
                            and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
    return removed
