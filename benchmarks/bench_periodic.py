"""What Nova's periodic statements cost at ten inboxes and at 10,000 (issue #19, item 5).

Seeds two databases with plain SQL (generate_series): a small one (10 inboxes, 1 running
backfill) and a large one (by default 10,000 inboxes, 1,000 of them backfilling, about 1M
per-thread rows, 1M messages, 1M webhook notifications, 1M archived queue messages), then runs
every statement the completion monitor, the metrics scrape, `nova queues`, `nova progress` and
the Gmail push intake run on a timer, each several times inside a transaction that is rolled
back (so each run sees the same rows), with JIT off per transaction as Nova's sessions have it,
timed in the server (EXPLAIN ANALYZE's planning + execution, without per-node timing). Before
measuring, the delta table of the progress counters is left as the fleet leaves it between two
folds: an interval's unfolded rows and the dead rows of the last folds (CHURN).
Prints each statement's mean time at both scales and the ratio, the monitor's database time per
minute (check statements x 60 / COMPLETION_CHECK_INTERVAL_MS, recovery statements once, the
retention ones once per chunk of a pass), the slowest monitor statement, how many catch-ups the
large fleet gets for its quiet inboxes, and a few statements as they were before (for
comparison, same data).

    NOVA_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python benchmarks/bench_periodic.py [--inboxes 10000 --running 1000 --messages 1000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _db import bench_database, server_version  # noqa: E402
from _seed import Scale, seed, sizes  # noqa: E402

# (name, statement, runs per minute of the monitor; 0 = not the monitor's)
CHECKS_PER_MINUTE = 12  # COMPLETION_CHECK_INTERVAL_MS=5000
MONITOR = [
    ("check: counter fold", "SELECT fold_sync_stats_deltas()", CHECKS_PER_MINUTE),
    ("check: running backfills", "SELECT * FROM nova_backfill_progress('{}', true)",
     CHECKS_PER_MINUTE),
    ("check: Gmail history poll", """
WITH due AS (
    UPDATE flux_inboxes SET changes_requested_at = now()
    WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL
      AND grant_id IS NOT NULL
      AND greatest(coalesce(changes_synced_at, '-infinity'::timestamptz),
                   coalesce(changes_requested_at, '-infinity'::timestamptz))
          < now() - interval '60 seconds'
    RETURNING id)
SELECT id, pgmq.send('nylas_webhook_notifications', jsonb_build_object('changes_inbox_id', id))
FROM due""", CHECKS_PER_MINUTE),
    ("recovery: premature completions", "SELECT * FROM recover_premature_completions()", 1),
    ("recovery: stuck threads (a slice)",
     "SELECT * FROM recover_stuck_threads(interval '20 seconds', 1000)", 1),
    ("recovery: lost backfill jobs",
     "SELECT * FROM recover_lost_backfill_jobs(interval '20 seconds')", 1),
    ("recovery: failed thread retries", "SELECT * FROM retry_failed_threads(interval '20 "
     "seconds', interval '600 seconds', 500)", 1),
    ("recovery: failed backfills", "SELECT * FROM resume_failed_backfills(interval '60 "
     "seconds', 5)", 1),
    ("recovery: backfills to re-count", "SELECT * FROM nova_backfills_to_recount()", 1),
    ("recovery: owed resyncs", "SELECT * FROM nova_follow_resyncs()", 1),
    ("recovery: stranded notifications", "SELECT nova_release_stranded_notifications()", 1),
    ("recovery: parked backfills", "SELECT * FROM nova_end_parked_backfills(interval '3 "
     "days')", 1),
    ("recovery: catch-up scan", "SELECT * FROM queue_due_catchups(interval '1 hour', "
     "interval '10 minutes')", 1),
    # NOVA_RETENTION_BATCH (1,000) of each kind a pass, in statements of PRUNE_CHUNK (100)
    # rows, dead letters in windows of DEAD_LETTER_WINDOW (250) (nova.completion)
    ("recovery: retention, notifications",
     "SELECT nova_prune_notifications(now() - interval '7 days', 100)", 10),
    ("recovery: retention, thread rows",
     "SELECT nova_prune_finished_threads(now() - interval '7 days', 100)", 10),
    *[(f"recovery: retention, dead letters {q[:12]}",
       f"SELECT nova_prune_dead_letters('{q}', now() - interval '7 days', 250)", 4)
      for q in ("attachment_downloads", "inbox_backfill_jobs", "nylas_webhook_notifications",
                "thread_sync_jobs")],
    ("recovery: expired grants", """
SELECT id, grant_id FROM flux_inboxes
WHERE status = 'auth_expired' AND provider = 'nylas' AND deleted_at IS NULL
  AND grant_id IS NOT NULL AND coalesce(status_changed_at, updated_at) < now() - interval '5 min'
