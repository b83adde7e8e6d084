-- Webhook intake: store each delivery once, queue it once, in the same transaction.

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
    v_id       uuid;
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

    INSERT INTO flux_webhook_notifications
        (webhook_id, notification_type, grant_id, inbox_id, object_id, payload, event_time)
    VALUES
        (p_webhook_id, p_notification_type, v_grant, v_inbox_id,
         coalesce(p_object_id, v_object ->> 'id'), p_payload, v_time)
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

-- Every stored notification is queued by the same transaction that stored it. AFTER INSERT
-- fires only for rows really inserted, so ON CONFLICT DO NOTHING never queues a duplicate.
CREATE OR REPLACE FUNCTION flux_webhook_notifications_enqueue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmq.send('nylas_webhook_notifications',
                      jsonb_build_object('notification_id', NEW.id,
                                         'webhook_id', NEW.webhook_id,
                                         'type', NEW.notification_type,
                                         'grant_id', NEW.grant_id));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_webhook_notifications_enqueue
    AFTER INSERT ON flux_webhook_notifications
    FOR EACH ROW EXECUTE FUNCTION flux_webhook_notifications_enqueue();

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
BEGIN
    IF p_status IS NULL OR p_status NOT IN ('pending', 'processing', 'processed', 'skipped', 'error') THEN
        RAISE EXCEPTION 'acknowledge_webhook_notification: unknown status %', coalesce(p_status, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'one of pending, processing, processed, skipped, error';
    END IF;
    IF p_duration_ms IS NOT NULL AND p_duration_ms < 0 THEN
        RAISE EXCEPTION 'acknowledge_webhook_notification: duration must be >= 0, got %', p_duration_ms
            USING ERRCODE = 'invalid_parameter_value';
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
    RETURN true;
END;
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
