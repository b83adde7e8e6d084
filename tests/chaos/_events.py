"""The change feed replayed into a copy, as an app would keep one, and the copy compared with
Nova's tables: the chaos suite's check of the feed and tests/test_events.py's must-show test.

A `Replica` is a consumer that starts from the first event with an empty copy. Each `step`
runs in one REPEATABLE READ transaction: it reads every event past its cursors
(`nova_events_read`, acknowledged with `nova_events_ack` as it goes), reads the current rows
of the objects they name in the same snapshot (thin events: a message by its id), applies them
to the copy and checks each event against the copy as it was before:

- message.created / thread.created: the object was not live in the copy;
- *.deleted: it was live and the row is deleted;
- message.updated / thread.updated: every field the event names differs between the copy and
  the row, and every field that differs is named (no change without its event, none for a
  change not made);
- inbox.status_changed, backfill.*: the status moved from what the copy held.

An object with more than one event in a step is applied, not checked (a flag set and set back
between two reads leaves no difference to see); `stats["multi"]` counts them. `compare` (and
every step with `every_step`) then checks the whole copy against the tables of the step's
snapshot: the same live messages and threads with the same values, every inbox's status and
every backfill's phase. No event lost means the copy is equal; none for a change not made
means no check failed.

The copy is changed only once a step's transaction has committed, and a step whose commit is
in doubt (the connection lost) puts the server's cursors back where the copy is, so a crash of
the database in the middle of a run costs a retry, not a false verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections import Counter
from typing import Any

import asyncpg

CONSUMER = "replica"
BATCH = 5000
EXAMPLES = 15

# The columns an app sees, by the key an event's changes name (sql/140_events.sql).
MESSAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "folders": ("folders",), "unread": ("unread",), "starred": ("starred",),
    "thread_id": ("thread_id", "provider_thread_id"), "has_attachments": ("has_attachments",),
    "subject": ("subject",), "snippet": ("snippet",), "from": ("from_addresses",),
    "to": ("to_addresses",), "cc": ("cc_addresses",), "bcc": ("bcc_addresses",),
    "reply_to": ("reply_to",), "sent_at": ("sent_at",), "headers": ("headers",),
    "body": ("body_html", "body_text"), "body_cleaned": ("body_cleaned",)}
THREAD_FIELDS: dict[str, tuple[str, ...]] = {
    "folders": ("folders",), "unread": ("unread",), "starred": ("starred",),
    "has_attachments": ("has_attachments",), "message_count": ("message_count",),
    "first_message_at": ("first_message_at",), "last_message_at": ("last_message_at",),
    "subject": ("subject",), "snippet": ("snippet",), "participants": ("participants",)}
TABLES = {"message": ("flux_email_messages", MESSAGE_FIELDS),
          "thread": ("flux_email_threads", THREAD_FIELDS)}
RUNNING = {"queued", "discovering", "thread_sync"}


def _select(kind: str) -> str:
    table, fields = TABLES[kind]
    columns = sorted({c for cs in fields.values() for c in cs})
    return (f"SELECT id, inbox_id, deleted_at IS NOT NULL AS deleted, {', '.join(columns)} "
            f"FROM {table}")


def _digest(row: Any, fields: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Per field, a digest of its columns' values (bodies need not be kept)."""
    out = {}
    for name, columns in fields.items():
        text = json.dumps([row[c] for c in columns], sort_keys=True, default=str)
        out[name] = hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
    return out


def _phase(status: str | None) -> str:
    return "running" if status in RUNNING else (status or "pending")


