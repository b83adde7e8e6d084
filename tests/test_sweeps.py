"""Every waiting state has a way out that needs no person: a notification decided 'waiting'
while its inbox became usable, pending attachments of an inbox that ended, and backfills whose
threads wait on an inbox that will not come back. Each test puts a row where it used to stay
for ever and shows what moves it on."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from factories import add_inbox, queue_depth, start_backfill

Conn = psycopg.Connection[Any]
WQ = "nylas_webhook_notifications"


@pytest.fixture
def conn(db_url: str) -> Iterator[Conn]:
    """Plain tuple rows (the suite's `conn` gives dicts)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def scalar(conn: Conn, sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def notification(conn: Conn, grant: str, status: str = "processing") -> uuid.UUID:
    """A message.created notification for `grant`, as a worker holds it; its queue empty."""
    nid = scalar(conn, "INSERT INTO flux_webhook_notifications"
                       " (webhook_id, notification_type, grant_id, payload, status)"
                       " VALUES (%s, 'message.created', %s, %s, %s) RETURNING id",
                 f"wh-{uuid.uuid4().hex[:8]}", grant, Jsonb({"data": {"object": {}}}), status)
    conn.execute("DELETE FROM pgmq.q_nylas_webhook_notifications")
    return uuid.UUID(str(nid))


def test_waiting_decided_while_the_inbox_became_active_goes_back_to_the_queue(
        conn: Conn) -> None:
    """The worker read 'no inbox'; the inbox was added before its commit. The 'waiting'
    acknowledgement sees the inbox and releases the row in the same transaction."""
    nid = notification(conn, "g-late")
    add_inbox(conn, grant_id="g-late")  # its release skipped the row: still 'processing'
    assert queue_depth(conn, WQ) == 0
    conn.execute("SELECT acknowledge_webhook_notification(%s, 'waiting', 'no inbox yet')",
                 (nid,))
    assert scalar(conn, "SELECT status FROM flux_webhook_notifications WHERE id = %s",
                  nid) == "pending"
    assert queue_depth(conn, WQ) == 1


def test_waiting_for_an_inbox_that_is_not_active_stays_waiting(conn: Conn) -> None:
    nid = notification(conn, "g-exp")
    add_inbox(conn, grant_id="g-exp", status="auth_expired")
    conn.execute("SELECT acknowledge_webhook_notification(%s, 'waiting', 'inbox expired')",
                 (nid,))
    assert scalar(conn, "SELECT status FROM flux_webhook_notifications WHERE id = %s",
                  nid) == "waiting"
    assert queue_depth(conn, WQ) == 0


def test_the_monitor_releases_stranded_waiting_notifications(conn: Conn) -> None:
    """The instant no lock can order (the inbox inserted between the worker's check and its
    commit): the monitor's sweep finds waiting rows of active inboxes and queues them."""
    add_inbox(conn, grant_id="g-s")
    stranded = notification(conn, "g-s", status="waiting")
    other = notification(conn, "g-none", status="waiting")  # no inbox: keeps waiting
    assert scalar(conn, "SELECT nova_release_stranded_notifications()") == 1
    statuses = dict(conn.execute("SELECT id, status FROM flux_webhook_notifications"
                                 ).fetchall())
    assert statuses == {stranded: "pending", other: "waiting"}
    assert queue_depth(conn, WQ) == 1
    assert scalar(conn, "SELECT nova_release_stranded_notifications()") == 0


def attachment(conn: Conn, inbox: uuid.UUID, status: str = "pending") -> uuid.UUID:
    thread = scalar(conn, "INSERT INTO flux_email_threads (inbox_id, provider_thread_id)"
                          " VALUES (%s, %s) RETURNING id", inbox, uuid.uuid4().hex)
    message = scalar(conn, "INSERT INTO flux_email_messages (inbox_id, thread_id,"
                           " provider_message_id, provider_thread_id) VALUES (%s, %s, %s, 't')"
                           " RETURNING id", inbox, thread, uuid.uuid4().hex)
    return uuid.UUID(str(scalar(
        conn, "INSERT INTO flux_email_attachments (inbox_id, message_id, provider_attachment_id,"
              " provider_message_id, status) VALUES (%s, %s, 'a', 'm', %s) RETURNING id",
        inbox, message, status)))


def test_pending_attachments_of_a_revoked_inbox_fail_and_come_back_with_it(
        conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-att", status="auth_expired")
    parked = attachment(conn, inbox)  # parked while the inbox was expired
    done = attachment(conn, inbox, "completed")
    conn.execute("SELECT nova_set_inbox_status(%s, 'revoked')", (inbox,))
    rows = dict(conn.execute("SELECT id, status FROM flux_email_attachments").fetchall())
    assert rows == {parked: "failed", done: "completed"}
    assert scalar(conn, "SELECT error_message FROM flux_email_attachments WHERE id = %s",
                  parked) == "inbox revoked: attachment not downloaded"
    conn.execute("DELETE FROM pgmq.q_attachment_downloads")
    conn.execute("SELECT * FROM nova_reactivate_inbox(%s)", (inbox,))
    assert scalar(conn, "SELECT status FROM flux_email_attachments WHERE id = %s",
                  parked) == "pending"
    assert queue_depth(conn, "attachment_downloads") == 1  # its download queued again


def test_pending_attachments_of_a_deleted_inbox_fail(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-del")
    row = attachment(conn, inbox)
    conn.execute("UPDATE flux_inboxes SET deleted_at = now() WHERE id = %s", (inbox,))
    assert conn.execute("SELECT status, error_message FROM flux_email_attachments WHERE id = %s",
                        (row,)).fetchone() == ("failed", "inbox deleted: attachment not downloaded")


def queued_threads(conn: Conn, config: uuid.UUID, n: int) -> None:
    conn.execute("SELECT * FROM queue_discovered_threads(%s, %s)",
                 (config, [f"t{i}" for i in range(n)]))
    conn.execute("SELECT transition_to_thread_sync(%s)", (config,))


def test_a_disabled_inbox_ends_its_running_backfill(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-dis")
    config = start_backfill(conn, inbox)
    queued_threads(conn, config, 3)
    conn.execute("SELECT nova_set_inbox_status(%s, 'disabled')", (inbox,))
    assert conn.execute("SELECT DISTINCT status, error_message FROM queued_threads").fetchall() \
        == [("failed", "inbox disabled: thread not synced")]
    assert scalar(conn, "SELECT outcome FROM complete_backfill_if_done(%s)", config) \
        == "completed"
    conn.execute("SELECT nova_reactivate_inbox(%s)", (inbox,))  # the operator enables it
    # The ended threads are listed again: a catch-up from the backfill's own start.
    assert conn.execute("SELECT backfill_status, backfill_since <= now() - interval '364 days'"
                        " FROM flux_inbox_configurations WHERE id = %s",
                        (config,)).fetchone() == ("queued", True)


def test_a_backfill_parked_on_a_long_expired_inbox_ends_and_comes_back_on_reactivation(
        conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-long")
    config = start_backfill(conn, inbox)
    queued_threads(conn, config, 4)
    conn.execute("UPDATE flux_inboxes SET status = 'auth_expired', auth_expired_at = now()"
                 " - interval '4 days', status_changed_at = now() - interval '4 days'"
                 " WHERE id = %s", (inbox,))
    conn.execute("UPDATE queued_threads SET status = 'queued', queue_msg_id = NULL")  # parked
    assert conn.execute("SELECT * FROM nova_end_parked_backfills(interval '5 days')"
                        ).fetchall() == []  # not yet
    assert conn.execute("SELECT * FROM nova_end_parked_backfills(interval '3 days')"
                        ).fetchall() == [(inbox, 4)]
    assert scalar(conn, "SELECT outcome FROM complete_backfill_if_done(%s)", config) \
        == "completed"
    assert conn.execute("SELECT * FROM nova_end_parked_backfills(interval '3 days')"
                        ).fetchall() == []  # nothing left to end
    # The user re-authenticates much later (a grant.updated webhook, or the grant check):
    # the catch-up lists the backfill's whole range again, so the ended threads are synced.
    changed = conn.execute("SELECT * FROM nova_set_inbox_status(%s, 'active')",
                           (inbox,)).fetchone()
    assert changed is not None and changed[1] == "active" and changed[2] == config
    assert conn.execute("SELECT backfill_status, backfill_since <= now() - interval '364 days'"
                        " FROM flux_inbox_configurations WHERE id = %s",
                        (config,)).fetchone() == ("queued", True)


async def test_the_monitor_runs_both_sweeps(pool: Any, conn: Conn) -> None:
    from nova.completion import CompletionMonitor
    from nova.config import load_settings

    add_inbox(conn, grant_id="g-m")
    notification(conn, "g-m", status="waiting")
    expired = add_inbox(conn, grant_id="g-x")
    config = start_backfill(conn, expired)
    queued_threads(conn, config, 2)
    conn.execute("UPDATE flux_inboxes SET status = 'auth_expired', auth_expired_at = now()"
                 " - interval '2 hours' WHERE id = %s", (expired,))
    monitor = CompletionMonitor(load_settings(parked_backfill_seconds=3600,
                                              grant_recheck_seconds=0), pool=pool)
    repairs = await monitor.recover()
    assert repairs.released == 1 and [tuple(r) for r in repairs.ended] == [(expired, 2)]
