-- Backfill orchestration, queued threads and the counters behind get_sync_progress.

CREATE OR REPLACE FUNCTION nova_require_config(p_config_id uuid)
RETURNS flux_inbox_configurations
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations WHERE id = p_config_id AND deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no inbox configuration %', coalesce(p_config_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_config;
END;
$$;

-- The same, locked FOR UPDATE: for functions that decide on the current row, not on what
-- they read before waiting for a concurrent writer.
CREATE OR REPLACE FUNCTION nova_lock_config(p_config_id uuid)
RETURNS flux_inbox_configurations
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE id = p_config_id AND deleted_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no inbox configuration %', coalesce(p_config_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_config;
END;
$$;

-- Starts a backfill of an inbox: (re)sets its configuration to 'queued' with a fresh checkpoint
-- and queues the job. Returns the configuration id. The range reaches at most one year back.
CREATE OR REPLACE FUNCTION queue_inbox_backfill(
    p_inbox_id uuid,
    p_since    timestamptz DEFAULT NULL,
    p_until    timestamptz DEFAULT NULL,
    p_kind     text DEFAULT 'full'
)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_inbox  flux_inboxes;
    v_config flux_inbox_configurations;
    v_since  timestamptz := coalesce(p_since, now() - interval '1 year');
BEGIN
    SELECT * INTO v_inbox FROM flux_inboxes WHERE id = p_inbox_id AND deleted_at IS NULL;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'queue_inbox_backfill: no inbox %', coalesce(p_inbox_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_inbox.status <> 'active' THEN
        RAISE EXCEPTION 'queue_inbox_backfill: inbox % is %', p_inbox_id, v_inbox.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF p_kind IS NULL OR p_kind NOT IN ('full', 'catch_up') THEN
        RAISE EXCEPTION 'queue_inbox_backfill: kind must be full or catch_up, got %', coalesce(p_kind, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A day of grace so "exactly one year ago" computed by a client a moment earlier passes.
    IF v_since < now() - interval '1 year 1 day' THEN
        RAISE EXCEPTION 'queue_inbox_backfill: since % is more than one year back', v_since
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v_since > now() OR (p_until IS NOT NULL AND p_until <= v_since) THEN
        RAISE EXCEPTION 'queue_inbox_backfill: empty range (since %, until %)', v_since, p_until
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- One configuration per inbox; the row lock serializes concurrent starts.
    INSERT INTO flux_inbox_configurations (inbox_id) VALUES (p_inbox_id)
    ON CONFLICT (inbox_id) WHERE deleted_at IS NULL DO NOTHING;
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE inbox_id = p_inbox_id AND deleted_at IS NULL FOR UPDATE;
    IF v_config.backfill_status IN ('queued', 'discovering', 'thread_sync') THEN
        RAISE EXCEPTION 'queue_inbox_backfill: a backfill of inbox % is already %', p_inbox_id, v_config.backfill_status
            USING ERRCODE = 'object_in_use';
    END IF;

    UPDATE flux_inbox_configurations
    SET backfill_status = 'queued', backfill_since = v_since, backfill_until = p_until,
        backfill_kind = p_kind, backfill_started_at = NULL, discovery_completed_at = NULL,
        backfill_completed_at = NULL, backfill_progress = '{}'::jsonb,
        checkpoint_page_token = NULL, checkpoint_pages_done = 0, checkpoint_threads_found = 0,
        discovery_cutoff = now(), changes_since = NULL, changes_rounds = 0,
        changes_round_started_at = NULL, auto_resumes = 0,
        backfill_attempts = 0, last_error = NULL, updated_at = now()
    WHERE id = v_config.id;

    -- Each backfill has a work list of its own: the threads of an earlier one (done, failed
    -- or abandoned) are dropped, so this one syncs every thread it lists again and its
    -- counters count only its own. A leftover sync job finds its row gone and ends.
    DELETE FROM queued_threads WHERE config_id = v_config.id;

    PERFORM initialize_sync_stats(v_config.id);
    UPDATE inbox_sync_stats SET sync_started_at = now(), sync_completed_at = NULL
    WHERE config_id = v_config.id;

    PERFORM pgmq.send('inbox_backfill_jobs',
                      jsonb_build_object('config_id', v_config.id, 'inbox_id', p_inbox_id,
                                         'grant_id', v_inbox.grant_id, 'kind', p_kind,
                                         'since', v_since, 'until', p_until));
    RETURN v_config.id;
END;
$$;

-- Saves the discovery checkpoint after a page. Pages never go backwards: a stale writer
-- (an orchestrator that lost its job to another) gets an error instead of rewinding.
CREATE OR REPLACE FUNCTION update_backfill_orchestration_progress(
    p_config_id     uuid,
    p_page_token    text,
    p_pages_done    integer,
    p_threads_found integer
)
RETURNS flux_inbox_configurations
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    IF p_pages_done IS NULL OR p_pages_done < 0 OR p_threads_found IS NULL OR p_threads_found < 0 THEN
        RAISE EXCEPTION 'update_backfill_orchestration_progress: pages (%) and threads (%) must be >= 0',
            p_pages_done, p_threads_found USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_config := nova_lock_config(p_config_id);
    IF v_config.backfill_status NOT IN ('queued', 'discovering') THEN
        RAISE EXCEPTION 'update_backfill_orchestration_progress: configuration % is %, not discovering',
            p_config_id, v_config.backfill_status USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF p_pages_done < v_config.checkpoint_pages_done
       OR p_threads_found < v_config.checkpoint_threads_found THEN
        RAISE EXCEPTION 'update_backfill_orchestration_progress: checkpoint would go back from page % to %',
            v_config.checkpoint_pages_done, p_pages_done USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE flux_inbox_configurations
    SET backfill_status = 'discovering',
        backfill_started_at = coalesce(backfill_started_at, now()),
        checkpoint_page_token = p_page_token,
        checkpoint_pages_done = p_pages_done,
        checkpoint_threads_found = p_threads_found,
        backfill_progress = backfill_progress || jsonb_build_object(
            'pages_done', p_pages_done, 'threads_discovered', p_threads_found,
            'has_more', p_page_token IS NOT NULL, 'checkpoint_at', now()),
        updated_at = now()
    WHERE id = p_config_id
    RETURNING * INTO v_config;
    RETURN v_config;
END;
$$;

-- Adds one thread to a backfill unless it is already there. Two sessions adding the same
-- thread at once end with one row; both learn its id.
CREATE OR REPLACE FUNCTION insert_queued_thread_idempotent(
    p_config_id          uuid,
    p_provider_thread_id text,
    p_grant_id           text DEFAULT NULL
)
RETURNS TABLE (queued_thread_id bigint, inserted boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
    v_id     bigint;
BEGIN
    IF p_provider_thread_id IS NULL OR btrim(p_provider_thread_id) = '' THEN
        RAISE EXCEPTION 'insert_queued_thread_idempotent: thread id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_config := nova_require_config(p_config_id);
    INSERT INTO queued_threads (config_id, inbox_id, grant_id, provider_thread_id)
    VALUES (p_config_id, v_config.inbox_id,
            coalesce(p_grant_id, (SELECT grant_id FROM flux_inboxes WHERE id = v_config.inbox_id)),
            p_provider_thread_id)
    ON CONFLICT (config_id, provider_thread_id) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NOT NULL THEN
        RETURN QUERY SELECT v_id, true;
    ELSE
        RETURN QUERY SELECT q.id, false FROM queued_threads q
                     WHERE q.config_id = p_config_id AND q.provider_thread_id = p_provider_thread_id;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION nova_thread_job(q queued_threads)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('queued_thread_id', q.id, 'config_id', q.config_id,
                              'inbox_id', q.inbox_id, 'grant_id', q.grant_id,
                              'thread_id', q.provider_thread_id);
$$;

-- Queues (or re-queues) one thread of a backfill for sync; returns the PGMQ message id.
CREATE OR REPLACE FUNCTION queue_thread_sync(
    p_config_id          uuid,
    p_provider_thread_id text,
    p_delay_seconds      integer DEFAULT 0
)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_row    queued_threads;
    v_msg_id bigint;
BEGIN
    IF p_delay_seconds IS NULL OR p_delay_seconds < 0 THEN
        RAISE EXCEPTION 'queue_thread_sync: delay must be >= 0, got %', p_delay_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM insert_queued_thread_idempotent(p_config_id, p_provider_thread_id);
    SELECT * INTO v_row FROM queued_threads
    WHERE config_id = p_config_id AND provider_thread_id = p_provider_thread_id FOR UPDATE;
    SELECT * INTO v_msg_id FROM pgmq.send('thread_sync_jobs', nova_thread_job(v_row), p_delay_seconds);
    UPDATE queued_threads
    SET status = 'queued', queue_msg_id = v_msg_id, error_message = NULL,
        attempts = CASE WHEN v_row.status = 'failed' THEN 0 ELSE attempts END
    WHERE id = v_row.id;
    RETURN v_msg_id;
END;
$$;

-- One page of discovery: adds the threads not yet known and queues exactly those, in the
-- caller's transaction, recording each one's message id. With p_requeue_known (discovery's
-- rounds of changed threads), threads of this configuration already completed, failed or
-- being synced are queued again too: they changed since, so they must be synced again (a
-- sync already running then finds its job superseded and commits nothing). Threads in
-- p_done_thread_ids came whole with the listing and were written by the caller: they are
-- recorded completed (one message) and get no job. Returns the threads it queued (none when
-- the whole page was known already).
-- Dropped first: adding a defaulted parameter must not leave an ambiguous overload.
DROP FUNCTION IF EXISTS queue_discovered_threads(uuid, text[]);
DROP FUNCTION IF EXISTS queue_discovered_threads(uuid, text[], boolean);
CREATE OR REPLACE FUNCTION queue_discovered_threads(
    p_config_id           uuid,
    p_provider_thread_ids text[],
    p_requeue_known       boolean DEFAULT false,
    p_done_thread_ids     text[] DEFAULT '{}'
)
RETURNS TABLE (queued_thread_id bigint, provider_thread_id text, msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config  flux_inbox_configurations;
    v_grant   text;
    v_ids     bigint[];
    v_threads text[];
    v_jobs    jsonb[];
    v_msgs    bigint[];
BEGIN
    IF p_provider_thread_ids IS NULL OR array_position(p_provider_thread_ids, NULL) IS NOT NULL
       OR array_position(p_provider_thread_ids, '') IS NOT NULL THEN
        RAISE EXCEPTION 'queue_discovered_threads: thread ids must be non-empty strings'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_done_thread_ids IS NULL OR array_position(p_done_thread_ids, NULL) IS NOT NULL
       OR array_position(p_done_thread_ids, '') IS NOT NULL THEN
        RAISE EXCEPTION 'queue_discovered_threads: done thread ids must be non-empty strings'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_config := nova_require_config(p_config_id);
    SELECT i.grant_id INTO v_grant FROM flux_inboxes i WHERE i.id = v_config.inbox_id;
    IF cardinality(p_done_thread_ids) > 0 THEN
        -- A job of such a thread already running (a webhook queued it) is superseded: its row
        -- names no job any more.
        INSERT INTO queued_threads AS q (config_id, inbox_id, grant_id, provider_thread_id,
                                         status, message_count, started_at, processed_at)
        SELECT p_config_id, v_config.inbox_id, v_grant, t, 'completed', 1, now(), now()
        FROM (SELECT DISTINCT unnest(p_done_thread_ids) AS t) ids
        ORDER BY t
        ON CONFLICT (config_id, provider_thread_id) DO UPDATE
        SET status = 'completed', message_count = 1, processed_at = now(), queue_msg_id = NULL,
            error_message = NULL
        WHERE q.status <> 'completed' OR p_requeue_known;
    END IF;
    WITH added AS (
        INSERT INTO queued_threads (config_id, inbox_id, grant_id, provider_thread_id)
        SELECT p_config_id, v_config.inbox_id, v_grant, t
        FROM (SELECT DISTINCT unnest(p_provider_thread_ids) AS t) ids
        ORDER BY t
        ON CONFLICT (config_id, provider_thread_id) DO NOTHING
        RETURNING *
    ), requeued AS (
        -- Sees the rows as they were before this statement: never the ones just added.
        UPDATE queued_threads q
        SET status = 'queued', attempts = 0, error_message = NULL, started_at = NULL,
            processed_at = NULL
        WHERE p_requeue_known AND q.config_id = p_config_id
          AND q.provider_thread_id = ANY (p_provider_thread_ids)
          AND q.status IN ('completed', 'failed', 'processing')
        RETURNING q.*
    ), work AS (
        SELECT * FROM added UNION ALL SELECT * FROM requeued
    )
    SELECT array_agg(a.id ORDER BY a.id), array_agg(a.provider_thread_id ORDER BY a.id),
           array_agg(nova_thread_job(a::queued_threads) ORDER BY a.id)
    INTO v_ids, v_threads, v_jobs
    FROM work a;
    IF v_ids IS NULL THEN
        RETURN;   -- nothing new: pgmq.send_batch rejects an empty batch
    END IF;
    SELECT array_agg(s.id ORDER BY s.n) INTO v_msgs
    FROM pgmq.send_batch('thread_sync_jobs', v_jobs, 0) WITH ORDINALITY AS s(id, n);
    UPDATE queued_threads q SET queue_msg_id = m.msg
    FROM unnest(v_ids, v_msgs) AS m(id, msg)
    WHERE q.id = m.id;
    RETURN QUERY SELECT u.id, u.thread, u.msg FROM unnest(v_ids, v_threads, v_msgs) AS u(id, thread, msg);
END;
$$;

-- Discovery is over: the backfill now waits only on thread sync. Calling it again is a no-op
-- (returns false); calling it on a backfill that never started is an error.
CREATE OR REPLACE FUNCTION transition_to_thread_sync(p_config_id uuid)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    -- Decide on the locked, current row: a concurrent caller that transitioned first must make
    -- this call a no-op (false), not an error about the status seen before waiting.
    v_config := nova_lock_config(p_config_id);
    UPDATE flux_inbox_configurations
    SET backfill_status = 'thread_sync', discovery_completed_at = now(),
        backfill_started_at = coalesce(backfill_started_at, now()),
        backfill_progress = backfill_progress || jsonb_build_object('has_more', false),
        checkpoint_page_token = NULL, updated_at = now()
    WHERE id = p_config_id AND backfill_status IN ('queued', 'discovering');
    IF FOUND THEN
        RETURN true;
    END IF;
    IF v_config.backfill_status IN ('thread_sync', 'completed') THEN
        RETURN false;
    END IF;
    RAISE EXCEPTION 'transition_to_thread_sync: configuration % is %', p_config_id, v_config.backfill_status
        USING ERRCODE = 'object_not_in_prerequisite_state';
END;
$$;

-- Creates the counters of a configuration, or re-derives them from the real rows. Taking the
-- stats row lock first makes the recount exact even while threads change status: a writer
-- that committed before the lock is counted, one that commits after adds its delta on top.
CREATE OR REPLACE FUNCTION initialize_sync_stats(p_config_id uuid)
RETURNS inbox_sync_stats
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
    v_stats  inbox_sync_stats;
BEGIN
    v_config := nova_require_config(p_config_id);
    INSERT INTO inbox_sync_stats (config_id, inbox_id, backfill_status)
    VALUES (p_config_id, v_config.inbox_id, v_config.backfill_status)
    ON CONFLICT (config_id) DO NOTHING;
    PERFORM 1 FROM inbox_sync_stats WHERE config_id = p_config_id FOR UPDATE;
    UPDATE inbox_sync_stats s
    SET threads_queued = c.total, threads_pending = c.pending, threads_processing = c.processing,
        threads_completed = c.completed, threads_failed = c.failed, messages_synced = c.messages,
        backfill_status = v_config.backfill_status, last_updated_at = now()
    FROM (SELECT count(*) AS total,
                 count(*) FILTER (WHERE status = 'queued') AS pending,
                 count(*) FILTER (WHERE status = 'processing') AS processing,
                 count(*) FILTER (WHERE status = 'completed') AS completed,
                 count(*) FILTER (WHERE status = 'failed') AS failed,
                 coalesce(sum(message_count) FILTER (WHERE status = 'completed'), 0) AS messages
          FROM queued_threads WHERE config_id = p_config_id) c
    WHERE s.config_id = p_config_id
    RETURNING s.* INTO v_stats;
    RETURN v_stats;
END;
$$;

-- Progress from the counters alone: two primary-key lookups whatever the mailbox size.
-- percent_complete stays NULL while discovery runs, as the total is not known yet.
CREATE OR REPLACE FUNCTION get_sync_progress(p_config_id uuid)
RETURNS TABLE (config_id uuid, inbox_id uuid, backfill_status text, backfill_kind text,
               discovery_complete boolean, pages_done integer, threads_discovered integer,
               threads_queued bigint, threads_pending bigint, threads_processing bigint,
               threads_completed bigint, threads_failed bigint, messages_synced bigint,
               percent_complete numeric, backfill_started_at timestamptz,
               discovery_completed_at timestamptz, backfill_completed_at timestamptz,
               last_updated_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    v_config := nova_require_config(p_config_id);
    RETURN QUERY
    SELECT v_config.id, v_config.inbox_id, v_config.backfill_status, v_config.backfill_kind,
           v_config.discovery_completed_at IS NOT NULL,
           v_config.checkpoint_pages_done, v_config.checkpoint_threads_found,
           coalesce(s.threads_queued, 0), coalesce(s.threads_pending, 0),
           coalesce(s.threads_processing, 0), coalesce(s.threads_completed, 0),
           coalesce(s.threads_failed, 0), coalesce(s.messages_synced, 0),
           CASE
               WHEN v_config.discovery_completed_at IS NULL THEN NULL
               WHEN coalesce(s.threads_queued, 0) = 0 THEN 100.00
               ELSE round((s.threads_completed + s.threads_failed) * 100.0 / s.threads_queued, 2)
           END,
           v_config.backfill_started_at, v_config.discovery_completed_at,
           v_config.backfill_completed_at, coalesce(s.last_updated_at, v_config.updated_at)
    FROM (SELECT 1) one
    LEFT JOIN inbox_sync_stats s ON s.config_id = v_config.id;
END;
$$;

-- Counter maintenance. Statement-level triggers with transition tables fold a whole statement
-- (a page of 200 inserted threads, a bulk recovery update) into one update per configuration.
CREATE OR REPLACE FUNCTION queued_threads_count_insert()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inbox_sync_stats AS s
        (config_id, inbox_id, threads_queued, threads_pending, threads_processing,
         threads_completed, threads_failed, messages_synced)
    SELECT n.config_id, (array_agg(n.inbox_id))[1], count(*),
           count(*) FILTER (WHERE n.status = 'queued'),
           count(*) FILTER (WHERE n.status = 'processing'),
           count(*) FILTER (WHERE n.status = 'completed'),
           count(*) FILTER (WHERE n.status = 'failed'),
           coalesce(sum(n.message_count) FILTER (WHERE n.status = 'completed'), 0)
    FROM new_rows n
    GROUP BY n.config_id
    ORDER BY n.config_id
    ON CONFLICT (config_id) DO UPDATE
    SET threads_queued = s.threads_queued + EXCLUDED.threads_queued,
        threads_pending = s.threads_pending + EXCLUDED.threads_pending,
        threads_processing = s.threads_processing + EXCLUDED.threads_processing,
        threads_completed = s.threads_completed + EXCLUDED.threads_completed,
        threads_failed = s.threads_failed + EXCLUDED.threads_failed,
        messages_synced = s.messages_synced + EXCLUDED.messages_synced,
        last_updated_at = now();
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION queued_threads_count_update()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH d AS (
        SELECT n.config_id,
               sum((n.status = 'queued')::int - (o.status = 'queued')::int) AS pending,
               sum((n.status = 'processing')::int - (o.status = 'processing')::int) AS processing,
               sum((n.status = 'completed')::int - (o.status = 'completed')::int) AS completed,
               sum((n.status = 'failed')::int - (o.status = 'failed')::int) AS failed,
               sum(CASE WHEN n.status = 'completed' THEN n.message_count ELSE 0 END
                   - CASE WHEN o.status = 'completed' THEN o.message_count ELSE 0 END) AS messages
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.status <> o.status OR n.message_count <> o.message_count
        GROUP BY n.config_id
    )
    UPDATE inbox_sync_stats s
    SET threads_pending = s.threads_pending + d.pending,
        threads_processing = s.threads_processing + d.processing,
        threads_completed = s.threads_completed + d.completed,
        threads_failed = s.threads_failed + d.failed,
        messages_synced = s.messages_synced + d.messages,
        last_updated_at = now()
    FROM d
    WHERE s.config_id = d.config_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION queued_threads_count_delete()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH d AS (
        SELECT o.config_id, count(*) AS total,
               count(*) FILTER (WHERE o.status = 'queued') AS pending,
               count(*) FILTER (WHERE o.status = 'processing') AS processing,
               count(*) FILTER (WHERE o.status = 'completed') AS completed,
               count(*) FILTER (WHERE o.status = 'failed') AS failed,
               coalesce(sum(o.message_count) FILTER (WHERE o.status = 'completed'), 0) AS messages
        FROM old_rows o GROUP BY o.config_id
    )
    UPDATE inbox_sync_stats s
    SET threads_queued = s.threads_queued - d.total,
        threads_pending = s.threads_pending - d.pending,
        threads_processing = s.threads_processing - d.processing,
        threads_completed = s.threads_completed - d.completed,
        threads_failed = s.threads_failed - d.failed,
        messages_synced = s.messages_synced - d.messages,
        last_updated_at = now()
    FROM d
    WHERE s.config_id = d.config_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION queued_threads_touch()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER queued_threads_count_insert
    AFTER INSERT ON queued_threads REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queued_threads_count_insert();
CREATE OR REPLACE TRIGGER queued_threads_count_update
    AFTER UPDATE ON queued_threads REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queued_threads_count_update();
CREATE OR REPLACE TRIGGER queued_threads_count_delete
    AFTER DELETE ON queued_threads REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queued_threads_count_delete();
CREATE OR REPLACE TRIGGER queued_threads_touch
    BEFORE UPDATE ON queued_threads
    FOR EACH ROW EXECUTE FUNCTION queued_threads_touch();

-- The seed's monitoring queries read backfill_status from inbox_sync_stats: keep it mirrored.
CREATE OR REPLACE FUNCTION flux_inbox_configurations_mirror_status()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inbox_sync_stats
    SET backfill_status = NEW.backfill_status,
        sync_completed_at = NEW.backfill_completed_at
    WHERE config_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_inbox_configurations_mirror_status
    AFTER UPDATE OF backfill_status, backfill_completed_at ON flux_inbox_configurations
    FOR EACH ROW
    WHEN (OLD.backfill_status IS DISTINCT FROM NEW.backfill_status
          OR OLD.backfill_completed_at IS DISTINCT FROM NEW.backfill_completed_at)
    EXECUTE FUNCTION flux_inbox_configurations_mirror_status();
