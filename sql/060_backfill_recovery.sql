-- Resume, catch-up, completion and recovery of backfills: the SQL behind nova.backfill,
-- nova.completion and the grant.updated catch-up of nova.webhooks.

CREATE OR REPLACE FUNCTION nova_backfill_job(c flux_inbox_configurations)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('config_id', c.id, 'inbox_id', c.inbox_id,
                              'grant_id', (SELECT grant_id FROM flux_inboxes WHERE id = c.inbox_id),
                              'kind', c.backfill_kind, 'since', c.backfill_since,
                              'until', c.backfill_until);
$$;

-- Restarts a failed backfill from its saved checkpoint (queue_inbox_backfill starts afresh).
CREATE OR REPLACE FUNCTION resume_inbox_backfill(p_config_id uuid)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    v_config := nova_lock_config(p_config_id);
    IF v_config.backfill_status <> 'failed' THEN
        RAISE EXCEPTION 'resume_inbox_backfill: configuration % is %, not failed',
            p_config_id, v_config.backfill_status USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM flux_inboxes WHERE id = v_config.inbox_id AND status = 'active') THEN
        RAISE EXCEPTION 'resume_inbox_backfill: the inbox of configuration % is not active', p_config_id
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE flux_inbox_configurations
    SET backfill_status = CASE WHEN discovery_completed_at IS NOT NULL THEN 'thread_sync'
                               WHEN checkpoint_pages_done > 0 THEN 'discovering'
                               ELSE 'queued' END,
        backfill_attempts = 0, last_error = NULL, backfill_completed_at = NULL, updated_at = now()
    WHERE id = p_config_id
    RETURNING * INTO v_config;
    IF v_config.backfill_status = 'thread_sync' THEN
        RETURN NULL;   -- discovery was done: recovery re-queues whatever threads still wait
    END IF;
    RETURN pgmq.send('inbox_backfill_jobs', nova_backfill_job(v_config));
END;
$$;

-- A catch-up after an outage (grant re-authenticated, webhooks missed): a 'catch_up' backfill
-- from p_since (kept within the one-year limit). Returns the configuration id, or NULL when a
-- backfill of the inbox is already running (it covers the gap; parked threads are recovered).
-- A failed full backfill is resumed instead of being replaced by a narrower catch-up. A failed
-- catch-up left its gap open: the new one starts where the earlier one did, if that is
-- earlier, so one outage's gap is never dropped for the next one's (its failed and unfinished
-- threads stay as work of the new one, queue_inbox_backfill).
CREATE OR REPLACE FUNCTION queue_catchup_backfill(p_inbox_id uuid, p_since timestamptz)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
    v_since  timestamptz := coalesce(p_since, now() - interval '1 day');
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE inbox_id = p_inbox_id AND deleted_at IS NULL FOR UPDATE;
    IF FOUND AND v_config.backfill_status IN ('queued', 'discovering', 'thread_sync') THEN
        RETURN NULL;
    END IF;
    IF FOUND AND v_config.backfill_status = 'failed' AND v_config.backfill_kind = 'full' THEN
        PERFORM resume_inbox_backfill(v_config.id);
        RETURN v_config.id;
    END IF;
    IF FOUND AND v_config.backfill_status = 'failed' AND v_config.backfill_since IS NOT NULL THEN
        v_since := least(v_since, v_config.backfill_since);
    END IF;
    RETURN queue_inbox_backfill(p_inbox_id,
                                least(greatest(v_since, now() - interval '1 year'),
                                      now() - interval '1 minute'),
                                NULL, 'catch_up');
END;
$$;

