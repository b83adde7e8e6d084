"""One lock order (DESIGN.md): the transactions that touch threads, `queued_threads` and the
progress counters never deadlock with each other.

The interleaving tests run the real transaction bodies -- a discovery page
(`BackfillProcessor._save_page`), a thread sync's commit (its one statement, as
`JobContext.commit` runs `store.WRITE_SYNCED_THREAD` with the job's queue delete) and a page
of Gmail history (`ChangeSync._sync`) -- on two real sessions, each statement gated: one body
runs its first k statements, the other then runs until it ends or waits for a lock, then the
first goes on; every k, both ways round. With the statements in two different lock orders
some k closes a cycle, and PostgreSQL (deadlock_timeout lowered to 100 ms) aborts one of them.
The stress test runs the real workers on one backfill whose threads change while discovery
runs, and reads `pg_stat_database.deadlocks` before and after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from synchelp import add_inbox, make_sandbox, running, settings, start_backfill, wait_for

from nova import db, store
from nova.backfill import BackfillProcessor, Cursor, PageWork
from nova.changes import ChangeSync
from nova.config import load_settings
from nova.providers.gmail import HistoryPage
from nova.providers.models import Message, Participant, Thread
from nova.queue_sql import QueueSQL
from nova.threads import ThreadSyncProcessor

# A thread sync's commit as the worker runs it (JobContext.commit): its queue message deleted
# and the thread written, in one statement.
COMMIT = QueueSQL(ThreadSyncProcessor.queue).finishing(store.WRITE_SYNCED_THREAD, 7, keep=False)
# The interleavings take that statement's locks in its order, as statements a schedule can
# pause between: the job's message, then the write; then a pause with every lock still held,
# where the statement would be committing.
FINISH = "SELECT pgmq.delete('thread_sync_jobs', $1::bigint)"
HELD = "SELECT 'every lock held until the commit'"

T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
STEPS = 14  # more than either body has statements: the last splits run one body whole first

Body = Callable[["Stepper"], Awaitable[Any]]


class Stepper:
    """An asyncpg connection whose statements wait for the test's permission. `limit` is how
    many more may run (None: any number); `paused` says one is waiting at the gate."""

    def __init__(self, conn: asyncpg.Connection, limit: int | None) -> None:
        self.conn = conn
        self.limit = limit
        self.paused = False
        self.statements: list[str] = []
        self._go = asyncio.Event()

    async def _gate(self, query: str) -> None:
        while self.limit is not None and self.limit <= 0:
            self.paused = True
            self._go.clear()
            await self._go.wait()
        self.paused = False
        if self.limit is not None:
            self.limit -= 1
        self.statements.append(" ".join(query.split())[:80])

    def release(self) -> None:
        self.limit = None
        self._go.set()

    async def execute(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._gate(query)
        return await self.conn.execute(query, *args, **kw)

    async def fetch(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._gate(query)
        return await self.conn.fetch(query, *args, **kw)

    async def fetchrow(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._gate(query)
        return await self.conn.fetchrow(query, *args, **kw)

    async def fetchval(self, query: str, *args: Any, **kw: Any) -> Any:
        await self._gate(query)
        return await self.conn.fetchval(query, *args, **kw)

    def transaction(self) -> Any:
        return self.conn.transaction()

    # A pool of one connection, for code that takes a pool (ChangeSync).
    def acquire(self) -> Any:
        stepper = self

        class _Acquired:
            async def __aenter__(self) -> Stepper:
                return stepper

            async def __aexit__(self, *exc: object) -> None:
                return None

        return _Acquired()


async def _blocked_or_done(observer: asyncpg.Connection, pid: int, task: asyncio.Task[Any],
                           timeout: float = 10) -> bool:
    """Until `task` ends (False) or its backend waits on a lock (True)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not task.done():
        if await observer.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                                   " WHERE pid = $1", pid):
            return True
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the second body neither finished nor waited on a lock")
        await asyncio.sleep(0.005)
    return False


