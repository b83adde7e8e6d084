"""search_messages at 200,000 or 1,000,000 messages, what search adds to a message write, and
what the index step costs.

    python benchmarks/bench_search.py [--messages 200000] [--runs 7] [--mix-runs 5]
                                      [--check 2] [--write-runs 40]

Issue #20's Must-show: `--messages 1000000` (the scale benchmark's million messages, here in
one inbox).

1. Seed. One inbox of MESSAGES messages (plain SQL, generate_series, through the search
   triggers as Nova's writers go: each message is queued in flux_email_search_pending): bodies
   of 80 words drawn from a skewed vocabulary, 1,000 senders, dates over three years cut to
   the minute (so many share one), 20% with an attachment, half of which have extracted text.
   Then the queue is indexed as the thread processes do, `nova_search_index_pending(500)`
   until it returns 0 (time per message), and ANALYZE.
2. Queries. Median wall time of RUNS calls (after one warm-up) of
   `SELECT * FROM search_messages(inbox, query, 50)` for typical queries, first page, and of
   the 10th page reached by following the cursors.
3. The Must-show mix (benchmarks/_search_mix.py): 8 queries of each kind (one word common,
   one word rare, a phrase, `from:`, `has:attachment after:`), MIX_RUNS rounds: p50/p99 per
   kind and overall. Then the first page of CHECK queries of each kind is compared with a
   brute-force reference (regular expressions over the stored columns, sequential scan, no
   search table or index).
4. Write cost. A thread's 10 new messages (bodies of ~3 KB of HTML) written as Nova writes
   them (`store.upsert_messages`, one transaction, rolled back), then the same messages again
   unchanged (a thread re-sync), then with their unread flag flipped (a webhook): WRITE_RUNS
   times in each mode, modes alternated, each set up inside the transaction and rolled back:
   `queued` (as shipped: the triggers queue the message), `inline` (the trigger builds the
   search row in the write, as before the queue), `no trigger` (the queue triggers disabled,
   the search indexes on messages kept), `none` (no search triggers, the search indexes on
   messages dropped). Median time per message of each and the ratio to `none`. In the `queued`
   runs, the index step (`nova_search_index_pending(500)`) for the thread's 10 new messages is
   timed too, per message.

NOVA_BENCH_DATABASE_URL picks the PostgreSQL server (else an embedded one is started).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _db import bench_database, server_version  # noqa: E402
from _search_mix import check, print_mix, run_mix  # noqa: E402

from nova import db, store  # noqa: E402
from nova.providers.models import Message, Participant  # noqa: E402

SEED = """
WITH v AS (
    SELECT ARRAY['meeting', 'invoice', 'project', 'report', 'budget', 'lunch', 'deadline',
                 'review', 'contract', 'shipping', 'order', 'payment', 'travel', 'hotel',
                 'flight', 'quarterly', 'update', 'team', 'customer', 'support', 'the', 'and',
                 'for', 'with', 'please', 'thanks', 'attached', 'tomorrow', 'today', 'call',
                 'schedule', 'draft', 'final', 'question', 'answer', 'release', 'server',
                 'database', 'search', 'mail'] AS common
)
INSERT INTO flux_email_messages
    (inbox_id, thread_id, provider_message_id, provider_thread_id, subject, snippet,
     from_addresses, to_addresses, body_text, folders, unread, starred, has_attachments, sent_at)
SELECT %(inbox)s, t.id, 'm' || g, 't' || (g / 4),
       initcap(v.common[1 + (g * 7) %% 40]) || ' ' || v.common[1 + (g * 13) %% 40]
           || ' #' || (g %% 997),
       left(b.body, 100),
       jsonb_build_array(jsonb_build_object('name', 'First' || s || ' Last' || (s %% 300),
                                            'email',
                                            'user' || s || '@domain' || (s %% 50) || '.com')),
       jsonb_build_array(jsonb_build_object('name', 'Me', 'email', 'me@example.com')),
       b.body,
       CASE WHEN g %% 10 < 7 THEN ARRAY['INBOX'] WHEN g %% 10 = 7 THEN ARRAY['SENT']
            ELSE ARRAY['Label_' || (g %% 97)] END,
       g %% 5 = 0, g %% 50 = 0, g %% 5 = 1,
       date_trunc('minute', now() - (g::double precision / %(n)s::int) * interval '3 years')
