"""`nova hooks add|list|remove|rotate|enable`: the endpoints `python -m nova.hooks` delivers
the change feed to, and `nova replay hooks` for their dead letters (sql/160_hooks.sql).

A secret is printed once, by `add` and `rotate`, and never again (not by `list`, not in a log).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg

from nova import hooks_delivery as delivery
from nova.config import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
QUEUE = "hooks"  # nova.hooks.QUEUE: the name `nova failures` and `nova replay` use
CONSUMER_PREFIX = "hook:"  # an endpoint's change-feed consumer is hook:<endpoint id>

FAILURES = "SELECT * FROM nova_hook_dead_letter_list()"


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
            c.isspace() for c in url):
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


def _at(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "-"


def cmd_add(settings: Settings, args: argparse.Namespace, connect: Any) -> int:
    try:
        url = _check_url(args.url)
        kinds = delivery.parse_kinds(args.events)
    except ValueError as exc:
        print(f"nova hooks add: {exc}", file=sys.stderr)
        return EXIT_USAGE
    secret = delivery.new_secret()
    with connect(settings, args) as conn:
        row = conn.execute("SELECT nova_hook_add(%s, %s, %s) AS id", (url, kinds, secret)
                           ).fetchone()
    assert row is not None
    if args.json:
        print(json.dumps({"id": str(row["id"]), "url": url, "events": kinds or ["*"],
                          "secret": secret}))
    else:
        print(f"id: {row['id']}\nsecret: {secret}")
    print(f"nova: endpoint {row['id']} delivers {', '.join(kinds) or 'every kind'} to {url} "
          f"from now on (python -m nova.hooks); the secret is shown this once: store it where "
          f"the receiving app reads it", file=sys.stderr)
    return EXIT_OK


def cmd_list(settings: Settings, args: argparse.Namespace, connect: Any,
             json_default: Any) -> int:
    with connect(settings, args) as conn:
        rows = conn.execute("SELECT * FROM nova_hook_overview()").fetchall()
    if args.json:
        print(json.dumps(rows, default=json_default, indent=2))
        return EXIT_OK
    for r in rows:
        state = "enabled" if r["enabled"] else f"DISABLED at {_at(r['disabled_at'])}: " \
                                               f"{r['disabled_reason']}"
        print(f"{r['id']}  {r['url']}\n"
              f"  events: {', '.join(r['event_kinds']) or 'every kind'}\n"
              f"  {state}")
        extra = []
        if r["failing_since"]:
            extra.append(f"failing since {_at(r['failing_since'])}")
        if r["throttled_until"]:
            extra.append(f"paused until {_at(r['throttled_until'])} (Retry-After)")
        if r["rotating_until"]:
            extra.append(f"previous secret signs too until {_at(r['rotating_until'])}")
        if extra:
            print(f"  {'; '.join(extra)}")
        retry = ""
        if r["inboxes_retrying"]:
            retry = (f", {r['inboxes_retrying']} retrying (next at {_at(r['next_attempt_at'])}"
                     f": {r['last_error']})")
        print(f"  delivered {r['delivered']:,} (last {_at(r['last_delivered_at'])}); "
              f"{r['inboxes_waiting']} inbox(es) with events to send{retry}; "
              f"{r['dead_letters']} dead letter(s)")
        if r["inboxes_pruned"]:
            print(f"  {r['inboxes_pruned']} inbox(es) behind events that retention pruned: "
                  f"nova events reset {CONSUMER_PREFIX}{r['id']}")
    print(f"{len(rows)} endpoint(s)")
    return EXIT_OK


def cmd_remove(settings: Settings, args: argparse.Namespace, connect: Any) -> int:
    with connect(settings, args) as conn, conn.transaction():
        row = conn.execute("SELECT url FROM nova_hook_endpoints WHERE id = %s", (args.id,)
                           ).fetchone()
        if row is None:
            print(f"nova: no webhook endpoint {args.id}", file=sys.stderr)
            return EXIT_FAILED
        conn.execute("SELECT nova_hook_remove(%s)", (args.id,))
    print(f"removed endpoint {args.id} ({row['url']}): its cursors, retries and dead letters "
          f"are gone")
    return EXIT_OK


def cmd_rotate(settings: Settings, args: argparse.Namespace, connect: Any) -> int:
    secret = delivery.new_secret()
    keep = timedelta(hours=settings.hooks_rotation_hours)
    with connect(settings, args) as conn:
        row = conn.execute("SELECT nova_hook_rotate(%s, %s, %s) AS until",
                           (args.id, secret, keep)).fetchone()
    assert row is not None
    print(f"secret: {secret}")
    print(f"nova: endpoint {args.id} signs with the new secret and, until {_at(row['until'])} "
          f"(NOVA_HOOKS_ROTATION_HOURS={settings.hooks_rotation_hours:g}), with the previous "
          f"one too (two signatures); the new secret is shown this once", file=sys.stderr)
    return EXIT_OK


def cmd_enable(settings: Settings, args: argparse.Namespace, connect: Any) -> int:
    with connect(settings, args) as conn:
        row = conn.execute("SELECT * FROM nova_hook_enable(%s)", (args.id,)).fetchone()
        pruned = conn.execute("SELECT count(*) AS n FROM nova_events_unread(%s) WHERE behind",
                              (f"{CONSUMER_PREFIX}{args.id}",)).fetchone()
    assert row is not None and pruned is not None
    if row["was_enabled"]:
        print(f"endpoint {args.id} is already enabled (its waiting retries are due now)")
    else:
        print(f"endpoint {args.id} enabled; it was disabled at {_at(row['disabled_at'])}: "
              f"{row['disabled_reason']}. Each inbox goes on from the event it had reached")
    if pruned["n"]:
        print(f"nova: {pruned['n']} inbox(es) of endpoint {args.id} are behind events that "
              f"retention pruned meanwhile; they wait until `nova events reset "
              f"{CONSUMER_PREFIX}{args.id}` moves them past the gap", file=sys.stderr)
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace, connect: Any) -> int:
    """`nova replay hooks ID... | --all`: dead letters sent again by python -m nova.hooks."""
    with connect(settings, args) as conn, conn.transaction():
        ids = [r["msg_id"] for r in conn.execute(FAILURES) if r["message"]["status"] == "dead"] \
            if args.all else args.msg_id
        for dead_id in ids:
            row = conn.execute("SELECT nova_hook_replay(%s) AS status", (dead_id,)).fetchone()
            assert row is not None
            print(f"{QUEUE} {dead_id} -> {row['status']}")
    print(f"{len(ids)} webhook delivery(ies) to replay (python -m nova.hooks sends them)")
    return EXIT_OK


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id: {text!r}") from None


def add_parser(sub: Any, run: Any) -> None:
    """Register `nova hooks ...` on the CLI's subparsers; `run(name)` makes each one's func."""
    hooks = sub.add_parser(
        "hooks", help="outbound webhooks: endpoints that receive the change feed, signed "
                      "(Standard Webhooks)").add_subparsers(dest="hooks_command", required=True)
    p = hooks.add_parser("add", help="add an endpoint; prints its id and its secret (once)")
    p.add_argument("url")
    p.add_argument("--events", metavar="KIND,KIND",
                   help=f"kinds to deliver, or groups such as message.* (default: all: "
                        f"{', '.join(delivery.KINDS)})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run("add"))
    p = hooks.add_parser("list", help="every endpoint and where its delivery stands")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run("list"))
    for name, text in (("remove", "remove an endpoint, its cursors and dead letters"),
                       ("rotate", "a new secret (printed once); the previous one signs too "
                                  "for NOVA_HOOKS_ROTATION_HOURS"),
                       ("enable", "enable a disabled endpoint again")):
        p = hooks.add_parser(name, help=text)
        p.add_argument("id", type=_uuid)
        p.set_defaults(func=run(name))


def dispatch(name: str, settings: Settings, args: argparse.Namespace, connect: Any,
             json_default: Any) -> int:
    if name == "list":
        return cmd_list(settings, args, connect, json_default)
    command = {"add": cmd_add, "remove": cmd_remove, "rotate": cmd_rotate,
               "enable": cmd_enable}[name]
    try:
        return command(settings, args, connect)
    except psycopg.errors.NoDataFound as exc:
        print(f"nova: {exc.diag.message_primary or exc}", file=sys.stderr)
        return EXIT_FAILED