ORDER BY coalesce(status_changed_at, updated_at) LIMIT 50""", 1),
    ("recovery: Gmail watches due", """
SELECT id, grant_id FROM flux_inboxes
WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL AND grant_id IS NOT NULL
  AND (watch_expires_at IS NULL OR watch_expires_at < now() + interval '6 days')
ORDER BY watch_expires_at NULLS FIRST LIMIT 100""", 1),
    ("recovery: Gmail watches to stop", """
SELECT id, grant_id, status FROM flux_inboxes
WHERE provider = 'gmail' AND watch_expires_at IS NOT NULL
  AND (deleted_at IS NOT NULL OR status IN ('disabled', 'revoked'))
LIMIT 100""", 1),
]
OTHERS = [
    ("nova queues", "SELECT * FROM nova_queue_overview(10000)"),
    ("nova queues: retention line", "SELECT * FROM nova_retention_status()"),
    ("nova progress refresh (0.5 s)", """
SELECT p.*, i.email, i.grant_id, c.last_error, r.rate AS learned_rate
FROM nova_backfill_progress('{}'::uuid[], true) p
JOIN flux_inbox_configurations c ON c.id = p.config_id
JOIN flux_inboxes i ON i.id = c.inbox_id
LEFT JOIN provider_rate_limits r ON r.grant_id = i.grant_id
ORDER BY c.created_at, c.id"""),
    ("metrics: queues", "SELECT queue_name, queue_length, oldest_msg_age_sec, dead_letters"
                        " FROM nova_queue_overview(10000)"),
    ("metrics: backfill threads", """
SELECT coalesce(sum(threads_pending), 0), coalesce(sum(threads_processing), 0),
       coalesce(sum(threads_completed), 0), coalesce(sum(threads_failed), 0)
FROM nova_backfill_progress('{}', true)"""),
    ("metrics: backfills", "SELECT backfill_status, count(*) FROM flux_inbox_configurations"
                           " WHERE deleted_at IS NULL GROUP BY backfill_status"),
    ("Gmail push: inbox lookup", """
SELECT i.id FROM flux_inboxes i
WHERE i.provider = 'gmail' AND lower(i.grant_id) = 'user10@example.com'
ORDER BY (i.grant_id = 'user10@example.com') DESC, (i.deleted_at IS NULL) DESC,
         i.created_at DESC LIMIT 1"""),
]
# The same work as it was done before (same data), for comparison.
BEFORE = [
    ("before: nova queues (pgmq.metrics scans each queue)",
     "SELECT m.* FROM pgmq.meta q CROSS JOIN LATERAL pgmq.metrics(q.queue_name) m"),
    ("before: nova queues (dead letters sorted)", """
SELECT m.queue_name, (SELECT count(*) FROM nova_dead_letters(q.queue_name))
FROM flux_pgmq_list_queues() q, flux_pgmq_metrics(q.queue_name) m"""),
    ("before: running backfills (a call each)", """
SELECT p.* FROM flux_inbox_configurations c CROSS JOIN LATERAL get_sync_progress(c.id) p
WHERE c.backfill_status IN ('queued', 'discovering', 'thread_sync') AND c.deleted_at IS NULL
ORDER BY c.created_at, c.id"""),
    ("before: stuck threads (every open one)", """
SELECT count(*) FROM queued_threads q
JOIN flux_inbox_configurations c ON c.id = q.config_id JOIN flux_inboxes i ON i.id = q.inbox_id
WHERE c.backfill_status IN ('discovering', 'thread_sync') AND c.deleted_at IS NULL
  AND i.status = 'active'
  AND ((q.status = 'queued' AND (q.queue_msg_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM pgmq.q_thread_sync_jobs m WHERE m.msg_id = q.queue_msg_id)))
    OR (q.status = 'processing' AND q.updated_at < now() - interval '20 seconds'))"""),
    ("before: quiet inboxes a catch-up each", """
SELECT count(*) FROM flux_inboxes i
JOIN flux_inbox_configurations c ON c.inbox_id = i.id AND c.deleted_at IS NULL
LEFT JOIN LATERAL (SELECT max(n.received_at) AS last_received FROM flux_webhook_notifications n
                   WHERE n.grant_id = i.grant_id) w ON true
