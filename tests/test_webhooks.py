"""nova.webhooks: signed sandbox webhooks through the receiver and the processor to rows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from servers import ServerThread

from nova.config import load_settings
from nova.receiver import create_app
from nova.runtime import Worker
from nova.sandbox.nylas import SandboxNylas
from nova.sandbox.nylas.webhooks import sign
from nova.webhooks import WebhookProcessor

SECRET = "webhooks-test-secret"
API_KEY = "webhooks-test-key"


@pytest.fixture
def sandbox() -> Iterator[SandboxNylas]:
    with SandboxNylas(threads=20, seed=7, api_key=API_KEY, webhook_secret=SECRET) as sb:
        yield sb


@pytest.fixture
def receiver(db_url: str, sandbox: SandboxNylas) -> Iterator[str]:
    app = create_app(load_settings(nylas_webhook_secret=SECRET), database_url=db_url)
    with ServerThread(app) as server:
        sandbox.outbox.url = f"{server.url}/webhooks/nylas"
        yield server.url


@pytest.fixture
async def inbox(pool: asyncpg.Pool, sandbox: SandboxNylas) -> uuid.UUID:
    return await pool.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, 'me@example.com') RETURNING id",
        sandbox.grant_ids[0])


def make_worker(db_url: str, pool: asyncpg.Pool, sandbox: SandboxNylas) -> Worker:
    """The processor as `python -m nova.webhooks` builds it: provider calls on the budget."""
    settings = load_settings(batch_size=4, poll_interval_ms=1000, nylas_api_key=API_KEY,
                             nylas_api_uri=sandbox.base_url, database_url=db_url)
    return Worker(WebhookProcessor(settings), settings, pool=pool, database_url=db_url)


@pytest.fixture
async def drain(db_url: str, pool: asyncpg.Pool,
                sandbox: SandboxNylas) -> AsyncIterator[Any]:
    """Process everything queued (burst mode) and return the worker's stats."""

    async def run() -> Any:
        return await make_worker(db_url, pool, sandbox).run(burst=True)

    yield run


