"""Chaos suite: a backfill with webhooks, under kills, a PostgreSQL crash and provider faults.

    python -m tests.chaos.run_chaos [--threads 5000] [--workers 2] [--compare] ...
    python tests/chaos/run_chaos.py --threads 300 --seconds-between-kills 1-2

What runs, each in its own OS process: the Nylas sandbox (`python -m nova.sandbox.nylas`, its
webhook URL pointing at the receiver), `nova.receiver`, `nova.webhooks`, `nova.backfill`,
`nova.completion` and K copies of `nova.threads`, with the runtime's default settings (only
the provider budget is raised so the sandbox's 2-core host, not the budget, is the limit).

The run: a backfill of the sandbox mailbox is queued. While it runs the driver
- adds mail through the sandbox's control API at a steady rate: new threads, replies to
  known threads, replies to threads past the first page (`/replies`, so threads move under
  discovery), updates and deletes of existing messages; the sandbox delivers each change to
  the receiver as a signed webhook (retried as Nylas does, with shorter waits);
- SIGKILLs a random processor every A-B seconds and starts it again after a short delay;
- crashes PostgreSQL once (`pg_ctl stop -m immediate`, a couple of seconds down, start), when
  a share of the threads is synced;
- has the sandbox answer a share of requests with 429 (Nylas's own, and the provider's with
  and without Retry-After), 5xx, and hangs of a few seconds.
Beside it a Gmail inbox (see `_gmail`; `--no-gmail` leaves it out): the Gmail API sandbox's
user, its backfill queued at the same moment, mail changed through the control API (new
threads, replies, label changes, deletes of messages and of whole threads) reaching Nova as
Pub/Sub pushes and by history, quota refusals (429 rateLimitExceeded, 403
userRateLimitExceeded / rateLimitExceeded), 5xx and hangs, and `--gmail-expiries` history
expiries (404), each right after a burst of changes that only the history knew of.
`--no-faults` is the baseline: the same mailboxes, processes and mail, nothing else.
A processor is killed only once it is up, and the receiver only after it has been up as long as
the webhook retries span (a loaded host restarts it in several seconds).

The end: the backfill is `completed` (and the chaos window, `--min-chaos-seconds`, is over);
mail stops, the kills stop, every killed process is running again; then the driver waits until
the sandbox has delivered every notification (or given up on it), every stored one is
processed and the queues are empty, and stops every process with SIGTERM (each must exit 0).
The wall time runs from the backfill's queueing to that moment.

Then the database is compared with each sandbox's final mailbox row by row (see `_verify`),
and the report is printed (and written as JSON with `--report-json`). Exit status 1 when a
thread or message is missing, duplicated or stale, a delivered webhook was lost, the run did
not drain, a process died on its own or did not exit 0 on SIGTERM, or the PostgreSQL log shows
a deadlock (counted for the private server, or the `--pg-log` of an external one). With
`--compare`, `_timing` says where the extra wall time went.

Logs of every process, the driver's timeline and the report stay in the run directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python tests/chaos/run_chaos.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from pydantic import AliasChoices  # noqa: E402

from nova import db  # noqa: E402
from nova.config import Settings  # noqa: E402
from tests.chaos import _events, _gmail, _infra, _report, _timing, _verify  # noqa: E402

API_KEY = "chaos-api-key"
WEBHOOK_SECRET = "chaos-webhook-secret"
PROCESSORS = ("receiver", "webhooks", "backfill", "completion")
DEFAULT_FAULT_RATES = {
    # Each 429 holds the grant for every worker (1 s without Retry-After), so they are rare.
    "nylas_rate_limit": 0.0005, "provider_rate_limit": 0.0005, "rate_limit": 0.0005,
    "error_5xx": 0.01, "timeout": 0.002,
}
MAIL_MIX = (("new_thread", 0.3), ("reply", 0.3), ("random_replies", 0.1), ("update", 0.2),
            ("delete", 0.1))
FOLDER_CHOICES = (["INBOX"], ["INBOX", "IMPORTANT"], ["Archive"], ["Label_Projects"],
                  ["INBOX", "CATEGORY_UPDATES"])


@dataclass
class Options:
    threads: int = 5000
    workers: int = 2
    kill_every: tuple[float, float] = (2.0, 4.0)
    kill_targets: tuple[str, ...] = ()  # processor names or kinds ("threads"); empty: all
    restart_after: tuple[float, float] = (0.5, 1.5)
    faults: bool = True
    kills: bool = True  # with faults: which of the three kinds of chaos run
    pg_crash: bool = True
    sandbox_faults: bool = True
    seed: int = 7
    hostile: float = 0.05
    mail_rate: float = 5.0
    min_chaos_seconds: float = 0.0
    pg_restart_at: float = 0.4  # share of the threads synced when PostgreSQL is crashed
    pg_down_seconds: float = 2.0
    pg_restart_cmd: str | None = None
    database_url: str | None = None
    fault_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAULT_RATES))
    hang_seconds: float = 3.0
    # Random rates alone may meet no 429 of some kind when Nova sends few requests: one of each
    # kind is also forced this often (the next request answers it).
    inject_429_every: float = 20.0
    inject_429_burst: int = 1  # 429s forced at once (kinds in rotation)
    webhook_retry_delays: tuple[float, float] = (5.0, 15.0)
    provider_rate_limit: float = 500.0
    timeout: float = 3600.0  # the chaos window's limit: the backfill must complete by then
    drain_timeout: float = 600.0
    failed_grace: float = 200.0  # a backfill failed this long, untouched, ends the run
    run_dir: Path | None = None
    nova_rev: str | None = None  # run this commit (exported) instead of the work tree
    gmail: _gmail.GmailOptions | None = field(default_factory=_gmail.GmailOptions)
    pg_log: Path | None = None  # the external server's log file, for its deadlocks
    keep_database: bool = False
    quiet: bool = False


class Timeline:
    """The driver's events, with seconds since the backfill was queued, in driver.log."""

    def __init__(self, path: Path, quiet: bool) -> None:
        self.path = path
        self.quiet = quiet
        self.t0: float | None = None

    def at(self) -> float:
        return 0.0 if self.t0 is None else time.monotonic() - self.t0

    def __call__(self, text: str) -> None:
        line = f"[chaos {time.strftime('%H:%M:%S')} t={self.at():7.1f}s] {text}"
        with self.path.open("a") as f:
            f.write(line + "\n")
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def nova_revision() -> str:
    """The commit the processes ran, and whether files of the work tree differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=_infra.ROOT, capture_output=True, text=True,
                              check=False).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "nova", "sql",
                                      "migrations").splitlines()]
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def settings_env_names() -> set[str]:
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(c).upper() for c in alias.choices}
        elif alias:
            names.add(str(alias).upper())
        names.add(name.upper())
    return names


def clean_environ() -> dict[str, str]:
    """The driver's environment without any Nova setting: the processes get the defaults."""
    drop = settings_env_names()
    return {k: v for k, v in os.environ.items() if k.upper() not in drop}


