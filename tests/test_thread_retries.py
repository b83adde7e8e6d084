"""Failed is not forever: a failed thread gets retry rounds later, on its own, visible in
get_sync_progress and `nova failures`; a later backfill of its inbox keeps it (and whatever
else was not done) instead of deleting it; a failed catch-up's gap is kept by the next one."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest
from synchelp import add_inbox as add_sync_inbox
from synchelp import make_sandbox, running, settings, wait_for
from synchelp import start_backfill as start_sync_backfill

from nova.backfill import BackfillProcessor
from nova.config import load_settings
from nova.runtime import Job, Worker
from nova.threads import ThreadSyncProcessor, retry_schedule

from factories import (
    add_inbox,
    assert_stats_exact,
    one,
    queue_messages,
    rows,
    scalar,
    start_backfill,
)

Conn = psycopg.Connection[Any]
TQ = "thread_sync_jobs"
WATCH = "20 seconds"
IDLE = "10 minutes"


def thread(conn: Conn, config_id: uuid.UUID, tid: str) -> dict[str, Any]:
    return one(conn, "SELECT * FROM queued_threads WHERE config_id = %s"
                     " AND provider_thread_id = %s", (config_id, tid))


def config(conn: Conn, config_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM flux_inbox_configurations WHERE id = %s", (config_id,))


def sweep(conn: Conn, watch: str = WATCH, idle: str = IDLE) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM retry_failed_threads(%s::interval, %s::interval, 100)",
                (watch, idle))


def fail(conn: Conn, config_id: uuid.UUID, tid: str, *, due_in: str | None,
         rounds: int = 0) -> None:
    """The thread failed its attempts; its next round due in `due_in` (None: none left)."""
    conn.execute("UPDATE queued_threads SET status = 'failed', attempts = 5,"
                 " error_message = 'Transient: 503', processed_at = now(), retry_rounds = %s,"
                 " retry_at = now() + %s::interval"
                 " WHERE config_id = %s AND provider_thread_id = %s",
                 (rounds, due_in, config_id, tid))


def completed_backfill(conn: Conn, threads: list[str]) -> tuple[uuid.UUID, uuid.UUID]:
    """An inbox whose backfill listed `threads` and completed them all."""
    inbox = add_inbox(conn)
    cfg = start_backfill(conn, inbox)
    rows(conn, "SELECT * FROM queue_discovered_threads(%s, %s)", (cfg, threads))
    conn.execute("UPDATE queued_threads SET status = 'completed', message_count = 2"
                 " WHERE config_id = %s", (cfg,))
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is True
    assert scalar(conn, "SELECT outcome FROM complete_backfill_if_done(%s)", (cfg,)) == (
        "completed")
    return inbox, cfg


# --- the sweep ----------------------------------------------------------------------------------

def test_a_due_failed_thread_of_a_completed_backfill_gets_a_new_round_on_its_own(
    conn: Conn,
) -> None:
    _, cfg = completed_backfill(conn, ["t1", "t2", "t3"])
    completed_at = config(conn, cfg)["backfill_completed_at"]
    fail(conn, cfg, "t1", due_in="-1 second")
    fail(conn, cfg, "t2", due_in="1 hour")
    p = one(conn, "SELECT * FROM get_sync_progress(%s)", (cfg,))
    assert (p["threads_failed"], p["threads_retry_waiting"]) == (2, 2)
    assert p["next_retry_at"] == thread(conn, cfg, "t1")["retry_at"]

    [retried] = sweep(conn)
    assert (retried["provider_thread_id"], retried["was"], retried["retry_round"]) == (
        "t1", "failed", 1)
    t1 = thread(conn, cfg, "t1")
    assert (t1["status"], t1["attempts"], t1["retry_rounds"], t1["error_message"]) == (
        "queued", 0, 1, None)
    assert t1["queue_msg_id"] == retried["msg_id"]
    [job] = [m for m in queue_messages(conn, TQ) if m["msg_id"] == retried["msg_id"]]
    assert job["message"]["queued_thread_id"] == t1["id"]
    # The round is watched: retry_at is a short time ahead, not a round's delay.
    ahead = t1["retry_at"] - scalar(conn, "SELECT now()")
    assert dt.timedelta(seconds=15) < ahead <= dt.timedelta(seconds=20)
    assert thread(conn, cfg, "t2")["status"] == "failed"        # not due: untouched
    # The backfill stays completed while its thread is retried: no premature-completion repair.
    assert rows(conn, "SELECT * FROM recover_premature_completions()") == []
    c = config(conn, cfg)
    assert (c["backfill_status"], c["backfill_completed_at"]) == ("completed", completed_at)
    p = one(conn, "SELECT * FROM get_sync_progress(%s)", (cfg,))
    assert (p["threads_pending"], p["threads_failed"], p["threads_retry_waiting"]) == (1, 1, 1)
    assert p["next_retry_at"] == thread(conn, cfg, "t2")["retry_at"]
    assert_stats_exact(conn, cfg)
    assert sweep(conn) == []   # nothing else due


def test_a_round_whose_job_vanished_is_queued_again_and_a_live_one_is_left_running(
    conn: Conn,
) -> None:
    _, cfg = completed_backfill(conn, ["t1"])
    fail(conn, cfg, "t1", due_in="-1 second")
    [first] = sweep(conn)
    conn.execute("UPDATE queued_threads SET retry_at = now() - interval '1 second'")
    assert sweep(conn) == []                       # its job is still there: only watched on
    assert thread(conn, cfg, "t1")["retry_at"] > scalar(conn, "SELECT now()")
    scalar(conn, "SELECT pgmq.delete('thread_sync_jobs', %s::bigint)", (first["msg_id"],))
    conn.execute("UPDATE queued_threads SET retry_at = now() - interval '1 second'")
    [again] = sweep(conn)
    assert (again["was"], again["retry_round"]) == ("queued", 1)   # the same round, a new job
    assert thread(conn, cfg, "t1")["queue_msg_id"] == again["msg_id"] != first["msg_id"]
    assert_stats_exact(conn, cfg)


def test_rounds_wait_for_an_inactive_inbox_and_leave_a_cancelled_backfill_alone(
    conn: Conn,
) -> None:
    inbox, cfg = completed_backfill(conn, ["t1"])
    fail(conn, cfg, "t1", due_in="-1 second")
    conn.execute("UPDATE flux_inboxes SET status = 'auth_expired' WHERE id = %s", (inbox,))
    assert sweep(conn) == []
    t1 = thread(conn, cfg, "t1")
    assert t1["status"] == "failed" and t1["retry_rounds"] == 0
    assert t1["retry_at"] - scalar(conn, "SELECT now()") > dt.timedelta(minutes=9)

    inbox2, cfg2 = completed_backfill(conn, ["u1"])
    fail(conn, cfg2, "u1", due_in="-1 second")
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed',"
                 " last_error = 'cancelled by an operator' WHERE id = %s", (cfg2,))
    assert sweep(conn) == []
    u1 = thread(conn, cfg2, "u1")
    assert u1["status"] == "failed" and u1["retry_at"] is None
    assert_stats_exact(conn, cfg2)


def test_the_sweep_skips_a_backfill_whose_configuration_a_completion_holds(
    conn: Conn, db_url: str,
) -> None:
    _, cfg = completed_backfill(conn, ["t1"])
    fail(conn, cfg, "t1", due_in="-1 second")
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM flux_inbox_configurations WHERE id = %s FOR UPDATE",
                       (cfg,))
        conn.execute("SET lock_timeout = '2s'")
        assert sweep(conn) == []                 # skipped, not waited for
        assert thread(conn, cfg, "t1")["status"] == "failed"
    [retried] = sweep(conn)
    assert retried["provider_thread_id"] == "t1"


async def test_a_final_failure_schedules_growing_rounds_then_none(pool: asyncpg.Pool) -> None:
    """10 min, 1 h, 6 h by default; a retry that is not final keeps the round's watch."""
    processor = ThreadSyncProcessor(load_settings())
    assert processor.retry_delays == retry_schedule(load_settings()) == [600, 3600, 21600]
    inbox = await pool.fetchval("INSERT INTO flux_inboxes (grant_id, email) VALUES ('g-r',"
                                " 'r@example.com') RETURNING id")
    cfg = await pool.fetchval("SELECT queue_inbox_backfill($1)", inbox)
    msg = await pool.fetchval("SELECT queue_thread_sync($1, 't1')", cfg)
    job = Job(queue=TQ, msg_id=msg, read_ct=5, enqueued_at=dt.datetime.now(dt.UTC),
              message={"queued_thread_id": None, "config_id": str(cfg), "thread_id": "t1"})
    seen = []
    for done in range(4):
        await pool.execute("UPDATE queued_threads SET status = 'processing', retry_rounds = $1,"
                           " retry_at = NULL", done)
        async with pool.acquire() as conn, conn.transaction():
            await processor.record_failure(conn, job, RuntimeError("503"), final=True)
        row = await pool.fetchrow("SELECT status, retry_at - now() AS wait FROM queued_threads")
        assert row["status"] == "failed"
        seen.append(None if row["wait"] is None else round(row["wait"].total_seconds()))
    assert seen == [600, 3600, 21600, None]
    await pool.execute("UPDATE queued_threads SET status = 'processing',"
                       " retry_at = now() + interval '20 seconds'")
    async with pool.acquire() as conn, conn.transaction():
        await processor.record_failure(conn, job, RuntimeError("503"), final=False)
    row = await pool.fetchrow("SELECT status, retry_at > now() AS watched FROM queued_threads")
    assert (row["status"], row["watched"]) == ("queued", True)