async def _until_paused(stepper: Stepper, task: asyncio.Task[Any]) -> None:
    while not (task.done() or stepper.paused):
        await asyncio.sleep(0.002)


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[Callable[[], Awaitable[asyncpg.Connection]]]:
    """Connections set up as the processors' pools set theirs up, deadlock_timeout lowered."""
    pools: list[Any] = []

    async def open_one() -> asyncpg.Connection:
        pool = await db.create_pool(db_url, min_size=1, max_size=1)
        pools.append(pool)
        conn = await pool.acquire()
        await conn.execute("SET deadlock_timeout = '100ms'; SET lock_timeout = '15s'")
        return conn  # type: ignore[no-any-return]

    yield open_one
    for pool in pools:
        pool.terminate()


async def interleave(observer: asyncpg.Connection, conns: tuple[asyncpg.Connection, ...],
                     first: Body, second: Body, k: int) -> tuple[list[BaseException | None],
                                                                  bool]:
    """`first` runs k statements; `second` then runs until it ends or waits; `first` goes on.
    Returns each body's exception (None when it committed), and whether `second` waited."""
    a, b = Stepper(conns[0], k), Stepper(conns[1], None)

    async def run(body: Body, stepper: Stepper) -> None:
        await body(stepper)

    ta = asyncio.create_task(run(first, a))
    await _until_paused(a, ta)
    tb = asyncio.create_task(run(second, b))
    waited = await _blocked_or_done(observer, conns[1].get_server_pid(), tb)
    a.release()
    results = await asyncio.wait_for(asyncio.gather(ta, tb, return_exceptions=True), 30)
    return [r if isinstance(r, BaseException) else None for r in results], waited


# --- the rows the bodies work on -----------------------------------------------------------------

def message(mid: str, thread_id: str, minutes: int = 0) -> Message:
    return Message(
        id=mid, grant_id="g", thread_id=thread_id, subject="Lock order",
        from_=(Participant("ann@example.com", "Ann"),), to=(Participant("bob@example.com"),),
        cc=(), bcc=(), reply_to=(), date=T0 + timedelta(minutes=minutes), snippet="hi",
        body="<p>hi</p>", folders=("INBOX",), unread=True, starred=False, attachments=(),
        raw={"id": mid})


def thread(tid: str, message_ids: tuple[str, ...]) -> Thread:
    return Thread(
        id=tid, grant_id="g", subject="Lock order", snippet="hi",
        participants=(Participant("ann@example.com", "Ann"),), message_ids=message_ids,
        draft_ids=(), folders=("INBOX",), has_attachments=False, unread=True, starred=False,
        earliest_message_date=T0, latest_message_received_date=T0 + timedelta(hours=1),
        latest_message_sent_date=None)


async def _backfill(pool: asyncpg.Connection, provider: str = "nylas") -> tuple[uuid.UUID,
                                                                                 uuid.UUID]:
    inbox = await pool.fetchval(
        "INSERT INTO flux_inboxes (provider, grant_id, email, sync_cursor)"
        " VALUES ($1, $2, 'lock@example.com', '100') RETURNING id",
        provider, f"g-{uuid.uuid4().hex[:8]}")
    config = await pool.fetchval("SELECT queue_inbox_backfill($1)", inbox)
    await pool.execute("DELETE FROM pgmq.q_inbox_backfill_jobs")
    return inbox, config


async def _syncing(conn: asyncpg.Connection, config: uuid.UUID,
                   thread_id: str) -> tuple[int, int]:
    """The queued thread's row and its job, as a thread sync holds them mid-sync."""
    row = await conn.fetchrow(
        "UPDATE queued_threads SET status = 'processing', attempts = 1, started_at = now()"
        " WHERE config_id = $1 AND provider_thread_id = $2 RETURNING id, queue_msg_id",
        config, thread_id)
    return row["id"], row["queue_msg_id"]


