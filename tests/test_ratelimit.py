"""The per-grant provider budget shared through Postgres (sql/050_rate_limits.sql)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from synchelp import add_inbox, make_sandbox, running, settings, start_backfill, wait_for

from nova.ratelimit import grant_of

ACQUIRE = "SELECT acquire_provider_budget($1, $2, $3)"


async def test_burst_is_free_then_slots_are_spaced_by_the_rate(pool: asyncpg.Pool) -> None:
    waits = [await pool.fetchval(ACQUIRE, "g1", 10.0, 3.0) for _ in range(6)]
    assert waits[:3] == [0, 0, 0]
    # Reservations: each further call gets the next slot, 0.1 s after the previous one.
    assert waits[3] == pytest.approx(0.1, abs=0.03)
    assert waits[4] == pytest.approx(0.2, abs=0.03)
    assert waits[5] == pytest.approx(0.3, abs=0.03)
    assert await pool.fetchval(ACQUIRE, "other-grant", 10.0, 3.0) == 0  # grants are separate
    assert await pool.fetchval("SELECT requests FROM provider_rate_limits WHERE grant_id = 'g1'") \
        == 6


async def test_a_hold_binds_every_caller_until_it_ends(pool: asyncpg.Pool) -> None:
    until = datetime.now(UTC) + timedelta(seconds=2)
    await pool.execute("SELECT hold_provider_grant($1, $2)", "g1", until)
    wait = await pool.fetchval(ACQUIRE, "g1", 100.0, 10.0)
    assert wait == pytest.approx(2.0, abs=0.1)
    # After the hold the grant resumes at its rate, without a burst.
    assert await pool.fetchval(ACQUIRE, "g1", 100.0, 10.0) == pytest.approx(2.01, abs=0.1)
    # An earlier hold never shortens a later one.
    await pool.execute("SELECT hold_provider_grant($1, now())", "g1")
    assert await pool.fetchval("SELECT held_until FROM provider_rate_limits") == until


async def test_concurrent_callers_never_share_a_slot(db_url: str) -> None:
    pools = [await asyncpg.create_pool(db_url, min_size=4, max_size=4) for _ in range(2)]
    try:
        waits = await asyncio.gather(*(p.fetchval(ACQUIRE, "g", 50.0, 1.0)
                                       for p in pools for _ in range(20)))
    finally:
        for p in pools:
            await p.close()
    slots = sorted(waits)
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    # 40 callers, 50/s: slots 20 ms apart (less the time between the calls themselves).
    assert slots[0] == 0 and slots[-1] == pytest.approx(0.78, abs=0.1)
    assert min(gaps) > 0.01


@pytest.mark.parametrize(("bad", "args"), [
    ("rate must be > 0", ("g", 0.0, 1.0)),
    ("burst >= 1", ("g", 1.0, 0.5)),
    ("grant id is required", ("", 1.0, 1.0)),
])
async def test_bad_arguments_are_refused(pool: asyncpg.Pool, bad: str,
                                         args: tuple[str, float, float]) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError, match=bad):
        await pool.fetchval(ACQUIRE, *args)


def test_grant_is_read_from_grant_scoped_paths_only() -> None:
    assert grant_of("/v3/grants/abc-1/threads") == "abc-1"
    assert grant_of("/v3/grants/a%2Fb/messages/m?x=1") == "a/b"
    assert grant_of("/v3/grants/abc") is None  # the grant object itself: application scoped
    assert grant_of("/v3/webhooks") is None


async def test_rate_limit_holds_across_two_thread_workers(pool: asyncpg.Pool,
                                                          db_url: str) -> None:
    rate = 40
    with make_sandbox(80, rate_limit=rate) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        s = settings(sb, provider_rate_limit=rate, provider_burst=rate / 2)
        started = asyncio.get_running_loop().time()
        async with running(db_url, s, threads=2):
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 60, what="completion")
        elapsed = asyncio.get_running_loop().time() - started
        stats = sb.get_stats()
    requests = sum(stats["requests"].values())
    assert requests >= 161  # a page, then a thread and its messages for each of 80 threads
    assert stats["statuses"].get("429", 0) <= 1, stats["statuses"]
    # Paced, not throttled: the whole run took about requests / rate.
    assert elapsed > (requests - rate / 2) / rate * 0.9


async def test_a_429_becomes_a_shared_hold_and_costs_no_attempt(pool: asyncpg.Pool,
                                                                db_url: str) -> None:
    with make_sandbox(6) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        sb.inject_fault("rate_limit", 1, endpoint="get_thread")  # Retry-After: 1
        async with running(db_url, settings(sb), threads=1):
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 30, what="completion")
        assert sb.get_stats()["statuses"]["429"] == 1
    hold = await pool.fetchrow("SELECT * FROM provider_rate_limits WHERE grant_id = $1", grant)
    assert hold["holds"] == 1 and hold["held_until"] is not None
    attempts = [r["attempts"] for r in await pool.fetch("SELECT attempts FROM queued_threads")]
    assert attempts == [1] * 6