# --- a failed thread retried and completing later, end to end -----------------------------------

async def test_a_failed_thread_is_retried_later_and_completes_while_its_backfill_stays_done(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(8, thread_bodies=False) as sb:
        grant, other = sb.grant_ids[0], sb.grant_ids[1]
        inbox = await add_sync_inbox(pool, grant)
        cfg = await start_sync_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        bad = sb.thread_ids(grant)[2]
        # The provider fails this one thread on every attempt: through a grant whose message
        # listing answers 500.
        await pool.execute("UPDATE queued_threads SET grant_id = $1"
                           " WHERE provider_thread_id = $2", other, bad)
        sb.inject_fault("error_5xx", 1000, endpoint="list_messages", grant_id=other)
        kw = {"retry_base_delay": 0.02, "retry_max_delay": 0.05, "retry_delays": [3.0, 6.0]}
        async with running(db_url, s, backfill=0, threads=2, thread_kw=kw):
            failed = await wait_for(lambda: pool.fetchrow(
                "SELECT * FROM queued_threads WHERE provider_thread_id = $1"
                " AND status = 'failed'", bad), 30, what="the thread's failure")
            # The outage is over before its first round is due.
            await pool.execute("UPDATE queued_threads SET grant_id = NULL"
                               " WHERE provider_thread_id = $1", bad)
            assert failed["attempts"] == 5 and failed["retry_rounds"] == 0
            assert failed["retry_at"] > failed["processed_at"]
            done = await wait_for(lambda: pool.fetchrow(
                "SELECT c.backfill_completed_at AS completed_at, p.* FROM"
                " flux_inbox_configurations c, get_sync_progress(c.id) p"
                " WHERE c.id = $1 AND c.backfill_status = 'completed'", cfg), 30,
                what="the backfill's completion with its thread failed")
            assert (done["threads_failed"], done["threads_retry_waiting"]) == (1, 1)
            assert done["next_retry_at"] == failed["retry_at"]
            synced = await wait_for(lambda: pool.fetchrow(
                "SELECT * FROM queued_threads WHERE provider_thread_id = $1"
                " AND status = 'completed'", bad), 30, what="the retried thread's sync")
        assert synced["retry_rounds"] == 1 and synced["retry_at"] is None
        assert synced["message_count"] == len(sb.thread_json(grant, bad)["message_ids"])
        after = await pool.fetchrow("SELECT c.backfill_completed_at AS completed_at, p.* FROM"
                                    " flux_inbox_configurations c, get_sync_progress(c.id) p"
                                    " WHERE c.id = $1", cfg)
        # Never reopened: the backfill's completion (the catch-up's sign of life) stands.
        assert (after["backfill_status"], after["completed_at"]) == (
            "completed", done["completed_at"])
        assert (after["threads_completed"], after["threads_failed"],
                after["threads_retry_waiting"], after["next_retry_at"]) == (8, 0, 0, None)
        stored = await pool.fetchval("SELECT count(*) FROM flux_email_messages"
                                     " WHERE provider_thread_id = $1", bad)
        assert stored == synced["message_count"]


# --- a later backfill keeps the work not done ---------------------------------------------------

def test_a_catch_up_after_a_failure_keeps_the_failed_and_unfinished_threads(
    conn: Conn,
) -> None:
    inbox, cfg = completed_backfill(conn, ["done", "flaky", "lost", "busy"])
    fail(conn, cfg, "flaky", due_in="1 hour")
    fail(conn, cfg, "lost", due_in=None, rounds=3)      # no round left
    busy_job = scalar(conn, "SELECT queue_thread_sync(%s, 'busy')", (cfg,))
    conn.execute("UPDATE queued_threads SET status = 'processing', attempts = 2"
                 " WHERE provider_thread_id = 'busy'")
    before = {t: thread(conn, cfg, t) for t in ("flaky", "lost")}
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed'"
                 " WHERE id = %s", (cfg,))

    assert scalar(conn, "SELECT queue_catchup_backfill(%s, now() - interval '2 hours')",
                  (inbox,)) == cfg
    c = config(conn, cfg)
    assert (c["backfill_status"], c["backfill_kind"]) == ("queued", "catch_up")
    kept = {r["provider_thread_id"]: r for r in rows(
        conn, "SELECT * FROM queued_threads WHERE config_id = %s", (cfg,))}
    assert sorted(kept) == ["busy", "flaky", "lost"]     # only the completed one went
    for t in ("flaky", "lost"):                          # the record of each failure stays
        assert {k: kept[t][k] for k in ("id", "status", "error_message", "retry_rounds",
                                        "retry_at")} == {
            k: before[t][k] for k in ("id", "status", "error_message", "retry_rounds",
                                      "retry_at")}
    busy = kept["busy"]                                  # work of the new backfill: a new job
    assert (busy["status"], busy["attempts"]) == ("queued", 0)
    assert busy["queue_msg_id"] not in (None, busy_job)
    assert busy["queue_msg_id"] in {m["msg_id"] for m in queue_messages(conn, TQ)}
    p = one(conn, "SELECT * FROM get_sync_progress(%s)", (cfg,))
    assert (p["threads_queued"], p["threads_pending"], p["threads_failed"],
            p["threads_retry_waiting"]) == (3, 1, 2, 1)
    assert_stats_exact(conn, cfg)


