"""`nova verify` on Gmail inboxes, against SandboxGmail over HTTP: list calls only
(threads.list, messages.list, history.list), every one through the user's quota budget; drift
planted by hand is found (missing, stale, gone) and `--repair` fixes it; changes still in the
change feed are not drift."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from synchelp import running, wait_for
from test_gmail_sync import (
    KEY,
    assert_matches_mailbox,
    backfilled,
    gmail_settings,
    make_sandbox,
    sync_changes,
)

from nova.config import Settings
from nova.ratelimit import ProviderBudget, provider_from_settings
from nova.sandbox.gmail import SandboxGmail
from nova.verify import Report, find_inbox, format_report, verify_inbox

LIST_CALLS = {"threads.list", "messages.list", "history.list"}


@pytest.fixture
def sandbox() -> Iterator[SandboxGmail]:
    with make_sandbox(40, seed=31, hostile=0.2) as sb:
        yield sb


async def verify(pool: asyncpg.Pool, s: Settings, inbox: uuid.UUID, *,
                 repair: bool = False) -> tuple[Report, ProviderBudget]:
    """In process, built as the CLI builds it: the Gmail budget and provider of the settings."""
    budget = ProviderBudget.from_settings(pool, s, "gmail")
    provider, client = provider_from_settings(s, budget, transient_retries=3, kind="gmail")
    try:
        found = await find_inbox(pool, str(inbox))
        return await verify_inbox(pool, provider, found, repair=repair), budget
    finally:
        await provider.aclose()
        await client.aclose()


def nova_env(db_url: str, sb: SandboxGmail, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NYLAS_", "GMAIL_"))}
    return {**env, "NOVA_DATABASE_URL": db_url, "NOVA_CREDENTIALS_KEY": KEY,
            "GMAIL_API_URI": sb.base_url, "GMAIL_TOKEN_URI": sb.token_uri, **extra}


async def nova(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`nova ...` as a user runs it (in a thread: the sandbox serves from this process)."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "nova", *args], capture_output=True, text=True,
        timeout=120, env=environment)


def ids(report: Report, key: str) -> set[str]:
    return {s.id for s in report.samples.get(key, [])}


async def slots_of(pool: asyncpg.Pool, email: str) -> int:
    return int(await pool.fetchval(
        "SELECT coalesce(sum(requests), 0) FROM provider_rate_limits WHERE grant_id = $1",
        "gmail:" + email.lower()))


async def test_a_backfilled_gmail_inbox_verifies_clean_with_list_calls_through_the_budget(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    sandbox.reset_stats()
    before = await slots_of(pool, email)

    report, _ = await verify(pool, s, inbox)

    assert report.drift == 0, format_report(report)
    assert report.threads.expected == report.threads.present == len(sandbox.thread_ids(email))
    assert report.messages.expected == len(sandbox.message_ids(email))
    assert report.changed_during_run == 0 and report.samples == {}
    stats = sandbox.get_stats()
    assert set(stats["requests"]) - {"token"} == LIST_CALLS, stats["requests"]  # + a refresh
    # One page each (500 a page): 10 + 5 + 2 quota units, each request a slot of the budget.
    assert stats["units"][email] == {"threads.list": 10, "messages.list": 5, "history.list": 2}
    assert report.requests == 3 and await slots_of(pool, email) - before == 3

    # The same through the command, by email, text then JSON; no Nylas settings needed.
    environment = nova_env(db_url, sandbox)
    out = await nova(environment, "verify", email)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No drift." in out.stdout and "Traceback" not in out.stderr
    assert "changed in the history after" in out.stdout
    shown = await nova(environment, "verify", str(inbox), "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["config_id"] == str(config) and data["drift"] == 0
    assert data["history_from"] is not None
    # A Gmail inbox without NOVA_CREDENTIALS_KEY (but Nylas configured): exit 2, named.
    no_key = {**{k: v for k, v in environment.items() if k != "NOVA_CREDENTIALS_KEY"},
              "NYLAS_API_KEY": "nylas-key-for-another-inbox"}
    refused = await nova(no_key, "verify", email)
    assert refused.returncode == 2 and "NOVA_CREDENTIALS_KEY is not set" in refused.stderr


THREADS = """
SELECT t.id, t.provider_thread_id AS tid,
       array_agg(m.provider_message_id ORDER BY m.provider_message_id) AS mids
