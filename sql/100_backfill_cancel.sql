-- An operator's stop of a running backfill (`nova backfill cancel`).

-- The configuration becomes 'failed' with last_error 'cancelled by an operator', its checkpoint
-- kept: `nova backfill resume` (resume_inbox_backfill) continues it, `nova backfill start`
-- replaces it, and no repair of the completion monitor touches it meanwhile (they act on
-- running backfills only). Its queued jobs, discovery and thread syncs, are deleted in the same
-- transaction; a worker holding one loses its lease and commits nothing. A job whose message
-- is locked at this moment (it is committing, or its lease is being renewed) is skipped rather
-- than waited for: waiting could deadlock with that job's transaction, and such a job either
-- finishes its one thread or, for discovery, finds the backfill no longer running and stops.
-- Threads keep their status, so a resume re-queues whatever still waits.
CREATE OR REPLACE FUNCTION nova_cancel_backfill(p_config_id uuid)
RETURNS TABLE (backfill_jobs bigint, thread_jobs bigint, threads_open bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config   flux_inbox_configurations;
    v_backfill bigint;
    v_threads  bigint;
BEGIN
    v_config := nova_lock_config(p_config_id);
    IF v_config.backfill_status NOT IN ('queued', 'discovering', 'thread_sync') THEN
        RAISE EXCEPTION 'nova_cancel_backfill: configuration % is %, not running',
            p_config_id, v_config.backfill_status USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE flux_inbox_configurations
    SET backfill_status = 'failed', last_error = 'cancelled by an operator', updated_at = now()
    WHERE id = p_config_id;
    WITH gone AS (
        DELETE FROM pgmq.q_inbox_backfill_jobs
        WHERE msg_id IN (SELECT m.msg_id FROM pgmq.q_inbox_backfill_jobs m
                         WHERE m.message->>'config_id' = p_config_id::text
                         FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*) INTO v_backfill FROM gone;
    WITH gone AS (
        DELETE FROM pgmq.q_thread_sync_jobs
        WHERE msg_id IN (SELECT m.msg_id FROM pgmq.q_thread_sync_jobs m
                         WHERE m.message->>'config_id' = p_config_id::text
                         FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*) INTO v_threads FROM gone;
    RETURN QUERY
    SELECT v_backfill, v_threads,
           (SELECT count(*) FROM queued_threads q
            WHERE q.config_id = p_config_id AND q.status IN ('queued', 'processing'));
END;
$$;