class Replica:
    def __init__(self, consumer: str = CONSUMER, every_step: bool = False) -> None:
        self.consumer = consumer
        self.every_step = every_step
        # kind -> object id -> {"inbox", "deleted", "fields"}; inbox -> status; config -> phase
        self.objects: dict[str, dict[uuid.UUID, dict[str, Any]]] = {"message": {}, "thread": {}}
        self.inboxes: dict[uuid.UUID, str] = {}
        self.backfills: dict[uuid.UUID, str] = {}
        self.positions: dict[uuid.UUID, int] = {}  # applied, per inbox
        self.problems: list[str] = []
        self.stats: Counter[str] = Counter()
        self._in_doubt = False

    def _problem(self, text: str) -> None:
        self.stats["problems"] += 1
        if len(self.problems) < EXAMPLES:
            self.problems.append(text)

    async def step(self, conn: Any, compare: bool = False) -> int:
        """One batch (see the module doc); returns how many events it applied. `compare`
        (or `every_step`): the whole copy against the tables of the same snapshot too."""
        problems, counted = len(self.problems), self.stats["problems"]
        try:
            return await self._step(conn, compare or self.every_step)
        except BaseException:  # nothing of a step that did not commit is kept
            del self.problems[problems:]
            self.stats["problems"] = counted
            raise

    async def _step(self, conn: Any, compare: bool) -> int:
        async with conn.transaction(isolation="repeatable_read"):
            if self._in_doubt:  # the server's cursors back to what the copy holds
                await conn.execute("DELETE FROM nova_event_cursors WHERE consumer = $1",
                                   self.consumer)
                for inbox, position in sorted(self.positions.items()):
                    await conn.execute("SELECT nova_events_ack($1, $2, $3)", self.consumer,
                                       inbox, position)
            events: list[Any] = []
            while True:
                rows = await conn.fetch("SELECT * FROM nova_events_read($1, $2)",
                                        self.consumer, BATCH)
                if not rows:
                    break
                events += rows
                last: dict[uuid.UUID, int] = {}
                for r in rows:
                    last[r["inbox_id"]] = max(r["position"], last.get(r["inbox_id"], 0))
                for inbox, position in sorted(last.items()):
                    await conn.execute("SELECT nova_events_ack($1, $2, $3)", self.consumer,
                                       inbox, position)
            rows_now = await self._rows(conn, events)
            staged = self._apply(events, rows_now)
            if compare:
                await self._differences(conn, staged)
            self._in_doubt = True
        self._in_doubt = False
        self._commit(staged)
        return len(events)

    async def _rows(self, conn: Any, events: list[Any]) -> dict[str, dict[uuid.UUID, Any]]:
        out: dict[str, dict[uuid.UUID, Any]] = {}
        for kind in TABLES:
            ids = sorted({uuid.UUID(e["object_id"]) for e in events
                          if e["kind"].split(".")[0] == kind})
            rows = await conn.fetch(f"{_select(kind)} WHERE id = ANY($1::uuid[])", ids)
            out[kind] = {r["id"]: r for r in rows}
        ids = sorted({uuid.UUID(e["object_id"]) for e in events if e["kind"].startswith("inbox.")})
        out["inbox"] = {r["id"]: r for r in await conn.fetch(
            "SELECT id, status FROM flux_inboxes WHERE id = ANY($1::uuid[])", ids)}
        ids = sorted({uuid.UUID(e["object_id"]) for e in events
                      if e["kind"].startswith("backfill.")})
        out["backfill"] = {r["id"]: r for r in await conn.fetch(
            "SELECT id, backfill_status FROM flux_inbox_configurations"
            " WHERE id = ANY($1::uuid[])", ids)}
        return out

    def _apply(self, events: list[Any], rows: dict[str, dict[uuid.UUID, Any]]) -> dict[str, Any]:
        """Check each event against the copy before this step; what the copy becomes."""
        per_object = Counter(e["object_id"] for e in events)
        staged: dict[str, Any] = {"message": {}, "thread": {}, "inbox": {}, "backfill": {},
                                  "positions": {}, "stats": Counter()}
        for e in events:
            kind, what = e["kind"].split(".", 1)
            oid = uuid.UUID(e["object_id"])
            staged["stats"]["events"] += 1
            staged["positions"][e["inbox_id"]] = e["position"]
            single = per_object[e["object_id"]] == 1
            staged["stats"]["checked" if single else "multi"] += 1
            label = f"{e['kind']} #{e['position']} of inbox {e['inbox_id']} ({oid})"
            if kind in TABLES:
                row = rows[kind].get(oid)
                if row is None:
                    self._problem(f"{label}: no such row")
                    continue
                entry = {"inbox": row["inbox_id"], "deleted": row["deleted"],
                         "fields": _digest(row, TABLES[kind][1])}
                if single:
                    self._check(kind, what, e, label, self.objects[kind].get(oid), entry)
                staged[kind][oid] = entry
            elif kind == "inbox":
                row = rows["inbox"].get(oid)
                before = self.inboxes.get(oid, "active")
                if single and (e["changes"].get("old_status") != before
                               or e["changes"].get("status") == before):
                    self._problem(f"{label}: {e['changes']} but the copy held {before}")
                if row is not None:
                    staged["inbox"][oid] = row["status"]
            elif kind == "backfill":
                row = rows["backfill"].get(oid)
                before = _phase(self.backfills.get(oid))
                after = {"started": "running"}.get(what, what)
                if single and before == after:
                    self._problem(f"{label}: the backfill was {before} already")
                if row is not None:
                    staged["backfill"][oid] = row["backfill_status"]
        return staged

    def _check(self, kind: str, what: str, e: Any, label: str, before: dict[str, Any] | None,
               after: dict[str, Any]) -> None:
        live = before is not None and not before["deleted"]
        if what == "created":
            if live:
                self._problem(f"{label}: it was live already")
        elif what == "deleted":
            if not live or not after["deleted"]:
                self._problem(f"{label}: it was not live before, or is not deleted now")
        elif what == "updated":
            if not live or before is None:
                self._problem(f"{label}: it was not live in the copy")
                return
            named = set(e["changes"])
            differ = {f for f, d in after["fields"].items() if before["fields"][f] != d}
            if not differ:
                self._problem(f"{label}: nothing changed")
            if named - differ:
                self._problem(f"{label}: names {sorted(named - differ)}, which did not change")
            if differ - named:
                self._problem(f"{label}: {sorted(differ - named)} changed but is not named")

    def _commit(self, staged: dict[str, Any]) -> None:
        for kind in TABLES:
            self.objects[kind].update(staged[kind])
        self.inboxes.update(staged["inbox"])
        self.backfills.update(staged["backfill"])
        self.positions.update(staged["positions"])
        self.stats.update(staged["stats"])
        self.stats["steps"] += 1

    async def compare(self, conn: Any) -> int:
        """Step once more and compare the whole copy with the tables of that step's snapshot;
        the differences found (each also a problem)."""
        before = self.stats["differences"]
        await self.step(conn, compare=True)
        return self.stats["differences"] - before

    async def _differences(self, conn: Any, staged: dict[str, Any]) -> int:
        """The copy as this step leaves it against the tables of the step's snapshot."""
        found = 0
        for kind, (table, fields) in TABLES.items():
            live = {r["id"]: r for r in await conn.fetch(
                f"{_select(kind)} WHERE deleted_at IS NULL")}
            copy = {**self.objects[kind], **staged[kind]}
            mine = {k: v for k, v in copy.items() if not v["deleted"]}
            for oid in live.keys() - mine.keys():
                found += 1
                self._problem(f"{table} {oid} is live, the copy does not have it")
            for oid in mine.keys() - live.keys():
                found += 1
                self._problem(f"the copy has {kind} {oid} live, {table} does not")
            for oid in live.keys() & mine.keys():
                now = _digest(live[oid], fields)
                differ = sorted(f for f, d in now.items() if mine[oid]["fields"][f] != d)
                if differ:
                    found += 1
                    self._problem(f"{kind} {oid} differs from the copy in {differ}")
            staged["stats"][f"{kind}s_compared"] = len(live) - self.stats[f"{kind}s_compared"]
        inboxes = {**self.inboxes, **staged["inbox"]}
        for r in await conn.fetch("SELECT id, status FROM flux_inboxes"):
            if inboxes.get(r["id"], "active") != r["status"]:
                found += 1
                self._problem(f"inbox {r['id']} is {r['status']}, the copy says "
                              f"{inboxes.get(r['id'], 'active')}")
        backfills = {**self.backfills, **staged["backfill"]}
        for r in await conn.fetch("SELECT id, backfill_status FROM flux_inbox_configurations"):
            if _phase(backfills.get(r["id"])) != _phase(r["backfill_status"]):
                found += 1
                self._problem(f"backfill {r['id']} is {r['backfill_status']}, the copy says "
                              f"{backfills.get(r['id'], 'pending')}")
        staged["stats"]["differences"] += found
        staged["stats"]["compared"] += 1
        return found

    def report(self) -> dict[str, Any]:
        return {"consumer": self.consumer, "problems": self.stats["problems"],
                "examples": self.problems, **{k: v for k, v in self.stats.items()
                                              if k != "problems"}}


