"""`nova verify INBOX [--repair] [--json]`: compare an inbox in Postgres with the provider.

The proof a user can run against production, for Nylas and Gmail inboxes. Over the inbox's
backfill window (the configuration's backfill_since..backfill_until; one year back when there
is none; `--since` / `--until` override it) it lists the provider with LIST calls only, every
request through the provider's shared budget like the processors' requests, and compares what
it lists with the database, page by page into session temp tables, so memory does not grow with
the mailbox. `--repair` queues a thread sync for every affected thread; it deletes nothing
itself (a thread gone at the provider is soft-deleted by its sync's 404).

The modules:

- nova.verify_report: the inbox lookup, the report (counts, samples, repair), its text and JSON
  forms, the exit codes;
- nova.verify_core: the temp tables, the extras, counts, samples and `--repair`, shared;
- nova.verify_nylas: the Nylas listing (threads with their message ids and dates);
- nova.verify_gmail: the Gmail listing (threads.list with history ids, messages.list, and
  history.list for what is still in flight);
- this module: which verifier an inbox gets, and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

import asyncpg
import httpx

from nova import db
from nova.config import Settings
from nova.verify_core import Verification
from nova.verify_gmail import GmailVerifier
from nova.verify_nylas import NylasVerifier
from nova.verify_report import (
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Counts,
    Inbox,
    Repair,
    Report,
    Sample,
    VerifyError,
    exit_code,
    find_inbox,
    format_report,
    json_default,
)

__all__ = ["EXIT_DRIFT", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Counts", "GmailVerifier",
           "Inbox", "NylasVerifier", "Repair", "Report", "Sample", "Verifier", "VerifyError",
           "exit_code", "find_inbox", "format_report", "verifier_for", "verify_inbox"]

Verifier = NylasVerifier  # the name before Gmail had one of its own
VERIFIERS: dict[str, type[Verification]] = {"nylas": NylasVerifier, "gmail": GmailVerifier}


def verifier_for(inbox: Inbox) -> type[Verification]:
    try:
        return VERIFIERS[inbox.provider]
    except KeyError:
        raise VerifyError(f"inbox {inbox.id} is a {inbox.provider} inbox: verify knows "
                          f"{', '.join(VERIFIERS)}", EXIT_USAGE) from None


async def verify_inbox(pool: asyncpg.Pool, provider: object, inbox: Inbox, *,
                       repair: bool = False, since: datetime | None = None,
                       until: datetime | None = None) -> Report:
    """Compare one inbox with the provider (and, with ``repair``, queue the affected threads).
    ``provider`` should be budgeted (nova.ratelimit.provider_from_settings, budgeted_nylas)."""
    verifier = verifier_for(inbox)(pool, provider, inbox, since=since, until=until)
    return await verifier.run(repair=repair)


# --------------------------------------------------------------------------- command
async def _run(settings: Settings, url: str, args: argparse.Namespace) -> int:
    from nova.providers.registry import KINDS
    from nova.ratelimit import ProviderBudget, provider_from_settings

    if settings.database_direct_url and not getattr(args, "database_url", None):
        url = settings.database_direct_url  # temp tables need a session (verify_core)
    pool = await db.create_pool(url, min_size=1, max_size=3)
    try:
        inbox = await find_inbox(pool, args.inbox)
        verifier_for(inbox)  # a provider verify knows, else exit 2
        kind = KINDS[inbox.provider]
        if not kind.configured(settings):
            raise VerifyError(f"{kind.setting} is not set (inbox {inbox.id} is a "
                              f"{inbox.provider} inbox)", EXIT_USAGE)
        budget = ProviderBudget.from_settings(pool, settings, kind.name)
        provider, client = provider_from_settings(settings, budget, transient_retries=3,
                                                  kind=kind.name)
        sent = 0

        async def count(_: httpx.Request) -> None:
            nonlocal sent
            sent += 1

        client.event_hooks["request"].append(count)
        try:
            report = await verify_inbox(pool, provider, inbox, repair=args.repair,
                                        since=args.since, until=args.until)
            report.requests, report.waited_seconds = sent, round(budget.waited, 3)
        finally:
            await provider.aclose()
            await client.aclose()
    finally:
        await pool.close()
    if args.json:
        print(json.dumps(report.to_json(), default=json_default, indent=2))
    else:
        print(format_report(report))
    code = exit_code(report, args.repair)
    if code == EXIT_FAILED:
        print(f"nova: verify: inbox {inbox.id} has no configuration to queue thread syncs on: "
              "start a backfill first (nova backfill start)", file=sys.stderr)
    return code


def main(settings: Settings, url: str, args: argparse.Namespace) -> int:
    """`nova verify`: the report on stdout, errors on stderr, the exit code documented above."""
    from nova.credentials import CredentialsError
    from nova.providers.registry import configured

    if not configured(settings):  # no provider at all (each inbox's is checked once found)
        print("nova: NYLAS_API_KEY is not set", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(settings, url, args))
    except VerifyError as exc:
        print(f"nova: verify: {exc}", file=sys.stderr)
        return exc.code
    except CredentialsError as exc:
        print(f"nova: verify: credentials: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        print(f"nova: verify: database: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except httpx.HTTPError as exc:  # not classified by the provider (should not happen)
        print(f"nova: verify: provider request failed: {exc!r}", file=sys.stderr)
        return EXIT_FAILED
