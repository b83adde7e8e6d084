-- Dead letters: what the runtime archived after a queue's last attempt, and putting it back.

-- Every archived message of Nova's queues, newest first.
CREATE OR REPLACE FUNCTION nova_dead_letters(p_queue_name text DEFAULT NULL)
RETURNS TABLE (queue_name text, msg_id bigint, read_ct integer, enqueued_at timestamptz,
               archived_at timestamptz, message jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q text;
BEGIN
    IF p_queue_name IS NOT NULL THEN
        PERFORM nova_require_queue(p_queue_name);
    END IF;
    FOR q IN SELECT m.queue_name FROM pgmq.meta m
             WHERE p_queue_name IS NULL OR m.queue_name = p_queue_name
             ORDER BY m.queue_name LOOP
        RETURN QUERY EXECUTE format(
            'SELECT %L::text, a.msg_id, a.read_ct, a.enqueued_at, a.archived_at, a.message'
            ' FROM pgmq.%I a ORDER BY a.archived_at DESC', q, 'a_' || q);
    END LOOP;
END;
$$;

-- Sends an archived message back to its queue as a new message (attempts start again), removes
-- it from the archive, and sets the row it concerns back to waiting. Returns the new msg_id,
-- or NULL when the row needs no new job: a thread already completed, or one that still has a
-- live job (queued or mid-sync) never gets a second one.
CREATE OR REPLACE FUNCTION nova_replay_dead_letter(p_queue_name text, p_msg_id bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_message jsonb;
    v_new_id  bigint;
    v_thread  queued_threads;
BEGIN
    PERFORM nova_require_queue(p_queue_name);
    EXECUTE format('DELETE FROM pgmq.%I WHERE msg_id = $1 RETURNING message', 'a_' || p_queue_name)
        INTO v_message USING p_msg_id;
    IF v_message IS NULL THEN
        RAISE EXCEPTION 'nova_replay_dead_letter: no archived message % in %', p_msg_id, p_queue_name
            USING ERRCODE = 'no_data_found';
    END IF;
    IF p_queue_name = 'nylas_webhook_notifications' THEN
        UPDATE flux_webhook_notifications
        SET status = 'pending', error_message = NULL, processed_at = NULL
        WHERE id = (v_message ->> 'notification_id')::uuid AND status = 'error';
    ELSIF p_queue_name = 'thread_sync_jobs' THEN
        SELECT * INTO v_thread FROM queued_threads
        WHERE id = (v_message ->> 'queued_thread_id')::bigint FOR UPDATE;
        IF FOUND AND (v_thread.status = 'completed'
                      OR (v_thread.status IN ('queued', 'processing')
                          AND EXISTS (SELECT 1 FROM pgmq.q_thread_sync_jobs m
                                      WHERE m.msg_id = v_thread.queue_msg_id))) THEN
            RETURN NULL;
        END IF;
        IF FOUND THEN
            UPDATE queued_threads
            SET status = 'queued', error_message = NULL, attempts = 0, processed_at = NULL
            WHERE id = v_thread.id;
        END IF;
    ELSIF p_queue_name = 'inbox_backfill_jobs' THEN
        -- The configuration failed with this job: set it running again, from its checkpoint,
        -- as resume_inbox_backfill does, or the job would find it failed and do nothing.
        UPDATE flux_inbox_configurations
        SET backfill_status = CASE WHEN discovery_completed_at IS NOT NULL THEN 'thread_sync'
                                   WHEN checkpoint_pages_done > 0 THEN 'discovering'
                                   ELSE 'queued' END,
            backfill_attempts = 0, last_error = NULL, backfill_completed_at = NULL,
            updated_at = now()
        WHERE id = (v_message ->> 'config_id')::uuid AND backfill_status = 'failed';
    END IF;
    SELECT * INTO v_new_id FROM pgmq.send(p_queue_name, v_message);
    IF p_queue_name = 'thread_sync_jobs' THEN
        UPDATE queued_threads SET queue_msg_id = v_new_id
        WHERE id = (v_message ->> 'queued_thread_id')::bigint;
    END IF;
    RETURN v_new_id;
END;
$$;
