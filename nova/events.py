"""The change feed from Python and the shell (SQL in sql/140_events.sql).

For apps (asyncpg): `Consumer(conn_or_pool, "my-app")`, then `await consumer.read(100)` for the
next events past its cursors (each inbox's in position order) and `await consumer.ack(events)`
once they are handled; at least once: events read and not acknowledged come again. A consumer
behind events that retention pruned gets `Behind` (consumer, inbox, range), never a gap, until
`nova events reset NAME`. `wait(conn, seconds)` sleeps until NOTIFY nova_events or the timeout,
whichever comes first (the notification is a hint, so a poll always follows).

From the shell:

    nova events [--inbox ID] [--json] [--follow] [--consumer NAME] [--batch N]
    nova events reset CONSUMER [--inbox ID] [--to-end]
    nova events consumers [--json]

Without --consumer it prints the events kept, each inbox in position order, and moves nothing;
with --consumer NAME it reads and acknowledges as that consumer (what was printed is
acknowledged). --follow keeps printing as events commit (LISTEN nova_events on
NOVA_DATABASE_DIRECT_URL or the database URL, and a poll every POLL_INTERVAL_MS as well).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from nova.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BEHIND_SQLSTATE = "NV020"
BATCH = 500

READ = "SELECT * FROM nova_events_read($1, $2, $3)"
ACK = "SELECT nova_events_ack($1, $2, $3)"
RESET = "SELECT * FROM nova_events_reset($1, $2, $3)"
# The anonymous reader of the shell: the inboxes with events past what it printed, then each
# inbox's next events by (inbox_id, position).
HEADS = """
SELECT inbox_id, position, pruned_through FROM nova_event_heads
WHERE (%(inbox)s::uuid IS NULL OR inbox_id = %(inbox)s::uuid) ORDER BY inbox_id
"""
AFTER = """
SELECT id, inbox_id, position, kind, object_id, provider_id, thread_id, changes, occurred_at
FROM nova_events WHERE inbox_id = %s AND position > %s ORDER BY position LIMIT %s
"""
FIND_INBOX = """
SELECT id FROM flux_inboxes
WHERE id::text = %(ref)s OR grant_id = %(ref)s OR lower(email) = lower(%(ref)s)
ORDER BY (id::text = %(ref)s) DESC, created_at
"""
_BEHIND = re.compile(r"consumer (?P<consumer>.+) is behind in inbox (?P<inbox>[0-9a-f-]{36}): "
                     r"events (?P<first>\d+) to (?P<last>\d+) were pruned")


@dataclass(frozen=True)
class Event:
    id: int
    inbox_id: uuid.UUID
    position: int
    kind: str
    object_id: str
    provider_id: str | None
    thread_id: uuid.UUID | None
    changes: dict[str, Any]
    occurred_at: datetime

    @classmethod
    def of(cls, row: Any) -> Event:
        changes = row["changes"]
        if isinstance(changes, str):  # a connection without Nova's JSON codec
            changes = json.loads(changes)
        return cls(row["id"], row["inbox_id"], row["position"], row["kind"], row["object_id"],
                   row["provider_id"], row["thread_id"], changes, row["occurred_at"])


class Behind(Exception):
    """Retention pruned events of `inbox` (positions first..last) that the consumer had not
    read. Rebuild what it keeps, then `nova events reset CONSUMER` (Consumer.reset)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        found = _BEHIND.search(message)
        self.consumer = found["consumer"] if found else None
        self.inbox_id = uuid.UUID(found["inbox"]) if found else None
        self.first = int(found["first"]) if found else None
        self.last = int(found["last"]) if found else None


def last_positions(events: Iterable[Event]) -> dict[uuid.UUID, int]:
    """The highest position of each inbox among `events`: what acknowledging them moves."""
    out: dict[uuid.UUID, int] = {}
    for e in events:
        out[e.inbox_id] = max(e.position, out.get(e.inbox_id, 0))
    return out