@dataclass
class Watch:
    """What the driver's poll of the backfill saw."""

    status: str | None = None
    synced: int = 0
    open: int = 0
    completed_at: float | None = None
    completed_transitions: int = 0
    premature_observed: int = 0
    premature_notes: list[str] = field(default_factory=list)
    completed: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    rates: list[tuple[float, float]] = field(default_factory=list)  # (t, learned rate)


@dataclass
class Mail:
    counts: Counter[str] = field(default_factory=Counter)
    notifications: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class ChaosRun:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.rng = random.Random(f"chaos:{opts.seed}:{opts.faults}")
        label = "chaos" if opts.faults else "baseline"
        self.dir = opts.run_dir or Path(tempfile.mkdtemp(prefix=f"nova-{label}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.say = Timeline(self.dir / "driver.log", opts.quiet)
        self.database: _infra.PrivatePostgres | _infra.ServerDatabase
        server = opts.database_url or os.environ.get("NOVA_CHAOS_DATABASE_URL")
        if server:
            self.database = _infra.ServerDatabase(server, opts.pg_restart_cmd, opts.pg_log)
        else:
            self.database = _infra.PrivatePostgres(self.dir / "pg")
        self.url = ""
        self.procs: list[_infra.Proc] = []
        self.sandbox: _infra.Proc | None = None
        self.watch = Watch()  # the Nylas backfill's
        self.watches = {"nylas": self.watch}
        self.gmail: _gmail.GmailSide | None = None
        self.progress_log: list[tuple[float, int, int]] = []  # (t, nylas synced, gmail synced)
        self.events: list[tuple[float, str, str]] = []  # (t, kind, detail) for _timing
        self.up_since: dict[tuple[str, int], float] = {}  # (process, start) -> first seen up
        self.mail = Mail()
        self.chaos_on = False
        self.pg_restart: dict[str, Any] | None = None
        self.pg_note = "not reached" if opts.faults and opts.pg_crash else "switched off"
        self.restarting: set[asyncio.Task[None]] = set()
        self.expected_notes = 0
        self.source = _infra.ROOT
        self.backfill_failed = False
        self.grant = ""
        self.revision = ""

    # ------------------------------------------------------------------ set-up
    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**clean_environ(), "PYTHONPATH": str(self.source), "PYTHONUNBUFFERED": "1",
                **extra}

    async def _start_sandbox(self) -> tuple[httpx.AsyncClient, str]:
        port = _infra.free_port()
        self.receiver_port = _infra.free_port()
        url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "nova.sandbox.nylas", "--port", str(port),
                "--threads", str(self.o.threads), "--grants", "1", "--seed", str(self.o.seed),
                "--hostile", str(self.o.hostile), "--api-key", API_KEY,
                "--webhook-url", f"http://127.0.0.1:{self.receiver_port}/webhooks/nylas",
                "--webhook-secret", WEBHOOK_SECRET,
                "--webhook-retry-delays", *(str(d) for d in self.o.webhook_retry_delays)]
        self.sandbox = _infra.Proc("sandbox", args, self._env({}), self.logs / "sandbox.log",
                                   self.dir)
        self.sandbox.start()
        client = httpx.AsyncClient(base_url=url, timeout=60,
                                   headers={"Authorization": f"Bearer {API_KEY}"})
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                resp = await client.get("/_sandbox/grants")
                if resp.status_code == 200:
                    return client, resp.json()[0]["id"]
            if time.monotonic() > deadline or not self.sandbox.alive():
                raise RuntimeError(f"the sandbox did not start (see {self.sandbox.log})")
            await asyncio.sleep(0.2)

    def _processes(self) -> list[_infra.Proc]:
        env = self._env({
            **(self.gmail.process_env() if self.gmail else {}),
            "NOVA_DATABASE_URL": self.url, "NYLAS_API_KEY": API_KEY,
            "NYLAS_API_URI": self.sandbox_url, "NYLAS_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "NOVA_PROVIDER_RATE_LIMIT": f"{self.o.provider_rate_limit:g}",
            "NOVA_RECEIVER_HOST": "127.0.0.1", "NOVA_RECEIVER_PORT": str(self.receiver_port),
            "LOG_LEVEL": "info"})
        names = [*PROCESSORS, *(f"threads-{i + 1}" for i in range(self.o.workers))]
        return [_infra.Proc(name, [sys.executable, "-m", f"nova.{name.split('-')[0]}"], env,
                            self.logs / f"{name}.log", self.dir) for name in names]

    async def _wait_started(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 90
        rx = f"http://127.0.0.1:{self.receiver_port}/healthz"
        while True:
            ready = False
            with contextlib.suppress(httpx.HTTPError):
                ready = (await client.get(rx)).status_code == 200
            for p in self.procs:
                if p.name != "receiver" and "started" not in p.log.read_text(errors="replace"):
                    ready = False
            if ready:
                return
            dead = [p.name for p in self.procs if not p.alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"processes did not start: {dead or 'timeout'} "
                                   f"(logs in {self.logs})")
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ chaos tasks
    async def _restart_later(self, proc: _infra.Proc, delay: float) -> None:
        await asyncio.sleep(delay)
        proc.start()
        self.say(f"restarted {proc.name} pid={proc.pid}")

    def _schedule_restart(self, proc: _infra.Proc, delay: float) -> None:
        task = asyncio.create_task(self._restart_later(proc, delay))
        self.restarting.add(task)
        task.add_done_callback(self.restarting.discard)

    async def supervisor(self) -> None:
        """A process that ends on its own is a finding: noted, and started again (as PM2 or
        compose would), so the run goes on."""
        while True:
            await asyncio.sleep(0.25)
            for p in self.procs:
                if p.down:
                    continue
                status = p.exited()
                if status is not None:
                    p.unexpected_exits.append({"at_seconds": round(self.say.at(), 1),
                                               "status": status, "start": p.starts})
                    self.say(f"UNEXPECTED: {p.name} exited {status} on its own; restarting")
                    p.down = True
                    self._schedule_restart(p, 0.5)

    def _target(self, proc: _infra.Proc) -> bool:
        targets = self.o.kill_targets
        return not targets or proc.name in targets or proc.name.split("-")[0] in targets

    async def killer(self) -> None:
        lo, hi = self.o.kill_every
        while self.chaos_on:
            await asyncio.sleep(self.rng.uniform(lo, hi))
            if not self.chaos_on:
                return
            # Only a process that is up (its 'started' / 'ready on' line since its last
            # start): one killed while still importing stays down for its start-up time
            # again, which on a loaded 2-core host outlasts the shortened webhook retries.
            live = [p for p in self.procs if not p.down and p.ready() and self._target(p)
                     and self._receiver_may_die(p)]
            if not live:
                continue
            victim = self.rng.choice(live)
            pid = victim.pid
            await asyncio.to_thread(victim.sigkill)
            self.events.append((self.say.at(), "kill", victim.name))
            delay = self.rng.uniform(*self.o.restart_after)
            self.say(f"SIGKILL {victim.name} pid={pid}; restart in {delay:.1f}s")
            self._schedule_restart(victim, delay)

    def _receiver_may_die(self, proc: _infra.Proc) -> bool:
        """The receiver is killed again only after it has been up as long as the sandbox's
        webhook retries span (--webhook-retry-delays, compressed from Nylas's 5 and 10
        minutes): otherwise two kills in a row, each followed by a start-up of several
        seconds on a loaded host, make every attempt of a webhook meet a dead receiver, a
        loss no real outage that short would cause (Nylas retries for 15 minutes)."""
        if proc.name != "receiver":
            return True
        key = (proc.name, proc.starts)
        now = time.monotonic()
        since = self.up_since.setdefault(key, now)
        return now - since >= sum(self.o.webhook_retry_delays)

    async def pg_restarter(self) -> None:
        if not self.database.restartable:
            self.pg_note = "not possible: an external server without --pg-restart-cmd"
            return
        total = self.o.threads + (self.o.gmail.threads if self.o.gmail else 0)
        target = int(total * self.o.pg_restart_at)
        while self._synced() < target:
            self.watch.progress.clear()
            await self.watch.progress.wait()
        at, synced = self.say.at(), self._synced()
        self.events.append((at, "pg_crash", ""))
        self.say(f"PostgreSQL: crash (immediate stop), {self.o.pg_down_seconds:g}s down, "
                 f"start; {synced} threads synced")
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.database.restart, self.o.pg_down_seconds)
        except Exception as exc:  # noqa: BLE001 - a start refused on a loaded host: again
            self.say(f"PostgreSQL did not start again ({type(exc).__name__}: {exc}); retrying")
            again = getattr(self.database, "start_again", None)
            for attempt in range(10):
                if again is None:
                    raise
                await asyncio.sleep(2)
                with contextlib.suppress(Exception):  # up after all (a slow start)?
                    await asyncio.to_thread(_infra.server_version, self.url)
                    break
                try:
                    await asyncio.to_thread(again)
                    break
                except Exception as exc2:  # noqa: BLE001
                    self.say(f"PostgreSQL start #{attempt + 2} failed: {exc2}")
        self.pg_restart = {"at_seconds": round(at, 1), "at_synced": synced,
                           "seconds": round(time.monotonic() - started, 1)}
        self.say(f"PostgreSQL is back after {self.pg_restart['seconds']}s")
        self.events.append((self.say.at(), "pg_back", ""))

    def _synced(self) -> int:
        return sum(w.synced for w in self.watches.values())

    async def injector(self, client: httpx.AsyncClient) -> None:
        kinds = ("nylas_rate_limit", "provider_rate_limit", "rate_limit")
        n = 0
        while self.chaos_on:
            await asyncio.sleep(self.o.inject_429_every)
            batch = [kinds[(n + i) % len(kinds)] for i in range(self.o.inject_429_burst)]
            n += len(batch)
            with contextlib.suppress(httpx.HTTPError):
                await client.post("/_sandbox/faults", json={
                    "inject": [{"kind": k, "count": 1} for k in batch]})
                self.events.append((self.say.at(), "429", ",".join(batch)))
                self.say(f"sandbox: 429 forced on the next request(s): {', '.join(batch)}")
            if self.gmail is not None:  # the Gmail kinds in turn: 429, 403 user, 403 project
                kinds_g = _gmail.QUOTA_KINDS
                gbatch = [kinds_g[(n - len(batch) + i) % len(kinds_g)]
                          for i in range(self.o.inject_429_burst)]
                with contextlib.suppress(httpx.HTTPError):
                    await self.gmail.force(gbatch)
                    self.events.append((self.say.at(), "gmail_quota", ",".join(gbatch)))
                    self.say(f"gmail sandbox: quota refusal forced: {', '.join(gbatch)}")

    async def watcher(self, pool: asyncpg.Pool, configs: dict[str, uuid.UUID]) -> None:
        """Polls the backfills (Nylas, Gmail): progress, their completion, and a completion
        while threads are still open (premature)."""
        was_completed = dict.fromkeys(configs, False)
        last_line = 0.0
        while True:
            try:
                rows = await pool.fetch(
                    "SELECT c.id, c.backfill_status AS status,"
                    " count(q.id) FILTER (WHERE q.status IN ('queued', 'processing')) AS open,"
                    " count(q.id) FILTER (WHERE q.status = 'completed') AS synced"
                    " FROM flux_inbox_configurations c"
                    " LEFT JOIN queued_threads q ON q.config_id = c.id"
                    " WHERE c.id = ANY($1::uuid[]) GROUP BY c.id, c.backfill_status",
                    list(configs.values()), timeout=10)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            by_id = {r["id"]: r for r in rows}
            for name, config_id in configs.items():
                row = by_id.get(config_id)
                if row is not None:
                    was_completed[name] = self._observe(name, row, was_completed[name])
            self.progress_log.append((round(self.say.at(), 1), self.watch.synced,
                                      self.watches["gmail"].synced if self.gmail else 0))
            if time.monotonic() - last_line > 10:
                last_line = time.monotonic()
                kills = sum(p.kills for p in self.procs)
                rate = await self._learned_rate(pool)
                if rate is not None:
                    self.watch.rates.append((round(self.say.at(), 1), round(rate, 1)))
                each = " ".join(f"{n}: {w.status} synced={w.synced} open={w.open}"
                                for n, w in self.watches.items())
                self.say(f"progress: {each} kills={kills} mail={sum(self.mail.counts.values())}"
                         f" learned_rate={'-' if rate is None else f'{rate:.1f}/s'}")
            await asyncio.sleep(0.5)

    def _observe(self, name: str, row: asyncpg.Record, was_completed: bool) -> bool:
        w = self.watches[name]
        w.status, w.open, w.synced = row["status"], int(row["open"]), int(row["synced"])
        w.progress.set()
        completed = w.status == "completed"
        if completed and not was_completed:
            w.completed_transitions += 1
            if w.completed_at is None:
                w.completed_at = self.say.at()
            self.say(f"{name} backfill completed ({w.synced} threads synced, {w.open} open)")
            if w.open:
                w.premature_observed += 1
                w.premature_notes.append(f"t={self.say.at():.1f}s completed with {w.open} "
                                         f"threads queued/processing")
                self.say(f"PREMATURE completion of the {name} backfill: {w.open} threads "
                         f"still open")
        elif was_completed and not completed:
            self.say(f"{name} backfill left 'completed' for '{w.status}' (a resync, or a "
                     f"repair)")
        if completed and w.open == 0:
            w.completed.set()
        else:
            w.completed.clear()
        if name != "nylas":
            self.watch.progress.set()  # the PG restart waits for the total
        return completed

    async def _learned_rate(self, pool: asyncpg.Pool) -> float | None:
        """The grant's learned request rate (Nova's adaptive budget), where Nova has one; its
        ssthresh and measured answer rate go to the timeline too."""
        try:
            row = await pool.fetchrow("SELECT * FROM provider_rate_limits WHERE grant_id = $1",
                                      self.grant, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return None
        if row is None or row.get("rate") is None:
            return None
        extra = {k: row.get(k) for k in ("ssthresh", "answered_rate", "answered", "limited")
                 if row.get(k) is not None}
        if extra:
            self.say("budget: " + " ".join(
                f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
        return float(row["rate"])

    async def mailer(self, client: httpx.AsyncClient, grant: str,
                     threads: dict[str, list[str]]) -> None:
        """New mail, replies, updates and deletes at a steady rate while the backfill runs."""
        rng = random.Random(f"mail:{self.o.seed}")
        live = {tid: list(mids) for tid, mids in threads.items()}
        untouched = [mid for mids in threads.values() for mid in mids]
        rng.shuffle(untouched)
        owner = {mid: tid for tid, mids in threads.items() for mid in mids}
        kinds = [k for k, _ in MAIL_MIX]
        weights = [w for _, w in MAIL_MIX]
        rank = min(200, self.o.threads // 2)
        base = f"/_sandbox/grants/{grant}"
        while self.chaos_on:
            kind = rng.choices(kinds, weights)[0]
            try:
                if kind == "new_thread":
                    body = (await client.post(f"{base}/messages", json={})).json()
                    live[body["thread"]["id"]] = [body["message"]["id"]]
                    self.expected_notes += len(body["notifications"])
                elif kind == "reply" and live:
                    tid = rng.choice(list(live))
                    resp = await client.post(f"{base}/messages", json={"thread_id": tid})
                    resp.raise_for_status()
                    body = resp.json()
                    live[tid].append(body["message"]["id"])
                    self.expected_notes += len(body["notifications"])
                elif kind == "random_replies":
                    resp = await client.post(f"{base}/replies",
                                             json={"n": 2, "older_than_rank": rank})
                    resp.raise_for_status()
                    self.expected_notes += len(resp.json()["thread_ids"])
                elif kind in ("update", "delete") and untouched:
                    # Each message changes at most once: two changes of one message in the same
                    # second apply in arrival order (documented), which is not under test here.
                    mid = untouched.pop()
                    if kind == "update":
                        resp = await client.patch(f"{base}/messages/{mid}", json={
                            "unread": rng.random() < 0.5, "starred": rng.random() < 0.3,
                            "folders": rng.choice(FOLDER_CHOICES)})
                    else:
                        resp = await client.delete(f"{base}/messages/{mid}")
                        tid = owner[mid]
                        if tid in live and mid in live[tid]:
                            live[tid].remove(mid)
                            if not live[tid]:
                                del live[tid]
                    resp.raise_for_status()
                    self.expected_notes += len(resp.json()["notifications"])
                else:
                    continue
                self.mail.counts[kind] += 1
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                self.mail.errors[f"{kind}: {type(exc).__name__}"] += 1
            await asyncio.sleep(1 / self.o.mail_rate)

    # ------------------------------------------------------------------ the end
    async def _all_ready(self, problems: list[str], timeout: float = 60) -> None:
        """Every processor up again (not just spawned) before the drain and the SIGTERM: a
        process still importing when SIGTERM comes has no handler yet."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [p.name for p in self.procs if not p.ready()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                problems.append(f"not up {timeout:.0f}s after the chaos: {', '.join(waiting)}")
                return
            await asyncio.sleep(0.2)

    async def _webhooks_settled(self, client: httpx.AsyncClient) -> tuple[bool, int]:
        log = (await client.get("/_sandbox/webhooks")).json()
        by_id: dict[str, str] = {}
        for entry in log:
            by_id[entry["id"]] = entry["outcome"]
        delivered = {e["id"] for e in log if e["outcome"] == "delivered"}
        pending = [i for i, outcome in by_id.items()
                   if outcome == "retrying" and i not in delivered]
        return len(by_id) >= self.expected_notes and not pending, len(delivered)

    async def _drained(self, pool: asyncpg.Pool, config_id: uuid.UUID,
                       delivered: int) -> dict[str, Any] | None:
        try:
            row = await pool.fetchrow(
                "SELECT (SELECT count(*) FROM pgmq.q_nylas_webhook_notifications)"
                "     + (SELECT count(*) FROM pgmq.q_thread_sync_jobs)"
                "     + (SELECT count(*) FROM pgmq.q_inbox_backfill_jobs) AS queued,"
                " (SELECT count(*) FROM flux_webhook_notifications"
                "  WHERE status IN ('pending', 'processing')) AS unfinished,"
                " (SELECT count(*) FROM flux_webhook_notifications) AS received,"
                " (SELECT count(*) FROM queued_threads WHERE config_id = $1"
                "  AND status IN ('queued', 'processing')) AS open,"
                " (SELECT backfill_status FROM flux_inbox_configurations WHERE id = $1)"
                "  AS status", config_id, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return None
        backfill_done = (row["open"] == 0 and row["status"] == "completed"
                         or self.backfill_failed)  # a failed one is reported, not waited for
        gmail_done = True
        if self.gmail is not None and not self.backfill_failed:
            try:
                gmail_done = await self.gmail.drained(pool)
            except (httpx.HTTPError, ValueError):
                gmail_done = False
        return dict(row) | {"gmail_done": gmail_done,
                            "done": row["queued"] == 0 and row["unfinished"] == 0
                            and backfill_done and row["received"] >= delivered and gmail_done}

    async def drain(self, pool: asyncpg.Pool, client: httpx.AsyncClient,
                    config_id: uuid.UUID) -> tuple[bool, str]:
        deadline = time.monotonic() + self.o.drain_timeout
        settled, delivered, state = False, 0, None
        quiet_checks = 0
        last_line = 0.0
        while time.monotonic() < deadline:
            if not settled:
                settled, delivered = await self._webhooks_settled(client)
            state = await self._drained(pool, config_id, delivered)
            if settled and state is not None and state["done"]:
                quiet_checks += 1
                if quiet_checks >= 2:  # twice in a row, half a second apart
                    return True, "drained"
            else:
                quiet_checks = 0
            if time.monotonic() - last_line > 10:
                last_line = time.monotonic()
                self.say(f"draining: sandbox outbox settled={settled} delivered={delivered} "
                         f"db={state}")
            await asyncio.sleep(0.5)
        return False, f"did not drain in {self.o.drain_timeout:.0f}s: outbox settled=" \
                      f"{settled}, database {state}"

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        o = self.o
        started = time.monotonic()
        # SIGINT/SIGTERM end the run through the `finally` below: the processes, the sandbox
        # and the private Postgres go with it. (A shell's background job ignores SIGINT, so the
        # default KeyboardInterrupt cannot be counted on.)
        loop, main = asyncio.get_running_loop(), asyncio.current_task()
        assert main is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, main.cancel)
        self.say(f"run dir {self.dir}; {'chaos' if o.faults else 'baseline'} run, "
                 f"{o.threads} threads, {o.workers} thread workers, seed {o.seed}")
        client: httpx.AsyncClient | None = None
        pool: asyncpg.Pool | None = None
        tasks: list[asyncio.Task[Any]] = []
        try:
            if o.nova_rev:
                sha = await asyncio.to_thread(_infra.export_revision, o.nova_rev,
                                              self.dir / "src")
                self.source, self.revision = self.dir / "src", f"{sha} (exported, clean)"
            else:
                self.revision = nova_revision()
            self.say(f"nova: {self.revision}")
            self.url = await asyncio.to_thread(self.database.start)
            version = await asyncio.to_thread(_infra.server_version, self.url)
            await asyncio.to_thread(_infra.nova_migrate, self.url, self.logs / "migrate.log",
                                    self.source)
            self.say(f"database {db.describe(self.url)} ({self.database.kind}, PostgreSQL "
                     f"{version}) migrated with nova migrate")
            client, grant = await self._start_sandbox()
            self.grant = grant
            assert self.sandbox is not None
            self.sandbox_url = str(client.base_url).rstrip("/")
            threads = {t["id"]: list(t["message_ids"])
                       for t in await _verify.list_all(client, f"/v3/grants/{grant}/threads")}
            await client.post("/_sandbox/stats/reset")
            if o.gmail is not None:
                self.gmail = _gmail.GmailSide(o.gmail, o.seed, o.hostile, self.say, self.logs,
                                              self.dir, self._env({}))
                await self.gmail.start(self.receiver_port)
                self.watches["gmail"] = Watch()
            pool = await db.create_pool(self.url, min_size=1, max_size=4)
            feed = _events.Follower(self.url)  # the change feed replayed into a copy
            feed.start()
            inbox_id = await pool.fetchval(
                "INSERT INTO flux_inboxes (provider, grant_id, email)"
                " VALUES ('nylas', $1, $2) RETURNING id", grant, f"{grant}@sandbox.test")
            if self.gmail is not None:
                await self.gmail.register(pool)
            self.procs = self._processes()
            for p in self.procs:
                p.start()
            await self._wait_started(client)
            if o.faults and o.sandbox_faults:
                await client.post("/_sandbox/faults", json={"rates": o.fault_rates,
                                                            "hang_seconds": o.hang_seconds})
                if self.gmail is not None and o.gmail is not None:
                    await self.gmail.set_faults(o.gmail.fault_rates, o.hang_seconds)
            setup_seconds = time.monotonic() - started
            self.say(f"{len(self.procs)} processes up; sandbox {self.sandbox_url} with "
                     f"{len(threads)} threads"
                     + (f", Gmail sandbox {self.gmail.url} with {len(self.gmail.order)} "
                        f"threads ({self.gmail.email})" if self.gmail else "")
                     + f"; set-up took {setup_seconds:.1f}s")

            # Go: the sandbox's mailbox spans the year before its anchor (today 00:00 UTC).
            anchor = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            self.say.t0 = time.monotonic()
            self.since = anchor - timedelta(days=365)
            config_id = await pool.fetchval("SELECT queue_inbox_backfill($1, $2, NULL, 'full')",
                                            inbox_id, self.since)
            configs = {"nylas": config_id}
            if self.gmail is not None:
                self.gmail.config_id = configs["gmail"] = await pool.fetchval(
                    "SELECT queue_inbox_backfill($1, $2, NULL, 'full')", self.gmail.inbox_id,
                    self.since)
            self.say(f"backfill queued {configs}")
            self.chaos_on = True
            tasks = [asyncio.create_task(self.supervisor()),
                     asyncio.create_task(self.watcher(pool, configs)),
                     asyncio.create_task(self.mailer(client, grant, threads))]
            if self.gmail is not None:
                tasks.append(asyncio.create_task(self.gmail.mailer(lambda: self.chaos_on)))
                if o.faults:
                    tasks.append(asyncio.create_task(self.gmail.expirer(
                        pool, self.watches["gmail"], lambda: self.chaos_on)))
            if o.faults and o.kills:
                tasks.append(asyncio.create_task(self.killer()))
            if o.faults and o.pg_crash:
                tasks.append(asyncio.create_task(self.pg_restarter()))
            if o.faults and o.sandbox_faults and o.inject_429_every > 0:
                tasks.append(asyncio.create_task(self.injector(client)))
            problems: list[str] = []
            try:
                gave_up = await asyncio.wait_for(self._chaos_window(pool), o.timeout)
                if gave_up:
                    self.say(gave_up)
                    problems.append(gave_up)
                    self.backfill_failed = True
            except TimeoutError:
                problems.append(f"the backfill did not complete within {o.timeout:.0f}s "
                                f"(status {self.watch.status}, {self.watch.open} open)")
            self.chaos_on = False
            chaos_seconds = self.say.at()
            for t in tasks[2:]:  # mail, kills, the PG restart (if it never came)
                t.cancel()
            await asyncio.gather(*tasks[2:], return_exceptions=True)
            if self.restarting:
                await asyncio.gather(*self.restarting, return_exceptions=True)
            for p in self.procs:  # killed just as the killer was cancelled: no restart due
                if p.down and not p.alive():
                    p.start()
                    self.say(f"restarted {p.name} pid={p.pid} (killed as the chaos ended)")
            await self._all_ready(problems)
            self.say(f"chaos over after {chaos_seconds:.1f}s: mail stopped "
                     f"({dict(self.mail.counts)}"
                     + (f", gmail {dict(self.gmail.mail.counts)}" if self.gmail else "")
                     + "), every process running; draining")
            await client.post("/_sandbox/faults", json={"clear": True})
            if self.gmail is not None and self.gmail.client is not None:
                await self.gmail.client.post("/_sandbox/faults", json={"clear": True})
            ok, how = await self.drain(pool, client, config_id)
            wall = self.say.at()
            self.say(f"{how} at {wall:.1f}s")
            if not ok:
                problems.append(how)
            for t in tasks[:2]:
                t.cancel()
            await asyncio.gather(*tasks[:2], return_exceptions=True)

            self.say("SIGTERM to every processor")
            statuses = await asyncio.gather(*(asyncio.to_thread(p.terminate, 60)
                                              for p in self.procs))
            for p, status in zip(self.procs, statuses, strict=True):
                if status != 0:
                    problems.append(f"{p.name} exited {status} on SIGTERM")

            verify_started = time.monotonic()
            report = await self._verify(pool, client, grant, inbox_id, config_id, problems)
            await feed.finish(report, problems)
            report["run"].update(server_version=version)
            if self.gmail is not None:
                report["gmail"] = await self.gmail.verify(
                    pool, int(self.since.timestamp()), [p.log for p in self.procs])
                report["gmail"]["completion"].update(
                    completed_transitions=self.watches["gmail"].completed_transitions,
                    premature_observed=self.watches["gmail"].premature_observed,
                    first_completed_seconds=self.watches["gmail"].completed_at)
                problems += _gmail_problems(report["gmail"])
                report["verdict"] = {**report["verdict"], "ok": not problems,
                                     "problems": problems}
            report["timing"] = {
                "wall_seconds": round(wall, 1), "chaos_seconds": round(chaos_seconds, 1),
                "drain_seconds": round(wall - chaos_seconds, 1),
                "backfill_completed_seconds": None if self.watch.completed_at is None
                else round(self.watch.completed_at, 1),
                "gmail_backfill_completed_seconds": None if self.gmail is None
                or self.watches["gmail"].completed_at is None
                else round(self.watches["gmail"].completed_at, 1),
                "progress": _timing.downsample(self.progress_log),
                "events": sorted([(round(t, 1), k, d) for t, k, d in self.events]
                                 + [(e["at_seconds"], "gmail_expiry", str(e["floor"]))
                                    for e in (self.gmail.expiries if self.gmail else [])]),
                "setup_seconds": round(setup_seconds, 1),
                "verify_seconds": round(time.monotonic() - verify_started, 1)}
            (self.dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
            return report
        finally:
            for t in tasks:
                t.cancel()
            for p in self.procs:
                p.kill_quietly()
            if pool is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 10)
            if self.sandbox is not None:
                await asyncio.to_thread(self.sandbox.terminate, 15)
            if self.gmail is not None:
                await self.gmail.close()
            if client is not None:
                await client.aclose()
            await asyncio.to_thread(self.database.stop, self.o.keep_database,
                                    self.logs / "postgres.log")

    async def _chaos_window(self, pool: asyncpg.Pool) -> str | None:
        """Until every backfill is completed with nothing open (the Gmail one: its history
        404s injected, noticed and resynced too), and --min-chaos-seconds; or until one has
        stayed `failed` for --failed-grace seconds with nothing taking it up again (the
        monitor's recovery runs every RECOVERY_CHECK_INTERVAL_MS): then the reason."""
        failed_since: dict[str, float] = {}
        while True:
            for name, w in self.watches.items():
                if w.status == "failed":
                    since = failed_since.setdefault(name, self.say.at())
                    if self.say.at() - since >= self.o.failed_grace:
                        return (f"the {name} backfill failed at {since:.0f}s and was still "
                                f"failed {self.o.failed_grace:.0f}s later: nothing resumed it")
                else:
                    failed_since.pop(name, None)
            done = all(w.completed.is_set() for w in self.watches.values())
            if done and self.gmail is not None:
                done = self.gmail.expiries_done() or not self.o.faults
                done = done and await self.gmail.caught_up(pool)
            if done and self.say.at() >= self.o.min_chaos_seconds:
                return None
            await asyncio.sleep(0.5)

    async def _verify(self, pool: asyncpg.Pool, client: httpx.AsyncClient, grant: str,
                      inbox_id: uuid.UUID, config_id: uuid.UUID,
                      problems: list[str]) -> dict[str, Any]:
        stats = (await client.get("/_sandbox/stats")).json()  # before the verification reads
        webhook_log = (await client.get("/_sandbox/webhooks")).json()
        (self.dir / "webhook_deliveries.json").write_text(json.dumps(webhook_log, indent=1))
        sb_threads, sb_messages = await _verify.sandbox_mailbox(client, grant)
        async with pool.acquire() as conn:
            db_threads, db_messages = await _verify.database_rows(conn, inbox_id)
            dupes = await _verify.duplicates(conn)
            rows = await conn.fetch("SELECT webhook_id, status, error_message"
                                    " FROM flux_webhook_notifications WHERE provider = 'nylas'")
            dead = await _verify.dead_letters(conn)
            completion = await _verify.completion_facts(conn, config_id)
            work = await _verify.queue_work(conn, config_id, stats, len(sb_threads))
        mailbox = _verify.compare_mailbox(sb_threads, sb_messages, db_threads, db_messages,
                                          since=int(self.since.timestamp()))
        hooks = _verify.webhook_figures(webhook_log, rows)
        logs = _verify.scan_logs({p.name: p.log for p in self.procs})
        logs["postgres"] = _verify.scan_postgres_log(self.database.log_path,
                                                     self.database.log_offset)
        o = self.o
        completion.update(
            completed_transitions=self.watch.completed_transitions,
            premature_observed=self.watch.premature_observed,
            premature_notes=self.watch.premature_notes,
            monitor_premature_lines=len(logs["premature_lines"]),
            premature=max(self.watch.premature_observed, len(logs["premature_lines"]),
                          1 if completion["threads_synced_after_completion"] else 0))
        report: dict[str, Any] = {
            "run": {"faults": o.faults, "kills": o.faults and o.kills,
                    "pg_crash": o.faults and o.pg_crash,
                    "sandbox_faults": o.faults and o.sandbox_faults,
                    "threads": o.threads, "workers": o.workers,
                    "seed": o.seed, "hostile": o.hostile, "mail_rate": o.mail_rate,
                    "kill_every": list(o.kill_every), "restart_after": list(o.restart_after),
                    "kill_targets": list(o.kill_targets) or "all",
                    "min_chaos_seconds": o.min_chaos_seconds,
                    "fault_rates": o.fault_rates if o.faults and o.sandbox_faults else {},
                    "hang_seconds": o.hang_seconds, "inject_429_every": o.inject_429_every,
                    "inject_429_burst": o.inject_429_burst,
                    "webhook_retry_delays": list(o.webhook_retry_delays),
                    "provider_rate_limit": o.provider_rate_limit,
                    "database": self.database.kind, "run_dir": str(self.dir),
                    "nova": self.revision},
            "threads": mailbox["threads"], "messages": mailbox["messages"],
            "duplicated": dupes, "queue_work": work, "webhooks": hooks,
            "completion": completion, "dead_letters": dead,
            "chaos": {
                "kills": {p.name: p.kills for p in self.procs if p.kills},
                "kills_total": sum(p.kills for p in self.procs),
                "restarts_total": sum(p.starts - 1 for p in self.procs),
                "unexpected_exits": [{"process": p.name, **e} for p in self.procs
                                     for e in p.unexpected_exits],
                "pg_restarts": 1 if self.pg_restart else 0, "pg_restart": self.pg_restart,
                "pg_restart_note": self.pg_note,
                "learned_rate": {"samples": self.watch.rates,
                                 "min": min((r for _, r in self.watch.rates), default=None),
                                 "last": self.watch.rates[-1][1] if self.watch.rates
                                 else None},
                "sandbox_faults": stats.get("faults", {}),
                "sandbox_statuses": stats.get("statuses", {}),
                "sandbox_requests": sum(stats.get("requests", {}).values()),
                "sandbox_requests_by_endpoint": stats.get("requests", {}),
                "mail": {"new_threads": self.mail.counts["new_thread"],
                         "replies": self.mail.counts["reply"],
                         "random_replies": self.mail.counts["random_replies"] * 2,
                         "updates": self.mail.counts["update"],
                         "deletes": self.mail.counts["delete"],
                         "notifications": self.expected_notes,
                         "errors": dict(self.mail.errors)}},
            "processes": {p.name: {"starts": p.starts, "kills": p.kills,
                                   "unexpected_exits": len(p.unexpected_exits),
                                   "sigterm_status": p.stop_status,
                                   "stop_seconds": None if p.stop_seconds is None
                                   else round(p.stop_seconds, 1)} for p in self.procs},
            "logs": logs,
        }
        for kind in ("threads", "messages"):
            s = mailbox[kind]
            for what in ("missing", "stale"):
                if s[what]:
                    problems.append(f"{s[what]} {kind} {what}")
            if dupes[kind]:
                problems.append(f"{dupes[kind]} {kind} duplicated")
        for name, n in dupes.items():
            if n and name not in ("threads", "messages"):
                problems.append(f"{n} {name} rows duplicated")
        if hooks["lost"]:
            problems.append(f"{hooks['lost']} delivered webhooks lost")
        if hooks["unfinished"]:
            problems.append(f"{hooks['unfinished']} webhooks never processed")
        if completion["premature"]:
            problems.append(f"{completion['premature']} premature completion(s)")
        warnings = []  # defects that Nova's retries absorbed this time
        if logs["postgres"].get("deadlocks"):  # absorbed by retries, but a defect all the same
            problems.append(f"{logs['postgres']['deadlocks']} deadlock(s) in the PostgreSQL "
                            f"log")
        elif not logs["postgres"].get("available"):
            warnings.append("deadlocks not counted: no server log (an external server without "
                            "--pg-log)")
        if dead["total"]:
            warnings.append(f"{dead['total']} dead letter(s)")
        for e in report["chaos"]["unexpected_exits"]:
            problems.append(f"{e['process']} exited {e['status']} on its own at "
                            f"{e['at_seconds']}s")
        report["verdict"] = {"ok": not problems, "problems": problems, "warnings": warnings}
        return report


def _gmail_problems(g: dict[str, Any]) -> list[str]:
    out = []
    for kind in ("threads", "messages"):
        for what in ("missing", "stale"):
            if g[kind][what]:
                out.append(f"gmail: {g[kind][what]} {kind} {what}")
    if g["threads_deleted_whole_in_a_gap_left_live"]:
        out.append(f"gmail: of the stale rows, {g['threads_deleted_whole_in_a_gap_left_live']} "
                   f"thread(s) deleted whole during a history gap are still stored live, with "
                   f"{g['messages_of_threads_deleted_whole_left_live']} live message(s) (known:"
                   f" the resync does not soft-delete them yet)")
    if g["pushes"]["lost"]:
        out.append(f"gmail: {g['pushes']['lost']} delivered pushes lost")
    if g["completion"]["status"] != "completed":
        out.append(f"gmail: backfill {g['completion']['status']} at the end")
    return out


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    a, b = float(lo), float(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected A-B with 0 < A <= B, got {text!r}")
    return a, b


def _rates(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        kind, _, value = part.partition("=")
        out[kind.strip()] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.run_chaos",
                                description=__doc__.split("\n")[0])
    d = Options()
    p.add_argument("--threads", type=int, default=d.threads, help="threads in the mailbox")
    p.add_argument("--workers", type=int, default=d.workers, help="nova.threads processes")
    p.add_argument("--seconds-between-kills", type=_range, default=d.kill_every,
                   metavar="A-B", help="a random processor is SIGKILLed every A-B seconds")
    p.add_argument("--kill-targets", type=lambda t: tuple(filter(None, t.split(","))),
                   default=(), metavar="NAMES",
                   help="only these processors are killed, e.g. backfill or threads,webhooks "
                        "(default: any)")
    p.add_argument("--restart-after", type=_range, default=d.restart_after, metavar="A-B",
                   help="a killed processor starts again after A-B seconds")
    p.add_argument("--no-faults", action="store_true",
                   help="baseline: the same mailbox, processes and mail; no kills, no "
                        "injected faults, no PostgreSQL restart")
    p.add_argument("--no-kills", action="store_true", help="chaos without the SIGKILLs")
    p.add_argument("--no-pg-restart", action="store_true",
                   help="chaos without the PostgreSQL crash")
    p.add_argument("--no-sandbox-faults", action="store_true",
                   help="chaos without the sandbox's 429s, 5xx and hangs")
    p.add_argument("--compare", action="store_true",
                   help="the baseline, then the chaos run; both wall times and the ratio")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--hostile", type=float, default=d.hostile, metavar="SHARE",
                   help="share of hostile threads in the sandbox mailbox")
    p.add_argument("--mail-rate", type=float, default=d.mail_rate,
                   help="mail changes per second while the backfill runs")
    p.add_argument("--min-chaos-seconds", type=float, default=d.min_chaos_seconds,
                   help="keep mail and kills going at least this long")
    p.add_argument("--pg-restart-at", type=float, default=d.pg_restart_at, metavar="SHARE",
                   help="crash PostgreSQL once this share of the threads is synced")
    p.add_argument("--pg-down-seconds", type=float, default=d.pg_down_seconds)
    p.add_argument("--database-url", default=None,
                   help="a server to create the throwaway database on (default: "
                        "NOVA_CHAOS_DATABASE_URL, else a private embedded Postgres that the "
                        "driver can crash and restart)")
    p.add_argument("--pg-restart-cmd", default=None,
                   help="with --database-url: the command that restarts that server")
    p.add_argument("--fault-rates", type=_rates, default=d.fault_rates,
                   metavar="KIND=SHARE,...",
                   help="sandbox fault rates (default: " + ",".join(
                       f"{k}={v:g}" for k, v in d.fault_rates.items()) + ")")
    p.add_argument("--inject-429-every", type=float, default=d.inject_429_every, metavar="S",
                   help="force a 429 every S seconds besides the random rates, kinds in "
                        "rotation (0: never)")
    p.add_argument("--inject-429-burst", type=int, default=d.inject_429_burst, metavar="N",
                   help="how many 429s (kinds in rotation) are forced at once")
    p.add_argument("--hang-seconds", type=float, default=d.hang_seconds,
                   help="how long a 'timeout' fault hangs before its 504")
    p.add_argument("--webhook-retry-delays", type=float, nargs=2,
                   default=d.webhook_retry_delays, metavar=("S2", "S3"),
                   help="sandbox waits before webhook attempts 2 and 3 (Nylas: 300 600)")
    p.add_argument("--provider-rate-limit", type=float, default=d.provider_rate_limit,
                   help="NOVA_PROVIDER_RATE_LIMIT of the processes")
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds the backfill may take before the run is a failure")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--failed-grace", type=float, default=d.failed_grace,
                   help="a backfill that stays failed this long ends the run (a finding)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="logs, timeline and report (default: a new directory under /tmp)")
    p.add_argument("--nova-rev", default=None, metavar="REV",
                   help="run Nova as of this commit (git archive into the run directory) "
                        "instead of the work tree, e.g. HEAD")
    g = _gmail.GmailOptions()
    p.add_argument("--no-gmail", action="store_true",
                   help="the Nylas inbox alone (no Gmail sandbox, inbox or faults)")
    p.add_argument("--gmail-threads", type=int, default=g.threads,
                   help="threads in the Gmail sandbox mailbox")
    p.add_argument("--gmail-quota", type=int, default=g.quota, metavar="UNITS",
                   help="quota units per user per minute: the Gmail sandbox's and Nova's "
                        "GMAIL_QUOTA_UNITS_PER_MINUTE")
    p.add_argument("--gmail-mail-rate", type=float, default=g.mail_rate,
                   help="Gmail mail changes per second while the backfill runs")
    p.add_argument("--gmail-fault-rates", type=_rates, default=g.fault_rates,
                   metavar="KIND=SHARE,...",
                   help="Gmail sandbox fault rates (default: " + ",".join(
                       f"{k}={v:g}" for k, v in g.fault_rates.items()) + ")")
    p.add_argument("--gmail-expiries", type=int, default=g.expiries, metavar="N",
                   help="history expiries (404) in a chaos run: the first once "
                        "--gmail-expire-at of the Gmail threads are synced, the others each "
                        "after the previous resync completed")
    p.add_argument("--gmail-expire-at", type=float, default=g.expire_at, metavar="SHARE")
    p.add_argument("--pg-log", type=Path, default=None,
                   help="with --database-url: that server's log file, read for deadlocks")
    p.add_argument("--keep-database", action="store_true")
    p.add_argument("--report-json", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="no timeline on stderr")
    return p


def options(args: argparse.Namespace, *, faults: bool, run_dir: Path | None) -> Options:
    return Options(
        threads=args.threads, workers=args.workers, kill_every=args.seconds_between_kills,
        kill_targets=args.kill_targets,
        restart_after=args.restart_after, faults=faults, kills=not args.no_kills,
        pg_crash=not args.no_pg_restart, sandbox_faults=not args.no_sandbox_faults,
        seed=args.seed, hostile=args.hostile,
        mail_rate=args.mail_rate, min_chaos_seconds=args.min_chaos_seconds,
        pg_restart_at=args.pg_restart_at, pg_down_seconds=args.pg_down_seconds,
        pg_restart_cmd=args.pg_restart_cmd, database_url=args.database_url,
        fault_rates=args.fault_rates, hang_seconds=args.hang_seconds,
        inject_429_every=args.inject_429_every, inject_429_burst=args.inject_429_burst,
        webhook_retry_delays=tuple(args.webhook_retry_delays),
        provider_rate_limit=args.provider_rate_limit, timeout=args.timeout,
        drain_timeout=args.drain_timeout, failed_grace=args.failed_grace, run_dir=run_dir,
        nova_rev=args.nova_rev,
        gmail=None if args.no_gmail else _gmail.GmailOptions(
            threads=args.gmail_threads, quota=args.gmail_quota,
            mail_rate=args.gmail_mail_rate, fault_rates=args.gmail_fault_rates,
            expiries=args.gmail_expiries, expire_at=args.gmail_expire_at,
            push_retry_delays=tuple(args.webhook_retry_delays)),
        pg_log=args.pg_log, keep_database=args.keep_database, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The driver's own pool reconnects by itself after the PostgreSQL crash; asyncpg's warnings
    # about it would only bury the timeline (the processes' logs keep theirs).
    logging.getLogger("asyncpg").setLevel(logging.CRITICAL)
    if args.nova_rev:  # one commit for every run, even if HEAD moves meanwhile
        args.nova_rev = subprocess.run(["git", "rev-parse", "--short", args.nova_rev],
                                       cwd=_infra.ROOT, check=True, capture_output=True,
                                       text=True).stdout.strip()
    runs: dict[str, dict[str, Any]] = {}
    plan = [("baseline", False), ("chaos", True)] if args.compare else \
        [("baseline" if args.no_faults else "chaos", not args.no_faults)]
    for label, faults in plan:
        run_dir = args.run_dir / label if args.run_dir and args.compare else args.run_dir
        opts = options(args, faults=faults, run_dir=run_dir)
        try:
            report = asyncio.run(ChaosRun(opts).run())
        except (asyncio.CancelledError, KeyboardInterrupt):
            print(f"interrupted: the {label} run stopped; its logs are in "
                  f"{opts.run_dir or 'its run directory'}", file=sys.stderr)
            return 130
        runs[label] = report
        print(_report.render(report), flush=True)
        print(flush=True)
    out: dict[str, Any] = runs if args.compare else next(iter(runs.values()))
    if args.compare:
        print(_report.render_comparison(runs["baseline"], runs["chaos"]), flush=True)
        b, c = runs["baseline"]["timing"]["wall_seconds"], runs["chaos"]["timing"]["wall_seconds"]
        where = _timing.breakdown(runs["baseline"], runs["chaos"])
        print(_timing.render(where), flush=True)
        out = {**runs, "ratio": round(c / b, 2) if b else None, "where": where}
    if args.report_json:
        args.report_json.write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(r["verdict"]["ok"] for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
