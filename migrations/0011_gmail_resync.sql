-- Gmail without gaps (sql/120_gmail_resync.sql). A history expiry (404) marks the inbox's
-- configuration: the first full, open-ended backfill queued at or after that moment (the
-- resync) lists the whole mailbox as it is, and what it did not list, unchanged since, is gone
-- at Gmail and soft-deleted (nova_prune_unlisted_threads). Cleared once that is done.
ALTER TABLE flux_inbox_configurations ADD COLUMN history_expired_at timestamptz;

-- When the last history pass that reached the end of the feed started (nova.changes): the
-- prune waits for a pass that started after the listing ended, so a thread that moved under
-- the listing (a reply took it to the first page, already read) is stored with a newer
-- version by then, and kept.
ALTER TABLE flux_inboxes ADD COLUMN history_pass_started_at timestamptz;
