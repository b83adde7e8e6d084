"""The Gmail inbox of a chaos run, beside the Nylas one.

- The Gmail API sandbox (`python -m nova.sandbox.gmail`, one user) in its own process, pushing
  that user's changes as Pub/Sub pushes (`?token=`) to the receiver's /webhooks/gmail once the
  completion monitor has made its users.watch (GMAIL_PUBSUB_TOPIC); its quota per user and
  Nova's GMAIL_QUOTA_UNITS_PER_MINUTE are raised alike (`--gmail-quota`), as the Nylas budget
  is, so the 2-core host is the limit.
- The user becomes a 'gmail' inbox with its credentials stored encrypted, as `nova inbox add
  --provider gmail` does; its backfill is queued with the Nylas one.
- Mail while the backfill runs (control API): new threads, replies to known threads and to
  threads past the first page, label changes (UNREAD, STARRED, INBOX, user labels), deletes of
  single messages and of whole threads.
- Faults (chaos runs): quota refusals (429 rateLimitExceeded, 403 userRateLimitExceeded, 403
  rateLimitExceeded), 5xx, hangs, at random rates and forced every `--inject-429-every`; the
  history expires (`--gmail-expiries`; the next history.list answers 404): the first once a
  share of the Gmail threads is synced (the backfill is running), the next ones after the
  inbox's backfill and resync completed. Right before each expiry a burst of changes lands
  in the gap: a new thread, a reply to an old thread, a deleted message, a thread deleted whole
  and a relabel; only the resync can bring them in.
- The end: the inbox is drained when its cursor reached the sandbox's last history id, no
  resync is owed and its backfill is completed with nothing open; then the database is
  compared with the sandbox's mailbox (`GET /_sandbox/users/{email}/mailbox`) by the same
  `_verify.compare_mailbox` as the Nylas inbox (messages: thread, date, unread, starred,
  labels; threads: live message set, count, last message time, unread, labels; subjects are
  not compared: Gmail never changes them and MIME decoding is not under test here).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from nova.config import load_settings
from nova.credentials import authorized_user_from_info, cipher, save_credentials
from tests.chaos import _infra, _verify

PUSH_TOKEN = "chaos-gmail-push-token-not-secret"
TOPIC = "projects/nova-sandbox/topics/nova-chaos"
# Protects nothing but the sandbox's generated refresh token (a passphrase, HKDF-derived).
CREDENTIALS_KEY = "nova-chaos-credentials-key-not-secret"
DEFAULT_FAULT_RATES = {
    # Each quota refusal holds the user's budget for QUOTA_HOLD_SECONDS (2 s): rare.
    "rate_limit": 0.0005, "user_rate_limit": 0.0005, "project_rate_limit": 0.0005,
    "error_5xx": 0.01, "timeout": 0.002,
}
QUOTA_KINDS = ("rate_limit", "user_rate_limit", "project_rate_limit")
MAIL_MIX = (("new_thread", 0.2), ("reply", 0.2), ("old_reply", 0.1), ("relabel", 0.3),
            ("delete", 0.15), ("delete_thread", 0.05))
GAP_LINE = re.compile(r"history from (\d+) expired: cursor now (\d+)")
LABELS = ("UNREAD", "STARRED", "IMPORTANT", "INBOX", "Label_1", "Label_2", "Label_4")


@dataclass
class GmailOptions:
    threads: int = 1000
    quota: int = 120_000  # units per user per minute, the sandbox's and Nova's
    mail_rate: float = 3.0
    fault_rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAULT_RATES))
    expiries: int = 1
    expire_at: float = 0.3  # share of the Gmail threads synced at the first expiry
    expire_after: float = 3.0  # seconds after the previous resync completed (later ones)
    push_retry_delays: tuple[float, ...] = (5.0, 15.0)


@dataclass
class GmailMail:
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    gap: Counter[str] = field(default_factory=Counter)  # changes made inside history gaps
    gap_deleted_threads: set[str] = field(default_factory=set)


class GmailSide:
    def __init__(self, opts: GmailOptions, seed: int, hostile: float, say: Any,
                 logs: Path, cwd: Path, env: dict[str, str]) -> None:
        self.o = opts
        self.seed = seed
        self.hostile = hostile
        self.say = say
        self.logs = logs
        self.cwd = cwd
        self.env = env
        self.proc: _infra.Proc | None = None
        self.client: httpx.AsyncClient | None = None
        self.url = ""
        self.email = ""
        self.inbox_id: uuid.UUID | None = None
        self.config_id: uuid.UUID | None = None
        self.live: dict[str, list[str]] = {}  # thread id -> its message ids, as the driver knows
        self.order: list[str] = []  # thread ids, newest first, at the start
        self.mail = GmailMail()
        self.expiries: list[dict[str, Any]] = []
        self.last_floor = 0
        self.deleted_threads: dict[str, int] = {}  # deleted whole: the history id of it
        self.final_history: int | None = None

    # ------------------------------------------------------------------ set-up
    async def start(self, receiver_port: int) -> None:
        port = _infra.free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "nova.sandbox.gmail", "--port", str(port),
                "--threads", str(self.o.threads), "--users", "1", "--seed", str(self.seed),
                "--hostile", str(self.hostile), "--quota-per-minute", str(self.o.quota),
                "--push-endpoint", f"http://127.0.0.1:{receiver_port}/webhooks/gmail",
                "--push-auth", "token"]
        self.proc = _infra.Proc("sandbox-gmail", args, self.env, self.logs / "sandbox-gmail.log",
                                self.cwd)
        self.proc.start()
        self.client = httpx.AsyncClient(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                resp = await self.client.get("/_sandbox/users")
                if resp.status_code == 200:
                    user = resp.json()[0]
                    self.email, self.credentials = user["email"], user["credentials"]
                    break
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"the Gmail sandbox did not start (see {self.proc.log})")
            await asyncio.sleep(0.2)
        # Pub/Sub-like pushes with the receiver's token, retried sooner than Pub/Sub's 10 s+.
        await self.client.post("/_sandbox/config", json={"push": {
            "token": PUSH_TOKEN, "retry_delays": list(self.o.push_retry_delays)}})
        box = await self.dump()
        self.live = {t["id"]: list(t["messageIds"]) for t in box["threads"]}
        self.order = [t["id"] for t in box["threads"]]
        await self.client.post("/_sandbox/stats/reset")

    def process_env(self) -> dict[str, str]:
        return {"GMAIL_API_URI": self.url, "GMAIL_TOKEN_URI": f"{self.url}/token",
                "NOVA_CREDENTIALS_KEY": CREDENTIALS_KEY, "GMAIL_PUSH_TOKEN": PUSH_TOKEN,
                "GMAIL_PUBSUB_TOPIC": TOPIC,
                "GMAIL_QUOTA_UNITS_PER_MINUTE": str(self.o.quota)}

    async def register(self, pool: asyncpg.Pool) -> uuid.UUID:
        """The user as a Gmail inbox, credentials encrypted, as `nova inbox add` stores them."""
        token_uri = f"{self.url}/token"
        settings = load_settings(credentials_key=CREDENTIALS_KEY, gmail_token_uri=token_uri)
        user = authorized_user_from_info({**self.credentials, "token_uri": token_uri},
                                         source="the chaos Gmail sandbox", token_uri=token_uri)
        async with pool.acquire() as conn, conn.transaction():
            inbox: uuid.UUID = await conn.fetchval(
                "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES ('gmail', $1, $2)"
                " RETURNING id", self.email.lower(), self.email)
            await save_credentials(conn, inbox, user, cipher(settings))
        self.inbox_id = inbox
        return inbox

    async def set_faults(self, rates: dict[str, float], hang_seconds: float) -> None:
        assert self.client is not None
        await self.client.post("/_sandbox/faults", json={"rates": rates,
                                                         "hang_seconds": hang_seconds})

    async def force(self, kinds: list[str]) -> None:
        assert self.client is not None
        await self.client.post("/_sandbox/faults", json={
            "inject": [{"kind": k, "count": 1} for k in kinds]})

    async def dump(self) -> dict[str, Any]:
        assert self.client is not None
        resp = await self.client.get(f"/_sandbox/users/{self.email}/mailbox")
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ mail
    async def _change(self, kind: str, rng: random.Random) -> bool:
        """One change of `kind`; False when there is nothing to change that way."""
        assert self.client is not None
        base = f"/_sandbox/users/{self.email}/messages"
        c = self.client
        if kind == "new_thread":
            n = sum(self.mail.counts.values())
            body = (await c.post(base, json={"subject": f"chaos {n}", "text": "new"})).json()
            self.live[body["threadId"]] = [body["id"]]
            return True
        if kind in ("reply", "old_reply"):
            pool = list(self.live) if kind == "reply" else \
                [t for t in self.order[len(self.order) // 3:] if t in self.live]
            if not pool:
                return False
            tid = rng.choice(pool)
            resp = await c.post(base, json={"thread_id": tid, "text": "a reply"})
            resp.raise_for_status()
            self.live[tid].append(resp.json()["id"])
            return True
        if kind == "relabel":
            if not self.live:
                return False
            mid = rng.choice(self.live[rng.choice(list(self.live))])
            add, remove = ([rng.choice(LABELS)], []) if rng.random() < 0.5 else \
                ([], [rng.choice(LABELS)])
            resp = await c.post(f"{base}/{mid}/labels", json={"add": add, "remove": remove})
            resp.raise_for_status()
            return True
        if kind == "delete":
            many = [t for t, mids in self.live.items() if len(mids) > 1]
            if not many:
                return False
            tid = rng.choice(many)
            mid = rng.choice(self.live[tid])
            (await c.delete(f"{base}/{mid}")).raise_for_status()
            self.live[tid].remove(mid)
            return True
        if kind == "delete_thread":
            small = [t for t, mids in self.live.items() if len(mids) <= 3]
            if not small:
                return False
            tid = rng.choice(small)
            for mid in list(self.live[tid]):
                resp = await c.delete(f"{base}/{mid}")
                resp.raise_for_status()
                self.deleted_threads[tid] = int(resp.json()["historyId"])
            del self.live[tid]
            return True
        raise ValueError(kind)

    async def mailer(self, running: Any) -> None:
        rng = random.Random(f"gmail-mail:{self.seed}")
        kinds = [k for k, _ in MAIL_MIX]
        weights = [w for _, w in MAIL_MIX]
        while running():
            kind = rng.choices(kinds, weights)[0]
            try:
                if await self._change(kind, rng):
                    self.mail.counts[kind] += 1
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                self.mail.errors[f"{kind}: {type(exc).__name__}"] += 1
            await asyncio.sleep(1 / self.o.mail_rate)

    # ------------------------------------------------------------------ history 404s
    async def _gap_burst_and_expire(self, pool: asyncpg.Pool, why: str) -> None:
        """Changes that only the history knows of, then the history forgotten. Pushes are
        held meanwhile (a push would have Nova read the burst before it is forgotten), and
        the syncs they started before are given a moment to end."""
        assert self.client is not None
        rng = random.Random(f"gmail-gap:{self.seed}:{len(self.expiries)}")
        made = Counter[str]()
        await self.client.post("/_sandbox/push/hold")
        await asyncio.sleep(1.5)
        before = set(self.live)
        for kind in ("new_thread", "old_reply", "delete", "delete_thread", "relabel"):
            try:
                if await self._change(kind, rng):
                    made[kind] += 1
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                self.mail.errors[f"gap {kind}: {type(exc).__name__}"] += 1
        gone = before - set(self.live)
        self.mail.gap_deleted_threads |= gone
        self.mail.gap.update(made)
        try:
            resp = await self.client.post(f"/_sandbox/users/{self.email}/history/expire",
                                          json={})
            resp.raise_for_status()
        finally:
            await self.client.post("/_sandbox/push/release")
        floor = int(resp.json()["floor"])
        row = await self.state(pool)
        cursor = int(row["sync_cursor"]) if row is not None and str(
            row["sync_cursor"] or "").isdigit() else None
        self.last_floor = max(self.last_floor, floor)
        self.expiries.append({"at_seconds": round(self.say.at(), 1), "floor": floor,
                              "nova_cursor": cursor, "when": why, "gap_changes": dict(made),
                              "gap_deleted_threads": sorted(gone)})
        self.say(f"gmail: history expired through {floor} ({why}; Nova's cursor {cursor}) "
                 f"after a gap burst {dict(made)}; the next history.list answers 404")

    async def expirer(self, pool: asyncpg.Pool, watch: Any, running: Any) -> None:
        """`expiries` history 404s: the first while the backfill runs, the others each after
        the previous resync completed."""
        target = int(self.o.threads * self.o.expire_at)
        for n in range(self.o.expiries):
            if n == 0:
                while running() and watch.synced < target:
                    watch.progress.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(watch.progress.wait(), 5)
                why = f"backfill running, {watch.synced} threads synced"
            else:
                while running() and not await self.caught_up(pool):
                    await asyncio.sleep(0.5)
                await asyncio.sleep(self.o.expire_after)
                why = "after the resync completed"
            if not running():
                return
            await self._gap_burst_and_expire(pool, why)

    def expiries_done(self) -> bool:
        return len(self.expiries) >= self.o.expiries

    async def state(self, pool: asyncpg.Pool) -> asyncpg.Record | None:
        try:
            return await pool.fetchrow(
                "SELECT i.sync_cursor, i.resync_requested_at, c.backfill_status AS status,"
                " (SELECT count(*) FROM queued_threads q WHERE q.config_id = c.id"
                "  AND q.status IN ('queued', 'processing')) AS open"
                " FROM flux_inboxes i JOIN flux_inbox_configurations c ON c.id = $2"
                " WHERE i.id = $1", self.inbox_id, self.config_id, timeout=10)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return None

    async def caught_up(self, pool: asyncpg.Pool, history_id: int | None = None) -> bool:
        """The 404s noticed (cursor past the last floor, or past `history_id`), no resync
        owed, the backfill completed with nothing open."""
        row = await self.state(pool)
        if row is None:
            return False
        cursor = int(row["sync_cursor"]) if str(row["sync_cursor"] or "").isdigit() else 0
        need = max(self.last_floor, history_id or 0)
        return (cursor >= need and row["resync_requested_at"] is None
                and row["status"] == "completed" and row["open"] == 0)

    async def drained(self, pool: asyncpg.Pool) -> bool:
        """After the mail stopped: every change of the sandbox applied."""
        if self.final_history is None:
            assert self.client is not None
            users = (await self.client.get("/_sandbox/users")).json()
            self.final_history = int(users[0]["historyId"])
        return await self.caught_up(pool, self.final_history)

    # ------------------------------------------------------------------ the end
    @staticmethod
    def gaps(logs: list[Path]) -> list[tuple[int, int]]:
        """History gaps as Nova saw them: from its cursor when history.list answered 404 to
        the id it jumped to ("history from X expired: cursor now Y", nova.changes)."""
        out = []
        for path in logs:
            if path.exists():
                out += [(int(a), int(b)) for a, b in GAP_LINE.findall(
                    path.read_text(errors="replace"))]
        return sorted(set(out))

    async def verify(self, pool: asyncpg.Pool, since: int,
                     logs: list[Path]) -> dict[str, Any]:
        assert self.client is not None and self.inbox_id is not None
        assert self.config_id is not None
        stats = (await self.client.get("/_sandbox/stats")).json()
        pushes = (await self.client.get("/_sandbox/push")).json()
        box = await self.dump()
        sb_messages = {m["id"]: {
            "id": m["id"], "thread_id": m["threadId"], "date": int(m["internalDate"]) // 1000,
            "unread": "UNREAD" in m["labelIds"], "starred": "STARRED" in m["labelIds"],
            "folders": m["labelIds"]} for m in box["messages"]}
        sb_threads: dict[str, dict[str, Any]] = {}
        for t in box["threads"]:
            labels = {lb for mid in t["messageIds"] for lb in sb_messages[mid]["folders"]}
            sb_threads[t["id"]] = {"id": t["id"], "message_ids": t["messageIds"],
                                   "unread": "UNREAD" in labels, "folders": sorted(labels)}
        async with pool.acquire() as conn:
            db_threads, db_messages = await _verify.database_rows(conn, self.inbox_id)
            rows = await conn.fetch(
                "SELECT webhook_id, status FROM flux_webhook_notifications"
                " WHERE provider = 'gmail'")
            cursor = await conn.fetchval("SELECT sync_cursor FROM flux_inboxes WHERE id = $1",
                                         self.inbox_id)
            completion = await _verify.completion_facts(conn, self.config_id)
            work = await _verify.queue_work(conn, self.config_id, stats, len(sb_threads))
        mailbox = _verify.compare_mailbox(sb_threads, sb_messages, db_threads, db_messages,
                                          since=since)
        gone_live = [e["id"] for e in mailbox["threads"]["examples_stale"]
                     if "deleted" in e["diff"]]
        all_gone_live = {r["provider_thread_id"] for r in db_threads
                         if r["deleted_at"] is None and r["provider_thread_id"] not in sb_threads}
        gaps = self.gaps(logs)
        in_gap = {t for t, hid in self.deleted_threads.items()
                  if any(lo < hid <= hi for lo, hi in gaps)}
        known = sorted(all_gone_live & in_gap)
        known_messages = sum(1 for r in db_messages if r["deleted_at"] is None
                             and r["thread_pid"] in all_gone_live)
        delivered = {p["messageId"] for p in pushes if p.get("outcome") == "delivered"}
        stored = {r["webhook_id"].removeprefix("gmail:") for r in rows}
        return {
            "email": self.email, "threads": mailbox["threads"], "messages": mailbox["messages"],
            "threads_deleted_whole_left_live": len(all_gone_live),
            "threads_deleted_whole_in_a_gap_left_live": len(known),
            "messages_of_threads_deleted_whole_left_live": known_messages,
            "threads_deleted_whole": len(self.deleted_threads),
            "threads_deleted_whole_in_a_gap": len(in_gap),
            "history_gaps_seen_by_nova": gaps,
            "examples_gone_live": gone_live[:_verify.EXAMPLES],
            "queue_work": work, "completion": completion,
            "cursor": cursor, "history_id": box["historyId"],
            "pushes": {"attempts": len(pushes), "delivered": len(delivered),
                       "outcomes": dict(Counter(p.get("outcome") for p in pushes)),
                       "received": len(rows), "lost": len(delivered - stored),
                       "statuses": dict(Counter(r["status"] for r in rows))},
            "expiries": self.expiries,
            "mail": {**dict(self.mail.counts), "gap": dict(self.mail.gap),
                     "errors": dict(self.mail.errors)},
            "sandbox_faults": stats.get("faults", {}),
            "sandbox_statuses": stats.get("statuses", {}),
            "sandbox_refusals": stats.get("refusals", {}),
            "sandbox_requests": sum(stats.get("requests", {}).values()),
            "units": stats.get("units_total", {}),
        }

    async def close(self) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.proc.terminate, 15)
        if self.client is not None:
            await self.client.aclose()
