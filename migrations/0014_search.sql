-- Search (issue 20, item 4): what search_messages (sql/130_search.sql) reads. A message write
-- only queues the message (a trigger in sql/130_search.sql); its search row is built later in
-- batches (nova_search_index_pending, from the completion monitor), off the write path. No
-- writer of messages or attachments changes.

-- The text search configuration of every stored search vector and of every query. 'simple' by
-- default: mail is multilingual and 'simple' neither stems nor drops stop words in any
-- language. One row. The configuration is kept as text, not regconfig: pg_upgrade refuses
-- tables with reg* columns. A change goes through nova_search_set_config, which rewinds the
-- rebuild cursors; nova_search_rebuild (`nova search --reindex`) walks them to the end.
CREATE TABLE nova_search_settings (
    id                       boolean PRIMARY KEY DEFAULT true CHECK (id),
    config                   text NOT NULL DEFAULT 'simple',
    -- rows with an id above these still carry vectors of an older configuration (or none:
    -- mail stored before this migration); NULL when nothing is left to rebuild
    rebuild_messages_after   uuid,
    rebuild_attachments_after uuid,
    rebuild_started_at       timestamptz,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
INSERT INTO nova_search_settings (config, rebuild_messages_after, rebuild_attachments_after,
                                  rebuild_started_at)
SELECT 'simple',
       CASE WHEN EXISTS (SELECT 1 FROM flux_email_messages)
            THEN '00000000-0000-0000-0000-000000000000'::uuid END,
       CASE WHEN EXISTS (SELECT 1 FROM flux_email_attachments)
            THEN '00000000-0000-0000-0000-000000000000'::uuid END,
       CASE WHEN EXISTS (SELECT 1 FROM flux_email_messages) THEN now() END;

-- A message's search document, in a table of its own: subject (A), sender and recipients (B),
-- body (C) in tsv; in addr the tokens of each address field, prefixed by the field (f: from,
-- t: to, c: cc, b: bcc), for from:/to:/cc:/bcc:. Not columns of flux_email_messages: a message
-- row is rewritten at every sync of its thread and at every flag change, and such an update
-- (rarely HOT: a message with its bodies fills a page) would insert the whole vector into the
-- GIN index again each time. Here the row is written only when the searched text changes.
CREATE TABLE flux_email_message_search (
    message_id uuid PRIMARY KEY REFERENCES flux_email_messages (id) ON DELETE CASCADE,
    tsv        tsvector NOT NULL,
    addr       text[] NOT NULL
);
-- A larger sample keeps more lexemes (and addresses) in the statistics: the estimate of a
-- word missing from them is then low enough that the planner takes the GIN index for a rare
-- word instead of walking the inbox newest first (at 40,000 messages: 1.6 ms instead of 450).
ALTER TABLE flux_email_message_search ALTER COLUMN tsv SET STATISTICS 1000,
                                      ALTER COLUMN addr SET STATISTICS 1000;
CREATE INDEX flux_email_message_search_tsv_idx ON flux_email_message_search USING gin (tsv);
CREATE INDEX flux_email_message_search_addr_idx ON flux_email_message_search USING gin (addr);
-- Messages whose search row is missing or stale: queued by the message triggers (a new
-- message, a changed text), taken and deleted by nova_search_index_pending in batches. Small
-- (what the last monitor checks did not reach yet). No foreign key: a queue row costs the
-- write one index insert and nothing else; a message deleted meanwhile just leaves the queue.
CREATE TABLE flux_email_search_pending (
    message_id uuid PRIMARY KEY,
    queued_at  timestamptz NOT NULL DEFAULT now()
);
-- An attachment's file name (A) and extracted text (D). Kept on the attachment row, not folded
-- into its message's vector: the attachment processor writes text later, and updating the
-- message from there would lock a message after an attachment, against the lock order.
ALTER TABLE flux_email_attachments ADD COLUMN search_tsv tsvector;
ALTER TABLE flux_email_attachments ALTER COLUMN search_tsv SET STATISTICS 1000;

-- Deleted mail never matches: search_messages reads live messages only (these indexes hold
-- nothing else).
CREATE INDEX flux_email_messages_search_folders_idx ON flux_email_messages
    USING gin (folders) WHERE deleted_at IS NULL;
-- Newest first within an inbox, dates (after:, before:, newer_than:) and the paging cursor. A
-- message without a date of its own sorts by when Nova stored it.
CREATE INDEX flux_email_messages_search_date_idx ON flux_email_messages
    (inbox_id, (coalesce(sent_at, created_at)) DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX flux_email_attachments_search_tsv_idx ON flux_email_attachments
    USING gin (search_tsv) WHERE deleted_at IS NULL;