FROM generate_series(%(lo)s::int, %(hi)s::int) AS g
CROSS JOIN v
CROSS JOIN LATERAL (SELECT floor(1000 * random() ^ 2)::int + 0 * g AS s) snd
CROSS JOIN LATERAL (
    SELECT string_agg(CASE WHEN random() < 0.5 THEN v.common[1 + floor(40 * random())::int]
                           ELSE 'w' || floor(20000 * random() ^ 2)::int END, ' ' ORDER BY i) AS body
    FROM generate_series(1, 80 + (g %% 2) - (g %% 2)) AS i
) b
LEFT JOIN flux_email_threads t ON t.inbox_id = %(inbox)s AND t.provider_thread_id = 't' || (g / 4)
"""
SEED_THREADS = """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id)
SELECT %(inbox)s, 't' || g FROM generate_series(0, %(n)s::int / 4) g
"""
SEED_ATTACHMENTS = """
INSERT INTO flux_email_attachments
    (inbox_id, message_id, provider_attachment_id, provider_message_id, original_filename,
     content_type, status, extracted_text)
SELECT m.inbox_id, m.id, 'a1', m.provider_message_id,
       CASE WHEN n %% 3 = 0 THEN 'invoice-' || n || '.pdf'
            WHEN n %% 3 = 1 THEN 'report_' || n || '.pdf' ELSE 'photo' || n || '.jpg' END,
       'application/pdf', 'completed',
       CASE WHEN n %% 2 = 0 THEN 'statement of account total due x' || (n %% 5000)
                                 || ' zanzibar' || (n %% 100) END
FROM (SELECT m.*, substr(m.provider_message_id, 2)::int AS n FROM flux_email_messages m
      WHERE m.inbox_id = %(inbox)s AND m.has_attachments) m
