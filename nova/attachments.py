"""`python -m nova.attachments`: every attachment on the NAS, with its text.

The Missive attachment downloader on Nova's runtime. Thread sync and webhooks store one
`flux_email_attachments` row per attachment (status `pending`); a trigger queues a job on
`attachment_downloads` in the same statement (sql/090_attachments.sql). Run any number of
consumers. For each job:

1. Load the row with its inbox and the month of its message. A row already completed or
   skipped, or taken by another live job, is left alone. Settings may skip it without a
   request: downloads off (`downloads_disabled`), inline parts excluded (`inline`), an
   announced size over NOVA_ATTACHMENT_MAX_BYTES (`over_size_cap`); status `skipped`.
2. Take the row: `downloading`, with the job's message id (`claim_msg_id`), committed at once.
   A second job for the row (a reset raced a live one) sees the claim and stops; the same
   job delivered again (its worker died) takes the row over.
3. A row whose file is already on disk with its recorded checksum is completed without a
   request. Otherwise download it: through the provider (Nylas: the attachment's download
   endpoint, which answers bare `application/octet-stream`; name and type come from the
   stored metadata) within the grant's shared request budget, or from `original_url` (the
   Missive rows). Streamed with httpx into `nova.nas.Spool` (SHA-256 and size as it goes, a
   temporary file in the destination folder, fsync, atomic rename onto
   `NOVA_ATTACHMENT_PATH/YYYY-MM/{stem}_{id}{ext}`). updated_at is touched as the bytes come,
   so a moving download is never mistaken for a stuck one.
4. Extract text (`nova.extract`: PDF in a child process that can be cut off, text/* by its
   charset) and, in ONE transaction with the queue delete, write status `completed`,
   local_filename, local_path, checksum, size, downloaded_at, extracted_text, skipped_reason and
   metadata. An extraction that fails (encrypted, corrupt, too large, timeout) is a
   skipped_reason: the download still counts.

NOVA_ATTACHMENT_STORE=none is the ephemeral mode: up to NOVA_EXTRACT_MEMORY_MAX_BYTES in
memory, up to NOVA_EXTRACT_MAX_BYTES through a temporary file that is deleted at once, larger
not downloaded (`too_large`); the derived data is kept, no binary.

Failures: a transient one (network, 5xx, disk) is retried with backoff; after MAX_RETRIES
attempts the row is `failed` with error_message and retry_count (the Missive downloader's
columns). A 404 or another permanent answer fails at once. An inbox that is not active makes
no request: the row waits (pending, no job, error_message says why) and is queued again when
the inbox is active (trigger on flux_inboxes, and the periodic repair).

Beside the worker runs `AttachmentJanitor`: at start and every NOVA_ATTACHMENT_SWEEP_SECONDS
it resets rows stuck in `downloading` for NOVA_ATTACHMENT_STUCK_MINUTES to `pending` (their
job is queued again), queues pending rows that lost their job, and deletes temporary files not
written for NOVA_ATTACHMENT_TEMP_MAX_AGE_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx

from nova import db, metrics, nas
from nova.config import Settings, settings_or_exit
from nova.extract import PDF, TEXT, Extraction, PdfExtractor, content_type_parts, decode_text
from nova.extract import kind_of as extraction_kind
from nova.logs import setup_logging
from nova.processor import ProviderProcessor, refuse_inbox
from nova.providers import AuthExpired, GrantNotFound, NotFound, Permanent, Transient
from nova.providers.nylas import parse_retry_after
from nova.runtime import (
    DATABASE_ERRORS,
    GiveUp,
    Job,
    JobContext,
    RetryLater,
    RetryPolicy,
    Worker,
    connect_pool,
    describe_error,
    run_parts,
    run_process,
)

log = logging.getLogger("nova.attachments")

LOAD = """
SELECT a.id, a.inbox_id, a.status, a.provider_attachment_id, a.provider_message_id,
       a.original_filename, a.original_url, a.content_type, a.content_id, a.is_inline, a.size,
       a.checksum, a.local_path, a.skipped_reason, a.claim_msg_id,
       a.extracted_text IS NOT NULL AS has_text, a.updated_at < now() - $2::interval AS stale,
       i.grant_id, i.provider, i.status AS inbox_status, i.deleted_at IS NOT NULL AS inbox_deleted,
       coalesce(m.sent_at, m.created_at, a.created_at) AS message_at
