"""What `nova verify` reports: the inbox it runs on, the counts and samples, the repair, the
text and JSON forms and the exit code. Shared by every provider's verifier."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

# Exit codes (also in nova/cli.py's and README's tables).
EXIT_OK = 0  # no drift, or --repair queued every affected thread
EXIT_FAILED = 1  # the database or the provider refused; nothing was concluded
EXIT_USAGE = 2  # bad usage or settings
EXIT_DRIFT = 3  # drift found (without --repair)

FIND_INBOX = """
SELECT i.id, i.provider, i.grant_id, i.email, i.status, c.id AS config_id,
       c.backfill_status, c.backfill_kind, c.backfill_since, c.backfill_until
FROM flux_inboxes i
LEFT JOIN flux_inbox_configurations c ON c.inbox_id = i.id AND c.deleted_at IS NULL
WHERE i.deleted_at IS NULL AND (i.id = $1 OR i.grant_id = $2 OR lower(i.email) = lower($2))
ORDER BY i.created_at
"""


class VerifyError(Exception):
    """Verification could not run or finish; the message says why, the code is the exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Counts:
    expected: int = 0  # at the provider
    present: int = 0  # of those, live in the database
    missing: int = 0  # at the provider, not live in the database
    extra: int = 0  # live in the database within the window, not at the provider
    stale: int = 0  # present but out of date (threads) / under the wrong thread (messages)

    @property
    def drift(self) -> int:
        return self.missing + self.extra + self.stale


@dataclass
class Sample:
    id: str
    detail: str | None = None


@dataclass
class Repair:
    config_id: uuid.UUID
    queued: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    sample: list[Sample] = field(default_factory=list)  # thread id, reason


@dataclass
class Inbox:
    id: uuid.UUID
    provider: str
    grant_id: str | None
    email: str
    status: str
    config_id: uuid.UUID | None
    backfill_status: str | None
    backfill_kind: str | None
    backfill_since: datetime | None
    backfill_until: datetime | None


@dataclass
class Report:
    inbox_id: uuid.UUID
    email: str
    grant_id: str
    inbox_status: str
    config_id: uuid.UUID | None
    backfill_status: str | None
    since: datetime
    until: datetime | None
    started_at: datetime
    changed_after: datetime  # threads with a latest message at or after this are not compared
    threads: Counts = field(default_factory=Counts)
    messages: Counts = field(default_factory=Counts)
    changed_during_run: int = 0
    history_from: str | None = None  # Gmail: changes after this history id are not compared
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    pages: int = 0
    requests: int = 0  # HTTP requests sent (retries included)
    rate_limited: int = 0  # 429 answers
    waited_seconds: float = 0.0  # for budget slots
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    repair: Repair | None = None

    @property
    def drift(self) -> int:
        return self.threads.drift + self.messages.drift

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["drift"] = self.drift
        out["threads"]["drift"] = self.threads.drift
        out["messages"]["drift"] = self.messages.drift
        return out


# --------------------------------------------------------------------------- inbox
async def find_inbox(pool: asyncpg.Pool, ref: str) -> Inbox:
    """The inbox named by its uuid, grant id or email; VerifyError when none or several."""
    try:
        as_id: uuid.UUID | None = uuid.UUID(ref)
    except ValueError:
        as_id = None
    rows = await pool.fetch(FIND_INBOX, as_id, ref)
    if not rows:
        raise VerifyError(f"no inbox {ref!r} (give its id, grant id or email)")
    exact = [r for r in rows if r["id"] == as_id]
    if exact:
        rows = exact
    if len(rows) > 1:
        listed = ", ".join(f"{r['id']} ({r['email']}, grant {r['grant_id']})" for r in rows)
        raise VerifyError(f"{ref!r} names {len(rows)} inboxes: {listed}; give the inbox id",
                          EXIT_USAGE)
    return Inbox(**dict(rows[0]))


# --------------------------------------------------------------------------- output
def _ts(value: datetime | None) -> str:
    return "now" if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_LABELS = {
    "missing_threads": "Missing threads (at the provider, not stored)",
    "stale_threads": "Stale threads",
    "extra_threads": "Extra threads (stored in the window, not at the provider)",
    "missing_messages": "Missing messages",
    "stale_messages": "Stale messages (under the wrong thread)",
    "extra_messages": "Extra messages (stored, not at the provider)",
}


def format_report(r: Report) -> str:
    counts = {"threads": r.threads, "messages": r.messages}
    lines = [
        f"Inbox {r.inbox_id} ({r.email}, grant {r.grant_id}, {r.inbox_status})",
        f"Window: {_ts(r.since)} .. {_ts(r.until)}"
        + (f" (configuration {r.config_id}, backfill {r.backfill_status})" if r.config_id
           else " (no configuration)"),
        f"Provider: {r.pages} page(s), {r.requests} request(s), {r.rate_limited} rate-limited,"
        f" {r.waited_seconds:.1f}s waiting for budget, {r.seconds:.1f}s in all",
        "",
        f"{'':<10}{'expected':>10}{'present':>10}{'missing':>10}{'extra':>10}{'stale':>10}",
    ]
    for name, c in counts.items():
        lines.append(f"{name:<10}{c.expected:>10,}{c.present:>10,}{c.missing:>10,}"
                     f"{c.extra:>10,}{c.stale:>10,}")
    lines.append("")
    if r.history_from is not None:
        lines.append(f"{r.changed_during_run:,} thread(s) changed in the history after "
                     f"{r.history_from} (in flight in the change feed, or during the run): not "
                     "compared, not counted as drift.")
    else:
        lines.append(f"{r.changed_during_run:,} thread(s) with mail at or after "
                     f"{_ts(r.changed_after)} (arriving during the run): not compared, not "
                     "counted as drift.")
    for note in r.notes:
        lines.append(f"Note: {note}.")
    for key, label in _LABELS.items():
        sample = r.samples.get(key)
        if not sample:
            continue
        total = _category_total(r, key)
        more = f" (first {len(sample)} of {total:,})" if total > len(sample) else ""
        lines.append(f"{label}{more}:")
        lines.extend(f"  {s.id}" + (f"  {s.detail}" if s.detail else "") for s in sample)
    if r.drift == 0:
        lines.append("No drift.")
    else:
        lines.append(f"Drift: {r.threads.drift:,} thread(s), {r.messages.drift:,} message(s).")
    if r.repair is not None and r.repair.queued:
        why = ", ".join(f"{n:,} {reason}" for reason, n in r.repair.reasons.items())
        lines.append(f"Repair: queued {r.repair.queued:,} thread sync(s) on configuration "
                     f"{r.repair.config_id} ({why}):")
        lines.extend(f"  {s.id}  {s.detail}" for s in r.repair.sample)
        if r.repair.queued > len(r.repair.sample):
            lines.append(f"  ... and {r.repair.queued - len(r.repair.sample):,} more")
        lines.append("Thread sync workers (nova.threads) apply them; run verify again after.")
    elif r.drift:
        lines.append("Run with --repair to queue the affected threads for sync.")
    return "\n".join(lines)


def _category_total(r: Report, key: str) -> int:
    kind, _, side = key.partition("_")
    return int(getattr(r.threads if side == "threads" else r.messages, kind))


def exit_code(r: Report, repair: bool) -> int:
    if r.drift == 0:
        return EXIT_OK
    if not repair:
        return EXIT_DRIFT
    return EXIT_OK if r.repair is not None else EXIT_FAILED


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