FROM flux_email_threads t JOIN flux_email_messages m ON m.thread_id = t.id
WHERE t.inbox_id = $1 AND t.deleted_at IS NULL AND m.deleted_at IS NULL
GROUP BY t.id HAVING count(*) >= 2 ORDER BY t.provider_thread_id
"""


async def plant_drift(pool: asyncpg.Pool, inbox: uuid.UUID) -> dict[str, set[str]]:
    """Break the stored mailbox by hand; returns what verify must report, by category."""
    a, b, c = (await pool.fetch(THREADS, inbox))[:3]
    q = pool.execute
    # missing: a thread lost with its messages
    await q("DELETE FROM flux_email_messages WHERE thread_id = $1", a["id"])
    await q("DELETE FROM flux_email_threads WHERE id = $1", a["id"])
    # stale: one message of a thread lost
    await q("DELETE FROM flux_email_messages WHERE inbox_id = $1 AND provider_message_id = $2",
            inbox, b["mids"][0])
    # stale: a change (labels) that never arrived: the stored history ids are older
    await q("UPDATE flux_email_messages SET raw = raw"
            " || '{\"historyId\": \"1\", \"threadHistoryId\": \"1\"}'::jsonb,"
            " folders = array_remove(folders, 'INBOX') WHERE thread_id = $1", c["id"])
    # gone: a thread (and its message) stored, deleted at Gmail without a history record
    gone = await pool.fetchval(
        "INSERT INTO flux_email_threads (inbox_id, provider_thread_id, last_message_at,"
        " message_count) VALUES ($1, '1f00d00d00000001', now() - interval '1 day', 1)"
        " RETURNING id", inbox)
    await q("INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id,"
            " provider_thread_id, sent_at, raw) VALUES ($1, $2, '1f00d00d00000002',"
            " '1f00d00d00000001', now() - interval '1 day', '{\"historyId\": \"5\"}')",
            inbox, gone)
    return {
        "missing_threads": {a["tid"]},
        "stale_threads": {b["tid"], c["tid"]},
        "extra_threads": {"1f00d00d00000001"},
        "missing_messages": {*a["mids"], b["mids"][0]},
        "stale_messages": set(),
        "extra_messages": {"1f00d00d00000002"},
    }


async def synced(pool: asyncpg.Pool, db_url: str, s: Settings, config: uuid.UUID) -> None:
    """Thread workers until every queued thread of the config is synced."""
    async def done() -> bool:
        left = await pool.fetchval(
            "SELECT count(*) FROM queued_threads WHERE config_id = $1 AND status <> 'completed'",
            config)
        jobs = await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs")
        return bool(left == 0 and jobs == 0)

    async with running(db_url, s, backfill=0, threads=2):
        await wait_for(done, 90, what="thread syncs")


async def test_planted_drift_is_found_and_repair_fixes_it(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox, config = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    expected = await plant_drift(pool, inbox)
    # Changes at Gmail the change feed has not applied yet: in flight, not drift.
    old = sorted(set(sandbox.thread_ids(email)) - expected["missing_threads"]
                 - expected["stale_threads"])[0]
    sandbox.add_message(email, thread_id=old, text="not synced yet")
    born = sandbox.add_message(email, subject="not synced yet either")

    report, _ = await verify(pool, s, inbox)
    for key, wanted in expected.items():
        assert ids(report, key) == wanted, (key, format_report(report))
    t, m = report.threads, report.messages
    assert (t.missing, t.stale, t.extra) == (1, 2, 1)
    assert (m.missing, m.stale, m.extra) == (len(expected["missing_messages"]), 0, 1)
    assert report.changed_during_run == 2  # the reply's thread and the new one
    details = [x.detail or "" for x in report.samples["stale_threads"]]
    assert any(d.startswith("history id: 1 stored") for d in details), details
    assert any(d.startswith("messages in the window: ") for d in details), details
    assert "Run with --repair" in format_report(report)
    out = await nova(nova_env(db_url, sandbox), "verify", email, "--json")
    assert out.returncode == 3, out.stdout + out.stderr
    assert json.loads(out.stdout)["threads"]["drift"] == 4

    repaired = await nova(nova_env(db_url, sandbox), "verify", email, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    affected = (expected["missing_threads"] | expected["stale_threads"]
                | expected["extra_threads"])
    assert f"Repair: queued {len(affected)} thread sync(s)" in repaired.stdout
    queued = {r["provider_thread_id"] for r in await pool.fetch(
        "SELECT provider_thread_id FROM queued_threads WHERE config_id = $1"
        " AND status = 'queued'", config)}
    assert queued == affected
    await synced(pool, db_url, s, config)  # the gone thread answers 404: soft-deleted
    await sync_changes(pool, db_url, s, inbox)  # the change feed brings what was in flight
    again, _ = await verify(pool, s, inbox)
    assert again.drift == 0, format_report(again)
    assert again.changed_during_run == 0
    assert await pool.fetchval(
        "SELECT deleted_at IS NOT NULL FROM flux_email_threads WHERE inbox_id = $1"
        " AND provider_thread_id = '1f00d00d00000001'", inbox)
    await assert_matches_mailbox(pool, sandbox, inbox, email)
    assert born["threadId"] in sandbox.thread_ids(email)


async def test_verify_spends_through_the_quota_budget_and_is_never_refused(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    """Gmail allows 60 units in any 6 s here; Nova's budget for the user (300 a minute: 4.4
    units/s after a burst of 20) never sends more than 47 in 6 s. Four verifications spend 68
    units, more than one window allows, and not one call is refused: the budget made them
    wait instead."""
    inbox, _ = await backfilled(pool, db_url, sandbox, gmail_settings(sandbox))
    email = sandbox.users[0]
    tight: dict[str, Any] = {"gmail_quota_units_per_minute": 300,
                             "gmail_quota_costs": '{"watch": 10, "stop": 10}'}
    s = gmail_settings(sandbox, **tight)
    sandbox.set_quota(per_minute=60, window=6.0)
    sandbox.reset_quota()
    sandbox.reset_stats()
    before = await slots_of(pool, email)
    waited = 0.0
    for _ in range(4):
        report, budget = await verify(pool, s, inbox)
        assert report.drift == 0, format_report(report)
        waited += budget.waited
    stats = sandbox.get_stats()
    assert stats["refusals"].get(email, {}) == {}
    assert stats["units_total"][email] == 4 * 17 > 60
    assert await slots_of(pool, email) - before == 12
    assert waited > 0  # the budget held requests back: the quota was the limit


async def test_an_expired_history_is_noted_and_nothing_is_set_apart(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxGmail) -> None:
    s = gmail_settings(sandbox)
    inbox, _ = await backfilled(pool, db_url, sandbox, s)
    email = sandbox.users[0]
    added = sandbox.add_message(email, subject="in the gap")
    sandbox.expire_history(email)
    report, _ = await verify(pool, s, inbox)
    assert any("has expired at Gmail" in n for n in report.notes), report.notes
    assert ids(report, "missing_threads") == {added["threadId"]}
    assert report.changed_during_run == 0