class Follower:
    """The chaos run's replica: a step every `interval` seconds on a pool of its own while the
    run goes on (a database crash costs failed steps, retried), and at the end the comparison
    with the tables, in the report and the verdict. A Nova without the change feed (an older
    revision, `--nova-rev`) is reported as such, not as a problem."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url, self.interval = url, interval
        self.replica = Replica(CONSUMER)
        self.failed_steps = 0
        self.last_error = ""
        self.unavailable = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chaos:change-feed")

    async def _run(self) -> None:
        from nova import db

        pool = None
        try:
            while not self._stop.is_set():
                try:
                    if pool is None:
                        pool = await db.create_pool(self.url, min_size=1, max_size=1)
                    async with pool.acquire() as conn:
                        await self.replica.step(conn)
                except asyncpg.UndefinedFunctionError:
                    self.unavailable = True
                    return
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        TimeoutError) as exc:
                    self.failed_steps += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
        finally:
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 10)

    async def finish(self, report: dict[str, Any], problems: list[str]) -> None:
        """Stop following, compare (every writer has stopped), and put the outcome in the
        report (`change_feed`) and, when the copy is not equal or a check failed, the
        verdict."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if not self.unavailable:
            from nova import db

            pool = await db.create_pool(self.url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    await self.replica.compare(conn)
            except asyncpg.UndefinedFunctionError:
                self.unavailable = True
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                problems.append(f"change feed: the final comparison failed ({exc})")
            finally:
                await pool.close()
        out = {"available": not self.unavailable, **self.replica.report(),
               "failed_steps": self.failed_steps, "last_error": self.last_error}
        report["change_feed"] = out
        if out["available"] and out["problems"]:
            problems.append(f"change feed: {out['problems']} problem(s) replaying it into a "
                            f"copy, e.g. {'; '.join(out['examples'][:3])}")
            report["verdict"]["ok"] = not problems
