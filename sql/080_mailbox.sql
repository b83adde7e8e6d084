-- Threads are what their messages say: the summary columns of a thread row are derived from
-- its stored messages after every message write (thread sync and webhooks alike), so a reply
-- that arrives as message.created alone keeps its thread current without asking the provider,
-- and a message for a thread never seen before leaves a real thread row, not an empty stub.
-- A thread whose every stored message is deleted is deleted; a new message brings it back.
-- Threads with no message row at all keep what the provider said. Returns the threads updated.
--
-- The thread rows are locked first (in id order) and the messages read after, in a statement of
-- their own: two transactions writing messages of one thread at once then derive in turn, and
-- the second sees the first's messages. Writers lock the thread before its messages (store.py),
-- so this order never deadlocks with them.
CREATE OR REPLACE FUNCTION nova_refresh_threads(p_thread_ids uuid[])
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM 1 FROM flux_email_threads WHERE id = ANY (p_thread_ids) ORDER BY id FOR UPDATE;
    WITH live AS (
        SELECT m.* FROM flux_email_messages m
        WHERE m.thread_id = ANY (p_thread_ids) AND m.deleted_at IS NULL
    ), agg AS (
        SELECT t.id AS thread_id,
               count(l.id) AS live,
               min(l.sent_at) AS first_at,
               max(l.sent_at) AS last_at,
               coalesce(bool_or(l.unread), false) AS unread,
               coalesce(bool_or(l.starred), false) AS starred,
               coalesce(bool_or(l.has_attachments), false) AS has_attachments,
               (array_agg(l.snippet ORDER BY l.sent_at DESC NULLS LAST, l.provider_message_id DESC)
                    FILTER (WHERE l.snippet IS NOT NULL))[1] AS snippet,
               (array_agg(l.subject ORDER BY l.sent_at NULLS LAST, l.provider_message_id)
                    FILTER (WHERE l.subject IS NOT NULL))[1] AS subject
        FROM unnest(p_thread_ids) AS t(id)
        LEFT JOIN live l ON l.thread_id = t.id
        WHERE EXISTS (SELECT 1 FROM flux_email_messages m WHERE m.thread_id = t.id)
        GROUP BY t.id
    ), people AS (
        SELECT p.thread_id, jsonb_agg(p.person ORDER BY p.first_at, p.email) AS participants
        FROM (
            SELECT DISTINCT ON (l.thread_id, lower(e.person ->> 'email'))
                   l.thread_id, e.person, lower(e.person ->> 'email') AS email,
                   l.sent_at AS first_at
            FROM live l
            CROSS JOIN LATERAL jsonb_array_elements(
                l.from_addresses || l.to_addresses || l.cc_addresses) AS e(person)
            WHERE e.person ->> 'email' IS NOT NULL
            ORDER BY l.thread_id, lower(e.person ->> 'email'), l.sent_at NULLS LAST
        ) p
        GROUP BY p.thread_id
    ), folders AS (
        SELECT l.thread_id, array_agg(DISTINCT f ORDER BY f) AS folders
        FROM live l CROSS JOIN LATERAL unnest(l.folders) AS f
        GROUP BY l.thread_id
    ), updated AS (
        UPDATE flux_email_threads t
        SET message_count = a.live, first_message_at = a.first_at, last_message_at = a.last_at,
            unread = a.unread, starred = a.starred, has_attachments = a.has_attachments,
            snippet = coalesce(a.snippet, t.snippet), subject = coalesce(t.subject, a.subject),
            participants = coalesce(p.participants, '[]'::jsonb),
            folders = coalesce(f.folders, '{}'::text[]),
            deleted_at = CASE WHEN a.live = 0 THEN coalesce(t.deleted_at, now()) END,
            updated_at = now()
        FROM agg a
        LEFT JOIN people p ON p.thread_id = a.thread_id
        LEFT JOIN folders f ON f.thread_id = a.thread_id
        WHERE t.id = a.thread_id
        RETURNING t.id
    )
    SELECT count(*)::integer INTO v_count FROM updated;
    RETURN v_count;
END;
$$;