def test_discovery_of_a_later_backfill_queues_again_the_failed_threads_it_lists(
    conn: Conn,
) -> None:
    inbox, cfg = completed_backfill(conn, ["a", "b"])
    fail(conn, cfg, "a", due_in=None, rounds=3)
    assert start_backfill(conn, inbox) == cfg
    listed = rows(conn, "SELECT * FROM queue_discovered_threads(%s, %s)", (cfg, ["a", "b"]))
    assert [r["provider_thread_id"] for r in listed] == ["a", "b"]   # b: deleted, so new
    a = thread(conn, cfg, "a")
    assert (a["status"], a["attempts"], a["retry_rounds"], a["error_message"]) == (
        "queued", 0, 0, None)
    # Within one backfill a thread that failed is not queued again by a second listing.
    fail(conn, cfg, "b", due_in="1 hour")
    assert rows(conn, "SELECT * FROM queue_discovered_threads(%s, %s)", (cfg, ["b"])) == []
    assert thread(conn, cfg, "b")["status"] == "failed"
    assert_stats_exact(conn, cfg)


# --- a failed catch-up's gap ----------------------------------------------------------------------

def test_a_new_catch_up_after_a_failed_one_starts_at_the_earlier_gap(conn: Conn) -> None:
    inbox, cfg = completed_backfill(conn, ["t1"])
    first = scalar(conn, "SELECT now() - interval '6 hours'")
    assert scalar(conn, "SELECT queue_catchup_backfill(%s, %s)", (inbox, first)) == cfg
    assert config(conn, cfg)["backfill_since"] == first
    # The catch-up fails (its attempts spent in an outage).
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed',"
                 " last_error = 'Transient: 503' WHERE id = %s", (cfg,))
    conn.execute("DELETE FROM pgmq.q_inbox_backfill_jobs")
    later = scalar(conn, "SELECT now() - interval '1 hour'")
    assert scalar(conn, "SELECT queue_catchup_backfill(%s, %s)", (inbox, later)) == cfg
    c = config(conn, cfg)
    assert (c["backfill_status"], c["backfill_kind"], c["backfill_since"]) == (
        "queued", "catch_up", first)
    [job] = queue_messages(conn, "inbox_backfill_jobs")
    assert dt.datetime.fromisoformat(job["message"]["since"]) == first
    # A gap that starts earlier than the failed one's is taken whole.
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed'"
                 " WHERE id = %s", (cfg,))
    earliest = scalar(conn, "SELECT now() - interval '9 hours'")
    scalar(conn, "SELECT queue_catchup_backfill(%s, %s)", (inbox, earliest))
    assert config(conn, cfg)["backfill_since"] == earliest
    # A completed catch-up left no gap: the next one starts where it is asked to.
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed'"
                 " WHERE id = %s", (cfg,))
    scalar(conn, "SELECT queue_catchup_backfill(%s, %s)", (inbox, later))
    assert config(conn, cfg)["backfill_since"] == later


