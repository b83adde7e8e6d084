"""The query mix of issue #20's Must-show for bench_search.py: one word (common and rare), a
phrase, `from:` and `has:attachment after:`, over the seeded inbox; p50/p99 per kind and
overall; and a check of first pages against a brute-force reference.

The reference does not use the search table, its vectors or any index: regular expressions
(case-insensitive, whole words: between characters that are not letters or digits) over the
stored columns of every live message of the inbox (subject, body, names and addresses,
attachment file names and text), JSON containment of the address lists for `from:`,
`has_attachments` and the date for `has:attachment after:`; a sequential scan with index
scans switched off, ordered by date and id as search_messages orders.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

SEARCH = "SELECT message_id FROM search_messages(%s, %s, 50)"

# (kind, query, reference: (what, value)) ; the seed's data: common words are 40 words of
# every body (each in ~63% of messages), wN words are rarer as N grows (w19999: ~1 in 1,000),
# zanzibar16 is in the attachment text of 1 in 100, senders follow a skewed law (user1 13%,
# user999 0.05%).
WORDS_COMMON = ["invoice", "meeting", "project", "budget", "travel", "support", "server",
                "release"]
WORDS_RARE = ["w5000", "w10000", "w12345", "w15000", "w17500", "w19999", "zanzibar16",
              "nosuchword"]
PHRASES = [("quarterly", "report"), ("budget", "deadline"), ("please", "review"),
           ("customer", "support"), ("total", "due"), ("w15000", "meeting"),
           ("flight", "hotel"), ("thanks", "w19999")]
SENDERS = [("email", "user1@domain1.com"), ("email", "user7@domain7.com"),
           ("email", "user42@domain42.com"), ("email", "user250@domain0.com"),
           ("email", "user999@domain49.com"), ("name", "first42"), ("name", "last7"),
           ("domain", "domain7.com")]
AFTER_DAYS = [3, 14, 60, 180, 365, 730, 1000, 1090]


@dataclass(frozen=True)
class Query:
    kind: str
    text: str
    ref: tuple[str, str, str]  # (what, value, second value)


def mix(newest: datetime) -> list[Query]:
    out = [Query("one word (common)", w, ("word", w, "")) for w in WORDS_COMMON]
    out += [Query("one word (rare)", w, ("word", w, "")) for w in WORDS_RARE]
    out += [Query("phrase", f'"{a} {b}"', ("phrase", a, b)) for a, b in PHRASES]
    for what, value in SENDERS:
        out.append(Query("from:", f"from:{value}", (what, value, "")))
    for days in AFTER_DAYS:
        day = (newest - timedelta(days=days)).strftime("%Y/%m/%d")
        out.append(Query("has:attachment after:", f"has:attachment after:{day}",
                         ("after", day.replace("/", "-"), "")))
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def run_mix(conn: psycopg.Connection[Any], inbox: uuid.UUID, runs: int
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each query once to warm up, then `runs` rounds over the whole mix (so a query's calls
    are spread in time). Returns the latencies (ms) by kind and by query."""
    newest = conn.execute("SELECT max(sort_at) FROM flux_email_message_search WHERE inbox_id = %s",
                          (inbox,)).fetchone()
    assert newest and newest[0]
    queries = mix(newest[0])
    by_kind: dict[str, list[float]] = {q.kind: [] for q in queries}
    by_query: dict[str, list[float]] = {q.text: [] for q in queries}
    for q in queries:
        conn.execute(SEARCH, (inbox, q.text)).fetchall()
    for _ in range(runs):
        for q in queries:
            started = time.perf_counter()
            conn.execute(SEARCH, (inbox, q.text)).fetchall()
            ms = (time.perf_counter() - started) * 1000
            by_kind[q.kind].append(ms)
            by_query[q.text].append(ms)
    return by_kind, by_query


def print_mix(by_kind: dict[str, list[float]], by_query: dict[str, list[float]]) -> None:
    print(f"\n{'kind':<24} {'queries':>7} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
          f"   slowest query (its median)")
    everything: list[float] = []
    for kind, values in by_kind.items():
        everything += values
        mine = [t for t, v in by_query.items() if v and kind_of(t) == kind]
        slow = max(mine, key=lambda t: statistics.median(by_query[t]))
        print(f"{kind:<24} {len(mine):>7} {len(values):>6} {percentile(values, 50):>8.1f} "
              f"{percentile(values, 99):>8.1f} {max(values):>8.1f}   {slow} "
              f"({statistics.median(by_query[slow]):.1f})")
    print(f"{'overall':<24} {len(by_query):>7} {len(everything):>6} "
          f"{percentile(everything, 50):>8.1f} {percentile(everything, 99):>8.1f} "
          f"{max(everything):>8.1f}   (goal: p50 <= 50, p99 <= 250)")


