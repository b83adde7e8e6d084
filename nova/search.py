"""`nova search INBOX "query"`: search_messages (sql/130_search.sql) from the shell, and
`nova search --reindex`: apply NOVA_SEARCH_CONFIG and rebuild the stored search vectors.

The query language is Gmail's (from:, to:, subject:, "phrase", has:attachment, label:, is:unread,
after:, newer_than:, -, OR ...); it is parsed in SQL, so apps get the same search without
Python. A query the parser refuses is a usage error (exit 2) with its message on one line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

import psycopg

from nova.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
REBUILD_BATCH = 2000

FIND_INBOX = """
SELECT id, email FROM flux_inboxes
WHERE deleted_at IS NULL
  AND (id::text = %(ref)s OR grant_id = %(ref)s OR lower(email) = lower(%(ref)s))
ORDER BY (id::text = %(ref)s) DESC, created_at
"""
SEARCH = "SELECT * FROM search_messages(%s, %s, %s, %s)"
STATE = """
SELECT config,
       rebuild_messages_after IS NOT NULL OR rebuild_attachments_after IS NOT NULL AS pending,
       (SELECT count(*) FROM flux_email_search_pending)
       + (SELECT count(*) FROM flux_email_search_pending_attachments) AS waiting
FROM nova_search_settings
"""
INDEX_BATCH = 500


class SearchError(Exception):
    """A query, cursor or inbox the search refuses; the message says why."""


def _refused(exc: psycopg.Error) -> bool:
    return exc.sqlstate == "22023" and (exc.diag.message_primary or "").startswith("search:")


def find_inbox(conn: psycopg.Connection[Any], ref: str) -> dict[str, Any]:
    """The inbox named by its id, grant id or email (an exact id wins)."""
    rows = conn.execute(FIND_INBOX, {"ref": ref}).fetchall()
    if rows and str(rows[0]["id"]) == ref.lower():
        return dict(rows[0])
    if len(rows) != 1:
        what = "no inbox" if not rows else f"{len(rows)} inboxes match"
        raise SearchError(f"{what} {ref!r} (give its id, grant id or email)")
    return dict(rows[0])


def search(conn: psycopg.Connection[Any], inbox_id: uuid.UUID, query: str, limit: int = 50,
           cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the inbox's messages matching `query`, newest first, and the cursor of the
    next page (None: this was the last)."""
    if "\x00" in query or (cursor and "\x00" in cursor):
        raise SearchError("search: the query contains a NUL byte")
    try:
        rows = [dict(r) for r in conn.execute(SEARCH, (inbox_id, query, limit, cursor))]
    except psycopg.Error as exc:
        if _refused(exc):
            raise SearchError(exc.diag.message_primary or str(exc)) from None
        raise
    next_cursor = rows[-1].pop("next_cursor") if rows else None
    for r in rows:
        r.pop("next_cursor", None)
    return rows, next_cursor


def reindex(conn: psycopg.Connection[Any], config: str, batch: int = REBUILD_BATCH,
            say: Any = None) -> tuple[bool, int]:
    """Apply `config` and rebuild what is stale, one short transaction per batch (writers go
    on meanwhile). Returns (whether the configuration changed, rows rebuilt)."""
    try:
        row = conn.execute("SELECT nova_search_set_config(%s) AS changed", (config,)).fetchone()
    except psycopg.Error as exc:
        if _refused(exc):
            raise SearchError(exc.diag.message_primary or str(exc)) from None
        raise
    changed = bool(row and row["changed"])
    done = 0
    while True:
        got = conn.execute("SELECT nova_search_rebuild(%s) AS n", (batch,)).fetchone()
        n = int(got["n"]) if got else 0
        if n == 0:
            return changed, done
        done += n
        if say:
            say(done)


def index_pending(conn: psycopg.Connection[Any], batch: int = INDEX_BATCH) -> int:
    """Index every message waiting for it (what the thread processes do as mail arrives,
    nova.search_index); returns how many. New and edited mail is searchable only after this."""
    done = 0
    while True:
        got = conn.execute("SELECT nova_search_index_pending(%s) AS n", (batch,)).fetchone()
        n = int(got["n"]) if got else 0
        done += n
        if n < batch:
            return done


