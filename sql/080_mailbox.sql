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
--
-- Plans: each thread is derived by statements that find its rows by its id alone (the primary
-- key, the thread index of messages), so the plan, generic or custom, is the same index scan
-- whatever the mailbox's size, and even one planned while the tables were nearly empty; forcing
-- the generic plan saves planning the statements again on every call.
CREATE OR REPLACE FUNCTION nova_refresh_threads(p_thread_ids uuid[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_ids uuid[];
    v_id uuid;
    v_count integer := 0;
BEGIN
    SELECT array_agg(DISTINCT u ORDER BY u) INTO v_ids
    FROM unnest(p_thread_ids) AS u WHERE u IS NOT NULL;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    FOREACH v_id IN ARRAY v_ids LOOP
        PERFORM 1 FROM flux_email_threads WHERE id = v_id FOR UPDATE;
    END LOOP;
    FOREACH v_id IN ARRAY v_ids LOOP
        -- A thread with no message row at all keeps what the provider said.
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM flux_email_messages m WHERE m.thread_id = v_id);
        UPDATE flux_email_threads t
        SET message_count = a.live, first_message_at = a.first_at, last_message_at = a.last_at,
            unread = a.unread, starred = a.starred, has_attachments = a.has_attachments,
            snippet = coalesce(a.snippet, t.snippet), subject = coalesce(t.subject, a.subject),
            participants = coalesce(p.participants, '[]'::jsonb),
            folders = coalesce(f.folders, '{}'::text[]),
            deleted_at = CASE WHEN a.live = 0 THEN coalesce(t.deleted_at, now()) END,
            updated_at = now()
        FROM (
            SELECT count(*) AS live,
                   min(l.sent_at) AS first_at,
                   max(l.sent_at) AS last_at,
                   coalesce(bool_or(l.unread), false) AS unread,
                   coalesce(bool_or(l.starred), false) AS starred,
                   coalesce(bool_or(l.has_attachments), false) AS has_attachments,
                   (array_agg(l.snippet ORDER BY l.sent_at DESC NULLS LAST,
                              l.provider_message_id DESC)
                        FILTER (WHERE l.snippet IS NOT NULL))[1] AS snippet,
                   (array_agg(l.subject ORDER BY l.sent_at NULLS LAST, l.provider_message_id)
                        FILTER (WHERE l.subject IS NOT NULL))[1] AS subject
            FROM flux_email_messages l
            WHERE l.thread_id = v_id AND l.deleted_at IS NULL
        ) a, (
            SELECT jsonb_agg(q.person ORDER BY q.first_at, q.email) AS participants
            FROM (
                SELECT DISTINCT ON (lower(e.person ->> 'email'))
                       e.person, lower(e.person ->> 'email') AS email, l.sent_at AS first_at
                FROM flux_email_messages l
                CROSS JOIN LATERAL jsonb_array_elements(
                    l.from_addresses || l.to_addresses || l.cc_addresses) AS e(person)
                WHERE l.thread_id = v_id AND l.deleted_at IS NULL
                  AND e.person ->> 'email' IS NOT NULL
                ORDER BY lower(e.person ->> 'email'), l.sent_at NULLS LAST
            ) q
        ) p, (
            SELECT array_agg(DISTINCT x ORDER BY x) AS folders
            FROM flux_email_messages l CROSS JOIN LATERAL unnest(l.folders) AS x
            WHERE l.thread_id = v_id AND l.deleted_at IS NULL
        ) f
        WHERE t.id = v_id;
        IF FOUND THEN
            v_count := v_count + 1;
        END IF;
    END LOOP;
    RETURN v_count;
END;
$$;

-- The lock every message writer takes first (the lock order, sql/030_backfill.sql): the thread
-- rows it writes into, given by (inbox, provider thread id), and the threads its messages are
-- stored under now, given by (inbox, provider message id), together in id order. A message that
-- moves leaves a thread that must be derived again; locked only then, after the messages were
-- written, two writers moving messages across each other's threads each held one thread and
-- waited for the other's. (A message that moves again between this lock and the write leaves
-- a thread the derivation locks late: the same race as before, now needing a third writer.)
-- Missing thread rows are inserted by the caller before. Returns the locked rows.
CREATE OR REPLACE FUNCTION nova_lock_threads(p_inboxes uuid[], p_threads text[],
                                             p_message_inboxes uuid[], p_messages text[])
