"""The SQL under concurrent sessions: idempotent inserts that block and then agree, webhooks
stored and queued once, backfill starts that exclude each other, and counters that stay exact
under many concurrent status changes and recounts."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from factories import (
    add_inbox,
    assert_stats_exact,
    counters,
    one,
    queue_depth,
    queue_messages,
    real_counts,
    rows,
    scalar,
    set_config_status,
    start_backfill,
)

Conn = psycopg.Connection[Any]
STATUSES = ("queued", "processing", "completed", "failed")


@pytest.fixture
def sessions(db_url: str) -> Iterator[Callable[[], Conn]]:
    """Opens extra autocommit sessions on the test database; all closed at the end."""
    opened: list[Conn] = []

    def open_session() -> Conn:
        c = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
        c.execute("SET lock_timeout = '20s'")   # a lost wake-up fails instead of hanging
        opened.append(c)
        return c

    yield open_session
    for c in opened:
        c.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=10) as ex:
        yield ex


def wait_until_blocked_on_lock(observer: Conn, blocked: Conn, fut: Future[Any]) -> None:
    """Waits until `blocked`'s backend waits on a lock; fails if it finishes instead."""
    pid = blocked.info.backend_pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert not fut.done(), f"session did not block: {fut.result()!r}"
        state = one(observer, "SELECT wait_event_type, state FROM pg_stat_activity"
                              " WHERE pid = %s", (pid,))
        if state["wait_event_type"] == "Lock" and state["state"] == "active":
            return
        time.sleep(0.01)
    raise AssertionError("session never waited on a lock")


def insert_thread(c: Conn, cfg: uuid.UUID, thread: str) -> dict[str, Any]:
    return one(c, "SELECT * FROM insert_queued_thread_idempotent(%s, %s)", (cfg, thread))


def deliver(c: Conn, webhook_id: str) -> dict[str, Any]:
    return one(c, "SELECT * FROM queue_nylas_webhook_notification(%s, 'message.created', %s)",
               (webhook_id, Jsonb({"data": {"object": {"id": "m1", "grant_id": "g1"}}})))


# --- the same thread from two sessions ----------------------------------------------------------

