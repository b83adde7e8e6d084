"""The `nova` command.

Exit codes: 0 done; 1 the operation failed (the database refused or did not answer, an id that
does not exist, a backfill that failed while watched); 2 bad usage or settings; `nova verify`
adds 3, drift found. Every failure is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, NoReturn

import psycopg
from psycopg.rows import dict_row

from nova import db, migrate
from nova.config import ConfigError, Settings, load_settings
from nova.logs import setup_logging

log = logging.getLogger("nova.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CONNECT_TIMEOUT = 10


class Unreachable(Exception):
    """The database did not answer (refused, down, wrong host or credentials)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _date(text: str) -> dt.datetime:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id: {text!r}") from None


def _url(settings: Settings, args: argparse.Namespace) -> str:
    try:
        return str(args.database_url or db.database_url(settings))
    except psycopg.OperationalError as exc:  # the embedded server did not come up
        raise Unreachable(_one_line(str(exc))) from None


def _connect(settings: Settings, args: argparse.Namespace) -> psycopg.Connection[Any]:
    url = _url(settings, args)
    try:
        return db.connect(url, autocommit=True, row_factory=dict_row,
                          connect_timeout=CONNECT_TIMEOUT)
    except psycopg.OperationalError as exc:
        raise Unreachable(f"{db.describe(url)}: {_one_line(str(exc))}") from None


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    _connect(settings, args).close()  # a database that does not answer: one line, exit 1
    argv = ["--database-url", args.database_url] if args.database_url else []
    return migrate.main(argv)


def cmd_inbox_add(settings: Settings, args: argparse.Namespace) -> int:
    if args.provider == "gmail":
        return _inbox_add_gmail(settings, args)
    if args.grant_id is None:
        args.usage("--grant-id is required for --provider nylas")
    if args.credentials is not None:
        args.usage("--credentials is for --provider gmail")
    with _connect(settings, args) as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES (%s, %s, %s)"
            " ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL"
            " DO UPDATE SET email = EXCLUDED.email, updated_at = now() RETURNING id",
            (args.provider, args.grant_id, args.email),
        ).fetchone()
        assert row is not None
        changed = _reactivate(conn, settings, row["id"])
    print(row["id"])
    _say_reactivated(row["id"], args.email, changed)
    return 0


REACTIVATE = "SELECT * FROM nova_reactivate_inbox(%s, make_interval(secs => %s))"


def _reactivate(conn: psycopg.Connection[Any], settings: Settings,
                inbox_id: uuid.UUID) -> dict[str, Any]:
    """The operator's word: the inbox is active again, with a catch-up of what it missed
    (nova_reactivate_inbox, sql/020_webhooks.sql). Nothing happens to an active one."""
    row = conn.execute(REACTIVATE, (inbox_id, settings.catchup_overlap_seconds)).fetchone()
    assert row is not None
    return dict(row)


def _say_reactivated(inbox_id: object, email: str, changed: dict[str, Any]) -> None:
    if changed["was"] == changed["status"]:
        return
    config = changed["catchup_config_id"]
    more = (f"; catch-up backfill {config} queued" if config
            else "; the running backfill takes the threads it had lost")
    print(f"inbox {inbox_id} ({email}) was {changed['was']}, active again{more}",
          file=sys.stderr)


def cmd_inbox_reactivate(settings: Settings, args: argparse.Namespace) -> int:
    """`nova inbox reactivate INBOX`: undo `revoked` (or auth_expired, disabled) by hand."""
    with _connect(settings, args) as conn, conn.transaction():
        rows = conn.execute(
            "SELECT id, email, status FROM flux_inboxes WHERE deleted_at IS NULL"
            " AND (id::text = %s OR grant_id = %s OR lower(email) = lower(%s))",
            (args.inbox, args.inbox, args.inbox)).fetchall()
        if len(rows) != 1:
            what = "no inbox" if not rows else f"{len(rows)} inboxes match"
            print(f"nova: {what} {args.inbox!r} (give its id, grant id or email)",
                  file=sys.stderr)
            return EXIT_FAILED
        inbox = rows[0]
        changed = _reactivate(conn, settings, inbox["id"])
    if changed["was"] == changed["status"]:
        print(f"inbox {inbox['id']} ({inbox['email']}) is already {changed['status']}")
    else:
        _say_reactivated(inbox["id"], inbox["email"], changed)
    return 0