def _index_warnings(state: dict[str, Any], config: str) -> list[str]:
    """What `nova search` says about an index that does not cover all mail yet."""
    waiting = (f"{state['waiting']:,} new or edited message(s) or attachment(s) waiting for the "
               "index (a running `python -m nova.threads` indexes them within seconds)"
               if state["waiting"] else "")
    if state["pending"] or state["config"] != config:
        return [f"nova: search index: configuration {state['config']}"
                f"{', rebuild unfinished' if state['pending'] else ''}"
                f"{', ' + waiting if waiting else ''} (NOVA_SEARCH_CONFIG={config}): "
                "run `nova search --reindex`"]
    return [f"nova: search index: {waiting}"] if waiting else []


def _line(r: dict[str, Any]) -> str:
    at = r["sent_at"].strftime("%Y-%m-%d %H:%M") if r["sent_at"] else "-"
    sender = r["from_name"] or r["from_email"] or "-"
    flags = ("U" if r["unread"] else " ") + ("*" if r["starred"] else " ") + (
        "@" if r["has_attachments"] else " ")
    subject = " ".join((r["subject"] or "(no subject)").split())
    return f"{at}  {flags} {sender[:28]:<28}  {subject[:70]:<70}  {r['message_id']}"


def cmd_search(settings: Settings, args: argparse.Namespace,
               connect: Any, json_default: Any) -> int:
    """`nova search`: see the module doc. `connect` opens the CLI's dict-row connection."""
    if args.reindex:
        started = time.monotonic()
        with connect(settings, args) as conn:
            def say(n: int) -> None:
                print(f"search: {n:,} rows re-indexed", file=sys.stderr)
            try:
                changed, done = reindex(conn, settings.search_config, say=say)
            except SearchError as exc:
                print(f"nova: {exc}", file=sys.stderr)
                return EXIT_USAGE
        what = "set, " if changed else ""
        print(f"search: configuration {settings.search_config} {what}{done:,} rows re-indexed "
              f"in {time.monotonic() - started:.1f} s")
        return EXIT_OK
    if args.inbox is None or args.query is None:
        print('nova search: give INBOX and "QUERY" (or --reindex)', file=sys.stderr)
        return EXIT_USAGE
    with connect(settings, args) as conn:
        try:
            inbox = find_inbox(conn, args.inbox)
        except SearchError as exc:
            print(f"nova: {exc}", file=sys.stderr)
            return EXIT_FAILED
        try:
            rows, next_cursor = search(conn, inbox["id"], args.query, args.limit, args.cursor)
        except SearchError as exc:
            print(f"nova: {exc}", file=sys.stderr)
            return EXIT_USAGE
        state = conn.execute(STATE).fetchone()
    if state:
        for line in _index_warnings(state, settings.search_config):
            print(line, file=sys.stderr)
    if args.json:
        print(json.dumps({"inbox": inbox["id"], "query": args.query, "messages": rows,
                          "next_cursor": next_cursor}, default=json_default, indent=2))
        return EXIT_OK
    for r in rows:
        print(_line(r))
    if next_cursor:
        print(f"more: --cursor {next_cursor}")
    elif not rows:
        print("no messages match")
    return EXIT_OK


def add_parser(sub: Any, func: Any) -> None:
    """Register `nova search` on the CLI's subparsers; `func` runs it."""
    p = sub.add_parser("search", help="search an inbox with Gmail's operators (from:, to:, "
                                      "subject:, \"phrase\", has:attachment, label:, is:unread, "
                                      "after:, newer_than:, -, OR)")
    p.add_argument("inbox", nargs="?", help="the inbox id, or its grant id or email")
    p.add_argument("query", nargs="?", help="the query, quoted as one argument")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50, help="messages per page (1 to 1000)")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    p.add_argument("--reindex", action="store_true",
                   help="apply NOVA_SEARCH_CONFIG and rebuild stale search vectors in batches")
    p.set_defaults(func=func)
