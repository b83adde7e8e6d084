-- Search at scale (issue 20, Must-show: 1,000,000 messages in one inbox).
--
-- 1. A message's inbox and sort date (coalesce(sent_at, created_at), what search_messages
--    orders by) are copied into its search row, with an index in result order. A search then
--    reads one table newest first: the inbox's rows are walked in date order, or a GIN match
--    is cut to a date window (a BitmapAnd of two indexes of this one table), instead of
--    joining every match to flux_email_messages and sorting them all.
-- 2. An attachment's file name and text go into its message's vector (weight D; its file name
--    parts also into addr as 'n:' tokens, for filename:) instead of a vector of its own, found
--    by a second GIN lookup whose message ids were passed to the query as an array (66,667 ids
--    for a word in a third of the file names). An attachment write queues its attachment in
--    flux_email_search_pending_attachments (keyed by the attachment, not the message: the
--    attachment processor holds the attachment row, a thread sync holds the message's queue
--    row and then the attachment rows; one queue row per message would let the two wait on
--    each other); nova_search_index_pending rebuilds the attachment's message.
-- The search functions, triggers and the index step are in sql/130_search.sql.
ALTER TABLE flux_email_message_search
    ADD COLUMN inbox_id uuid,
    ADD COLUMN sort_at  timestamptz;
UPDATE flux_email_message_search s
SET inbox_id = m.inbox_id, sort_at = coalesce(m.sent_at, m.created_at)
FROM flux_email_messages m
WHERE m.id = s.message_id;
ALTER TABLE flux_email_message_search
    ALTER COLUMN inbox_id SET NOT NULL,
    ALTER COLUMN sort_at SET NOT NULL;
CREATE INDEX flux_email_message_search_order_idx ON flux_email_message_search
    (inbox_id, sort_at DESC, message_id DESC);

CREATE TABLE flux_email_search_pending_attachments (
    attachment_id uuid PRIMARY KEY,
    message_id    uuid NOT NULL,
    queued_at     timestamptz NOT NULL DEFAULT now()
);
-- The index step takes the oldest queue rows by these indexes. It took "any 500" by reading the
-- table from its start: a queue that held a backfill's million messages keeps their emptied
-- pages, and every later batch read them all (23 ms a batch, even for one new message).
CREATE INDEX flux_email_search_pending_queued_idx ON flux_email_search_pending (queued_at);
CREATE INDEX flux_email_search_pending_attachments_queued_idx
    ON flux_email_search_pending_attachments (queued_at);

-- The attachments' own vectors are gone: their triggers (replaced in sql/130_search.sql), the
-- index and the column. Messages with an attachment are indexed again, so that their vectors
-- take in the attachments' names and text (by the completion monitor, 500 a check; until then
-- such a message is found by its own text only).
DROP TRIGGER IF EXISTS flux_email_attachments_search_insert ON flux_email_attachments;
DROP TRIGGER IF EXISTS flux_email_attachments_search_update ON flux_email_attachments;
DROP FUNCTION IF EXISTS flux_email_attachments_search();
DROP FUNCTION IF EXISTS nova_search_attachment_tsv(regconfig, text, text);
DROP FUNCTION IF EXISTS nova_search_message_row(regconfig, flux_email_messages);
DROP INDEX IF EXISTS flux_email_attachments_search_tsv_idx;
ALTER TABLE flux_email_attachments DROP COLUMN IF EXISTS search_tsv;
INSERT INTO flux_email_search_pending (message_id)
SELECT DISTINCT a.message_id FROM flux_email_attachments a
ON CONFLICT (message_id) DO NOTHING;
-- (rebuild_attachments_after of nova_search_settings is no longer used: nothing to rebuild)
UPDATE nova_search_settings SET rebuild_attachments_after = NULL;
