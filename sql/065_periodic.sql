-- What runs on a timer, at the cost of what is active (issue #19, item 5): the progress of
-- many backfills in one statement, the retention of finished work, and the queues' overview
-- of `nova queues` and the metrics.

-- get_sync_progress for many configurations in one statement: the running ones (with
-- p_running, from the active index) and those asked for by id, oldest first. The same figures
-- (the counters plus their delta rows not folded yet), without a plpgsql call per backfill.
-- The delta rows are summed in one pass over those of the configurations asked for (by its
-- index for a few, one scan of the small delta table for many), never once per configuration:
-- between two folds the delta table holds an interval's changes plus the dead rows of the
-- last folds, and a scan of it per running backfill cost 90 ms a check at 1,000 (issue #19).
CREATE OR REPLACE FUNCTION nova_backfill_progress(p_ids uuid[] DEFAULT '{}',
                                                  p_running boolean DEFAULT true)
RETURNS TABLE (config_id uuid, inbox_id uuid, backfill_status text, backfill_kind text,
               discovery_complete boolean, pages_done integer, threads_discovered integer,
               threads_queued bigint, threads_pending bigint, threads_processing bigint,
               threads_completed bigint, threads_failed bigint, messages_synced bigint,
               percent_complete numeric, backfill_started_at timestamptz,
               discovery_completed_at timestamptz, backfill_completed_at timestamptz,
               last_updated_at timestamptz, threads_retry_waiting bigint,
               next_retry_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH c AS MATERIALIZED (
        SELECT c.* FROM flux_inbox_configurations c
        WHERE p_running AND c.backfill_status IN ('queued', 'discovering', 'thread_sync')
          AND c.deleted_at IS NULL
        UNION ALL
        SELECT c.* FROM flux_inbox_configurations c
        WHERE c.id = ANY (p_ids) AND c.deleted_at IS NULL
          AND NOT (p_running AND c.backfill_status IN ('queued', 'discovering', 'thread_sync'))
    ), d AS (
        SELECT x.config_id,
               sum(x.threads_queued)::bigint AS queued,
               sum(x.threads_pending)::bigint AS pending,
               sum(x.threads_processing)::bigint AS processing,
               sum(x.threads_completed)::bigint AS completed,
               sum(x.threads_failed)::bigint AS failed,
               sum(x.messages_synced)::bigint AS messages,
               sum(x.threads_retry_waiting)::bigint AS retry_waiting,
               max(x.created_at) AS last_at
        FROM inbox_sync_stats_deltas x
        WHERE x.config_id IN (SELECT c.id FROM c)
        GROUP BY x.config_id
    ), n AS (
        SELECT c.*,
               coalesce(s.threads_queued, 0) + coalesce(d.queued, 0) AS n_queued,
               coalesce(s.threads_pending, 0) + coalesce(d.pending, 0) AS n_pending,
               coalesce(s.threads_processing, 0) + coalesce(d.processing, 0) AS n_processing,
               coalesce(s.threads_completed, 0) + coalesce(d.completed, 0) AS n_completed,
               coalesce(s.threads_failed, 0) + coalesce(d.failed, 0) AS n_failed,
               coalesce(s.messages_synced, 0) + coalesce(d.messages, 0) AS n_messages,
               coalesce(s.threads_retry_waiting, 0) + coalesce(d.retry_waiting, 0)
                   AS n_retry_waiting,
               greatest(s.last_updated_at, d.last_at) AS n_last_at
        FROM c
        -- one probe of its primary key per backfill (LIMIT keeps it a nested loop), not a
        -- hash of every configuration's counters
        LEFT JOIN LATERAL (SELECT * FROM inbox_sync_stats s WHERE s.config_id = c.id
                           LIMIT 1) s ON true
        LEFT JOIN d ON d.config_id = c.id
    )
    SELECT n.id, n.inbox_id, n.backfill_status, n.backfill_kind,
           n.discovery_completed_at IS NOT NULL, n.checkpoint_pages_done,
           n.checkpoint_threads_found, n.n_queued, n.n_pending, n.n_processing, n.n_completed,
           n.n_failed, n.n_messages,
           CASE
               WHEN n.discovery_completed_at IS NULL THEN NULL
               WHEN n.n_queued = 0 THEN 100.00
               ELSE round((n.n_completed + n.n_failed) * 100.0 / n.n_queued, 2)
           END,
           n.backfill_started_at, n.discovery_completed_at, n.backfill_completed_at,
           coalesce(n.n_last_at, n.updated_at), n.n_retry_waiting,
           (SELECT min(q.retry_at) FROM queued_threads q
            WHERE q.config_id = n.id AND q.retry_at IS NOT NULL AND q.status = 'failed')
    FROM n
    ORDER BY n.created_at, n.id;
$$;

-- Running backfills whose rows may say they are done: discovery over and no thread queued or
-- being synced (two index probes each). complete_backfill_if_done re-counts only these, under
-- their lock; the others are plainly not done, whatever their counters say.
CREATE OR REPLACE FUNCTION nova_backfills_to_recount()
RETURNS TABLE (config_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT c.id FROM flux_inbox_configurations c
    WHERE c.backfill_status = 'thread_sync' AND c.discovery_completed_at IS NOT NULL
      AND c.deleted_at IS NULL
      -- open threads in two probes of small partial indexes: those not on a retry round
      -- (queued_threads_open_config_idx), then a round in flight (retry_config_idx); the
      -- (config_id, status) index would walk each backfill's completed threads too
      AND NOT EXISTS (SELECT 1 FROM queued_threads q
                      WHERE q.config_id = c.id AND q.status IN ('queued', 'processing')
                        AND q.retry_at IS NULL)
      AND NOT EXISTS (SELECT 1 FROM queued_threads q
                      WHERE q.config_id = c.id AND q.retry_at IS NOT NULL
                        AND q.status IN ('queued', 'processing'))
    ORDER BY c.id;
$$;

-- --- retention ----------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION nova_try_uuid(p_text text)
RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_text ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$'
                THEN p_text::uuid END;
$$;

CREATE OR REPLACE FUNCTION nova_try_bigint(p_text text)
RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_text ~ '^[0-9]{1,18}$' THEN p_text::bigint END;
$$;

-- Adds what a sweep did to its record (`nova queues` shows the retention ones).
CREATE OR REPLACE FUNCTION nova_note_pruned(p_name text, p_count bigint)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO nova_monitor_state AS s (name, total, marked_at)
    VALUES (p_name, p_count, CASE WHEN p_count > 0 THEN now() END)
    ON CONFLICT (name) DO UPDATE
    SET total = s.total + excluded.total, marked_at = coalesce(excluded.marked_at, s.marked_at),
        updated_at = now();
$$;

-- Processed and skipped webhook notifications received before p_before, oldest first, at most
-- p_batch a call (one index range per status). Pending, processing, waiting and error rows
-- are work not done (or its record): never pruned.
CREATE OR REPLACE FUNCTION nova_prune_notifications(p_before timestamptz, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_n      bigint;
    v_total  bigint := 0;
BEGIN
    FOREACH v_status IN ARRAY ARRAY['processed', 'skipped'] LOOP
        EXIT WHEN v_total >= p_batch;
        -- The rows are picked and locked once (MATERIALIZED), then deleted: as `id IN
        -- (... LIMIT FOR UPDATE SKIP LOCKED)` the planner could run the pick again for each
        -- row (a nested loop), each run skipping the rows already deleted: more than the
        -- batch went, in time quadratic in it.
        WITH pick AS MATERIALIZED (
            SELECT x.id FROM flux_webhook_notifications x
            WHERE x.status = v_status AND x.received_at < p_before
            ORDER BY x.received_at LIMIT p_batch - v_total
            FOR UPDATE SKIP LOCKED
        ), gone AS (
            DELETE FROM flux_webhook_notifications n USING pick
            WHERE n.id = pick.id AND n.status = v_status
            RETURNING 1)
        SELECT count(*) INTO v_n FROM gone;
        v_total := v_total + v_n;
    END LOOP;
    PERFORM nova_note_pruned('retention:notifications', v_total);
    RETURN v_total;
END;
$$;

-- The completed threads of backfills completed before p_before, at most p_batch rows a call.
-- Their counters stay as they were (a delta row adds back what the delete trigger takes away):
-- a completed backfill keeps its figures, only the per-thread rows go. Failed threads stay:
-- they are work not done, retried by later backfills. A configuration is marked pruned
-- (threads_pruned_at) once its rows are gone, and never looked at again until it completes
-- anew. Lock order: the configuration (skipped when a backfill holds it), then its threads.
CREATE OR REPLACE FUNCTION nova_prune_finished_threads(p_before timestamptz, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_config uuid;
    v_left   bigint := p_batch;
    v_n      bigint;
    v_msgs   bigint;
BEGIN
    FOR v_config IN
        SELECT c.id FROM flux_inbox_configurations c
        WHERE c.backfill_status = 'completed' AND c.deleted_at IS NULL
          AND c.backfill_completed_at < p_before
          AND (c.threads_pruned_at IS NULL OR c.threads_pruned_at < c.backfill_completed_at)
        ORDER BY c.backfill_completed_at
        LIMIT 100
        FOR NO KEY UPDATE OF c SKIP LOCKED
    LOOP
        EXIT WHEN v_left <= 0;
        WITH pick AS MATERIALIZED (  -- picked and locked once (nova_prune_notifications)
            SELECT x.id FROM queued_threads x
            WHERE x.config_id = v_config AND x.status = 'completed'
            ORDER BY x.id LIMIT v_left
            FOR UPDATE SKIP LOCKED
        ), gone AS (
            DELETE FROM queued_threads q USING pick
            WHERE q.id = pick.id AND q.status = 'completed'
            RETURNING q.message_count)
        SELECT count(*), coalesce(sum(message_count), 0) INTO v_n, v_msgs FROM gone;
        IF v_n > 0 THEN
            INSERT INTO inbox_sync_stats_deltas
                (config_id, threads_queued, threads_completed, messages_synced)
            VALUES (v_config, v_n, v_n, v_msgs);
        END IF;
        v_left := v_left - v_n;
        IF v_left > 0 THEN  -- none left: this backfill is done with
            UPDATE flux_inbox_configurations SET threads_pruned_at = now() WHERE id = v_config;
        END IF;
    END LOOP;
    PERFORM nova_note_pruned('retention:threads', p_batch - v_left);
    RETURN p_batch - v_left;
END;
$$;

-- Dead letters whose work was done since (resolved): the notification processed or skipped,
-- the thread completed, the backfill no longer failed, the attachment downloaded, or the row
-- gone; archived before p_before. An unresolved dead letter is the record of work not done
-- and stays until it is replayed or its work done. A call looks at the next p_batch archived
-- messages (by id) after where the last one stopped (nova_monitor_state 'retention:<queue>'), going
-- round when it reaches the end, so it costs the same however many unresolved ones wait.
CREATE OR REPLACE FUNCTION nova_prune_dead_letters(p_queue text, p_before timestamptz,
                                                   p_batch integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_done   text;
    v_from   bigint;
    v_last   bigint;
    v_seen   bigint;
    v_pruned bigint;
BEGIN
    v_done := CASE p_queue
        WHEN 'nylas_webhook_notifications' THEN
            $d$CASE WHEN a.message ? 'notification_id' THEN
                     nova_try_uuid(a.message->>'notification_id') IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM flux_webhook_notifications n
                                     WHERE n.id = nova_try_uuid(a.message->>'notification_id')
                                       AND n.status NOT IN ('processed', 'skipped'))
                 WHEN a.message ? 'changes_inbox_id' THEN
                     nova_try_uuid(a.message->>'changes_inbox_id') IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM flux_inboxes i
                                     WHERE i.id = nova_try_uuid(a.message->>'changes_inbox_id')
                                       AND i.deleted_at IS NULL
                                       AND coalesce(i.changes_synced_at, '-infinity')
                                           <= a.archived_at)
                 ELSE false END$d$
        WHEN 'thread_sync_jobs' THEN
            $d$nova_try_bigint(a.message->>'queued_thread_id') IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM queued_threads q
                               WHERE q.id = nova_try_bigint(a.message->>'queued_thread_id')
                                 AND q.status <> 'completed')$d$
        WHEN 'inbox_backfill_jobs' THEN
            $d$nova_try_uuid(a.message->>'config_id') IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM flux_inbox_configurations c
                               WHERE c.id = nova_try_uuid(a.message->>'config_id')
                                 AND c.backfill_status = 'failed' AND c.deleted_at IS NULL)$d$
        WHEN 'attachment_downloads' THEN
            $d$nova_try_uuid(a.message->>'attachment_id') IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM flux_email_attachments f
                               WHERE f.id = nova_try_uuid(a.message->>'attachment_id')
                                 AND f.status <> 'completed')$d$
        END;
    IF v_done IS NULL OR to_regclass(format('pgmq.%I', 'a_' || p_queue)) IS NULL THEN
        RETURN 0;  -- a queue Nova does not know the work of: its archive is left alone
    END IF;
    SELECT s.position INTO v_from FROM nova_monitor_state s
    WHERE s.name = 'retention:' || p_queue;
    EXECUTE format($q$
        WITH slice AS MATERIALIZED (  -- the next p_batch by id, whatever their age
            SELECT a.msg_id, a.archived_at < $1 AND %s AS done
            FROM (SELECT * FROM pgmq.%I x WHERE x.msg_id > $2 ORDER BY x.msg_id LIMIT $3) a
        ), gone AS (
            DELETE FROM pgmq.%I d USING slice WHERE d.msg_id = slice.msg_id AND slice.done
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM gone), (SELECT max(msg_id) FROM slice),
               (SELECT count(*) FROM slice)$q$, v_done, 'a_' || p_queue, 'a_' || p_queue)
    INTO v_pruned, v_last, v_seen USING p_before, coalesce(v_from, 0), p_batch;
    INSERT INTO nova_monitor_state AS s (name, position) VALUES ('retention:' || p_queue, 0)
    ON CONFLICT (name) DO NOTHING;
    UPDATE nova_monitor_state
    SET position = CASE WHEN v_seen < p_batch THEN 0 ELSE v_last END, updated_at = now()
    WHERE name = 'retention:' || p_queue;
    PERFORM nova_note_pruned('retention:dead_letters', v_pruned);
    RETURN v_pruned;
END;
$$;

-- One retention pass: each kind, at most p_batch rows of each. Returns what it pruned.
CREATE OR REPLACE FUNCTION nova_prune_finished(p_before timestamptz, p_batch integer)
RETURNS TABLE (kind text, pruned bigint)
LANGUAGE plpgsql AS $$
DECLARE
    q text;
BEGIN
    RETURN QUERY SELECT 'notifications'::text, nova_prune_notifications(p_before, p_batch);
    RETURN QUERY SELECT 'threads'::text, nova_prune_finished_threads(p_before, p_batch);
    FOR q IN SELECT m.queue_name FROM pgmq.meta m ORDER BY m.queue_name LOOP
        RETURN QUERY SELECT 'dead_letters:' || q, nova_prune_dead_letters(q, p_before, p_batch);
    END LOOP;
END;
$$;

-- What retention pruned so far, by kind, and when it last pruned any.
CREATE OR REPLACE FUNCTION nova_retention_status()
RETURNS TABLE (kind text, pruned bigint, last_pruned_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT substr(s.name, length('retention:') + 1), s.total, s.marked_at
    FROM nova_monitor_state s
    WHERE s.name IN ('retention:notifications', 'retention:threads', 'retention:dead_letters',
                     'retention:events')
    ORDER BY s.name;
$$;

-- --- queues -------------------------------------------------------------------------------

-- Every queue's depth, oldest and newest message, messages ever sent and dead letters, for
-- `nova queues` and the metrics. Nothing is walked whole: the queue and its archive are each
-- counted exactly up to p_exact_cap and estimated past it (the planner's row count;
-- queue_length_estimated, dead_letters_estimated). A queue counted whole gives its oldest and
-- newest message exactly; a longer one gives them by message id, two probes of its key
-- (ids follow the send order, give or take a sending transaction's length). pgmq.metrics
-- scans the whole queue, bloat included: 120,000 queued jobs made `nova queues` 66-102 ms
-- under load (issue #19).
DROP FUNCTION IF EXISTS nova_queue_overview(integer);  -- its result gained a column
CREATE OR REPLACE FUNCTION nova_queue_overview(p_exact_cap integer DEFAULT 10000)
RETURNS TABLE (queue_name text, queue_length bigint, oldest_msg_age_sec integer,
               newest_msg_age_sec integer, total_messages bigint, dead_letters bigint,
               dead_letters_estimated boolean, queue_length_estimated boolean)
LANGUAGE plpgsql AS $$
DECLARE
    q        text;
    v_len    bigint;
    v_lenest bigint;
    v_oldest timestamptz;
    v_newest timestamptz;
    v_total  bigint;
    v_dead   bigint;
    v_est    bigint;
BEGIN
    FOR q IN SELECT m.queue_name FROM pgmq.meta m ORDER BY m.queue_name LOOP
        EXECUTE format('SELECT count(*), min(a.enqueued_at), max(a.enqueued_at)'
                       ' FROM (SELECT x.enqueued_at FROM pgmq.%I x LIMIT $1) a', 'q_' || q)
            INTO v_len, v_oldest, v_newest USING p_exact_cap + 1;
        v_lenest := NULL;
        IF v_len > p_exact_cap THEN
            SELECT greatest(c.reltuples::bigint, p_exact_cap + 1) INTO v_lenest
            FROM pg_class c WHERE c.oid = to_regclass(format('pgmq.%I', 'q_' || q));
            EXECUTE format('SELECT (SELECT x.enqueued_at FROM pgmq.%1$I x ORDER BY x.msg_id'
                           ' LIMIT 1), (SELECT x.enqueued_at FROM pgmq.%1$I x'
                           ' ORDER BY x.msg_id DESC LIMIT 1)', 'q_' || q)
                INTO v_oldest, v_newest;
        END IF;
        EXECUTE format('SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END'
                       ' FROM pgmq.%I s', 'q_' || q || '_msg_id_seq')
            INTO v_total;
        EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM pgmq.%I LIMIT $1) a', 'a_' || q)
            INTO v_dead USING p_exact_cap + 1;
        v_est := NULL;
        IF v_dead > p_exact_cap THEN
            SELECT greatest(c.reltuples::bigint, p_exact_cap + 1) INTO v_est
            FROM pg_class c WHERE c.oid = to_regclass(format('pgmq.%I', 'a_' || q));
        END IF;
        RETURN QUERY
            SELECT q::text, coalesce(v_lenest, v_len),
                   extract(epoch FROM now() - v_oldest)::integer,
                   extract(epoch FROM now() - v_newest)::integer,
                   v_total, coalesce(v_est, v_dead), v_est IS NOT NULL, v_lenest IS NOT NULL;
    END LOOP;
END;
$$;
