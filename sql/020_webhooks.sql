-- Webhook intake: store each delivery once, queue it once, in the same transaction.

-- The one insert of every provider's intake (below, and queue_gmail_push_notification in
-- sql/110_gmail_push.sql). A webhook id seen before is neither stored nor queued again: the
-- existing row's id comes back with is_new = false.
CREATE OR REPLACE FUNCTION nova_store_notification(
    p_webhook_id        text,
    p_notification_type text,
    p_provider          text,
    p_grant_id          text,
    p_inbox_id          uuid,
    p_object_id         text,
    p_payload           jsonb,
    p_event_time        timestamptz
)
RETURNS TABLE (notification_id uuid, is_new boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO flux_webhook_notifications
        (webhook_id, notification_type, provider, grant_id, inbox_id, object_id, payload,
         event_time)
    VALUES
        (p_webhook_id, p_notification_type, p_provider, p_grant_id, p_inbox_id, p_object_id,
         p_payload, p_event_time)
    ON CONFLICT (webhook_id) DO NOTHING
    RETURNING id INTO v_id;

    IF v_id IS NOT NULL THEN
        RETURN QUERY SELECT v_id, true;
    ELSE
        RETURN QUERY SELECT n.id, false FROM flux_webhook_notifications n
                     WHERE n.webhook_id = p_webhook_id;
    END IF;
END;
$$;

-- Stores a delivery; the trigger below queues it. A webhook id seen before is neither stored
-- nor queued again: the existing row's id comes back with is_new = false.
CREATE OR REPLACE FUNCTION queue_nylas_webhook_notification(
    p_webhook_id        text,
    p_notification_type text,
    p_payload           jsonb,
    p_grant_id          text DEFAULT NULL,
    p_event_time        timestamptz DEFAULT NULL,
    p_object_id         text DEFAULT NULL
)
RETURNS TABLE (notification_id uuid, is_new boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_object   jsonb;
    v_grant    text;
    v_time     timestamptz := p_event_time;
    v_inbox_id uuid;
BEGIN
    IF p_webhook_id IS NULL OR btrim(p_webhook_id) = '' THEN
        RAISE EXCEPTION 'queue_nylas_webhook_notification: webhook id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_notification_type IS NULL OR btrim(p_notification_type) = '' THEN
        RAISE EXCEPTION 'queue_nylas_webhook_notification: notification type is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL OR jsonb_typeof(p_payload) <> 'object' THEN
        RAISE EXCEPTION 'queue_nylas_webhook_notification: payload must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_object := p_payload #> '{data,object}';
    IF jsonb_typeof(v_object) IS DISTINCT FROM 'object' THEN
        v_object := '{}'::jsonb;
    END IF;
    -- Message-tracking events (thread.replied) also carry the grant beside the object.
    v_grant := coalesce(p_grant_id, v_object ->> 'grant_id', p_payload #>> '{data,grant_id}');
    IF v_time IS NULL AND jsonb_typeof(p_payload -> 'time') = 'number' THEN
        v_time := to_timestamp((p_payload ->> 'time')::double precision);
    END IF;
    IF v_grant IS NOT NULL THEN
        SELECT i.id INTO v_inbox_id
        FROM flux_inboxes i
        WHERE i.grant_id = v_grant AND i.provider = 'nylas';
    END IF;

    RETURN QUERY SELECT * FROM nova_store_notification(
        p_webhook_id, p_notification_type, 'nylas', v_grant, v_inbox_id,
        coalesce(p_object_id, v_object ->> 'id'), p_payload, v_time);
END;
$$;

-- The queue message of a stored notification.
CREATE OR REPLACE FUNCTION nova_webhook_job(n flux_webhook_notifications)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('notification_id', n.id, 'webhook_id', n.webhook_id,
                              'type', n.notification_type, 'grant_id', n.grant_id);
$$;

-- Every stored notification is queued by the same transaction that stored it. AFTER INSERT
-- fires only for rows really inserted, so ON CONFLICT DO NOTHING never queues a duplicate.
-- The row goes straight into the queue's PGMQ table, as pgmq.send(queue, msg) writes it
-- (visible now, no headers): pgmq.send builds its INSERT as dynamic SQL, parsed and planned
-- again on every call, which was 40% of the database time of a delivery; this statement's
-- plan is cached for the session.
CREATE OR REPLACE FUNCTION flux_webhook_notifications_enqueue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgmq.q_nylas_webhook_notifications (vt, message)
    VALUES (clock_timestamp(), nova_webhook_job(NEW));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_webhook_notifications_enqueue
    AFTER INSERT ON flux_webhook_notifications
    FOR EACH ROW EXECUTE FUNCTION flux_webhook_notifications_enqueue();

-- Notifications that waited for their inbox (it did not exist, or was not active) go back to
-- the queue, oldest first, in the transaction that makes the inbox usable. Returns how many.
CREATE OR REPLACE FUNCTION nova_release_waiting_notifications(p_inbox_id uuid)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_jobs jsonb[];
BEGIN
    WITH released AS (
        UPDATE flux_webhook_notifications n
        SET status = 'pending', inbox_id = i.id, error_message = NULL
        FROM flux_inboxes i
        WHERE i.id = p_inbox_id AND n.status = 'waiting' AND n.grant_id = i.grant_id
          AND n.provider = i.provider
        RETURNING n.*
    )
    SELECT array_agg(nova_webhook_job(r::flux_webhook_notifications) ORDER BY r.received_at, r.id)
    INTO v_jobs FROM released r;
    IF v_jobs IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgmq.send_batch('nylas_webhook_notifications', v_jobs, 0);
    RETURN cardinality(v_jobs);
END;
$$;

-- The threads a running backfill of the inbox still waits on, failed as 'inbox <why>: thread
-- not synced': nothing will sync them while the inbox is <why>, and the backfill must be able
-- to end (and `nova backfill start` to run). nova_reactivate_inbox syncs them after all.
CREATE OR REPLACE FUNCTION nova_end_inbox_threads(p_inbox_id uuid, p_why text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    UPDATE queued_threads q
    SET status = 'failed', error_message = 'inbox ' || p_why || ': thread not synced',
        processed_at = now(), queue_msg_id = NULL
    WHERE q.id IN (  -- locked in id order, as every writer of several rows takes them
        SELECT o.id FROM queued_threads o
        JOIN flux_inbox_configurations c ON c.id = o.config_id
        WHERE o.inbox_id = p_inbox_id AND o.status IN ('queued', 'processing')
          AND c.backfill_status IN ('queued', 'discovering', 'thread_sync')
        ORDER BY o.id
        FOR UPDATE OF o);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

-- The monitor's way out for backfills whose threads are parked on an inbox expired for longer
-- than p_after (its user never re-authenticated): their threads end as above, so the backfill
-- completes instead of holding the inbox's one configuration for ever. Returns the inboxes.
CREATE OR REPLACE FUNCTION nova_end_parked_backfills(p_after interval)
RETURNS TABLE (inbox_id uuid, threads integer)
LANGUAGE sql AS $$
    SELECT i.id, nova_end_inbox_threads(i.id, 'auth_expired')
    FROM flux_inboxes i
    WHERE i.status = 'auth_expired' AND i.auth_expired_at < now() - p_after
      AND EXISTS (SELECT 1 FROM flux_inbox_configurations c
                  WHERE c.inbox_id = i.id AND c.deleted_at IS NULL
                    AND c.backfill_status IN ('queued', 'discovering', 'thread_sync'));
$$;

-- An inbox that becomes usable (added active, re-activated, its grant set) takes its waiting
-- notifications; one that is revoked, disabled or deleted fails the threads its running
-- backfills still wait on (nova_end_inbox_threads), so those backfills can complete.
CREATE OR REPLACE FUNCTION flux_inboxes_status_effects()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.deleted_at IS NULL AND NEW.status = 'active' AND NEW.grant_id IS NOT NULL
       AND (TG_OP = 'INSERT' OR OLD.status <> 'active' OR OLD.deleted_at IS NOT NULL
            OR OLD.grant_id IS DISTINCT FROM NEW.grant_id) THEN
        PERFORM nova_release_waiting_notifications(NEW.id);
    END IF;
    IF (NEW.status IN ('revoked', 'disabled') AND (TG_OP = 'INSERT' OR OLD.status <> NEW.status))
       OR (NEW.deleted_at IS NOT NULL AND TG_OP = 'UPDATE' AND OLD.deleted_at IS NULL) THEN
        PERFORM nova_end_inbox_threads(NEW.id, CASE WHEN NEW.deleted_at IS NOT NULL THEN 'deleted'
                                                    ELSE NEW.status END);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_inboxes_status_effects
    AFTER INSERT OR UPDATE OF status, grant_id, deleted_at ON flux_inboxes
    FOR EACH ROW EXECUTE FUNCTION flux_inboxes_status_effects();

-- Records the outcome of processing a notification. 'processing' counts an attempt; the final
-- states (processed, skipped, error) stamp processed_at and the duration.
CREATE OR REPLACE FUNCTION acknowledge_webhook_notification(
    p_notification_id uuid,
    p_status          text DEFAULT 'processed',
    p_error_message   text DEFAULT NULL,
    p_duration_ms     integer DEFAULT NULL
)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_inbox flux_inboxes;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('pending', 'processing', 'processed', 'skipped', 'error', 'waiting') THEN
        RAISE EXCEPTION 'acknowledge_webhook_notification: unknown status %', coalesce(p_status, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'one of pending, processing, processed, skipped, error, waiting';
    END IF;
    IF p_duration_ms IS NOT NULL AND p_duration_ms < 0 THEN
        RAISE EXCEPTION 'acknowledge_webhook_notification: duration must be >= 0, got %', p_duration_ms
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_status = 'waiting' THEN
        -- The worker decided 'waiting' from what it read; the inbox may have become usable
        -- since. Its row first (the order of every status change: the inbox, then its
        -- notifications), held until this commits: a change under way finishes first and is
        -- seen below, a later one finds this row 'waiting' and releases it.
        SELECT i.* INTO v_inbox
        FROM flux_webhook_notifications n
        JOIN flux_inboxes i ON i.provider = n.provider AND i.grant_id = n.grant_id
        WHERE n.id = p_notification_id
        FOR SHARE OF i;
    END IF;
    UPDATE flux_webhook_notifications n
    SET status = p_status,
        attempts = n.attempts + (p_status = 'processing')::int,
        error_message = CASE WHEN p_status IN ('processed', 'skipped') AND p_error_message IS NULL
                             THEN NULL ELSE coalesce(p_error_message, n.error_message) END,
        processed_at = CASE WHEN p_status IN ('processed', 'skipped', 'error') THEN now() END,
        processing_duration_ms = CASE WHEN p_status IN ('processed', 'skipped', 'error')
                                      THEN coalesce(p_duration_ms, n.processing_duration_ms) END
    WHERE n.id = p_notification_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'acknowledge_webhook_notification: no notification %', coalesce(p_notification_id::text, 'NULL')
            USING ERRCODE = 'no_data_found';
    END IF;
    IF v_inbox.id IS NOT NULL AND v_inbox.status = 'active' AND v_inbox.deleted_at IS NULL THEN
        PERFORM nova_release_waiting_notifications(v_inbox.id);
    END IF;
    RETURN true;
END;
$$;

-- A batch of notifications written in one transaction (nova.webhook_batch), all 'processed':
-- what acknowledge_webhook_notification does for 'processing' then 'processed', in one
-- statement (the attempt is counted with the outcome, in the transaction of the writes).
-- Rows are taken in id order. Returns how many.
CREATE OR REPLACE FUNCTION nova_webhook_notifications_processed(
    p_ids         uuid[],
    p_duration_ms integer DEFAULT NULL
)
RETURNS integer
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE flux_webhook_notifications n
        SET status = 'processed', attempts = n.attempts + 1, error_message = NULL,
            processed_at = now(),
            processing_duration_ms = coalesce(greatest(p_duration_ms, 0),
                                              n.processing_duration_ms)
        WHERE n.id IN (SELECT o.id FROM flux_webhook_notifications o
                       WHERE o.id = ANY (p_ids) ORDER BY o.id FOR UPDATE)
        RETURNING 1
    )
    SELECT count(*)::integer FROM done;
$$;

-- The monitor's safety net for 'waiting': notifications whose inbox is usable now (an inbox
-- added in the instant between a worker's decision and its commit, which no lock can order).
-- Driven from the waiting rows (a partial index), so it costs nothing when none wait.
-- Returns how many went back to the queue.
CREATE OR REPLACE FUNCTION nova_release_stranded_notifications()
RETURNS integer
LANGUAGE sql AS $$
    SELECT coalesce(sum(nova_release_waiting_notifications(i.id)), 0)::integer
    FROM flux_inboxes i
    WHERE i.status = 'active' AND i.deleted_at IS NULL
      AND (i.provider, i.grant_id) IN (
          SELECT DISTINCT n.provider, n.grant_id FROM flux_webhook_notifications n
          WHERE n.status = 'waiting');
$$;

-- Processing figures per type and status over the last `p_time_window`.
CREATE OR REPLACE FUNCTION get_webhook_metrics(p_time_window interval DEFAULT interval '1 hour')
RETURNS TABLE (notification_type text, status text, total bigint, avg_duration_ms numeric,
               p95_duration_ms numeric, max_duration_ms integer, total_attempts bigint,
               last_received_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_time_window IS NULL OR p_time_window <= interval '0' THEN
        RAISE EXCEPTION 'get_webhook_metrics: time window must be positive, got %', p_time_window
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        SELECT n.notification_type, n.status, count(*),
               round(avg(n.processing_duration_ms)::numeric, 2),
               round((percentile_cont(0.95) WITHIN GROUP (ORDER BY n.processing_duration_ms))::numeric, 2),
               max(n.processing_duration_ms),
               sum(n.attempts)::bigint,
               max(n.received_at)
        FROM flux_webhook_notifications n
        WHERE n.received_at > now() - p_time_window
        GROUP BY n.notification_type, n.status
        ORDER BY n.notification_type, n.status;
END;
$$;

-- The one way an inbox's status changes: a grant event (p_at = its provider time) or a check
-- of the grant by a worker (p_at = now()). A change older than the one that set the status
-- last (status_changed_at; an inbox counts as set when it was created, less the clock skew)
-- changes nothing, and even an unchanged status records the newer time, so a late older
-- event can never undo a newer one. revoked is final; only auth_expired becomes active again,
-- and then a catch-up backfill re-lists the gap (Nylas replays only 72 hours of missed
-- notifications), from the last event seen (or the expiry) less p_overlap.
-- Returns the status before and after, and the catch-up's configuration id (NULL when none:
-- no change to active, or a backfill already running covers it).
CREATE OR REPLACE FUNCTION nova_set_inbox_status(
    p_inbox_id uuid,
    p_status   text,
    p_at       timestamptz DEFAULT now(),
    p_overlap  interval DEFAULT interval '10 minutes',
    p_skew     interval DEFAULT interval '2 seconds'
)
RETURNS TABLE (was text, status text, catchup_config_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_inbox flux_inboxes;
    v_since timestamptz;
    v_new   text;
    v_cfg   uuid;
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('active', 'auth_expired', 'revoked', 'disabled')
       OR p_at IS NULL THEN
        RAISE EXCEPTION 'nova_set_inbox_status: status must be active, auth_expired, revoked or disabled, and a time is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_inbox FROM flux_inboxes WHERE id = p_inbox_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'nova_set_inbox_status: no inbox %', p_inbox_id USING ERRCODE = 'no_data_found';
    END IF;
    IF coalesce(v_inbox.status_changed_at, v_inbox.created_at - p_skew) > p_at THEN
        RETURN QUERY SELECT v_inbox.status, v_inbox.status, NULL::uuid;  -- a newer change won
        RETURN;
    END IF;
    v_new := CASE WHEN v_inbox.status = 'revoked' THEN 'revoked'
                  WHEN p_status = 'active' AND v_inbox.status <> 'auth_expired' THEN v_inbox.status
                  ELSE p_status END;
    v_since := coalesce(v_inbox.last_event_at, v_inbox.auth_expired_at, now()) - p_overlap;
    UPDATE flux_inboxes
    SET status = v_new, status_changed_at = p_at, updated_at = now(),
        auth_expired_at = CASE WHEN v_new = 'auth_expired' THEN coalesce(auth_expired_at, p_at)
                               WHEN v_new = 'active' THEN NULL ELSE auth_expired_at END
    WHERE id = p_inbox_id;
    IF v_new = 'active' AND v_inbox.status = 'auth_expired' THEN
        v_cfg := nova_resume_inbox(p_inbox_id, v_since);
    END IF;
    RETURN QUERY SELECT v_inbox.status, v_new, v_cfg;
END;
$$;

-- What an inbox missed while it was not usable, once it is again: a catch-up from p_since
-- (the last event seen, less the overlap); when threads of its last backfill were ended by
-- its inactivity (nova_end_inbox_threads, or a deleted grant), from the start of that
-- backfill's range instead, so they are synced after all. A backfill still running takes
-- those threads back into its queue. Returns the catch-up's configuration (NULL: the running
-- backfill covers it).
CREATE OR REPLACE FUNCTION nova_resume_inbox(p_inbox_id uuid, p_since timestamptz)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_config flux_inbox_configurations;
    v_thread text;
    v_since  timestamptz := p_since;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE inbox_id = p_inbox_id AND deleted_at IS NULL FOR UPDATE;
    IF FOUND AND v_config.backfill_status IN ('queued', 'discovering', 'thread_sync') THEN
        FOR v_thread IN
            SELECT provider_thread_id FROM queued_threads
            WHERE config_id = v_config.id AND status = 'failed'
              AND (error_message LIKE 'inbox %: thread not synced'
                   OR error_message = 'grant deleted at the provider')
            ORDER BY provider_thread_id
        LOOP
            PERFORM queue_thread_sync(v_config.id, v_thread);
        END LOOP;
        RETURN NULL;
    END IF;
    IF FOUND AND EXISTS (
        SELECT 1 FROM queued_threads
        WHERE config_id = v_config.id AND status = 'failed'
          AND (error_message LIKE 'inbox %: thread not synced'
               OR error_message = 'grant deleted at the provider')
    ) THEN
        v_since := least(v_since, v_config.backfill_since);
    END IF;
    RETURN queue_catchup_backfill(p_inbox_id, v_since);
END;
$$;

-- The operator's word (`nova inbox reactivate`, or `nova inbox add` of a known inbox): an
-- inbox that is revoked, auth_expired or disabled becomes active again, at this moment, and
-- what it missed is listed again (nova_resume_inbox). Returns the status before and after,
-- and the configuration of the catch-up (NULL: a running backfill covers it, or the inbox
-- was active already).
CREATE OR REPLACE FUNCTION nova_reactivate_inbox(
    p_inbox_id uuid,
    p_overlap  interval DEFAULT interval '10 minutes'
)
RETURNS TABLE (was text, status text, catchup_config_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_inbox flux_inboxes;
BEGIN
    SELECT * INTO v_inbox FROM flux_inboxes WHERE id = p_inbox_id FOR UPDATE;
    IF NOT FOUND OR v_inbox.deleted_at IS NOT NULL THEN
        RAISE EXCEPTION 'nova_reactivate_inbox: no inbox %', p_inbox_id USING ERRCODE = 'no_data_found';
    END IF;
    IF v_inbox.status = 'active' THEN
        RETURN QUERY SELECT v_inbox.status, v_inbox.status, NULL::uuid;
        RETURN;
    END IF;
    UPDATE flux_inboxes
    SET status = 'active', status_changed_at = now(), auth_expired_at = NULL, updated_at = now()
    WHERE id = p_inbox_id;
    RETURN QUERY SELECT v_inbox.status, 'active'::text, nova_resume_inbox(
        p_inbox_id, coalesce(v_inbox.last_event_at, v_inbox.auth_expired_at,
                             v_inbox.status_changed_at, now()) - p_overlap);
END;
$$;