async def notifications(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM flux_webhook_notifications ORDER BY received_at")


async def post_signed(receiver: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{receiver}/webhooks/nylas", content=body,
                              headers={"X-Nylas-Signature": sign(body, SECRET)})
    assert r.status_code == 200, r.text


def truncated_event(sandbox: SandboxNylas, subject: str, **kw: Any) -> dict[str, Any]:
    """A new sandbox message announced the way Nylas announces a large one: no body."""
    msg = sandbox.add_message(sandbox.grant_ids[0], subject=subject, send=False, **kw).message
    assert msg is not None
    slim = {k: v for k, v in msg.items() if k != "body"}
    return event("message.created.truncated", slim, int(time.time()))


def event(kind: str, obj: dict[str, Any], when: int) -> dict[str, Any]:
    return {"specversion": "1.0", "type": kind, "source": "/google/emails/realtime",
            "id": str(uuid.uuid4()), "time": when, "webhook_delivery_attempt": 1,
            "data": {"application_id": "app", "object": obj}}


async def test_signed_sandbox_webhook_becomes_a_message_row(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    created = sandbox.add_message(grant, subject="Quarterly numbers", body="<p>Attached</p>")
    await sandbox.await_webhooks()
    stats = await drain()
    assert stats.processed == 1
    msg = created.message
    assert msg is not None
    row = await pool.fetchrow("SELECT * FROM flux_email_messages WHERE provider_message_id = $1",
                              msg["id"])
    assert row is not None and row["inbox_id"] == inbox
    assert row["subject"] == "Quarterly numbers" and row["body_text"] == "Attached"
    assert row["provider_thread_id"] == msg["thread_id"]
    [note] = await notifications(pool)
    assert note["status"] == "processed" and note["attempts"] == 1
    assert note["processing_duration_ms"] is not None and note["processed_at"] is not None
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0
    metrics = await pool.fetch("SELECT * FROM get_webhook_metrics(interval '1 hour')")
    assert [(m["notification_type"], m["status"], m["total"]) for m in metrics] == [
        ("message.created", "processed", 1)]


async def test_duplicate_delivery_is_applied_once(receiver: str, sandbox: SandboxNylas,
                                                  inbox: uuid.UUID, pool: asyncpg.Pool,
                                                  drain: Any) -> None:
    sandbox.add_message(sandbox.grant_ids[0], subject="twice", duplicate=True)
    await sandbox.await_webhooks()
    await drain()
    assert len(await notifications(pool)) == 1
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 1


async def test_update_before_create_ends_with_the_newest_state(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    msg = sandbox.add_message(grant, subject="order", send=False).message
    assert msg is not None
    created = event("message.created", {**msg, "unread": True}, 1_780_000_000)
    updated = event("message.updated", {**msg, "unread": False, "starred": True}, 1_780_000_060)
    await post_signed(receiver, updated)  # arrives first
    await drain()
    await post_signed(receiver, created)  # the older event, late
    await drain()
    row = await pool.fetchrow("SELECT unread, starred FROM flux_email_messages")
    assert (row["unread"], row["starred"]) == (False, True)
    statuses = {n["notification_type"]: n["status"] for n in await notifications(pool)}
    assert statuses == {"message.created": "processed", "message.updated": "processed"}


async def test_truncated_event_fetches_the_full_message(receiver: str, sandbox: SandboxNylas,
                                                        inbox: uuid.UUID, pool: asyncpg.Pool,
                                                        drain: Any) -> None:
    note = truncated_event(sandbox, "big one", body="<p>the whole body</p>")
    sandbox.reset_stats()
    await post_signed(receiver, note)
    await drain()
    row = await pool.fetchrow("SELECT body_html, subject FROM flux_email_messages")
    assert row["body_html"] == "<p>the whole body</p>" and row["subject"] == "big one"
    assert sandbox.get_stats()["requests"].get("get_message") == 1


async def test_suffixed_types_route_by_their_base_type(receiver: str, sandbox: SandboxNylas,
                                                       inbox: uuid.UUID, pool: asyncpg.Pool,
                                                       drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    msg = sandbox.add_message(grant, subject="transformed", send=False).message
    assert msg is not None
    await post_signed(receiver, event("message.created.transformed", msg, int(time.time())))
    await drain()
    assert await pool.fetchval("SELECT subject FROM flux_email_messages") == "transformed"


async def test_message_deleted_soft_deletes(receiver: str, sandbox: SandboxNylas,
                                            inbox: uuid.UUID, pool: asyncpg.Pool,
                                            drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    msg = sandbox.add_message(grant, subject="doomed", send=False).message
    assert msg is not None
    await post_signed(receiver, event("message.created", msg, 1_780_000_000))
    await post_signed(receiver, event("message.deleted", {"id": msg["id"], "grant_id": grant,
                                                          "object": "message"}, 1_780_000_100))
    await drain()
    row = await pool.fetchrow("SELECT deleted_at FROM flux_email_messages")
    assert row["deleted_at"] is not None


async def thread_row(pool: asyncpg.Pool, thread_id: str) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT * FROM flux_email_threads WHERE provider_thread_id = $1", thread_id)


def assert_thread_matches(row: asyncpg.Record, thread: dict[str, Any]) -> None:
    """The thread row says what the provider's thread object says."""
    assert row["message_count"] == len(thread["message_ids"])
    latest = max(d for d in (thread["latest_message_received_date"],
                             thread["latest_message_sent_date"]) if d is not None)
    assert row["last_message_at"].timestamp() == latest
    assert row["first_message_at"].timestamp() == thread["earliest_message_date"]
    assert row["snippet"] == thread["snippet"] and row["unread"] == thread["unread"]
    assert sorted(row["folders"]) == sorted(thread["folders"])
    assert sorted(p["email"] for p in row["participants"]) == sorted(
        p["email"] for p in thread["participants"])


async def test_an_ordinary_reply_keeps_its_thread_current_without_thread_replied(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    thread_id = sandbox.thread_ids(grant)[0]
    first = sandbox.thread_json(grant, thread_id)
    assert first is not None
    # The thread as Nova knows it before the reply: every message, through their webhooks.
    for mid in first["message_ids"]:
        msg = sandbox.message_json(grant, mid)
        assert msg is not None
        await post_signed(receiver, event("message.created", msg, msg["date"]))
    sandbox.reset_stats()
    sandbox.add_message(grant, thread_id=thread_id, subject="Re: hello",
                        sender={"name": "Newcomer", "email": "new@example.org"})
    await sandbox.await_webhooks()
    await drain()
    thread = sandbox.thread_json(grant, thread_id)
    assert thread is not None and len(thread["message_ids"]) == len(first["message_ids"]) + 1
    assert_thread_matches(await thread_row(pool, thread_id), thread)
    # Nylas announces an ordinary reply with message.created alone, and Nova asked nothing.
    types = [n["notification_type"] for n in await notifications(pool)]
    assert "thread.replied" not in types and types[-1] == "message.created"
    assert sandbox.get_stats()["requests"] == {}


async def test_a_message_for_an_unknown_thread_leaves_a_real_thread_row(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    mutation = sandbox.add_message(grant, subject="Brand new", folders=["INBOX", "IMPORTANT"])
    await sandbox.await_webhooks()
    await drain()
    assert mutation.thread is not None
    row = await thread_row(pool, mutation.thread["id"])
    assert row["subject"] == "Brand new"
    assert_thread_matches(row, mutation.thread)


async def test_a_tracked_reply_sends_thread_replied_too_and_both_apply(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    thread_id = sandbox.thread_ids(grant)[1]
    sandbox.add_message(grant, thread_id=thread_id, subject="Re: tracked", tracked=True)
    await sandbox.await_webhooks()
    await drain()
    rows = {n["notification_type"]: n for n in await notifications(pool)}
    assert set(rows) == {"message.created", "thread.replied"}
    assert {r["status"] for r in rows.values()} == {"processed"}
    assert (await thread_row(pool, thread_id))["message_count"] == 1  # only what Nova holds


async def test_grant_lifecycle_changes_the_inbox(receiver: str, sandbox: SandboxNylas,
                                                 inbox: uuid.UUID, pool: asyncpg.Pool,
                                                 drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    sandbox.expire_grant(grant)
    await sandbox.await_webhooks()
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "auth_expired"
    # While expired, an event that needs the provider waits instead of calling it.
    note = truncated_event(sandbox, "while expired", body="<p>kept for later</p>")
    sandbox.reset_stats()
    await post_signed(receiver, note)
    await drain()
    assert sandbox.get_stats()["requests"].get("get_message") is None
    last = (await notifications(pool))[-1]
    assert last["status"] == "waiting" and "auth_expired" in last["error_message"]
    # An update that is not a re-authentication changes nothing.
    sandbox.update_grant(grant)
    await sandbox.await_webhooks()
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "auth_expired"
    # Re-authentication brings it back, and the waiting event applies.
    sandbox.revive_grant(grant)
    await sandbox.await_webhooks()
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "active"
    assert await pool.fetchval("SELECT status FROM flux_webhook_notifications WHERE id = $1",
                               last["id"]) == "processed"
    assert await pool.fetchval("SELECT body_html FROM flux_email_messages WHERE subject = $1",
                               "while expired") == "<p>kept for later</p>"
    sandbox.delete_grant(grant)
    await sandbox.await_webhooks()
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "revoked"


async def test_a_late_older_grant_event_never_overrides_a_newer_status(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        drain: Any) -> None:
    grant = sandbox.grant_ids[0]
    now = int(time.time())
    expired = event("grant.expired", {"grant_id": grant, "code": 25009}, now + 10)
    reauth = event("grant.updated", {"grant_id": grant, "code": 25027,
                                     "reauthentication_flag": True}, now + 20)
    late = event("grant.expired", {"grant_id": grant, "code": 25009}, now + 15)
    for payload in (expired, reauth, late):
        await post_signed(receiver, payload)
        await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "active"
    notes = {n["webhook_id"]: n for n in await notifications(pool)}
    assert notes[late["id"]]["status"] == "processed"  # applied: it changed nothing
    # A re-authentication that arrives before the expiry it follows wins as well.
    await post_signed(receiver, event("grant.updated", {"grant_id": grant,
                                                        "reauthentication_flag": True},
                                      now + 40))
    await drain()
    await post_signed(receiver, event("grant.expired", {"grant_id": grant}, now + 30))
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_inboxes WHERE id = $1",
                               inbox) == "active"


async def test_unknown_types_are_skipped_and_events_for_a_missing_inbox_wait_for_it(
        receiver: str, sandbox: SandboxNylas, pool: asyncpg.Pool, drain: Any) -> None:
    grant = sandbox.grant_ids[1]
    msg = sandbox.add_message(grant, subject="before the inbox", send=False).message
    assert msg is not None
    await post_signed(receiver, event("calendar.created", {"id": "c1", "grant_id": grant}, 1))
    await post_signed(receiver, event("message.created", msg, int(time.time())))
    stats = await drain()
    assert stats.processed == 2
    rows = {n["notification_type"]: n for n in await notifications(pool)}
    assert rows["calendar.created"]["status"] == "skipped"
    assert rows["message.created"]["status"] == "waiting"
    assert "no inbox" in rows["message.created"]["error_message"]
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0
    # Adding the inbox queues what waited for it.
    await pool.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ($1, 'x@y.z')", grant)
    await drain()
    assert await pool.fetchval("SELECT status FROM flux_webhook_notifications WHERE id = $1",
                               rows["message.created"]["id"]) == "processed"
    assert await pool.fetchval("SELECT subject FROM flux_email_messages") == "before the inbox"


async def test_provider_failures_retry_then_record_the_error(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    note = truncated_event(sandbox, "flaky")
    sandbox.inject_fault("error_5xx", count=10, endpoint="get_message")
    await post_signed(receiver, note)
    worker = make_worker(db_url, pool, sandbox)
    worker.policy.base_delay = 0.1
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 20
    while worker.stats.archived == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    [note] = await notifications(pool)
    assert note["status"] == "error" and note["attempts"] == 3
    assert "Transient" in note["error_message"]
    assert await pool.fetchval("SELECT count(*) FROM pgmq.a_nylas_webhook_notifications") == 1
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 0


def _spawn_webhooks(db_url: str, sandbox: SandboxNylas) -> subprocess.Popen[str]:
    env = {**os.environ, "NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": API_KEY,
           "NYLAS_API_URI": sandbox.base_url, "VISIBILITY_TIMEOUT": "2", "BATCH_SIZE": "4",
           "NOVA_SHUTDOWN_GRACE_SECONDS": "10"}
    return subprocess.Popen([sys.executable, "-m", "nova.webhooks"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_sigkill_mid_job_then_redelivery_leaves_no_duplicate(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    note = truncated_event(sandbox, "killed")
    sandbox.set_latency(1500)  # the fetch of the full message is slow: kill during it
    await post_signed(receiver, note)
    first = _spawn_webhooks(db_url, sandbox)
    deadline = time.monotonic() + 20
    while await pool.fetchval("SELECT attempts FROM flux_webhook_notifications") < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 0
    sandbox.set_latency(0)
    second = _spawn_webhooks(db_url, sandbox)
    try:
        while await pool.fetchval("SELECT status FROM flux_webhook_notifications") != "processed":
            assert time.monotonic() < deadline + 20, "not redelivered"
            await asyncio.sleep(0.05)
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=20)
    assert second.returncode == 0, out
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 1
    assert await pool.fetchval("SELECT attempts FROM flux_webhook_notifications") == 2
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0


async def test_sigterm_with_jobs_in_flight_finishes_them(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    sandbox.set_latency(800)
    for i in range(3):
        note = truncated_event(sandbox, f"inflight {i}")
        await post_signed(receiver, note)
    proc = _spawn_webhooks(db_url, sandbox)
    deadline = time.monotonic() + 20
    while await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                              " WHERE attempts > 0") < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 3
    assert await pool.fetchval("SELECT count(*) FROM flux_webhook_notifications"
                               " WHERE status = 'processed'") == 3


def test_webhooks_without_api_key_exits_with_a_clear_message(db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NYLAS_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "nova.webhooks"], capture_output=True,
                          text=True, timeout=60, env={**env, "NOVA_DATABASE_URL": db_url})
    assert proc.returncode != 0 and "NYLAS_API_KEY" in proc.stderr


# --- batches (nova.webhook_batch) ---------------------------------------------------------

def batch_worker(db_url: str, pool: asyncpg.Pool, sandbox: SandboxNylas, *, slots: int,
                 batch_max: int = 100) -> Worker:
    settings = load_settings(batch_size=slots, webhook_batch_max=batch_max,
                             poll_interval_ms=1000, nylas_api_key=API_KEY,
                             nylas_api_uri=sandbox.base_url, database_url=db_url)
    return Worker(WebhookProcessor(settings), settings, pool=pool, database_url=db_url)


async def test_a_burst_is_written_in_batches_each_event_once_in_queue_order(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    grant = sandbox.grant_ids[0]
    thread = sandbox.thread_ids(grant)[0]
    msgs = [sandbox.add_message(grant, subject=f"burst {i}", send=False,
                                thread_id=thread if i % 2 else None).message
            for i in range(10)]
    first = msgs[0]
    assert first is not None and all(m is not None for m in msgs)
    events = [event("message.created", {**m}, 1_780_000_000) for m in msgs if m]
    # the same message again in the same read, newer, then a redelivery of an event
    events.append(event("message.updated", {**first, "unread": False, "starred": True},
                        1_780_000_060))
    for note in [*events, events[3]]:
        await post_signed(receiver, note)
    worker = batch_worker(db_url, pool, sandbox, slots=16)
    stats = await worker.run(burst=True)
    processor = worker.processor
    assert isinstance(processor, WebhookProcessor) and processor.batcher is not None
    batched = processor.batcher.stats
    assert stats.processed == 11 and stats.retried == 0 and stats.lost == 0
    assert batched.batches >= 1 and batched.applied == 11 and batched.failed == 0
    rows = await pool.fetch("SELECT provider_message_id, unread, starred, thread_id"
                            " FROM flux_email_messages")
    assert sorted(r["provider_message_id"] for r in rows) == sorted(m["id"] for m in msgs if m)
    newest = next(r for r in rows if r["provider_message_id"] == first["id"])
    assert (newest["unread"], newest["starred"]) == (False, True)
    assert all(r["thread_id"] is not None for r in rows)
    notes = await notifications(pool)
    assert [(n["status"], n["attempts"]) for n in notes] == [("processed", 1)] * 11
    assert all(n["processing_duration_ms"] is not None and n["processed_at"] is not None
               for n in notes)
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0
    seen = await pool.fetchval("SELECT last_event_at FROM flux_inboxes WHERE id = $1", inbox)
    assert seen is not None and int(seen.timestamp()) == 1_780_000_060
    # the thread rows were re-derived from the stored messages
    assert await pool.fetchval("SELECT message_count FROM flux_email_threads t JOIN"
                               " flux_email_messages m ON m.thread_id = t.id"
                               " WHERE m.provider_message_id = $1", msgs[1]["id"]) == 5


async def test_an_older_event_in_the_same_batch_never_overwrites_a_newer_one(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    msg = sandbox.add_message(sandbox.grant_ids[0], subject="order", send=False).message
    assert msg is not None
    other = sandbox.add_message(sandbox.grant_ids[0], subject="other", send=False).message
    assert other is not None
    updated = event("message.updated", {**msg, "unread": False, "starred": True},
                    1_780_000_060)
    created = event("message.created", {**msg, "unread": True}, 1_780_000_000)
    for note in (updated, created, event("message.created", other, 1_780_000_000)):
        await post_signed(receiver, note)  # the newer one is queued first
    worker = batch_worker(db_url, pool, sandbox, slots=8)
    await worker.run(burst=True)
    assert isinstance(worker.processor, WebhookProcessor) and worker.processor.batcher
    assert worker.processor.batcher.stats.applied == 3
    row = await pool.fetchrow("SELECT unread, starred FROM flux_email_messages"
                              " WHERE provider_message_id = $1", msg["id"])
    assert (row["unread"], row["starred"]) == (False, True)
    assert {n["status"] for n in await notifications(pool)} == {"processed"}


async def test_a_batch_that_fails_rolls_back_and_its_jobs_run_one_by_one(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    # The first statement writing more than one message fails, once (a sequence: no rollback
    # undoes it): the batch's. Alone, each job writes one message and passes.
    await pool.execute("""
        CREATE SEQUENCE fail_seq;
        CREATE FUNCTION fail_batch() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM added) > 1 AND nextval('fail_seq') = 1 THEN
                RAISE EXCEPTION 'injected batch failure';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER fail_batch AFTER INSERT ON flux_email_messages
            REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION fail_batch();
    """)
    msgs = [sandbox.add_message(sandbox.grant_ids[0], subject=f"fail {i}", send=False).message
            for i in range(4)]
    for m in msgs:
        assert m is not None
        await post_signed(receiver, event("message.created", m, 1_780_000_000))
    worker = batch_worker(db_url, pool, sandbox, slots=8)
    stats = await worker.run(burst=True)
    assert isinstance(worker.processor, WebhookProcessor) and worker.processor.batcher
    assert worker.processor.batcher.stats.failed == 1
    assert stats.processed == 4 and stats.retried == 0
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages") == 4
    notes = await notifications(pool)
    # the rolled-back batch counted no attempt: one each, the one that wrote
    assert [(n["status"], n["attempts"]) for n in notes] == [("processed", 1)] * 4
    assert await pool.fetchval("SELECT count(*) FROM pgmq.q_nylas_webhook_notifications") == 0


async def test_other_types_run_alone_beside_a_batch_and_batch_max_1_turns_batches_off(
        receiver: str, sandbox: SandboxNylas, inbox: uuid.UUID, pool: asyncpg.Pool,
        db_url: str) -> None:
    grant = sandbox.grant_ids[0]
    msgs = [sandbox.add_message(grant, subject=f"mixed {i}", send=False).message
            for i in range(3)]
    assert all(m is not None for m in msgs)
    for m in msgs:
        assert m is not None
        await post_signed(receiver, event("message.created", m, 1_780_000_000))
    first = msgs[0]
    assert first is not None
    await post_signed(receiver, event("message.deleted", {"id": first["id"], "grant_id": grant},
                                      1_780_000_100))
    await post_signed(receiver, event("calendar.created", {"id": "c1", "grant_id": grant},
                                      1_780_000_000))
    worker = batch_worker(db_url, pool, sandbox, slots=8)
    stats = await worker.run(burst=True)
    assert stats.processed == 5
    assert isinstance(worker.processor, WebhookProcessor) and worker.processor.batcher
    assert worker.processor.batcher.stats.applied == 3
    deleted = await pool.fetchval("SELECT deleted_at FROM flux_email_messages"
                                  " WHERE provider_message_id = $1", first["id"])
    assert deleted is not None  # the delete is newer than the create, whatever ran first
    statuses = sorted(n["status"] for n in await notifications(pool))
    assert statuses == ["processed"] * 4 + ["skipped"]

    more = sandbox.add_message(grant, subject="alone", send=False).message
    assert more is not None
    for kind in ("message.created", "message.updated"):
        await post_signed(receiver, event(kind, more, 1_780_000_200))
    alone = batch_worker(db_url, pool, sandbox, slots=8, batch_max=1)
    assert (await alone.run(burst=True)).processed == 2
    assert isinstance(alone.processor, WebhookProcessor) and alone.processor.batcher
    assert alone.processor.batcher.stats.batches == 0
    assert await pool.fetchval("SELECT count(*) FROM flux_email_messages"
                               " WHERE provider_message_id = $1", more["id"]) == 1
