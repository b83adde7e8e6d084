-- Gmail resync fetches only threads that may differ (nova.gmail_resync, sql/120_gmail_resync.sql).
-- Before a resync lists its threads it lists the mailbox's messages (messages.list: id and
-- thread id); each page of threads is compared with the store against these rows, and a thread
-- whose listed historyId its last threads.get has reached and whose message ids equal its live
-- stored ones is recorded done without a request. Rows live from the listing to the end of
-- discovery.
CREATE TABLE gmail_resync_listed_messages (
    config_id           uuid NOT NULL REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    provider_thread_id  text NOT NULL,
    provider_message_id text NOT NULL,
    PRIMARY KEY (config_id, provider_thread_id, provider_message_id)
);

-- When that message listing was completed: it serves the backfill queued before it (the
-- configuration's discovery_cutoff), never a later one.
ALTER TABLE flux_inbox_configurations ADD COLUMN resync_messages_listed_at timestamptz;