def test_second_insert_of_a_thread_waits_for_the_first_and_gets_its_id(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    a, b = sessions(), sessions()
    with a.transaction():
        first = insert_thread(a, cfg, "thr-1")
        assert first["inserted"] is True
        fut = pool.submit(insert_thread, b, cfg, "thr-1")
        wait_until_blocked_on_lock(conn, b, fut)
        # Not visible to anyone else until A commits.
        assert scalar(conn, "SELECT count(*) FROM queued_threads") == 0
    second = fut.result(timeout=10)
    assert second == {"queued_thread_id": first["queued_thread_id"], "inserted": False}
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == 1
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 1


def test_second_insert_of_a_thread_inserts_it_when_the_first_rolls_back(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    a, b = sessions(), sessions()
    a.execute("BEGIN")
    first = insert_thread(a, cfg, "thr-1")
    fut = pool.submit(insert_thread, b, cfg, "thr-1")
    wait_until_blocked_on_lock(conn, b, fut)
    a.execute("ROLLBACK")
    second = fut.result(timeout=10)
    assert second["inserted"] is True
    assert second["queued_thread_id"] != first["queued_thread_id"]
    assert scalar(conn, "SELECT array_agg(id) FROM queued_threads") == [
        second["queued_thread_id"]]
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 1


def test_many_sessions_inserting_the_same_threads_end_with_one_row_each(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    workers = [sessions() for _ in range(6)]
    barrier = threading.Barrier(len(workers))
    threads = [f"t{i}" for i in range(30)]

    def work(c: Conn, seed: int) -> dict[str, tuple[int, bool]]:
        order = threads[:]
        random.Random(seed).shuffle(order)
        barrier.wait()
        got = {}
        for t in order:
            r = insert_thread(c, cfg, t)
            got[t] = (r["queued_thread_id"], r["inserted"])
        return got

    results = [f.result(timeout=30) for f in
               [pool.submit(work, c, i) for i, c in enumerate(workers)]]
    ids = {r["provider_thread_id"]: r["id"]
           for r in rows(conn, "SELECT provider_thread_id, id FROM queued_threads")}
    assert sorted(ids) == sorted(threads)
    for t in threads:
        assert {res[t][0] for res in results} == {ids[t]}          # everyone agrees on the id
        assert sum(res[t][1] for res in results) == 1              # exactly one inserted it
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 30


# --- the same webhook from two sessions ---------------------------------------------------------

def test_concurrent_redelivery_of_a_webhook_is_stored_once_and_queued_once(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    a, b = sessions(), sessions()
    with a.transaction():
        first = deliver(a, "wh-race")
        assert first["is_new"] is True
        fut = pool.submit(deliver, b, "wh-race")
        wait_until_blocked_on_lock(conn, b, fut)
        assert queue_depth(conn, "nylas_webhook_notifications") == 0   # uncommitted
    second = fut.result(timeout=10)
    assert second == {"notification_id": first["notification_id"], "is_new": False}
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 1
    [msg] = queue_messages(conn, "nylas_webhook_notifications")
    assert msg["message"]["notification_id"] == str(first["notification_id"])


def test_webhook_redelivered_while_the_first_delivery_rolls_back_is_kept(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    a, b = sessions(), sessions()
    a.execute("BEGIN")
    deliver(a, "wh-rb")
    fut = pool.submit(deliver, b, "wh-rb")
    wait_until_blocked_on_lock(conn, b, fut)
    a.execute("ROLLBACK")
    second = fut.result(timeout=10)
    assert second["is_new"] is True
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 1
    [msg] = queue_messages(conn, "nylas_webhook_notifications")
    assert msg["message"]["notification_id"] == str(second["notification_id"])


def test_a_burst_of_identical_deliveries_is_stored_once_and_queued_once(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    workers = [sessions() for _ in range(8)]
    barrier = threading.Barrier(len(workers))

    def work(c: Conn) -> list[dict[str, Any]]:
        barrier.wait()
        return [deliver(c, f"burst-{i}") for i in range(20)]

    results = [f.result(timeout=30) for f in [pool.submit(work, c) for c in workers]]
    for i in range(20):
        outcomes = [res[i] for res in results]
        assert len({o["notification_id"] for o in outcomes}) == 1
        assert sum(o["is_new"] for o in outcomes) == 1
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 20
    queued = Counter(m["message"]["webhook_id"]
                     for m in queue_messages(conn, "nylas_webhook_notifications"))
    assert queued == Counter({f"burst-{i}": 1 for i in range(20)})


# --- backfill starts and transitions ------------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True], ids=["new-inbox", "finished-backfill"])
def test_concurrent_backfill_starts_admit_exactly_one(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor, existing: bool,
) -> None:
    inbox = add_inbox(conn)
    if existing:
        set_config_status(conn, start_backfill(conn, inbox), "completed")
        conn.execute("SELECT flux_pgmq_delete('inbox_backfill_jobs', 1)")
    a, b = sessions(), sessions()
    with a.transaction():
        cfg = start_backfill(a, inbox)
        fut = pool.submit(start_backfill, b, inbox)
        wait_until_blocked_on_lock(conn, b, fut)
    with pytest.raises(errors.ObjectInUse, match="already queued"):
        fut.result(timeout=10)
    assert scalar(conn, "SELECT array_agg(id) FROM flux_inbox_configurations") == [cfg]
    [job] = queue_messages(conn, "inbox_backfill_jobs")
    assert job["message"]["config_id"] == str(cfg)


def test_concurrent_transitions_report_true_once(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    workers = [sessions() for _ in range(4)]
    barrier = threading.Barrier(len(workers))

    def work(c: Conn) -> bool:
        barrier.wait()
        return bool(scalar(c, "SELECT transition_to_thread_sync(%s)", (cfg,)))

    outcomes = [f.result(timeout=10) for f in [pool.submit(work, c) for c in workers]]
    assert sorted(outcomes) == [False, False, False, True]
    assert one(conn, "SELECT backfill_status FROM inbox_sync_stats")["backfill_status"] == (
        "thread_sync")


def test_overlapping_discovery_pages_from_many_sessions_queue_each_thread_once(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    universe = [f"thread-{i:03d}" for i in range(120)]
    workers = [sessions() for _ in range(6)]
    barrier = threading.Barrier(len(workers))

    def work(c: Conn, seed: int) -> list[dict[str, Any]]:
        rnd = random.Random(seed)
        barrier.wait()
        added: list[dict[str, Any]] = []
        for _ in range(6):
            page = rnd.sample(universe, 40)
            added += rows(c, "SELECT * FROM queue_discovered_threads(%s, %s)", (cfg, page))
        return added

    added = [a for f in [pool.submit(work, c, i) for i, c in enumerate(workers)]
             for a in f.result(timeout=30)]
    stored = {r["provider_thread_id"]: r for r in rows(conn, "SELECT * FROM queued_threads")}
    assert sorted(a["provider_thread_id"] for a in added) == sorted(stored)   # each added once
    jobs = queue_messages(conn, "thread_sync_jobs")
    assert Counter(j["message"]["thread_id"] for j in jobs) == Counter(set(stored))
    for j in jobs:
        row = stored[j["message"]["thread_id"]]
        assert row["queue_msg_id"] == j["msg_id"]
        assert j["message"]["queued_thread_id"] == row["id"]
    assert assert_stats_exact(conn, cfg)["threads_queued"] == len(stored)


# --- counters under concurrent status changes ---------------------------------------------------

def _churn(c: Conn, cfg: uuid.UUID, ids: list[int], seed: int, txns: int,
           barrier: threading.Barrier, until: threading.Event | None = None) -> Counter[str]:
    """Random status changes in their own transactions, some rolled back; a few inserts and
    deletes. Locks are taken in id order so the workload itself cannot deadlock. With `until`,
    runs until it is set and then `txns` more transactions."""
    rnd = random.Random(seed)
    done: Counter[str] = Counter()
    barrier.wait()
    while until is not None and not until.is_set():
        _one_change(c, cfg, ids, rnd, done)
    for _ in range(txns):
        _one_change(c, cfg, ids, rnd, done)
    return done


def _one_change(c: Conn, cfg: uuid.UUID, ids: list[int], rnd: random.Random,
                done: Counter[str]) -> None:
    """One transaction: a status change, an insert or a delete; a fifth are rolled back."""
    roll = rnd.random()
    rollback = rnd.random() < 0.2
    c.execute("BEGIN")
    if roll < 0.06:
        insert_thread(c, cfg, f"extra-{rnd.randrange(40)}")
        done["insert"] += 1
    elif roll < 0.09:
        c.execute("DELETE FROM queued_threads WHERE id = %s", (rnd.choice(ids),))
        done["delete"] += 1
    else:
        picked = sorted(rnd.sample(ids, rnd.randint(1, 3)))
        c.execute("SELECT id FROM queued_threads WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                  (picked,))
        changes = [(i, rnd.choice(STATUSES), rnd.randrange(0, 20)) for i in picked]
        c.execute("UPDATE queued_threads q SET status = v.status, message_count = v.n"
                  " FROM unnest(%s::bigint[], %s::text[], %s::int[]) AS v(id, status, n)"
                  " WHERE q.id = v.id",
                  ([i for i, _, _ in changes], [s for _, s, _ in changes],
                   [n for _, _, n in changes]))
        done["update"] += 1
    c.execute("ROLLBACK" if rollback else "COMMIT")
    done["rollback" if rollback else "commit"] += 1


def _seed_threads(conn: Conn, n: int) -> tuple[uuid.UUID, list[int]]:
    cfg = start_backfill(conn, add_inbox(conn))
    added = rows(conn, "SELECT * FROM queue_discovered_threads(%s, %s)",
                 (cfg, [f"t{i:04d}" for i in range(n)]))
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is True
    return cfg, [a["queued_thread_id"] for a in added]


def test_counters_stay_exact_under_concurrent_status_changes(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg, ids = _seed_threads(conn, 150)
    # A second backfill whose threads nobody touches must keep its own counters.
    other, _ = _seed_threads(conn, 10)
    other_before = real_counts(conn, other)
    workers = [sessions() for _ in range(8)]
    barrier = threading.Barrier(len(workers))
    futures = [pool.submit(_churn, c, cfg, ids, seed, 250, barrier)
               for seed, c in enumerate(workers)]
    totals = sum((f.result(timeout=60) for f in futures), Counter())
    assert totals["commit"] > 1400 and totals["rollback"] > 250 and totals["update"] > 1700
    exact = assert_stats_exact(conn, cfg)
    assert exact["messages_synced"] == scalar(
        conn, "SELECT coalesce(sum(message_count), 0) FROM queued_threads"
              " WHERE config_id = %s AND status = 'completed'", (cfg,))
    # The churn really moved threads between every status.
    grouped = {r["status"]: r["n"] for r in rows(
        conn, "SELECT status, count(*) AS n FROM queued_threads WHERE config_id = %s"
              " GROUP BY status", (cfg,))}
    assert set(grouped) == set(STATUSES)
    assert exact["threads_pending"] == grouped["queued"]
    assert exact["threads_completed"] == grouped["completed"]
    assert real_counts(conn, other) == other_before
    assert_stats_exact(conn, other)


def test_recount_running_concurrently_with_status_changes_ends_exact(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg, ids = _seed_threads(conn, 100)
    # Start from wrong counters: only a recount can make them right.
    conn.execute("UPDATE inbox_sync_stats SET threads_completed = threads_completed + 7,"
                 " messages_synced = 12345 WHERE config_id = %s", (cfg,))
    workers = [sessions() for _ in range(6)]
    recounter = sessions()
    barrier = threading.Barrier(len(workers) + 1)
    recounts_over = threading.Event()

    def recount() -> int:
        barrier.wait()
        for _ in range(40):
            recounter.execute("SELECT initialize_sync_stats(%s)", (cfg,))
        recounts_over.set()
        return 40

    # The writers run during every recount and keep going after the last one, so a change
    # a recount lost (or counted twice) would still show at the end.
    futures = [pool.submit(_churn, c, cfg, ids, 100 + seed, 60, barrier, recounts_over)
               for seed, c in enumerate(workers)]
    recounts = pool.submit(recount)
    assert recounts.result(timeout=60) == 40
    assert not all(f.done() for f in futures)
    totals = sum((f.result(timeout=60) for f in futures), Counter())
    assert totals["commit"] > 6 * 60 * 0.7
    assert_stats_exact(conn, cfg)


def test_recount_never_waits_for_an_uncommitted_status_change_whose_delta_adds_on_top(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg, ids = _seed_threads(conn, 5)
    writer, recounter = sessions(), sessions()
    with writer.transaction():
        writer.execute("UPDATE queued_threads SET status = 'completed', message_count = 4"
                       " WHERE id = %s", (ids[0],))
        # The writer holds no counter row: the recount goes through, counting what is
        # committed (the change is not yet).
        fut = pool.submit(scalar, recounter,
                          "SELECT threads_completed FROM initialize_sync_stats(%s)", (cfg,))
        assert fut.result(timeout=5) == 0
    assert assert_stats_exact(conn, cfg)["messages_synced"] == 4


def test_a_status_change_never_waits_for_a_recount_or_a_fold(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg, ids = _seed_threads(conn, 5)
    writer, recounter = sessions(), sessions()
    with recounter.transaction():
        recounter.execute("SELECT initialize_sync_stats(%s)", (cfg,))   # base row locked
        recounter.execute("SELECT fold_sync_stats_deltas()")
        fut = pool.submit(writer.execute, "UPDATE queued_threads SET status = 'failed'"
                                          " WHERE id = ANY(%s)", (ids[:2],))
        fut.result(timeout=5)
        assert counters(conn, cfg)["threads_failed"] == 2   # committed: counted already
    assert assert_stats_exact(conn, cfg)["threads_failed"] == 2


def test_folds_running_concurrently_with_status_changes_and_recounts_end_exact(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg, ids = _seed_threads(conn, 100)
    workers = [sessions() for _ in range(5)]
    folder, recounter = sessions(), sessions()
    barrier = threading.Barrier(len(workers) + 2)
    over = threading.Event()
    folded: list[int] = []

    def fold_loop() -> None:
        barrier.wait()
        while not over.is_set():
            folded.append(scalar(folder, "SELECT fold_sync_stats_deltas()"))

    def recount() -> None:
        barrier.wait()
        for _ in range(30):
            recounter.execute("SELECT initialize_sync_stats(%s)", (cfg,))
            time.sleep(0.005)

    futures = [pool.submit(_churn, c, cfg, ids, 300 + seed, 150, barrier)
               for seed, c in enumerate(workers)]
    folding, recounting = pool.submit(fold_loop), pool.submit(recount)
    totals = sum((f.result(timeout=60) for f in futures), Counter())
    recounting.result(timeout=30)
    over.set()
    folding.result(timeout=30)
    assert totals["commit"] > 5 * 150 * 0.7 and sum(folded) > 0
    assert_stats_exact(conn, cfg)


# --- get_sync_progress while a backfill runs ----------------------------------------------------

def test_sync_progress_is_null_during_discovery_and_exact_after_transition(
    conn: Conn, sessions: Callable[[], Conn], pool: ThreadPoolExecutor,
) -> None:
    cfg = start_backfill(conn, add_inbox(conn))
    scalar(conn, "SELECT checkpoint_pages_done FROM"
                 " update_backfill_orchestration_progress(%s, 'p1', 0, 0)", (cfg,))
    discoverers = [sessions() for _ in range(3)]
    observer = sessions()
    stop = threading.Event()

    def discover(c: Conn, part: int) -> None:
        for page in range(5):
            ids = [f"t{part}-{page}-{i}" for i in range(20)]
            rows(c, "SELECT * FROM queue_discovered_threads(%s, %s)", (cfg, ids))
            # Some threads finish while discovery still runs.
            c.execute("UPDATE queued_threads SET status = 'completed', message_count = 2"
                      " WHERE config_id = %s AND provider_thread_id = ANY(%s)", (cfg, ids[:5]))

    def watch() -> list[Any]:
        seen = []
        while not stop.is_set():
            p = one(observer, "SELECT * FROM get_sync_progress(%s)", (cfg,))
            seen.append((p["backfill_status"], p["percent_complete"], p["threads_completed"]))
        return seen

    watcher = pool.submit(watch)
    for f in [pool.submit(discover, c, i) for i, c in enumerate(discoverers)]:
        f.result(timeout=30)
    stop.set()
    seen = watcher.result(timeout=10)
    assert seen and all(pct is None for _, pct, _ in seen)
    assert any(done > 0 for _, _, done in seen)

    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is True
    p = one(conn, "SELECT * FROM get_sync_progress(%s)", (cfg,))
    assert p["discovery_complete"] is True
    assert p["threads_queued"] == 300 and p["threads_completed"] == 75
    assert p["percent_complete"] == Decimal("25.00")

    # Workers finish the rest concurrently; progress only grows and ends exact.
    stop.clear()
    watcher = pool.submit(watch)
    ids = [r["id"] for r in rows(conn, "SELECT id FROM queued_threads WHERE status = 'queued'"
                                       " ORDER BY id")]

    def finish(c: Conn, part: list[int]) -> None:
        for i in part:
            c.execute("UPDATE queued_threads SET status = 'processing' WHERE id = %s", (i,))
            c.execute("UPDATE queued_threads SET status = %s, message_count = 1 WHERE id = %s",
                      ("failed" if i % 10 == 0 else "completed", i))

    for f in [pool.submit(finish, c, ids[k::3]) for k, c in enumerate(discoverers)]:
        f.result(timeout=30)
    stop.set()
    percents = [pct for status, pct, _ in watcher.result(timeout=10)]
    assert percents == sorted(percents) and percents[0] >= Decimal("25.00")
    real = real_counts(conn, cfg)
    p = one(conn, "SELECT * FROM get_sync_progress(%s)", (cfg,))
    expected = round(Decimal(real["threads_completed"] + real["threads_failed"]) * 100
                     / real["threads_queued"], 2)
    assert p["percent_complete"] == expected == Decimal("100.00")
    assert (p["threads_completed"], p["threads_failed"], p["messages_synced"]) == (
        real["threads_completed"], real["threads_failed"], real["messages_synced"])