class Consumer:
    """A named consumer over an asyncpg connection or pool (see the module doc)."""

    def __init__(self, db: Any, name: str) -> None:
        if not name:
            raise ValueError("a consumer needs a name")
        self.db, self.name = db, name

    async def read(self, max_events: int = 100, inbox: uuid.UUID | None = None) -> list[Event]:
        import asyncpg

        try:
            rows = await self.db.fetch(READ, self.name, max_events, inbox)
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) == BEHIND_SQLSTATE:
                raise Behind(str(exc)) from None
            raise
        return [Event.of(r) for r in rows]

    async def ack(self, events: Iterable[Event]) -> None:
        """Every event up to the highest of each inbox among `events` is handled."""
        for inbox, position in sorted(last_positions(events).items()):
            await self.db.fetchval(ACK, self.name, inbox, position)

    async def reset(self, inbox: uuid.UUID | None = None,
                    to_end: bool = False) -> list[tuple[uuid.UUID, int, int]]:
        """Past the pruned events (or, `to_end`, past every event so far); what moved."""
        rows = await self.db.fetch(RESET, self.name, inbox, to_end)
        return [(r["inbox_id"], r["from_position"], r["to_position"]) for r in rows]


async def wait(conn: Any, seconds: float) -> bool:
    """Sleep on an asyncpg connection until NOTIFY nova_events or `seconds`; True when woken.
    The connection must be direct (a transaction pooler loses notifications)."""
    import asyncio

    woken = asyncio.Event()

    def wake(*_: Any) -> None:
        woken.set()

    await conn.add_listener("nova_events", wake)
    try:
        await asyncio.wait_for(woken.wait(), seconds)
        return True
    except TimeoutError:
        return False
    finally:
        await conn.remove_listener("nova_events", wake)


# --------------------------------------------------------------------------- the shell
def _line(e: Event) -> str:
    at = e.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
    changes = f" {json.dumps(e.changes, separators=(',', ':'))}" if e.changes else ""
    provider = f" provider={e.provider_id}" if e.provider_id else ""
    return f"{at}  {e.inbox_id} #{e.position:<6} {e.kind:<21} {e.object_id}{provider}{changes}"


def _emit(events: Sequence[Event], as_json: bool, json_default: Any) -> None:
    for e in events:
        if as_json:
            print(json.dumps(asdict(e), default=json_default, separators=(",", ":")))
        else:
            print(_line(e))
    sys.stdout.flush()


def _rows(conn: psycopg.Connection[Any], query: str, params: Any) -> list[Event]:
    return [Event.of(r) for r in conn.execute(query, params).fetchall()]


def _find_inbox(conn: psycopg.Connection[Any], ref: str) -> uuid.UUID:
    rows = conn.execute(FIND_INBOX, {"ref": ref}).fetchall()
    if rows and str(rows[0]["id"]) == ref.lower():
        return rows[0]["id"]  # type: ignore[no-any-return]
    if len(rows) != 1:
        # An inbox without a row (removed) may still have events: an id is taken as it is.
        try:
            return uuid.UUID(ref)
        except ValueError:
            pass
        raise LookupError(f"{'no' if not rows else len(rows)} inbox(es) match {ref!r} "
                          "(give its id, grant id or email)")
    return rows[0]["id"]  # type: ignore[no-any-return]


class Printer:
    """What the shell prints, once: as a consumer (read and acknowledge) or anonymously (each
    inbox after the last position printed, nothing moved)."""

    def __init__(self, conn: psycopg.Connection[Any], args: argparse.Namespace,
                 inbox: uuid.UUID | None, json_default: Any) -> None:
        self.conn, self.args, self.inbox, self.json_default = conn, args, inbox, json_default
        self.printed: dict[uuid.UUID, int] = {}

    def drain(self) -> int:
        """Print every event there is now; how many."""
        total = 0
        while True:
            batch = self._consume() if self.args.consumer else self._browse()
            total += batch
            if batch == 0:
                return total

    def _consume(self) -> int:
        with self.conn.transaction():
            try:
                events = _rows(self.conn, "SELECT * FROM nova_events_read(%s, %s, %s)",
                               (self.args.consumer, self.args.batch, self.inbox))
            except psycopg.Error as exc:
                if exc.sqlstate == BEHIND_SQLSTATE:
                    raise Behind(exc.diag.message_primary or str(exc)) from None
                raise
            _emit(events, self.args.json, self.json_default)
            for inbox, position in sorted(last_positions(events).items()):
                self.conn.execute("SELECT nova_events_ack(%s, %s, %s)",
                                  (self.args.consumer, inbox, position))
        return len(events)

    def _browse(self) -> int:
        total = 0
        for head in self.conn.execute(HEADS, {"inbox": self.inbox}).fetchall():
            at = max(self.printed.get(head["inbox_id"], 0), head["pruned_through"])
            if head["position"] <= at:
                continue
            events = _rows(self.conn, AFTER, (head["inbox_id"], at, self.args.batch))
            _emit(events, self.args.json, self.json_default)
            if events:
                self.printed[head["inbox_id"]] = events[-1].position
            total += len(events)
        return total