async def sync_commit(conn: Any, sync_row: dict[str, Any], msg_id: int,
                      prepared: list[store.PreparedMessage], version: datetime) -> bool:
    """A thread sync's commit of its messages (COMMIT, the job never read: read_ct 0); whether
    it wrote them (False: superseded, only its message was deleted)."""
    row = await conn.fetchrow(COMMIT, *store.synced_thread_args(
        sync_row["inbox_id"], sync_row["provider_thread_id"], prepared, version,
        sync_row["id"], msg_id), msg_id, 0)
    assert row["held"] == msg_id
    return bool(row["value"])


async def _counters_exact(conn: asyncpg.Connection, config: uuid.UUID) -> None:
    progress = await conn.fetchrow("SELECT * FROM get_sync_progress($1)", config)
    real = await conn.fetchrow(
        "SELECT count(*) AS queued, count(*) FILTER (WHERE status = 'queued') AS pending,"
        " count(*) FILTER (WHERE status = 'processing') AS processing,"
        " count(*) FILTER (WHERE status = 'completed') AS completed,"
        " count(*) FILTER (WHERE status = 'failed') AS failed,"
        " coalesce(sum(message_count) FILTER (WHERE status = 'completed'), 0) AS messages"
        " FROM queued_threads WHERE config_id = $1", config)
    assert (progress["threads_queued"], progress["threads_pending"],
            progress["threads_processing"], progress["threads_completed"],
            progress["threads_failed"], progress["messages_synced"]) == tuple(real.values())


# --- discovery page against thread sync ----------------------------------------------------------

async def _discovery_case(setup: asyncpg.Connection) -> tuple[Body, Body, Callable[[], Any]]:
    """A change round of discovery lists thread T again (and two new ones) while T's sync is
    writing it: the page upserts the thread rows and queues T again; the sync writes T's
    messages and completes its queued thread."""
    inbox, config = await _backfill(setup)
    await setup.fetch("SELECT * FROM queue_discovered_threads($1, $2)", config,
                      ["T", "A", "B"])
    since = T0 + timedelta(days=1)
    await setup.execute(
        "UPDATE flux_inbox_configurations SET backfill_status = 'discovering',"
        " checkpoint_pages_done = 1, checkpoint_threads_found = 3, changes_since = $2,"
        " changes_round_started_at = $2 WHERE id = $1", config, since)
    row_id, msg_id = await _syncing(setup, config, "T")
    version = store.sync_version()

    processor = BackfillProcessor(load_settings())
    cur = Cursor(token="p2", pages=1, found=3, since=since, rounds=0, round_started=since)
    nxt = replace(cur, token="p3", pages=2)
    listed = [thread(t, (f"{t}-m1", f"{t}-m2")) for t in ("T", "N1", "N2")]
    work = PageWork(threads=listed, done=[], queue=["T", "N1", "N2"], messages=[],
                    version=version)

    messages = [message("T-m1", "T"), message("T-m2", "T", 5)]
    prepared = await store.prepare_messages(messages)

    async def discovery(conn: Stepper) -> None:
        async with conn.transaction():
            await processor._save_page(conn, {"id": config, "inbox_id": inbox},  # type: ignore[arg-type]
                                       cur, nxt, work)

    async def thread_sync(conn: Stepper) -> None:
        async with conn.transaction():  # COMMIT's locks, in its order
            await conn.execute(FINISH, msg_id)
            await store.write_synced_thread(conn, inbox, "T", prepared, version, row_id, msg_id)
            await conn.execute(HELD)

    async def check() -> None:
        t = await setup.fetchrow("SELECT status, queue_msg_id FROM queued_threads"
                                 " WHERE config_id = $1 AND provider_thread_id = 'T'", config)
        # The round queued T again: its job is newer than the sync's, whichever committed first.
        assert t["status"] == "queued" and t["queue_msg_id"] != msg_id
        assert await setup.fetchval("SELECT count(*) FROM queued_threads WHERE config_id = $1",
                                    config) == 5
        await _counters_exact(setup, config)

    return discovery, thread_sync, check


