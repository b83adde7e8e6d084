"""The `nova` command against a real database, run as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import SecretStr


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


# --- inbox add --provider gmail ---------------------------------------------------------------

CREDENTIALS_KEY = "a test passphrase for nova credentials"


@pytest.fixture(scope="module")
def gmail_sb() -> Iterator[Any]:
    """The Gmail sandbox; GMAIL_TOKEN_URI names its token endpoint for the module (Nova posts
    refresh tokens there only, and `nova inbox add` refuses files naming another)."""
    from nova.sandbox.gmail import SandboxGmail

    with SandboxGmail(threads=3, users=2, seed=21) as sb, pytest.MonkeyPatch.context() as env:
        env.setenv("GMAIL_TOKEN_URI", sb.token_uri)
        yield sb


def gmail_add(db_url: str, *args: str, key: str | None = CREDENTIALS_KEY
              ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOVA_CREDENTIALS_KEY"}
    env.update({"NOVA_DATABASE_URL": db_url, "LOG_LEVEL": "debug"})
    if key is not None:
        env["NOVA_CREDENTIALS_KEY"] = key
    return subprocess.run([sys.executable, "-m", "nova", "inbox", "add", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def credentials_file(tmp_path: Path, info: dict[str, Any], name: str = "user.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(info))
    return str(path)


def stored_secret(db_url: str, inbox_id: uuid.UUID) -> dict[str, str]:
    from nova.config import Settings
    from nova.credentials import cipher

    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT secret FROM flux_inbox_credentials WHERE inbox_id = %s",
                        (inbox_id,)).fetchone()
    assert row is not None
    fernet = cipher(Settings(credentials_key=SecretStr(CREDENTIALS_KEY)))
    return dict(json.loads(fernet.decrypt(bytes(row[0]))))


def counts(db_url: str) -> tuple[int, int]:
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT (SELECT count(*) FROM flux_inboxes),"
                        " (SELECT count(*) FROM flux_inbox_credentials)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_inbox_add_gmail_stores_encrypted_credentials_a_token_source_can_use(
        db_url: str, gmail_sb: Any, tmp_path: Path) -> None:
    import httpx

    from nova import db
    from nova.config import Settings
    from nova.credentials import TokenSource, cipher

    user = gmail_sb.users[0]
    info = gmail_sb.credentials(user)
    path = credentials_file(tmp_path, info)
    added = gmail_add(db_url, "--provider", "gmail", "--email", user.upper(),
                      "--credentials", path)
    assert added.returncode == 0, added.stderr
    inbox_id = uuid.UUID(added.stdout.strip())
    for secret in (info["refresh_token"], info["client_secret"]):
        assert secret not in added.stdout + added.stderr
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT provider, grant_id, email, status FROM flux_inboxes"
                         " WHERE id = %s", (inbox_id,)).fetchone() == (
            "gmail", user.lower(), user.upper(), "active")
        raw = c.execute("SELECT client_id, token_uri, scopes, secret FROM"
                        " flux_inbox_credentials WHERE inbox_id = %s", (inbox_id,)).fetchone()
    assert raw[:3] == (None, None, info["scopes"])  # the client and endpoint are sealed
    assert info["refresh_token"].encode() not in bytes(raw[3])
    assert stored_secret(db_url, inbox_id) == {
        "client_id": info["client_id"], "token_uri": gmail_sb.token_uri,
        "client_secret": info["client_secret"], "refresh_token": info["refresh_token"]}

    pool = await db.create_pool(db_url, min_size=1, max_size=2)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            fernet = cipher(Settings(credentials_key=SecretStr(CREDENTIALS_KEY)))
            token = await TokenSource(pool, fernet, http,
                                      token_uri=gmail_sb.token_uri).token(user.lower())
            resp = await http.get(f"{gmail_sb.base_url}/gmail/v1/users/{user.lower()}/profile",
                                  headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200 and resp.json()["emailAddress"] == user
    finally:
        await pool.close()

    nylas = nova(db_url, "inbox", "add", "--grant-id", "g-n", "--email", "n@example.com")
    assert nylas.returncode == 0, nylas.stderr
    listed = nova(db_url, "inbox", "list")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    at = header.index("provider")  # columns are aligned; a row without a backfill has blanks
    shown = {line.split()[0]: line[at:].split()[0] for line in lines[:-1]}
    assert shown == {str(inbox_id): "gmail", nylas.stdout.strip(): "nylas"}


def _bad_file(tmp_path: Path, sb: Any, **changes: Any) -> str:
    info = {**sb.credentials(sb.users[0]), **changes}
    return credentials_file(tmp_path, {k: v for k, v in info.items() if v is not None})


@pytest.mark.parametrize(("case", "expected"), [
    ("no-credentials", "--credentials FILE is required for --provider gmail"),
    ("no-email", "the following arguments are required: --email"),
    ("missing-file", "cannot read credentials file"),
    ("service-account", "service accounts are not supported"),
    ("no-refresh-token", "missing key 'refresh_token'"),
    ("bad-token-uri", "'token_uri' must be an http(s) URL"),
    ("other-token-uri", "'https://collector.example/token' is not GMAIL_TOKEN_URI"),
    ("other-account", "is for "),
    ("no-gmail-scope", "grants no Gmail scope"),
    ("no-key", "NOVA_CREDENTIALS_KEY is not set"),
    ("short-key", "NOVA_CREDENTIALS_KEY is too short"),
    ("not-an-address", "--email: not an e-mail address"),
    ("other-grant", "--grant-id: a Gmail inbox's grant is its e-mail address"),
    ("nylas-without-grant", "--grant-id is required for --provider nylas"),
    ("nylas-with-credentials", "--credentials is for --provider gmail"),
])
def test_inbox_add_gmail_refuses_bad_input_with_exit_2_and_writes_nothing(
        db_url: str, gmail_sb: Any, tmp_path: Path, case: str, expected: str) -> None:
    user, other = gmail_sb.users
    good = _bad_file(tmp_path, gmail_sb)
    key: str | None = CREDENTIALS_KEY
    args = ["--provider", "gmail", "--email", user, "--credentials", good]
    if case == "no-credentials":
        args = args[:4]
    elif case == "no-email":
        args = ["--provider", "gmail", "--credentials", good]
    elif case == "missing-file":
        args[-1] = str(tmp_path / "absent.json")
    elif case == "service-account":
        args[-1] = _bad_file(tmp_path, gmail_sb, type="service_account")
    elif case == "no-refresh-token":
        args[-1] = _bad_file(tmp_path, gmail_sb, refresh_token=None)
    elif case == "bad-token-uri":
        args[-1] = _bad_file(tmp_path, gmail_sb, token_uri="file:///etc/passwd")
    elif case == "other-token-uri":
        args[-1] = _bad_file(tmp_path, gmail_sb, token_uri="https://collector.example/token")
    elif case == "other-account":
        args[3] = other
    elif case == "no-gmail-scope":
        args[-1] = _bad_file(tmp_path, gmail_sb,
                             scopes=["https://www.googleapis.com/auth/cloud-platform"])
    elif case == "no-key":
        key = None
    elif case == "short-key":
        key = "too-short"
    elif case == "not-an-address":
        args[3] = "not an address"
    elif case == "other-grant":
        args += ["--grant-id", "someone-else@example.com"]
    elif case == "nylas-without-grant":
        args = ["--email", user]
    elif case == "nylas-with-credentials":
        args = ["--grant-id", "g", "--email", user, "--credentials", good]
    out = gmail_add(db_url, *args, key=key)
    assert out.returncode == 2, (out.stdout, out.stderr)
    line = _one_line_error(out)
    assert expected in line, line
    assert out.stdout == ""
    assert gmail_sb.credentials(user)["refresh_token"] not in out.stderr
    assert counts(db_url) == (0, 0)


def test_re_adding_an_auth_expired_gmail_inbox_makes_it_active_with_a_catch_up(
        db_url: str, gmail_sb: Any, tmp_path: Path) -> None:
    user = gmail_sb.users[1]
    first = gmail_add(db_url, "--provider", "gmail", "--email", user, "--credentials",
                      credentials_file(tmp_path, gmail_sb.credentials(user), "old.json"))
    assert first.returncode == 0, first.stderr
    inbox_id = uuid.UUID(first.stdout.strip())
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SELECT nova_set_inbox_status(%s, 'auth_expired')", (inbox_id,))
    renewed = gmail_sb.reauthorize(user)  # the user consented again: a new refresh token
    again = gmail_add(db_url, "--provider", "gmail", "--email", user, "--credentials",
                      credentials_file(tmp_path, renewed, "new.json"))
    assert again.returncode == 0, again.stderr
    assert uuid.UUID(again.stdout.strip()) == inbox_id
    assert "was auth_expired, active again" in again.stderr
    assert renewed["refresh_token"] not in again.stdout + again.stderr
    assert stored_secret(db_url, inbox_id)["refresh_token"] == renewed["refresh_token"]
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT status, auth_expired_at FROM flux_inboxes WHERE id = %s",
                         (inbox_id,)).fetchone() == ("active", None)
        configs = c.execute("SELECT backfill_kind, backfill_status FROM"
                            " flux_inbox_configurations WHERE inbox_id = %s",
                            (inbox_id,)).fetchall()
        assert configs == [("catch_up", "queued")]
        assert c.execute("SELECT count(*) FROM flux_inboxes").fetchone() == (1,)
    # re-adding an active inbox replaces its credentials and changes nothing else
    third = gmail_add(db_url, "--provider", "gmail", "--email", user, "--credentials",
                      credentials_file(tmp_path, gmail_sb.credentials(user), "third.json"))
    assert third.returncode == 0 and third.stderr == "", third.stderr
    assert counts(db_url) == (1, 1)


def test_re_adding_a_revoked_gmail_inbox_makes_it_active_with_a_catch_up(
        db_url: str, gmail_sb: Any, tmp_path: Path) -> None:
    """`revoked` can be undone: new credentials added by the operator are their word."""
    user = gmail_sb.users[0]
    info = gmail_sb.credentials(user)
    added = gmail_add(db_url, "--provider", "gmail", "--email", user, "--credentials",
                      credentials_file(tmp_path, info))
    inbox_id = uuid.UUID(added.stdout.strip())
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SELECT nova_set_inbox_status(%s, 'revoked')", (inbox_id,))
    renewed = gmail_sb.reauthorize(user)
    out = gmail_add(db_url, "--provider", "gmail", "--email", user, "--credentials",
                    credentials_file(tmp_path, renewed, "renewed.json"))
    assert out.returncode == 0, out.stderr
    assert "was revoked, active again; catch-up backfill" in out.stderr
    assert stored_secret(db_url, inbox_id)["refresh_token"] == renewed["refresh_token"]
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT status FROM flux_inboxes WHERE id = %s",
                         (inbox_id,)).fetchone() == ("active",)
        assert c.execute("SELECT backfill_kind, backfill_status FROM flux_inbox_configurations"
                         " WHERE inbox_id = %s", (inbox_id,)).fetchall() \
            == [("catch_up", "queued")]


def test_inbox_add_gmail_with_the_database_down_is_one_line_and_exit_1(
        gmail_sb: Any, tmp_path: Path) -> None:
    user = gmail_sb.users[0]
    down = f"postgresql://postgres@127.0.0.1:{_closed_port()}/nova"
    out = gmail_add(down, "--provider", "gmail", "--email", user, "--credentials",
                    credentials_file(tmp_path, gmail_sb.credentials(user)))
    assert out.returncode == 1
    line = _one_line_error(out)
    assert line.startswith("nova: the database did not answer:") and "connect" in line.lower()