# A Gmail inbox's grant is its address, lower-cased: the Gmail API takes it as userId.
GMAIL_UPSERT = """
INSERT INTO flux_inboxes (provider, grant_id, email) VALUES ('gmail', $1, $2)
ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL
DO UPDATE SET email = EXCLUDED.email, updated_at = now()
RETURNING id, status
"""
GMAIL_SCOPES = ("https://mail.google.com/", "https://www.googleapis.com/auth/gmail.")


class _Refused(Exception):
    """The inbox cannot take the credentials; the transaction is rolled back."""


def _inbox_add_gmail(settings: Settings, args: argparse.Namespace) -> int:
    """Insert or update the Gmail inbox and store its encrypted credentials in one
    transaction; an auth_expired inbox becomes active again (nova_set_inbox_status, which
    queues a catch-up backfill). Nothing is written when the file, the key or the inbox is
    refused. The credentials never reach stdout, stderr or the log."""
    from nova import credentials

    email = args.email.strip()
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        args.usage(f"--email: not an e-mail address: {args.email!r}")
    grant = email.lower()
    if args.grant_id is not None and args.grant_id.strip().lower() != grant:
        args.usage("--grant-id: a Gmail inbox's grant is its e-mail address; leave it out")
    if args.credentials is None:
        args.usage("--credentials FILE is required for --provider gmail")
    try:
        fernet = credentials.cipher(settings)
        user = credentials.load_authorized_user(args.credentials, account=email,
                                                token_uri=settings.gmail_token_uri)
    except credentials.CredentialsError as exc:
        print(f"nova: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    if user.scopes and not any(s.startswith(GMAIL_SCOPES) for s in user.scopes):
        print(f"nova: credentials file {args.credentials} grants no Gmail scope "
              f"({' '.join(user.scopes)}); authorize with "
              f"https://www.googleapis.com/auth/gmail.readonly", file=sys.stderr)
        return EXIT_USAGE
    try:
        inbox_id, changed = asyncio.run(_save_gmail(_url(settings, args), grant, email, user,
                                                    fernet, settings.catchup_overlap_seconds))
    except _Refused as exc:
        print(f"nova: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(inbox_id)
    _say_reactivated(inbox_id, email, changed)
    return 0


async def _save_gmail(url: str, grant: str, email: str, user: Any, fernet: Any,
                      overlap: float) -> tuple[uuid.UUID, dict[str, Any]]:
    import asyncpg

    from nova.credentials import save_credentials

    try:
        # One transaction, each statement run once: a statement cache would gain nothing, and
        # its named statements would stay behind on a pooler's server connection.
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, statement_cache_size=0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unreachable(f"{db.describe(url)}: {_one_line(str(exc)) or type(exc).__name__}"
                          ) from None
    try:
        async with conn.transaction():
            row = await conn.fetchrow(GMAIL_UPSERT, grant, email)
            await save_credentials(conn, row["id"], user, fernet)
            changed = await conn.fetchrow(  # new credentials: the operator's word
                "SELECT * FROM nova_reactivate_inbox($1, make_interval(secs => $2))",
                row["id"], float(overlap))
        return row["id"], dict(changed)
    except asyncpg.PostgresError as exc:
        raise _Refused(_one_line(str(exc))) from None
    finally:
        await conn.close()


INBOXES = """
SELECT i.id, i.email, i.provider, i.grant_id, i.status, i.created_at, i.last_event_at,
       c.id AS config_id, c.backfill_status, c.backfill_kind, c.last_error,
       s.threads_queued, s.threads_completed, s.threads_failed, s.messages_synced
FROM flux_inboxes i
LEFT JOIN flux_inbox_configurations c ON c.inbox_id = i.id AND c.deleted_at IS NULL
LEFT JOIN inbox_sync_stats_current s ON s.config_id = c.id
WHERE i.deleted_at IS NULL
ORDER BY i.created_at, i.id
"""


def cmd_inbox_list(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        rows = conn.execute(INBOXES).fetchall()
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    print(f"{'inbox':<36}  {'email':<32} {'status':<12} {'backfill':<12} "
          f"{'threads':>15}  {'provider':<8}  config")
    for r in rows:
        threads = ""
        if r["threads_queued"] is not None:
            done = r["threads_completed"] + r["threads_failed"]
            threads = f"{done:,}/{r['threads_queued']:,}"
        print(f"{r['id']!s:<36}  {r['email']:<32} {r['status']:<12} "
              f"{r['backfill_status'] or '-':<12} {threads:>15}  {r['provider']:<8}  "
              f"{r['config_id'] or '-'}")
    print(f"{len(rows)} inbox(es)")
    return 0


def cmd_inbox_show(settings: Settings, args: argparse.Namespace) -> int:
    """`nova inbox show INBOX`: the inbox and its folders by name, with counts
    (nova.folders)."""
    from nova import folders

    with _connect(settings, args) as conn:
        return folders.show_inbox(conn, args.inbox, as_json=args.json)


def cmd_backfill_start(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        row = conn.execute(
            "SELECT queue_inbox_backfill(%s, %s) AS config_id", (args.inbox, args.since)
        ).fetchone()
    assert row is not None
    print(row["config_id"])
    return 0


def cmd_backfill_resume(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        row = conn.execute("SELECT resume_inbox_backfill(%s) AS msg_id",
                           (args.config_id,)).fetchone()
    assert row is not None
    print(f"resumed {args.config_id}" + (f" (job {row['msg_id']})" if row["msg_id"]
                                          else " (thread sync)"))
    return 0


def cmd_backfill_cancel(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        row = conn.execute("SELECT * FROM nova_cancel_backfill(%s)", (args.config_id,)
                           ).fetchone()
    assert row is not None
    print(f"cancelled {args.config_id}: {row['backfill_jobs']} backfill job(s) and "
          f"{row['thread_jobs']} thread job(s) removed, {row['threads_open']} thread(s) left "
          f"waiting; `nova backfill resume {args.config_id}` continues it")
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from nova.service import main as serve

    if args.database_url:
        settings = settings.model_copy(update={"database_url": args.database_url})
    if args.command == "demo":
        settings = settings.model_copy(update={"demo": True})
    return serve(settings)


def cmd_progress(settings: Settings, args: argparse.Namespace) -> int:
    from nova import progress_view

    rate = settings.provider_rate_limit
    with _connect(settings, args) as conn:
        for config_id in args.config_id:  # an unknown id: "no inbox configuration ..."
            conn.execute("SELECT 1 FROM get_sync_progress(%s)", (config_id,))
        if args.json:
            rows = [conn.execute("SELECT * FROM get_sync_progress(%s)", (c,)).fetchone()
                    for c in args.config_id] if args.config_id else conn.execute(
                "SELECT * FROM nova_backfill_progress('{}', true)").fetchall()
            shown: Any = rows[0] if len(args.config_id) == 1 else rows
            print(json.dumps(shown, default=_json_default, indent=2))
            return 0
        live = sys.stdout.isatty() and not args.once
        if not (live or args.follow):  # piped: one line per backfill, as it stands now
            board = progress_view.Board(rate)
            board.update(progress_view.fetch(conn, args.config_id, not args.config_id))
            for b in board.backfills.values():
                print(progress_view.plain_line(b, rate))
            if not board.backfills:
                print("no backfill is running")
            return 0
        try:
            board = progress_view.watch(conn, args.config_id, configured_rate=rate, live=live,
                                        interval=args.interval,
                                        out=lambda line: print(line, flush=True))
        except KeyboardInterrupt:  # stopped watching; nothing failed
            return 0
    if not board.backfills:
        print("no backfill is running")
        return 0
    failed = [b for b in board.backfills.values() if b.status == "failed"]
    for b in failed:
        print(f"nova: backfill {b.config_id} failed: {b.row.get('last_error') or 'see its log'}",
              file=sys.stderr)
    return EXIT_FAILED if failed else 0


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# Depth and dead letters counted up to 10,000 and estimated past it (~): never a walk of a
# queue or its archive.
QUEUES = "SELECT * FROM nova_queue_overview(10000)"
RETENTION = "SELECT * FROM nova_retention_status()"


def cmd_queues(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn, conn.transaction():
        conn.execute("SELECT set_config('jit', 'off', true)")
        rows = conn.execute(QUEUES).fetchall()
        pruned = conn.execute(RETENTION).fetchall()
    days = settings.retention_days
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    print(f"{'queue':<30} {'depth':>8} {'oldest':>9} {'dead letters':>13} {'ever sent':>10}")
    for r in rows:
        dead = f"{'~' if r['dead_letters_estimated'] else ''}{r['dead_letters']:,}"
        depth = f"{'~' if r['queue_length_estimated'] else ''}{r['queue_length']:,}"
        print(f"{r['queue_name']:<30} {depth:>8} {_age(r['oldest_msg_age_sec']):>9}"
              f" {dead:>13} {r['total_messages']:>10,}")
    done = ", ".join(f"{r['pruned']:,} {r['kind'].replace('_', ' ')}" for r in pruned)
    last = max((r["last_pruned_at"] for r in pruned if r["last_pruned_at"]), default=None)
    print(f"retention: {f'{days:g} days' if days else 'off (everything kept)'} "
          f"(NOVA_RETENTION_DAYS, NOVA_RETENTION_BATCH={settings.retention_batch:,}); pruned "
          f"{done or 'nothing yet'}{f', last at {last:%Y-%m-%d %H:%M:%S}' if last else ''}")
    return 0


def cmd_failures(settings: Settings, args: argparse.Namespace) -> int:
    from nova.threads import retry_schedule

    def _int(value: Any) -> int | None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    def _retry(done: int, rounds: int, next_at: dt.datetime | None) -> str:
        """Where a thread's retry rounds stand: the next one's number and time, or none."""
        if next_at is not None:
            return f"{done + 1}/{max(rounds, done + 1)}@{next_at:%Y-%m-%d %H:%M:%S}"
        return f"none-left({done}/{rounds})" if done >= rounds else "none"

    with _connect(settings, args) as conn:
        rows = [] if args.queue == "hooks" else conn.execute(
            "SELECT * FROM nova_dead_letters(%s)", (args.queue,)).fetchall()
        if args.queue in (None, "hooks"):  # outbound webhooks' dead letters (nova.hooks)
            rows += conn.execute("SELECT * FROM nova_hook_dead_letter_list()").fetchall()
        # Failed threads, with where their retry rounds stand: a thread's dead letter is not
        # the end of it (retry_failed_threads), and one failed with its inbox revoked has none.
        failed = conn.execute("SELECT * FROM nova_failed_threads()").fetchall() \
            if args.queue in (None, "thread_sync_jobs") else []
    rounds = len(retry_schedule(settings))
    by_row = {t["queued_thread_id"]: t for t in failed}
    for r in rows:
        thread = by_row.get(_int((r["message"] or {}).get("queued_thread_id")))
        if r["queue_name"] == "thread_sync_jobs" and thread is not None:
            r["thread_failed"] = True
            r["retry_rounds"] = thread["retry_rounds"]
            r["next_retry_at"] = thread["next_retry_at"]
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    for r in rows:
        retry = ""
        if r.get("thread_failed"):
            retry = f" retry={_retry(r['retry_rounds'], rounds, r['next_retry_at'])}"
        print(f"{r['queue_name']:<28} msg={r['msg_id']:<8} attempts={r['read_ct']}"
              f" archived={r['archived_at']:%Y-%m-%d %H:%M:%S}{retry} {json.dumps(r['message'])}")
    print(f"{len(rows)} dead letter(s)")
    if failed:
        waiting = [t["next_retry_at"] for t in failed if t["next_retry_at"] is not None]
        due = f", next due {min(waiting):%Y-%m-%d %H:%M:%S}" if waiting else ""
        print(f"{len(failed)} failed thread(s), {len(waiting)} waiting for a retry round{due}:")
        for t in failed:
            failed_at = f"{t['failed_at']:%Y-%m-%d %H:%M:%S}" if t["failed_at"] else "-"
            print(f"  thread={t['provider_thread_id']} config={t['config_id']}"
                  f" attempts={t['attempts']} failed={failed_at}"
                  f" retry={_retry(t['retry_rounds'], rounds, t['next_retry_at'])}"
                  f" error={_one_line(t['error_message'] or '')[:200]}")
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    if args.queue == "hooks":
        from nova import hooks_cli

        return hooks_cli.cmd_replay(settings, args, _connect)
    with _connect(settings, args) as conn, conn.transaction():
        if args.all:
            ids = [r["msg_id"] for r in conn.execute(
                "SELECT msg_id FROM nova_dead_letters(%s)", (args.queue,))]
        else:
            ids = args.msg_id
        for msg_id in ids:
            new = conn.execute("SELECT nova_replay_dead_letter(%s, %s) AS id",
                               (args.queue, msg_id)).fetchone()
            assert new is not None
            sent = new["id"] if new["id"] is not None else "not sent: done, or a job is live"
            print(f"{args.queue} {msg_id} -> {sent}")
    print(f"{len(ids)} message(s) replayed")
    return 0


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from nova import search

    return search.cmd_search(settings, args, _connect, _json_default)


def cmd_hooks(name: str) -> Callable[[Settings, argparse.Namespace], int]:
    def run(settings: Settings, args: argparse.Namespace) -> int:
        from nova import hooks_cli

        return hooks_cli.dispatch(name, settings, args, _connect, _json_default)
    return run


def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    from nova import events

    return events.cmd_events(settings, args, _connect, _url, _json_default)


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    from nova import verify

    return verify.main(settings, args.database_url or db.database_url(settings), args)


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nova", description="Keep mailboxes in Postgres.",
                    epilog="Exit codes: 0 done, 1 failed (the database refused or did not "
                           "answer, an unknown id), 2 bad usage or settings, 3 drift found "
                           "(verify).")
    parser.add_argument("--database-url", help="overrides NOVA_DATABASE_URL / DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="install PGMQ and apply migrations/ and sql/")
    p.set_defaults(func=cmd_migrate)

    inbox = sub.add_parser("inbox", help="connected mailboxes").add_subparsers(
        dest="inbox_command", required=True)
    p = inbox.add_parser("add", help="register a mailbox; prints its id",
                         description="Nylas: --grant-id G --email E. Gmail: --provider gmail "
                                     "--email E --credentials FILE (an authorized_user JSON "
                                     "file; stored encrypted under NOVA_CREDENTIALS_KEY).")
    p.add_argument("--provider", default="nylas", choices=["nylas", "gmail"])
    p.add_argument("--grant-id", help="the Nylas grant (Gmail: the e-mail address, implied)")
    p.add_argument("--email", required=True)
    p.add_argument("--credentials", metavar="FILE",
                   help="Gmail: the user's authorized_user JSON (client_id, client_secret, "
                        "refresh_token)")
    p.set_defaults(func=cmd_inbox_add, usage=p.error)
    p = inbox.add_parser("reactivate", help="make a revoked (or expired, disabled) mailbox "
                                            "active again, with a catch-up of what it missed")
    p.add_argument("inbox", help="the inbox id, or its grant id or email")
    p.set_defaults(func=cmd_inbox_reactivate)
    p = inbox.add_parser("list", help="every mailbox, its status and its backfill")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inbox_list)
    p = inbox.add_parser("show", help="one mailbox and its folders or labels by name, with "
                                      "counts")
    p.add_argument("inbox", help="the inbox id, or its grant id or email")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inbox_show)

    backfill = sub.add_parser("backfill", help="historical sync").add_subparsers(
        dest="backfill_command", required=True)
    p = backfill.add_parser("start", help="queue a backfill; prints the configuration id")
    p.add_argument("--inbox", required=True, type=_uuid)
    p.add_argument("--since", type=_date, help="YYYY-MM-DD, at most one year back (default)")
    p.set_defaults(func=cmd_backfill_start)

    p = backfill.add_parser("resume", help="continue a failed backfill from its checkpoint")
    p.add_argument("config_id", type=_uuid)
    p.set_defaults(func=cmd_backfill_resume)

    p = backfill.add_parser("cancel", help="stop a running backfill (it becomes failed, "
                                           "checkpoint kept; resume continues it)")
    p.add_argument("config_id", type=_uuid)
    p.set_defaults(func=cmd_backfill_cancel)

    p = sub.add_parser("run", help="every processor and the receiver in one process"
                                   " (the demo when nothing is configured)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="python -m nova against the Nylas and Gmail sandboxes"
                                    " (NOVA_DEMO=1); refuses a database with real inboxes")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("progress", help="backfill progress: live bars on a terminal until it "
                                        "completes; one line when piped")
    p.add_argument("config_id", type=_uuid, nargs="*",
                   help="configuration id(s); none: every running backfill")
    p.add_argument("--json", action="store_true", help="get_sync_progress as JSON, once")
    p.add_argument("--follow", action="store_true",
                   help="off a terminal too: a line per change until the backfill ends")
    p.add_argument("--once", action="store_true", help="one line, even on a terminal")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    p.set_defaults(func=cmd_progress)

    p = sub.add_parser("failures", help="dead letters: messages archived after their last attempt")
    p.add_argument("--queue", help="one queue only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("replay", help="send dead letters back to their queue")
    p.add_argument("queue", help="a queue, or hooks (outbound webhooks' dead letters)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("msg_id", nargs="*", type=int, default=[])
    target.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("queues", help="depth, oldest message and dead letters of every queue, "
                                      "and what retention pruned")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queues)

    p = sub.add_parser("verify", help="compare an inbox with the provider (LIST calls only);"
                                      " exit 0 no drift, 3 drift, 1 failed, 2 usage")
    p.add_argument("inbox", help="the inbox id, or its grant id or email")
    p.add_argument("--repair", action="store_true",
                   help="queue thread syncs for every missing, stale or extra thread")
    p.add_argument("--since", type=_date, help="YYYY-MM-DD (default: the backfill's range)")
    p.add_argument("--until", type=_date, help="YYYY-MM-DD (default: the backfill's range)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    from nova import hooks_cli, search
    search.add_parser(sub, cmd_search)
    from nova import events
    events.add_parser(sub, cmd_events)
    hooks_cli.add_parser(sub, cmd_hooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        lines = exc.message.splitlines()
        print(f"nova: invalid settings: {'; '.join(line.strip() for line in lines[1:])}",
              file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_level, settings.log_format)
    func: Callable[[Settings, argparse.Namespace], int] = args.func
    try:
        return func(settings, args)
    except Unreachable as exc:
        print(f"nova: the database did not answer: {exc}", file=sys.stderr)
    except psycopg.Error as exc:
        diag = exc.diag.message_primary or str(exc)
        print(f"nova: {_one_line(diag)}", file=sys.stderr)
    except Exception as exc:  # one line, not a traceback; LOG_LEVEL=debug shows it
        log.debug("nova %s failed", args.command, exc_info=True)
        print(f"nova: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
    return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
