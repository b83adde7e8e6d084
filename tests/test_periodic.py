"""Periodic work costs what is active (issue #19, item 5): catch-ups follow a silence of the
webhook intake, not a quiet inbox; retention prunes finished work and keeps the record of work
not done; the timed sweeps look at slices, the queue overview estimates a large archive, the
monitor logs what changed. Costs themselves are shown by benchmarks/bench_periodic.py."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from nova.monitor_progress import ProgressLog

from factories import add_inbox, counters, fold, one, rows, scalar, start_backfill

Conn = psycopg.Connection[Any]
GAP = "interval '1 hour', interval '10 minutes'"


def completed_inbox(conn: Conn, grant: str, completed_ago: str = "3 hours") -> uuid.UUID:
    inbox = add_inbox(conn, grant_id=grant)
    conn.execute("INSERT INTO flux_inbox_configurations (inbox_id, backfill_status,"
                 " backfill_since, backfill_completed_at) VALUES (%s, 'completed',"
                 " now() - interval '30 days', now() - %s::interval)", (inbox, completed_ago))
    return inbox


def webhook(conn: Conn, grant: str, ago: str, status: str = "processed") -> uuid.UUID:
    nid = scalar(conn, "INSERT INTO flux_webhook_notifications (webhook_id, notification_type,"
                       " grant_id, payload, status, received_at) VALUES (%s, 'message.created',"
                       " %s, %s, %s, now() - %s::interval) RETURNING id",
                 (f"wh-{uuid.uuid4().hex[:10]}", grant, Jsonb({"data": {"object": {}}}), status,
                  ago))
    return uuid.UUID(str(nid))


def catchups(conn: Conn) -> list[uuid.UUID]:
    return [r["inbox_id"] for r in rows(conn, f"SELECT * FROM queue_due_catchups({GAP})")
            if r["config_id"] is not None]


# --- catch-ups ---------------------------------------------------------------------------

def test_a_quiet_inbox_in_a_flowing_fleet_gets_no_catch_up(conn: Conn) -> None:
    completed_inbox(conn, "g-quiet")  # nothing heard for 3 hours: quiet, not lost
    busy = completed_inbox(conn, "g-busy")
    webhook(conn, "g-busy", "1 minute")  # the intake flows
    assert catchups(conn) == []
    assert scalar(conn, "SELECT count(*) FROM pgmq.q_inbox_backfill_jobs") == 0
    assert busy is not None


def test_a_silent_intake_catches_up_every_inbox_not_heard_of_and_again_when_it_returns(
        conn: Conn) -> None:
    quiet = completed_inbox(conn, "g-a")
    recent = completed_inbox(conn, "g-b", completed_ago="10 minutes")
    webhook(conn, "g-a", "2 hours")  # the last webhook of the fleet, two hours ago
    assert catchups(conn) == [quiet]  # the one heard of within the gap waits
    config = scalar(conn, "SELECT id FROM flux_inbox_configurations WHERE inbox_id = %s",
                    (quiet,))
    assert one(conn, "SELECT backfill_kind, backfill_status FROM flux_inbox_configurations"
                     " WHERE id = %s", (config,)) == {"backfill_kind": "catch_up",
                                                      "backfill_status": "queued"}
    assert catchups(conn) == []  # running: not twice
    # Its catch-up completes; webhooks come back: whoever was not heard of since before the
    # return gets one more, the gap between its last listing and the return.
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " backfill_completed_at = now() - interval '30 minutes' WHERE id = %s",
                 (config,))
    webhook(conn, "g-b", "1 minute")
    assert sorted(catchups(conn)) == sorted([quiet, recent])
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " backfill_completed_at = now()")
    assert catchups(conn) == []  # the silence is over: nothing more, however quiet


def test_no_catch_up_for_an_inbox_whose_fleet_never_went_silent_however_long_it_is_quiet(
        conn: Conn) -> None:
    completed_inbox(conn, "g-old", completed_ago="30 days")
    completed_inbox(conn, "g-live")
    for minutes in range(0, 180, 30):  # a webhook of another grant every half hour
        webhook(conn, "g-live", f"{minutes} minutes")
    assert catchups(conn) == []


# --- retention ---------------------------------------------------------------------------

def prune(conn: Conn, batch: int = 1000) -> dict[str, int]:
    return {r["kind"]: int(r["pruned"]) for r in rows(
        conn, "SELECT * FROM nova_prune_finished(now() - interval '7 days', %s)", (batch,))}


def test_retention_prunes_processed_notifications_and_keeps_work_not_done(conn: Conn) -> None:
    old = {s: webhook(conn, "g-r", "8 days", status=s)
           for s in ("processed", "skipped", "error", "waiting", "pending")}
    fresh = webhook(conn, "g-r", "1 day")
    assert prune(conn)["notifications"] == 2
    left = {r["id"] for r in rows(conn, "SELECT id FROM flux_webhook_notifications")}
    assert left == {old["error"], old["waiting"], old["pending"], fresh}
    assert prune(conn)["notifications"] == 0
    assert {r["kind"]: r["pruned"] for r in rows(
        conn, "SELECT * FROM nova_retention_status()")}["notifications"] == 2


def test_retention_prunes_a_long_completed_backfills_threads_and_keeps_its_figures(
        conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-t")
    config = start_backfill(conn, inbox)
    for i, status in enumerate(["completed", "completed", "completed", "failed"]):
        conn.execute("SELECT queue_thread_sync(%s, %s)", (config, f"t{i}"))
        conn.execute("UPDATE queued_threads SET status = %s, message_count = 2,"
                     " processed_at = now() WHERE provider_thread_id = %s", (status, f"t{i}"))
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " discovery_completed_at = now(), backfill_completed_at = now() - interval"
                 " '8 days' WHERE id = %s", (config,))
    before = counters(conn, config)
    assert prune(conn, batch=2)["threads"] == 2  # a batch at a time
    assert prune(conn, batch=2)["threads"] == 1
    assert [r["status"] for r in rows(conn, "SELECT status FROM queued_threads")] == ["failed"]
    fold(conn)
    assert counters(conn, config) == before  # a completed backfill keeps its figures
    assert scalar(conn, "SELECT threads_pruned_at IS NOT NULL FROM flux_inbox_configurations"
                        " WHERE id = %s", (config,)) is True
    assert prune(conn)["threads"] == 0


def test_retention_keeps_a_recent_backfills_threads(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-n")
    config = start_backfill(conn, inbox)
    conn.execute("SELECT queue_thread_sync(%s, 't')", (config,))
    conn.execute("UPDATE queued_threads SET status = 'completed'")
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " backfill_completed_at = now() - interval '1 day' WHERE id = %s", (config,))
    assert prune(conn)["threads"] == 0
    assert scalar(conn, "SELECT count(*) FROM queued_threads") == 1


def test_retention_prunes_resolved_dead_letters_and_keeps_unresolved_ones(conn: Conn) -> None:
    done = webhook(conn, "g-d", "9 days", status="processed")
    failed = webhook(conn, "g-d", "9 days", status="error")
    conn.execute("DELETE FROM pgmq.q_nylas_webhook_notifications")
    for nid in (done, failed):
        msg = scalar(conn, "SELECT pgmq.send('nylas_webhook_notifications', %s)",
                     (Jsonb({"notification_id": str(nid)}),))
        conn.execute("SELECT pgmq.archive('nylas_webhook_notifications', %s::bigint)", (msg,))
    bad = scalar(conn, "SELECT pgmq.send('nylas_webhook_notifications', %s)",
                 (Jsonb({"notification_id": "not-a-uuid"}),))
    conn.execute("SELECT pgmq.archive('nylas_webhook_notifications', %s::bigint)", (bad,))
    conn.execute("UPDATE pgmq.a_nylas_webhook_notifications"
                 " SET archived_at = now() - interval '8 days'")
    pruned = prune(conn)
    assert pruned["dead_letters:nylas_webhook_notifications"] == 1
    left = [r["message"] for r in rows(
        conn, "SELECT message FROM pgmq.a_nylas_webhook_notifications ORDER BY msg_id")]
    assert left == [{"notification_id": str(failed)}, {"notification_id": "not-a-uuid"}]
    # the processed notification was old too: it went with its dead letter's record
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications WHERE id = %s",
                  (done,)) == 0


def test_retention_prunes_a_thread_dead_letter_once_its_thread_completed(conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-dl")
    config = start_backfill(conn, inbox)
    jobs = {t: scalar(conn, "SELECT queue_thread_sync(%s, %s)", (config, t))
            for t in ("later-done", "still-failed")}
    for msg in jobs.values():
        conn.execute("SELECT pgmq.archive('thread_sync_jobs', %s::bigint)", (msg,))
    conn.execute("UPDATE queued_threads SET status = CASE provider_thread_id WHEN 'later-done'"
                 " THEN 'completed' ELSE 'failed' END")
    conn.execute("UPDATE pgmq.a_thread_sync_jobs SET archived_at = now() - interval '8 days'")
    assert prune(conn)["dead_letters:thread_sync_jobs"] == 1
    assert [r["msg_id"] for r in rows(conn, "SELECT msg_id FROM pgmq.a_thread_sync_jobs")] == [
        jobs["still-failed"]]


# --- sweeps that look at slices, overviews that estimate -------------------------------------

def test_the_stuck_thread_sweep_walks_the_open_threads_in_slices_and_finds_every_one(
        conn: Conn) -> None:
    inbox = add_inbox(conn, grant_id="g-s")
    config = start_backfill(conn, inbox)
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync'"
                 " WHERE id = %s", (config,))
    # 6,000 open threads whose jobs exist, and one past the first two slices of 2,500 whose job
    # vanished.
    conn.execute("INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id,"
                 " queue_msg_id) SELECT %s, %s, 't' || g, 0 FROM generate_series(1, 6000) g",
                 (config, inbox))
    conn.execute("SELECT pgmq.send('thread_sync_jobs', '{}'::jsonb)")  # msg_id 1
    conn.execute("UPDATE queued_threads SET queue_msg_id = 1")
    conn.execute("UPDATE queued_threads SET queue_msg_id = NULL"
                 " WHERE provider_thread_id = 't5500'")
    for _slice in range(2):  # threads 1-2,500, then 2,501-5,000: all with their job
        assert rows(conn, "SELECT * FROM recover_stuck_threads(interval '1 minute', 1)") == []
    [found] = rows(conn, "SELECT * FROM recover_stuck_threads(interval '1 minute', 1)")
    assert found["provider_thread_id"] == "t5500" and found["was"] == "queued"


def test_the_premature_completion_sweep_walks_open_backfills_in_slices_and_finds_each(
        conn: Conn) -> None:
    # 301 backfills with an open thread each; the one with the highest id, past the first
    # slice of 250, says completed.
    conn.execute("INSERT INTO flux_inboxes (grant_id, email) SELECT 'g-pc' || g,"
                 " 'pc' || g || '@example.com' FROM generate_series(1, 301) g")
    conn.execute("INSERT INTO flux_inbox_configurations (inbox_id, backfill_status)"
                 " SELECT id, 'thread_sync' FROM flux_inboxes WHERE grant_id LIKE 'g-pc%'")
    conn.execute("INSERT INTO queued_threads (config_id, inbox_id, provider_thread_id)"
                 " SELECT id, inbox_id, 't' FROM flux_inbox_configurations")
    last = scalar(conn, "SELECT id FROM flux_inbox_configurations ORDER BY id DESC LIMIT 1")
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed',"
                 " backfill_completed_at = now() WHERE id = %s", (last,))
    assert rows(conn, "SELECT * FROM recover_premature_completions()") == []  # first 250
    [found] = rows(conn, "SELECT * FROM recover_premature_completions()")
    assert found["config_id"] == last and found["threads_open"] == 1
    assert scalar(conn, "SELECT backfill_status FROM flux_inbox_configurations WHERE id = %s",
                  (last,)) == "thread_sync"
    assert rows(conn, "SELECT * FROM recover_premature_completions()") == []  # from the start


def test_the_queue_overview_estimates_a_large_archive_instead_of_counting_it(
        conn: Conn) -> None:
    conn.execute("SELECT pgmq.archive('inbox_backfill_jobs', pgmq.send('inbox_backfill_jobs',"
                 " '{}'::jsonb)) FROM generate_series(1, 30)")
    conn.execute("ANALYZE pgmq.a_inbox_backfill_jobs")
    exact = {r["queue_name"]: r for r in rows(conn, "SELECT * FROM nova_queue_overview(100)")}
    assert exact["inbox_backfill_jobs"]["dead_letters"] == 30
    assert exact["inbox_backfill_jobs"]["dead_letters_estimated"] is False
    capped = {r["queue_name"]: r for r in rows(conn, "SELECT * FROM nova_queue_overview(10)")}
    assert capped["inbox_backfill_jobs"]["dead_letters_estimated"] is True
    assert capped["inbox_backfill_jobs"]["dead_letters"] >= 11
    assert capped["thread_sync_jobs"]["dead_letters"] == 0


def test_the_queue_overview_estimates_a_long_queue_instead_of_counting_it(conn: Conn) -> None:
    conn.execute("SELECT pgmq.send('inbox_backfill_jobs', '{}'::jsonb)"
                 " FROM generate_series(1, 30)")
    conn.execute("ANALYZE pgmq.q_inbox_backfill_jobs")
    exact = {r["queue_name"]: r for r in rows(conn, "SELECT * FROM nova_queue_overview(100)")}
    assert exact["inbox_backfill_jobs"]["queue_length"] == 30
    assert exact["inbox_backfill_jobs"]["queue_length_estimated"] is False
    assert exact["inbox_backfill_jobs"]["oldest_msg_age_sec"] is not None
    capped = {r["queue_name"]: r for r in rows(conn, "SELECT * FROM nova_queue_overview(10)")}
    assert capped["inbox_backfill_jobs"]["queue_length_estimated"] is True
    assert capped["inbox_backfill_jobs"]["queue_length"] >= 11
    assert capped["inbox_backfill_jobs"]["oldest_msg_age_sec"] is not None
    assert capped["inbox_backfill_jobs"]["total_messages"] == 30
    assert capped["thread_sync_jobs"]["queue_length"] == 0
    assert capped["thread_sync_jobs"]["queue_length_estimated"] is False


def test_running_backfills_figures_are_the_same_before_and_after_the_fold(conn: Conn) -> None:
    configs = []
    for i in range(3):
        inbox = add_inbox(conn, grant_id=f"g-f{i}")
        configs.append(start_backfill(conn, inbox))
        for t in range(i + 2):
            conn.execute("SELECT queue_thread_sync(%s, %s)", (configs[-1], f"t{t}"))
    fold(conn)
    conn.execute("UPDATE queued_threads SET status = 'completed', message_count = 2"
                 " WHERE provider_thread_id = 't0'")
    conn.execute("UPDATE queued_threads SET status = 'processing' WHERE provider_thread_id = 't1'")
    figures = ("config_id", "threads_queued", "threads_pending", "threads_processing",
               "threads_completed", "messages_synced")
    before = [{k: r[k] for k in figures}
              for r in rows(conn, "SELECT * FROM nova_backfill_progress('{}', true)")]
    assert scalar(conn, "SELECT count(*) FROM inbox_sync_stats_deltas") > 0
    assert fold(conn) > 0
    after = [{k: r[k] for k in figures}
             for r in rows(conn, "SELECT * FROM nova_backfill_progress('{}', true)")]
    assert before == after
    assert [r["threads_completed"] for r in after] == [1, 1, 1]
    assert [r["threads_processing"] for r in after] == [1, 1, 1]
    assert [r["threads_pending"] for r in after] == [0, 1, 2]


async def test_the_monitors_retention_pass_prunes_its_batch_and_no_more(
        pool: Any, conn: Conn) -> None:
    from nova.completion import PRUNE_CHUNK, CompletionMonitor
    from nova.config import load_settings

    total = PRUNE_CHUNK * 2 + 50
    conn.execute("INSERT INTO flux_webhook_notifications (webhook_id, notification_type,"
                 " grant_id, payload, status, received_at) SELECT 'wh-old-' || g,"
                 " 'message.created', 'g-p', '{}'::jsonb, 'processed', now() - interval '8 days'"
                 " FROM generate_series(1, %s) g", (total,))
    # More than one statement's worth (PRUNE_CHUNK each), less than what is prunable. The
    # pick of a statement once ran again per deleted row and took more than it was asked.
    batch = PRUNE_CHUNK + 10
    monitor = CompletionMonitor(load_settings(retention_days=7, retention_batch=batch,
                                              grant_recheck_seconds=0), pool=pool)
    assert (await monitor.prune())["notifications"] == batch
    assert (await monitor.prune())["notifications"] == batch
    assert (await monitor.prune())["notifications"] == total - 2 * batch
    assert "notifications" not in await monitor.prune()
    assert scalar(conn, "SELECT count(*) FROM flux_webhook_notifications") == 0


def test_only_backfills_whose_rows_may_be_done_are_recounted(conn: Conn) -> None:
    configs = {}
    for name in ("open", "done"):
        inbox = add_inbox(conn, grant_id=f"g-{name}")
        configs[name] = start_backfill(conn, inbox)
        conn.execute("SELECT queue_thread_sync(%s, 't')", (configs[name],))
    conn.execute("UPDATE queued_threads SET status = 'completed' WHERE config_id = %s",
                 (configs["done"],))
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = 'thread_sync',"
                 " discovery_completed_at = now()")
    assert [r["config_id"] for r in rows(conn, "SELECT * FROM nova_backfills_to_recount()")] \
        == [configs["done"]]


def test_the_progress_of_many_backfills_in_one_statement_matches_get_sync_progress(
        conn: Conn) -> None:
    configs = []
    for i in range(3):
        inbox = add_inbox(conn, grant_id=f"g-p{i}")
        configs.append(start_backfill(conn, inbox))
        for t in range(i + 1):
            conn.execute("SELECT queue_thread_sync(%s, %s)", (configs[-1], f"t{t}"))
    conn.execute("UPDATE queued_threads SET status = 'completed', message_count = 3"
                 " WHERE provider_thread_id = 't0'")
    many = rows(conn, "SELECT * FROM nova_backfill_progress('{}', true)")
    single = [one(conn, "SELECT * FROM get_sync_progress(%s)", (c,)) for c in configs]
    assert many == single


# --- the monitor's log ---------------------------------------------------------------------

def _row(config: int, done: int, status: str = "thread_sync") -> dict[str, Any]:
    return {"config_id": uuid.UUID(int=config), "backfill_status": status,
            "discovery_complete": True, "threads_discovered": 100, "threads_queued": 100,
            "threads_completed": done, "threads_failed": 0, "messages_synced": done * 3,
            "percent_complete": done}


def test_many_running_backfills_make_one_summary_line_not_one_each() -> None:
    progress = ProgressLog(detail_limit=20)
    first = progress.lines([_row(i, 0) for i in range(500)])
    assert len(first) == 22  # 20 starts, the count of the other 480, then the summary
    assert first[20] == "[Monitor] ... and 480 more backfills started or changed phase"
    assert "500 backfills running" in first[21]
    moved = progress.lines([_row(i, 1 if i < 10 else 0) for i in range(500)])
    assert len(moved) == 1
    assert "500 backfills running" in moved[0] and "threads done +10" in moved[0]
    assert progress.lines([_row(i, 1 if i < 10 else 0) for i in range(500)]) == []


def test_a_few_backfills_keep_their_seed_lines_when_they_move() -> None:
    progress = ProgressLog(detail_limit=20)
    progress.lines([_row(1, 0), _row(2, 0)])
    lines = progress.lines([_row(1, 50), _row(2, 0)])
    assert lines == ["[Monitor] Config 00000000... | Status: thread_sync | Progress: 50% "
                     "(50/100)"]
