"""The `nova` command against a real database, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg


def nova(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOVA_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "nova", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_inbox_add_backfill_start_and_progress(db_url: str) -> None:
    added = nova(db_url, "inbox", "add", "--grant-id", "g-cli", "--email", "cli@example.com")
    assert added.returncode == 0, added.stderr
    inbox_id = uuid.UUID(added.stdout.strip())

    started = nova(db_url, "backfill", "start", "--inbox", str(inbox_id))
    assert started.returncode == 0, started.stderr
    config_id = uuid.UUID(started.stdout.strip())
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT inbox_id, backfill_status FROM flux_inbox_configurations"
                         " WHERE id = %s", (config_id,)).fetchone() == (inbox_id, "queued")

    shown = nova(db_url, "progress", str(config_id), "--json")
    assert shown.returncode == 0, shown.stderr
    progress = json.loads(shown.stdout)
    assert progress["config_id"] == str(config_id)
    assert progress["percent_complete"] is None  # discovery has not finished
    text = nova(db_url, "progress", str(config_id))
    assert f"Config {config_id} | Status: queued | Progress: discovering" in text.stdout


def test_backfill_rejects_a_second_start_and_a_range_over_a_year(db_url: str) -> None:
    inbox_id = nova(db_url, "inbox", "add", "--grant-id", "g2", "--email", "b@example.com")
    inbox = inbox_id.stdout.strip()
    assert nova(db_url, "backfill", "start", "--inbox", inbox).returncode == 0
    again = nova(db_url, "backfill", "start", "--inbox", inbox)
    assert again.returncode == 1 and "already queued" in again.stderr
    old = nova(db_url, "backfill", "start", "--inbox", inbox, "--since", "2001-01-01")
    assert old.returncode == 1 and "more than one year back" in old.stderr


def test_bad_arguments_are_usage_errors(db_url: str) -> None:
    assert nova(db_url, "progress", "not-a-uuid").returncode == 2
    missing = nova(db_url, "progress", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no inbox configuration" in missing.stderr
    bad_date = nova(db_url, "backfill", "start", "--inbox", str(uuid.uuid4()), "--since", "May 1")
    assert bad_date.returncode == 2 and "YYYY-MM-DD" in bad_date.stderr


def test_queues_lists_the_four_queues(db_url: str) -> None:
    out = nova(db_url, "queues", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(q["queue_name"] for q in json.loads(out.stdout)) == [
        "attachment_downloads", "inbox_backfill_jobs", "nylas_webhook_notifications",
        "thread_sync_jobs"]


def _archive_a_thread_job(db_url: str) -> tuple[int, int]:
    """A thread job that ran out of attempts: archived, its queued thread failed."""
    with psycopg.connect(db_url, autocommit=True) as c:
        inbox = c.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ('gf', 'f@x.com')"
                          " RETURNING id").fetchone()[0]
        config = c.execute("SELECT queue_inbox_backfill(%s)", (inbox,)).fetchone()[0]
        msg_id = c.execute("SELECT queue_thread_sync(%s, 't-dead')", (config,)).fetchone()[0]
        c.execute("SELECT pgmq.archive('thread_sync_jobs', %s::bigint)", (msg_id,))
        row = c.execute("UPDATE queued_threads SET status = 'failed', error_message = 'boom',"
                        " attempts = 5 WHERE provider_thread_id = 't-dead' RETURNING id"
                        ).fetchone()
        return msg_id, row[0]


def test_failures_lists_dead_letters_and_replay_requeues_them(db_url: str) -> None:
    msg_id, row_id = _archive_a_thread_job(db_url)
    listed = nova(db_url, "failures", "--json")
    assert listed.returncode == 0, listed.stderr
    [dead] = json.loads(listed.stdout)
    assert dead["queue_name"] == "thread_sync_jobs" and dead["msg_id"] == msg_id
    assert dead["message"]["thread_id"] == "t-dead"

    replayed = nova(db_url, "replay", "thread_sync_jobs", str(msg_id))
    assert replayed.returncode == 0, replayed.stderr
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM pgmq.a_thread_sync_jobs").fetchone() == (0,)
        queued = c.execute("SELECT msg_id, message FROM pgmq.q_thread_sync_jobs").fetchall()
        assert len(queued) == 1 and queued[0][1]["thread_id"] == "t-dead"
        status = c.execute("SELECT status, attempts, error_message, queue_msg_id FROM"
                           " queued_threads WHERE id = %s", (row_id,)).fetchone()
        assert status == ("queued", 0, None, queued[0][0])
    again = nova(db_url, "replay", "thread_sync_jobs", str(msg_id))
    assert again.returncode == 1 and "no archived message" in again.stderr


def test_replay_all_and_argument_checks(db_url: str) -> None:
    _archive_a_thread_job(db_url)
    assert nova(db_url, "replay", "thread_sync_jobs").returncode == 2  # ids or --all
    assert nova(db_url, "replay", "no_such_queue", "--all").returncode == 1
    out = nova(db_url, "replay", "thread_sync_jobs", "--all")
    assert out.returncode == 0 and "1 message(s) replayed" in out.stdout
    assert "0 dead letter(s)" in nova(db_url, "failures").stdout


def test_backfill_resume_restarts_a_failed_backfill_from_its_checkpoint(db_url: str) -> None:
    inbox = nova(db_url, "inbox", "add", "--grant-id", "g-res", "--email", "r@x.com").stdout
    config = nova(db_url, "backfill", "start", "--inbox", inbox.strip()).stdout.strip()
    running = nova(db_url, "backfill", "resume", config)
    assert running.returncode == 1 and "not failed" in running.stderr
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("DELETE FROM pgmq.q_inbox_backfill_jobs")
        c.execute("UPDATE flux_inbox_configurations SET backfill_status = 'failed',"
                  " checkpoint_pages_done = 2, checkpoint_page_token = 'p3', last_error = 'x'"
                  " WHERE id = %s", (config,))
    # `python -m nova.backfill --resume` is the same command
    env = {**os.environ, "NOVA_DATABASE_URL": db_url}
    resumed = subprocess.run([sys.executable, "-m", "nova.backfill", "--resume", config],
                             capture_output=True, text=True, timeout=60, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {config} (job " in resumed.stdout
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT backfill_status, checkpoint_pages_done, checkpoint_page_token,"
                        " last_error FROM flux_inbox_configurations WHERE id = %s",
                        (config,)).fetchone()
        assert row == ("discovering", 2, "p3", None)
        jobs = c.execute("SELECT message->>'config_id' FROM pgmq.q_inbox_backfill_jobs"
                         ).fetchall()
        assert jobs == [(config,)]
