"""The `nova` command against a real database, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest


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


# --- inbox list, backfill cancel, queues ------------------------------------------------------

def test_inbox_list_shows_every_inbox_with_its_backfill(db_url: str) -> None:
    first = nova(db_url, "inbox", "add", "--grant-id", "g-l1", "--email", "one@x.com").stdout
    nova(db_url, "inbox", "add", "--grant-id", "g-l2", "--email", "two@x.com")
    config = nova(db_url, "backfill", "start", "--inbox", first.strip()).stdout.strip()
    listed = nova(db_url, "inbox", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:4] == ["inbox", "email", "status", "backfill"]
    row = next(line for line in lines if "one@x.com" in line)
    assert row.split()[0] == first.strip() and "queued" in row and config in row
    assert "two@x.com" in listed.stdout and "2 inbox(es)" in listed.stdout
    rows = json.loads(nova(db_url, "inbox", "list", "--json").stdout)
    assert [(r["email"], r["backfill_status"], r["config_id"]) for r in rows] == [
        ("one@x.com", "queued", config), ("two@x.com", None, None)]


def _backfill_with_thread_jobs(db_url: str, grant: str, threads: int) -> str:
    with psycopg.connect(db_url, autocommit=True) as c:
        inbox = c.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES (%s, %s)"
                          " RETURNING id", (grant, f"{grant}@x.com")).fetchone()[0]
        config = c.execute("SELECT queue_inbox_backfill(%s)", (inbox,)).fetchone()[0]
        c.execute("SELECT count(*) FROM queue_discovered_threads(%s, %s)",
                  (config, [f"{grant}-t{n}" for n in range(threads)]))
        c.execute("SELECT update_backfill_orchestration_progress(%s, 'next', 1, %s)",
                  (config, threads))
    return str(config)


def test_backfill_cancel_stops_a_running_backfill_and_resume_continues_it(db_url: str) -> None:
    config = _backfill_with_thread_jobs(db_url, "g-cancel", 3)
    other = _backfill_with_thread_jobs(db_url, "g-other", 2)
    cancelled = nova(db_url, "backfill", "cancel", config)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(
        f"cancelled {config}: 1 backfill job(s) and 3 thread job(s) removed, 3 thread(s) left "
        "waiting")
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT backfill_status, last_error, checkpoint_pages_done FROM"
                         " flux_inbox_configurations WHERE id = %s", (config,)).fetchone() == (
            "failed", "cancelled by an operator", 1)
        # only the cancelled backfill's jobs are gone
        jobs = c.execute("SELECT message->>'config_id', count(*) FROM pgmq.q_thread_sync_jobs"
                         " GROUP BY 1").fetchall()
        assert jobs == [(other, 2)]
        assert c.execute("SELECT message->>'config_id' FROM pgmq.q_inbox_backfill_jobs"
                         ).fetchall() == [(other,)]
        assert c.execute("SELECT backfill_status FROM inbox_sync_stats WHERE config_id = %s",
                         (config,)).fetchone() == ("failed",)
    again = nova(db_url, "backfill", "cancel", config)
    assert again.returncode == 1
    assert again.stderr.strip() == (f"nova: nova_cancel_backfill: configuration {config} is "
                                    "failed, not running")
    resumed = nova(db_url, "backfill", "resume", config)
    assert resumed.returncode == 0 and f"resumed {config} (job " in resumed.stdout
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT backfill_status, checkpoint_page_token FROM"
                         " flux_inbox_configurations WHERE id = %s", (config,)).fetchone() == (
            "discovering", "next")


def test_queues_shows_depth_oldest_age_and_dead_letters(db_url: str) -> None:
    _archive_a_thread_job(db_url)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SELECT pgmq.send('attachment_downloads', '{}'::jsonb) FROM generate_series(1,"
                  " 2)")
        c.execute("UPDATE pgmq.q_attachment_downloads SET enqueued_at = now() - interval '5 min'")
    out = nova(db_url, "queues")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    assert out.stdout.splitlines()[0].split() == ["queue", "depth", "oldest", "dead", "letters",
                                                  "ever", "sent"]
    name, depth, oldest, dead, _sent = lines["attachment_downloads"]
    assert (depth, dead) == ("2", "0") and oldest.startswith("5m")
    assert lines["thread_sync_jobs"][1:4] == ["0", "-", "1"]  # the dead letter
    rows = {r["queue_name"]: r for r in json.loads(nova(db_url, "queues", "--json").stdout)}
    assert rows["thread_sync_jobs"]["dead_letters"] == 1
    assert rows["attachment_downloads"]["queue_length"] == 2


# --- one clear line and a documented exit code, never a traceback ----------------------------

UNKNOWN = str(uuid.uuid4())
COMMANDS = [
    ["inbox", "list"], ["inbox", "add", "--grant-id", "g", "--email", "e@x.com"],
    ["backfill", "start", "--inbox", UNKNOWN], ["backfill", "resume", UNKNOWN],
    ["backfill", "cancel", UNKNOWN], ["progress", UNKNOWN], ["progress"], ["queues"],
    ["failures"], ["replay", "thread_sync_jobs", "--all"], ["migrate"], ["verify", "x"],
    ["run"],
]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_database_that_is_down_is_one_line_and_exit_1(command: list[str]) -> None:
    down = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nova"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVA_", "NYLAS_"))}
    env.update({"NOVA_DATABASE_URL": down, "NYLAS_API_KEY": "k"})
    out = subprocess.run([sys.executable, "-m", "nova", *command], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    line = _one_line_error(out)
    assert "refused" in line or "connect" in line.lower(), line


@pytest.mark.parametrize("command", [c for c in COMMANDS if c[0] != "run"],
                         ids=lambda c: " ".join(c[:2]))
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(command: list[str]) -> None:
    env = {**os.environ, "NOVA_DATABASE_URL": "postgresql://x/y", "BATCH_SIZE": "many"}
    out = subprocess.run([sys.executable, "-m", "nova", *command], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert _one_line_error(out).startswith("nova: invalid settings: BATCH_SIZE:")


@pytest.mark.parametrize("command", [
    ["backfill", "resume", UNKNOWN], ["backfill", "cancel", UNKNOWN], ["progress", UNKNOWN],
    ["backfill", "start", "--inbox", UNKNOWN], ["replay", "thread_sync_jobs", "999"],
], ids=lambda c: " ".join(c[:2]))
def test_an_unknown_id_is_one_line_and_exit_1(command: list[str], db_url: str) -> None:
    out = nova(db_url, *command)
    assert out.returncode == 1
    line = _one_line_error(out)
    assert UNKNOWN in line or "999" in line, line


def test_bad_usage_and_a_missing_setting_are_one_line_and_exit_2(db_url: str) -> None:
    usage = nova(db_url, "backfill", "cancel")
    assert usage.returncode == 2
    assert _one_line_error(usage) == ("nova backfill cancel: the following arguments are "
                                      "required: config_id (see nova backfill cancel --help)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NYLAS_")}
    env["NOVA_DATABASE_URL"] = db_url
    missing = subprocess.run([sys.executable, "-m", "nova", "verify", "x"], capture_output=True,
                             text=True, timeout=60, env=env)
    assert missing.returncode == 2
    assert _one_line_error(missing) == "nova: NYLAS_API_KEY is not set"