-- Marks a backfill completed when discovery is over and every thread is completed or failed
-- (a failed thread waiting for a retry round counts as failed: one bad thread never holds a
-- backfill up), judged on counters re-derived from the rows (initialize_sync_stats) under the
-- configuration's row lock. FOR UPDATE, not nova_lock_config: it also waits for every
-- transaction that is adding or re-opening a thread of this backfill (they hold the row FOR
-- KEY SHARE), so the count includes them. Returns 'completed', or 'waiting' with the real
-- counts still open.
CREATE OR REPLACE FUNCTION complete_backfill_if_done(p_config_id uuid)
RETURNS TABLE (outcome text, threads_queued bigint, threads_open bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config flux_inbox_configurations;
    v_stats  inbox_sync_stats;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE id = p_config_id AND deleted_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no inbox configuration %', coalesce(p_config_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_config.backfill_status <> 'thread_sync' OR v_config.discovery_completed_at IS NULL THEN
        RETURN QUERY SELECT 'not_ready'::text, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    PERFORM nova_prune_unlisted_threads(p_config_id);  -- a Gmail resync: what it did not list is gone (sql/120)
    v_stats := initialize_sync_stats(p_config_id);
    IF v_stats.threads_pending + v_stats.threads_processing > 0
       OR v_stats.threads_completed + v_stats.threads_failed <> v_stats.threads_queued THEN
        RETURN QUERY SELECT 'waiting'::text, v_stats.threads_queued,
                            v_stats.threads_pending + v_stats.threads_processing;
        RETURN;
    END IF;
    UPDATE flux_inbox_configurations
    SET backfill_status = 'completed', backfill_completed_at = now(), updated_at = now()
    WHERE id = p_config_id;
    RETURN QUERY SELECT 'completed'::text, v_stats.threads_queued, 0::bigint;
END;
$$;

-- Completed backfills that still have queued or processing threads go back to thread_sync,
-- with their completion timestamps cleared. Returns what it repaired. A thread on a retry
-- round (retry_at set) is not one: it is retried on its own, after its backfill completed.
-- O(open work), and bounded: the configurations with open threads come from
-- queued_threads_open_config_idx one at a time (a skip scan: one probe per configuration),
-- never from every completed one, at most 250 a call: the next ones from where the last call
-- stopped (nova_monitor_state 'premature_completions', cursor_id), after the last the first
-- again. Each premature completion is found within (configurations with open threads) / 250
-- + 1 calls; with fewer, every call looks at all. A walk of all 1,000 running backfills and a
-- hash of every configuration cost 31 ms a pass under load (issue #19).
CREATE OR REPLACE FUNCTION recover_premature_completions()
RETURNS TABLE (config_id uuid, threads_open bigint, completed_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_slice CONSTANT integer := 250;
    v_from  uuid;
    v_walk  uuid[];
    v_open  uuid[];
BEGIN
    SELECT s.cursor_id INTO v_from FROM nova_monitor_state s
    WHERE s.name = 'premature_completions';
    -- the slice and the first configuration after it (where the next call starts)
    v_walk := ARRAY(
        WITH RECURSIVE open_configs(id, n) AS (
            SELECT (SELECT q.config_id FROM queued_threads q
                    WHERE q.status IN ('queued', 'processing') AND q.retry_at IS NULL
                      AND q.config_id >= coalesce(v_from, '00000000-0000-0000-0000-000000000000')
                    ORDER BY q.config_id LIMIT 1), 1
            UNION ALL
            SELECT (SELECT q.config_id FROM queued_threads q
                    WHERE q.status IN ('queued', 'processing') AND q.retry_at IS NULL
                      AND q.config_id > o.id
                    ORDER BY q.config_id LIMIT 1), o.n + 1
            FROM open_configs o WHERE o.id IS NOT NULL AND o.n <= v_slice
        )
        SELECT o.id FROM open_configs o WHERE o.id IS NOT NULL ORDER BY o.n);
    v_open := v_walk[1:v_slice];
    INSERT INTO nova_monitor_state AS s (name, cursor_id)
    VALUES ('premature_completions', v_walk[v_slice + 1])
    ON CONFLICT (name) DO UPDATE SET cursor_id = excluded.cursor_id, updated_at = now();
    IF cardinality(v_open) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH bad AS (
        SELECT c.id, c.backfill_completed_at,
               (SELECT count(*) FROM queued_threads q
                WHERE q.config_id = c.id AND q.status IN ('queued', 'processing')
                  AND q.retry_at IS NULL) AS open
        FROM flux_inbox_configurations c
        WHERE c.id = ANY (v_open)
          AND c.backfill_status = 'completed' AND c.deleted_at IS NULL
        FOR UPDATE OF c SKIP LOCKED
    ), fixed AS (
        UPDATE flux_inbox_configurations c
        SET backfill_status = 'thread_sync', backfill_completed_at = NULL, updated_at = now()
        FROM bad WHERE c.id = bad.id AND c.id = ANY (v_open)
        RETURNING c.id
    )
    SELECT bad.id, bad.open, bad.backfill_completed_at FROM bad JOIN fixed ON fixed.id = bad.id;
END;
$$;

-- Threads of running backfills (active inboxes only) that no worker will ever pick up again:
-- 'queued' whose queue message is gone (or was never recorded), or 'processing' for longer
-- than p_stuck_after with no worker holding their message. Each is queued again.
-- A call looks at one slice of the open threads (queued_threads_open_idx, by id): the next
-- max(2 x p_limit, 2,500) after where the last call stopped (nova_monitor_state
-- 'stuck_threads'), or all that are left, after which the next call starts from the first: a
-- call costs the same at any number of open threads, and each is looked at within
-- open/slice + 1 calls. With fewer open threads than a slice, every call looks at all.
-- The slice is read as a range of that index (LIMIT, materialized) and each of its threads'
-- job is one probe of the queue's key: a bitmap of every open thread joined to a hash of the
-- whole queue cost 36-70 ms a call at 120,000 open threads (issue #19).
CREATE OR REPLACE FUNCTION recover_stuck_threads(p_stuck_after interval, p_limit integer DEFAULT 1000)
RETURNS TABLE (config_id uuid, provider_thread_id text, was text, msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row   record;
    v_scan  integer := greatest(p_limit * 2, 2500);
    v_from  bigint;
    v_last  bigint;
    v_seen  integer;
    v_ids   bigint[];
BEGIN
    SELECT s.position INTO v_from FROM nova_monitor_state s WHERE s.name = 'stuck_threads';
    v_from := coalesce(v_from, 0);
    -- The slice's threads that look stuck, from the slice alone; then those of running
    -- backfills of active inboxes, locked.
    WITH slice AS MATERIALIZED (
        SELECT q.id, q.status, q.queue_msg_id, q.updated_at FROM queued_threads q
        WHERE q.status IN ('queued', 'processing') AND q.id > v_from
        ORDER BY q.id LIMIT v_scan
    ), looked AS (
        SELECT s.id,
               CASE WHEN s.status = 'queued' THEN s.queue_msg_id IS NULL OR j.msg_id IS NULL
                    ELSE s.updated_at < now() - p_stuck_after
                         AND NOT coalesce(j.vt > clock_timestamp(), false) END AS stuck
        FROM slice s
        LEFT JOIN LATERAL (SELECT m.msg_id, m.vt FROM pgmq.q_thread_sync_jobs m
                           WHERE m.msg_id = s.queue_msg_id LIMIT 1) j ON true
    )
    SELECT max(l.id), count(*), coalesce(array_agg(l.id ORDER BY l.id) FILTER (WHERE l.stuck),
                                         '{}')
    INTO v_last, v_seen, v_ids FROM looked l;
    INSERT INTO nova_monitor_state AS s (name, position)
    VALUES ('stuck_threads', CASE WHEN v_seen < v_scan THEN 0 ELSE v_last END)
    ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now();
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;
    FOR v_row IN
        SELECT q.id, q.config_id, q.provider_thread_id, q.status
        FROM queued_threads q
        JOIN flux_inbox_configurations c ON c.id = q.config_id
        JOIN flux_inboxes i ON i.id = q.inbox_id
        WHERE q.id = ANY (v_ids) AND q.status IN ('queued', 'processing')
          AND c.backfill_status IN ('discovering', 'thread_sync') AND c.deleted_at IS NULL
          AND i.status = 'active'
          AND ((q.status = 'queued'
                AND (q.queue_msg_id IS NULL
                     OR NOT EXISTS (SELECT 1 FROM pgmq.q_thread_sync_jobs m
                                    WHERE m.msg_id = q.queue_msg_id)))
            OR (q.status = 'processing' AND q.updated_at < now() - p_stuck_after
                AND NOT EXISTS (SELECT 1 FROM pgmq.q_thread_sync_jobs m
                                WHERE m.msg_id = q.queue_msg_id AND m.vt > clock_timestamp())))
        ORDER BY q.id
        LIMIT p_limit
        -- the configuration FOR KEY SHARE too, as queue_thread_sync takes it: nothing taken
        -- here is waited for, so a completion or a new backfill holding it never waits on us
        FOR UPDATE OF q SKIP LOCKED FOR KEY SHARE OF c SKIP LOCKED
    LOOP
        RETURN QUERY SELECT v_row.config_id, v_row.provider_thread_id, v_row.status::text,
                            queue_thread_sync(v_row.config_id, v_row.provider_thread_id);
    END LOOP;
END;
$$;

-- Running backfills whose orchestration job vanished (archived without its failure recorded,
-- or deleted by a superseded orchestrator whose successor died): send the job again.
CREATE OR REPLACE FUNCTION recover_lost_backfill_jobs(p_stuck_after interval)
RETURNS TABLE (config_id uuid, msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    FOR v_config IN
        SELECT c.* FROM flux_inbox_configurations c
        WHERE c.backfill_status IN ('queued', 'discovering') AND c.deleted_at IS NULL
          AND c.updated_at < now() - p_stuck_after
          -- one pass over the backfill queue (its size is the running backfills), hashed
          AND c.id::text NOT IN (SELECT m.message->>'config_id' FROM pgmq.q_inbox_backfill_jobs m
                                 WHERE m.message->>'config_id' IS NOT NULL)
        FOR UPDATE OF c SKIP LOCKED
    LOOP
        UPDATE flux_inbox_configurations SET updated_at = now() WHERE id = v_config.id;
        RETURN QUERY SELECT v_config.id, pgmq.send('inbox_backfill_jobs', nova_backfill_job(v_config));
    END LOOP;
END;
$$;

-- Catch-up backfills follow a silence of the webhook intake, not a quiet inbox. An inbox with
-- no mail for an hour is the rule, not a sign of loss: at 10,000 inboxes a catch-up per quiet
-- inbox per hour was 4,632 provider listings and running backfills an hour. Lost webhooks show
-- as a silence of the whole intake: no notification of any Nylas grant for longer than p_gap
-- (the receiver down or unreachable, Nylas's endpoint marked failing; Nylas retries a
-- delivery for 10-20 minutes, then drops it). While it lasts, every active Nylas inbox whose
-- last full or catch-up backfill completed and that has heard nothing for longer than p_gap
-- gets a catch-up from its last sign of life minus p_overlap (each inbox at most once per
-- p_gap: its catch-up's completion is its new sign of life). When webhooks come back, each
-- inbox not heard of since before the silence's return gets one more, so what fell between its
-- last catch-up and the return is listed too. Not Gmail inboxes: their history (nova.changes,
-- polled) carries every change since the cursor. A re-authentication's catch-up is
-- nova_set_inbox_status's. Flowing intake: one index probe, nothing else.
CREATE OR REPLACE FUNCTION nova_queue_catchups(p_before timestamptz, p_overlap interval,
                                               p_heard_before timestamptz DEFAULT 'infinity')
RETURNS TABLE (inbox_id uuid, config_id uuid, since timestamptz, last_seen timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_row record;
BEGIN
    FOR v_row IN
        SELECT i.id AS inbox_id,
               greatest(w.last_received, c.backfill_completed_at) AS last_seen
        FROM flux_inboxes i
        JOIN flux_inbox_configurations c ON c.inbox_id = i.id AND c.deleted_at IS NULL
        LEFT JOIN LATERAL (
            SELECT n.received_at AS last_received FROM flux_webhook_notifications n
            WHERE n.grant_id = i.grant_id AND n.received_at < p_heard_before
            ORDER BY n.received_at DESC LIMIT 1) w ON true
        WHERE i.status = 'active' AND i.deleted_at IS NULL AND i.grant_id IS NOT NULL
          AND i.provider = 'nylas' AND c.backfill_status = 'completed'
          AND greatest(w.last_received, c.backfill_completed_at) < p_before
        ORDER BY i.id
    LOOP
        RETURN QUERY SELECT v_row.inbox_id,
                            queue_catchup_backfill(v_row.inbox_id, v_row.last_seen - p_overlap),
                            greatest(v_row.last_seen - p_overlap, now() - interval '1 year'),
                            v_row.last_seen;
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION queue_due_catchups(p_gap interval, p_overlap interval)
RETURNS TABLE (inbox_id uuid, config_id uuid, since timestamptz, last_seen timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_last     timestamptz;
    v_silence  timestamptz;
    v_returned timestamptz;
BEGIN
    SELECT n.received_at INTO v_last FROM flux_webhook_notifications n
    WHERE n.provider = 'nylas' ORDER BY n.received_at DESC LIMIT 1;
    SELECT s.since INTO v_silence FROM nova_monitor_state s WHERE s.name = 'catchup_silence';
    IF v_last IS NULL OR v_last < now() - p_gap THEN
        INSERT INTO nova_monitor_state AS s (name, since)
        VALUES ('catchup_silence', coalesce(v_last, '-infinity'))
        ON CONFLICT (name) DO UPDATE
        SET since = coalesce(s.since, excluded.since), updated_at = now();
        RETURN QUERY SELECT * FROM nova_queue_catchups(now() - p_gap, p_overlap);
    ELSIF v_silence IS NOT NULL THEN
        SELECT n.received_at INTO v_returned FROM flux_webhook_notifications n
        WHERE n.provider = 'nylas' AND n.received_at > v_silence
        ORDER BY n.received_at LIMIT 1;
        UPDATE nova_monitor_state SET since = NULL, marked_at = v_returned, updated_at = now()
        WHERE name = 'catchup_silence';
        RETURN QUERY SELECT * FROM nova_queue_catchups(v_returned, p_overlap, v_returned);
    END IF;
END;
$$;

-- Failed backfills of active inboxes that failed at least p_after ago are resumed from their
-- checkpoint, at most p_max times since they were queued: a failure that outlived its
-- attempts (crashes, an outage, a provider failing for a while) heals by itself, one that
-- keeps failing stops being retried. A backfill an operator cancelled is left alone.
CREATE OR REPLACE FUNCTION resume_failed_backfills(p_after interval, p_max integer)
RETURNS TABLE (config_id uuid, resumes integer, last_error text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    FOR v_config IN
        SELECT c.* FROM flux_inbox_configurations c
        JOIN flux_inboxes i ON i.id = c.inbox_id
        WHERE c.backfill_status = 'failed' AND c.deleted_at IS NULL AND i.status = 'active'
          AND i.deleted_at IS NULL AND c.updated_at < now() - p_after
          AND c.auto_resumes < p_max
          AND c.last_error IS DISTINCT FROM 'cancelled by an operator'
        ORDER BY c.updated_at
        FOR UPDATE OF c SKIP LOCKED
    LOOP
        UPDATE flux_inbox_configurations SET auto_resumes = auto_resumes + 1
        WHERE id = v_config.id;
        PERFORM resume_inbox_backfill(v_config.id);
        RETURN QUERY SELECT v_config.id, v_config.auto_resumes + 1, v_config.last_error;
    END LOOP;
END;
$$;

-- Retry rounds of failed threads. A thread that failed its attempts waits for its next round
-- (queued_threads.retry_at, set by nova.threads from NOVA_THREAD_RETRY_ROUNDS and
-- NOVA_THREAD_RETRY_SECONDS). When it is due, the round starts: retry_rounds + 1 and a new
-- job, attempts from 0, whatever its backfill's state: a backfill that completed meanwhile
-- stays completed while its thread is retried on its own. A round's retry_at then becomes a
-- watch, p_watch ahead: should its job vanish before the thread completes or fails again, the
-- thread is queued again. Threads of an inbox that is not active are looked at again after
-- p_idle (its re-activation takes them back sooner); those of a backfill an operator
-- cancelled, of a removed inbox, and completed ones are left alone (retry_at cleared).
--
-- O(due): driven by the index of retry_at, at most p_limit threads a call. Each configuration
-- is taken FOR KEY SHARE before its threads (the lock order, sql/030_backfill.sql); one that a
-- completion or a new backfill holds right now is skipped until the next pass.
CREATE OR REPLACE FUNCTION retry_failed_threads(p_watch interval, p_idle interval,
                                                p_limit integer DEFAULT 500)
RETURNS TABLE (config_id uuid, provider_thread_id text, was text, retry_round integer,
               msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config uuid;
    v_row    record;
    v_left   integer := p_limit;
    v_msg    bigint;
BEGIN
    FOR v_config IN
        SELECT DISTINCT due.config_id
        FROM (SELECT q.config_id FROM queued_threads q
              WHERE q.retry_at <= now() ORDER BY q.retry_at LIMIT p_limit) due
    LOOP
        EXIT WHEN v_left <= 0;
        PERFORM 1 FROM flux_inbox_configurations c WHERE c.id = v_config
        FOR KEY SHARE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        FOR v_row IN
            SELECT q.id, q.provider_thread_id, q.status, q.retry_rounds, q.queue_msg_id,
                   i.status AS inbox_status,
                   (i.deleted_at IS NOT NULL OR c.deleted_at IS NOT NULL
                    OR (c.backfill_status = 'failed'
                        AND c.last_error = 'cancelled by an operator')) AS left_alone
            FROM queued_threads q
            JOIN flux_inbox_configurations c ON c.id = q.config_id
            JOIN flux_inboxes i ON i.id = q.inbox_id
            WHERE q.config_id = v_config AND q.retry_at <= now()
            ORDER BY q.id
            LIMIT v_left
            FOR UPDATE OF q SKIP LOCKED
        LOOP
            v_left := v_left - 1;
            IF v_row.status = 'completed' OR v_row.left_alone THEN
                UPDATE queued_threads SET retry_at = NULL WHERE id = v_row.id;
            ELSIF v_row.inbox_status <> 'active' THEN
                UPDATE queued_threads SET retry_at = now() + p_idle WHERE id = v_row.id;
            ELSIF v_row.status = 'failed' THEN
                UPDATE queued_threads
                SET retry_rounds = retry_rounds + 1, retry_at = now() + p_watch
                WHERE id = v_row.id;
                v_msg := queue_thread_sync(v_config, v_row.provider_thread_id);
                RETURN QUERY SELECT v_config, v_row.provider_thread_id, 'failed'::text,
                                    v_row.retry_rounds + 1, v_msg;
            ELSIF EXISTS (SELECT 1 FROM pgmq.q_thread_sync_jobs m
                          WHERE m.msg_id = v_row.queue_msg_id) THEN
                UPDATE queued_threads SET retry_at = now() + p_watch WHERE id = v_row.id;
            ELSE
                UPDATE queued_threads SET retry_at = now() + p_watch WHERE id = v_row.id;
                v_msg := queue_thread_sync(v_config, v_row.provider_thread_id);
                RETURN QUERY SELECT v_config, v_row.provider_thread_id, v_row.status::text,
                                    v_row.retry_rounds, v_msg;
            END IF;
        END LOOP;
    END LOOP;
END;
$$;

-- Failed threads, latest failure first (`nova failures`): each with its error, the rounds it
-- had and when the next is due (NULL: none left, or none wanted).
CREATE OR REPLACE FUNCTION nova_failed_threads(p_limit integer DEFAULT 1000)
RETURNS TABLE (queued_thread_id bigint, config_id uuid, inbox_id uuid, provider_thread_id text,
               attempts integer, retry_rounds integer, next_retry_at timestamptz,
               failed_at timestamptz, error_message text)
LANGUAGE sql STABLE AS $$
    SELECT q.id, q.config_id, q.inbox_id, q.provider_thread_id, q.attempts, q.retry_rounds,
           q.retry_at, q.processed_at, q.error_message
    FROM queued_threads q
    WHERE q.status = 'failed'
    ORDER BY q.processed_at DESC   -- queued_threads_failed_idx
    LIMIT p_limit;
$$;