RETURNS TABLE (id uuid, inbox_id uuid, provider_thread_id text)
LANGUAGE plpgsql AS $$
BEGIN
    -- (plpgsql: the statement is planned once per session. Each message is one probe by its
    -- whole unique key: with `= ANY`, a generic plan read every message of the inbox.)
    RETURN QUERY
    SELECT t.id, t.inbox_id, t.provider_thread_id
    FROM flux_email_threads t
    WHERE t.id IN (
        SELECT w.id FROM unnest(p_inboxes, p_threads) AS x(i, tid)
        JOIN flux_email_threads w ON w.inbox_id = x.i AND w.provider_thread_id = x.tid
        UNION
        SELECT s.thread_id FROM unnest(p_message_inboxes, p_messages) AS y(i, mid)
        CROSS JOIN LATERAL (SELECT m.thread_id FROM flux_email_messages m
                            WHERE m.inbox_id = y.i AND m.provider_message_id = y.mid
                            OFFSET 0) s
        WHERE s.thread_id IS NOT NULL)
    ORDER BY t.id
    FOR UPDATE OF t;
END;
$$;

-- A thread sync's whole write, in one call (one round trip), in the one lock order: the thread
-- row (created when missing), its messages and their attachment rows, the stored messages the
-- provider no longer lists soft-deleted, the thread (and any thread a message moved from)
-- derived again, then the queued thread completed. When the queued thread names a newer job by
-- then (COMPLETE finds nothing), every write of this call is rolled back and it returns false.
--
-- p_messages are complete messages (an API answer, not a partial webhook payload), as rows of
-- store.py; a field the answer did not carry (body, headers, body_cleaned: both body columns
-- NULL, or NULL) keeps the stored value, as `store.upsert_messages` does. Versions as there:
-- a message stored with a newer version is left alone, and only messages older than the sync
-- are deleted for their absence.
--
-- Every statement finds its rows by a unique key or the thread's id, never by the inbox alone:
-- the generic plan (forced: no planning per call) costs the same in a mailbox of 20 threads as
-- of 100,000.
CREATE OR REPLACE FUNCTION nova_write_synced_thread(
    p_inbox_id uuid, p_thread text, p_messages jsonb, p_message_ids text[],
    p_version timestamptz, p_queued_id bigint, p_msg_id bigint)
RETURNS boolean
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_thread uuid;
    v_left uuid[] := '{}';
    v_mid text;
    v_old uuid;
