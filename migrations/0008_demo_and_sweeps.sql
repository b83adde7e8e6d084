-- Inboxes the demo (`python -m nova` with nothing configured, or NOVA_DEMO=1) registered for
-- its sandboxes. A demo refuses a database that holds any other inbox: its sandboxes must
-- never answer for a real grant.
ALTER TABLE flux_inboxes ADD COLUMN demo boolean NOT NULL DEFAULT false;

-- Sweeps that must cost what is open, not what is stored: inboxes expired (for the end of
-- their parked backfills), and an inbox's attachments still to fetch or failed by its end.
CREATE INDEX flux_inboxes_expired_idx ON flux_inboxes (auth_expired_at)
    WHERE status = 'auth_expired';
CREATE INDEX flux_email_attachments_open_idx ON flux_email_attachments (inbox_id)
    WHERE status IN ('pending', 'failed');