FROM flux_email_attachments a
JOIN flux_inboxes i ON i.id = a.inbox_id
LEFT JOIN flux_email_messages m ON m.id = a.message_id
WHERE a.id = $1
"""
# A row is taken from pending (or failed: a replayed dead letter), or back from downloading by
# the same job delivered again, or from a download that stopped moving.
CLAIM = """
UPDATE flux_email_attachments
SET status = 'downloading', claim_msg_id = $2, updated_at = now()
WHERE id = $1 AND (status IN ('pending', 'failed')
                   OR (status = 'downloading'
                       AND (claim_msg_id = $2 OR updated_at < now() - $3::interval)))
RETURNING id
"""
TOUCH = """
UPDATE flux_email_attachments SET updated_at = now()
WHERE id = $1 AND status = 'downloading' AND claim_msg_id = $2
"""
COMPLETE = """
UPDATE flux_email_attachments
SET status = 'completed', local_filename = $3, local_path = $4, checksum = $5, size = $6,
    downloaded_at = now(), extracted_text = $7, skipped_reason = $8, metadata = $9,
    error_message = NULL, updated_at = now()
WHERE id = $1 AND status = 'downloading' AND claim_msg_id = $2
RETURNING id
"""
REUSE = """
UPDATE flux_email_attachments
SET status = 'completed', downloaded_at = coalesce(downloaded_at, now()), error_message = NULL,
    updated_at = now()
WHERE id = $1 AND status = 'downloading' AND claim_msg_id = $2
RETURNING id
"""
# Rows a job may still change: not finished, and not held by another job's download.
_OURS = ("status IN ('pending', 'failed', 'downloading')"
         " AND (status <> 'downloading' OR claim_msg_id = $3)")
SKIP = f"""
UPDATE flux_email_attachments
SET status = 'skipped', skipped_reason = $2, error_message = NULL, claim_msg_id = $3,
    updated_at = now()
WHERE id = $1 AND {_OURS}
"""
# Waiting for the inbox: pending without a job. claim_msg_id names this job, whose message is
# still in the queue when the row changes, so the requeue trigger does not send another.
PARK = f"""
UPDATE flux_email_attachments
SET status = 'pending', error_message = $2, claim_msg_id = $3, updated_at = now()
WHERE id = $1 AND {_OURS}
"""
FAIL = f"""
UPDATE flux_email_attachments
SET status = CASE WHEN $4 THEN 'failed' ELSE 'pending' END, error_message = $2,
    retry_count = retry_count + 1, claim_msg_id = $3, updated_at = now()
WHERE id = $1 AND {_OURS}
"""
RESET_STUCK = "SELECT * FROM nova_reset_stuck_attachments($1)"
REQUEUE_LOST = "SELECT * FROM nova_requeue_lost_attachments(NULL, $1)"
REQUEUE_BATCH = 10_000


class Skip(Exception):  # noqa: N818 - a verdict
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Target:
    """Where a row's bytes go."""

    name: str  # local_filename
    relative: str  # local_path: YYYY-MM/name
    path: Path  # the final file
    kind: str | None  # PDF, TEXT or None
    charset: str | None


def temp_folder(settings: Settings) -> Path:
    return settings.attachment_temp_path or Path(tempfile.gettempdir()) / "nova-attachments"