def kind_of(text: str) -> str:
    if text.startswith("from:"):
        return "from:"
    if text.startswith("has:"):
        return "has:attachment after:"
    if text.startswith('"'):
        return "phrase"
    return "one word (common)" if text in WORDS_COMMON else "one word (rare)"


# --------------------------------------------------------------------------- reference
# The text of a message's fields one by one (a phrase never spans two of them).
FIELDS = """
WITH live AS (
    SELECT m.id, coalesce(m.sent_at, m.created_at) AS at, m.has_attachments,
           m.from_addresses, m.subject, coalesce(m.body_text, m.body_cleaned, m.snippet) AS body,
           (SELECT string_agg(concat_ws(' ', e ->> 'name', e ->> 'email'), ' ')
            FROM jsonb_array_elements(m.from_addresses || m.to_addresses || m.cc_addresses
                                      || m.bcc_addresses) e) AS people
    FROM flux_email_messages m
    WHERE m.inbox_id = %(inbox)s AND m.deleted_at IS NULL
)
SELECT id FROM live
WHERE {cond}
ORDER BY at DESC, id DESC
LIMIT 50
"""
IN_TEXT = """(subject ~* %(re)s OR body ~* %(re)s OR people ~* %(re)s
  OR EXISTS (SELECT 1 FROM flux_email_attachments a
             WHERE a.message_id = live.id AND a.deleted_at IS NULL
               AND (a.original_filename ~* %(re)s OR a.extracted_text ~* %(re)s)))"""
CONDITIONS = {
    "word": IN_TEXT,
    "phrase": IN_TEXT,
    "email": "from_addresses @> jsonb_build_array(jsonb_build_object('email', %(value)s::text))",
    "name": "EXISTS (SELECT 1 FROM jsonb_array_elements(from_addresses) e"
            " WHERE e ->> 'name' ~* %(re)s OR e ->> 'email' ~* %(re)s)",
    "domain": "EXISTS (SELECT 1 FROM jsonb_array_elements(from_addresses) e"
              " WHERE lower(split_part(e ->> 'email', '@', 2)) = %(value)s"
              " OR lower(e ->> 'email') LIKE '%%.' || %(value)s)",
    "after": "has_attachments AND at >= (%(value)s::date)::timestamp AT TIME ZONE 'UTC'",
}


def reference(conn: psycopg.Connection[Any], inbox: uuid.UUID, q: Query) -> list[uuid.UUID]:
    what, value, second = q.ref
    # whole words as the 'simple' parser cuts them: runs of letters and digits
    body = value if what != "phrase" else rf"{value}[^[:alnum:]]+{second}"
    regex = rf"(^|[^[:alnum:]]){body}([^[:alnum:]]|$)"
    with conn.transaction():
        for setting in ("enable_indexscan", "enable_bitmapscan", "enable_indexonlyscan"):
            conn.execute(f"SET LOCAL {setting} = off")
        rows = conn.execute(FIELDS.replace("{cond}", CONDITIONS[what]),  # type: ignore[arg-type]
                            {"inbox": inbox, "re": regex, "value": value}).fetchall()
    return [r[0] for r in rows]


def check(conn: psycopg.Connection[Any], inbox: uuid.UUID, per_kind: int) -> tuple[int, int]:
    """The first page (50) of `per_kind` queries of each kind against the reference; prints
    each. Returns (queries equal, queries checked)."""
    newest = conn.execute("SELECT max(sort_at) FROM flux_email_message_search WHERE inbox_id = %s",
                          (inbox,)).fetchone()
    assert newest and newest[0]
    picked: dict[str, list[Query]] = {}
    for q in mix(newest[0]):
        picked.setdefault(q.kind, [])
        picked[q.kind].append(q)
    sample = [q for qs in picked.values()
              for q in qs[:: max(1, len(qs) // per_kind)][:per_kind]]
    print("\nreference check (regular expressions over the stored columns, sequential scan, "
          "no search table), first page of 50:")
    equal = 0
    for q in sample:
        got = [r[0] for r in conn.execute(SEARCH, (inbox, q.text)).fetchall()]
        started = time.perf_counter()
        want = reference(conn, inbox, q)
        same = got == want
        equal += same
        print(f"  {q.text:<40} {len(got):>3} rows  {'equal' if same else 'DIFFERENT'}"
              f"  (reference {time.perf_counter() - started:.1f} s)", flush=True)
    return equal, len(sample)
