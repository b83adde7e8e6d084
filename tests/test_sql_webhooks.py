"""Webhook intake: queue_nylas_webhook_notification, its enqueue trigger,
acknowledge_webhook_notification and get_webhook_metrics."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from factories import (
    add_inbox,
    assert_rejected,
    fingerprint,
    one,
    queue_depth,
    queue_messages,
    rows,
    scalar,
)

Conn = psycopg.Connection[Any]
WQ = "nylas_webhook_notifications"


def payload(grant: str | None = "grant-1", obj_id: str | None = "msg-1",
            time: Any = 1_700_000_000) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if grant is not None:
        obj["grant_id"] = grant
    if obj_id is not None:
        obj["id"] = obj_id
    body: dict[str, Any] = {"specversion": "1.0", "type": "message.created",
                            "data": {"object": obj}}
    if time is not None:
        body["time"] = time
    return body


def deliver(conn: Conn, webhook_id: str, body: dict[str, Any] | None = None,
            type_: str = "message.created", **kw: Any) -> dict[str, Any]:
    return one(
        conn,
        "SELECT * FROM queue_nylas_webhook_notification(%s, %s, %s, %s, %s, %s)",
        (webhook_id, type_, Jsonb(body if body is not None else payload()),
         kw.get("grant_id"), kw.get("event_time"), kw.get("object_id")),
    )


def stored(conn: Conn, notification_id: Any) -> dict[str, Any]:
    return one(conn, "SELECT * FROM flux_webhook_notifications WHERE id = %s", (notification_id,))


def ack(conn: Conn, notification_id: Any, status: str | None = "processed",
        error: str | None = None, duration: int | None = None) -> Any:
    return scalar(conn, "SELECT acknowledge_webhook_notification(%s, %s, %s, %s)",
                  (notification_id, status, error, duration))


# --- queue_nylas_webhook_notification -----------------------------------------------------------

def test_new_webhook_is_stored_with_fields_taken_from_the_payload(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="grant-1")
    body = payload(grant="grant-1", obj_id="msg-9", time=1_700_000_000)
    got = deliver(conn, "wh-1", body)
    assert got["is_new"] is True
    row = stored(conn, got["notification_id"])
    assert row["webhook_id"] == "wh-1"
    assert row["notification_type"] == "message.created"
    assert row["provider"] == "nylas"
    assert row["grant_id"] == "grant-1"
    assert row["inbox_id"] == inbox
    assert row["object_id"] == "msg-9"
    assert row["payload"] == body
    assert row["event_time"] == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert row["status"] == "pending" and row["attempts"] == 0
    assert row["processed_at"] is None and row["error_message"] is None


def test_new_webhook_is_queued_once_with_its_identifiers(conn: Conn) -> None:
    got = deliver(conn, "wh-1", payload(grant="grant-7"), type_="thread.replied")
    [msg] = queue_messages(conn, WQ)
    assert msg["message"] == {"notification_id": str(got["notification_id"]),
                              "webhook_id": "wh-1", "type": "thread.replied",
                              "grant_id": "grant-7"}
    assert msg["read_ct"] == 0
    # Readable through the wrapper right away.
    [read] = rows(conn, "SELECT * FROM flux_pgmq_read(%s, 30, 10)", (WQ,))
    assert read["msg_id"] == msg["msg_id"]


def test_explicit_arguments_win_over_the_payload(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="explicit-grant")
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    got = deliver(conn, "wh-2", payload(grant="payload-grant", obj_id="payload-obj"),
                  grant_id="explicit-grant", event_time=when, object_id="explicit-obj")
    row = stored(conn, got["notification_id"])
    assert (row["grant_id"], row["inbox_id"], row["object_id"], row["event_time"]) == (
        "explicit-grant", inbox, "explicit-obj", when)
    assert queue_messages(conn, WQ)[0]["message"]["grant_id"] == "explicit-grant"


def test_fractional_payload_time_is_kept(conn: Conn) -> None:
    got = deliver(conn, "wh-f", payload(time=1_700_000_000.25))
    expected = dt.datetime.fromtimestamp(1_700_000_000, dt.UTC) + dt.timedelta(milliseconds=250)
    assert stored(conn, got["notification_id"])["event_time"] == expected


def test_unknown_grant_is_stored_without_an_inbox(conn: Conn) -> None:
    add_inbox(conn, grant_id="someone-else")
    got = deliver(conn, "wh-3", payload(grant="nobody"))
    row = stored(conn, got["notification_id"])
    assert row["grant_id"] == "nobody" and row["inbox_id"] is None
    assert queue_depth(conn, WQ) == 1


def test_a_gmail_inbox_with_the_same_grant_is_not_linked(conn: Conn) -> None:
    conn.execute("INSERT INTO flux_inboxes (provider, grant_id, email)"
                 " VALUES ('gmail', 'shared', 'g@example.com')")
    got = deliver(conn, "wh-4", payload(grant="shared"))
    assert stored(conn, got["notification_id"])["inbox_id"] is None


@pytest.mark.parametrize(
    "body",
    [{"type": "grant.expired"}, {"data": {"object": "not-an-object"}}, {"data": []},
     {"data": {"object": None}}],
    ids=["no-data", "object-is-string", "data-is-array", "object-is-null"],
)
def test_payload_without_an_object_stores_null_grant_and_object(
    conn: Conn, body: dict[str, Any],
) -> None:
    got = deliver(conn, "wh-5", body, type_="grant.expired")
    row = stored(conn, got["notification_id"])
    assert row["grant_id"] is None and row["object_id"] is None and row["inbox_id"] is None
    assert row["payload"] == body
    assert queue_messages(conn, WQ)[0]["message"]["grant_id"] is None


def test_non_numeric_payload_time_leaves_event_time_null(conn: Conn) -> None:
    got = deliver(conn, "wh-6", payload(time="2024-01-01T00:00:00Z"))
    assert stored(conn, got["notification_id"])["event_time"] is None
    got = deliver(conn, "wh-7", payload(time=None))
    assert stored(conn, got["notification_id"])["event_time"] is None


def test_same_webhook_id_twice_is_stored_once_and_queued_once(conn: Conn) -> None:
    first = deliver(conn, "wh-dup", payload(obj_id="first"))
    second = deliver(conn, "wh-dup", payload(obj_id="second"), type_="message.updated")
    assert first["is_new"] is True and second["is_new"] is False
    assert second["notification_id"] == first["notification_id"]
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 1
    assert queue_depth(conn, WQ) == 1
    # The redelivery changes nothing about the stored row.
    row = stored(conn, first["notification_id"])
    assert row["object_id"] == "first" and row["notification_type"] == "message.created"


def test_redelivery_after_processing_is_neither_requeued_nor_reset(conn: Conn) -> None:
    first = deliver(conn, "wh-done")
    scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (WQ, queue_messages(conn, WQ)[0]["msg_id"]))
    ack(conn, first["notification_id"], "processed", duration=12)
    again = deliver(conn, "wh-done")
    assert again == {"notification_id": first["notification_id"], "is_new": False}
    assert queue_depth(conn, WQ) == 0
    assert stored(conn, first["notification_id"])["status"] == "processed"


def test_distinct_webhook_ids_each_get_a_row_and_a_message(conn: Conn) -> None:
    ids = [deliver(conn, f"wh-{i}")["notification_id"] for i in range(5)]
    assert len(set(ids)) == 5
    queued = [m["message"]["notification_id"] for m in queue_messages(conn, WQ)]
    assert queued == [str(i) for i in ids]


@pytest.mark.parametrize(
    ("webhook_id", "type_", "body", "fragment"),
    [
        (None, "message.created", {"a": 1}, "webhook id is required"),
        ("", "message.created", {"a": 1}, "webhook id is required"),
        ("   ", "message.created", {"a": 1}, "webhook id is required"),
        ("wh", None, {"a": 1}, "notification type is required"),
        ("wh", "", {"a": 1}, "notification type is required"),
        ("wh", "  ", {"a": 1}, "notification type is required"),
        ("wh", "message.created", None, "payload must be a JSON object"),
        ("wh", "message.created", [1], "payload must be a JSON object"),
        ("wh", "message.created", "str", "payload must be a JSON object"),
    ],
    ids=["null-id", "empty-id", "blank-id", "null-type", "empty-type", "blank-type",
         "null-payload", "array-payload", "string-payload"],
)
def test_bad_delivery_is_rejected_and_nothing_is_stored_or_queued(
    conn: Conn, webhook_id: str | None, type_: str | None, body: Any, fragment: str,
) -> None:
    add_inbox(conn, grant_id="grant-1")
    assert_rejected(
        conn, errors.InvalidParameterValue, fragment,
        "SELECT * FROM queue_nylas_webhook_notification(%s, %s, %s::jsonb)",
        (webhook_id, type_, None if body is None else Jsonb(body)))
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 0
    assert queue_depth(conn, WQ) == 0


# --- the enqueue trigger ------------------------------------------------------------------------

def test_direct_insert_is_queued_by_the_trigger(conn: Conn) -> None:
    nid = scalar(conn, "INSERT INTO flux_webhook_notifications"
                       " (webhook_id, notification_type, grant_id, payload)"
                       " VALUES ('direct', 'grant.created', 'g-9', '{}') RETURNING id")
    [msg] = queue_messages(conn, WQ)
    assert msg["message"] == {"notification_id": str(nid), "webhook_id": "direct",
                              "type": "grant.created", "grant_id": "g-9"}


def test_multi_row_insert_queues_one_message_per_row(conn: Conn) -> None:
    conn.execute("INSERT INTO flux_webhook_notifications (webhook_id, notification_type, payload)"
                 " SELECT 'bulk-' || g, 'message.created', '{}' FROM generate_series(1, 4) g")
    hooks = sorted(m["message"]["webhook_id"] for m in queue_messages(conn, WQ))
    assert hooks == ["bulk-1", "bulk-2", "bulk-3", "bulk-4"]


def test_conflicting_insert_does_not_queue(conn: Conn) -> None:
    deliver(conn, "wh-c")
    conn.execute("INSERT INTO flux_webhook_notifications (webhook_id, notification_type, payload)"
                 " VALUES ('wh-c', 'x', '{}') ON CONFLICT (webhook_id) DO NOTHING")
    assert queue_depth(conn, WQ) == 1


def test_rolled_back_delivery_leaves_neither_row_nor_message(conn: Conn) -> None:
    before = fingerprint(conn)
    conn.autocommit = False
    try:
        deliver(conn, "wh-rb")
        assert queue_depth(conn, WQ) == 1   # visible inside the transaction
        conn.rollback()
    finally:
        conn.autocommit = True
    assert fingerprint(conn) == before


def test_insert_rejected_by_a_constraint_queues_nothing(conn: Conn) -> None:
    assert_rejected(conn, errors.CheckViolation, "notification_type",
                    "INSERT INTO flux_webhook_notifications"
                    " (webhook_id, notification_type, payload) VALUES ('x', '', '{}')")


# --- acknowledge_webhook_notification -----------------------------------------------------------

def test_processing_counts_an_attempt_and_is_not_final(conn: Conn) -> None:
    nid = deliver(conn, "wh-a")["notification_id"]
    assert ack(conn, nid, "processing") is True
    assert ack(conn, nid, "processing") is True
    row = stored(conn, nid)
    assert row["status"] == "processing" and row["attempts"] == 2
    assert row["processed_at"] is None and row["processing_duration_ms"] is None


def test_processed_stamps_time_and_duration_and_clears_the_error(conn: Conn) -> None:
    nid = deliver(conn, "wh-a")["notification_id"]
    ack(conn, nid, "processing")
    ack(conn, nid, "error", "boom", 40)
    row = stored(conn, nid)
    assert (row["status"], row["error_message"], row["processing_duration_ms"]) == (
        "error", "boom", 40)
    assert row["processed_at"] is not None
    ack(conn, nid, "processing")
    assert ack(conn, nid, "processed", None, 25) is True
    row = stored(conn, nid)
    assert row["status"] == "processed" and row["error_message"] is None
    assert row["processing_duration_ms"] == 25 and row["attempts"] == 2
    assert row["processed_at"] is not None


def test_default_status_is_processed(conn: Conn) -> None:
    nid = deliver(conn, "wh-d")["notification_id"]
    assert scalar(conn, "SELECT acknowledge_webhook_notification(%s)", (nid,)) is True
    row = stored(conn, nid)
    assert row["status"] == "processed" and row["processed_at"] is not None
    assert row["attempts"] == 0


def test_error_without_message_keeps_the_previous_message(conn: Conn) -> None:
    nid = deliver(conn, "wh-e")["notification_id"]
    ack(conn, nid, "error", "first failure", 5)
    ack(conn, nid, "error", None, None)
    row = stored(conn, nid)
    assert row["error_message"] == "first failure"
    assert row["processing_duration_ms"] == 5   # kept when no new duration is given


def test_skipped_keeps_an_explanation_when_one_is_given(conn: Conn) -> None:
    nid = deliver(conn, "wh-s")["notification_id"]
    ack(conn, nid, "error", "old")
    ack(conn, nid, "skipped", "unknown grant")
    row = stored(conn, nid)
    assert row["status"] == "skipped" and row["error_message"] == "unknown grant"
    ack(conn, nid, "skipped")
    assert stored(conn, nid)["error_message"] is None


def test_back_to_pending_clears_the_final_stamps(conn: Conn) -> None:
    nid = deliver(conn, "wh-p")["notification_id"]
    ack(conn, nid, "processed", None, 9)
    ack(conn, nid, "pending")
    row = stored(conn, nid)
    assert row["status"] == "pending"
    assert row["processed_at"] is None and row["processing_duration_ms"] is None


def test_acknowledge_touches_only_its_notification_and_never_queues(conn: Conn) -> None:
    a = deliver(conn, "wh-1")["notification_id"]
    b = deliver(conn, "wh-2")["notification_id"]
    before_b = stored(conn, b)
    ack(conn, a, "processed", None, 3)
    assert stored(conn, b) == before_b
    assert queue_depth(conn, WQ) == 2


@pytest.mark.parametrize(
    ("status", "duration", "fragment"),
    [("done", None, "unknown status done"), (None, None, "unknown status NULL"),
     ("", None, "unknown status"), ("PROCESSED", None, "unknown status PROCESSED"),
     ("processed", -1, "duration must be >= 0, got -1")],
    ids=["unknown", "null", "empty", "wrong-case", "negative-duration"],
)
def test_acknowledge_rejects_bad_status_or_duration_and_changes_nothing(
    conn: Conn, status: str | None, duration: int | None, fragment: str,
) -> None:
    nid = deliver(conn, "wh-x")["notification_id"]
    assert_rejected(conn, errors.InvalidParameterValue, fragment,
                    "SELECT acknowledge_webhook_notification(%s, %s, NULL, %s)",
                    (nid, status, duration))
    assert stored(conn, nid)["status"] == "pending"


@pytest.mark.parametrize("known", [False, True], ids=["null-id", "unknown-id"])
def test_acknowledge_of_a_missing_notification_raises_no_data_found(
    conn: Conn, known: bool,
) -> None:
    deliver(conn, "wh-y")
    missing = "00000000-0000-0000-0000-000000000001" if known else None
    exc = assert_rejected(conn, errors.NoDataFound, "no notification",
                          "SELECT acknowledge_webhook_notification(%s::uuid, 'processed')",
                          (missing,))
    assert exc.sqlstate == "P0002"
    assert (missing or "NULL") in str(exc)


# --- get_webhook_metrics ------------------------------------------------------------------------

def test_metrics_group_by_type_and_status_with_duration_figures(conn: Conn) -> None:
    ids = [deliver(conn, f"m-{i}", type_="message.created")["notification_id"] for i in range(4)]
    for nid, ms in zip(ids[:3], (10, 20, 30), strict=True):
        ack(conn, nid, "processing")
        ack(conn, nid, "processed", None, ms)
    err = deliver(conn, "t-1", type_="thread.replied")["notification_id"]
    ack(conn, err, "processing")
    ack(conn, err, "processing")
    ack(conn, err, "error", "bad", 100)
    got = {(r["notification_type"], r["status"]): r
           for r in rows(conn, "SELECT * FROM get_webhook_metrics()")}
    assert list(got) == [("message.created", "pending"), ("message.created", "processed"),
                         ("thread.replied", "error")]
    done = got[("message.created", "processed")]
    assert done["total"] == 3 and done["avg_duration_ms"] == 20
    assert done["p95_duration_ms"] == 29 and done["max_duration_ms"] == 30
    assert done["total_attempts"] == 3
    pending = got[("message.created", "pending")]
    assert pending["total"] == 1 and pending["avg_duration_ms"] is None
    assert pending["max_duration_ms"] is None and pending["total_attempts"] == 0
    failed = got[("thread.replied", "error")]
    assert failed["total"] == 1 and failed["total_attempts"] == 2
    assert failed["max_duration_ms"] == 100
    assert failed["last_received_at"] == stored(conn, err)["received_at"]


def test_metrics_window_excludes_older_deliveries(conn: Conn) -> None:
    old = deliver(conn, "old")["notification_id"]
    deliver(conn, "new")
    conn.execute("UPDATE flux_webhook_notifications SET received_at = now() - interval '2 hours'"
                 " WHERE id = %s", (old,))
    [recent] = rows(conn, "SELECT * FROM get_webhook_metrics()")
    assert recent["total"] == 1
    [both] = rows(conn, "SELECT * FROM get_webhook_metrics(interval '3 hours')")
    assert both["total"] == 2
    assert rows(conn, "SELECT * FROM get_webhook_metrics(interval '1 second')")[0]["total"] == 1


def test_metrics_of_no_deliveries_are_empty(conn: Conn) -> None:
    assert rows(conn, "SELECT * FROM get_webhook_metrics(interval '1 day')") == []


@pytest.mark.parametrize("window", ["0 seconds", "-1 hour", None])
def test_metrics_reject_a_non_positive_window(conn: Conn, window: str | None) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, "time window must be positive",
                    "SELECT * FROM get_webhook_metrics(%s::interval)", (window,))


def test_grant_given_only_beside_the_object_links_the_inbox(conn: Any) -> None:
    inbox = conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ('g-side', 's@x.com')"
                         " RETURNING id").fetchone()["id"]
    payload = {"type": "thread.replied", "id": "w-side", "time": 1_780_000_000,
               "data": {"grant_id": "g-side", "object": {"thread_id": "t1"}}}
    conn.execute("SELECT * FROM queue_nylas_webhook_notification('w-side', 'thread.replied',"
                 " %s::jsonb)", (json.dumps(payload),))
    row = conn.execute("SELECT grant_id, inbox_id FROM flux_webhook_notifications").fetchone()
    assert (row["grant_id"], row["inbox_id"]) == ("g-side", inbox)
