-- Backfill orchestration, queued threads and the counters behind get_sync_progress.
--
-- One lock order (DESIGN.md). Every transaction that touches them takes, in this order:
--   1. the configuration row (flux_inbox_configurations). A discovery page and the functions
--      that decide on a backfill's state take it FOR NO KEY UPDATE (nova_lock_config). Adding
--      or re-opening a queued thread takes it FOR KEY SHARE (the foreign key check of the
--      insert, or queue_thread_sync), which no NO KEY UPDATE waits for: that is why a webhook
--      or a page of history may take it after its thread rows. FOR UPDATE, which does wait for
--      those, is taken only where no thread row is taken after it: completion
--      (complete_backfill_if_done, recover_premature_completions) and a new backfill
--      (queue_inbox_backfill, queue_catchup_backfill).
--   2. thread rows (flux_email_threads): missing ones inserted sorted by provider id, then all
--      of them, with the threads their messages are stored under now, locked in id order
--      before any message is written (nova_lock_threads, sql/080_mailbox.sql; nova/store.py).
--   3. queued_threads rows: several at once sorted by id (queue_discovered_threads locks the
--      known rows of its page in id order before it writes any; new rows are inserted sorted
--      by provider thread id). A thread sync writes its messages first and only then
--      completes its queued thread (nova/threads.py).
--   4. the progress counters: no lock at all for a job. The counter triggers append rows to
--      inbox_sync_stats_deltas (insert-only); get_sync_progress adds them to the base row in
--      inbox_sync_stats, which only the completion monitor's fold and recount lock
--      (fold_sync_stats_deltas, initialize_sync_stats), plus a status change of the
--      configuration (its mirror trigger), after everything above.
--   5. the job's own queue message, deleted at commit (nova.runtime); a failure's record and
--      a thread sync's one statement (JobContext.commit) take it first instead. Only its job
--      and its worker's heartbeat (queue rows, nothing else) lock it: no cycle either way.

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

-- The same, locked: for functions that decide on the current row, not on what they read
-- before waiting for a concurrent writer. FOR NO KEY UPDATE excludes every other such lock,
-- but not the FOR KEY SHARE of a transaction adding a queued thread (see the lock order).
CREATE OR REPLACE FUNCTION nova_lock_config(p_config_id uuid)
RETURNS flux_inbox_configurations
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE id = p_config_id AND deleted_at IS NULL FOR NO KEY UPDATE;
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

    -- The earlier backfill's work list. Its completed threads go: this backfill syncs again
    -- whatever it lists. What was not done stays, as this backfill's work, so nothing deletes
    -- the only record of it: threads still queued or being synced get a job of this backfill
    -- (the earlier job finds itself superseded); failed ones keep their error and their retry
    -- rounds (the monitor retries them when due, retry_failed_threads), and discovery queues
    -- again any of them it lists (queue_discovered_threads).
    DELETE FROM queued_threads WHERE config_id = v_config.id AND status = 'completed';
    PERFORM nova_send_thread_jobs(ARRAY(
        SELECT q.id FROM queued_threads q
        WHERE q.config_id = v_config.id AND q.status IN ('queued', 'processing')
        ORDER BY q.id FOR UPDATE), false);

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

