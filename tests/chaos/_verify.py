"""The end of a chaos run: the database against the sandbox's final mailbox, row by row.

Every figure of the report is computed here from two sources only: the sandbox (its Nylas API
for the mailbox, its control API for the webhook delivery log and request stats) and the
database. Nothing the processors say about themselves is trusted, except the monitor's own
"premature completion" lines, which are counted beside the driver's observations.

Terms:
- expected: live at the provider (the sandbox) at the end.
- present: a live row (deleted_at IS NULL) for an expected object.
- missing: an expected object without a live row (no row at all, or a row deleted here).
- duplicated: a provider id stored twice (the unique constraints forbid it; counted anyway).
- stale: a live row that differs from the provider: a thread whose live message set, message
  count, last message time, unread or folders differ; a message whose subject, thread, date,
  unread, starred or folders differ; or a live row for an object the provider no longer has.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from nova.providers.clean import clean_text

EXAMPLES = 15


def _text(value: Any) -> Any:
    return clean_text(value) if isinstance(value, str) else value


def _folders(values: Any) -> list[str]:
    return sorted({clean_text(str(v)) for v in values or ()})


def _epoch(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


async def list_all(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    """Every item of a Nylas list endpoint, 200 per page."""
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 200}
        if token:
            params["page_token"] = token
        resp = await client.get(path, params=params)
        resp.raise_for_status()
        body = resp.json()
        items.extend(body["data"])
        token = body.get("next_cursor")
        if not token:
            return items


async def sandbox_mailbox(client: httpx.AsyncClient, grant_id: str,
                          ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The sandbox's final state: threads and messages by id (its faults must be off)."""
    threads = {t["id"]: t for t in await list_all(client, f"/v3/grants/{grant_id}/threads")}
    messages = {m["id"]: m for m in await list_all(client, f"/v3/grants/{grant_id}/messages")}
    return threads, messages


