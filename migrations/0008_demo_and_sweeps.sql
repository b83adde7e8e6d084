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

-- A Gmail history expiry met a running backfill whose listing may be past the gap's mail: the
-- resync is owed, and queued as soon as that backfill ends (nova_follow_resyncs).
ALTER TABLE flux_inboxes ADD COLUMN resync_requested_at timestamptz;
CREATE INDEX flux_inboxes_resync_idx ON flux_inboxes (resync_requested_at)
    WHERE resync_requested_at IS NOT NULL;