-- Turns: thread-sync jobs of different inboxes are served in turn (start-time fair queueing).
-- Each message names its lane (the inbox; the inbox's '/live' lane for threads that webhooks
-- or history name while its backfill runs) and a turn. The reader takes the lowest turns first
-- (nova.queue_sql), so an inbox that queues 4,000 threads and one that queues 40 a moment later
-- alternate instead of the second waiting behind the first. A lane continues after its own
-- last queued turn, or starts at the frontier (the highest turn being served, else the lowest
-- waiting), never behind work already waiting: a new inbox, and live mail, go to the front of
-- the line. Turns
-- only order messages that are in the queue at once, so nothing keeps a counter (no row to
-- lock): two senders of one lane at once may share turns, which only ties them.
CREATE OR REPLACE FUNCTION nova_thread_turn(p_lane text)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    -- The frontier: the highest turn being served (messages read and not finished: their own
    -- partial index), else the lowest turn waiting; each is one index probe, whatever the
    -- number of messages in flight or deferred.
    SELECT greatest(
        coalesce(
            (SELECT coalesce((m.message->>'turn')::bigint, 0) FROM pgmq.q_thread_sync_jobs m
             WHERE m.read_ct > 0
             ORDER BY coalesce((m.message->>'turn')::bigint, 0) DESC LIMIT 1),
            (SELECT coalesce((m.message->>'turn')::bigint, 0) FROM pgmq.q_thread_sync_jobs m
             ORDER BY coalesce((m.message->>'turn')::bigint, 0), m.msg_id LIMIT 1),
            0),
        (SELECT coalesce((m.message->>'turn')::bigint, 0) + 1 FROM pgmq.q_thread_sync_jobs m
         WHERE m.message->>'lane' = p_lane
         ORDER BY m.message->>'lane' DESC, coalesce((m.message->>'turn')::bigint, 0) DESC
         LIMIT 1));
$$;

-- Queues (or re-queues) one thread of a backfill for sync; returns the PGMQ message id.
-- p_live: a thread that live mail named (webhooks, history) goes in the inbox's live lane,
-- ahead of the rest of its backfill.
DROP FUNCTION IF EXISTS queue_thread_sync(uuid, text, integer);
CREATE OR REPLACE FUNCTION queue_thread_sync(
    p_config_id          uuid,
    p_provider_thread_id text,
    p_delay_seconds      integer DEFAULT 0,
    p_live               boolean DEFAULT false
)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_row    queued_threads;
    v_msg_id bigint;
    v_lane   text;
BEGIN
    IF p_delay_seconds IS NULL OR p_delay_seconds < 0 THEN
        RAISE EXCEPTION 'queue_thread_sync: delay must be >= 0, got %', p_delay_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The configuration before the queued thread (the lock order), FOR KEY SHARE as an insert's
    -- key check takes it: a completion deciding on this backfill (FOR UPDATE) waits until this
    -- thread is queued, or this waits until it is decided; it never counts without it.
    PERFORM 1 FROM flux_inbox_configurations WHERE id = p_config_id FOR KEY SHARE;
    PERFORM insert_queued_thread_idempotent(p_config_id, p_provider_thread_id);
    SELECT * INTO v_row FROM queued_threads
    WHERE config_id = p_config_id AND provider_thread_id = p_provider_thread_id FOR UPDATE;
    v_lane := v_row.inbox_id::text || CASE WHEN p_live THEN '/live' ELSE '' END;
    SELECT * INTO v_msg_id FROM pgmq.send(
        'thread_sync_jobs',
        nova_thread_job(v_row) || jsonb_build_object('lane', v_lane, 'turn', nova_thread_turn(v_lane)),
        p_delay_seconds);
    UPDATE queued_threads
    SET status = 'queued', queue_msg_id = v_msg_id, error_message = NULL,
        attempts = CASE WHEN v_row.status = 'failed' THEN 0 ELSE attempts END
    WHERE id = v_row.id;
    RETURN v_msg_id;
END;
$$;

