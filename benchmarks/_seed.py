"""Plain-SQL seeding of a Nova database at fleet scale, shared by bench_periodic.py and
bench_scale.py (issue #19): N inboxes (a tenth Gmail), R of them with a running backfill (open
per-thread rows, each with its invisible thread-sync job), the others completed; mail threads
and messages (3 per thread) spread over the inboxes; processed webhook notifications over the
last 30 days; dead letters. Triggers are off while seeding; VACUUM ANALYZE at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg


@dataclass
class Scale:
    inboxes: int
    running: int
    open_threads: int  # per running backfill (queued, each with its job)
    done_threads: int  # per running backfill, completed
    completed_threads: int  # per completed backfill
    messages: int
    notifications: int
    archived: int


SEED = [
    ("inboxes", """
INSERT INTO flux_inboxes (provider, grant_id, email, created_at, last_event_at,
                          changes_synced_at, watch_expires_at)
SELECT CASE WHEN g % 10 = 0 THEN 'gmail' ELSE 'nylas' END,
       CASE WHEN g % 10 = 0 THEN 'user' || g || '@example.com' ELSE 'grant-' || g END,
       'user' || g || '@example.com', now() - interval '90 days',
       now() - (g % 72) * interval '1 hour',
       CASE WHEN g % 10 = 0 THEN now() + interval '1 hour' END,  -- polled: not due yet
       CASE WHEN g % 10 = 0 THEN now() + interval '6 days 12 hours' END
FROM generate_series(1, %(inboxes)s) g"""),
    ("configurations", """
INSERT INTO flux_inbox_configurations (inbox_id, backfill_status, backfill_since,
    backfill_started_at, discovery_completed_at, backfill_completed_at, checkpoint_pages_done,
    checkpoint_threads_found, created_at, updated_at)
SELECT i.id, CASE WHEN i.rn <= %(running)s THEN 'thread_sync' ELSE 'completed' END,
       now() - interval '1 year', now() - interval '1 day', now() - interval '20 hours',
       CASE WHEN i.rn > %(running)s THEN now() - (i.rn % 30) * interval '1 day'
                                          - interval '2 hours' END,
       3, 0, now() - interval '1 day', now() - interval '1 hour'
FROM (SELECT id, row_number() OVER (ORDER BY email) AS rn FROM flux_inboxes) i"""),
    ("queued threads (running backfills)", """
INSERT INTO queued_threads (config_id, inbox_id, grant_id, provider_thread_id, status,
                            message_count, processed_at, queued_at, updated_at)
SELECT c.id, c.inbox_id, i.grant_id, 't' || t,
       CASE WHEN t <= %(done_threads)s THEN 'completed' ELSE 'queued' END,
       CASE WHEN t <= %(done_threads)s THEN 3 ELSE 0 END,
       CASE WHEN t <= %(done_threads)s THEN now() - interval '1 hour' END,
       now() - interval '1 day', now() - interval '1 hour'
FROM flux_inbox_configurations c JOIN flux_inboxes i ON i.id = c.inbox_id
CROSS JOIN generate_series(1, %(done_threads)s + %(open_threads)s) t
WHERE c.backfill_status = 'thread_sync'"""),
    ("queued threads (completed backfills)", """
INSERT INTO queued_threads (config_id, inbox_id, grant_id, provider_thread_id, status,
                            message_count, processed_at, queued_at, updated_at, error_message)
SELECT c.id, c.inbox_id, i.grant_id, 't' || t,
       CASE WHEN t % 50 = 0 THEN 'failed' ELSE 'completed' END, 3,
       c.backfill_completed_at, c.created_at, c.backfill_completed_at,
       CASE WHEN t % 50 = 0 THEN 'boom' END
FROM flux_inbox_configurations c JOIN flux_inboxes i ON i.id = c.inbox_id
CROSS JOIN generate_series(1, %(completed_threads)s) t
WHERE c.backfill_status = 'completed'"""),
    ("thread jobs of open threads", """
WITH sent AS (
    INSERT INTO pgmq.q_thread_sync_jobs (vt, message)
    SELECT now() + interval '1 hour', jsonb_build_object('queued_thread_id', q.id,
           'config_id', q.config_id, 'lane', q.inbox_id, 'turn', 1)
    FROM queued_threads q WHERE q.status = 'queued'
    RETURNING msg_id, (message->>'queued_thread_id')::bigint AS qid)
