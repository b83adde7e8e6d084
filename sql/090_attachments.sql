-- Attachment downloads: every stored attachment row gets a job on attachment_downloads in the
-- transaction that stores it; a row set back to pending (the Missive repair statements, a
-- replay) gets one when it has none; repairs for rows whose job is gone; the Missive view.

-- The message of a download job.
CREATE OR REPLACE FUNCTION nova_attachment_job(p_attachment_id uuid, p_inbox_id uuid)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('attachment_id', p_attachment_id, 'inbox_id', p_inbox_id);
$$;

-- One pgmq.send_batch per statement: a thread sync writes all its messages' attachments in one
-- INSERT ... ON CONFLICT DO UPDATE, and the transition table holds only the rows it inserted,
-- so a row written again (a webhook repeating a message) is never queued twice.
CREATE OR REPLACE FUNCTION flux_email_attachments_enqueue()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_jobs jsonb[];
BEGIN
    SELECT array_agg(nova_attachment_job(n.id, n.inbox_id) ORDER BY n.created_at, n.id)
    INTO v_jobs FROM new_attachments n WHERE n.status = 'pending';
    IF v_jobs IS NOT NULL THEN  -- pgmq.send_batch rejects an empty batch
        PERFORM pgmq.send_batch('attachment_downloads', v_jobs);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_attachments_enqueue
    AFTER INSERT ON flux_email_attachments
    REFERENCING NEW TABLE AS new_attachments
    FOR EACH STATEMENT EXECUTE FUNCTION flux_email_attachments_enqueue();

-- A row set back to pending (the Missive stuck and failed resets, through the view or not; an
-- operator re-queueing skipped rows) gets a job, unless the job that last took it is still in
-- the queue: a job waiting for its retry also leaves the row pending, and must stay the only one.
CREATE OR REPLACE FUNCTION flux_email_attachments_requeue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.claim_msg_id IS NOT NULL
       AND EXISTS (SELECT 1 FROM pgmq.q_attachment_downloads q WHERE q.msg_id = NEW.claim_msg_id) THEN
        RETURN NULL;
    END IF;
    PERFORM pgmq.send('attachment_downloads', nova_attachment_job(NEW.id, NEW.inbox_id));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_attachments_requeue
    AFTER UPDATE OF status ON flux_email_attachments
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending')
    EXECUTE FUNCTION flux_email_attachments_requeue();

