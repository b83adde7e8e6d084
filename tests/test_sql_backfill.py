"""Backfill SQL: queue_inbox_backfill, update_backfill_orchestration_progress,
insert_queued_thread_idempotent, queue_thread_sync, queue_discovered_threads,
transition_to_thread_sync, initialize_sync_stats, get_sync_progress and the triggers on
queued_threads (counters, updated_at) and flux_inbox_configurations (status mirror)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors

from factories import (
    add_config,
    add_inbox,
    assert_rejected,
    assert_stats_exact,
    counters,
    fold,
    one,
    queue_depth,
    queue_messages,
    rows,
    scalar,
    set_config_status,
    start_backfill,
    sync_stats,
)

Conn = psycopg.Connection[Any]
BQ = "inbox_backfill_jobs"
TQ = "thread_sync_jobs"
MISSING = uuid.UUID("00000000-0000-0000-0000-00000000beef")


def config(conn: Conn, config_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM flux_inbox_configurations WHERE id = %s", (config_id,))


def progress(conn: Conn, config_id: Any, token: str | None, pages: int | None,
             threads: int | None) -> dict[str, Any]:
    return one(conn, "SELECT * FROM update_backfill_orchestration_progress(%s, %s, %s, %s)",
               (config_id, token, pages, threads))


def insert_thread(conn: Conn, config_id: Any, thread: str | None,
                  grant: str | None = None) -> dict[str, Any]:
    return one(conn, "SELECT * FROM insert_queued_thread_idempotent(%s, %s, %s)",
               (config_id, thread, grant))


def discover(conn: Conn, config_id: Any, threads: list[str] | None) -> list[dict[str, Any]]:
    return rows(conn, "SELECT * FROM queue_discovered_threads(%s, %s::text[])",
                (config_id, threads))


def thread_row(conn: Conn, config_id: uuid.UUID, thread: str) -> dict[str, Any]:
    return one(conn, "SELECT * FROM queued_threads WHERE config_id = %s"
                     " AND provider_thread_id = %s", (config_id, thread))


def sync_progress(conn: Conn, config_id: Any) -> dict[str, Any]:
    return one(conn, "SELECT * FROM get_sync_progress(%s)", (config_id,))


def set_threads(conn: Conn, config_id: uuid.UUID, status: str, threads: list[str],
                message_count: int | None = None) -> None:
    conn.execute("UPDATE queued_threads SET status = %s,"
                 " message_count = coalesce(%s, message_count)"
                 " WHERE config_id = %s AND provider_thread_id = ANY(%s)",
                 (status, message_count, config_id, threads))


@pytest.fixture
def inbox(conn: Conn) -> uuid.UUID:
    return add_inbox(conn, grant_id="grant-a")


@pytest.fixture
def cfg(conn: Conn, inbox: uuid.UUID) -> uuid.UUID:
    """A backfill just queued (its job message is in inbox_backfill_jobs)."""
    return start_backfill(conn, inbox)


# --- queue_inbox_backfill -----------------------------------------------------------------------

def test_backfill_creates_a_queued_configuration_with_a_fresh_checkpoint(
    conn: Conn, inbox: uuid.UUID,
) -> None:
    now = scalar(conn, "SELECT now()")
    cfg = start_backfill(conn, inbox)
    c = config(conn, cfg)
    assert c["inbox_id"] == inbox and c["backfill_status"] == "queued"
    assert c["backfill_kind"] == "full" and c["backfill_until"] is None
    # The default range is one year back.
    year_ago = scalar(conn, "SELECT now() - interval '1 year'")
    assert abs(c["backfill_since"] - year_ago) < dt.timedelta(seconds=5)
    assert (c["checkpoint_page_token"], c["checkpoint_pages_done"],
            c["checkpoint_threads_found"]) == (None, 0, 0)
    assert c["backfill_progress"] == {} and c["backfill_attempts"] == 0
    assert c["backfill_started_at"] is None and c["discovery_completed_at"] is None
    s = sync_stats(conn, cfg)
    assert s["backfill_status"] == "queued" and s["inbox_id"] == inbox
    assert counters(conn, cfg) == dict.fromkeys(counters(conn, cfg), 0)
    assert s["sync_started_at"] >= now - dt.timedelta(seconds=5)
    assert s["sync_completed_at"] is None


def test_backfill_queues_one_job_describing_the_range(conn: Conn, inbox: uuid.UUID) -> None:
    since = scalar(conn, "SELECT date_trunc('second', now() - interval '30 days')")
    until = scalar(conn, "SELECT date_trunc('second', now() - interval '1 day')")
    cfg = start_backfill(conn, inbox, since=since, until=until, kind="catch_up")
    [job] = queue_messages(conn, BQ)
    m = job["message"]
    assert (m["config_id"], m["inbox_id"], m["grant_id"], m["kind"]) == (
        str(cfg), str(inbox), "grant-a", "catch_up")
    assert dt.datetime.fromisoformat(m["since"]) == since
    assert dt.datetime.fromisoformat(m["until"]) == until
    c = config(conn, cfg)
    assert (c["backfill_since"], c["backfill_until"], c["backfill_kind"]) == (
        since, until, "catch_up")
    assert queue_depth(conn, TQ) == 0


def test_since_exactly_one_year_back_computed_earlier_is_accepted(
    conn: Conn, inbox: uuid.UUID,
) -> None:
    since = scalar(conn, "SELECT now() - interval '1 year' - interval '1 hour'")
    cfg = start_backfill(conn, inbox, since=since)
    assert config(conn, cfg)["backfill_since"] == since


def test_restart_after_completion_reuses_the_configuration_and_resets_it(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    progress(conn, cfg, "tok", 3, 10)
    discover(conn, cfg, ["t1", "t2"])
    set_threads(conn, cfg, "completed", ["t1"], 4)
    transition = scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,))
    assert transition is True
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " backfill_completed_at = now(), last_error = 'x', backfill_attempts = 2"
                 " WHERE id = %s", (cfg,))
    assert sync_stats(conn, cfg)["sync_completed_at"] is not None
    conn.execute("UPDATE inbox_sync_stats SET threads_failed = 42 WHERE config_id = %s", (cfg,))

    again = start_backfill(conn, inbox, kind="catch_up")
    assert again == cfg
    assert scalar(conn, "SELECT count(*) FROM flux_inbox_configurations") == 1
    c = config(conn, cfg)
    assert c["backfill_status"] == "queued" and c["backfill_kind"] == "catch_up"
    assert (c["checkpoint_page_token"], c["checkpoint_pages_done"],
            c["checkpoint_threads_found"], c["backfill_progress"]) == (None, 0, 0, {})
    assert c["backfill_completed_at"] is None and c["discovery_completed_at"] is None
    assert c["last_error"] is None and c["backfill_attempts"] == 0
    s = sync_stats(conn, cfg)
    assert s["backfill_status"] == "queued" and s["sync_completed_at"] is None
    assert_stats_exact(conn, cfg)          # the drifted counter was recounted
    assert len(queue_messages(conn, BQ)) == 2


def test_restart_after_failure_is_allowed(conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID) -> None:
    set_config_status(conn, cfg, "failed")
    assert start_backfill(conn, inbox) == cfg
    assert config(conn, cfg)["backfill_status"] == "queued"


def test_backfill_of_a_pending_configuration_keeps_that_configuration(
    conn: Conn, inbox: uuid.UUID,
) -> None:
    pending = add_config(conn, inbox)
    assert start_backfill(conn, inbox) == pending
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats") == 1


@pytest.mark.parametrize("status", ["queued", "discovering", "thread_sync"])
def test_second_backfill_while_one_runs_is_rejected(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID, status: str,
) -> None:
    set_config_status(conn, cfg, status)
    assert_rejected(conn, errors.ObjectInUse, f"already {status}",
                    "SELECT queue_inbox_backfill(%s)", (inbox,))
    assert len(queue_messages(conn, BQ)) == 1


@pytest.mark.parametrize("status", ["auth_expired", "revoked", "disabled"])
def test_backfill_of_an_inactive_inbox_is_rejected(conn: Conn, status: str) -> None:
    inbox = add_inbox(conn, status=status)
    exc = assert_rejected(conn, errors.ObjectNotInPrerequisiteState, f"is {status}",
                          "SELECT queue_inbox_backfill(%s)", (inbox,))
    assert exc.sqlstate is not None and exc.sqlstate.startswith("55")
    assert scalar(conn, "SELECT count(*) FROM flux_inbox_configurations") == 0


@pytest.mark.parametrize("which", ["unknown", "null", "deleted"])
def test_backfill_of_a_missing_inbox_is_rejected(conn: Conn, inbox: uuid.UUID,
                                                 which: str) -> None:
    target: uuid.UUID | None = {"unknown": MISSING, "null": None, "deleted": inbox}[which]
    if which == "deleted":
        conn.execute("UPDATE flux_inboxes SET deleted_at = now() WHERE id = %s", (inbox,))
    assert_rejected(conn, errors.NoDataFound, "no inbox",
                    "SELECT queue_inbox_backfill(%s::uuid)", (target,))


@pytest.mark.parametrize(
    ("since", "until", "kind", "fragment"),
    [
        ("now() - interval '1 year 2 days'", "NULL", "'full'", "more than one year back"),
        ("now() - interval '5 years'", "NULL", "'full'", "more than one year back"),
        ("now() + interval '1 hour'", "NULL", "'full'", "empty range"),
        ("now() - interval '10 days'", "now() - interval '10 days'", "'full'", "empty range"),
        ("now() - interval '10 days'", "now() - interval '20 days'", "'full'", "empty range"),
        ("NULL", "now() - interval '2 years'", "'full'", "empty range"),
        ("NULL", "NULL", "'incremental'", "kind must be full or catch_up, got incremental"),
        ("NULL", "NULL", "NULL", "kind must be full or catch_up, got NULL"),
    ],
    ids=["13-months", "5-years", "future-since", "until-equals-since", "until-before-since",
         "until-beyond-default-since", "unknown-kind", "null-kind"],
)
def test_backfill_with_a_bad_range_or_kind_is_rejected(
    conn: Conn, inbox: uuid.UUID, since: str, until: str, kind: str, fragment: str,
) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, fragment,
                    f"SELECT queue_inbox_backfill(%s, {since}, {until}, {kind})", (inbox,))
    assert scalar(conn, "SELECT count(*) FROM flux_inbox_configurations") == 0
    assert queue_depth(conn, BQ) == 0


def test_rejected_restart_leaves_the_finished_backfill_untouched(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    set_config_status(conn, cfg, "completed")
    assert_rejected(conn, errors.InvalidParameterValue, "more than one year back",
                    "SELECT queue_inbox_backfill(%s, now() - interval '2 years')", (inbox,))
    assert config(conn, cfg)["backfill_status"] == "completed"


# --- update_backfill_orchestration_progress -----------------------------------------------------

def test_first_checkpoint_starts_discovery(conn: Conn, cfg: uuid.UUID) -> None:
    got = progress(conn, cfg, "page-2", 1, 50)
    assert got["id"] == cfg and got["backfill_status"] == "discovering"
    c = config(conn, cfg)
    assert c["backfill_started_at"] is not None
    assert (c["checkpoint_page_token"], c["checkpoint_pages_done"],
            c["checkpoint_threads_found"]) == ("page-2", 1, 50)
    p = c["backfill_progress"]
    assert (p["pages_done"], p["threads_discovered"], p["has_more"]) == (1, 50, True)
    assert "checkpoint_at" in p
    assert sync_stats(conn, cfg)["backfill_status"] == "discovering"


def test_checkpoints_advance_and_the_last_page_says_no_more(conn: Conn, cfg: uuid.UUID) -> None:
    progress(conn, cfg, "p2", 1, 10)
    conn.execute("UPDATE flux_inbox_configurations SET backfill_started_at = '2020-01-01'"
                 " WHERE id = %s", (cfg,))
    progress(conn, cfg, "p3", 2, 20)
    last = progress(conn, cfg, None, 3, 25)
    assert last["backfill_started_at"] == dt.datetime(2020, 1, 1, tzinfo=dt.UTC)  # kept
    assert last["checkpoint_page_token"] is None and last["checkpoint_pages_done"] == 3
    assert last["backfill_progress"]["has_more"] is False
    assert last["backfill_progress"]["threads_discovered"] == 25
    assert last["backfill_status"] == "discovering"


def test_repeating_the_same_checkpoint_is_accepted(conn: Conn, cfg: uuid.UUID) -> None:
    progress(conn, cfg, "p2", 1, 10)
    again = progress(conn, cfg, "p2", 1, 10)
    assert (again["checkpoint_pages_done"], again["checkpoint_threads_found"]) == (1, 10)


def test_checkpoint_keeps_other_keys_of_backfill_progress(conn: Conn, cfg: uuid.UUID) -> None:
    conn.execute("UPDATE flux_inbox_configurations SET backfill_progress = '{\"note\": 1}'"
                 " WHERE id = %s", (cfg,))
    assert progress(conn, cfg, "x", 1, 1)["backfill_progress"]["note"] == 1


@pytest.mark.parametrize(
    ("pages", "threads", "fragment"),
    [(2, 10, "would go back from page 3 to 2"), (3, 29, "would go back"),
     (0, 0, "would go back from page 3 to 0")],
    ids=["pages-back", "threads-back", "to-zero"],
)
def test_checkpoint_going_backwards_is_rejected(
    conn: Conn, cfg: uuid.UUID, pages: int, threads: int, fragment: str,
) -> None:
    progress(conn, cfg, "p4", 3, 30)
    assert_rejected(conn, errors.InvalidParameterValue, fragment,
                    "SELECT update_backfill_orchestration_progress(%s, 'stale', %s, %s)",
                    (cfg, pages, threads))
    assert config(conn, cfg)["checkpoint_page_token"] == "p4"


@pytest.mark.parametrize(
    ("pages", "threads"), [(-1, 0), (0, -1), (None, 0), (0, None)],
    ids=["negative-pages", "negative-threads", "null-pages", "null-threads"],
)
def test_negative_or_null_counts_are_rejected(
    conn: Conn, cfg: uuid.UUID, pages: int | None, threads: int | None,
) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, "must be >= 0",
                    "SELECT update_backfill_orchestration_progress(%s, 't', %s, %s)",
                    (cfg, pages, threads))
    assert config(conn, cfg)["backfill_status"] == "queued"


@pytest.mark.parametrize("status", ["pending", "thread_sync", "completed", "failed"])
def test_checkpoint_outside_discovery_is_rejected(conn: Conn, cfg: uuid.UUID, status: str) -> None:
    set_config_status(conn, cfg, status)
    assert_rejected(conn, errors.ObjectNotInPrerequisiteState, f"is {status}, not discovering",
                    "SELECT update_backfill_orchestration_progress(%s, 't', 1, 1)", (cfg,))


@pytest.mark.parametrize("target", [MISSING, None], ids=["unknown", "null"])
def test_checkpoint_of_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID, target: uuid.UUID | None,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT update_backfill_orchestration_progress(%s::uuid, 't', 1, 1)",
                    (target,))


def test_checkpoint_of_a_deleted_configuration_is_rejected(conn: Conn, cfg: uuid.UUID) -> None:
    conn.execute("UPDATE flux_inbox_configurations SET deleted_at = now() WHERE id = %s", (cfg,))
    assert_rejected(conn, errors.NoDataFound, str(cfg),
                    "SELECT update_backfill_orchestration_progress(%s, 't', 1, 1)", (cfg,))


# --- insert_queued_thread_idempotent ------------------------------------------------------------

def test_insert_thread_adds_a_queued_row_with_the_inbox_grant(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    got = insert_thread(conn, cfg, "thr-1")
    assert got["inserted"] is True
    row = thread_row(conn, cfg, "thr-1")
    assert row["id"] == got["queued_thread_id"]
    assert (row["inbox_id"], row["grant_id"], row["status"], row["attempts"]) == (
        inbox, "grant-a", "queued", 0)
    assert row["queue_msg_id"] is None
    assert queue_depth(conn, TQ) == 0       # inserting is not queueing
    assert counters(conn, cfg)["threads_queued"] == 1


def test_same_thread_twice_is_one_row_and_the_same_id(conn: Conn, cfg: uuid.UUID) -> None:
    first = insert_thread(conn, cfg, "thr-1")
    second = insert_thread(conn, cfg, "thr-1", "other-grant")
    assert second == {"queued_thread_id": first["queued_thread_id"], "inserted": False}
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == 1
    assert thread_row(conn, cfg, "thr-1")["grant_id"] == "grant-a"   # not overwritten
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 1


def test_explicit_grant_is_stored(conn: Conn, cfg: uuid.UUID) -> None:
    insert_thread(conn, cfg, "thr-g", "special")
    assert thread_row(conn, cfg, "thr-g")["grant_id"] == "special"


def test_same_thread_id_in_two_backfills_is_two_rows(conn: Conn, cfg: uuid.UUID) -> None:
    other = start_backfill(conn, add_inbox(conn, grant_id="grant-b"))
    a = insert_thread(conn, cfg, "shared")
    b = insert_thread(conn, other, "shared")
    assert a["inserted"] and b["inserted"]
    assert a["queued_thread_id"] != b["queued_thread_id"]
    assert thread_row(conn, other, "shared")["grant_id"] == "grant-b"
    assert counters(conn, cfg)["threads_queued"] == counters(conn, other)["threads_queued"] == 1


@pytest.mark.parametrize("thread", [None, "", "   "], ids=["null", "empty", "blank"])
def test_insert_thread_requires_a_thread_id(conn: Conn, cfg: uuid.UUID,
                                            thread: str | None) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, "thread id is required",
                    "SELECT * FROM insert_queued_thread_idempotent(%s, %s)", (cfg, thread))


@pytest.mark.parametrize("target", [MISSING, None], ids=["unknown", "null"])
def test_insert_thread_into_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID, target: uuid.UUID | None,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT * FROM insert_queued_thread_idempotent(%s::uuid, 't')", (target,))


# --- queue_thread_sync --------------------------------------------------------------------------

def test_queue_thread_sync_adds_the_thread_and_queues_its_job(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    msg_id = scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1')", (cfg,))
    row = thread_row(conn, cfg, "thr-1")
    assert row["queue_msg_id"] == msg_id and row["status"] == "queued"
    [job] = queue_messages(conn, TQ)
    assert job["msg_id"] == msg_id
    assert job["message"] == {"queued_thread_id": row["id"], "config_id": str(cfg),
                              "inbox_id": str(inbox), "grant_id": "grant-a",
                              "thread_id": "thr-1", "lane": str(inbox), "turn": 0}
    assert job["vt"] <= scalar(conn, "SELECT clock_timestamp()")
    assert assert_stats_exact(conn, cfg)["threads_pending"] == 1


def test_queue_thread_sync_with_delay_hides_the_job(conn: Conn, cfg: uuid.UUID) -> None:
    before = scalar(conn, "SELECT now()")
    scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1', 600)", (cfg,))
    [job] = queue_messages(conn, TQ)
    assert job["vt"] >= before + dt.timedelta(seconds=599)
    assert rows(conn, "SELECT * FROM flux_pgmq_read(%s, 30, 5)", (TQ,)) == []


def test_requeue_of_a_failed_thread_resets_attempts_and_error(conn: Conn, cfg: uuid.UUID) -> None:
    first = scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1')", (cfg,))
    conn.execute("UPDATE queued_threads SET status = 'failed', attempts = 3,"
                 " error_message = 'timeout' WHERE provider_thread_id = 'thr-1'")
    assert counters(conn, cfg)["threads_failed"] == 1
    second = scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1')", (cfg,))
    assert second > first
    row = thread_row(conn, cfg, "thr-1")
    assert (row["status"], row["attempts"], row["error_message"], row["queue_msg_id"]) == (
        "queued", 0, None, second)
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == 1
    c = assert_stats_exact(conn, cfg)
    assert (c["threads_queued"], c["threads_pending"], c["threads_failed"]) == (1, 1, 0)
    assert [m["msg_id"] for m in queue_messages(conn, TQ)] == [first, second]


def test_requeue_of_a_processing_thread_keeps_its_attempts(conn: Conn, cfg: uuid.UUID) -> None:
    scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1')", (cfg,))
    conn.execute("UPDATE queued_threads SET status = 'processing', attempts = 2")
    scalar(conn, "SELECT queue_thread_sync(%s, 'thr-1')", (cfg,))
    row = thread_row(conn, cfg, "thr-1")
    assert row["status"] == "queued" and row["attempts"] == 2
    assert_stats_exact(conn, cfg)


@pytest.mark.parametrize(
    ("thread", "delay", "error", "fragment"),
    [
        ("t", -1, errors.InvalidParameterValue, "delay must be >= 0, got -1"),
        ("t", None, errors.InvalidParameterValue, "delay must be >= 0"),
        (None, 0, errors.InvalidParameterValue, "thread id is required"),
        ("", 0, errors.InvalidParameterValue, "thread id is required"),
    ],
    ids=["negative-delay", "null-delay", "null-thread", "empty-thread"],
)
def test_queue_thread_sync_rejects_bad_arguments(
    conn: Conn, cfg: uuid.UUID, thread: str | None, delay: int | None,
    error: type[Exception], fragment: str,
) -> None:
    assert_rejected(conn, error, fragment, "SELECT queue_thread_sync(%s, %s, %s)",
                    (cfg, thread, delay))
    assert queue_depth(conn, TQ) == 0


def test_queue_thread_sync_for_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT queue_thread_sync(%s, 't')", (MISSING,))
    assert queue_depth(conn, TQ) == 0


# --- queue_discovered_threads -------------------------------------------------------------------

def test_discovery_adds_and_queues_each_new_thread_once(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    added = discover(conn, cfg, ["t3", "t1", "t2", "t1"])
    assert sorted(a["provider_thread_id"] for a in added) == ["t1", "t2", "t3"]
    jobs = {m["msg_id"]: m["message"] for m in queue_messages(conn, TQ)}
    assert set(jobs) == {a["msg_id"] for a in added}
    for a in added:
        row = thread_row(conn, cfg, a["provider_thread_id"])
        assert row["id"] == a["queued_thread_id"]
        assert row["status"] == "queued" and row["grant_id"] == "grant-a"
        assert row["queue_msg_id"] == a["msg_id"]
        assert jobs[a["msg_id"]] == {"queued_thread_id": row["id"], "config_id": str(cfg),
                                     "inbox_id": str(inbox), "grant_id": "grant-a",
                                     "thread_id": a["provider_thread_id"],
                                     "lane": str(inbox), "turn": jobs[a["msg_id"]]["turn"]}
    # The inbox's threads take consecutive turns of its lane, in the order they were added.
    assert [jobs[a["msg_id"]]["turn"] for a in sorted(added, key=lambda a: a["queued_thread_id"])
            ] == [0, 1, 2]
    c = assert_stats_exact(conn, cfg)
    assert c["threads_queued"] == c["threads_pending"] == 3


def test_overlapping_page_queues_only_the_new_threads(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["t1", "t2"])
    added = discover(conn, cfg, ["t2", "t3", "t4"])
    assert sorted(a["provider_thread_id"] for a in added) == ["t3", "t4"]
    assert queue_depth(conn, TQ) == 4
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == 4
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 4


def test_page_of_known_threads_adds_and_queues_nothing(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["t1", "t2"])
    before = scalar(conn, "SELECT count(*) FROM queued_threads")
    assert discover(conn, cfg, ["t2", "t1"]) == []
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == before
    assert queue_depth(conn, TQ) == 2


def test_empty_page_is_a_no_op(conn: Conn, cfg: uuid.UUID) -> None:
    assert discover(conn, cfg, []) == []
    assert queue_depth(conn, TQ) == 0
    assert counters(conn, cfg)["threads_queued"] == 0


def test_a_full_page_is_counted_in_one_statement(conn: Conn, cfg: uuid.UUID) -> None:
    page = [f"thread-{i:03d}" for i in range(200)]
    added = discover(conn, cfg, page)
    assert len(added) == 200 and len({a["msg_id"] for a in added}) == 200
    jobs = {m["msg_id"]: m["message"]["thread_id"] for m in queue_messages(conn, TQ)}
    assert all(jobs[a["msg_id"]] == a["provider_thread_id"] for a in added)
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 200


@pytest.mark.parametrize(
    "threads", [None, ["t1", None], ["t1", ""]], ids=["null-array", "null-item", "empty-item"])
def test_discovery_rejects_missing_thread_ids(conn: Conn, cfg: uuid.UUID,
                                              threads: list[str | None] | None) -> None:
    assert_rejected(conn, errors.InvalidParameterValue, "thread ids must be non-empty strings",
                    "SELECT * FROM queue_discovered_threads(%s, %s::text[])", (cfg, threads))


def test_discovery_for_an_unknown_configuration_is_rejected(conn: Conn, cfg: uuid.UUID) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT * FROM queue_discovered_threads(%s, ARRAY['t1'])", (MISSING,))


# --- transition_to_thread_sync ------------------------------------------------------------------

def test_transition_ends_discovery(conn: Conn, cfg: uuid.UUID) -> None:
    progress(conn, cfg, "p9", 8, 80)
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is True
    c = config(conn, cfg)
    assert c["backfill_status"] == "thread_sync"
    assert c["discovery_completed_at"] is not None and c["checkpoint_page_token"] is None
    assert c["checkpoint_pages_done"] == 8
    assert c["backfill_progress"]["has_more"] is False
    assert c["backfill_progress"]["threads_discovered"] == 80
    assert sync_stats(conn, cfg)["backfill_status"] == "thread_sync"


def test_transition_straight_from_queued_stamps_the_start(conn: Conn, cfg: uuid.UUID) -> None:
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is True
    c = config(conn, cfg)
    assert c["backfill_started_at"] is not None
    assert c["backfill_started_at"] == c["discovery_completed_at"]


@pytest.mark.parametrize("status", ["thread_sync", "completed"])
def test_transition_again_is_a_no_op_returning_false(conn: Conn, cfg: uuid.UUID,
                                                      status: str) -> None:
    scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,))
    set_config_status(conn, cfg, status)
    before = config(conn, cfg)
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,)) is False
    assert config(conn, cfg) == before


@pytest.mark.parametrize("status", ["pending", "failed"])
def test_transition_from_a_wrong_state_is_rejected(conn: Conn, cfg: uuid.UUID,
                                                   status: str) -> None:
    set_config_status(conn, cfg, status)
    assert_rejected(conn, errors.ObjectNotInPrerequisiteState, f"is {status}",
                    "SELECT transition_to_thread_sync(%s)", (cfg,))


@pytest.mark.parametrize("target", [MISSING, None], ids=["unknown", "null"])
def test_transition_of_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID, target: uuid.UUID | None,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT transition_to_thread_sync(%s::uuid)", (target,))


# --- initialize_sync_stats ----------------------------------------------------------------------

def _mixed_threads(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, [f"t{i}" for i in range(10)])
    set_threads(conn, cfg, "completed", ["t0", "t1", "t2"], 5)
    set_threads(conn, cfg, "completed", ["t3"], 2)
    set_threads(conn, cfg, "processing", ["t4", "t5"])
    set_threads(conn, cfg, "failed", ["t6"], 9)   # messages of a failed thread do not count


def test_initialize_creates_missing_counters_from_the_rows(conn: Conn, cfg: uuid.UUID) -> None:
    _mixed_threads(conn, cfg)
    conn.execute("DELETE FROM inbox_sync_stats WHERE config_id = %s", (cfg,))
    got = one(conn, "SELECT * FROM initialize_sync_stats(%s)", (cfg,))
    expected = {"threads_queued": 10, "threads_pending": 3, "threads_processing": 2,
                "threads_completed": 4, "threads_failed": 1, "messages_synced": 17}
    assert {k: got[k] for k in expected} == expected
    assert got["backfill_status"] == "queued" and got["config_id"] == cfg
    assert counters(conn, cfg) == expected


def test_initialize_repairs_drifted_counters_and_keeps_the_start_time(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    _mixed_threads(conn, cfg)
    started = sync_stats(conn, cfg)["sync_started_at"]
    conn.execute("UPDATE inbox_sync_stats SET threads_queued = 999, threads_pending = -4,"
                 " messages_synced = 1, backfill_status = 'bogus' WHERE config_id = %s", (cfg,))
    scalar(conn, "SELECT config_id FROM initialize_sync_stats(%s)", (cfg,))
    assert_stats_exact(conn, cfg)
    s = sync_stats(conn, cfg)
    assert s["backfill_status"] == "queued" and s["sync_started_at"] == started


def test_initialize_ignores_threads_of_other_backfills(conn: Conn, cfg: uuid.UUID) -> None:
    other = start_backfill(conn, add_inbox(conn))
    discover(conn, other, ["x1", "x2", "x3"])
    discover(conn, cfg, ["t1"])
    scalar(conn, "SELECT config_id FROM initialize_sync_stats(%s)", (cfg,))
    assert counters(conn, cfg)["threads_queued"] == 1
    assert counters(conn, other)["threads_queued"] == 3


@pytest.mark.parametrize("target", [MISSING, None], ids=["unknown", "null"])
def test_initialize_of_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID, target: uuid.UUID | None,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT * FROM initialize_sync_stats(%s::uuid)", (target,))


# --- get_sync_progress --------------------------------------------------------------------------

def test_sync_progress_percent_is_null_while_discovering(conn: Conn, inbox: uuid.UUID,
                                                    cfg: uuid.UUID) -> None:
    progress(conn, cfg, "p2", 1, 3)
    discover(conn, cfg, ["t1", "t2", "t3"])
    set_threads(conn, cfg, "completed", ["t1"], 7)
    p = sync_progress(conn, cfg)
    assert (p["config_id"], p["inbox_id"], p["backfill_status"], p["backfill_kind"]) == (
        cfg, inbox, "discovering", "full")
    assert p["discovery_complete"] is False and p["percent_complete"] is None
    assert (p["pages_done"], p["threads_discovered"]) == (1, 3)
    assert (p["threads_queued"], p["threads_pending"], p["threads_completed"],
            p["messages_synced"]) == (3, 2, 1, 7)
    assert p["backfill_started_at"] is not None and p["discovery_completed_at"] is None


def test_sync_progress_percent_after_transition_counts_completed_and_failed(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    discover(conn, cfg, ["t1", "t2", "t3"])
    assert scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,))
    assert sync_progress(conn, cfg)["percent_complete"] == Decimal("0.00")
    set_threads(conn, cfg, "completed", ["t1"], 1)
    p = sync_progress(conn, cfg)
    assert p["discovery_complete"] is True
    assert p["percent_complete"] == Decimal("33.33")
    set_threads(conn, cfg, "failed", ["t2"])
    assert sync_progress(conn, cfg)["percent_complete"] == Decimal("66.67")
    set_threads(conn, cfg, "processing", ["t3"])
    assert sync_progress(conn, cfg)["percent_complete"] == Decimal("66.67")
    set_threads(conn, cfg, "completed", ["t3"])
    p = sync_progress(conn, cfg)
    assert p["percent_complete"] == Decimal("100.00")
    assert (p["threads_completed"], p["threads_failed"], p["threads_processing"]) == (2, 1, 0)


def test_sync_progress_of_an_empty_finished_discovery_is_complete(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    scalar(conn, "SELECT transition_to_thread_sync(%s)", (cfg,))
    assert sync_progress(conn, cfg)["percent_complete"] == Decimal("100.00")


def test_sync_progress_without_a_stats_row_reports_zeros(conn: Conn, inbox: uuid.UUID) -> None:
    cfg = add_config(conn, inbox, "discovering")
    p = sync_progress(conn, cfg)
    assert (p["threads_queued"], p["threads_completed"], p["messages_synced"]) == (0, 0, 0)
    assert p["percent_complete"] is None
    assert p["last_updated_at"] == config(conn, cfg)["updated_at"]


@pytest.mark.parametrize("target", [MISSING, None], ids=["unknown", "null"])
def test_sync_progress_of_an_unknown_configuration_is_rejected(
    conn: Conn, cfg: uuid.UUID, target: uuid.UUID | None,
) -> None:
    assert_rejected(conn, errors.NoDataFound, "no inbox configuration",
                    "SELECT * FROM get_sync_progress(%s::uuid)", (target,))


# --- counter triggers ---------------------------------------------------------------------------

def test_insert_trigger_counts_rows_inserted_in_any_status(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    conn.execute(
        "INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id, status,"
        " message_count) VALUES (%(c)s, %(i)s, 'a', 'queued', 0), (%(c)s, %(i)s, 'b',"
        " 'processing', 3), (%(c)s, %(i)s, 'c', 'completed', 4), (%(c)s, %(i)s, 'd',"
        " 'completed', 6), (%(c)s, %(i)s, 'e', 'failed', 8)", {"c": cfg, "i": inbox})
    c = assert_stats_exact(conn, cfg)
    assert c == {"threads_queued": 5, "threads_pending": 1, "threads_processing": 1,
                 "threads_completed": 2, "threads_failed": 1, "messages_synced": 10}


def test_threads_of_a_configuration_without_a_counters_row_are_counted_from_their_deltas(
    conn: Conn, inbox: uuid.UUID,
) -> None:
    cfg = add_config(conn, inbox, "discovering")
    insert_thread(conn, cfg, "t1")
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats") == 0
    assert counters(conn, cfg)["threads_queued"] == 1
    fold(conn)  # nothing to fold into yet: the delta waits
    assert counters(conn, cfg)["threads_queued"] == 1
    got = one(conn, "SELECT * FROM initialize_sync_stats(%s)", (cfg,))
    assert got["inbox_id"] == inbox and got["threads_queued"] == 1
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats_deltas") == 0
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 1


def test_one_insert_statement_spanning_two_backfills_counts_each(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    inbox_b = add_inbox(conn)
    cfg_b = start_backfill(conn, inbox_b)
    conn.execute("INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id)"
                 " SELECT c, i, 't' || g FROM (VALUES (%s::uuid, %s::uuid), (%s, %s)) v(c, i),"
                 " generate_series(1, 3) g", (cfg, inbox, cfg_b, inbox_b))
    assert assert_stats_exact(conn, cfg)["threads_queued"] == 3
    assert assert_stats_exact(conn, cfg_b)["threads_queued"] == 3


def test_update_trigger_moves_counts_between_statuses(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["a", "b", "c", "d"])
    steps = [("processing", ["a", "b", "c"], None), ("completed", ["a", "b"], 3),
             ("failed", ["c"], None), ("queued", ["b"], None), ("completed", ["d"], 10)]
    for status, threads, n in steps:
        set_threads(conn, cfg, status, threads, n)
        assert_stats_exact(conn, cfg)
    assert counters(conn, cfg) == {"threads_queued": 4, "threads_pending": 1,
                                   "threads_processing": 0, "threads_completed": 2,
                                   "threads_failed": 1, "messages_synced": 13}


def test_update_trigger_follows_message_count_of_completed_threads(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    discover(conn, cfg, ["a", "b"])
    set_threads(conn, cfg, "completed", ["a"], 5)
    conn.execute("UPDATE queued_threads SET message_count = 8 WHERE provider_thread_id = 'a'")
    conn.execute("UPDATE queued_threads SET message_count = 4 WHERE provider_thread_id = 'b'")
    assert counters(conn, cfg)["messages_synced"] == 8
    set_threads(conn, cfg, "failed", ["a"])
    assert counters(conn, cfg)["messages_synced"] == 0
    assert_stats_exact(conn, cfg)


def test_updates_that_change_no_status_leave_counters_alone(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["a", "b"])
    before = sync_stats(conn, cfg)
    conn.execute("UPDATE queued_threads SET attempts = attempts + 1, status = status")
    conn.execute("UPDATE queued_threads SET status = 'queued' WHERE false")
    assert sync_stats(conn, cfg) == before


def test_one_update_statement_spanning_two_backfills_counts_each(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    cfg_b = start_backfill(conn, add_inbox(conn))
    discover(conn, cfg, ["a", "b", "c"])
    discover(conn, cfg_b, ["a", "b"])
    conn.execute("UPDATE queued_threads SET status = 'completed', message_count = 2"
                 " WHERE provider_thread_id IN ('a', 'b')")
    assert assert_stats_exact(conn, cfg)["messages_synced"] == 4
    assert assert_stats_exact(conn, cfg_b)["threads_completed"] == 2


def test_delete_trigger_subtracts_the_deleted_rows(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["a", "b", "c", "d"])
    set_threads(conn, cfg, "completed", ["a", "b"], 6)
    set_threads(conn, cfg, "failed", ["c"])
    conn.execute("DELETE FROM queued_threads WHERE provider_thread_id IN ('a', 'c')")
    c = assert_stats_exact(conn, cfg)
    assert c == {"threads_queued": 2, "threads_pending": 1, "threads_processing": 0,
                 "threads_completed": 1, "threads_failed": 0, "messages_synced": 6}
    conn.execute("DELETE FROM queued_threads")
    assert counters(conn, cfg) == dict.fromkeys(c, 0)


def test_deleting_an_inbox_cascades_through_threads_and_counters(
    conn: Conn, inbox: uuid.UUID, cfg: uuid.UUID,
) -> None:
    discover(conn, cfg, ["a", "b"])
    conn.execute("DELETE FROM flux_inboxes WHERE id = %s", (inbox,))
    for table in ("flux_inbox_configurations", "queued_threads", "inbox_sync_stats"):
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 0
    # The delta rows have no key to cascade through (it would lock the configuration in every
    # job): the next fold drops them.
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats_deltas") > 0
    fold(conn)
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats_deltas") == 0


def test_a_fold_moves_the_deltas_into_the_base_row_and_readers_see_the_same_counts(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    discover(conn, cfg, ["a", "b", "c"])
    set_threads(conn, cfg, "completed", ["a"], 3)
    set_threads(conn, cfg, "failed", ["b"])
    current = one(conn, "SELECT * FROM inbox_sync_stats_current WHERE config_id = %s", (cfg,))
    live = counters(conn, cfg)
    assert {k: current[k] for k in live} == live == {
        "threads_queued": 3, "threads_pending": 1, "threads_processing": 0,
        "threads_completed": 1, "threads_failed": 1, "messages_synced": 3}
    assert sync_stats(conn, cfg)["threads_queued"] == 0     # not folded yet: the base lags
    assert fold(conn) == 3   # the page's insert and the two updates: a row per statement
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats_deltas") == 0
    assert {k: sync_stats(conn, cfg)[k] for k in live} == live == counters(conn, cfg)
    assert fold(conn) == 0


def test_due_retries_are_found_through_their_index_not_a_scan_of_history(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    discover(conn, cfg, [f"t{i:05d}" for i in range(5000)])
    conn.execute("UPDATE queued_threads SET status = 'completed'")
    conn.execute("UPDATE queued_threads SET status = 'failed', retry_at = now()"
                 " WHERE provider_thread_id IN ('t00007', 't04000')")
    conn.execute("ANALYZE queued_threads")
    plan = "\n".join(r["QUERY PLAN"] for r in rows(
        conn, "EXPLAIN SELECT q.config_id FROM queued_threads q WHERE q.retry_at <= now()"
              " ORDER BY q.retry_at LIMIT 500"))
    assert "queued_threads_retry_due_idx" in plan, plan
    plan = "\n".join(r["QUERY PLAN"] for r in rows(
        conn, "EXPLAIN SELECT min(q.retry_at) FROM queued_threads q WHERE q.config_id = %s"
              " AND q.retry_at IS NOT NULL AND q.status = 'failed'", (cfg,)))
    assert "Seq Scan" not in plan and "Index" in plan, plan


def test_rolled_back_status_change_leaves_counters_unchanged(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["a"])
    before = counters(conn, cfg)
    conn.autocommit = False
    try:
        set_threads(conn, cfg, "completed", ["a"], 3)
        assert counters(conn, cfg)["threads_completed"] == 1
        conn.rollback()
    finally:
        conn.autocommit = True
    assert counters(conn, cfg) == before


# --- updated_at touch trigger -------------------------------------------------------------------

def test_updated_at_is_touched_on_every_update(conn: Conn, cfg: uuid.UUID) -> None:
    discover(conn, cfg, ["a", "b"])
    conn.execute("UPDATE queued_threads SET updated_at = '2000-01-01'")
    # The trigger overrides even an explicit value.
    assert scalar(conn, "SELECT min(updated_at) FROM queued_threads") > dt.datetime(
        2001, 1, 1, tzinfo=dt.UTC)
    conn.autocommit = False
    try:
        conn.execute("SET LOCAL session_replication_role = replica")   # triggers off
        conn.execute("UPDATE queued_threads SET updated_at = '2000-01-01'")
        conn.commit()
    finally:
        conn.autocommit = True
    conn.execute("UPDATE queued_threads SET attempts = 1 WHERE provider_thread_id = 'a'")
    got = {r["provider_thread_id"]: r["updated_at"]
           for r in rows(conn, "SELECT provider_thread_id, updated_at FROM queued_threads")}
    assert got["a"] == scalar(conn, "SELECT max(updated_at) FROM queued_threads")
    assert got["a"] > dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    assert got["b"] == dt.datetime(2000, 1, 1, tzinfo=dt.UTC)   # untouched row keeps its time


# --- configuration → inbox_sync_stats mirror ----------------------------------------------------

def test_status_and_completion_time_are_mirrored_to_the_counters(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    for status in ("discovering", "thread_sync", "failed", "completed"):
        set_config_status(conn, cfg, status)
        assert sync_stats(conn, cfg)["backfill_status"] == status
    done = dt.datetime(2024, 2, 3, 4, 5, tzinfo=dt.UTC)
    conn.execute("UPDATE flux_inbox_configurations SET backfill_completed_at = %s"
                 " WHERE id = %s", (done, cfg))
    assert sync_stats(conn, cfg)["sync_completed_at"] == done


def test_unrelated_configuration_updates_do_not_touch_the_counters(
    conn: Conn, cfg: uuid.UUID,
) -> None:
    conn.execute("UPDATE inbox_sync_stats SET backfill_status = 'marker' WHERE config_id = %s",
                 (cfg,))
    before = sync_stats(conn, cfg)
    conn.execute("UPDATE flux_inbox_configurations SET last_error = 'x',"
                 " backfill_attempts = 4 WHERE id = %s", (cfg,))
    set_config_status(conn, cfg, "queued")    # same value: no change
    assert sync_stats(conn, cfg) == before


def test_mirror_without_a_counters_row_is_harmless(conn: Conn, inbox: uuid.UUID) -> None:
    cfg = add_config(conn, inbox)
    set_config_status(conn, cfg, "failed")
    assert config(conn, cfg)["backfill_status"] == "failed"
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats") == 0
