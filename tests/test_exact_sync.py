"""Exact under the real Nylas API and real mail: hostile strings, partial payloads, threads that
move during discovery, ambiguous 401s and one version clock -- against real Postgres and the
sandbox over HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from synchelp import (
    add_inbox,
    assert_db_equals_mailbox,
    env,
    make_sandbox,
    running,
    settings,
    spawn,
    start_backfill,
    stop,
    wait_for,
)

from nova import store
from nova.backfill import BackfillProcessor
from nova.config import load_settings
from nova.providers.nylas import parse_message
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.threads import ThreadSyncProcessor
from nova.webhooks import WebhookProcessor

NUL = "\u0000"


async def completed(pool: asyncpg.Pool, config: uuid.UUID) -> bool:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "SELECT backfill_status = 'completed' FROM flux_inbox_configurations WHERE id = $1",
        config)


# ------------------------------------------------------------------ the whole mailbox
async def test_hostile_mailbox_with_replies_during_discovery_is_stored_whole(
        pool: asyncpg.Pool, db_url: str) -> None:
    """Every thread and message of a mailbox full of NULs, lone surrogates and hostile names,
    with replies moving deep threads to page one while discovery pages: nothing failed,
    nothing missing -- and no webhook told Nova about the replies."""
    with make_sandbox(1000, hostile=0.25, latency_ms=40) as sb:
        grant = sb.grant_ids[0]
        hostile = sb.hostile_threads(grant)
        assert len(hostile) == 250
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        async with running(db_url, settings(sb), threads=2):
            await wait_for(lambda: pool.fetchval(
                "SELECT checkpoint_pages_done >= 1 FROM flux_inbox_configurations"
                " WHERE id = $1", config), 30, interval=0.01, what="page 1")
            moved = sb.reply_to_random_threads(grant, 25, older_than_rank=600, seed=5)
            assert len(moved) == 25 and set(moved) <= set(sb.thread_ids(grant)[:25])
            await wait_for(lambda: completed(pool, config), 120, what="completion")
        messages = await assert_db_equals_mailbox(pool, sb, grant, inbox)
        failed = await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status <> "
                                     "'completed'")
        assert failed == 0
        # The moved threads hold their replies; their rows say what the provider says.
        for tid in moved:
            thread = sb.thread_json(grant, tid)
            assert thread is not None
            row = await pool.fetchrow("SELECT message_count, last_message_at FROM"
                                      " flux_email_threads WHERE provider_thread_id = $1", tid)
            assert row["message_count"] == len(thread["message_ids"])
        # Hostile text is stored less only what Postgres cannot hold.
        nul_subject = next(t for t, kinds in hostile.items() if "nul" in kinds)
        want = sb.thread_json(grant, nul_subject)
        assert want is not None and NUL in want["subject"]
        stored = await pool.fetchval("SELECT subject FROM flux_email_threads"
                                     " WHERE provider_thread_id = $1", nul_subject)
        assert stored == want["subject"].replace(NUL, "")
        surrogate = [t for t, kinds in hostile.items() if "lone_surrogate" in kinds]
        assert surrogate and await pool.fetchval(
            "SELECT count(*) FROM flux_email_messages WHERE provider_thread_id = ANY($1)"
            " AND raw::text LIKE '%\ufffd%'", surrogate) > 0
        names = await pool.fetchval("SELECT count(*) FROM flux_email_attachments"
                                    " WHERE original_filename LIKE '%..%'")
        assert names > 0
        print(f"hostile backfill: threads={len(sb.thread_ids(grant))} messages={messages} "
              f"hostile={len(hostile)} moved={len(moved)} failed={failed}")


async def test_nul_in_every_string_field_of_a_webhook_message(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(5) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        obj: dict[str, Any] = {
            "id": f"m{NUL}1", "grant_id": grant, "object": "message", "thread_id": f"t{NUL}1",
            "subject": f"Sub{NUL}ject\ud800", "snippet": f"sn{NUL}ip", "date": 1_780_000_000,
            "body": f"<p>bo{NUL}dy</p>", "folders": [f"IN{NUL}BOX"], "unread": True,
            "from": [{"name": f"A{NUL}nn", "email": f"ann{NUL}@x.org"}],
            "to": [{"name": NUL, "email": "me@x.org"}], "cc": [], "bcc": [], "reply_to": [],
            "headers": [{"name": f"X-{NUL}", "value": f"v{NUL}"}],
            "attachments": [{"id": f"a{NUL}1", "filename": f"../{NUL}evil.pdf",
                             "content_type": f"application/pdf{NUL}", "size": 10,
                             "content_id": f"c{NUL}id", "is_inline": False}],
        }
        # The receiver stores payloads cleaned; the model cleans whatever it is given.
        message = parse_message(obj, grant, partial=True)
        async with pool.acquire() as conn:
            written = await store.upsert_message(conn, inbox, message,
                                                 datetime.fromtimestamp(1_780_000_000, UTC))
        assert written is not None
        m = await pool.fetchrow("SELECT * FROM flux_email_messages")
        assert (m["provider_message_id"], m["subject"], m["snippet"]) == (
            "m1", "Subject\ufffd", "snip")
        assert m["from_addresses"] == [{"name": "Ann", "email": "ann@x.org"}]
        assert m["folders"] == ["INBOX"] and m["body_text"] == "body"
        assert m["headers"] == [{"name": "X-", "value": "v"}]
        a = await pool.fetchrow("SELECT * FROM flux_email_attachments")
        assert (a["original_filename"], a["content_type"], a["content_id"]) == (
            "../evil.pdf", "application/pdf", "cid")
        t = await pool.fetchrow("SELECT * FROM flux_email_threads")
        assert t["provider_thread_id"] == "t1" and t["subject"] == "Subject\ufffd"


# ------------------------------------------------------------------ partial payloads
def webhook_settings(sb: SandboxNylas) -> Any:
    return load_settings(nylas_api_key=sb.api_key, nylas_api_uri=sb.base_url, batch_size=4,
                         poll_interval_ms=500)


async def deliver(pool: asyncpg.Pool, sb: SandboxNylas, notes: list[Any]) -> None:
    """Store notifications as the receiver does, then run the processor until idle."""
    for note in notes:
        await pool.execute(
            "SELECT * FROM queue_nylas_webhook_notification($1, $2, $3)",
            note.payload["id"], note.payload["type"], note.payload)
    s = webhook_settings(sb)
    await Worker(WebhookProcessor(s), s, pool=pool).run(burst=True)


async def test_partial_payloads_never_blank_stored_fields(pool: asyncpg.Pool) -> None:
    with make_sandbox(5, message_variant="transformed") as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        mid = sb.thread_json(grant, sb.thread_ids(grant)[0])["message_ids"][0]  # type: ignore
        full = sb.message_json(grant, mid)
        assert full is not None
        async with pool.acquire() as conn:  # the message as a sync stored it
            await store.upsert_message(conn, inbox, parse_message(full, grant),
                                       datetime.fromtimestamp(1_700_000_000, UTC))
        before = await pool.fetchrow("SELECT * FROM flux_email_messages")
        # A .transformed update carries only the chosen fields: the rest must stay.
        update = sb.update_message(grant, mid, unread=not full["unread"], folders=["Archive"],
                                   send=False)
        note = update.notifications[0]
        assert note.type == "message.updated.transformed" and "body" not in note.payload[
            "data"]["object"] and "folders" not in note.payload["data"]["object"]
        await deliver(pool, sb, [note])
        after = await pool.fetchrow("SELECT * FROM flux_email_messages")
        assert after["unread"] is (not full["unread"])  # present: applied
        for column in ("body_html", "body_text", "snippet", "to_addresses", "cc_addresses",
                       "folders", "headers", "has_attachments"):
            assert after[column] == before[column], column  # absent: kept
        status = await pool.fetchval("SELECT status FROM flux_webhook_notifications")
        assert status == "processed"


async def test_metadata_events_are_applied_and_cleaned_bodies_kept_apart(
        pool: asyncpg.Pool) -> None:
    with make_sandbox(5, message_variant="metadata") as sb:
        grant = next(g for g in sb.grant_ids if sb.mailbox.grants[g].provider == "google")
        inbox = await add_inbox(pool, grant)
        created = sb.add_message(grant, subject="metadata only", body="<p>secret body</p>",
                                 send=False)
        note = created.notifications[0]
        assert note.type == "message.created.metadata"
        await deliver(pool, sb, [note])
        row = await pool.fetchrow("SELECT * FROM flux_email_messages")
        assert row["subject"] == "metadata only" and row["body_html"] is None
        assert row["headers"] and row["snippet"] is None
        # The same message, whole, from a sync: the body arrives; a later .cleaned event
        # stores its markdown apart and leaves the HTML alone.
        assert created.message is not None
        async with pool.acquire() as conn:
            await store.upsert_message(conn, inbox, parse_message(
                sb.message_json(grant, created.message["id"]) or {}, grant),
                datetime.fromtimestamp(created.message["date"], UTC))
        sb.set_message_variant("cleaned")
        cleaned = sb.add_message(grant, subject="clean me", body="<p>Hello <b>you</b></p>",
                                 send=False)
        assert cleaned.notifications[0].type == "message.created.cleaned"
        assert cleaned.message is not None
        async with pool.acquire() as conn:
            await store.upsert_message(conn, inbox, parse_message(
                sb.message_json(grant, cleaned.message["id"]) or {}, grant),
                datetime.fromtimestamp(cleaned.message["date"] - 10, UTC))
        await deliver(pool, sb, cleaned.notifications)
        row = await pool.fetchrow("SELECT * FROM flux_email_messages WHERE subject = 'clean me'")
        assert row["body_html"] == "<p>Hello <b>you</b></p>"
        assert row["body_cleaned"] and "<" not in row["body_cleaned"]
        assert "Hello" in row["body_cleaned"]


# ------------------------------------------------------------------ ambiguous 401
async def test_a_401_for_a_valid_grant_is_retried_not_an_expiry(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(6, thread_bodies=False) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        sb.inject_fault("unauthorized", 2, endpoint="list_messages")
        async with running(db_url, settings(sb), threads=1,
                           thread_kw={"retry_base_delay": 0.02, "retry_max_delay": 0.05}):
            await wait_for(lambda: completed(pool, config), 30, what="completion")
        assert await pool.fetchval("SELECT status FROM flux_inboxes") == "active"
        assert await pool.fetchval("SELECT count(*) FROM queued_threads WHERE status ="
                                   " 'completed'") == 6
        assert sb.get_stats()["requests"]["get_grant"] == 2  # each 401 confirmed once
        await assert_db_equals_mailbox(pool, sb, grant, inbox)


async def test_an_expired_grant_confirmed_parks_threads_and_expires_the_inbox(
        pool: asyncpg.Pool, db_url: str) -> None:
    with make_sandbox(6, thread_bodies=False) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        sb.expire_grant(grant, send=False)
        await Worker(ThreadSyncProcessor(s), s, pool=pool).run(burst=True)
        assert await pool.fetchval("SELECT status FROM flux_inboxes") == "auth_expired"
        rows = await pool.fetch("SELECT status, queue_msg_id FROM queued_threads")
        assert {r["status"] for r in rows} == {"queued"}
        assert all(r["queue_msg_id"] is None for r in rows)
        assert await pool.fetchval("SELECT count(*) FROM pgmq.a_thread_sync_jobs") == 0
        assert not await completed(pool, config)


async def test_a_refused_api_key_stops_the_processor_without_costing_attempts(
        pool: asyncpg.Pool, db_url: str, tmp_path: Path) -> None:
    with make_sandbox(4, thread_bodies=False) as sb:
        inbox = await add_inbox(pool, sb.grant_ids[0])
        await start_backfill(pool, inbox)
        s = settings(sb)
        await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
        log = tmp_path / "threads.log"
        proc = spawn("nova.threads", env(db_url, sb, NYLAS_API_KEY="not-the-key"), log)
        try:
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            stop(proc)
        assert code == 2
        text = log.read_text()
        assert "refused the application's credentials" in text and "Traceback" not in text
        rows = await pool.fetch("SELECT status, attempts FROM queued_threads")
        assert {r["status"] for r in rows} <= {"queued", "processing"}
        assert await pool.fetchval("SELECT count(*) FROM pgmq.a_thread_sync_jobs") == 0
        assert await pool.fetchval("SELECT max(read_ct) FROM pgmq.q_thread_sync_jobs") <= 1
        assert await pool.fetchval("SELECT status FROM flux_inboxes") == "active"


# ------------------------------------------------------------------ one version clock
async def test_a_change_in_the_same_second_as_a_sync_fetch_is_applied(
        pool: asyncpg.Pool) -> None:
    """A sync reads at t (microseconds); a webhook about a change made just after, in the same
    second, carries floor(t) as its time. It must win over what the sync read."""
    inbox = uuid.uuid4()
    await pool.execute("INSERT INTO flux_inboxes (id, grant_id, email) VALUES ($1, 'g', 'e')",
                       inbox)
    fetched_at = datetime.fromtimestamp(1_780_000_000.73, UTC)
    version = store.sync_version(fetched_at)
    assert version == datetime.fromtimestamp(1_780_000_000 - store.VERSION_SKEW_SECONDS, UTC)
    base = {"id": "m1", "thread_id": "t1", "subject": "s", "unread": True, "date": 1}
    async with pool.acquire() as conn:
        await store.upsert_message(conn, inbox, parse_message(base, "g"), version)
        event_time = datetime.fromtimestamp(int(fetched_at.timestamp()), UTC)
        assert await store.upsert_message(
            conn, inbox, parse_message({**base, "unread": False}, "g", partial=True),
            event_time) is not None
    assert await pool.fetchval("SELECT unread FROM flux_email_messages") is False


def test_sync_version_is_whole_seconds_before_the_fetch() -> None:
    now = datetime.now(UTC)
    v = store.sync_version(now)
    assert v.microsecond == 0 and v <= now
    assert (now - v).total_seconds() < store.VERSION_SKEW_SECONDS + 1
    assert time.time() >= v.timestamp()


@pytest.mark.parametrize("variant", [None, "transformed"])
async def test_thread_row_is_current_after_a_reply_webhook_of_any_variant(
        pool: asyncpg.Pool, variant: str | None) -> None:
    with make_sandbox(5, message_variant=variant) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        tid = sb.thread_ids(grant)[0]
        thread = sb.thread_json(grant, tid)
        assert thread is not None
        async with pool.acquire() as conn:
            await store.upsert_messages(conn, inbox, await store.prepare_messages([
                parse_message(sb.message_json(grant, m) or {}, grant)
                for m in thread["message_ids"]]), datetime.fromtimestamp(1_700_000_000, UTC))
        reply = sb.add_message(grant, thread_id=tid, send=False, unread=True)
        await deliver(pool, sb, reply.notifications)
        row = await pool.fetchrow("SELECT * FROM flux_email_threads")
        assert reply.thread is not None and reply.message is not None
        assert row["message_count"] == len(reply.thread["message_ids"])
        assert row["last_message_at"].timestamp() == reply.message["date"]
        assert row["unread"] is True


async def test_a_message_webhook_during_a_backfill_queues_a_thread_it_has_not_listed(
        pool: asyncpg.Pool) -> None:
    with make_sandbox(5) as sb:
        grant = sb.grant_ids[0]
        inbox = await add_inbox(pool, grant)
        config = await start_backfill(pool, inbox)  # queued: discovery has listed nothing
        known = sb.thread_ids(grant)[0]
        await pool.execute("SELECT queue_thread_sync($1, $2)", config, known)
        reply = sb.add_message(grant, thread_id=sb.thread_ids(grant)[3], send=False)
        again = sb.add_message(grant, thread_id=known, send=False)
        await deliver(pool, sb, [*reply.notifications, *again.notifications])
        rows = {r["provider_thread_id"]: r for r in await pool.fetch(
            "SELECT provider_thread_id, status, queue_msg_id FROM queued_threads")}
        assert reply.thread is not None and set(rows) == {known, reply.thread["id"]}
        assert rows[reply.thread["id"]]["status"] == "queued"
        assert await pool.fetchval("SELECT count(*) FROM pgmq.q_thread_sync_jobs") == 2