"""

QUERIES = [
    ("one word (common)", "invoice"),
    ("one word (rare)", "w15000"),
    ("two words", "budget deadline"),
    ("from:", "from:user7@domain7.com"),
    ("from: name", "from:first42"),
    ("phrase", '"quarterly report"'),
    ("subject:", "subject:lunch"),
    ("has:attachment after:", "has:attachment after:2025/01/01"),
    ("attachment text", "zanzibar16"),
    ("filename:", "filename:invoice"),
    ("label: (rare)", "label:Label_5"),
    ("is:unread in:inbox", "is:unread in:inbox"),
    ("OR and negation", "(invoice OR payment) -shipping newer_than:1y"),
]
SEARCH = "SELECT * FROM search_messages(%s, %s, 50, %s)"


def median_ms(conn: psycopg.Connection[Any], inbox: uuid.UUID, query: str, runs: int,
              cursor: str | None = None) -> tuple[float, int]:
    rows = conn.execute(SEARCH, (inbox, query, cursor)).fetchall()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        rows = conn.execute(SEARCH, (inbox, query, cursor)).fetchall()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), len(rows)


def seed(url: str, n: int) -> uuid.UUID:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES ('bench', "
                           "'me@example.com') RETURNING id").fetchone()
        assert row
        inbox: uuid.UUID = row[0]
        conn.execute(SEED_THREADS, {"inbox": inbox, "n": n})
        started = time.perf_counter()
        step = 20_000
        for lo in range(1, n + 1, step):
            conn.execute(SEED, {"inbox": inbox, "n": n, "lo": lo, "hi": min(n, lo + step - 1)})
        seconds = time.perf_counter() - started
        conn.execute(SEED_ATTACHMENTS, {"inbox": inbox})
        started = time.perf_counter()
        calls: list[float] = []
        while True:
            t = time.perf_counter()
            got = conn.execute("SELECT nova_search_index_pending(500)").fetchone()
            calls.append(time.perf_counter() - t)
            if not got or not got[0]:
                break
        indexing = time.perf_counter() - started
        conn.execute("ANALYZE flux_email_messages")
        conn.execute("ANALYZE flux_email_attachments")
        conn.execute("VACUUM ANALYZE flux_email_message_search")  # autovacuum's steady state
        print(f"seeded {n:,} messages in {seconds:.1f} s "
              f"({seconds / n * 1e6:.0f} µs a message through the queue trigger, "
              f"one INSERT ... SELECT per 20,000)")
        print(f"indexed them in {indexing:.1f} s ({indexing / n * 1e6:.0f} µs a message with "
              f"its attachments, {len(calls):,} calls of nova_search_index_pending(500): median "
              f"{statistics.median(calls) * 1000:.0f} ms, slowest {max(calls) * 1000:.0f} ms)")
    return inbox


# --------------------------------------------------------------------------- write cost
NO_SEARCH = """
DROP INDEX flux_email_messages_search_folders_idx, flux_email_messages_search_date_idx;
ALTER TABLE flux_email_messages DISABLE TRIGGER flux_email_messages_search_insert;
ALTER TABLE flux_email_messages DISABLE TRIGGER flux_email_messages_search_update;
ALTER TABLE flux_email_attachments DISABLE TRIGGER flux_email_attachments_search_queue;
ALTER TABLE flux_email_attachments DISABLE TRIGGER flux_email_attachments_search_requeue
"""
NO_TRIGGER = """
ALTER TABLE flux_email_messages DISABLE TRIGGER flux_email_messages_search_insert;
ALTER TABLE flux_email_messages DISABLE TRIGGER flux_email_messages_search_update
"""
# The message trigger as it was before the queue: the search row built inside the write.
INLINE = """
CREATE OR REPLACE FUNCTION flux_email_messages_search()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flux_email_message_search AS s (message_id, tsv, addr, inbox_id, sort_at)
    SELECT d.* FROM nova_search_document(nova_search_config(), NEW) d
    ON CONFLICT (message_id) DO UPDATE
        SET tsv = EXCLUDED.tsv, addr = EXCLUDED.addr, sort_at = EXCLUDED.sort_at;
    RETURN NULL;
