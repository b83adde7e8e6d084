"""The checked PGMQ wrappers: flux_pgmq_send/read/delete/archive/metrics/list_queues."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from factories import (
    QUEUES,
    archived_messages,
    assert_rejected,
    one,
    queue_depth,
    queue_messages,
    rows,
    scalar,
)

# What differs on the embedded Postgres: CI runs these there too (README's test command).
pytestmark = pytest.mark.embedded


Conn = psycopg.Connection[Any]
Q = "attachment_downloads"


def send(conn: Conn, message: dict[str, Any], queue: str = Q, delay: int = 0) -> int:
    return scalar(conn, "SELECT flux_pgmq_send(%s, %s, %s)", (queue, Jsonb(message), delay))


def read(conn: Conn, vt: int = 30, qty: int = 1, queue: str = Q) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM flux_pgmq_read(%s, %s, %s)", (queue, vt, qty))


# --- flux_pgmq_list_queues ----------------------------------------------------------------------

def test_list_queues_returns_the_four_queues_sorted_by_name(conn: Conn) -> None:
    listed = rows(conn, "SELECT * FROM flux_pgmq_list_queues()")
    assert [r["queue_name"] for r in listed] == sorted(QUEUES)
    assert all(r["created_at"] is not None for r in listed)
    assert not any(r["is_partitioned"] or r["is_unlogged"] for r in listed)


def test_list_queues_shows_a_queue_created_later(conn: Conn) -> None:
    conn.execute("SELECT pgmq.create('zz_extra')")
    names = [r["queue_name"] for r in rows(conn, "SELECT * FROM flux_pgmq_list_queues()")]
    assert names == sorted([*QUEUES, "zz_extra"])


# --- flux_pgmq_send -----------------------------------------------------------------------------

def test_send_stores_the_exact_message_visible_now_and_returns_its_id(conn: Conn) -> None:
    msg = {"attachment_id": "a-1", "n": 3, "nested": {"ok": True}}
    msg_id = send(conn, msg)
    stored = queue_messages(conn, Q)
    assert [m["msg_id"] for m in stored] == [msg_id]
    assert stored[0]["message"] == msg
    assert stored[0]["read_ct"] == 0
    assert stored[0]["vt"] <= scalar(conn, "SELECT clock_timestamp()")
    assert queue_depth(conn, Q) == 1
    # Only the named queue got it.
    assert all(queue_depth(conn, q) == 0 for q in QUEUES if q != Q)


def test_send_ids_increase_and_the_default_delay_is_zero(conn: Conn) -> None:
    first = scalar(conn, "SELECT flux_pgmq_send(%s, %s)", (Q, Jsonb({"i": 1})))
    second = scalar(conn, "SELECT flux_pgmq_send(%s, %s)", (Q, Jsonb({"i": 2})))
    assert second > first
    got = read(conn, qty=10)
    assert [m["message"]["i"] for m in got] == [1, 2]


def test_send_with_delay_hides_the_message_until_the_delay_passes(conn: Conn) -> None:
    before = scalar(conn, "SELECT now()")
    msg_id = send(conn, {"later": True}, delay=120)
    [stored] = queue_messages(conn, Q)
    assert stored["msg_id"] == msg_id
    assert stored["vt"] >= before + dt.timedelta(seconds=119)
    assert read(conn, qty=10) == []
    assert queue_depth(conn, Q) == 1


@pytest.mark.parametrize(
    ("queue", "message", "delay", "fragment"),
    [
        ("no_such_queue", {"a": 1}, 0, "unknown queue: no_such_queue"),
        (None, {"a": 1}, 0, "unknown queue: NULL"),
        ("", {"a": 1}, 0, "unknown queue"),
        (Q, None, 0, "message must be a JSON object"),
        (Q, [1, 2], 0, "message must be a JSON object"),
        (Q, "text", 0, "message must be a JSON object"),
        (Q, 7, 0, "message must be a JSON object"),
        (Q, {"a": 1}, -1, "delay_seconds must be >= 0, got -1"),
        (Q, {"a": 1}, None, "delay_seconds must be >= 0"),
    ],
    ids=["unknown-queue", "null-queue", "empty-queue", "null-message", "array-message",
         "string-message", "number-message", "negative-delay", "null-delay"],
)
def test_send_rejects_bad_arguments_and_queues_nothing(
    conn: Conn, queue: str | None, message: Any, delay: int | None, fragment: str,
) -> None:
    payload = None if message is None else Jsonb(message)
    assert_rejected(conn, errors.InvalidParameterValue, fragment,
                    "SELECT flux_pgmq_send(%s, %s::jsonb, %s)", (queue, payload, delay))
    assert queue_depth(conn, Q) == 0


def test_unknown_queue_error_is_a_data_error_with_a_hint(conn: Conn) -> None:
    exc = assert_rejected(conn, errors.InvalidParameterValue, "unknown queue",
                          "SELECT flux_pgmq_send('nope', '{}'::jsonb)")
    assert isinstance(exc, psycopg.DataError)
    assert exc.sqlstate == "22023"
    assert exc.diag.message_hint is not None and "flux_pgmq_list_queues" in exc.diag.message_hint


# --- flux_pgmq_read -----------------------------------------------------------------------------

def test_read_returns_the_message_and_hides_it_for_the_visibility_timeout(conn: Conn) -> None:
    msg_id = send(conn, {"k": "v"})
    now = scalar(conn, "SELECT clock_timestamp()")
    [got] = read(conn, vt=60)
    assert got["msg_id"] == msg_id
    assert got["message"] == {"k": "v"}
    assert got["read_ct"] == 1
    assert got["enqueued_at"] <= now
    assert got["vt"] >= now + dt.timedelta(seconds=59)
    # Invisible now, but still in the queue.
    assert read(conn, vt=60) == []
    assert queue_depth(conn, Q) == 1
    assert queue_messages(conn, Q)[0]["read_ct"] == 1


def test_read_honours_qty_and_fifo_order(conn: Conn) -> None:
    ids = [send(conn, {"i": i}) for i in range(5)]
    first = read(conn, qty=2)
    assert [m["msg_id"] for m in first] == ids[:2]
    rest = read(conn, qty=10)
    assert [m["msg_id"] for m in rest] == ids[2:]
    assert read(conn, qty=1000) == []


def test_read_of_a_message_whose_timeout_expired_counts_a_second_read(conn: Conn) -> None:
    msg_id = send(conn, {"again": 1})
    read(conn, vt=1)
    conn.execute("UPDATE pgmq.q_attachment_downloads SET vt = now() - interval '1 second'")
    [again] = read(conn, vt=30)
    assert again["msg_id"] == msg_id and again["read_ct"] == 2


def test_read_of_an_empty_queue_returns_no_rows(conn: Conn) -> None:
    assert read(conn, queue="inbox_backfill_jobs", qty=5) == []


@pytest.mark.parametrize(
    ("queue", "vt", "qty", "fragment"),
    [
        ("nope", 30, 1, "unknown queue: nope"),
        (None, 30, 1, "unknown queue: NULL"),
        (Q, 0, 1, "visibility_timeout must be >= 1 second, got 0"),
        (Q, -5, 1, "visibility_timeout must be >= 1 second, got -5"),
        (Q, None, 1, "visibility_timeout must be >= 1 second"),
        (Q, 30, 0, "qty must be between 1 and 1000, got 0"),
        (Q, 30, -1, "qty must be between 1 and 1000, got -1"),
        (Q, 30, 1001, "qty must be between 1 and 1000, got 1001"),
        (Q, 30, None, "qty must be between 1 and 1000"),
    ],
    ids=["unknown-queue", "null-queue", "zero-vt", "negative-vt", "null-vt", "zero-qty",
         "negative-qty", "qty-over-1000", "null-qty"],
)
def test_read_rejects_bad_arguments_and_leaves_messages_unread(
    conn: Conn, queue: str | None, vt: int | None, qty: int | None, fragment: str,
) -> None:
    send(conn, {"keep": True})
    assert_rejected(conn, errors.InvalidParameterValue, fragment,
                    "SELECT * FROM flux_pgmq_read(%s, %s, %s)", (queue, vt, qty))
    [stored] = queue_messages(conn, Q)
    assert stored["read_ct"] == 0


# --- flux_pgmq_delete ---------------------------------------------------------------------------

def test_delete_removes_only_that_message_and_reports_it(conn: Conn) -> None:
    keep = send(conn, {"keep": True})
    drop = send(conn, {"drop": True})
    assert scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (Q, drop)) is True
    assert [m["msg_id"] for m in queue_messages(conn, Q)] == [keep]
    assert archived_messages(conn, Q) == []


def test_delete_of_a_missing_message_returns_false(conn: Conn) -> None:
    msg_id = send(conn, {"x": 1})
    assert scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (Q, msg_id)) is True
    assert scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (Q, msg_id)) is False
    assert scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (Q, 999_999)) is False


def test_delete_in_another_queue_does_not_touch_this_one(conn: Conn) -> None:
    msg_id = send(conn, {"x": 1})
    assert scalar(conn, "SELECT flux_pgmq_delete('thread_sync_jobs', %s)", (msg_id,)) is False
    assert queue_depth(conn, Q) == 1


@pytest.mark.parametrize("fn", ["flux_pgmq_delete", "flux_pgmq_archive"])
def test_delete_and_archive_reject_an_unknown_queue(conn: Conn, fn: str) -> None:
    msg_id = send(conn, {"x": 1})
    assert_rejected(conn, errors.InvalidParameterValue, "unknown queue: ghost",
                    f"SELECT {fn}('ghost', %s)", (msg_id,))
    assert_rejected(conn, errors.InvalidParameterValue, "unknown queue: NULL",
                    f"SELECT {fn}(NULL, %s)", (msg_id,))
    assert queue_depth(conn, Q) == 1


@pytest.mark.parametrize("fn", ["flux_pgmq_delete", "flux_pgmq_archive"])
def test_delete_and_archive_require_a_message_id(conn: Conn, fn: str) -> None:
    send(conn, {"x": 1})
    assert_rejected(conn, errors.InvalidParameterValue, f"{fn}: message_id is required",
                    f"SELECT {fn}(%s, NULL)", (Q,))
    assert queue_depth(conn, Q) == 1


# --- flux_pgmq_archive --------------------------------------------------------------------------

def test_archive_moves_the_message_to_the_archive_table(conn: Conn) -> None:
    msg_id = send(conn, {"dead": "letter"})
    other = send(conn, {"alive": True})
    assert scalar(conn, "SELECT flux_pgmq_archive(%s, %s)", (Q, msg_id)) is True
    assert [m["msg_id"] for m in queue_messages(conn, Q)] == [other]
    assert archived_messages(conn, Q) == [{"msg_id": msg_id, "message": {"dead": "letter"}}]
    # A second archive finds nothing to move.
    assert scalar(conn, "SELECT flux_pgmq_archive(%s, %s)", (Q, msg_id)) is False
    assert len(archived_messages(conn, Q)) == 1


# --- flux_pgmq_metrics --------------------------------------------------------------------------

def test_metrics_of_an_empty_queue(conn: Conn) -> None:
    m = one(conn, "SELECT * FROM flux_pgmq_metrics(%s)", (Q,))
    assert m["queue_name"] == Q
    assert m["queue_length"] == 0 and m["total_messages"] == 0
    assert m["newest_msg_age_sec"] is None and m["oldest_msg_age_sec"] is None
    assert m["scrape_time"] is not None


def test_metrics_count_current_and_total_messages_and_ages(conn: Conn) -> None:
    ids = [send(conn, {"i": i}) for i in range(3)]
    conn.execute("UPDATE pgmq.q_attachment_downloads SET enqueued_at = now() - interval '100 s'"
                 " WHERE msg_id = %s", (ids[0],))
    scalar(conn, "SELECT flux_pgmq_delete(%s, %s)", (Q, ids[2]))
    m = one(conn, "SELECT * FROM flux_pgmq_metrics(%s)", (Q,))
    assert m["queue_length"] == 2
    assert m["total_messages"] == 3          # every message ever sent
    assert 99 <= m["oldest_msg_age_sec"] <= 101
    assert 0 <= m["newest_msg_age_sec"] <= 1


def test_metrics_include_invisible_messages(conn: Conn) -> None:
    send(conn, {"later": 1}, delay=300)
    send(conn, {"now": 1})
    read(conn, vt=300)
    assert one(conn, "SELECT * FROM flux_pgmq_metrics(%s)", (Q,))["queue_length"] == 2


@pytest.mark.parametrize("queue", ["ghost", None, ""])
def test_metrics_reject_an_unknown_queue(conn: Conn, queue: str | None) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, "unknown queue",
                    "SELECT * FROM flux_pgmq_metrics(%s)", (queue,))
