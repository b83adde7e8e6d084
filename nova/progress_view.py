"""The live view of backfills: `nova progress` and `python -m nova` on a terminal.

One bar per backfill (rich): threads done (completed + failed) of those found, messages synced,
the measured rate in threads/s, an ETA, and failures. The ETA is the threads left divided by
the grant's request rate as learned in `provider_rate_limits` (the configured
NOVA_PROVIDER_RATE_LIMIT until one is learned): a thread costs one request (its messages, 200
per page; a thread that came whole with its listing costs none), so that rate is what bounds a
backfill whatever the number of workers. While discovery runs the total is not known: the bar
pulses and says how many threads were found so far.

Figures come from the counters (`nova_backfill_progress`: get_sync_progress for every backfill
shown, in one statement, JIT off) in one query per refresh; off a terminal the same figures are
printed as plain lines, one per change. A refresh costs what is running, not what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

log = logging.getLogger("nova.progress")

RUNNING = ("queued", "discovering", "thread_sync")
FINISHED = ("completed", "failed")

# The backfills asked for by id, and (with %(running)s) every running one.
SNAPSHOT = """
SELECT p.*, i.email, i.grant_id, c.last_error, r.rate AS learned_rate
FROM nova_backfill_progress(%(ids)s::uuid[], %(running)s) p
JOIN flux_inbox_configurations c ON c.id = p.config_id
JOIN flux_inboxes i ON i.id = c.inbox_id
LEFT JOIN provider_rate_limits r ON r.grant_id = i.grant_id
ORDER BY c.created_at, c.id
"""
# Per transaction, so that it holds behind a transaction pooler too (nova.db).
NO_JIT = "SELECT set_config('jit', 'off', true)"
RATE_WINDOW_SECONDS = 30.0


@dataclass
class Backfill:
    """One backfill as last seen, with the samples its measured rate comes from."""

    config_id: uuid.UUID
    row: dict[str, Any] = field(default_factory=dict)
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))

    def update(self, row: dict[str, Any], now: float) -> None:
        self.row = row
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_SECONDS:
            self.samples.popleft()

    @property
    def status(self) -> str:
        return str(self.row.get("backfill_status", "?"))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def done(self) -> int:
        return int(self.row.get("threads_completed", 0)) + int(self.row.get("threads_failed", 0))

    @property
    def found(self) -> int:
        """Threads known so far: the work list once discovery is over, else those listed."""
        if self.row.get("discovery_complete"):
            return int(self.row.get("threads_queued", 0))
        return max(int(self.row.get("threads_discovered", 0)),
                   int(self.row.get("threads_queued", 0)))

    @property
    def total(self) -> int | None:
        """The number of threads, once discovery has finished (None before)."""
        return self.found if self.row.get("discovery_complete") or self.finished else None

    def rate(self) -> float | None:
        """Threads done per second over the last RATE_WINDOW_SECONDS."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def request_rate(self, configured: float) -> float:
        learned = self.row.get("learned_rate")
        return float(learned) if learned else configured

    def eta(self, configured: float) -> float | None:
        """Seconds left at the grant's request rate (one request per thread left)."""
        if self.total is None or self.finished:
            return None
        return max(0, self.total - self.done) / self.request_rate(configured)


def fetch(conn: Any, ids: Sequence[uuid.UUID], running: bool) -> list[dict[str, Any]]:
    """The rows of SNAPSHOT (a psycopg connection with dict rows)."""
    with conn.transaction():
        conn.execute(NO_JIT)
        return list(conn.execute(SNAPSHOT, {"ids": list(ids), "running": running}).fetchall())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def details(b: Backfill, configured_rate: float) -> str:
    """Everything but the bar: `150/200 threads · 1,234 messages · 12.5 threads/s · ETA 0:04
    at 40 req/s · 2 failed`."""
    row = b.row
    if b.total is None:
        threads = f"{b.done:,} synced of {b.found:,} found so far"
    else:
        threads = f"{b.done:,}/{b.total:,} threads"
    parts = [threads, f"{int(row.get('messages_synced', 0)):,} messages"]
    rate = b.rate()
    if rate is not None and not b.finished:
        parts.append(f"{rate:,.1f} threads/s")
    eta = b.eta(configured_rate)
    req = b.request_rate(configured_rate)
    if eta is not None:
        parts.append(f"ETA {_duration(eta)} at {req:,.0f} req/s")
    elif not b.finished:
        parts.append(f"ETA after discovery ({req:,.0f} req/s)")
    failed = int(row.get("threads_failed", 0))
    parts.append(f"{failed:,} failed")
    if b.status == "failed" and row.get("last_error"):
        parts.append(f"backfill failed: {row['last_error']}")
    return " · ".join(parts)


def label(b: Backfill) -> str:
    who = b.row.get("email") or b.row.get("grant_id") or "?"
    return f"{who} {str(b.config_id)[:8]}"


def percent(b: Backfill) -> str:
    if b.total is None:
        return "discovering" if b.status == "discovering" else b.status
    shown = 100 if b.total == 0 else int(b.done * 100 / b.total)  # floor: 99.6% is not 100%
    return f"{shown}% {b.status}"