def _follow(settings: Settings, url: str, printer: Printer) -> None:
    """Print as events commit: woken by NOTIFY nova_events, polling meanwhile."""
    from nova import db

    poll = settings.poll_interval_ms / 1000
    listener: psycopg.Connection[Any] | None = None
    try:
        listener = db.connect(settings.database_direct_url or url, autocommit=True)
        listener.execute("LISTEN nova_events")
    except psycopg.Error:
        listener = None  # polling alone still shows everything
    try:
        while True:
            printer.drain()
            if listener is None:
                time.sleep(poll)
            else:
                for _ in listener.notifies(timeout=poll, stop_after=1):
                    pass
    finally:
        if listener is not None:
            listener.close()


def cmd_events(settings: Settings, args: argparse.Namespace, connect: Any, url: Any,
               json_default: Any) -> int:
    """`nova events` (see the module doc). `connect` opens the CLI's dict-row connection,
    `url` gives the database URL."""
    if args.action == "consumers":
        with connect(settings, args) as conn:
            rows = conn.execute("SELECT * FROM nova_events_consumers()").fetchall()
        if args.json:
            print(json.dumps([dict(r) for r in rows], default=json_default, indent=2))
        for r in rows if not args.json else []:
            print(f"{r['consumer']}: {r['inboxes']} inbox(es), {r['unread']:,} unread"
                  f"{', BEHIND in ' + str(r['behind']) if r['behind'] else ''}, last ack "
                  f"{r['acked_at']:%Y-%m-%d %H:%M:%S}")
        if not rows:
            print("no consumer has acknowledged an event")
        return EXIT_OK
    if args.action == "reset" and not args.name:
        print("nova events reset: give the consumer's name", file=sys.stderr)
        return EXIT_USAGE
    if args.action is None and args.name:
        print(f"nova events: unexpected {args.name!r} (reset CONSUMER, consumers)",
              file=sys.stderr)
        return EXIT_USAGE
    with connect(settings, args) as conn:
        try:
            inbox = _find_inbox(conn, args.inbox) if args.inbox else None
        except LookupError as exc:
            print(f"nova: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if args.action == "reset":
            rows = conn.execute("SELECT * FROM nova_events_reset(%s, %s, %s)",
                                (args.name, inbox, args.to_end)).fetchall()
            for r in rows:
                print(f"{args.name}: inbox {r['inbox_id']} {r['from_position']} -> "
                      f"{r['to_position']} ({r['to_position'] - r['from_position']:,} "
                      f"event(s) skipped)")
            if not rows:
                print(f"{args.name}: nothing to move")
            return EXIT_OK
        printer = Printer(conn, args, inbox, json_default)
        try:
            if args.follow:
                _follow(settings, url(settings, args), printer)
            else:
                printer.drain()
        except Behind as exc:
            print(f"nova: {exc}; rebuild what it keeps, then `nova events reset "
                  f"{args.consumer}`", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            return EXIT_OK
        except BrokenPipeError:  # `| head` closed it (--consumer: batches written are acked)
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
    return EXIT_OK


def _batch(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"expected 1 to 10000, got {text!r}")
    return n


def add_parser(sub: Any, func: Any) -> None:
    """Register `nova events` on the CLI's subparsers; `func` runs it."""
    p = sub.add_parser("events", help="the change feed: print events (as a consumer with "
                                      "--consumer), reset a consumer, list consumers")
    p.add_argument("action", nargs="?", choices=["reset", "consumers"],
                   help="reset CONSUMER: move it past pruned events (--to-end: past all); "
                        "consumers: every consumer and what it has not read")
    p.add_argument("name", nargs="?", metavar="CONSUMER", help="the consumer (reset)")
    p.add_argument("--inbox", help="one inbox: its id, grant id or email")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--follow", action="store_true", help="keep printing as events commit")
    p.add_argument("--consumer", help="read and acknowledge as this consumer")
    p.add_argument("--batch", type=_batch, default=BATCH, help="events per read (1 to 10000)")
    p.add_argument("--to-end", action="store_true",
                   help="reset: past every event so far (a consumer that starts now)")
    p.set_defaults(func=func)