UPDATE queued_threads q SET queue_msg_id = sent.msg_id FROM sent WHERE q.id = sent.qid"""),
    ("counters", """
INSERT INTO inbox_sync_stats (config_id, inbox_id, backfill_status, threads_queued,
    threads_pending, threads_completed, threads_failed, messages_synced)
SELECT c.id, c.inbox_id, c.backfill_status, count(q.id),
       count(*) FILTER (WHERE q.status = 'queued'), count(*) FILTER (WHERE q.status = 'completed'),
       count(*) FILTER (WHERE q.status = 'failed'),
       coalesce(sum(q.message_count) FILTER (WHERE q.status = 'completed'), 0)
FROM flux_inbox_configurations c LEFT JOIN queued_threads q ON q.config_id = c.id
GROUP BY c.id, c.inbox_id, c.backfill_status"""),
    ("deltas folded", "TRUNCATE inbox_sync_stats_deltas"),
    ("mail threads", """
INSERT INTO flux_email_threads (inbox_id, provider_thread_id, subject, message_count,
                                last_message_at)
SELECT i.id, 'mt' || g, 'subject ' || g, 3, now() - (g % 1000) * interval '1 hour'
FROM generate_series(1, greatest(%(messages)s / 3, 1)) g
JOIN (SELECT id, row_number() OVER (ORDER BY id) - 1 AS rn FROM flux_inboxes) i
  ON i.rn = g % %(inboxes)s"""),
    ("messages", """
INSERT INTO flux_email_messages (inbox_id, thread_id, provider_message_id, provider_thread_id,
                                 subject, body_text, sent_at)
SELECT t.inbox_id, t.id, t.provider_thread_id || '-' || m, t.provider_thread_id,
       t.subject, repeat('lorem ipsum ', 40), t.last_message_at
FROM flux_email_threads t CROSS JOIN generate_series(1, 3) m"""),
    ("webhook notifications", """
INSERT INTO flux_webhook_notifications (webhook_id, notification_type, provider, grant_id,
    inbox_id, object_id, payload, event_time, status, received_at, processed_at)
SELECT 'wh-' || g, 'message.created', i.provider, i.grant_id, i.id, 'm' || g,
       jsonb_build_object('data', jsonb_build_object('object', jsonb_build_object(
           'id', 'm' || g, 'body', repeat('x', 500)))),
       r.at, 'processed', r.at, r.at
FROM generate_series(1, %(notifications)s) g
JOIN (SELECT id, provider, grant_id, row_number() OVER (ORDER BY id) - 1 AS rn
      FROM flux_inboxes) i ON i.rn = g % %(inboxes)s
CROSS JOIN LATERAL (SELECT now() - (g % 43200) * interval '1 minute'
                              - interval '30 seconds' AS at) r"""),
    ("dead letters", """
INSERT INTO pgmq.a_thread_sync_jobs (msg_id, read_ct, enqueued_at, archived_at, vt, message)
SELECT g, 5, now() - (g % 30) * interval '1 day', now() - (g % 30) * interval '1 day',
       now(), jsonb_build_object('queued_thread_id', q.id)
FROM generate_series(1, %(archived)s) g
JOIN queued_threads q ON q.id = (g % (SELECT max(id) FROM queued_threads)) + 1"""),
    ("vacuum and statistics (autovacuum's steady state)", "VACUUM ANALYZE"),
]

def seed(url: str, scale: Scale) -> float:
    started = time.perf_counter()
    params = vars(scale)
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("flux_webhook_notifications", "flux_email_messages", "flux_email_threads",
                      "flux_inboxes", "flux_inbox_configurations"):
            conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
        for name, statement in SEED:
            t = time.perf_counter()
            conn.execute(statement.replace(" % ", " %% "), params)
            print(f"  seeded {name} in {time.perf_counter() - t:.1f}s", flush=True)
        for table in ("flux_webhook_notifications", "flux_email_messages", "flux_email_threads",
                      "flux_inboxes", "flux_inbox_configurations"):
            conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
    return time.perf_counter() - started


def sizes(url: str) -> str:
    with psycopg.connect(url) as conn:
        rows = conn.execute("""
            SELECT relname, reltuples::bigint FROM pg_class
            WHERE relname IN ('flux_inboxes', 'queued_threads', 'flux_email_messages',
                              'flux_webhook_notifications', 'a_thread_sync_jobs',
                              'q_thread_sync_jobs') ORDER BY relname""").fetchall()
    return ", ".join(f"{name} {n:,}" for name, n in rows)
