-- The read contract (issue 20, item 6): the views an application reads Nova's mail through.
-- Their names, columns and types are pinned by tests/test_read_contract.py and listed in the
-- README ("Reading Nova's tables"); the flux_* tables under them are Nova's to change. A view
-- here only ever gains columns at its end (CREATE OR REPLACE VIEW allows nothing else); any
-- other change is a migration that drops and recreates it, with a note in the README's
-- contract section, never a silent edit of this file.
--
-- Every view shows live rows only: a message, thread or attachment deleted at the provider
-- leaves them (its message.deleted / thread.deleted event says so), so "absent" means deleted.

CREATE OR REPLACE VIEW nova_messages AS
SELECT m.id, m.inbox_id, m.thread_id, m.provider_message_id, m.provider_thread_id,
       m.subject, m.snippet, m.from_addresses, m.to_addresses, m.cc_addresses,
       m.bcc_addresses, m.reply_to, m.body_text, m.body_html, m.folders, m.unread,
       m.starred, m.has_attachments, m.sent_at, m.headers, m.created_at, m.updated_at
FROM flux_email_messages m
WHERE m.deleted_at IS NULL;

CREATE OR REPLACE VIEW nova_threads AS
SELECT t.id, t.inbox_id, t.provider_thread_id, t.subject, t.snippet, t.participants,
       t.folders, t.unread, t.starred, t.has_attachments, t.message_count,
       t.first_message_at, t.last_message_at, t.created_at, t.updated_at
FROM flux_email_threads t
WHERE t.deleted_at IS NULL;

-- One row per address of a live message: role 'from', 'to', 'cc', 'bcc' or 'reply_to', its
-- place in that list (from 1), the address as stored (the provider's spelling) and in lower
-- case for joins, and the display name when there is one.
CREATE OR REPLACE VIEW nova_participants AS
SELECT m.id AS message_id, m.inbox_id, m.thread_id, r.role, a.position::integer AS position,
       a.value ->> 'email' AS email, lower(a.value ->> 'email') AS email_lower,
       nullif(a.value ->> 'name', '') AS name
FROM flux_email_messages m
CROSS JOIN LATERAL (VALUES ('from', m.from_addresses), ('to', m.to_addresses),
                           ('cc', m.cc_addresses), ('bcc', m.bcc_addresses),
                           ('reply_to', m.reply_to)) AS r(role, addresses)
CROSS JOIN LATERAL jsonb_array_elements(
    CASE WHEN jsonb_typeof(r.addresses) = 'array' THEN r.addresses ELSE '[]'::jsonb END)
    WITH ORDINALITY AS a(value, position)
WHERE m.deleted_at IS NULL
  AND jsonb_typeof(a.value) = 'object'
  AND a.value ->> 'email' IS NOT NULL;

-- The attachments of live messages: file_path is where the file lies, relative to
-- NOVA_ATTACHMENT_PATH (YYYY-MM/name), once status is 'completed' (NULL before, and with
-- NOVA_ATTACHMENT_STORE=none); extracted_text is its text when the extractor could read it
-- (skipped_reason says why not).
CREATE OR REPLACE VIEW nova_attachments AS
SELECT a.id, a.message_id, a.inbox_id, a.provider_attachment_id,
       a.original_filename AS filename, a.content_type, a.size, a.is_inline, a.content_id,
       a.status, a.local_path AS file_path, a.checksum, a.extracted_text, a.skipped_reason,
       a.downloaded_at, a.created_at, a.updated_at
FROM flux_email_attachments a
JOIN flux_email_messages m ON m.id = a.message_id AND m.deleted_at IS NULL
WHERE a.deleted_at IS NULL;