WHERE i.status = 'active' AND i.deleted_at IS NULL AND i.grant_id IS NOT NULL
  AND i.provider <> 'gmail' AND c.backfill_status = 'completed'
  AND greatest(w.last_received, c.backfill_completed_at) < now() - interval '1 hour'"""),
]


def timed(conn: psycopg.Connection[Any], statement: str, runs: int) -> tuple[float, Any]:
    """Mean milliseconds of `statement` in the server (planning + execution, as EXPLAIN
    ANALYZE reports them without per-node timing: not the client's decoding of the rows) over
    `runs` (after one warm-up), each in a transaction with JIT off that is rolled back; and
    the warm-up's rows."""
    times = []
    conn.execute("BEGIN")
    conn.execute("SELECT set_config('jit', 'off', true)")
    result = conn.execute(statement).fetchall()
    conn.execute("ROLLBACK")
    for _ in range(runs):
        conn.execute("BEGIN")
        conn.execute("SELECT set_config('jit', 'off', true)")
        plan = [r[0] for r in conn.execute(
            "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) " + statement).fetchall()]
        conn.execute("ROLLBACK")
        times.append(sum(float(line.split(":")[1].split()[0]) for line in plan
                         if line.startswith(("Planning Time", "Execution Time"))))
    return statistics.mean(times), result


# Between two folds of the monitor (every 5 s) the delta table holds that interval's changes,
# and the dead rows of the last folds until autovacuum comes: what 3 real backfills and 4
# thread workers left there in bench_scale's fleet (rows per interval of the same order).
CHURN = """
DO $$
DECLARE ids uuid[];
BEGIN
    SELECT array_agg(id) INTO ids FROM (SELECT id FROM flux_inbox_configurations
                                        WHERE backfill_status = 'thread_sync' LIMIT 3) x;
    FOR r IN 1..20 LOOP
        INSERT INTO inbox_sync_stats_deltas (config_id, threads_pending, threads_processing)
        SELECT ids[1 + g % cardinality(ids)], -1, 1 FROM generate_series(1, 1000) g;
        DELETE FROM inbox_sync_stats_deltas;
    END LOOP;
    INSERT INTO inbox_sync_stats_deltas (config_id, threads_processing, threads_completed,
                                         messages_synced)
    SELECT ids[1 + g % cardinality(ids)], -1, 1, 3 FROM generate_series(1, 1000) g;
END $$"""


def measure(url: str, runs: int) -> dict[str, tuple[float, Any]]:
    out = {}
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        for name, statement, _per_minute in MONITOR:
            out[name] = timed(conn, statement, runs)
        for name, statement in [*OTHERS, *BEFORE]:
            out[name] = timed(conn, statement, runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inboxes", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=1_000)
    parser.add_argument("--open-threads", type=int, default=120)
    parser.add_argument("--done-threads", type=int, default=180)
    parser.add_argument("--completed-threads", type=int, default=80)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--notifications", type=int, default=1_000_000)
    parser.add_argument("--archived", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    large = Scale(args.inboxes, args.running, args.open_threads, args.done_threads,
                  args.completed_threads, args.messages, args.notifications, args.archived)
    small = Scale(10, 1, args.open_threads, args.done_threads, args.completed_threads,
                  1_000, 1_000, 1_000)
    results = {}
    for label, scale in (("small", small), ("large", large)):
        with bench_database() as url:
            print(f"[{label}] seeding {scale}", flush=True)
            took = seed(url, scale)
            print(f"[{label}] seeded in {took:.0f}s: {sizes(url)}", flush=True)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(CHURN)  # an interval's deltas, 20 folds' dead rows
            results[label] = measure(url, args.runs)
            version = server_version(url)
    print(f"\nPostgreSQL {version}; mean of {args.runs} runs per statement, JIT off per "
          f"transaction, rolled back; small = 10 inboxes, large = {args.inboxes:,} inboxes "
          f"({args.running:,} backfilling)\n")
    print(f"{'statement':<44} {'small ms':>9} {'large ms':>9} {'ratio':>7} {'per min':>8}")
    per_minute = {name: n for name, _s, n in MONITOR}
    monitor_ms = slowest = 0.0
    for name in [*(m[0] for m in MONITOR), *(o[0] for o in OTHERS), *(b[0] for b in BEFORE)]:
        s_ms, l_ms = results["small"][name][0], results["large"][name][0]
        n = per_minute.get(name, 0)
        if n:
            monitor_ms += l_ms * n
            slowest = max(slowest, l_ms)
        print(f"{name:<44} {s_ms:>9.2f} {l_ms:>9.2f} {l_ms / max(s_ms, 0.001):>7.1f} "
              f"{n or '':>8}")
    queued = [r for r in results["large"]["recovery: catch-up scan"][1] if r[1] is not None]
    quiet = results["large"]["before: quiet inboxes a catch-up each"][1][0][0]
    print(f"\nmonitor: {monitor_ms:.0f} ms of database time a minute at the large scale "
          f"(target < 1,000), slowest statement {slowest:.1f} ms (target < 25)")
    print(f"catch-ups queued for the large fleet's quiet inboxes: {len(queued)} "
          f"(before: {quiet:,}, one per inbox quiet for an hour)")
    print(f"nova queues: {results['large']['nova queues'][0]:.1f} ms (target < 100; before "
          f"{results['large']['before: nova queues (dead letters sorted)'][0]:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