END;
$$
"""
MODES = {"queued": None, "inline": INLINE, "no trigger": NO_TRIGGER, "none": NO_SEARCH}


def thread_messages(thread: str, run: int, unread: bool = False) -> list[Message]:
    me = Participant("me@example.com", "Me")
    out = []
    for k in range(10):
        you = Participant(f"person{run % 97}-{k}@example.org", f"Person {k} Somebody")
        words = " ".join(f"word{(run * 31 + k * 7 + i * 13) % 5000}" for i in range(300))
        body = (f"<div><p>Hi {you.name},</p><p>Message {k} of run {run}: {words}.</p>"
                "<p>Best,<br>Me</p></div>")
        raw = {"id": f"{thread}-{k}", "thread_id": thread, "object": "message"}
        out.append(Message(
            id=raw["id"], grant_id="g", thread_id=thread, subject=f"Re: plans for week {run}",
            from_=(you,), to=(me,), cc=(), bcc=(), reply_to=(),
            date=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=run * 10 + k),
            snippet=body[:100], body=body, folders=("INBOX",), unread=unread, starred=False,
            attachments=(), raw=raw))
    return out


async def write_cost(url: str, inbox: uuid.UUID, runs: int) -> dict[str, dict[str, float]]:
    kinds = ("new", "unchanged", "flag", "index")
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in kinds} for m in MODES}
    modes = list(MODES)
    pool = await db.create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            for run in range(runs * len(modes)):
                mode = modes[run % len(modes)]
                thread = f"wt-{uuid.uuid4().hex[:8]}"
                first = await store.prepare_messages(thread_messages(thread, run))
                flagged = await store.prepare_messages(thread_messages(thread, run, unread=True))
                tr = conn.transaction()
                await tr.start()
                try:
                    if MODES[mode]:
                        await conn.execute(MODES[mode])
                    for kind, prepared in (("new", first), ("unchanged", first),
                                           ("flag", flagged)):
                        version = datetime.now(UTC)
                        started = time.perf_counter()
                        await store.upsert_messages(conn, inbox, prepared, version)
                        times[mode][kind].append((time.perf_counter() - started) * 1000 / 10)
                    if mode == "queued":
                        started = time.perf_counter()
                        n = await conn.fetchval("SELECT nova_search_index_pending(500)")
                        times[mode]["index"].append((time.perf_counter() - started) * 1000 / 10)
                        assert n == 10, n
                finally:
                    await tr.rollback()
    finally:
        await pool.close()
    skip = max(1, runs // 5)  # the first runs warm caches and plans
    return {m: {k: statistics.median(v[skip:]) for k, v in d.items() if v}
            for m, d in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mix-runs", type=int, default=5,
                    help="rounds of the Must-show mix (0: skip it)")
    ap.add_argument("--check", type=int, default=2,
                    help="queries of each kind checked against the reference (0: none)")
    ap.add_argument("--write-runs", type=int, default=40)
    args = ap.parse_args()
    with bench_database() as url:
        print(f"PostgreSQL {server_version(url)}; {args.messages:,} messages in one inbox")
        inbox = seed(url, args.messages)
        with psycopg.connect(url, autocommit=True) as conn:
            size = conn.execute(
                "SELECT pg_size_pretty(sum(pg_relation_size(i.indexrelid))) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname LIKE '%%search%%'"
            ).fetchone()
            print(f"search indexes: {size[0] if size else '?'}")
            print(f"\n{'query':<24} {'text':<48} {'rows':>5} {'median ms':>10}")
            for label, query in QUERIES:
                ms, n = median_ms(conn, inbox, query, args.runs)
                print(f"{label:<24} {query:<48} {n:>5} {ms:>10.1f}")
            cursor = None
            for _ in range(9):
                page = conn.execute(SEARCH, (inbox, "invoice", cursor)).fetchall()
                cursor = page[-1][-1]
            first, _ = median_ms(conn, inbox, "invoice", args.runs)
            tenth, n = median_ms(conn, inbox, "invoice", args.runs, cursor)
            print(f"{'page 1 of invoice':<24} {'':<48} {50:>5} {first:>10.1f}")
            print(f"{'page 10 (cursor)':<24} {'':<48} {n:>5} {tenth:>10.1f}")
            if args.mix_runs:
                print_mix(*run_mix(conn, inbox, args.mix_runs))
            if args.check:
                equal, checked = check(conn, inbox, args.check)
                print(f"{equal} of {checked} first pages equal to the reference")
                if equal != checked:
                    return 1
        cost = asyncio.run(write_cost(url, inbox, args.write_runs))
        print(f"\nwrite of a 10-message thread (store.upsert_messages), ms per message, "
              f"median of {args.write_runs} runs each; (ratio to none):")
        print(f"{'write':<12}" + "".join(f"{m:>19}" for m in MODES))
        for kind in ("new", "unchanged", "flag"):
            base = cost["none"][kind]
            print(f"{kind:<12}" + "".join(
                f"{cost[m][kind]:>10.3f} ({cost[m][kind] / base:4.2f}x)" for m in MODES))
        print(f"index step, the thread's 10 new messages (nova_search_index_pending): "
              f"{cost['queued']['index']:.3f} ms per message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
