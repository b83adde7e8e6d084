"""Fair across inboxes, and no worker slot held for a grant's budget (issue #19).

- Thread-sync jobs carry a lane (the inbox, or its live lane) and a turn (sql/030_backfill.sql
  nova_thread_turn); the worker's read (nova.queue_sql) serves the lowest turns first, so a
  small inbox queued after a big one alternates with it instead of waiting behind it.
- A request whose grant has no slot within the caller's patience takes none (BudgetWait); the
  job goes back to the queue (runtime.Defer, no attempt counted) and the worker leaves that
  grant's jobs alone meanwhile, taking other inboxes' jobs.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from nova.config import load_settings
from nova.queue_sql import QueueSQL
from nova.ratelimit import BudgetWait, ProviderBudget, patience
from nova.runtime import Worker

from factories import add_config, add_inbox, queue_messages, rows, scalar
from runtime_procs import LOG_TABLE, Recorder

Conn = psycopg.Connection[Any]
TQ = "thread_sync_jobs"
READ = QueueSQL(TQ).read


def backfilling(conn: Conn, threads: int, grant: str | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    """An inbox in thread sync whose backfill queued ``threads`` threads."""
    inbox = add_inbox(conn, grant_id=grant)
    cfg = add_config(conn, inbox)
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync'"
                 " WHERE id = %s", (cfg,))
    conn.execute("SELECT * FROM queue_discovered_threads(%s, %s)",
                 (cfg, [f"t{n:05d}" for n in range(threads)]))
    return inbox, cfg


def read(conn: Conn, qty: int, blocked: list[str] | None = None) -> list[dict[str, Any]]:
    """The worker's read, with psycopg's placeholders."""
    query = re.sub(r"\$(\d)", r"%(p\1)s", READ)
    return rows(conn, query, {"p1": qty, "p2": 30.0, "p3": blocked or []})


def inboxes_of(jobs: list[dict[str, Any]]) -> list[str]:
    return [j["message"]["inbox_id"] for j in jobs]


def test_a_small_inbox_queued_after_a_big_one_takes_turns_with_it(conn: Conn) -> None:
    big, _ = backfilling(conn, 200)
    small, _ = backfilling(conn, 5)
    first = read(conn, 10)
    # Round robin: the small inbox's five threads are in the first ten read, not after 200.
    assert sorted(inboxes_of(first)) == sorted([str(big)] * 5 + [str(small)] * 5)
    rest = read(conn, 500)
    assert inboxes_of(rest) == [str(big)] * 195


def test_a_lane_joining_later_starts_at_the_frontier_not_at_the_back(conn: Conn) -> None:
    big, _ = backfilling(conn, 100)
    done = read(conn, 40)  # 40 of the big inbox's threads synced meanwhile
    conn.execute("DELETE FROM pgmq.q_thread_sync_jobs WHERE msg_id = ANY(%s)",
                 ([j["msg_id"] for j in done],))
    small, _ = backfilling(conn, 3)
    turns = {m["message"]["thread_id"]: m["message"]["turn"] for m in queue_messages(conn, TQ)
             if m["message"]["inbox_id"] == str(small)}
    assert sorted(turns.values()) == [40, 41, 42]  # the frontier: the big inbox's next turn
    assert sorted(inboxes_of(read(conn, 6))) == sorted([str(big)] * 3 + [str(small)] * 3)


def test_live_mail_goes_ahead_of_its_own_inboxs_backfill(conn: Conn) -> None:
    inbox, cfg = backfilling(conn, 50)
    msg = scalar(conn, "SELECT queue_thread_sync(%s, 'live-thread', 0, true)", (cfg,))
    [job] = [m for m in queue_messages(conn, TQ) if m["msg_id"] == msg]
    assert job["message"]["lane"] == f"{inbox}/live" and job["message"]["turn"] == 0
    assert msg in [j["msg_id"] for j in read(conn, 2)]  # next, not after the 50 listed first
    # Without p_live a re-queue joins the back of the inbox's own lane.
    again = scalar(conn, "SELECT queue_thread_sync(%s, 't00003')", (cfg,))
    [job] = [m for m in queue_messages(conn, TQ) if m["msg_id"] == again]
    assert job["message"]["lane"] == str(inbox) and job["message"]["turn"] == 50


def test_the_read_leaves_blocked_grants_jobs_in_the_queue(conn: Conn) -> None:
    backfilling(conn, 20, grant="busy-grant")
    other, _ = backfilling(conn, 3, grant="idle-grant")
    jobs = read(conn, 10, blocked=["busy-grant"])
    assert inboxes_of(jobs) == [str(other)] * 3
    assert len(read(conn, 50)) == 20  # nothing of the busy grant was touched


def test_a_slot_further_off_than_the_patience_is_not_taken(conn: Conn) -> None:
    acquire = "SELECT acquire_provider_budget('g', 2, 1, 0, NULL, 1, %s)"
    assert scalar(conn, acquire, (None,)) == 0  # the first slot is now
    refused = scalar(conn, acquire, (0.2,))
    assert refused < 0 and -refused == pytest.approx(0.5, abs=0.05)  # freed in 0.5 s
    assert scalar(conn, acquire, (0.2,)) < 0
    # Refusals took nothing: the next caller that waits gets the slot 0.5 s out, not later.
    assert scalar(conn, acquire, (None,)) == pytest.approx(0.5, abs=0.05)
    assert scalar(conn, "SELECT requests FROM provider_rate_limits WHERE grant_id = 'g'") == 2


async def test_budget_patience_raises_budget_wait_without_sleeping(pool: asyncpg.Pool) -> None:
    budget = ProviderBudget(pool, rate=1.0, burst=1.0)
    assert await budget.acquire("g") == 0
    started = time.monotonic()
    with patience(0.5), pytest.raises(BudgetWait) as caught:
        await budget.acquire("g")
    assert time.monotonic() - started < 0.5  # it did not wait for the slot
    assert caught.value.grant_id == "g" and 0.5 < caught.value.delay <= 1.0
    assert budget.deferred == 1
    assert await budget.acquire("g") == pytest.approx(1.0, abs=0.1)  # that slot was still free


async def test_a_deferred_grants_jobs_wait_while_other_inboxes_are_served(
        pool: asyncpg.Pool, db_url: str) -> None:
    await pool.execute(LOG_TABLE)
    send = "SELECT flux_pgmq_send('thread_sync_jobs', $1::jsonb)"
    busy = [await pool.fetchval(send, {"grant_id": "busy", "defer": 2.0, "n": n})
            for n in range(3)]
    idle = [await pool.fetchval(send, {"grant_id": "idle", "n": n}) for n in range(3)]
    worker = Worker(Recorder(), load_settings(batch_size=1, visibility_timeout=30,
                                              poll_interval_ms=2000),
                    pool=pool, database_url=db_url)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 20
    while await pool.fetchval("SELECT count(*) FROM runtime_done") < 6 \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    log = await pool.fetch("SELECT msg_id, attempt FROM runtime_log ORDER BY at")
    order = [r["msg_id"] for r in log]
    # The first busy job was deferred; the worker then took the idle grant's three jobs before
    # touching the busy grant again, and each deferral cost no attempt.
    assert order[:4] == [busy[0], *idle]
    done = {r["msg_id"] for r in await pool.fetch("SELECT msg_id FROM runtime_done")}
    assert done == set(busy) | set(idle)
    assert all(r["attempt"] == 1 for r in log if r["msg_id"] in idle)
    assert [r["attempt"] for r in log if r["msg_id"] == busy[0]] == [1, 1]


async def test_answers_no_slot_request_carries_are_reported_on_their_own(
        pool: asyncpg.Pool) -> None:
    """A deferred grant's worker makes no slot request for a while: the answers it got still
    reach the grant's measured rate, half a second later, not at its next request."""
    import httpx

    budget = ProviderBudget(pool, rate=10.0, key=lambda _request: ("g", 1.0))
    await budget.acquire("g")
    request = httpx.Request("GET", "http://provider.invalid/v3/grants/g/messages")
    for _ in range(3):
        await budget.on_response(httpx.Response(200, request=request))
    answered = "SELECT answered FROM provider_rate_limits WHERE grant_id = 'g'"
    assert await pool.fetchval(answered) == 0
    await asyncio.sleep(0.8)
    assert await pool.fetchval(answered) == 3
    await budget.on_response(httpx.Response(200, request=request))
    await budget.aclose()  # a report still waiting is dropped, never left running
    assert not [t for t in asyncio.all_tasks()
                if t.get_name() == "budget:answers" and not t.done()]