async def never_deadlock(sessions: Callable[[], Awaitable[asyncpg.Connection]],
                         case: Callable[[asyncpg.Connection], Awaitable[Any]],
                         other_first: bool) -> None:
    """Run a case's two bodies split at every step, in the given order, on two sessions: no
    split deadlocks, each one ends as the case checks, and some split makes one wait."""
    setup, a, b = await sessions(), await sessions(), await sessions()
    deadlocks, waits = [], 0
    for k in range(STEPS):
        other, thread_sync, check = await case(setup)
        first, second = (other, thread_sync) if other_first else (thread_sync, other)
        errors, waited = await interleave(setup, (a, b), first, second, k)
        waits += waited
        deadlocks += [(k, e) for e in errors
                      if isinstance(e, asyncpg.exceptions.DeadlockDetectedError)]
        if not any(errors):
            await check()
        else:
            assert all(isinstance(e, asyncpg.exceptions.DeadlockDetectedError)
                       for e in errors if e is not None), errors
    assert deadlocks == []
    assert waits > 0  # the schedules did make one body wait for the other's locks


@pytest.mark.parametrize("discovery_first", [False, True], ids=["sync-first", "page-first"])
async def test_a_discovery_page_and_a_thread_sync_never_deadlock(
        sessions: Callable[[], Awaitable[asyncpg.Connection]], discovery_first: bool) -> None:
    await never_deadlock(sessions, _discovery_case, discovery_first)


# --- a page of Gmail history against thread sync -------------------------------------------------

class History:
    """A Gmail stand-in for ChangeSync: one page adding a message to thread T and one to U, a
    thread the running backfill has not listed (so the page queues it)."""

    def __init__(self) -> None:
        self.messages = {"h-t": message("h-t", "T", 30), "h-u": message("h-u", "U", 31)}

    async def list_changes(self, grant: str, cursor: str, *,
                           page_token: str | None = None) -> HistoryPage:
        records = [{"id": "101", "messagesAdded": [
            {"message": {"id": mid, "threadId": m.thread_id}}
            for mid, m in self.messages.items()]}]
        return HistoryPage(records=records, next_page_token=None, history_id="101")

    async def get_message(self, grant: str, mid: str) -> Message:
        return self.messages[mid]


async def _call(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


async def _changes_case(setup: asyncpg.Connection) -> tuple[Body, Body, Callable[[], Any]]:
    inbox, config = await _backfill(setup, "gmail")
    await setup.fetch("SELECT * FROM queue_discovered_threads($1, $2)", config, ["T", "A"])
    await setup.fetchval("SELECT transition_to_thread_sync($1)", config)
    row_id, msg_id = await _syncing(setup, config, "T")
    version = store.sync_version()
    messages = [message("T-m1", "T"), message("T-m2", "T", 5)]
    prepared = await store.prepare_messages(messages)

    async def changes(conn: Stepper) -> None:
        await ChangeSync(conn, History(), _call)._sync(inbox)  # type: ignore[arg-type]

    async def thread_sync(conn: Stepper) -> None:
        async with conn.transaction():  # COMMIT's locks, in its order
            await conn.execute(FINISH, msg_id)
            await store.write_synced_thread(conn, inbox, "T", prepared, version, row_id, msg_id)
            await conn.execute(HELD)

    async def check() -> None:
        rows = {r["provider_thread_id"]: r["status"] for r in await setup.fetch(
            "SELECT provider_thread_id, status FROM queued_threads WHERE config_id = $1",
            config)}
        assert rows == {"T": "completed", "A": "queued", "U": "queued"}
        assert await setup.fetchval("SELECT sync_cursor FROM flux_inboxes WHERE id = $1",
                                    inbox) == "101"
        await _counters_exact(setup, config)

    return changes, thread_sync, check


@pytest.mark.parametrize("changes_first", [False, True], ids=["sync-first", "history-first"])
async def test_a_history_page_and_a_thread_sync_never_deadlock(
        sessions: Callable[[], Awaitable[asyncpg.Connection]], changes_first: bool) -> None:
    await never_deadlock(sessions, _changes_case, changes_first)


# --- the real workers on one backfill ------------------------------------------------------------

async def _deadlocks(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))