def _diff(expected: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    return {k: {"provider": expected[k], "stored": stored.get(k)}
            for k in expected if expected[k] != stored.get(k)}


def compare_mailbox(sb_threads: dict[str, dict[str, Any]], sb_messages: dict[str, dict[str, Any]],
                    db_threads: list[asyncpg.Record], db_messages: list[asyncpg.Record],
                    since: int | None = None) -> dict[str, Any]:
    """`since`: the backfill's start (unix time). A thread whose latest message is older is
    outside the backfill's range (a delete can push the mailbox's oldest threads out of it):
    not expected, but a row Nova stored for it anyway (a webhook) is still compared."""
    latest = {tid: max((sb_messages[m]["date"] for m in t.get("message_ids") or ()
                        if m in sb_messages), default=0) for tid, t in sb_threads.items()}
    out_of_range = {tid for tid, when in latest.items() if since is not None and when < since}
    # --- messages
    live_rows = {r["provider_message_id"]: r for r in db_messages if r["deleted_at"] is None}
    all_rows = {r["provider_message_id"]: r for r in db_messages}
    m_missing: list[dict[str, Any]] = []
    m_stale: list[dict[str, Any]] = []
    m_expected = 0
    for mid, m in sb_messages.items():
        row = live_rows.get(mid)
        outside = m.get("thread_id") in out_of_range
        m_expected += not outside
        if row is None:
            if outside:
                continue
            m_missing.append({"id": mid, "thread": m["thread_id"],
                              "why": "deleted here" if mid in all_rows else "no row"})
            continue
        want = {"subject": _text(m.get("subject")), "thread": m.get("thread_id"),
                "date": m.get("date"), "unread": bool(m.get("unread")),
                "starred": bool(m.get("starred")), "folders": _folders(m.get("folders"))}
        have = {"subject": row["subject"], "thread": row["thread_pid"],
                "date": _epoch(row["sent_at"]), "unread": row["unread"],
                "starred": row["starred"], "folders": _folders(row["folders"])}
        if "subject" not in m:  # a provider whose subjects are not compared (Gmail)
            del want["subject"], have["subject"]
        diff = _diff(want, have)
        if row["provider_thread_id"] != row["thread_pid"]:
            diff["provider_thread_id"] = {"provider": m.get("thread_id"),
                                          "stored": row["provider_thread_id"]}
        if diff:
            m_stale.append({"id": mid, "diff": diff})
    m_gone = [{"id": mid, "diff": {"deleted": {"provider": True, "stored": False}}}
              for mid in live_rows if mid not in sb_messages]
    m_stale += m_gone

    # --- threads
    live_by_thread: dict[str, set[str]] = defaultdict(set)
    for r in db_messages:
        if r["deleted_at"] is None and r["thread_pid"] is not None:
            live_by_thread[r["thread_pid"]].add(r["provider_message_id"])
    t_rows = {r["provider_thread_id"]: r for r in db_threads}
    t_missing: list[dict[str, Any]] = []
    t_stale: list[dict[str, Any]] = []
    for tid, t in sb_threads.items():
        row = t_rows.get(tid)
        if tid in out_of_range and (row is None or row["deleted_at"] is not None):
            continue
        if row is None or row["deleted_at"] is not None:
            t_missing.append({"id": tid, "why": "no row" if row is None else "deleted here"})
            continue
        ids = list(t.get("message_ids") or [])
        dates = [sb_messages[m]["date"] for m in ids if m in sb_messages]
        want = {"messages": sorted(ids), "message_count": len(ids),
                "last_message_at": max(dates) if dates else None,
                "unread": bool(t.get("unread")), "folders": _folders(t.get("folders"))}
        have = {"messages": sorted(live_by_thread.get(tid, ())),
                "message_count": row["message_count"],
                "last_message_at": _epoch(row["last_message_at"]), "unread": row["unread"],
                "folders": _folders(row["folders"])}
        diff = _diff(want, have)
        if "messages" in diff:  # name the difference, not two long lists
            diff["messages"] = {"missing_here": sorted(set(want["messages"])
                                                       - set(have["messages"])),
                                "extra_here": sorted(set(have["messages"])
                                                     - set(want["messages"]))}
        if diff:
            t_stale.append({"id": tid, "diff": diff})
    t_gone = [{"id": tid, "diff": {"deleted": {"provider": True, "stored": False}}}
              for tid, r in t_rows.items() if r["deleted_at"] is None and tid not in sb_threads]
    t_stale += t_gone

    t_expected = len(sb_threads) - len(out_of_range)
    return {
        "threads": {"expected": t_expected, "present": t_expected - len(t_missing),
                    "out_of_range": len(out_of_range),
                    "missing": len(t_missing), "stale": len(t_stale),
                    "rows": len(db_threads), "live_rows": sum(
                        1 for r in db_threads if r["deleted_at"] is None),
                    "examples_missing": t_missing[:EXAMPLES],
                    "examples_stale": t_stale[:EXAMPLES]},
        "messages": {"expected": m_expected, "present": m_expected - len(m_missing),
                     "missing": len(m_missing), "stale": len(m_stale),
                     "rows": len(db_messages), "live_rows": len(live_rows),
                     "examples_missing": m_missing[:EXAMPLES],
                     "examples_stale": m_stale[:EXAMPLES]},
    }


DUPLICATES = {
    "threads": "SELECT count(*) FROM (SELECT 1 FROM flux_email_threads"
               " GROUP BY inbox_id, provider_thread_id HAVING count(*) > 1) d",
    "messages": "SELECT count(*) FROM (SELECT 1 FROM flux_email_messages"
                " GROUP BY inbox_id, provider_message_id HAVING count(*) > 1) d",
    "attachments": "SELECT count(*) FROM (SELECT 1 FROM flux_email_attachments"
                   " GROUP BY message_id, provider_attachment_id HAVING count(*) > 1) d",
    "webhooks": "SELECT count(*) FROM (SELECT 1 FROM flux_webhook_notifications"
                " GROUP BY webhook_id HAVING count(*) > 1) d",
    "queued_threads": "SELECT count(*) FROM (SELECT 1 FROM queued_threads"
                      " GROUP BY config_id, provider_thread_id HAVING count(*) > 1) d",
}

DB_THREADS = """
SELECT provider_thread_id, deleted_at, message_count, last_message_at, unread, folders
FROM flux_email_threads WHERE inbox_id = $1
"""
DB_MESSAGES = """
SELECT m.provider_message_id, m.provider_thread_id, t.provider_thread_id AS thread_pid,
       m.subject, m.unread, m.starred, m.folders, m.deleted_at, m.sent_at
FROM flux_email_messages m LEFT JOIN flux_email_threads t ON t.id = m.thread_id
WHERE m.inbox_id = $1
"""


async def database_rows(conn: asyncpg.Connection, inbox_id: uuid.UUID,
                        ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    return await conn.fetch(DB_THREADS, inbox_id), await conn.fetch(DB_MESSAGES, inbox_id)


async def duplicates(conn: asyncpg.Connection) -> dict[str, int]:
    return {name: int(await conn.fetchval(q)) for name, q in DUPLICATES.items()}


async def queue_work(conn: asyncpg.Connection, config_id: uuid.UUID,
                     sandbox_stats: dict[str, Any], threads_expected: int) -> dict[str, Any]:
    """Work done more than once: allowed (at-least-once), but shown."""
    rows = await conn.fetch(
        "SELECT status, count(*) AS n, sum(attempts) AS attempts FROM queued_threads"
        " WHERE config_id = $1 GROUP BY status", config_id)
    by_status = {r["status"]: int(r["n"]) for r in rows}
    attempts = sum(int(r["attempts"] or 0) for r in rows)
    requests = {k: int(v) for k, v in sandbox_stats.get("requests", {}).items()}
    total = sum(requests.values())
    return {"queued_threads": by_status, "sync_attempts": attempts,
            "provider_requests": total, "requests_by_endpoint": requests,
            "requests_per_thread": round(total / threads_expected, 2)
            if threads_expected else None}


def webhook_figures(log: list[dict[str, Any]], rows: list[asyncpg.Record]) -> dict[str, Any]:
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        by_id[entry["id"]].append(entry)
    delivered = {i for i, es in by_id.items() if any(e["outcome"] == "delivered" for e in es)}
    pending = {i for i, es in by_id.items()
               if i not in delivered and es[-1]["outcome"] == "retrying"}
    undelivered = set(by_id) - delivered - pending
    answers = Counter(str(e.get("status") if e.get("status") is not None
                          else "connection error") for e in log)
    stored = {r["webhook_id"]: r for r in rows}
    statuses = Counter(r["status"] for r in rows)
    lost = sorted(delivered - set(stored))
    errors = Counter((r["error_message"] or "")[:160] for r in rows if r["status"] == "error")
    return {
        "sent": len(by_id), "attempts": len(log),
        "retried": sum(1 for es in by_id.values() if len(es) > 1),
        "delivered": len(delivered), "undelivered": len(undelivered),
        "undelivered_ids": sorted(undelivered)[:EXAMPLES], "pending_retry": len(pending),
        "answers": dict(answers),
        "received": len(rows), "applied": statuses.get("processed", 0),
        "skipped": statuses.get("skipped", 0), "waiting": statuses.get("waiting", 0),
        "error": statuses.get("error", 0),
        "unfinished": statuses.get("pending", 0) + statuses.get("processing", 0),
        "lost": len(lost), "lost_ids": lost[:EXAMPLES],
        "errors": dict(errors),
        "types": dict(Counter(e["type"] for es in by_id.values() for e in es[:1])),
    }


DEAD_LETTER_REASON = {
    "thread_sync_jobs": "SELECT error_message FROM queued_threads"
                        " WHERE id = ($1::jsonb ->> 'queued_thread_id')::bigint",
    "nylas_webhook_notifications": "SELECT error_message FROM flux_webhook_notifications"
                                   " WHERE id = ($1::jsonb ->> 'notification_id')::uuid",
    "inbox_backfill_jobs": "SELECT last_error FROM flux_inbox_configurations"
                           " WHERE id = ($1::jsonb ->> 'config_id')::uuid",
}


async def dead_letters(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch("SELECT * FROM nova_dead_letters()")
    by_queue: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for r in rows:
        by_queue[r["queue_name"]] += 1
        reason = None
        q = DEAD_LETTER_REASON.get(r["queue_name"])
        if q is not None:
            try:
                reason = await conn.fetchval(q, r["message"])
            except (asyncpg.PostgresError, ValueError):
                reason = None
        reason = (reason or "(no error recorded on its row)")[:200]
        reasons[f"{r['queue_name']}: {reason}"] += 1
        if len(examples) < EXAMPLES:
            examples.append({"queue": r["queue_name"], "msg_id": r["msg_id"],
                             "read_ct": r["read_ct"], "message": r["message"],
                             "reason": reason})
    return {"total": len(rows), "by_queue": dict(by_queue), "reasons": dict(reasons),
            "examples": examples}


async def completion_facts(conn: asyncpg.Connection, config_id: uuid.UUID) -> dict[str, Any]:
    cfg = await conn.fetchrow("SELECT * FROM flux_inbox_configurations WHERE id = $1",
                              config_id)
    after = 0
    if cfg["backfill_completed_at"] is not None:
        after = int(await conn.fetchval(
            "SELECT count(*) FROM queued_threads WHERE config_id = $1"
            " AND processed_at > $2", config_id, cfg["backfill_completed_at"]))
    open_now = int(await conn.fetchval(
        "SELECT count(*) FROM queued_threads WHERE config_id = $1"
        " AND status IN ('queued', 'processing')", config_id))
    return {"status": cfg["backfill_status"], "last_error": cfg["last_error"],
            "attempts": cfg["backfill_attempts"], "pages": cfg["checkpoint_pages_done"],
            "threads_found": cfg["checkpoint_threads_found"],
            "threads_synced_after_completion": after, "threads_open_at_end": open_now}


# A repair, not "[Recovery] premature completions failed (...)": a step cut off by an outage.
PREMATURE_LINE = re.compile(r"\[Recovery\] premature completion repaired")
TRACEBACK = "Traceback (most recent call last)"
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ")


def scan_logs(logs: dict[str, Path]) -> dict[str, Any]:
    """What the processes' own logs say: monitor repairs, tracebacks, errors, lost leases."""
    out: dict[str, Any] = {"premature_lines": [], "tracebacks": {}, "error_lines": {},
                           "lease_lost": 0, "archived_lines": [], "recovery_lines": 0,
                           "deadlock_lines": {}}
    for name, path in logs.items():
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        tb = [i for i, line in enumerate(lines) if TRACEBACK in line
              and (i == 0 or "direct cause" not in lines[i - 2])]  # chained: counted once
        if tb:
            # What logged it: the record just before the traceback, without its timestamp.
            by = Counter(_STAMP.sub("", lines[i - 1]).strip()[:140] if i else "?" for i in tb)
            out["tracebacks"][name] = {"count": len(tb), "logged_by": dict(by),
                                       "first": "\n".join(lines[max(0, tb[0] - 2):tb[0] + 30])}
        errors = [line for line in lines if " ERROR " in line]
        if errors:
            out["error_lines"][name] = {"count": len(errors), "examples": errors[:5]}
        # What the clients saw of deadlocks (the server log is the count that matters).
        seen = sum(1 for line in lines if "deadlock detected" in line.lower())
        if seen:
            out["deadlock_lines"][name] = seen
        for line in lines:
            if PREMATURE_LINE.search(line):
                out["premature_lines"].append(f"{name}: {line}")
            if "lease lost" in line:
                out["lease_lost"] += 1
            if "[Recovery]" in line:
                out["recovery_lines"] += 1
            if "archived" in line and ("failed in" in line or "unrun" in line):
                out["archived_lines"].append(f"{name}: {line}")
    out["archived_lines"] = out["archived_lines"][:EXAMPLES]
    return out


def scan_postgres_log(path: Path | None, offset: int = 0) -> dict[str, Any]:
    """The server's own errors (the private server's log, or `--pg-log` from `offset`, where
    it stood when the run began): counts by message, and every deadlock with its DETAIL,
    which names the statements of both sides. One log for the whole database: the Nylas and
    the Gmail inbox's transactions alike."""
    if path is None or not path.exists():
        return {"available": False}
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    errors: Counter[str] = Counter()
    deadlocks: list[str] = []
    for i, line in enumerate(lines):
        if "ERROR:" in line:
            errors[line.split("ERROR:", 1)[1].strip()[:120]] += 1
        if "deadlock detected" in line:
            block = [line]
            for follow in lines[i + 1:i + 12]:
                if "ERROR:" in follow or "LOG:" in follow:
                    break
                block.append(follow)
            deadlocks.append("\n".join(block))
    return {"available": True, "errors": dict(errors.most_common(20)),
            "deadlocks": len(deadlocks), "deadlock_reports": deadlocks[:EXAMPLES]}
