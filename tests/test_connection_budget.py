"""The connection budget (issue #19, item 7) and JIT off in Nova's sessions: a Nova process's
pools hold at most NOVA_DB_POOL_MAX connections whatever its BATCH_SIZE, it says its budget
once at start, and the usual fleet stays well under PostgreSQL's default max_connections."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import asyncpg
import pytest

from nova import db
from nova.config import Settings, get_settings, load_settings

FLEET = {"nova.webhooks": 1, "nova.backfill": 1, "nova.threads": 4, "nova.completion": 1,
         "nova.attachments": 1, "nova.receiver": 1}
# What each process asks its pool for: runtime.Worker BATCH_SIZE + 2, the monitor 2, the
# receiver 20.
ASKED = {"nova.webhooks": 12, "nova.backfill": 12, "nova.threads": 12, "nova.completion": 2,
         "nova.attachments": 12, "nova.receiver": 20}


@pytest.fixture
def as_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process taken for `python -m nova.threads`, NOVA_DB_POOL_MAX=3."""
    monkeypatch.setattr(db, "process_name", lambda: "nova.threads")
    monkeypatch.setenv("NOVA_DB_POOL_MAX", "3")
    monkeypatch.setattr(db, "_said", set())
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def fleet_total(settings: Settings, threads: int, *, pooled: bool = False) -> int:
    """The fleet's connections; the receiver is NOVA_RECEIVER_WORKERS processes of its own."""
    total = 0
    for process, count in {**FLEET, "nova.threads": threads,
                           "nova.receiver": settings.receiver_workers}.items():
        plan = db.connection_plan(settings, process, pooled=pooled,
                                  asked=ASKED[process])
        total += count * sum(n for n, _ in plan)
    return total


def test_the_usual_fleet_fits_well_under_max_connections_at_the_defaults() -> None:
    s = load_settings(NOVA_METRICS_PORT=9100)  # the worst case: every process serves metrics
    assert s.db_pool_max == 4
    assert fleet_total(s, threads=4) <= 60  # was 115 at peak (issue #19)
    # 32 thread workers: through a transaction pooler, whose server connections are its own
    # pool (the processes poll), or with one connection a pool and no metrics.
    small = load_settings(NOVA_DB_POOL_MAX=1)
    assert fleet_total(small, threads=32) < 100
    plan = db.connection_plan(small, "nova.threads", pooled=True, asked=12)
    assert [n for n, _ in plan] == [1]  # behind a pooler without a direct URL: no LISTEN


async def test_a_nova_process_pool_never_holds_more_than_its_cap(
        db_url: str, as_process: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nova.db")
    pool = await db.create_pool(db_url, min_size=1, max_size=12)  # BATCH_SIZE 10 + 2
    try:
        # twelve statements at once, as twelve jobs would: they share three connections
        await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.2)") for _ in range(12)))
        async with pool.acquire() as conn:
            opened = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'nova.threads'"
                " AND datname = current_database()")
        assert opened == 3
    finally:
        await pool.close()
    budget = [r.getMessage() for r in caplog.records if "connection budget" in r.getMessage()]
    assert len(budget) == 1
    assert budget[0].startswith("[Database] connection budget process=nova.threads at most 4 ")
    assert "NOVA_DB_POOL_MAX=3" in budget[0] and "LISTEN" in budget[0]


async def test_a_script_or_test_pool_is_sized_as_asked(db_url: str) -> None:
    assert db.pool_cap() is None  # pytest is not a Nova process
    pool = await db.create_pool(db_url, min_size=5, max_size=5)
    try:
        assert pool.get_size() == 5
    finally:
        await pool.close()


async def test_jit_is_off_in_a_nova_session(db_url: str) -> None:
    pool = await db.create_pool(db_url, min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SHOW jit") == "off"
    finally:
        await pool.close()


async def test_periodic_statements_turn_jit_off_per_transaction_too(db_url: str) -> None:
    """Behind a transaction pooler no start-up setting reaches the server: a connection as a
    pooler hands it over (JIT as the server has it) still runs the sweeps without JIT."""
    conn = await asyncpg.connect(db_url, server_settings={"jit": "on"})
    try:
        class One:
            def acquire(self) -> object:
                class Ctx:
                    async def __aenter__(self) -> asyncpg.Connection:
                        return conn

                    async def __aexit__(self, *exc: object) -> None:
                        return None
                return Ctx()

        async with db.periodic(One()) as c:
            assert await c.fetchval("SHOW jit") == "off"
        assert await conn.fetchval("SHOW jit") == "on"  # nothing left on the session
    finally:
        await conn.close()


def test_the_webhook_processor_with_gmail_keeps_a_pool_its_syncs_can_nest_in() -> None:
    s = load_settings(NOVA_CREDENTIALS_KEY="x" * 44)
    assert db.nests_connections(s, "nova.webhooks")
    [(size, why)] = db.connection_plan(s, "nova.webhooks", pooled=False, asked=12)[:1]
    assert size == 12 and "not capped" in why
    assert not db.nests_connections(s, "nova.threads")
