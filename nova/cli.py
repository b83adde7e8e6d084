"""The `nova` command.

Exit codes: 0 success, 1 the operation failed (the database said no, a row is missing),
2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from nova import db, migrate
from nova.config import Settings, settings_or_exit
from nova.logs import setup_logging


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


def _connect(settings: Settings, args: argparse.Namespace) -> psycopg.Connection[Any]:
    url = args.database_url or db.database_url(settings)
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)  # type: ignore[arg-type]


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    argv = ["--database-url", args.database_url] if args.database_url else []
    return migrate.main(argv)


def cmd_inbox_add(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        row = conn.execute(
            "INSERT INTO flux_inboxes (provider, grant_id, email) VALUES (%s, %s, %s)"
            " ON CONFLICT (provider, grant_id) WHERE grant_id IS NOT NULL"
            " DO UPDATE SET email = EXCLUDED.email, updated_at = now() RETURNING id",
            (args.provider, args.grant_id, args.email),
        ).fetchone()
    assert row is not None
    print(row["id"])
    return 0


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


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from nova.service import main as serve

    if args.database_url:
        settings = settings.model_copy(update={"database_url": args.database_url})
    return serve(settings)


def cmd_progress(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        row = conn.execute("SELECT * FROM get_sync_progress(%s)", (args.config_id,)).fetchone()
    assert row is not None
    if args.json:
        print(json.dumps(row, default=_json_default, indent=2))
        return 0
    done = row["threads_completed"] + row["threads_failed"]
    if row["percent_complete"] is None:
        progress = f"discovering ({row['threads_discovered']} threads found so far)"
    else:
        progress = f"{row['percent_complete']}% ({done}/{row['threads_queued']})"
    print(f"Config {row['config_id']} | Status: {row['backfill_status']} | Progress: {progress}"
          f" | failed: {row['threads_failed']} | messages: {row['messages_synced']}")
    return 0


def cmd_queues(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        rows = conn.execute(
            "SELECT m.* FROM flux_pgmq_list_queues() q, flux_pgmq_metrics(q.queue_name) m"
        ).fetchall()
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
    else:
        for r in rows:
            print(f"{r['queue_name']:<30} length={r['queue_length']:<8}"
                  f" oldest_s={r['oldest_msg_age_sec']} total={r['total_messages']}")
    return 0


def cmd_failures(settings: Settings, args: argparse.Namespace) -> int:
    with _connect(settings, args) as conn:
        rows = conn.execute("SELECT * FROM nova_dead_letters(%s)", (args.queue,)).fetchall()
    if args.json:
        print(json.dumps(rows, default=_json_default, indent=2))
        return 0
    for r in rows:
        print(f"{r['queue_name']:<28} msg={r['msg_id']:<8} attempts={r['read_ct']}"
              f" archived={r['archived_at']:%Y-%m-%d %H:%M:%S} {json.dumps(r['message'])}")
    print(f"{len(rows)} dead letter(s)")
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
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
            print(f"{args.queue} {msg_id} -> {new['id']}")
    print(f"{len(ids)} message(s) replayed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nova", description="Keep mailboxes in Postgres.")
    parser.add_argument("--database-url", help="overrides NOVA_DATABASE_URL / DATABASE_URL")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="install PGMQ and apply migrations/ and sql/")
    p.set_defaults(func=cmd_migrate)

    inbox = sub.add_parser("inbox", help="connected mailboxes").add_subparsers(
        dest="inbox_command", required=True)
    p = inbox.add_parser("add", help="register a mailbox; prints its id")
    p.add_argument("--grant-id", required=True)
    p.add_argument("--email", required=True)
    p.add_argument("--provider", default="nylas", choices=["nylas", "gmail"])
    p.set_defaults(func=cmd_inbox_add)

    backfill = sub.add_parser("backfill", help="historical sync").add_subparsers(
        dest="backfill_command", required=True)
    p = backfill.add_parser("start", help="queue a backfill; prints the configuration id")
    p.add_argument("--inbox", required=True, type=_uuid)
    p.add_argument("--since", type=_date, help="YYYY-MM-DD, at most one year back (default)")
    p.set_defaults(func=cmd_backfill_start)

    p = backfill.add_parser("resume", help="continue a failed backfill from its checkpoint")
    p.add_argument("config_id", type=_uuid)
    p.set_defaults(func=cmd_backfill_resume)

    p = sub.add_parser("run", help="every processor and the receiver in one process"
                                   " (a Nylas sandbox when NYLAS_API_KEY is unset)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("progress", help="get_sync_progress of a configuration")
    p.add_argument("config_id", type=_uuid)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_progress)

    p = sub.add_parser("failures", help="dead letters: messages archived after their last attempt")
    p.add_argument("--queue", help="one queue only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failures)

    p = sub.add_parser("replay", help="send dead letters back to their queue")
    p.add_argument("queue")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("msg_id", nargs="*", type=int, default=[])
    target.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("queues", help="PGMQ queue metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queues)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    func: Callable[[Settings, argparse.Namespace], int] = args.func
    try:
        return func(settings, args)
    except psycopg.Error as exc:
        diag = exc.diag.message_primary or str(exc)
        print(f"nova: {diag}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
