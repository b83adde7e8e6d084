"""`nova verify`: the database against SandboxNylas over HTTP, LIST calls only, through the
shared per-grant budget; --repair queues thread syncs that make a second verify clean."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from synchelp import (
    API_KEY,
    add_inbox,
    assert_db_equals_mailbox,
    make_sandbox,
    running,
    settings,
    start_backfill,
    status,
    wait_for,
)

from nova.ratelimit import ProviderBudget, budgeted_nylas
from nova.sandbox.nylas import SandboxNylas
from nova.verify import Report, find_inbox, format_report, verify_inbox

LIST_ENDPOINTS = {"list_threads", "list_messages"}


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with make_sandbox(40, seed=23) as sb:
        yield sb


async def backfilled(pool: asyncpg.Pool, db_url: str,
                     sb: SandboxNylas) -> tuple[str, uuid.UUID, uuid.UUID]:
    """An inbox whose full backfill completed and matches the sandbox mailbox."""
    grant = sb.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    config = await start_backfill(pool, inbox)
    async with running(db_url, settings(sb), threads=2):
        await wait_for(lambda: _status_is(pool, config, "completed"), 90, what="backfill")
    await assert_db_equals_mailbox(pool, sb, grant, inbox)
    return grant, inbox, config


async def _status_is(pool: asyncpg.Pool, config: uuid.UUID, wanted: str) -> bool:
    return await status(pool, config) == wanted


async def verify(pool: asyncpg.Pool, sb: SandboxNylas, inbox: uuid.UUID, *,
                 repair: bool = False) -> Report:
    """In process, built as the CLI and the processors build their provider."""
    budget = ProviderBudget(pool, rate=2000, burst=200)
    provider, client = budgeted_nylas(budget, API_KEY, sb.base_url, transient_retries=3)
    try:
        found = await find_inbox(pool, str(inbox))
        return await verify_inbox(pool, provider, found, repair=repair)
    finally:
        await provider.aclose()
        await client.aclose()


def nova_env(db_url: str, sb: SandboxNylas, **extra: str) -> dict[str, str]:
    return {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": API_KEY,
            "NYLAS_API_URI": sb.base_url, "NOVA_PROVIDER_RATE_LIMIT": "500",
            "NOVA_PROVIDER_BURST": "50", **extra}


async def nova(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`nova ...` as a user runs it (in a thread: the sandbox serves from this process)."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "nova", *args], capture_output=True, text=True,
        timeout=120, env=environment)


async def sync_queued(pool: asyncpg.Pool, db_url: str, sb: SandboxNylas,
                      config: uuid.UUID) -> None:
    """Thread workers (and the monitor) until every queued thread of the config is synced."""
    async def done() -> bool:
        left = await pool.fetchval(
            "SELECT count(*) FROM queued_threads WHERE config_id = $1 AND status <> 'completed'",
            config)
        jobs = await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs")
        return bool(left == 0 and jobs == 0)

    async with running(db_url, settings(sb), backfill=0, threads=2):
        await wait_for(done, 90, what="thread syncs")


def ids(report: Report, key: str) -> set[str]:
    return {s.id for s in report.samples.get(key, [])}


async def requests_of(pool: asyncpg.Pool, grant: str) -> int:
    return int(await pool.fetchval(
        "SELECT coalesce(sum(requests), 0) FROM provider_rate_limits WHERE grant_id = $1",
        grant))


# --------------------------------------------------------------------------- no drift
async def test_a_full_backfill_verifies_clean_through_the_budget_with_list_calls_only(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(450, seed=5) as sb:  # three pages of 200
        grant, inbox, config = await backfilled(pool, db_url, sb)
        messages = await pool.fetchval(
            "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1", inbox)
        sb.reset_stats()
        before = await requests_of(pool, grant)

        report = await verify(pool, sb, inbox)

        assert report.drift == 0, format_report(report)
        assert (report.threads.expected, report.threads.present) == (450, 450)
        assert (report.messages.expected, report.messages.present) == (messages, messages)
        assert report.changed_during_run == 0 and report.samples == {}
        # Three pages of the window, one (empty) listing of threads changed during the run.
        assert report.pages == 4 and report.requests == 4
        assert await requests_of(pool, grant) - before == 4  # every request took a slot
        stats = sb.get_stats()
        assert set(stats["requests"]) <= LIST_ENDPOINTS, stats["requests"]
        assert stats["requests"]["list_threads"] == 4

        # The same through the command: by grant id, then by email, text and JSON.
        sb.reset_stats()
        environment = nova_env(db_url, sb)
        out = await nova(environment, "verify", grant)
        assert out.returncode == 0, out.stderr
        assert "No drift." in out.stdout and "Traceback" not in out.stderr
        assert f"{'threads':<10}{450:>10}{450:>10}{0:>10}{0:>10}{0:>10}" in out.stdout
        assert "0 thread(s) with mail at or after" in out.stdout
        shown = await nova(environment, "verify", f"{grant}@example.com", "--json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["inbox_id"] == str(inbox) and data["config_id"] == str(config)
        assert data["drift"] == 0 and data["messages"]["expected"] == messages
        assert set(sb.get_stats()["requests"]) <= LIST_ENDPOINTS


async def test_429s_are_held_in_the_shared_budget_and_waited_out(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, _ = await backfilled(pool, db_url, sandbox)
    sandbox.inject_fault("rate_limit", 2, endpoint="list_threads")  # Retry-After: 1
    holds = await pool.fetchval("SELECT holds FROM provider_rate_limits WHERE grant_id = $1",
                                grant)
    report = await verify(pool, sandbox, inbox)
    assert report.drift == 0 and report.rate_limited == 2
    assert await pool.fetchval("SELECT holds FROM provider_rate_limits WHERE grant_id = $1",
                               grant) == holds + 2


# --------------------------------------------------------------------------- drift by hand
MSGS = """
SELECT t.id, t.provider_thread_id AS tid, t.last_message_at,
       array_agg(m.provider_message_id ORDER BY m.sent_at, m.provider_message_id) AS mids,
       min(m.sent_at) AS first_at
