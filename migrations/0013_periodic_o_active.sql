-- Periodic work that costs what is active, not what is stored (issue #19, item 5): the indexes
-- the monitor's, the metrics' and the CLI's timed queries read, and the state the sweeps keep
-- between passes so that none of them walks history.

-- The Gmail push intake looks an inbox up by lower(grant_id) (sql/110_gmail_push.sql).
CREATE INDEX flux_inboxes_gmail_grant_lower_idx ON flux_inboxes (lower(grant_id))
    WHERE provider = 'gmail';

-- The fleet's last webhook of a provider, one index probe (queue_due_catchups: a catch-up
-- follows a silence of the whole intake, not a quiet inbox).
CREATE INDEX flux_webhook_notifications_provider_received_idx
    ON flux_webhook_notifications (provider, received_at DESC);

-- Threads still to sync (queued, or being synced): the stuck-thread sweep walks them in slices
-- by id, and the running backfills' open threads are found per configuration. Its size is the
-- open work, whatever the history.
CREATE INDEX queued_threads_open_idx ON queued_threads (id)
    WHERE status IN ('queued', 'processing');
CREATE INDEX queued_threads_open_config_idx ON queued_threads (config_id)
    WHERE status IN ('queued', 'processing') AND retry_at IS NULL;

-- Failed backfills, for the resume sweep (the active index covers only running ones).
CREATE INDEX flux_inbox_configurations_failed_idx ON flux_inbox_configurations (updated_at)
    WHERE backfill_status = 'failed' AND deleted_at IS NULL;

-- Gmail history polls and watch renewals: what is due, not every inbox.
CREATE INDEX flux_inboxes_gmail_poll_idx
    ON flux_inboxes ((greatest(coalesce(changes_synced_at, '-infinity'::timestamptz),
                               coalesce(changes_requested_at, '-infinity'::timestamptz))))
    WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL
      AND grant_id IS NOT NULL;
CREATE INDEX flux_inboxes_gmail_watch_idx ON flux_inboxes (watch_expires_at NULLS FIRST)
    WHERE provider = 'gmail' AND status = 'active' AND deleted_at IS NULL
      AND grant_id IS NOT NULL;
CREATE INDEX flux_inboxes_gmail_unwatch_idx ON flux_inboxes (id)
    WHERE provider = 'gmail' AND watch_expires_at IS NOT NULL
      AND (deleted_at IS NOT NULL OR status IN ('disabled', 'revoked'));

-- Retention (NOVA_RETENTION_DAYS): a completed backfill's per-thread rows are pruned once it
-- has been completed that long; threads_pruned_at says up to when, so the sweep never looks at
-- a backfill twice (a later backfill of the inbox completes later than the mark).
ALTER TABLE flux_inbox_configurations ADD COLUMN threads_pruned_at timestamptz;
CREATE INDEX flux_inbox_configurations_prunable_idx
    ON flux_inbox_configurations (backfill_completed_at)
    WHERE backfill_status = 'completed' AND deleted_at IS NULL
      AND (threads_pruned_at IS NULL OR threads_pruned_at < backfill_completed_at);

-- Where each sweep left off, and what retention pruned (shown by `nova queues`).
CREATE TABLE nova_monitor_state (
    name        text PRIMARY KEY,
    position    bigint NOT NULL DEFAULT 0,
    marked_at   timestamptz,
    since       timestamptz,
    total       bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