def plain_line(b: Backfill, configured_rate: float) -> str:
    """The line printed off a terminal (and by `nova progress` once)."""
    row = b.row
    if row.get("percent_complete") is None:
        progress = f"discovering ({int(row.get('threads_discovered', 0))} threads found so far)"
    else:
        progress = f"{row['percent_complete']}% ({b.done}/{int(row['threads_queued'])})"
    line = (f"Config {b.config_id} | Status: {b.status} | Progress: {progress}"
            f" | failed: {row.get('threads_failed', 0)}"
            f" | messages: {row.get('messages_synced', 0)}")
    rate = b.rate()
    if rate is not None and not b.finished:
        line += f" | rate: {rate:.1f} threads/s"
    eta = b.eta(configured_rate)
    if eta is not None:
        line += f" | ETA: {_duration(eta)} at {b.request_rate(configured_rate):.0f} req/s"
    if b.status == "failed" and row.get("last_error"):
        line += f" | error: {row['last_error']}"
    return line


class Board:
    """The backfills being shown and their bars."""

    def __init__(self, configured_rate: float, console: Console | None = None) -> None:
        self.configured_rate = configured_rate
        self.backfills: dict[uuid.UUID, Backfill] = {}
        self.console = console
        self.progress: Progress | None = None
        self._tasks: dict[uuid.UUID, TaskID] = {}
        if console is not None:
            self.progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[percent]}", markup=False),
                TextColumn("{task.fields[details]}", markup=False),
                console=console, auto_refresh=True, refresh_per_second=4,
                redirect_stdout=False, redirect_stderr=False)

    def update(self, rows: Iterable[dict[str, Any]]) -> list[Backfill]:
        """Take a snapshot; returns the backfills whose figures changed."""
        now = time.monotonic()
        changed = []
        for row in rows:
            config_id = row["config_id"]
            b = self.backfills.setdefault(config_id, Backfill(config_id))
            before = dict(b.row)
            b.update(row, now)
            if {k: v for k, v in row.items() if k != "last_updated_at"} != \
                    {k: v for k, v in before.items() if k != "last_updated_at"}:
                changed.append(b)
            self._draw(b)
        return changed

    def _draw(self, b: Backfill) -> None:
        if self.progress is None:
            return
        shown, more = percent(b), details(b, self.configured_rate)
        task = self._tasks.get(b.config_id)
        if task is None:
            task = self.progress.add_task(label(b), total=b.total, completed=b.done,
                                          percent=shown, details=more)
            self._tasks[b.config_id] = task
        else:
            self.progress.update(task, total=b.total, completed=b.done, percent=shown,
                                 details=more)

    def start(self) -> None:
        if self.progress is not None:
            self.progress.start()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()

    @property
    def all_finished(self) -> bool:
        return bool(self.backfills) and all(b.finished for b in self.backfills.values())


# --- `nova progress` -----------------------------------------------------------------------

def watch(conn: Any, ids: Sequence[uuid.UUID], *, configured_rate: float, live: bool,
          interval: float = 0.5, out: Callable[[str], None] = print,
          console: Console | None = None) -> Board:
    """Follow the backfills `ids` (all running ones when empty) until every one has finished;
    live bars when `live`, else a plain line per change. Returns the last board."""
    board = Board(configured_rate, (console or Console(highlight=False)) if live else None)
    board.start()
    try:
        while True:
            rows = fetch(conn, ids, running=not ids)
            if not rows and not board.backfills:
                return board
            for b in board.update(rows):
                if not live:
                    out(plain_line(b, configured_rate))
            if board.all_finished or (ids and len(board.backfills) < len(ids)):
                return board
            time.sleep(interval)
    finally:
        board.stop()


# --- `python -m nova` on a terminal --------------------------------------------------------

class ConsoleLogHandler(logging.Handler):
    """Log lines printed through the rich console, so they scroll above its live bars."""

    def __init__(self, console: Console, formatter: logging.Formatter) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.console.print(line, markup=False, highlight=False, emoji=False,
                               soft_wrap=True)
        except Exception:
            self.handleError(record)


def console_logging(console: Console) -> None:
    """Route the root logger's lines (as nova.logs formats them) through `console`."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None),
                     logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.handlers[:] = [ConsoleLogHandler(console, formatter)]


class ProgressView:
    """A part of `python -m nova` (nova.runtime.run_parts): bars for the backfills pinned to
    it and for every backfill that runs while the process does."""

    def __init__(self, console: Console, database_url: str, configured_rate: float, *,
                 pinned: Sequence[uuid.UUID] = (), interval: float = 0.5) -> None:
        self.board = Board(configured_rate, console)
        self.database_url = database_url
        self.pinned = list(pinned)
        self.interval = interval
        self._stopping = asyncio.Event()
        self._conn: Any = None
        self._failing = False

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self.board.start()
        try:
            while not self._stopping.is_set():
                await self._refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval)
        finally:
            self.board.stop()
            await asyncio.to_thread(self._close)

    async def _refresh(self) -> None:
        ids = list({*self.pinned, *self.board.backfills})
        try:
            rows = await asyncio.to_thread(self._fetch, ids)
        except Exception as exc:  # the database away: the processors say so in the log
            self._close()
            if not self._failing:
                log.warning("[Progress] cannot read progress (%s)", str(exc).splitlines()[0]
                            if str(exc) else type(exc).__name__)
            self._failing = True
            return
        self._failing = False
        self.board.update(rows)

    def _fetch(self, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        from nova import db

        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.database_url, autocommit=True, row_factory=dict_row,
                                    connect_timeout=5, application_name="nova-progress")
        return fetch(self._conn, ids, running=True)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