class AttachmentProcessor(ProviderProcessor):
    queue: ClassVar[str] = "attachment_downloads"
    component: ClassVar[str] = "Attachments"
    max_attempts: ClassVar[int] = 3  # MAX_RETRIES decides (retry_policy)

    def __init__(self, settings: Settings, provider: Any = None, *,
                 retry_base_delay: float = 2.0, retry_max_delay: float = 300.0) -> None:
        super().__init__(settings, provider, retry_base_delay=retry_base_delay,
                         retry_max_delay=retry_max_delay)
        self.root = settings.attachment_path
        self.ephemeral = settings.attachment_store == "none"
        self.temp = temp_folder(settings)
        self.stuck_after = timedelta(minutes=settings.attachment_stuck_minutes)
        self.touch_every = min(30.0, self.stuck_after.total_seconds() / 4)
        self.extractor: PdfExtractor | None = None
        self._http: httpx.AsyncClient | None = None
        self._pool: asyncpg.Pool | None = None

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.settings.max_retries, self.retry_base_delay,
                           self.retry_max_delay)

    async def setup(self, worker: Worker) -> None:
        # Without NYLAS_API_KEY only plain URLs (Missive rows) can be fetched; a row that needs
        # the API then stops the processor with a clear line (runtime.Fatal).
        await super().setup(worker)
        self._pool = worker.pool
        folder = self.temp if self.ephemeral else self.root
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        self.root = await asyncio.to_thread(self.root.resolve)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=True,
                                       headers={"User-Agent": "nova"})
        s = self.settings
        self.extractor = PdfExtractor(workers=s.extract_workers, timeout=s.extract_timeout_seconds,
                                      memory_mb=s.extract_memory_mb,
                                      max_pages=s.extract_max_pages,
                                      max_chars=s.extract_max_chars)
        log.info("[Attachments] store=%s root=%s downloads=%s inline=%s cap=%s",
                 s.attachment_store, self.root if not self.ephemeral else "-",
                 "on" if s.attachment_downloads else "off",
                 "on" if s.attachment_include_inline else "off", s.attachment_max_bytes or "none")

    async def teardown(self) -> None:
        await super().teardown()
        if self._http is not None:
            await self._http.aclose()
        if self.extractor is not None:
            await self.extractor.aclose()

    # --- the job ---------------------------------------------------------------------------

    async def process(self, job: Job, ctx: JobContext) -> str | None:
        row_id = _attachment_id(job)
        row = await ctx.pool.fetchrow(LOAD, row_id, self.stuck_after)
        if row is None:
            return f"attachment={row_id} no longer exists"
        status = row["status"]
        if status in ("completed", "skipped"):
            return f"attachment={row_id} already {status}"
        if status == "downloading" and row["claim_msg_id"] != job.msg_id and not row["stale"]:
            return f"attachment={row_id} is being downloaded by job {row['claim_msg_id']}"
        reason = self._policy(row)
        if reason is not None:
            return await self._skip(ctx, job, row_id, reason)
        via_provider = bool(row["grant_id"] and row["provider_attachment_id"])
        if via_provider:
            self.provider_for(row["provider"])  # not configured here: the job waits, untouched
            if row["inbox_status"] == "revoked":
                raise GiveUp("inbox revoked: attachment not downloaded")
            if row["inbox_status"] != "active" or row["inbox_deleted"]:
                why = "deleted" if row["inbox_deleted"] else row["inbox_status"]
                return await self._park(ctx, job, row_id, f"waiting: inbox is {why}; queued "
                                                          f"again when it is active")
        elif not row["original_url"]:
            raise GiveUp("nothing to download from: no grant and no original_url")
        if await ctx.pool.fetchval(CLAIM, row_id, job.msg_id, self.stuck_after) is None:
            return f"attachment={row_id} taken by another job"
        try:
            target = await asyncio.to_thread(self._target, row)  # resolves paths: a NAS may lag
        except nas.UnsafePath as exc:  # never expected: names are cleaned first
            raise GiveUp(str(exc)) from exc
        if await self._already_on_disk(ctx, job, row, target):
            return f"attachment={row_id} already on disk with its checksum: not downloaded"
        started = time.perf_counter()
        try:
            written = await self._download(ctx, job, row, target, via_provider)
        except Skip as exc:
            return await self._skip(ctx, job, row_id, exc.reason)
        except AuthExpired:
            async with ctx.transaction() as conn:
                await refuse_inbox(conn, row["inbox_id"], "auth_expired")
                await conn.execute(PARK, row_id, "waiting: the grant expired", job.msg_id)
            return f"attachment={row_id} parked: grant expired"
        except GrantNotFound as exc:
            async with ctx.transaction() as conn:
                await refuse_inbox(conn, row["inbox_id"], "revoked")
                await conn.execute(FAIL, row_id, f"grant deleted at the provider: {exc}",
                                   job.msg_id, True)
            return f"attachment={row_id} failed: grant deleted"
        except NotFound as exc:
            raise GiveUp(f"not found at the provider: {exc}") from exc
        except Permanent as exc:
            raise GiveUp(f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        try:
            extraction = await self._extract(target, written)
        finally:
            if self.ephemeral and written.path is not None:
                await asyncio.to_thread(_unlink, written.path)
        meta = {"kind": target.kind, **extraction.meta}
        name, relative = (None, None) if self.ephemeral else (target.name, target.relative)
        async with ctx.transaction() as conn:
            done = await conn.fetchval(COMPLETE, row_id, job.msg_id, name, relative,
                                       written.sha256, written.size, extraction.text,
                                       extraction.skipped_reason, meta)
        if done is None:
            return f"attachment={row_id} changed during the download: nothing recorded"
        rate = written.size / seconds / 1e6 if seconds > 0 else 0.0
        text = (f"text={len(extraction.text)}" if extraction.text is not None
                else f"skipped={extraction.skipped_reason}")
        return (f"attachment={row_id} bytes={written.size} {rate:.1f}MB/s {text}"
                f"{'' if self.ephemeral else ' file=' + target.relative}")

    def _policy(self, row: asyncpg.Record) -> str | None:
        s = self.settings
        if not s.attachment_downloads:
            return "downloads_disabled"
        if not s.attachment_include_inline and (row["is_inline"] or row["content_id"]):
            return "inline"
        size = row["size"]
        if size is not None and s.attachment_max_bytes and size > s.attachment_max_bytes:
            return "over_size_cap"
        if size is not None and self.ephemeral and size > s.extract_max_bytes:
            return "too_large"  # nothing could be extracted, and no binary is kept
        return None

    def _target(self, row: asyncpg.Record) -> Target:
        name = nas.safe_filename(row["original_filename"], str(row["id"]), row["content_type"],
                                 max_bytes=self.settings.attachment_max_name_bytes)
        when: datetime = row["message_at"]
        relative = f"{nas.month_folder(when.astimezone(UTC))}/{name}"
        path = nas.inside(self.root, relative)  # raises UnsafePath: never expected
        _, params = content_type_parts(row["content_type"])
        return Target(name, relative, path,
                      extraction_kind(row["content_type"], row["original_filename"]),
                      params.get("charset"))

    async def _skip(self, ctx: JobContext, job: Job, row_id: uuid.UUID, reason: str) -> str:
        async with ctx.transaction() as conn:
            await conn.execute(SKIP, row_id, reason, job.msg_id)
        return f"attachment={row_id} skipped: {reason}"

    async def _park(self, ctx: JobContext, job: Job, row_id: uuid.UUID, why: str) -> str:
        async with ctx.transaction() as conn:
            await conn.execute(PARK, row_id, why, job.msg_id)
        return f"attachment={row_id} parked: {why}"

    async def _already_on_disk(self, ctx: JobContext, job: Job, row: asyncpg.Record,
                               target: Target) -> bool:
        """A file of this row already on disk with the recorded checksum (the row was reset
        after a download) is taken as it is."""
        if self.ephemeral or not row["checksum"] or not row["local_path"]:
            return False
        try:
            path = await asyncio.to_thread(nas.inside, self.root, row["local_path"])
        except nas.UnsafePath:
            return False
        if await asyncio.to_thread(nas.file_sha256, path, row["size"]) != row["checksum"]:
            return False
        if not row["has_text"] and row["skipped_reason"] is None:
            stored = nas.Written(row["checksum"], row["size"], None, None)
            extraction = await self._extract(
                Target(path.name, row["local_path"], path, target.kind, target.charset), stored)
            async with ctx.transaction() as conn:
                return await conn.fetchval(
                    COMPLETE, row["id"], job.msg_id, path.name, row["local_path"],
                    row["checksum"], row["size"], extraction.text, extraction.skipped_reason,
                    {"kind": target.kind, **extraction.meta}) is not None
        async with ctx.transaction() as conn:
            return await conn.fetchval(REUSE, row["id"], job.msg_id) is not None

    # --- download --------------------------------------------------------------------------

    def _spool(self, target: Target) -> nas.Spool:
        s = self.settings
        limits = [x for x in (s.attachment_max_bytes,
                              s.extract_max_bytes if self.ephemeral else 0) if x]
        if not self.ephemeral:
            return nas.Spool(target.path.parent, limit=min(limits) if limits else None,
                             tag=target.path.stem[-36:])
        keep = target.kind is not None  # bytes worth keeping until extraction
        return nas.Spool(self.temp if keep else None,
                         memory_max=s.extract_memory_max_bytes if keep else 0,
                         limit=min(limits) if limits else None, tag=target.path.stem[-36:])

    async def _download(self, ctx: JobContext, job: Job, row: asyncpg.Record, target: Target,
                        via_provider: bool) -> nas.Written:
        if not self.ephemeral:
            await asyncio.to_thread(target.path.parent.mkdir, parents=True, exist_ok=True)
        touch = _Toucher(ctx.pool, row["id"], job.msg_id, self.touch_every)

        async def fetch(chunks: Callable[[], Any]) -> nas.Written:
            spool = self._spool(target)
            try:
                async with chunks() as stream:
                    async for chunk in stream:
                        await spool.write(chunk)
                        await touch.maybe()
                written = await spool.finish()
            except nas.TooLarge as exc:
                await spool.discard()
                cap = self.settings.attachment_max_bytes
                raise Skip("over_size_cap" if cap and exc.limit == cap else "too_large") from exc
            except BaseException:
                await spool.discard()
                raise
            if not self.ephemeral:
                assert written.path is not None
                try:
                    await asyncio.to_thread(nas.commit_file, written.path, target.path)
                except BaseException:
                    await asyncio.to_thread(_unlink, written.path)
                    raise
            return written

        if via_provider:
            grant, aid, mid = (row["grant_id"], row["provider_attachment_id"],
                               row["provider_message_id"])
            kind = row["provider"]
            provider = self.provider_for(kind)
            return await self.call(
                lambda: fetch(lambda: provider.download_attachment(grant, aid, mid)), grant,
                kind)
        return await fetch(lambda: self._url_stream(row["original_url"]))

    @contextlib.asynccontextmanager
    async def _url_stream(self, url: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """A plain URL (the Missive rows): not a provider call, so outside the grant budget."""
        if not url.lower().startswith(("http://", "https://")):
            raise GiveUp(f"not an http(s) URL: {url[:100]!r}")
        assert self._http is not None
        async with self._http.stream("GET", url) as resp:
            code = resp.status_code
            if code == 429:
                raise RetryLater(f"HTTP 429 from {resp.url.host}",
                                 parse_retry_after(resp.headers.get("retry-after")))
            if code >= 400:
                error = f"HTTP {code} from {resp.url.host}"
                if code in (408, 425) or code >= 500:
                    raise Transient(error, status=code)
                raise GiveUp(error)
            yield resp.aiter_bytes()

    # --- extraction ------------------------------------------------------------------------

    async def _extract(self, target: Target, written: nas.Written) -> Extraction:
        if target.kind is None:
            return Extraction(None, "unsupported_type")
        s = self.settings
        if written.size > s.extract_max_bytes:
            return Extraction(None, "too_large", {"limit": s.extract_max_bytes})
        if written.data is not None:
            source: bytes | Path = written.data
            where = "memory"
        elif self.ephemeral:
            if written.path is None:
                return Extraction(None, "too_large", {"limit": s.extract_max_bytes})
            source, where = written.path, "temp_file"
        else:
            source, where = target.path, "file"
        if target.kind == TEXT:
            try:
                result = await asyncio.to_thread(decode_text, source, target.charset,
                                                 s.extract_max_chars)
            except (OSError, ValueError) as exc:  # never a reason to fail the download
                result = Extraction(None, "extract_failed", {"error": describe_error(exc)})
        else:
            assert target.kind == PDF and self.extractor is not None
            result = await (self.extractor.extract(data=source) if isinstance(source, bytes)
                            else self.extractor.extract(path=source))
        return Extraction(result.text, result.skipped_reason,
                          {**result.meta, "processed_in": where})

    # --- failures --------------------------------------------------------------------------

    async def record_failure(self, conn: asyncpg.Connection, job: Job, error: BaseException,
                             final: bool) -> None:
        try:
            row_id = _attachment_id(job)
        except GiveUp:
            return
        await conn.execute(FAIL, row_id, f"{type(error).__name__}: {error}"[:2000], job.msg_id,
                           final)

    @classmethod
    def main(cls) -> int:
        settings = settings_or_exit()
        setup_logging(settings.log_level, settings.log_format)
        return run_process(run_parts([Worker(cls(settings), settings),
                                      AttachmentJanitor(settings),
                                      *metrics.server_parts(settings, cls.component)]))


class _Toucher:
    """Keeps a running download's updated_at fresh, so it is never taken for a stuck one."""

    def __init__(self, pool: asyncpg.Pool, row_id: uuid.UUID, msg_id: int,
                 every: float) -> None:
        self.pool, self.row_id, self.msg_id, self.every = pool, row_id, msg_id, every
        self.last = time.monotonic()

    async def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        with contextlib.suppress(*DATABASE_ERRORS):  # the next one will do
            await self.pool.execute(TOUCH, self.row_id, self.msg_id)


def _attachment_id(job: Job) -> uuid.UUID:
    try:
        return uuid.UUID(str(job.message["attachment_id"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise GiveUp(f"bad attachment job: {job.message}") from exc


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


# --------------------------------------------------------------------------- the janitor
@dataclass
class Sweep:
    stuck: list[Any] = field(default_factory=list)
    requeued: list[Any] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)


class AttachmentJanitor:
    """At start and every NOVA_ATTACHMENT_SWEEP_SECONDS: stuck downloads back to pending,
    pending rows without a job queued again, orphaned temporary files deleted."""

    def __init__(self, settings: Settings, *, pool: asyncpg.Pool | None = None,
                 database_url: str | None = None) -> None:
        self.settings = settings
        self.database_url = database_url
        self._pool = pool
        self._own_pool = pool is None
        self.interval = settings.attachment_sweep_seconds
        self.stuck_after = timedelta(minutes=settings.attachment_stuck_minutes)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        if self._pool is None:
            self._pool = await self._connect()
            if self._pool is None:
                return
        log.info("[Attachments] janitor every %.0fs stuck_after=%s temp_max_age=%.0fs",
                 self.interval, self.stuck_after, self.settings.attachment_temp_max_age_seconds)
        delay = self.interval
        try:
            while not self._stopping.is_set():
                delay = self.interval if await self._pass() else min(delay, 5.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            if self._own_pool:
                await self._pool.close()

    async def _connect(self) -> asyncpg.Pool | None:
        url: str = (self.database_url if self.database_url is not None
                    else await asyncio.to_thread(db.database_url, self.settings))
        return await connect_pool(url, self._stopping, "Attachments", max_size=2)

    async def _pass(self) -> bool:
        ok = True
        for step in (self.reset_stuck, self.requeue_lost, self.sweep_temp_files):
            try:
                await step()
            except Exception as exc:  # one failing step never stops the others
                ok = False
                log.warning("[Attachments] janitor: %s failed (%s)", step.__name__,
                            describe_error(exc))
        return ok

    async def sweep(self) -> Sweep:
        """One pass of every step (for tests and the CLI)."""
        return Sweep(await self.reset_stuck(), await self.requeue_lost(),
                     await self.sweep_temp_files())

    async def reset_stuck(self) -> list[Any]:
        assert self._pool is not None
        rows = await self._pool.fetch(RESET_STUCK, self.stuck_after)
        for r in rows:
            log.warning("[Attachments] stuck download reset to pending attachment=%s "
                        "since=%s", r["attachment_id"], r["stuck_since"].isoformat())
        return list(rows)

    async def requeue_lost(self) -> list[Any]:
        assert self._pool is not None
        rows = await self._pool.fetch(REQUEUE_LOST, REQUEUE_BATCH)
        if rows:
            log.warning("[Attachments] %d pending attachment(s) without a job queued again",
                        len(rows))
        return list(rows)

    async def sweep_temp_files(self) -> list[Path]:
        s = self.settings
        folders = [temp_folder(s)]
        nas_root = s.attachment_path if s.attachment_store == "nas" else None
        removed = await asyncio.to_thread(
            _sweep, folders, nas_root, s.attachment_temp_max_age_seconds)
        for path in removed:
            log.warning("[Attachments] orphaned temporary file deleted path=%s", path)
        return removed


def _sweep(folders: list[Path], nas_root: Path | None, max_age: float) -> list[Path]:
    removed = nas.sweep_temp_files(folders, max_age)
    if nas_root is not None:
        removed += nas.sweep_temp_files([nas_root], max_age, month_folders=True)
    return removed


def main() -> int:
    return AttachmentProcessor.main()


if __name__ == "__main__":
    raise SystemExit(main())