-- Rows stuck in downloading (their consumer died and its job is gone, or it hangs): back to
-- pending, which queues them again when their job is gone (the trigger above). A running
-- download touches updated_at as it goes, so only a download that stopped moving is stuck.
CREATE OR REPLACE FUNCTION nova_reset_stuck_attachments(p_after interval)
RETURNS TABLE (attachment_id uuid, stuck_since timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_after IS NULL OR p_after < interval '0' THEN
        RAISE EXCEPTION 'nova_reset_stuck_attachments: a non-negative age is required, got %', p_after
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH stuck AS (
        SELECT a.id, a.updated_at FROM flux_email_attachments a
        WHERE a.status = 'downloading' AND a.updated_at < now() - p_after
        ORDER BY a.updated_at
        FOR UPDATE SKIP LOCKED
    ), reset AS (
        UPDATE flux_email_attachments a SET status = 'pending', updated_at = now()
        FROM stuck s WHERE a.id = s.id
        RETURNING a.id
    )
    SELECT s.id, s.updated_at FROM stuck s JOIN reset r ON r.id = s.id;
END;
$$;

-- Pending rows that no job will ever take: parked while their inbox was not active, or whose
-- message was lost (a purged queue, rows stored while the trigger was disabled by a restore).
-- Queues a job for each whose inbox can be used now (or that needs no inbox: a plain URL);
-- with p_inbox_id, only that inbox's. A row with a job in the queue is never queued twice.
CREATE OR REPLACE FUNCTION nova_requeue_lost_attachments(p_inbox_id uuid DEFAULT NULL,
                                                         p_limit integer DEFAULT 10000)
RETURNS TABLE (attachment_id uuid, msg_id bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'nova_requeue_lost_attachments: p_limit must be >= 1, got %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH lost AS (
        SELECT a.id, a.inbox_id FROM flux_email_attachments a
        JOIN flux_inboxes i ON i.id = a.inbox_id
        WHERE a.status = 'pending' AND (p_inbox_id IS NULL OR a.inbox_id = p_inbox_id)
          AND ((i.status = 'active' AND i.deleted_at IS NULL) OR i.grant_id IS NULL)
          AND NOT EXISTS (SELECT 1 FROM pgmq.q_attachment_downloads q
                          WHERE q.message ->> 'attachment_id' = a.id::text)
        ORDER BY a.created_at, a.id
        LIMIT p_limit
    ), sent AS (
        SELECT l.id, s.msg_id
        FROM lost l
        CROSS JOIN LATERAL pgmq.send('attachment_downloads',
                                     nova_attachment_job(l.id, l.inbox_id)) AS s(msg_id)
    ), noted AS (
        UPDATE flux_email_attachments a SET claim_msg_id = s.msg_id
        FROM sent s WHERE a.id = s.id
        RETURNING a.id
    )
    SELECT s.id, s.msg_id FROM sent s JOIN noted n ON n.id = s.id;
END;
$$;

-- An inbox that becomes active again takes the downloads that waited for it, in the same
-- transaction (the consumer's periodic repair would find them too, later).
CREATE OR REPLACE FUNCTION flux_inboxes_attachments_resume()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- What the inbox's end failed comes back with it (nova_reactivate_inbox).
    UPDATE flux_email_attachments
    SET status = 'pending', error_message = NULL, retry_count = 0, updated_at = now()
    WHERE inbox_id = NEW.id AND status = 'failed'
      AND error_message IN ('inbox revoked: attachment not downloaded',
                            'inbox deleted: attachment not downloaded');
    PERFORM nova_requeue_lost_attachments(NEW.id, 1000000);
    RETURN NULL;
END;
$$;

-- An inbox that is revoked or deleted will not download again: its pending attachments (parked
-- while it was inactive, or waiting for a job) fail now, with why, instead of waiting for ever.
-- A download under way finds the inbox revoked at its next step. Reactivation undoes this.
CREATE OR REPLACE FUNCTION flux_inboxes_attachments_end()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flux_email_attachments
    SET status = 'failed', updated_at = now(),
        error_message = CASE WHEN NEW.deleted_at IS NOT NULL
                             THEN 'inbox deleted: attachment not downloaded'
                             ELSE 'inbox revoked: attachment not downloaded' END
    WHERE inbox_id = NEW.id AND status = 'pending';
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_inboxes_attachments_end
    AFTER UPDATE OF status, deleted_at ON flux_inboxes
    FOR EACH ROW
    WHEN ((NEW.status = 'revoked' AND OLD.status IS DISTINCT FROM 'revoked')
          OR (NEW.deleted_at IS NOT NULL AND OLD.deleted_at IS NULL))
    EXECUTE FUNCTION flux_inboxes_attachments_end();

CREATE OR REPLACE TRIGGER flux_inboxes_attachments_resume
    AFTER UPDATE OF status ON flux_inboxes
    FOR EACH ROW
    WHEN (NEW.status = 'active' AND OLD.status IS DISTINCT FROM 'active')
    EXECUTE FUNCTION flux_inboxes_attachments_resume();

-- The Missive attachment downloader's table, as a view: its monitoring and repair statements
-- run unchanged. Updates go through to flux_email_attachments (a simple view is updatable),
-- where the requeue trigger gives a row set back to pending its job.
CREATE OR REPLACE VIEW email_attachment_files AS
SELECT a.id                  AS missive_attachment_id,
       a.provider_message_id AS missive_message_id,
       a.original_filename,
       a.original_url,
       a.status,
       a.local_filename,
       a.retry_count,
       a.error_message,
       a.downloaded_at,
       a.created_at,
       a.updated_at,
       a.local_path,
       a.checksum,
       a.size,
       a.content_type,
       a.skipped_reason,
       a.inbox_id,
       a.message_id
FROM flux_email_attachments a;
