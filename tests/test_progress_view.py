"""The live view: `nova progress` follows a backfill to its end (bars on a terminal, lines
when piped), and `python -m nova` on a terminal shows its demo backfill's bar above the log."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from nova.config import load_settings
from nova.progress_view import Backfill, details, plain_line
from nova.service import terminal_console

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class Terminal:
    """A process on a pseudo-terminal (120 columns), its output gathered by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        import pty

        master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave,
                                     env={**env, "COLUMNS": "160", "LINES": "40",
                                          "TERM": "xterm-256color"}, close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                self.raw += chunk
            elif self.proc.poll() is not None:
                return

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            assert time.monotonic() < deadline, f"no {pattern!r} in:\n{self.text[-3000:]}"
            assert self.proc.poll() is None or re.search(pattern, self.text), self.text[-3000:]
            time.sleep(0.05)

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        os.close(self.master)
        return code


def _backfill(db_url: str, grant: str, threads: int) -> str:
    """A backfill whose discovery is over, its threads queued (no worker runs them)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        row = c.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES (%s, %s) RETURNING id",
                        (grant, f"{grant}@example.com")).fetchone()
        assert row is not None
        config = c.execute("SELECT queue_inbox_backfill(%s)", (row[0],)).fetchone()
        assert config is not None
        c.execute("SELECT count(*) FROM queue_discovered_threads(%s, %s)",
                  (config[0], [f"{grant}-{n}" for n in range(threads)]))
        c.execute("SELECT update_backfill_orchestration_progress(%s, NULL, 1, %s)",
                  (config[0], threads))
        c.execute("SELECT transition_to_thread_sync(%s)", (config[0],))
        c.execute("DELETE FROM pgmq.q_inbox_backfill_jobs")
    return str(config[0])


def _sync(db_url: str, config: str, threads: int, *, fail: int = 0) -> None:
    """What thread workers would do: `threads` more threads done (`fail` of them failed)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE queued_threads SET status = CASE WHEN n <= %s THEN 'failed'"
                  " ELSE 'completed' END, message_count = 2 FROM (SELECT id, row_number()"
                  " OVER (ORDER BY id) AS n FROM queued_threads WHERE config_id = %s AND"
                  " status = 'queued' ORDER BY id LIMIT %s) pick WHERE queued_threads.id ="
                  " pick.id", (fail, config, threads))
        c.execute("SELECT * FROM complete_backfill_if_done(%s)", (config,))


@pytest.fixture
def cli_env(db_url: str) -> Iterator[dict[str, str]]:
    yield {**os.environ, "NOVA_DATABASE_URL": db_url, "NOVA_PROVIDER_RATE_LIMIT": "4"}


def test_nova_progress_on_a_terminal_shows_live_bars_until_the_backfill_completes(
        db_url: str, cli_env: dict[str, str]) -> None:
    config = _backfill(db_url, "g-live", 8)
    term = Terminal([sys.executable, "-m", "nova", "progress", config, "--interval", "0.1"],
                    cli_env)
    term.wait_for(r"g-live@example\.com " + config[:8])
    term.wait_for(r"0/8 threads")
    term.wait_for(r"ETA 0:02 at 4 req/s")  # 8 threads at the configured 4 requests/s
    _sync(db_url, config, 4, fail=1)
    term.wait_for(r"50% thread_sync +4/8 threads")
    term.wait_for(r"1 failed")
    _sync(db_url, config, 4)
    assert term.wait() == 0, term.text
    # 7 threads completed with 2 messages each; the failed one synced none
    assert re.search(r"━+ 100% completed +8/8 threads · 14 messages · 1 failed", term.text), \
        term.text[-2000:]


def test_nova_progress_follow_prints_a_line_per_change_and_fails_with_the_backfill(
        db_url: str, cli_env: dict[str, str]) -> None:
    config = _backfill(db_url, "g-follow", 4)
    proc = subprocess.Popen([sys.executable, "-m", "nova", "progress", config, "--follow",
                             "--interval", "0.1"], env=cli_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith(f"Config {config} | Status: thread_sync | Progress: 0.00% (0/4)")
    assert "ETA: 0:01 at 4 req/s" in first
    _sync(db_url, config, 2)
    assert "Progress: 50.00% (2/4)" in proc.stdout.readline()
    cancelled = subprocess.run([sys.executable, "-m", "nova", "backfill", "cancel", config],
                               env=cli_env, capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Status: failed" in out and "error: cancelled by an operator" in out
    assert err.strip() == f"nova: backfill {config} failed: cancelled by an operator"


def test_without_an_id_every_running_backfill_is_shown(db_url: str,
                                                       cli_env: dict[str, str]) -> None:
    one, two = _backfill(db_url, "g-a", 2), _backfill(db_url, "g-b", 3)
    out = subprocess.run([sys.executable, "-m", "nova", "progress"], env=cli_env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [line.split(" | ")[0] for line in out.stdout.splitlines()] == [
        f"Config {one}", f"Config {two}"]


def test_the_figures_of_a_bar() -> None:
    config = uuid.uuid4()
    b = Backfill(config)
    row: dict[str, Any] = {
        "config_id": config, "backfill_status": "thread_sync", "discovery_complete": True,
        "threads_discovered": 1200, "threads_queued": 1200, "threads_completed": 290,
        "threads_failed": 10, "messages_synced": 4321, "percent_complete": 25,
        "learned_rate": 30.0, "email": "a@x.com", "last_error": None}
    b.update(row, now=100.0)
    b.update({**row, "threads_completed": 590}, now=110.0)
    assert b.rate() == 30.0
    assert b.eta(configured=10.0) == 600 / 30  # the learned rate, not the configured one
    assert details(b, 10.0) == ("600/1,200 threads · 4,321 messages · 30.0 threads/s · "
                                "ETA 0:20 at 30 req/s · 10 failed")
    b.update({**row, "learned_rate": None, "discovery_complete": False,
              "backfill_status": "discovering"}, now=111.0)
    assert b.total is None and b.eta(10.0) is None
    assert details(b, 10.0).startswith("300 synced of 1,200 found so far")
    assert "ETA after discovery (10 req/s)" in details(b, 10.0)
    assert plain_line(b, 10.0).startswith(f"Config {config} | Status: discovering")


def test_python_m_nova_on_a_terminal_shows_the_demo_backfill_above_the_log(
        db_url: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "GMAIL_", "DATABASE_URL"))}
    env.update({"NOVA_DATABASE_URL": db_url, "NOVA_DEMO": "1", "NOVA_RECEIVER_HOST": "127.0.0.1",
                "NOVA_RECEIVER_PORT": str(port), "NOVA_SANDBOX_THREADS": "30",
                "NOVA_SANDBOX_EVENT_SECONDS": "0", "NOVA_ATTACHMENT_PATH": str(tmp_path)})
    term = Terminal([sys.executable, "-m", "nova"], env)
    try:
        term.wait_for(r"━+ 100% completed +\d+/\d+ threads · \d+ messages · 0 failed",
                      timeout=90)
        # the log, through the view
        term.wait_for(r"\[(Monitor|Threads)\] Config \w+\.\.\. completed")
    finally:
        term.proc.send_signal(signal.SIGTERM)
    assert term.wait() == 0, term.text[-3000:]
    assert "[Threads] stopped processed=" in term.text


def test_piped_or_json_logs_get_no_live_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert terminal_console(load_settings()) is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert terminal_console(load_settings(log_format="json")) is None
