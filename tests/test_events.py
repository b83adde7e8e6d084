"""The change feed (issue 20, items 1-2): every kind fires on a real change and not on a
replay; positions are gap-free and in commit order under concurrent writers, without
deadlocks; retention, the consumer behind it and its reset; and a consumer that applies every
event to an empty copy ends equal to the tables after a backfill and webhooks under SIGKILLs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from synchelp import (
    add_inbox,
    env,
    make_sandbox,
    running,
    settings,
    spawn,
    start_backfill,
    stop,
    wait_for,
)

from nova import db
from nova.cli import main as nova_main
from nova.completion import CompletionMonitor
from nova.config import load_settings
from nova.events import Behind, Consumer, wait
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor
from nova.webhooks import WebhookProcessor
from tests.chaos._events import Replica

RECORD = "SELECT nova_record_event(%s, %s, %s, NULL, NULL, '{}')"


async def events_after(pool: asyncpg.Pool, after_id: int = 0) -> list[Any]:
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT id, inbox_id, position, kind, object_id, provider_id, changes FROM nova_events"
        " WHERE id > $1 ORDER BY inbox_id, position", after_id)


async def last_id(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(max(id), 0) FROM nova_events"))


async def deliver(pool: asyncpg.Pool, sb: SandboxNylas, notes: list[Any],
                  replay: bool = False) -> None:
    """Store notifications as the receiver does (`replay`: under new webhook ids, as a
    provider redelivering the same change would), then run the processor until idle."""
    for note in notes:
        payload = {**note.payload, "id": str(uuid.uuid4())} if replay else note.payload
        await pool.execute("SELECT * FROM queue_nylas_webhook_notification($1, $2, $3)",
                           payload["id"], payload["type"], payload)
    s = load_settings(nylas_api_key=sb.api_key, nylas_api_uri=sb.base_url, batch_size=4,
                      poll_interval_ms=500)
    await Worker(WebhookProcessor(s), s, pool=pool).run(burst=True)


async def completed(pool: asyncpg.Pool, config: uuid.UUID) -> bool:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT backfill_status = 'completed' FROM flux_inbox_configurations WHERE id = $1",
        config)


def assert_gap_free(rows: list[Any]) -> None:
    by_inbox: dict[Any, list[int]] = defaultdict(list)
    for r in rows:
        by_inbox[r["inbox_id"]].append(r["position"])
    for positions in by_inbox.values():
        assert sorted(positions) == list(range(1, len(positions) + 1))


# ------------------------------------------------------------------ every kind, once
async def test_mail_events_fire_on_real_changes_and_not_on_a_replay_or_a_repeated_sync(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(8) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        async with running(db_url, s, threads=2):
            await wait_for(lambda: completed(pool, config), 60, what="completion")
        rows = await events_after(pool)
        assert_gap_free(rows)
        kinds = Counter(r["kind"] for r in rows)
        threads = await pool.fetchval("SELECT count(*) FROM flux_email_threads")
        messages = await pool.fetchval("SELECT count(*) FROM flux_email_messages")
        assert kinds["thread.created"] == threads == 8
        assert kinds["message.created"] == messages > 8
        assert kinds["backfill.started"] == kinds["backfill.completed"] == 1
        assert not {"message.updated", "message.deleted", "thread.deleted"} & set(kinds)

        # Every thread synced again: the same mail, rewritten, changes nothing.
        mark = await last_id(pool)
        for tid in sb.thread_ids(grant):
            await pool.execute("SELECT queue_thread_sync($1, $2)", config, tid)
        await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
        assert await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs") == 0
        assert await events_after(pool, mark) == []
        # A new backfill lists every page again and syncs every thread again: the backfill's
        # own events, nothing about the mail.
        again = await start_backfill(pool, inbox)
        async with running(db_url, s, threads=2):
            await wait_for(lambda: completed(pool, again), 60, what="the second backfill")
        assert [r["kind"] for r in await events_after(pool, mark)] == [
            "backfill.started", "backfill.completed"]
        mark = await last_id(pool)

        # Webhooks: a reply, a flag and folder change, a delete.
        first, second = sb.thread_ids(grant)[:2]
        mid = sb.thread_json(grant, first)["message_ids"][0]  # type: ignore[index]
        gone = sb.thread_json(grant, second)["message_ids"][-1]  # type: ignore[index]
        was_unread = sb.message_json(grant, mid)["unread"]  # type: ignore[index]
        reply = sb.add_message(grant, thread_id=first, send=False)
        update = sb.update_message(grant, mid, unread=not was_unread, folders=["Archive"],
                                   send=False)
        delete = sb.delete_message(grant, gone, send=False)
        notes = [*reply.notifications, *update.notifications, *delete.notifications]
        await deliver(pool, sb, notes)
        rows = await events_after(pool, mark)
        by = {(r["kind"], r["provider_id"]): r for r in rows}
        assert reply.message is not None
        assert ("message.created", reply.message["id"]) in by
        changed = by[("message.updated", mid)]["changes"]
        assert changed["unread"] is (not was_unread) and changed["folders"] == ["Archive"]
        assert ("message.deleted", gone) in by
        assert by[("thread.updated", first)]["changes"]["message_count"] == len(
            reply.thread["message_ids"])  # type: ignore[index]
        assert "message_count" in by[("thread.updated", second)]["changes"]
        assert {r["kind"] for r in rows if not r["kind"].startswith("folder.")} == {
            "message.created", "message.updated", "message.deleted", "thread.updated"}

        # The same notifications replayed under new ids, and the threads synced again.
        mark = await last_id(pool)
        await deliver(pool, sb, notes, replay=True)
        assert await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                                   " WHERE status = 'processed'") == 2 * len(notes)
        for tid in (first, second):
            await pool.execute("SELECT queue_thread_sync($1, $2)", config, tid)
        await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
        assert await events_after(pool, mark) == []
        assert_gap_free(await events_after(pool))


async def test_inbox_status_and_backfill_events_fire_on_transitions_only(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(4) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        await pool.execute("SELECT * FROM nova_cancel_backfill($1)", config)
        await pool.execute("SELECT resume_inbox_backfill($1)", config)
        async with running(db_url, settings(sb), threads=1):
            await wait_for(lambda: completed(pool, config), 60, what="completion")
        expired = sb.expire_grant(grant, send=False).notifications
        await deliver(pool, sb, expired)
        assert await pool.fetchval("SELECT status FROM flux_inboxes") == "auth_expired"
        mark = await last_id(pool)
        await deliver(pool, sb, expired, replay=True)  # said again: no change, no event
        assert await events_after(pool, mark) == []
        await deliver(pool, sb, sb.revive_grant(grant, send=False).notifications)
        rows = [r for r in await events_after(pool)
                if r["kind"].startswith(("inbox.", "backfill."))]
        seen = [(r["kind"], r["object_id"], r["changes"]) for r in rows]
        cancelled = {"status": "failed", "old_status": "queued", "kind": "full",
                     "error": "cancelled by an operator"}
        assert seen[:4] == [
            ("backfill.started", str(config),
             {"status": "queued", "old_status": "pending", "kind": "full"}),
            ("backfill.failed", str(config), cancelled),
            ("backfill.started", str(config),
             {"status": "queued", "old_status": "failed", "kind": "full"}),
            ("backfill.completed", str(config),
             {"status": "completed", "old_status": "thread_sync", "kind": "full"})]
        assert seen[4] == ("inbox.status_changed", str(inbox),
                           {"status": "auth_expired", "old_status": "active"})
        assert seen[5] == ("inbox.status_changed", str(inbox),
                           {"status": "active", "old_status": "auth_expired"})
        # coming back queued a catch-up: a backfill started again
        assert [k for k, _o, _c in seen[6:]] in ([], ["backfill.started"],
                                                 ["backfill.started", "backfill.completed"])


# ------------------------------------------------------------------ positions
def test_a_transaction_that_commits_later_gets_the_later_position(db_url: str) -> None:
    inbox = uuid.uuid4()
    with psycopg.connect(db_url) as a, psycopg.connect(db_url) as b, \
            psycopg.connect(db_url, autocommit=True) as reader:
        early = a.execute(RECORD, (inbox, "message.updated", "written-first")).fetchone()
        late = b.execute(RECORD, (inbox, "message.updated", "written-second")).fetchone()
        assert early and late and early[0] < late[0]
        b.commit()
        seen = reader.execute("SELECT object_id, position FROM nova_events"
                              " ORDER BY position").fetchall()
        assert seen == [("written-second", 1)]  # never a NULL position, never a hole
        a.commit()
        seen = reader.execute("SELECT object_id, position FROM nova_events"
                              " ORDER BY position").fetchall()
    assert seen == [("written-second", 1), ("written-first", 2)]


def test_concurrent_writers_leave_gap_free_positions_that_a_reader_never_skips(
        db_url: str) -> None:
    """Four writers commit transactions of 1-3 events over three inboxes (in random order,
    pausing inside them) while a consumer reads and acknowledges: every inbox ends with
    positions 1..n, and the consumer saw each exactly once, in position order."""
    inboxes = [uuid.uuid4() for _ in range(3)]
    written: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    stop_reading = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(db_url) as conn:
                for n in range(40):
                    picked = [rng.choice(inboxes) for _ in range(rng.randint(1, 3))]
                    for inbox in picked:
                        conn.execute(RECORD, (inbox, "message.updated", f"{seed}-{n}"))
                        time.sleep(rng.random() / 500)
                    conn.commit()
                    with lock:
                        written.update(picked)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    seen: dict[uuid.UUID, list[int]] = defaultdict(list)

    def reader() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:
                done = stop_reading.is_set()
                rows = conn.execute("SELECT inbox_id, position FROM nova_events_read('r', 7)"
                                    ).fetchall()
                for inbox_id, position in rows:
                    seen[inbox_id].append(position)
                last: dict[uuid.UUID, int] = {}
                for inbox_id, position in rows:
                    last[inbox_id] = position
                for inbox_id, position in last.items():
                    conn.execute("SELECT nova_events_ack('r', %s, %s)", (inbox_id, position))
                if done and not rows:
                    return

    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    read = threading.Thread(target=reader)
    read.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    stop_reading.set()
    read.join(60)
    assert not errors, errors
    with psycopg.connect(db_url) as conn:
        for inbox in inboxes:
            positions = [r[0] for r in conn.execute(
                "SELECT position FROM nova_events WHERE inbox_id = %s ORDER BY id", (inbox,))]
            assert sorted(positions) == list(range(1, written[inbox] + 1))
            assert conn.execute("SELECT position FROM nova_event_heads WHERE inbox_id = %s",
                                (inbox,)).fetchone() == (written[inbox],)
    for inbox in inboxes:
        assert seen[inbox] == list(range(1, written[inbox] + 1))


def test_transactions_writing_events_of_a_b_and_b_a_never_deadlock(db_url: str) -> None:
    """One transaction has events of A then B, the other of B then A, and both commit while a
    third session holds B's head. The B, A one commits first: in write order it would wait
    for B, the other take A and queue for B behind it, and once B is free each would wait for
    the other (a deadlock). Sorted, it takes A, then waits for B; the other waits for A."""
    a, b = sorted([uuid.uuid4(), uuid.uuid4()])
    with psycopg.connect(db_url, autocommit=True) as admin:
        for inbox in (a, b):  # the heads exist
            admin.execute(RECORD, (inbox, "message.updated", "seed"))
        deadlocks = admin.execute("SELECT deadlocks FROM pg_stat_database"
                                  " WHERE datname = current_database()").fetchone()
    s1, s2, holder = (psycopg.connect(db_url) for _ in range(3))
    try:
        for conn in (s1, s2):
            conn.execute("SET deadlock_timeout = '100ms'")
        s1.execute(RECORD, (a, "message.updated", "s1"))
        s1.execute(RECORD, (b, "message.updated", "s1"))
        s2.execute(RECORD, (b, "message.updated", "s2"))
        s2.execute(RECORD, (a, "message.updated", "s2"))
        holder.execute("SELECT 1 FROM nova_event_heads WHERE inbox_id = %s FOR UPDATE", (b,))
        failures: list[BaseException] = []

        def commit(conn: psycopg.Connection[Any]) -> None:
            try:
                conn.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        t2 = threading.Thread(target=commit, args=(s2,))
        t2.start()
        time.sleep(0.3)  # s2 holds A, waits for B
        t1 = threading.Thread(target=commit, args=(s1,))
        t1.start()
        time.sleep(0.5)  # s1 waits for A
        assert t1.is_alive() and t2.is_alive()
        holder.commit()
        t1.join(10)
        t2.join(10)
        assert not t1.is_alive() and not t2.is_alive() and not failures, failures
    finally:
        for conn in (s1, s2, holder):
            conn.close()
    with psycopg.connect(db_url, autocommit=True) as admin:
        rows = admin.execute("SELECT inbox_id, object_id FROM nova_events WHERE position > 1"
                             " ORDER BY inbox_id, position").fetchall()
        assert rows == [(a, "s2"), (a, "s1"), (b, "s2"), (b, "s1")]
        time.sleep(0.6)  # statistics are flushed within a second
        assert admin.execute("SELECT deadlocks FROM pg_stat_database"
                             " WHERE datname = current_database()").fetchone() == deadlocks


# ------------------------------------------------------------------ retention
def _age(conn: psycopg.Connection[Any], inbox: uuid.UUID, positions: list[int]) -> None:
    """Events written ten days ago, as retention sees them."""
    conn.execute("UPDATE nova_events SET occurred_at = now() - interval '10 days'"
                 " WHERE inbox_id = %s AND position = ANY(%s)", (inbox, positions))
    conn.execute("UPDATE nova_event_heads SET oldest_at = (SELECT occurred_at FROM nova_events"
                 " WHERE inbox_id = %s ORDER BY position LIMIT 1) WHERE inbox_id = %s",
                 (inbox, inbox))


PRUNE = "SELECT nova_prune_events(now() - interval '7 days', %s)"


def test_retention_prunes_a_prefix_and_a_consumer_behind_it_is_told_until_reset(
        conn: psycopg.Connection[Any], db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    inbox = uuid.uuid4()
    for n in range(1, 7):
        conn.execute(RECORD, (inbox, "message.updated", f"e{n}"))
    conn.execute("SELECT nova_events_ack('app', %s, 1)", (inbox,))
    conn.execute("SELECT nova_events_ack('fast', %s, 4)", (inbox,))
    _age(conn, inbox, [1, 2, 4])
    # Only a prefix goes: the young event 3 stops it (4 stays, though old).
    assert conn.execute(PRUNE, (1000,)).fetchone()["nova_prune_events"] == 2
    _age(conn, inbox, [3])
    assert conn.execute(PRUNE, (1,)).fetchone()["nova_prune_events"] == 1  # the batch bounds it
    assert conn.execute(PRUNE, (1000,)).fetchone()["nova_prune_events"] == 1
    assert conn.execute(PRUNE, (1000,)).fetchone()["nova_prune_events"] == 0
    head = conn.execute("SELECT * FROM nova_event_heads").fetchone()
    assert (head["position"], head["pruned_through"]) == (6, 4)
    assert [r["object_id"] for r in conn.execute("SELECT object_id FROM nova_events")] == [
        "e5", "e6"]
    assert conn.execute("SELECT pruned FROM nova_retention_status() WHERE kind = 'events'"
                        ).fetchone() == {"pruned": 4}

    # Behind: the consumer, the inbox and the range, never the next events.
    for consumer, first in (("app", 2), ("new", 1)):
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM nova_events_read(%s, 10)", (consumer,))
        assert err.value.sqlstate == "NV020"
        assert err.value.diag.message_primary == (
            f"events: consumer {consumer} is behind in inbox {inbox}: events {first} to 4 were"
            " pruned before it read them")
        assert f"nova events reset {consumer}" in (err.value.diag.message_hint or "")
    assert [r["object_id"] for r in conn.execute(
        "SELECT object_id FROM nova_events_read('fast', 10)")] == ["e5", "e6"]

    # The shell says so too, until the operator resets the consumer.
    url = ["--database-url", db_url]
    assert nova_main([*url, "events", "--consumer", "app"]) == 1
    err_text = capsys.readouterr().err
    assert "consumer app is behind" in err_text and "nova events reset app" in err_text
    assert nova_main([*url, "events", "reset", "app"]) == 0
    assert f"app: inbox {inbox} 1 -> 4 (3 event(s) skipped)" in capsys.readouterr().out
    assert nova_main([*url, "events", "--consumer", "app", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and '"object_id":"e5"' in out[0]
    assert conn.execute("SELECT position FROM nova_event_cursors WHERE consumer = 'app'"
                        ).fetchone() == {"position": 6}  # what it printed is acknowledged
    assert nova_main([*url, "events", "--consumer", "app"]) == 0
    assert capsys.readouterr().out == ""


async def test_the_monitor_prunes_events_by_their_own_retention_setting(
        pool: asyncpg.Pool) -> None:
    inbox = uuid.uuid4()
    for n in range(5):
        await pool.execute("SELECT nova_record_event($1, 'message.updated', $2, NULL, NULL,"
                           " '{}')", inbox, f"e{n}")
    await pool.execute("UPDATE nova_events SET occurred_at = now() - interval '3 days'"
                       " WHERE position <= 3")
    await pool.execute("UPDATE nova_event_heads SET oldest_at = now() - interval '3 days'")
    kept = CompletionMonitor(load_settings(retention_days=0, event_retention_days=4), pool=pool)
    assert await kept.prune() == {}
    monitor = CompletionMonitor(load_settings(retention_days=0, event_retention_days=2),
                                pool=pool)
    assert await monitor.prune() == {"events": 3}
    consumer = Consumer(pool, "late")
    with pytest.raises(Behind) as err:
        await consumer.read()
    assert (err.value.consumer, err.value.inbox_id, err.value.first, err.value.last) == (
        "late", inbox, 1, 3)
    assert await consumer.reset() == [(inbox, 0, 3)]
    got = await consumer.read()
    assert [e.object_id for e in got] == ["e3", "e4"]
    await consumer.ack(got)
    assert await consumer.read() == []


# ------------------------------------------------------------------ the shell and wake-ups
def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)
    threading.Thread(target=read, daemon=True).start()
    return out


def test_the_shell_prints_the_feed_and_follows_it_woken_by_notify(
        conn: psycopg.Connection[Any], db_url: str) -> None:
    a, b = sorted([uuid.uuid4(), uuid.uuid4()])
    for inbox, name in ((a, "a1"), (b, "b1"), (a, "a2")):
        conn.execute("SELECT nova_record_event(%s, 'message.updated', %s, 'p', NULL,"
                     " '{\"unread\": true}')", (inbox, name))
    cli = [sys.executable, "-m", "nova.cli", "--database-url", db_url, "events"]
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [(line.split()[2], line.split()[3], line.split()[5]) for line in lines] == [
        (str(a), "#1", "a1"), (str(a), "#2", "a2"), (str(b), "#1", "b1")]
    assert lines[0].endswith('provider=p {"unread":true}')
    assert conn.execute("SELECT count(*) AS n FROM nova_event_cursors").fetchone() == {"n": 0}

    # --follow, woken by NOTIFY: the poll is a minute, the test waits at most ten seconds.
    follower = subprocess.Popen([*cli, "--follow", "--json", "--inbox", str(a)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "POLL_INTERVAL_MS": "60000"})
    try:
        out = _lines(follower)
        first = [json.loads(out.get(timeout=30)) for _ in range(2)]
        assert [e["object_id"] for e in first] == ["a1", "a2"]
        time.sleep(1)  # listening by now
        with conn.transaction():
            for name in ("a3", "a4"):
                conn.execute("SELECT nova_record_event(%s, 'thread.updated', %s, NULL, NULL,"
                             " '{}')", (a, name))
        later = [json.loads(out.get(timeout=10)) for _ in range(2)]
        assert [(e["object_id"], e["position"]) for e in later] == [("a3", 3), ("a4", 4)]
    finally:
        follower.terminate()
        follower.wait(10)

    # A consumer's reads are shared across inboxes; `consumers` says what it has not read.
    got = conn.execute("SELECT inbox_id, position FROM nova_events_read('app', 2)").fetchall()
    assert [(r["inbox_id"], r["position"]) for r in got] == [(a, 1), (b, 1)]
    for r in got:
        conn.execute("SELECT nova_events_ack('app', %s, %s)", (r["inbox_id"], r["position"]))
    listed = subprocess.run([*cli, "consumers"], capture_output=True, text=True, timeout=60)
    assert listed.stdout.startswith("app: 2 inbox(es), 3 unread"), listed.stdout


async def test_a_listener_wakes_on_a_commit_that_wrote_events(pool: asyncpg.Pool,
                                                              db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        assert await wait(conn, 0.2) is False
        waiting = asyncio.create_task(wait(conn, 10))
        await asyncio.sleep(0.2)
        await pool.execute("SELECT nova_record_event($1, 'message.updated', 'x', NULL, NULL,"
                           " '{}')", uuid.uuid4())
        assert await asyncio.wait_for(waiting, 10) is True
    finally:
        await conn.close()


# ------------------------------------------------------------------ must show
async def _replicate(replica: Replica, url: str, done: asyncio.Event) -> None:
    rpool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        while not done.is_set():
            async with rpool.acquire() as conn:
                await replica.step(conn)
            await asyncio.sleep(0.2)
    finally:
        await rpool.close()


async def _queue(pool: asyncpg.Pool, notes: list[Any], replay: bool = False) -> None:
    for note in notes:
        payload = {**note.payload, "id": str(uuid.uuid4())} if replay else note.payload
        await pool.execute("SELECT * FROM queue_nylas_webhook_notification($1, $2, $3)",
                           payload["id"], payload["type"], payload)


async def _drained(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT NOT EXISTS (SELECT 1 FROM flux_webhook_notifications"
        "                   WHERE status NOT IN ('processed', 'skipped'))"
        " AND NOT EXISTS (SELECT 1 FROM pgmq.q_nylas_webhook_notifications)"))


@pytest.mark.timeout(300)
async def test_a_consumer_applying_every_event_to_an_empty_copy_ends_equal_to_the_tables(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    """Must show (issue 20): a backfill, then webhook traffic (new threads, replies, flag and
    folder changes, deletes, replays), with SIGKILLs of the backfill, a thread worker and the
    webhook processor in between, while a consumer started from the first event applies each
    one to an empty copy: no event lost (the copy equals the tables, checked at every step
    against the same snapshot), none for a change not made (every event's named fields
    differ from the copy before it, and every field that differs is named)."""
    replica = Replica("must-show", every_step=True)
    done = asyncio.Event()
    log = tmp_path / "procs.log"
    procs: list[Any] = []
    with make_sandbox(300, latency_ms=20) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        e = env(db_url, sb)
        replicating = asyncio.create_task(_replicate(replica, db_url, done))
        try:
            config = await start_backfill(pool, inbox)
            backfill = spawn("nova.backfill", e, log)
            workers = [spawn("nova.threads", e, log) for _ in range(2)]
            procs += [backfill, *workers]
            await wait_for(lambda: pool.fetchval(
                "SELECT checkpoint_pages_done >= 1 FROM flux_inbox_configurations"
                " WHERE id = $1", config), 60, interval=0.01, what="a page discovered")
            backfill.send_signal(signal.SIGKILL)
            await wait_for(lambda: pool.fetchval(
                "SELECT count(*) >= 20 FROM queued_threads WHERE status = 'completed'"),
                60, interval=0.01, what="some threads synced")
            workers[0].send_signal(signal.SIGKILL)  # mid-sync: it holds jobs
            procs += [spawn("nova.backfill", e, log), spawn("nova.threads", e, log)]
            monitor = CompletionMonitor(settings(sb), pool=pool)

            async def backfilled() -> bool:
                await monitor.check()
                return await completed(pool, config)
            await wait_for(backfilled, 120, interval=0.3, what="completion after the kills")

            hooks = spawn("nova.webhooks", e, log)
            procs.append(hooks)
            rng = random.Random(7)
            threads = sb.thread_ids(grant)
            messages = [m for t in threads[:150]
                        for m in sb.thread_json(grant, t)["message_ids"]]  # type: ignore[index]
            rng.shuffle(messages)
            notes: list[Any] = []
            for i in range(15):
                notes += sb.add_message(grant, subject=f"new {i}", send=False).notifications
                notes += sb.add_message(grant, thread_id=rng.choice(threads[150:]),
                                        send=False).notifications
            for mid in messages[:30]:  # each message changed once: a flag, a star or folders
                now = sb.message_json(grant, mid)
                assert now is not None
                change = rng.choice([{"unread": not now["unread"]},
                                     {"starred": not now["starred"]},
                                     {"folders": sorted({*now["folders"], "Archive"})}])
                notes += sb.update_message(grant, mid, send=False, **change).notifications
            for mid in messages[30:45]:
                notes += sb.delete_message(grant, mid, send=False).notifications
            await _queue(pool, notes[:40])
            await wait_for(lambda: pool.fetchval(
                "SELECT count(*) >= 10 FROM flux_webhook_notifications"
                " WHERE status = 'processed'"), 60, interval=0.01, what="some webhooks")
            hooks.send_signal(signal.SIGKILL)
            await _queue(pool, notes[40:])
            await _queue(pool, rng.sample(notes, 20), replay=True)  # delivered again
            procs.append(spawn("nova.webhooks", e, log))

            async def applied() -> bool:
                assert procs[-1].poll() is None, log.read_text()[-3000:]
                return await _drained(pool)
            await wait_for(applied, 120, interval=0.2, what="webhooks applied")
        finally:
            done.set()
            for proc in procs:
                stop(proc)
            with contextlib.suppress(Exception):
                await replicating
    async with pool.acquire() as conn:
        differences = await replica.compare(conn)
    report = replica.report()
    print(f"change feed replica: {report}")
    assert report["problems"] == 0 and differences == 0, report["examples"]
    assert replicating.exception() is None
    counts = Counter(r["kind"] for r in await pool.fetch("SELECT kind FROM nova_events"))
    assert counts["message.updated"] >= 30 and counts["message.deleted"] >= 15
    assert counts["backfill.completed"] >= 1 and counts["thread.created"] >= 315
    assert report["events"] == sum(counts.values())
    assert report["checked"] > report["events"] / 2 and report["compared"] > 5
    assert report["messages_compared"] == await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE deleted_at IS NULL") > 600
    assert "Traceback" not in log.read_text()
