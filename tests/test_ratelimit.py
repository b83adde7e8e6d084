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
    # Each caller's slot as an absolute time: the wait returned plus the clock read right after
    # the call (same statement), so the gaps do not depend on when the calls were made.
    slot = ("SELECT w + extract(epoch FROM clock_timestamp())"
            " FROM (SELECT acquire_provider_budget($1, $2, $3) AS w OFFSET 0) s")
    pools = [await asyncpg.create_pool(db_url, min_size=4, max_size=4) for _ in range(2)]
    try:
        slots = sorted(await asyncio.gather(*(p.fetchval(slot, "g", 50.0, 1.0)
                                              for p in pools for _ in range(20))))
    finally:
        for p in pools:
            await p.close()
    gaps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    # 40 callers, 50/s, no burst: 40 distinct slots 20 ms apart, less the milliseconds between
    # the function's clock and the statement's (more on a loaded machine). Callers sharing a
    # slot would be ~0 apart.
    assert min(gaps) > 0.005
    assert slots[-1] - slots[0] == pytest.approx(0.78, abs=0.03)


@pytest.mark.parametrize(("bad", "args"), [
    ("rate and ceiling must be > 0", ("g", 0.0, 1.0)),
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


async def test_a_fixed_rate_holds_across_two_thread_workers(pool: asyncpg.Pool,
                                                            db_url: str) -> None:
    rate = 40
    with make_sandbox(80, rate_limit=rate, thread_bodies=False) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        config = await start_backfill(pool, inbox)
        # A ceiling equal to the rate: nothing to learn, the budget paces at exactly it.
        s = settings(sb, provider_rate_limit=rate, provider_burst=rate / 2,
                     provider_rate_ceiling=rate)
        started = asyncio.get_running_loop().time()
        async with running(db_url, s, threads=2):
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 60, what="completion")
        elapsed = asyncio.get_running_loop().time() - started
        stats = sb.get_stats()
    requests = sum(stats["requests"].values())
    assert requests >= 82  # a page, a round of changes, and one messages list per thread
    assert stats["statuses"].get("429", 0) <= 1, stats["statuses"]
    # Paced, not throttled: the whole run took about requests / rate.
    assert elapsed > (requests - rate / 2) / rate * 0.9


async def test_the_rate_is_learned_from_the_providers_answers(pool: asyncpg.Pool,
                                                              db_url: str) -> None:
    """The sandbox allows 6 requests/s and does not say so; Nova starts at 4/s. (A limit that
    two workers' demand exceeds on any machine: where demand stays under the limit, nothing
    is learned past it, by design.)"""
    limit = 6
    # Long enough that the rate, grown past the limit, meets a 429 before the work runs out.
    with make_sandbox(200, rate_limit=limit, thread_bodies=False) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        s = settings(sb, provider_rate_limit=4, provider_burst=2, provider_rate_ceiling=200)
        rates: list[float] = []

        async def done() -> bool:
            rate = await pool.fetchval("SELECT rate FROM provider_rate_limits"
                                       " WHERE grant_id = $1", grant)
            if rate is not None:
                rates.append(rate)
            return bool(await pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config))

        async with running(db_url, s, threads=2):
            await wait_for(done, 150, interval=0.1, what="completion")
        stats = sb.get_stats()
    row = await pool.fetchrow("SELECT * FROM provider_rate_limits WHERE grant_id = $1", grant)
    requests = sum(stats["requests"].values())
    limited = stats["statuses"].get("429", 0)
    # It grew from 4/s to about the limit, found it (a 429 or more, each recorded) and stayed
    # near it: no runaway past the limit, no collapse, few refusals.
    assert limited >= 1 and row["limited"] == limited and row["ssthresh"] is not None, (
        max(rates), dict(row), requests)
    assert 0.8 * limit <= max(rates) <= 3 * limit, rates
    assert row["rate"] >= 1.0  # the floor
    assert limited / requests < 0.1, (limited, requests)
    assert await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status ="
                               " 'completed'") == 200


async def test_a_429_becomes_a_shared_hold_and_costs_no_attempt(pool: asyncpg.Pool,
                                                                db_url: str) -> None:
    with make_sandbox(6, thread_bodies=False) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        sb.inject_fault("rate_limit", 1, endpoint="list_messages")  # Retry-After: 1
        async with running(db_url, settings(sb), threads=1):
            await wait_for(lambda: pool.fetchval(
                "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
                " WHERE id = $1", config), 30, what="completion")
        assert sb.get_stats()["statuses"]["429"] == 1
    hold = await pool.fetchrow("SELECT * FROM provider_rate_limits WHERE grant_id = $1", grant)
    assert hold["holds"] == 1 and hold["held_until"] is not None
    attempts = [r["attempts"] for r in await pool.fetch("SELECT attempts FROM queued_threads")]
    assert attempts == [1] * 6