BEGIN
    -- The thread, created when missing; then it and the threads the messages are stored under
    -- now, locked in id order, before any message is written (nova_lock_threads).
    INSERT INTO flux_email_threads (inbox_id, provider_thread_id)
    SELECT p_inbox_id, p_thread
    WHERE NOT EXISTS (SELECT 1 FROM flux_email_threads
                      WHERE inbox_id = p_inbox_id AND provider_thread_id = p_thread)
    ON CONFLICT (inbox_id, provider_thread_id) DO NOTHING;
    SELECT l.id INTO v_thread
    FROM nova_lock_threads(ARRAY[p_inbox_id], ARRAY[p_thread],
                           array_fill(p_inbox_id, ARRAY[cardinality(p_message_ids)]),
                           p_message_ids) l
    WHERE l.provider_thread_id = p_thread AND l.inbox_id = p_inbox_id;

    -- A message stored under another thread moves here: that thread is derived again too
    -- (looked up again now that the threads are locked). One lookup per message by its whole
    -- unique key: with `= ANY (array)` the generic plan preferred the (inbox_id,
    -- provider_thread_id) index and read every message of the inbox.
    FOREACH v_mid IN ARRAY p_message_ids LOOP
        SELECT m.thread_id INTO v_old FROM flux_email_messages m
        WHERE m.inbox_id = p_inbox_id AND m.provider_message_id = v_mid;
        IF v_old <> v_thread THEN
            v_left := array_append(v_left, v_old);
        END IF;
    END LOOP;

    WITH x AS (
        SELECT * FROM jsonb_to_recordset(p_messages) AS x(
            provider_message_id text, provider_thread_id text, subject text, snippet text,
            from_addresses jsonb, to_addresses jsonb, cc_addresses jsonb, bcc_addresses jsonb,
            reply_to jsonb, sent_at timestamptz, body_html text, body_text text,
            body_cleaned text, folders text[], unread boolean, starred boolean,
            has_attachments boolean, headers jsonb, raw jsonb, attachments jsonb)
    ), m AS (
        INSERT INTO flux_email_messages AS m
            (inbox_id, provider_message_id, provider_updated_at, raw, deleted_at, thread_id,
             provider_thread_id, subject, snippet, from_addresses, to_addresses, cc_addresses,
             bcc_addresses, reply_to, sent_at, body_html, body_text, body_cleaned, folders,
             unread, starred, has_attachments, headers)
        SELECT p_inbox_id, x.provider_message_id, p_version, x.raw, NULL,
               CASE WHEN x.provider_thread_id = p_thread THEN v_thread END,
               x.provider_thread_id, x.subject, x.snippet, x.from_addresses, x.to_addresses,
               x.cc_addresses, x.bcc_addresses, x.reply_to, x.sent_at, x.body_html,
               x.body_text, x.body_cleaned, x.folders, x.unread, x.starred,
               x.has_attachments, x.headers
        FROM x
        ON CONFLICT (inbox_id, provider_message_id) DO UPDATE
        SET provider_updated_at = EXCLUDED.provider_updated_at, raw = EXCLUDED.raw,
            deleted_at = NULL, updated_at = now(), thread_id = EXCLUDED.thread_id,
            provider_thread_id = EXCLUDED.provider_thread_id, subject = EXCLUDED.subject,
            snippet = EXCLUDED.snippet, from_addresses = EXCLUDED.from_addresses,
            to_addresses = EXCLUDED.to_addresses, cc_addresses = EXCLUDED.cc_addresses,
            bcc_addresses = EXCLUDED.bcc_addresses, reply_to = EXCLUDED.reply_to,
            sent_at = EXCLUDED.sent_at,
            body_html = CASE WHEN EXCLUDED.body_html IS NULL AND EXCLUDED.body_text IS NULL
                             THEN m.body_html ELSE EXCLUDED.body_html END,
            body_text = coalesce(EXCLUDED.body_text,
                                 CASE WHEN EXCLUDED.body_html IS NULL THEN m.body_text END),
            body_cleaned = coalesce(EXCLUDED.body_cleaned, m.body_cleaned),
            folders = EXCLUDED.folders, unread = EXCLUDED.unread, starred = EXCLUDED.starred,
            has_attachments = EXCLUDED.has_attachments,
            headers = coalesce(EXCLUDED.headers, m.headers)
        WHERE m.provider_updated_at IS NULL OR m.provider_updated_at <= EXCLUDED.provider_updated_at
        RETURNING m.id, m.provider_message_id
    )
    INSERT INTO flux_email_attachments AS a
        (inbox_id, message_id, provider_attachment_id, provider_message_id, original_filename,
         original_url, content_type, content_id, is_inline, size)
    SELECT p_inbox_id, m.id, y.id, m.provider_message_id, y.filename, y.url, y.content_type,
           y.content_id, coalesce(y.is_inline, false), y.size
    FROM m JOIN x ON x.provider_message_id = m.provider_message_id
    CROSS JOIN LATERAL jsonb_to_recordset(x.attachments) AS y(
        id text, filename text, url text, content_type text, content_id text,
        is_inline boolean, size bigint)
    ON CONFLICT (message_id, provider_attachment_id) DO UPDATE
    SET original_filename = EXCLUDED.original_filename, original_url = EXCLUDED.original_url,
        content_type = EXCLUDED.content_type, content_id = EXCLUDED.content_id,
        is_inline = EXCLUDED.is_inline,
        -- the downloader's measured size wins over the provider's announced one
        size = CASE WHEN a.status = 'completed' THEN a.size ELSE EXCLUDED.size END,
        deleted_at = NULL, updated_at = now();

    -- Deleted at the provider: stored messages of the thread it no longer lists, older than
    -- the sync (one written since, by a webhook about newer mail, is kept).
    UPDATE flux_email_messages m
    SET deleted_at = now(), provider_updated_at = p_version, updated_at = now()
    WHERE m.thread_id = v_thread AND m.deleted_at IS NULL
      AND m.provider_message_id <> ALL (p_message_ids)
      AND (m.provider_updated_at IS NULL OR m.provider_updated_at < p_version);

    PERFORM nova_refresh_threads(array_append(v_left, v_thread));

    UPDATE queued_threads
    SET status = 'completed', message_count = cardinality(p_message_ids),
        processed_at = now(), error_message = NULL, retry_at = NULL
    WHERE id = p_queued_id AND queue_msg_id = p_msg_id AND status = 'processing';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'superseded' USING ERRCODE = 'NV001';
    END IF;
    RETURN true;
EXCEPTION WHEN SQLSTATE 'NV001' THEN
    RETURN false;  -- a newer job owns the thread: this call's writes are rolled back
END;
$$;