# --- nova failures ------------------------------------------------------------------------------

def nova(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOVA_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "nova", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_nova_failures_says_where_the_retries_of_a_failed_thread_stand(
    conn: Conn, db_url: str, json_out: bool,
) -> None:
    _, cfg = completed_backfill(conn, ["flaky", "lost"])
    msg = scalar(conn, "SELECT queue_thread_sync(%s, 'flaky')", (cfg,))
    scalar(conn, "SELECT pgmq.archive('thread_sync_jobs', %s::bigint)", (msg,))
    fail(conn, cfg, "flaky", due_in="1 hour", rounds=1)
    fail(conn, cfg, "lost", due_in=None, rounds=3)
    due = thread(conn, cfg, "flaky")["retry_at"]
    if json_out:
        out = nova(db_url, "failures", "--json")
        assert out.returncode == 0, out.stderr
        [dead] = json.loads(out.stdout)
        assert dead["message"]["thread_id"] == "flaky" and dead["thread_failed"] is True
        assert dead["retry_rounds"] == 1
        assert dt.datetime.fromisoformat(dead["next_retry_at"]) == due
        return
    out = nova(db_url, "failures")
    assert out.returncode == 0, out.stderr
    assert "1 dead letter(s)" in out.stdout
    assert "2 failed thread(s), 1 waiting for a retry round, next due" in out.stdout
    [flaky] = [line for line in out.stdout.splitlines() if "thread=flaky" in line]
    assert "retry=2/3@" in flaky and "error=Transient: 503" in flaky
    [lost] = [line for line in out.stdout.splitlines() if "thread=lost" in line]
    assert "retry=none-left(3/3)" in lost
    [letter] = [line for line in out.stdout.splitlines() if line.startswith(TQ)]
    assert "retry=2/3@" in letter
