-- Thin, checked wrappers over PGMQ under the names the Nova seed's SQL used.
-- Each rejects an unknown queue or a nonsensical argument with a clear error before touching
-- anything, instead of PGMQ's "relation pgmq.q_... does not exist".

CREATE OR REPLACE FUNCTION nova_require_queue(p_queue_name text)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_queue_name IS NULL OR NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue_name) THEN
        RAISE EXCEPTION 'unknown queue: %', coalesce(p_queue_name, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT * FROM flux_pgmq_list_queues() lists the queues';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION flux_pgmq_send(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_msg_id bigint;
BEGIN
    PERFORM nova_require_queue(queue_name);
    IF message IS NULL OR jsonb_typeof(message) <> 'object' THEN
        RAISE EXCEPTION 'flux_pgmq_send: message must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF delay_seconds IS NULL OR delay_seconds < 0 THEN
        RAISE EXCEPTION 'flux_pgmq_send: delay_seconds must be >= 0, got %', delay_seconds
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO v_msg_id FROM pgmq.send(queue_name, message, delay_seconds);
    RETURN v_msg_id;
END;
$$;

CREATE OR REPLACE FUNCTION flux_pgmq_read(queue_name text, visibility_timeout integer, qty integer DEFAULT 1)
RETURNS TABLE (msg_id bigint, read_ct integer, enqueued_at timestamptz, vt timestamptz, message jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nova_require_queue(queue_name);
    IF visibility_timeout IS NULL OR visibility_timeout < 1 THEN
        RAISE EXCEPTION 'flux_pgmq_read: visibility_timeout must be >= 1 second, got %', visibility_timeout
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF qty IS NULL OR qty < 1 OR qty > 1000 THEN
        RAISE EXCEPTION 'flux_pgmq_read: qty must be between 1 and 1000, got %', qty
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
        SELECT r.msg_id, r.read_ct, r.enqueued_at, r.vt, r.message
        FROM pgmq.read(queue_name, visibility_timeout, qty) AS r;
END;
$$;

CREATE OR REPLACE FUNCTION flux_pgmq_delete(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nova_require_queue(queue_name);
    IF message_id IS NULL THEN
        RAISE EXCEPTION 'flux_pgmq_delete: message_id is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pgmq.delete(queue_name, message_id);
END;
$$;

-- Moves a message to the queue's archive (the dead-letter record) instead of deleting it.
CREATE OR REPLACE FUNCTION flux_pgmq_archive(queue_name text, message_id bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nova_require_queue(queue_name);
    IF message_id IS NULL THEN
        RAISE EXCEPTION 'flux_pgmq_archive: message_id is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN pgmq.archive(queue_name, message_id);
END;
$$;

CREATE OR REPLACE FUNCTION flux_pgmq_metrics(p_queue_name text)
RETURNS TABLE (queue_name text, queue_length bigint, newest_msg_age_sec integer,
               oldest_msg_age_sec integer, total_messages bigint, scrape_time timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nova_require_queue(p_queue_name);
    RETURN QUERY
        SELECT m.queue_name::text, m.queue_length, m.newest_msg_age_sec, m.oldest_msg_age_sec,
               m.total_messages, m.scrape_time
        FROM pgmq.metrics(p_queue_name) AS m;
END;
$$;

CREATE OR REPLACE FUNCTION flux_pgmq_list_queues()
RETURNS TABLE (queue_name text, created_at timestamptz, is_partitioned boolean, is_unlogged boolean)
LANGUAGE sql STABLE AS $$
    SELECT q.queue_name::text, q.created_at, q.is_partitioned, q.is_unlogged
    FROM pgmq.list_queues() AS q
    ORDER BY q.queue_name;
$$;