FROM flux_email_threads t JOIN flux_email_messages m ON m.thread_id = t.id
WHERE t.inbox_id = $1 GROUP BY t.id HAVING count(*) >= 2 ORDER BY t.provider_thread_id
"""


async def damage(pool: asyncpg.Pool, inbox: uuid.UUID, *,
                 extra_messages: bool) -> dict[str, set[str]]:
    """Break the stored mailbox by hand; returns what verify must report, by category."""
    rows = await pool.fetch(MSGS, inbox)
    assert len(rows) >= 9
    t1, t2, t3, t4, t5, t7, t8, t9 = rows[:8]
    t6 = max(rows[8:], key=lambda r: r["last_message_at"])  # newer than what moves in
    assert t5["first_at"] < t6["last_message_at"]
    x = "thread-gone-at-provider"
    q = pool.execute
    # message rows deleted: the message is missing, its thread's set differs
    await q("DELETE FROM flux_email_messages WHERE inbox_id = $1"
            " AND provider_message_id = ANY ($2)", inbox, [t1["mids"][0], t2["mids"][0]])
    # a thread row deleted: its messages stay, without a thread row
    await q("DELETE FROM flux_email_threads WHERE id = $1", t3["id"])
    # a thread deleted with its messages
    await q("DELETE FROM flux_email_messages WHERE thread_id = $1", t4["id"])
    await q("DELETE FROM flux_email_threads WHERE id = $1", t4["id"])
    # a message under the wrong thread
    await q("UPDATE flux_email_messages SET thread_id = $2, provider_thread_id = $3"
            " WHERE inbox_id = $1 AND provider_message_id = $4",
            inbox, t6["id"], t6["tid"], t5["mids"][0])
    # a message of a thread removed (soft-deleted)
    await q("UPDATE flux_email_messages SET deleted_at = now()"
            " WHERE inbox_id = $1 AND provider_message_id = $2", inbox, t7["mids"][0])
    # a thread whose latest date is off
    await q("UPDATE flux_email_threads SET last_message_at = last_message_at - interval '1 hour'"
            " WHERE id = $1", t9["id"])
    # a thread the provider does not have (gone there, never soft-deleted here)
    x_row = await pool.fetchval(
        "INSERT INTO flux_email_threads (inbox_id, provider_thread_id, last_message_at,"
        " message_count) VALUES ($1, $2, now() - interval '1 day', $3) RETURNING id",
        inbox, x, 1 if extra_messages else 0)
    expected = {
        "missing_threads": {t3["tid"], t4["tid"]},
        "stale_threads": {t1["tid"], t2["tid"], t5["tid"], t6["tid"], t7["tid"], t9["tid"]},
        "extra_threads": {x},
        "missing_messages": {t1["mids"][0], t2["mids"][0], t7["mids"][0], *t4["mids"]},
        "stale_messages": {t5["mids"][0], *t3["mids"]},
        "extra_messages": set(),
    }
    if extra_messages:
        add = ("INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id,"
               " provider_thread_id, sent_at) VALUES ($1, $2, $3, $4, now() - interval '2 days')")
        await q(add, inbox, x_row, "message-of-gone-thread", x)
        await q(add, inbox, t8["id"], "message-gone-at-provider", t8["tid"])
        expected["extra_messages"] = {"message-of-gone-thread", "message-gone-at-provider"}
        expected["stale_threads"].add(t8["tid"])
    return expected


def assert_reports(report: Report, expected: dict[str, set[str]]) -> None:
    for key, wanted in expected.items():
        assert ids(report, key) == wanted, (key, format_report(report))
    t, m = report.threads, report.messages
    assert (t.missing, t.stale, t.extra) == tuple(len(expected[f"{k}_threads"])
                                                  for k in ("missing", "stale", "extra"))
    assert (m.missing, m.stale, m.extra) == tuple(len(expected[f"{k}_messages"])
                                                  for k in ("missing", "stale", "extra"))
    assert t.present == t.expected - t.missing and m.present == m.expected - m.missing


async def test_verify_reports_exactly_the_rows_broken_by_hand(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, _ = await backfilled(pool, db_url, sandbox)
    total = await pool.fetchval("SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1",
                                inbox)
    expected = await damage(pool, inbox, extra_messages=True)

    report = await verify(pool, sandbox, inbox)
    assert_reports(report, expected)
    assert report.threads.expected == 40 and report.messages.expected == total
    stale = {s.id: s.detail for s in report.samples["stale_threads"]}
    assert any("last message:" in (d or "") for d in stale.values())
    text = format_report(report)
    assert "Missing threads (at the provider, not stored):" in text
    assert "Run with --repair" in text

    out = await nova(nova_env(db_url, sandbox), "verify", str(inbox), "--json")
    assert out.returncode == 3, out.stderr  # drift found, nothing repaired
    data = json.loads(out.stdout)
    assert data["threads"]["missing"] == 2 and data["messages"]["extra"] == 2
    assert data["repair"] is None
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs") == 0


async def test_repair_queues_the_affected_threads_and_a_second_verify_is_clean(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, config = await backfilled(pool, db_url, sandbox)
    expected = await damage(pool, inbox, extra_messages=False)
    affected = (expected["missing_threads"] | expected["stale_threads"]
                | expected["extra_threads"])
    sandbox.reset_stats()

    environment = nova_env(db_url, sandbox)
    out = await nova(environment, "verify", str(inbox), "--repair")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Repair: queued {len(affected)} thread sync(s) on configuration {config}" \
        in out.stdout
    queued = await pool.fetch(
        "SELECT q.provider_thread_id, q.queue_msg_id, j.msg_id FROM queued_threads q"
        " LEFT JOIN pgmq.q_thread_sync_jobs j ON j.msg_id = q.queue_msg_id"
        " WHERE q.config_id = $1 AND q.status = 'queued'", config)
    assert {r["provider_thread_id"] for r in queued} == affected
    assert all(r["msg_id"] is not None for r in queued)  # the job each row names exists
    for tid in affected:
        assert tid in out.stdout
    assert set(sandbox.get_stats()["requests"]) <= LIST_ENDPOINTS

    await sync_queued(pool, db_url, sandbox, config)
    report = await verify(pool, sandbox, inbox)
    assert report.drift == 0, format_report(report)
    assert await pool.fetchval(
        "SELECT deleted_at IS NOT NULL FROM flux_email_threads WHERE inbox_id = $1"
        " AND provider_thread_id = 'thread-gone-at-provider'", inbox)
    again = await nova(environment, "verify", str(inbox), "--repair")
    assert again.returncode == 0 and "No drift." in again.stdout
    assert "Repair: queued" not in again.stdout


async def test_mail_that_reached_the_provider_without_a_webhook_is_found_and_repaired(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, config = await backfilled(pool, db_url, sandbox)
    old = sandbox.thread_ids(grant)[-1]
    now = int(time.time())
    reply = sandbox.add_message(grant, thread_id=old, date=now - 60, send=False)
    new = sandbox.add_message(grant, date=now - 30, send=False)
    assert reply.message and new.message and new.thread

    report = await verify(pool, sandbox, inbox)
    assert ids(report, "stale_threads") == {old}
    assert ids(report, "missing_threads") == {new.thread["id"]}
    assert ids(report, "missing_messages") == {reply.message["id"], new.message["id"]}
    assert report.threads.extra == report.messages.extra == report.messages.stale == 0

    repaired = await verify(pool, sandbox, inbox, repair=True)
    assert repaired.repair is not None and repaired.repair.queued == 2
    assert repaired.repair.reasons == {"missing thread": 1, "stale thread": 1}
    await sync_queued(pool, db_url, sandbox, config)
    assert (await verify(pool, sandbox, inbox)).drift == 0
    await assert_db_equals_mailbox(pool, sandbox, grant, inbox)


async def test_mail_arriving_during_the_run_is_not_drift(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, _ = await backfilled(pool, db_url, sandbox)
    # Dated in the future of the run's start: it arrives "while verify runs".
    late = sandbox.add_message(grant, date=int(time.time()) + 30, send=False)
    reply_to = sandbox.thread_ids(grant)[-1]
    sandbox.add_message(grant, thread_id=reply_to, date=int(time.time()) + 40, send=False)
    report = await verify(pool, sandbox, inbox)
    assert report.drift == 0, format_report(report)
    assert report.changed_during_run == 2 and report.threads.expected == 39
    assert late.thread is not None
    assert "2 thread(s) with mail at or after" in format_report(report)


async def test_deletions_at_the_provider_are_extras_and_repair_queues_their_threads(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant, inbox, config = await backfilled(pool, db_url, sandbox)
    # Thread sync deletes only what was stored before its own version (store.sync_version):
    # a message stored in the same second may be newer than the listing that lacks it. The
    # backfill above ran a moment ago, so age what it stored as time would have.
    await pool.execute("UPDATE flux_email_messages SET provider_updated_at ="
                       " provider_updated_at - interval '1 minute' WHERE inbox_id = $1", inbox)
    rows = await pool.fetch(MSGS, inbox)
    one, whole = rows[0], rows[1]
    sandbox.delete_message(grant, one["mids"][0], send=False)
    for mid in whole["mids"]:  # the thread is gone with its last message
        sandbox.delete_message(grant, mid, send=False)
    gone = {one["mids"][0], *whole["mids"]}

    report = await verify(pool, sandbox, inbox, repair=True)
    assert ids(report, "stale_threads") == {one["tid"]}
    assert ids(report, "extra_threads") == {whole["tid"]}
    assert ids(report, "extra_messages") == gone
    assert report.threads.missing == report.messages.missing == report.messages.stale == 0
    assert report.repair is not None
    assert report.repair.reasons == {"stale thread": 1, "extra thread": 1}
    await sync_queued(pool, db_url, sandbox, config)
    assert await pool.fetchval(  # the provider answered 404: thread sync soft-deleted it
        "SELECT deleted_at IS NOT NULL FROM flux_email_threads WHERE inbox_id = $1"
        " AND provider_thread_id = $2", inbox, whole["tid"])

    # Thread sync soft-deletes the stored messages the provider no longer lists (and a 404
    # the thread's messages with it): no drift is left.
    after = await verify(pool, sandbox, inbox)
    assert after.drift == 0, format_report(after)
    assert await pool.fetchval(
        "SELECT count(*) FROM flux_email_messages WHERE provider_message_id = ANY($1::text[])"
        " AND deleted_at IS NOT NULL", list(gone)) == len(gone)


async def test_an_expired_page_token_restarts_the_listing_from_the_first_page(
        pool: asyncpg.Pool) -> None:
    with make_sandbox(450, seed=5) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        await pool.execute(  # a window over the whole mailbox, nothing stored
            "INSERT INTO flux_inbox_configurations (inbox_id, backfill_status, backfill_since)"
            " VALUES ($1, 'completed', now() - interval '365 days 2 hours')", inbox)
        budget = ProviderBudget(pool, rate=2000, burst=200)
        provider, client = budgeted_nylas(budget, API_KEY, sb.base_url)
        listed = provider.list_threads_page
        calls = 0

        async def expire_once(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:  # the second page token dies before it is used
                sb.expire_cursors()
            return await listed(*args, **kw)

        provider.list_threads_page = expire_once  # type: ignore[method-assign]
        try:
            report = await verify_inbox(pool, provider, await find_inbox(pool, str(inbox)))
        finally:
            await client.aclose()
    assert report.threads.expected == report.threads.missing == 450
    assert report.messages.expected == report.messages.missing > 450
    assert sb.get_stats()["statuses"].get("400") == 1
    # pages 1, 2 (refused at 3), then 1, 2, 3 again, then the listing of changes
    assert report.pages == 6


# --------------------------------------------------------------------------- errors, usage
async def test_a_refused_api_key_and_an_expired_grant_are_reported_without_a_traceback(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    bad_key = await nova(nova_env(db_url, sandbox, NYLAS_API_KEY="wrong"), "verify", str(inbox))
    assert bad_key.returncode == 1 and "Traceback" not in bad_key.stderr
    assert "API key is refused" in bad_key.stderr

    sandbox.expire_grant(grant, send=False)
    expired = await nova(nova_env(db_url, sandbox), "verify", str(inbox))
    assert expired.returncode == 1 and "Traceback" not in expired.stderr
    assert f"grant {grant} is invalid; the user must re-authenticate" in expired.stderr


async def test_inbox_lookup_settings_and_repair_without_a_configuration(
        pool: asyncpg.Pool, db_url: str, sandbox: SandboxNylas) -> None:
    grant = sandbox.grant_ids[0]
    inbox = await add_inbox(pool, grant)
    environment = nova_env(db_url, sandbox)
    unknown = await nova(environment, "verify", "nobody@example.com")
    assert unknown.returncode == 1 and "no inbox 'nobody@example.com'" in unknown.stderr
    await pool.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ('other', $1)",
                       f"{grant}@example.com")
    twice = await nova(environment, "verify", f"{grant}@example.com")
    assert twice.returncode == 2 and "names 2 inboxes" in twice.stderr
    no_key = {k: v for k, v in environment.items() if k != "NYLAS_API_KEY"}
    assert (await nova(no_key, "verify", str(inbox))).returncode == 2
    assert (await nova(environment, "verify", str(inbox), "--since", "May")).returncode == 2

    # Never backfilled: every thread is missing; --repair has no configuration to queue on.
    out = await nova(environment, "verify", grant, "--repair")
    assert out.returncode == 1, out.stdout
    assert "Missing threads" in out.stdout and "no configuration" in out.stderr
    assert "Traceback" not in out.stderr


def test_verify_is_a_subcommand_with_repair_and_json(db_url: str) -> None:
    helped = subprocess.run([sys.executable, "-m", "nova", "verify", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "NOVA_DATABASE_URL": db_url})
    assert helped.returncode == 0
    assert "--repair" in helped.stdout and "--json" in helped.stdout