async def test_discovery_and_many_thread_workers_on_one_backfill_never_deadlock(
        pool: asyncpg.Pool, db_url: str) -> None:
    """Discovery pages through 1,600 threads while replies keep moving threads it listed, so
    its rounds queue again threads the workers are syncing or have synced; 6 thread workers
    of 10 jobs each and the monitor (folds, recounts) run meanwhile. No deadlock is counted
    for the database, the counters are exact, the mailbox is stored whole."""
    await pool.execute("DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET deadlock_timeout"
                       " = ''100ms''', current_database()); END $$")
    before = await _deadlocks(pool)
    with make_sandbox(1600, thread_bodies=False, latency_ms=15) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)

        async def discovery_state() -> asyncpg.Record:
            return await pool.fetchrow(
                "SELECT backfill_status, changes_rounds, checkpoint_pages_done"
                " FROM flux_inbox_configurations WHERE id = $1", config)

        replies = 0
        async with running(db_url, settings(sb, batch_size=10), threads=6):
            await wait_for(lambda: pool.fetchval(
                "SELECT count(*) >= 3 FROM queued_threads WHERE status = 'completed'"),
                60, interval=0.01, what="the first synced threads")
            # Reply to threads already synced or being synced until discovery is two rounds
            # in: each round lists them again and queues them under the workers.
            while True:
                state = await discovery_state()
                if state["backfill_status"] not in ("queued", "discovering") or (
                        state["changes_rounds"] >= 2):
                    break
                synced = await pool.fetch(
                    "SELECT provider_thread_id FROM queued_threads"
                    " WHERE status IN ('processing', 'completed') ORDER BY random() LIMIT 5")
                for r in synced:
                    sb.add_message(grant, thread_id=r["provider_thread_id"], send=False)
                    replies += 1
                await asyncio.sleep(0.01)
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 180, what="completion")
        state = await discovery_state()
        # Message ids only grow: the last job's id, less the first's, less the threads, is
        # how many times a thread was queued again.
        jobs = await pool.fetchrow(
            "SELECT max(queue_msg_id) - min(queue_msg_id) + 1 - count(*) AS again, count(*) AS n"
            " FROM queued_threads WHERE config_id = $1", config)
        print(f"stress: threads={jobs['n']} replies={replies} rounds={state['changes_rounds']}"
              f" pages={state['checkpoint_pages_done']} queued_again={jobs['again']}")
    assert replies > 0 and state["changes_rounds"] >= 1 and jobs["again"] > 0
    await asyncio.sleep(1.2)  # backends flush their statistics when they exit, or each second
    assert await _deadlocks(pool) == before
    await _counters_exact(pool, config)  # type: ignore[arg-type]
    assert await pool.fetchval("SELECT fold_sync_stats_deltas() >= 0")
    await _counters_exact(pool, config)  # type: ignore[arg-type]
    from synchelp import assert_db_equals_mailbox
    await assert_db_equals_mailbox(pool, sb, grant, inbox)
    assert await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status <> 'completed'"
                               " AND config_id = $1", config) == 0


async def test_a_thread_sync_superseded_while_it_wrote_leaves_nothing_written(
        pool: asyncpg.Pool) -> None:
    """Thread sync completes its queued thread last (the lock order): when a newer job took the
    thread over meanwhile, the messages it had written are rolled back (the call's exception
    block), and its statement still commits the delete of the job's message."""
    async with pool.acquire() as conn:
        inbox, config = await _backfill(conn)
        await conn.fetch("SELECT * FROM queue_discovered_threads($1, $2)", config, ["T"])
        row_id, msg_id = await _syncing(conn, config, "T")
        newer = await conn.fetchval("SELECT queue_thread_sync($1, 'T')", config)
        messages = [message("T-m1", "T"), message("T-m2", "T", 5)]
        prepared = await store.prepare_messages(messages)
        sync_row = {"id": row_id, "inbox_id": inbox, "provider_thread_id": "T"}
        assert not await sync_commit(conn, sync_row, msg_id, prepared, store.sync_version())
        assert await conn.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs"
                                   " WHERE msg_id = $1", msg_id) == 0  # its delete committed
        assert await conn.fetchval("SELECT count(*) FROM flux_email_messages") == 0
        assert await conn.fetchval("SELECT count(*) FROM flux_email_threads") == 0
        t = await conn.fetchrow("SELECT status, queue_msg_id FROM queued_threads WHERE id = $1",
                                row_id)
        assert (t["status"], t["queue_msg_id"]) == ("queued", newer)
        # The newer job writes and completes.
        await conn.execute("UPDATE queued_threads SET status = 'processing' WHERE id = $1",
                           row_id)
        assert await sync_commit(conn, sync_row, newer, prepared, store.sync_version())
        assert await conn.fetchval("SELECT count(*) FROM flux_email_messages") == 2
        await _counters_exact(conn, config)


