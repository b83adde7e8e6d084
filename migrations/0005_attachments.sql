-- What the attachment consumer (nova.attachments) records beside the Missive downloader's
-- columns. The queueing triggers, the repairs and the Missive view live in sql/090_attachments.sql.

-- 'skipped': not downloaded, by a setting (downloads off, inline parts excluded, over the size
-- cap) or, in the ephemeral mode, because nothing could be extracted from it (too large);
-- skipped_reason says which. A completed download may carry a skipped_reason too: its text was
-- not extracted (too_large, encrypted, corrupt, timeout, unsupported_type ...).
ALTER TABLE flux_email_attachments DROP CONSTRAINT flux_email_attachments_status_check;
ALTER TABLE flux_email_attachments ADD CONSTRAINT flux_email_attachments_status_check
    CHECK (status IN ('pending', 'downloading', 'completed', 'failed', 'skipped'));

ALTER TABLE flux_email_attachments
    -- The file relative to NOVA_ATTACHMENT_PATH: YYYY-MM/{local_filename}.
    ADD COLUMN local_path text,
    -- The attachment_downloads message of the job that last took the row: a second job for
    -- the same row leaves it alone while that one runs, and a reset to pending queues a new
    -- job only when this one is gone.
    ADD COLUMN claim_msg_id bigint,
    -- How the text was extracted: pages, characters, truncation, charset, where it was read.
    ADD COLUMN metadata jsonb;