-- Sends one thread_sync_jobs message for each of the queued threads p_ids (rows the caller
-- has locked, in id order) and sets each waiting for it: 'queued', attempts from 0, the error,
-- times and any retry watch cleared; p_fresh also gives back its retry rounds (a thread listed
-- again is new work, not a retry). Returns the threads and their message ids.
CREATE OR REPLACE FUNCTION nova_send_thread_jobs(p_ids bigint[], p_fresh boolean)
RETURNS TABLE (queued_thread_id bigint, provider_thread_id text, msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_ids     bigint[];
    v_threads text[];
    v_jobs    jsonb[];
    v_msgs    bigint[];
    v_lane    text;
    v_first   jsonb := '{}';
BEGIN
    -- Each inbox's threads take consecutive turns of its lane, from where the lane stands
    -- (looked up once a lane).
    FOR v_lane IN SELECT DISTINCT q.inbox_id::text FROM queued_threads q WHERE q.id = ANY (p_ids)
    LOOP
        v_first := v_first || jsonb_build_object(v_lane, nova_thread_turn(v_lane));
    END LOOP;
    SELECT array_agg(t.id ORDER BY t.id), array_agg(t.provider_thread_id ORDER BY t.id),
           array_agg(t.job || jsonb_build_object('lane', t.lane, 'turn', t.turn) ORDER BY t.id)
    INTO v_ids, v_threads, v_jobs
    FROM (SELECT q.id, q.provider_thread_id, nova_thread_job(q) AS job, q.inbox_id::text AS lane,
                 (v_first ->> q.inbox_id::text)::bigint
                 + row_number() OVER (PARTITION BY q.inbox_id ORDER BY q.id) - 1 AS turn
          FROM queued_threads q WHERE q.id = ANY (p_ids)) AS t;
    IF v_ids IS NULL THEN
        RETURN;   -- nothing to send: pgmq.send_batch rejects an empty batch
    END IF;
    SELECT array_agg(s.id ORDER BY s.n) INTO v_msgs
    FROM pgmq.send_batch('thread_sync_jobs', v_jobs, 0) WITH ORDINALITY AS s(id, n);
    UPDATE queued_threads q
    SET status = 'queued', queue_msg_id = m.msg, attempts = 0, error_message = NULL,
        started_at = NULL, processed_at = NULL, retry_at = NULL,
        retry_rounds = CASE WHEN p_fresh THEN 0 ELSE q.retry_rounds END
    FROM unnest(v_ids, v_msgs) AS m(id, msg)
    WHERE q.id = m.id;
    RETURN QUERY SELECT u.id, u.thread, u.msg FROM unnest(v_ids, v_threads, v_msgs) AS u(id, thread, msg);
END;
$$;

-- One page of discovery: adds the threads not yet known and queues exactly those, in the
-- caller's transaction, recording each one's message id. A known thread that failed before
-- this backfill was queued (work an earlier backfill left, queue_inbox_backfill) is queued
-- again too: this backfill lists it. With p_requeue_known (discovery's rounds of changed
-- threads), threads of this configuration already completed, failed or being synced are
-- queued again too: they changed since, so they must be synced again (a sync already running
-- then finds its job superseded and commits nothing). Threads in p_done_thread_ids came whole
-- with the listing and were written by the caller: they are recorded completed (one message)
-- and get no job. Returns the threads it queued (none when the whole page was known already).
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
    -- The page's known rows, locked in id order before any is written: the statements below
    -- then wait for no row of them, whatever order they visit them in.
    PERFORM 1 FROM queued_threads q
    WHERE q.config_id = p_config_id
      AND q.provider_thread_id = ANY (p_provider_thread_ids || p_done_thread_ids)
    ORDER BY q.id FOR UPDATE;
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
            error_message = NULL, retry_at = NULL
        WHERE q.status <> 'completed' OR p_requeue_known;
    END IF;
    WITH added AS (
        INSERT INTO queued_threads (config_id, inbox_id, grant_id, provider_thread_id)
        SELECT p_config_id, v_config.inbox_id, v_grant, t
        FROM (SELECT DISTINCT unnest(p_provider_thread_ids) AS t) ids
        ORDER BY t
        ON CONFLICT (config_id, provider_thread_id) DO NOTHING
        RETURNING id
    ), again AS (
        -- Sees the rows as they were before this statement: never the ones just added.
        SELECT q.id FROM queued_threads q
        WHERE q.config_id = p_config_id AND q.provider_thread_id = ANY (p_provider_thread_ids)
          AND ((p_requeue_known AND q.status IN ('completed', 'failed', 'processing'))
               OR (q.status = 'failed' AND q.processed_at < v_config.discovery_cutoff))
    )
    SELECT array_agg(w.id) INTO v_ids
    FROM (SELECT id FROM added UNION ALL SELECT id FROM again) w;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM nova_send_thread_jobs(v_ids, true);
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

-- Creates the counters of a configuration, or re-derives them from the real rows. The base
-- row is locked first, which keeps the monitor's fold away from this configuration's delta
-- rows (it skips a locked base row); then one statement, on one snapshot, counts the rows and
-- deletes exactly the deltas that snapshot sees, whose changes the count includes. A change
-- not yet committed is in neither: its delta row adds it on top once it commits. Nothing here
-- waits for a job.
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
    WITH folded AS (
        DELETE FROM inbox_sync_stats_deltas d WHERE d.config_id = p_config_id RETURNING d.id
    )
    UPDATE inbox_sync_stats s
    SET threads_queued = c.total, threads_pending = c.pending, threads_processing = c.processing,
        threads_completed = c.completed, threads_failed = c.failed, messages_synced = c.messages,
        threads_retry_waiting = c.retry_waiting,
        backfill_status = v_config.backfill_status, last_updated_at = now()
    FROM (SELECT count(*) AS total,
                 count(*) FILTER (WHERE status = 'queued') AS pending,
                 count(*) FILTER (WHERE status = 'processing') AS processing,
                 count(*) FILTER (WHERE status = 'completed') AS completed,
                 count(*) FILTER (WHERE status = 'failed') AS failed,
                 coalesce(sum(message_count) FILTER (WHERE status = 'completed'), 0) AS messages,
                 count(*) FILTER (WHERE status = 'failed' AND retry_at IS NOT NULL)
                     AS retry_waiting
          FROM queued_threads WHERE config_id = p_config_id) c,
         (SELECT count(*) FROM folded) f
    WHERE s.config_id = p_config_id
    RETURNING s.* INTO v_stats;
    RETURN v_stats;
END;
$$;

-- Folds delta rows into the base rows of inbox_sync_stats, up to p_configs configurations a
-- call; returns the number of delta rows folded. Run by the completion monitor on every
-- check, so a configuration never has more delta rows than one interval's changes. A base row
-- locked (a recount, another fold) is skipped until the next call; the fold waits for
-- nothing. Deltas of a configuration with no base row yet wait for the recount that makes it
-- (queue_inbox_backfill makes one for every backfill); those of a configuration that no
-- longer exists are dropped.
CREATE OR REPLACE FUNCTION fold_sync_stats_deltas(p_configs integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_pending uuid[];
    v_configs uuid[];
    v_rows    bigint;
BEGIN
    -- What waits is found in one pass over the delta table (an interval's changes); each of
    -- its configurations is then looked up by key: never a pass over every configuration or
    -- every counter row (issue #19: O(active)).
    v_pending := ARRAY(SELECT DISTINCT d.config_id FROM inbox_sync_stats_deltas d);
    IF cardinality(v_pending) = 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM inbox_sync_stats_deltas d
    WHERE d.config_id = ANY (ARRAY(
        SELECT p.id FROM unnest(v_pending) p(id)
        WHERE NOT EXISTS (SELECT 1 FROM flux_inbox_configurations c WHERE c.id = p.id)));
    SELECT array_agg(b.config_id ORDER BY b.config_id) INTO v_configs
    FROM (SELECT s.config_id FROM inbox_sync_stats s
          WHERE s.config_id = ANY (v_pending)
          ORDER BY s.config_id LIMIT p_configs
          FOR UPDATE SKIP LOCKED) b;
    IF v_configs IS NULL THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM inbox_sync_stats_deltas d WHERE d.config_id = ANY (v_configs)
        RETURNING d.*
    ), sums AS (
        SELECT g.config_id, count(*) AS n, sum(g.threads_queued) AS queued,
               sum(g.threads_pending) AS pending, sum(g.threads_processing) AS processing,
               sum(g.threads_completed) AS completed, sum(g.threads_failed) AS failed,
               sum(g.messages_synced) AS messages, sum(g.threads_retry_waiting) AS retry_waiting,
               max(g.created_at) AS last_at
        FROM gone g GROUP BY g.config_id
    ), folded AS (
        UPDATE inbox_sync_stats s
        SET threads_queued = s.threads_queued + sums.queued,
            threads_pending = s.threads_pending + sums.pending,
            threads_processing = s.threads_processing + sums.processing,
            threads_completed = s.threads_completed + sums.completed,
            threads_failed = s.threads_failed + sums.failed,
            messages_synced = s.messages_synced + sums.messages,
            threads_retry_waiting = s.threads_retry_waiting + sums.retry_waiting,
            last_updated_at = greatest(s.last_updated_at, sums.last_at)
        FROM sums WHERE s.config_id = sums.config_id AND s.config_id = ANY (v_configs)
        RETURNING sums.n
    )
    SELECT coalesce(sum(n), 0) INTO v_rows FROM folded;
    RETURN v_rows;
END;
$$;

-- The changes of a configuration's counters not folded into inbox_sync_stats yet: the sums of
-- its delta rows (at most one check interval's). A simple SQL function: inlined into the
-- statement that reads it, on that statement's snapshot.
CREATE OR REPLACE FUNCTION nova_unfolded_sync_stats(p_config_id uuid)
RETURNS TABLE (queued bigint, pending bigint, processing bigint, completed bigint,
               failed bigint, messages bigint, retry_waiting bigint, last_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(x.threads_queued), 0)::bigint,
           coalesce(sum(x.threads_pending), 0)::bigint,
           coalesce(sum(x.threads_processing), 0)::bigint,
           coalesce(sum(x.threads_completed), 0)::bigint,
           coalesce(sum(x.threads_failed), 0)::bigint,
           coalesce(sum(x.messages_synced), 0)::bigint,
           coalesce(sum(x.threads_retry_waiting), 0)::bigint,
           max(x.created_at)
    FROM inbox_sync_stats_deltas x WHERE x.config_id = p_config_id;
$$;

-- inbox_sync_stats as it is right now: each base row plus its delta rows not folded yet. For
-- readers that want exact counters between two folds of the monitor (metrics, listings,
-- the seed's monitoring queries); the table itself lags by at most one check interval.
CREATE OR REPLACE VIEW inbox_sync_stats_current AS
SELECT s.config_id, s.inbox_id, s.backfill_status,
       s.threads_queued + d.queued AS threads_queued,
       s.threads_pending + d.pending AS threads_pending,
       s.threads_processing + d.processing AS threads_processing,
       s.threads_completed + d.completed AS threads_completed,
       s.threads_failed + d.failed AS threads_failed,
       s.messages_synced + d.messages AS messages_synced,
       s.sync_started_at, s.sync_completed_at,
       greatest(s.last_updated_at, d.last_at) AS last_updated_at,
       s.threads_retry_waiting + d.retry_waiting AS threads_retry_waiting
FROM inbox_sync_stats s
CROSS JOIN LATERAL nova_unfolded_sync_stats(s.config_id) d;

-- Progress from the counters alone (nova_backfill_progress computes it for any number of
-- configurations): the base row plus the delta rows not folded yet (one
-- interval's changes), read in one statement, so on one snapshot: a fold that commits
-- meanwhile is seen whole or not at all. percent_complete stays NULL while discovery runs, as
-- the total is not known yet. threads_retry_waiting counts the failed threads (of
-- threads_failed) waiting for a retry round; next_retry_at is when the first is due.
-- Dropped first: a function's result columns cannot change in place.
DROP FUNCTION IF EXISTS get_sync_progress(uuid);
CREATE OR REPLACE FUNCTION get_sync_progress(p_config_id uuid)
RETURNS TABLE (config_id uuid, inbox_id uuid, backfill_status text, backfill_kind text,
               discovery_complete boolean, pages_done integer, threads_discovered integer,
               threads_queued bigint, threads_pending bigint, threads_processing bigint,
               threads_completed bigint, threads_failed bigint, messages_synced bigint,
               percent_complete numeric, backfill_started_at timestamptz,
               discovery_completed_at timestamptz, backfill_completed_at timestamptz,
               last_updated_at timestamptz, threads_retry_waiting bigint,
               next_retry_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM nova_require_config(p_config_id);  -- an unknown configuration is an error
    -- The figures of nova_backfill_progress (sql/065_periodic.sql), for this one configuration.
    RETURN QUERY SELECT * FROM nova_backfill_progress(ARRAY[p_config_id], false);
END;
$$;

-- Counter maintenance. Statement-level triggers with transition tables turn a whole statement
-- (a page of 200 inserted threads, a bulk recovery update) into one delta row per
-- configuration, appended: no row is locked that another transaction writes.
CREATE OR REPLACE FUNCTION queued_threads_count_insert()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inbox_sync_stats_deltas
        (config_id, threads_queued, threads_pending, threads_processing, threads_completed,
         threads_failed, messages_synced, threads_retry_waiting)
    SELECT n.config_id, count(*),
           count(*) FILTER (WHERE n.status = 'queued'),
           count(*) FILTER (WHERE n.status = 'processing'),
           count(*) FILTER (WHERE n.status = 'completed'),
           count(*) FILTER (WHERE n.status = 'failed'),
           coalesce(sum(n.message_count) FILTER (WHERE n.status = 'completed'), 0),
           count(*) FILTER (WHERE n.status = 'failed' AND n.retry_at IS NOT NULL)
    FROM new_rows n
    GROUP BY n.config_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION queued_threads_count_update()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inbox_sync_stats_deltas
        (config_id, threads_pending, threads_processing, threads_completed, threads_failed,
         messages_synced, threads_retry_waiting)
    SELECT n.config_id,
           sum((n.status = 'queued')::int - (o.status = 'queued')::int),
           sum((n.status = 'processing')::int - (o.status = 'processing')::int),
           sum((n.status = 'completed')::int - (o.status = 'completed')::int),
           sum((n.status = 'failed')::int - (o.status = 'failed')::int),
           sum(CASE WHEN n.status = 'completed' THEN n.message_count ELSE 0 END
               - CASE WHEN o.status = 'completed' THEN o.message_count ELSE 0 END),
           sum((n.status = 'failed' AND n.retry_at IS NOT NULL)::int
               - (o.status = 'failed' AND o.retry_at IS NOT NULL)::int)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    -- only rows that move a counter: a new job id or a retry watch pushed on leaves no delta
    WHERE n.status <> o.status
       OR (n.status = 'completed' AND n.message_count <> o.message_count)
       OR (n.status = 'failed' AND (n.retry_at IS NULL) <> (o.retry_at IS NULL))
    GROUP BY n.config_id;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION queued_threads_count_delete()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO inbox_sync_stats_deltas
        (config_id, threads_queued, threads_pending, threads_processing, threads_completed,
         threads_failed, messages_synced, threads_retry_waiting)
    SELECT o.config_id, -count(*),
           -count(*) FILTER (WHERE o.status = 'queued'),
           -count(*) FILTER (WHERE o.status = 'processing'),
           -count(*) FILTER (WHERE o.status = 'completed'),
           -count(*) FILTER (WHERE o.status = 'failed'),
           -coalesce(sum(o.message_count) FILTER (WHERE o.status = 'completed'), 0),
           -count(*) FILTER (WHERE o.status = 'failed' AND o.retry_at IS NOT NULL)
    FROM old_rows o
    GROUP BY o.config_id;
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