# --- two writers moving messages across each other's threads -------------------------------------

async def _waiting_on_a_lock(observer: asyncpg.Connection, *conns: asyncpg.Connection) -> None:
    pids = [c.get_server_pid() for c in conns]
    deadline = asyncio.get_running_loop().time() + 10
    while await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
            " AND wait_event_type = 'Lock'", pids) < len(pids):
        assert asyncio.get_running_loop().time() < deadline, "the writers never both waited"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("writer", ["thread_sync", "webhook"])
async def test_writers_moving_messages_across_two_threads_never_deadlock(
        sessions: Callable[[], Awaitable[asyncpg.Connection]], writer: str) -> None:
    """A thread's sync (or a webhook) moves message b1 from thread B into A while another moves
    a1 from A into B: each takes both threads, in id order, before it writes a message. (Before,
    each locked its own thread, wrote its message and only then the thread the message left:
    with the two message rows held back until both had their own thread, that was a cycle.)"""
    setup, holder, a, b = (await sessions(), await sessions(), await sessions(),
                           await sessions())
    inbox, config = await _backfill(setup)
    await setup.fetch("SELECT * FROM queue_discovered_threads($1, $2)", config, ["A", "B"])
    version = store.sync_version()
    async with setup.transaction():
        await store.upsert_messages(setup, inbox, await store.prepare_messages(
            [message("a1", "A"), message("b1", "B", 5)]), version)
    moves = {"A": [message("b1", "A", 5)], "B": [message("a1", "B")]}
    jobs = {tid: await _syncing(setup, config, tid) for tid in moves}
    later = store.sync_version()

    async def write(conn: asyncpg.Connection, tid: str) -> None:
        prepared = await store.prepare_messages(moves[tid])
        if writer == "webhook":
            async with conn.transaction():
                await store.upsert_messages(conn, inbox, prepared, later)
            return
        row_id, msg_id = jobs[tid]
        assert await sync_commit(conn, {"id": row_id, "inbox_id": inbox,
                                        "provider_thread_id": tid}, msg_id, prepared, later)

    # Both message rows held back: each writer goes as far as it can before its message.
    tx = holder.transaction()
    await tx.start()
    await holder.execute("SELECT 1 FROM flux_email_messages WHERE provider_message_id"
                         " IN ('a1', 'b1') FOR UPDATE")
    tasks = [asyncio.create_task(write(a, "A")), asyncio.create_task(write(b, "B"))]
    await _waiting_on_a_lock(setup, a, b)
    await tx.commit()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    assert [r for r in results if isinstance(r, BaseException)] == []
    rows = {r["provider_message_id"]: r["provider_thread_id"] for r in await setup.fetch(
        "SELECT m.provider_message_id, t.provider_thread_id FROM flux_email_messages m"
        " JOIN flux_email_threads t ON t.id = m.thread_id")}
    assert rows == {"a1": "B", "b1": "A"}
    counts = {r["provider_thread_id"]: r["message_count"] for r in await setup.fetch(
        "SELECT provider_thread_id, message_count FROM flux_email_threads")}
    assert counts == {"A": 1, "B": 1}
