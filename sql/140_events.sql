-- The change feed (issue 20, items 1-2; tables in migrations/0015_events.sql).
--
-- Writing. Every change Nova applies to the mailbox records an event in the same transaction:
-- the triggers below for messages, threads, inbox status and backfills, nova_record_event for
-- anything else (folders). A trigger records only what really changed (OLD against NEW on the
-- columns an app sees): an upsert that rewrites a row with the values it had (a replayed
-- webhook, a repeated thread sync, a redelivered job) records nothing.
--
-- Positions. An event is inserted without a position. At commit a deferred constraint trigger
-- (nova_events_number) locks the heads of the inboxes the transaction wrote events for, in
-- inbox id order, and numbers its events per inbox after the head's last position. The heads
-- are the last locks a transaction takes (no other deferred trigger exists), always in one
-- order, so they add no lock-order cycle; each is held from then to the end of the commit, so
-- the transactions writing events of one inbox commit one after another in position order:
-- a reader that sees position p sees every position below it, and reading `position > cursor`
-- never skips one that commits later. A transaction numbers its events once: every event
-- queues a firing, the first numbers them all and notes the highest id it numbered in a
-- transaction-local setting, so later firings return at once.
--
-- Reading. Consumers keep a cursor per inbox (nova_event_cursors); nova_events_read returns
-- the next events past them, nova_events_ack moves them. Events pruned by retention before a
-- consumer read them stop it with an error naming the consumer, the inbox and the range, until
-- nova_events_reset (`nova events reset CONSUMER`) moves it past them on an operator's word.
-- NOTIFY nova_events is a wake-up hint, once per committing transaction that wrote events.

-- --- writing --------------------------------------------------------------------------------

-- One event. Call it only when something really changed. Returns the event's id.
CREATE OR REPLACE FUNCTION nova_record_event(p_inbox uuid, p_kind text, p_object_id text,
                                             p_provider_id text, p_thread_id uuid,
                                             p_changes jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    -- plpgsql, not sql: its INSERT is planned once per session, not at every call.
    INSERT INTO nova_events (inbox_id, kind, object_id, provider_id, thread_id, changes)
    VALUES (p_inbox, p_kind, p_object_id, p_provider_id, p_thread_id,
            coalesce(p_changes, '{}'::jsonb))
    RETURNING id INTO v_id;
    RETURN v_id;
END;
$$;

-- Positions at commit (see the head of this file). Fires once per event; the first firing of
-- a transaction numbers every event it wrote, later ones return at once (an event written
-- after a firing, under SET CONSTRAINTS ... IMMEDIATE, has a higher id and is numbered by its
-- own firing).
CREATE OR REPLACE FUNCTION nova_events_number()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_done text := current_setting('nova.events_numbered', true);
    v_last bigint;
BEGIN
    IF v_done <> '' AND NEW.id <= v_done::bigint THEN  -- (only this function sets it)
        RETURN NULL;
    END IF;
    -- One statement. `heads` takes each inbox's head in inbox id order (its first event
    -- inserts it) and moves it past this transaction's events of the inbox; ON CONFLICT DO
    -- UPDATE locks the newest committed version of the row, whatever the statement's
    -- snapshot, so a transaction that waited for a head numbers after the one that held it.
    -- One pass in one order: waits (for a head's lock, or for another's uncommitted insert of
    -- it) happen in inbox id order in every transaction, so they make no cycle.
    WITH mine AS (
        SELECT e.inbox_id, count(*) AS n, min(e.occurred_at) AS first_at
        FROM nova_events e
        WHERE e.xid = pg_current_xact_id() AND e.position IS NULL
        GROUP BY e.inbox_id
    ), heads AS (
        INSERT INTO nova_event_heads AS h (inbox_id, position, oldest_at)
        SELECT m.inbox_id, m.n, m.first_at FROM mine m ORDER BY m.inbox_id
        ON CONFLICT (inbox_id) DO UPDATE
        SET position = h.position + EXCLUDED.position,
            oldest_at = coalesce(h.oldest_at, EXCLUDED.oldest_at), updated_at = now()
        RETURNING h.inbox_id, h.position
    ), numbered AS (
        SELECT e.id, hd.position - m.n
                     + row_number() OVER (PARTITION BY e.inbox_id ORDER BY e.id) AS position
        FROM nova_events e
        JOIN mine m ON m.inbox_id = e.inbox_id
        JOIN heads hd ON hd.inbox_id = e.inbox_id
        WHERE e.xid = pg_current_xact_id() AND e.position IS NULL
    ), done AS (
        UPDATE nova_events e SET position = n.position
        FROM numbered n WHERE e.id = n.id
        RETURNING e.id
    )
    SELECT max(d.id) INTO v_last FROM done d;
    IF v_last IS NOT NULL THEN
        PERFORM set_config('nova.events_numbered', v_last::text, true);
        PERFORM pg_notify('nova_events', '');
    END IF;
    RETURN NULL;
END;
$$;

-- (A constraint trigger cannot be replaced: dropped and created again, on every migrate.)
DROP TRIGGER IF EXISTS nova_events_number ON nova_events;
-- (A row inserted with its position, as a bulk load or a test may, needs no numbering.)
CREATE CONSTRAINT TRIGGER nova_events_number
    AFTER INSERT ON nova_events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.position IS NULL) EXECUTE FUNCTION nova_events_number();

-- Rows trigger events by kind ('created' on insert, 'deleted' when deleted_at is set,
-- 'created' with {"restored": true} when it is cleared, 'updated' with what changed).
-- Inserts: one statement per writing statement, from its transition table (a discovery page
-- or a webhook batch inserts hundreds of rows in one statement). Updates: a row trigger whose
-- WHEN clause compares OLD and NEW, so an unchanged rewrite (the common case: a repeated sync)
-- costs that comparison and nothing more.

CREATE OR REPLACE FUNCTION nova_events_messages_inserted()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- A tombstone (a delete of a message never stored) is no change an app could see.
    INSERT INTO nova_events (inbox_id, kind, object_id, provider_id, thread_id)
    SELECT n.inbox_id, 'message.created', n.id::text, n.provider_message_id, n.thread_id
    FROM nova_new_rows n WHERE n.deleted_at IS NULL;
    RETURN NULL;
END;
$$;

-- What changed in a live message: folders, flags and the thread as values, content as true.
-- (The expressions stay inside the trigger function: plpgsql plans them once per session; a
-- SQL function taking the rows would be planned again at every call.)
CREATE OR REPLACE FUNCTION nova_events_message_updated()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO nova_events (inbox_id, kind, object_id, provider_id, thread_id, changes)
    VALUES (NEW.inbox_id,
            CASE WHEN NEW.deleted_at IS NOT NULL THEN 'message.deleted'
                 WHEN OLD.deleted_at IS NOT NULL THEN 'message.created'
                 ELSE 'message.updated' END,
            NEW.id::text, NEW.provider_message_id, NEW.thread_id,
            CASE WHEN NEW.deleted_at IS NOT NULL THEN '{}'::jsonb
                 WHEN OLD.deleted_at IS NOT NULL THEN '{"restored": true}'::jsonb
                 ELSE jsonb_strip_nulls(jsonb_build_object(
        'folders', CASE WHEN OLD.folders IS DISTINCT FROM NEW.folders
                        THEN to_jsonb(NEW.folders) END,
        'unread', CASE WHEN OLD.unread IS DISTINCT FROM NEW.unread
                       THEN to_jsonb(NEW.unread) END,
        'starred', CASE WHEN OLD.starred IS DISTINCT FROM NEW.starred
                        THEN to_jsonb(NEW.starred) END,
        'thread_id', CASE WHEN OLD.thread_id IS DISTINCT FROM NEW.thread_id
                            OR OLD.provider_thread_id IS DISTINCT FROM NEW.provider_thread_id
                          THEN coalesce(to_jsonb(NEW.thread_id), 'true'::jsonb) END,
        'has_attachments', CASE WHEN OLD.has_attachments IS DISTINCT FROM NEW.has_attachments
                                THEN to_jsonb(NEW.has_attachments) END,
        'subject', CASE WHEN OLD.subject IS DISTINCT FROM NEW.subject THEN true END,
        'snippet', CASE WHEN OLD.snippet IS DISTINCT FROM NEW.snippet THEN true END,
        'from', CASE WHEN OLD.from_addresses IS DISTINCT FROM NEW.from_addresses THEN true END,
        'to', CASE WHEN OLD.to_addresses IS DISTINCT FROM NEW.to_addresses THEN true END,
        'cc', CASE WHEN OLD.cc_addresses IS DISTINCT FROM NEW.cc_addresses THEN true END,
        'bcc', CASE WHEN OLD.bcc_addresses IS DISTINCT FROM NEW.bcc_addresses THEN true END,
        'reply_to', CASE WHEN OLD.reply_to IS DISTINCT FROM NEW.reply_to THEN true END,
        'sent_at', CASE WHEN OLD.sent_at IS DISTINCT FROM NEW.sent_at THEN true END,
        'headers', CASE WHEN OLD.headers IS DISTINCT FROM NEW.headers THEN true END,
        'body', CASE WHEN OLD.body_html IS DISTINCT FROM NEW.body_html
                       OR OLD.body_text IS DISTINCT FROM NEW.body_text THEN true END,
        'body_cleaned', CASE WHEN OLD.body_cleaned IS DISTINCT FROM NEW.body_cleaned
                             THEN true END)) END);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nova_events_message_insert
    AFTER INSERT ON flux_email_messages
    REFERENCING NEW TABLE AS nova_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nova_events_messages_inserted();

-- Cheap comparisons first; bodies last (they may have to be read from TOAST).
CREATE OR REPLACE TRIGGER nova_events_message_update
    AFTER UPDATE ON flux_email_messages
    FOR EACH ROW
    WHEN ((OLD.deleted_at IS NULL) <> (NEW.deleted_at IS NULL)
          OR (NEW.deleted_at IS NULL
              AND (OLD.unread IS DISTINCT FROM NEW.unread
                   OR OLD.starred IS DISTINCT FROM NEW.starred
                   OR OLD.has_attachments IS DISTINCT FROM NEW.has_attachments
                   OR OLD.thread_id IS DISTINCT FROM NEW.thread_id
                   OR OLD.sent_at IS DISTINCT FROM NEW.sent_at
                   OR OLD.folders IS DISTINCT FROM NEW.folders
                   OR OLD.provider_thread_id IS DISTINCT FROM NEW.provider_thread_id
                   OR OLD.subject IS DISTINCT FROM NEW.subject
                   OR OLD.snippet IS DISTINCT FROM NEW.snippet
                   OR OLD.from_addresses IS DISTINCT FROM NEW.from_addresses
                   OR OLD.to_addresses IS DISTINCT FROM NEW.to_addresses
                   OR OLD.cc_addresses IS DISTINCT FROM NEW.cc_addresses
                   OR OLD.bcc_addresses IS DISTINCT FROM NEW.bcc_addresses
                   OR OLD.reply_to IS DISTINCT FROM NEW.reply_to
                   OR OLD.headers IS DISTINCT FROM NEW.headers
                   OR OLD.body_cleaned IS DISTINCT FROM NEW.body_cleaned
                   OR OLD.body_text IS DISTINCT FROM NEW.body_text
                   OR OLD.body_html IS DISTINCT FROM NEW.body_html)))
    EXECUTE FUNCTION nova_events_message_updated();

CREATE OR REPLACE FUNCTION nova_events_threads_inserted()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO nova_events (inbox_id, kind, object_id, provider_id, thread_id)
    SELECT n.inbox_id, 'thread.created', n.id::text, n.provider_thread_id, n.id
    FROM nova_new_rows n WHERE n.deleted_at IS NULL;
    RETURN NULL;
END;
$$;

-- What changed in a live thread: folders, flags and the message count as values, the rest
-- as true.
CREATE OR REPLACE FUNCTION nova_events_thread_updated()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO nova_events (inbox_id, kind, object_id, provider_id, thread_id, changes)
    VALUES (NEW.inbox_id,
            CASE WHEN NEW.deleted_at IS NOT NULL THEN 'thread.deleted'
                 WHEN OLD.deleted_at IS NOT NULL THEN 'thread.created'
                 ELSE 'thread.updated' END,
            NEW.id::text, NEW.provider_thread_id, NEW.id,
            CASE WHEN NEW.deleted_at IS NOT NULL THEN '{}'::jsonb
                 WHEN OLD.deleted_at IS NOT NULL THEN '{"restored": true}'::jsonb
                 ELSE jsonb_strip_nulls(jsonb_build_object(
        'folders', CASE WHEN OLD.folders IS DISTINCT FROM NEW.folders
                        THEN to_jsonb(NEW.folders) END,
        'unread', CASE WHEN OLD.unread IS DISTINCT FROM NEW.unread
                       THEN to_jsonb(NEW.unread) END,
        'starred', CASE WHEN OLD.starred IS DISTINCT FROM NEW.starred
                        THEN to_jsonb(NEW.starred) END,
        'has_attachments', CASE WHEN OLD.has_attachments IS DISTINCT FROM NEW.has_attachments
                                THEN to_jsonb(NEW.has_attachments) END,
        'message_count', CASE WHEN OLD.message_count IS DISTINCT FROM NEW.message_count
                              THEN to_jsonb(NEW.message_count) END,
        'first_message_at', CASE WHEN OLD.first_message_at IS DISTINCT FROM NEW.first_message_at
                                 THEN true END,
        'last_message_at', CASE WHEN OLD.last_message_at IS DISTINCT FROM NEW.last_message_at
                                THEN true END,
        'subject', CASE WHEN OLD.subject IS DISTINCT FROM NEW.subject THEN true END,
        'snippet', CASE WHEN OLD.snippet IS DISTINCT FROM NEW.snippet THEN true END,
        'participants', CASE WHEN OLD.participants IS DISTINCT FROM NEW.participants
                             THEN true END)) END);
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nova_events_thread_insert
    AFTER INSERT ON flux_email_threads
    REFERENCING NEW TABLE AS nova_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION nova_events_threads_inserted();

CREATE OR REPLACE TRIGGER nova_events_thread_update
    AFTER UPDATE ON flux_email_threads
    FOR EACH ROW
    WHEN ((OLD.deleted_at IS NULL) <> (NEW.deleted_at IS NULL)
          OR (NEW.deleted_at IS NULL
              AND (OLD.message_count IS DISTINCT FROM NEW.message_count
                   OR OLD.unread IS DISTINCT FROM NEW.unread
                   OR OLD.starred IS DISTINCT FROM NEW.starred
                   OR OLD.has_attachments IS DISTINCT FROM NEW.has_attachments
                   OR OLD.first_message_at IS DISTINCT FROM NEW.first_message_at
                   OR OLD.last_message_at IS DISTINCT FROM NEW.last_message_at
                   OR OLD.folders IS DISTINCT FROM NEW.folders
                   OR OLD.subject IS DISTINCT FROM NEW.subject
                   OR OLD.snippet IS DISTINCT FROM NEW.snippet
                   OR OLD.participants IS DISTINCT FROM NEW.participants)))
    EXECUTE FUNCTION nova_events_thread_updated();

-- An inbox's status: {"status": new, "old_status": old}.
CREATE OR REPLACE FUNCTION nova_events_inbox_status()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nova_record_event(NEW.id, 'inbox.status_changed', NEW.id::text, NEW.grant_id, NULL,
                              jsonb_build_object('status', NEW.status,
                                                 'old_status', OLD.status));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nova_events_inbox_status
    AFTER UPDATE OF status ON flux_inboxes
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION nova_events_inbox_status();

-- A backfill (its configuration) starting: entering queued, discovering or thread_sync from
-- anything else (a new backfill, a resume, a completion found premature); completing;
-- failing. Moves between running phases are not events. Changes: {"status", "old_status"
-- (absent for a new row), "kind", and for a failure "error" (at most 500 characters)}.
CREATE OR REPLACE FUNCTION nova_events_backfill_status()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_old    text := CASE WHEN TG_OP = 'UPDATE' THEN OLD.backfill_status END;
    v_kind   text;
    v_running boolean := NEW.backfill_status IN ('queued', 'discovering', 'thread_sync');
BEGIN
    IF v_running AND (v_old IS NULL OR v_old NOT IN ('queued', 'discovering', 'thread_sync'))
    THEN
        v_kind := 'backfill.started';
    ELSIF NEW.backfill_status = 'completed' THEN
        v_kind := 'backfill.completed';
    ELSIF NEW.backfill_status = 'failed' THEN
        v_kind := 'backfill.failed';
    ELSE
        RETURN NULL;
    END IF;
    PERFORM nova_record_event(NEW.inbox_id, v_kind, NEW.id::text, NULL, NULL,
                              jsonb_strip_nulls(jsonb_build_object(
                                  'status', NEW.backfill_status, 'old_status', v_old,
                                  'kind', NEW.backfill_kind,
                                  'error', CASE WHEN NEW.backfill_status = 'failed'
                                                THEN left(NEW.last_error, 500) END)));
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER nova_events_backfill_insert
    AFTER INSERT ON flux_inbox_configurations
    FOR EACH ROW WHEN (NEW.backfill_status IN ('queued', 'discovering', 'thread_sync',
                                               'completed', 'failed'))
    EXECUTE FUNCTION nova_events_backfill_status();

CREATE OR REPLACE TRIGGER nova_events_backfill_update
    AFTER UPDATE OF backfill_status ON flux_inbox_configurations
    FOR EACH ROW WHEN (OLD.backfill_status IS DISTINCT FROM NEW.backfill_status)
    EXECUTE FUNCTION nova_events_backfill_status();

-- --- reading --------------------------------------------------------------------------------

-- Every inbox whose events a consumer has not all acknowledged: its cursor (0: none), the
-- inbox's last position, how many are unread, and whether retention pruned events it had not
-- read (behind: nova_events_read refuses until nova_events_reset). One row per inbox of
-- nova_event_heads at most: the cost follows the inboxes, never the history.
CREATE OR REPLACE FUNCTION nova_events_unread(p_consumer text)
RETURNS TABLE (inbox_id uuid, acked bigint, head bigint, unread bigint,
               pruned_through bigint, behind boolean)
LANGUAGE sql STABLE AS $$
    SELECT h.inbox_id, coalesce(c.position, 0), h.position,
           h.position - coalesce(c.position, 0), h.pruned_through,
           h.pruned_through > coalesce(c.position, 0)
    FROM nova_event_heads h
    LEFT JOIN nova_event_cursors c ON c.consumer = p_consumer AND c.inbox_id = h.inbox_id
    WHERE h.position > coalesce(c.position, 0)
    ORDER BY h.inbox_id;
$$;

-- The error of a consumer behind pruned events (SQLSTATE NV020): consumer, inbox and range in
-- the message; DETAIL and HINT say what to do.
CREATE OR REPLACE FUNCTION nova_events_behind(p_consumer text, p_inbox uuid, p_acked bigint,
                                              p_pruned bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events: consumer % is behind in inbox %: events % to % were pruned '
                    'before it read them', p_consumer, p_inbox, p_acked + 1, p_pruned
        USING ERRCODE = 'NV020',
              DETAIL = format('Its cursor is at %s; retention (NOVA_EVENT_RETENTION_DAYS) '
                              'pruned every position up to %s.', p_acked, p_pruned),
              HINT = format('Rebuild what the consumer keeps from the tables, then move it '
                            'past the gap: nova events reset %s (or SELECT * FROM '
                            'nova_events_reset(%L)).', p_consumer, p_consumer);
END;
$$;

-- The next events of a consumer: each inbox's events after its cursor, in position order,
-- at most p_max in all, shared across the inboxes that have some (those acknowledged least
-- recently first, each up to its share), returned by inbox then position. Nothing moves until
-- nova_events_ack: reading again returns the same events. p_inbox: that inbox only. A consumer
-- whose cursor is behind events retention pruned gets the error of nova_events_behind (SQLSTATE
-- NV020), never a gap. Cost: the inboxes with unread events and the events returned, found by
-- (inbox_id, position); never the history.
CREATE OR REPLACE FUNCTION nova_events_read(p_consumer text, p_max integer,
                                            p_inbox uuid DEFAULT NULL)
RETURNS TABLE (id bigint, inbox_id uuid, "position" bigint, kind text, object_id text,
               provider_id text, thread_id uuid, changes jsonb, occurred_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_inboxes uuid[];
    v_acked   bigint[];
    v_behind  boolean;
    v_late    record;
    v_share   integer;
BEGIN
    IF p_consumer IS NULL OR p_consumer = '' THEN
        RAISE EXCEPTION 'events: a consumer name is required' USING ERRCODE = '22023';
    END IF;
    IF p_max IS NULL OR p_max < 1 OR p_max > 10000 THEN
        RAISE EXCEPTION 'events: p_max must be 1..10000, not %', p_max USING ERRCODE = '22023';
    END IF;
    -- One pass over the heads: the inboxes with unread events, least recently acknowledged
    -- first, and whether the consumer is behind pruned events in any of them.
    SELECT array_agg(u.inbox_id ORDER BY u.acked_at NULLS FIRST, u.inbox_id),
           array_agg(u.acked ORDER BY u.acked_at NULLS FIRST, u.inbox_id),
           coalesce(bool_or(u.pruned_through > u.acked), false)
    INTO v_inboxes, v_acked, v_behind
    FROM (SELECT h.inbox_id, coalesce(c.position, 0) AS acked, c.updated_at AS acked_at,
                 h.pruned_through
          FROM nova_event_heads h
          LEFT JOIN nova_event_cursors c ON c.consumer = p_consumer AND c.inbox_id = h.inbox_id
          WHERE h.position > coalesce(c.position, 0)
            AND (p_inbox IS NULL OR h.inbox_id = p_inbox)) u;
    IF v_behind THEN
        SELECT u.inbox_id, u.acked, u.pruned_through INTO v_late
        FROM nova_events_unread(p_consumer) u
        WHERE u.behind AND (p_inbox IS NULL OR u.inbox_id = p_inbox)
        ORDER BY u.inbox_id LIMIT 1;
        PERFORM nova_events_behind(p_consumer, v_late.inbox_id, v_late.acked,
                                   v_late.pruned_through);
    END IF;
    IF v_inboxes IS NULL THEN
        RETURN;
    END IF;
    -- Each of the first p_max inboxes gets its share of p_max (rounded up), the events cut
    -- to p_max in rounds (every inbox's first, then second ...): each inbox's rows are the
    -- next ones after its cursor, with no gap.
    v_share := (p_max + least(cardinality(v_inboxes), p_max) - 1)
               / least(cardinality(v_inboxes), p_max);
    RETURN QUERY
    SELECT x.id, x.inbox_id, x.position, x.kind, x.object_id, x.provider_id, x.thread_id,
           x.changes, x.occurred_at
    FROM (
        SELECT e.*, row_number() OVER (PARTITION BY e.inbox_id ORDER BY e.position) AS rn
        FROM unnest(v_inboxes[1:p_max], v_acked[1:p_max]) AS p(inbox_id, acked)
        CROSS JOIN LATERAL (
            SELECT e.id, e.inbox_id, e.position, e.kind, e.object_id, e.provider_id,
                   e.thread_id, e.changes, e.occurred_at
            FROM nova_events e
            WHERE e.inbox_id = p.inbox_id AND e.position > p.acked
            ORDER BY e.position
            LIMIT v_share) e
        ORDER BY rn, e.inbox_id
        LIMIT p_max) x
    ORDER BY x.inbox_id, x.position;
END;
$$;

-- A consumer has handled every event of the inbox up to p_position. Cursors only move
-- forward (an older acknowledgement changes nothing); a position past the inbox's last event
-- is refused. Returns the cursor.
CREATE OR REPLACE FUNCTION nova_events_ack(p_consumer text, p_inbox uuid, p_position bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_head bigint;
    v_at   bigint;
BEGIN
    IF p_consumer IS NULL OR p_consumer = '' OR p_inbox IS NULL OR p_position IS NULL
       OR p_position < 0 THEN
        RAISE EXCEPTION 'events: acknowledge needs a consumer, an inbox and a position >= 0'
            USING ERRCODE = '22023';
    END IF;
    SELECT h.position INTO v_head FROM nova_event_heads h WHERE h.inbox_id = p_inbox;
    IF p_position > coalesce(v_head, 0) THEN
        RAISE EXCEPTION 'events: consumer % cannot acknowledge position % of inbox %: its last '
                        'event is at %', p_consumer, p_position, p_inbox, coalesce(v_head, 0)
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO nova_event_cursors AS c (consumer, inbox_id, position)
    VALUES (p_consumer, p_inbox, p_position)
    ON CONFLICT (consumer, inbox_id) DO UPDATE
    SET position = greatest(c.position, EXCLUDED.position), updated_at = now()
    RETURNING c.position INTO v_at;
    RETURN v_at;
END;
$$;

-- The operator's word for a consumer behind pruned events: its cursors move past them (to the
-- last pruned position), so it reads on from the oldest event kept; what it skipped is
-- returned (from_position: the cursor before). p_to_end: every cursor moves to the inbox's
-- last event (the consumer skips everything written so far: a new consumer that starts now).
-- p_inbox: that inbox only.
CREATE OR REPLACE FUNCTION nova_events_reset(p_consumer text, p_inbox uuid DEFAULT NULL,
                                             p_to_end boolean DEFAULT false)
RETURNS TABLE (inbox_id uuid, from_position bigint, to_position bigint)
LANGUAGE sql AS $$
    WITH target AS (
        SELECT h.inbox_id, coalesce(c.position, 0) AS acked,
               CASE WHEN p_to_end THEN h.position ELSE h.pruned_through END AS to_position
        FROM nova_event_heads h
        LEFT JOIN nova_event_cursors c ON c.consumer = p_consumer AND c.inbox_id = h.inbox_id
        WHERE p_inbox IS NULL OR h.inbox_id = p_inbox
    ), moved AS (
        INSERT INTO nova_event_cursors AS c (consumer, inbox_id, position)
        SELECT p_consumer, t.inbox_id, t.to_position FROM target t
        WHERE t.to_position > t.acked
        ORDER BY t.inbox_id
        ON CONFLICT (consumer, inbox_id) DO UPDATE
        SET position = greatest(c.position, EXCLUDED.position), updated_at = now()
        RETURNING c.inbox_id, c.position
    )
    SELECT m.inbox_id, t.acked, m.position
    FROM moved m JOIN target t ON t.inbox_id = m.inbox_id
    ORDER BY m.inbox_id;
$$;

-- Every consumer with a cursor: the inboxes it acknowledged events of, the events of those
-- inboxes it has not, the inboxes where it is behind pruned events, its last acknowledgement.
CREATE OR REPLACE FUNCTION nova_events_consumers()
RETURNS TABLE (consumer text, inboxes bigint, unread bigint, behind bigint,
               acked_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.consumer, count(*), sum(greatest(h.position - c.position, 0))::bigint,
           count(*) FILTER (WHERE h.pruned_through > c.position), max(c.updated_at)
    FROM nova_event_cursors c JOIN nova_event_heads h ON h.inbox_id = c.inbox_id
    GROUP BY c.consumer
    ORDER BY c.consumer;
$$;

-- --- retention ------------------------------------------------------------------------------

-- Events written before p_before, at most p_batch a call, oldest inboxes first (the index of
-- heads by their oldest event: what is due, never the history). Per inbox only a prefix of
-- its positions goes, up to the first event that is younger, so what is kept is always every
-- position after pruned_through. A head a committing writer holds is skipped until the next
-- pass; the heads locked here are never waited for (SKIP LOCKED), so no lock cycle.
CREATE OR REPLACE FUNCTION nova_prune_events(p_before timestamptz, p_batch integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_inbox uuid;
    v_from  bigint;
    v_upto  bigint;
    v_n     bigint;
    v_total bigint := 0;
BEGIN
    FOR v_inbox IN SELECT h.inbox_id FROM nova_event_heads h
                   WHERE h.oldest_at < p_before ORDER BY h.oldest_at LIMIT p_batch LOOP
        EXIT WHEN v_total >= p_batch;
        SELECT h.pruned_through INTO v_from FROM nova_event_heads h
        WHERE h.inbox_id = v_inbox AND h.oldest_at < p_before
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        SELECT coalesce(min(x.position) FILTER (WHERE x.occurred_at >= p_before) - 1,
                        max(x.position))
        INTO v_upto
        FROM (SELECT e.position, e.occurred_at FROM nova_events e
              WHERE e.inbox_id = v_inbox AND e.position > v_from
              ORDER BY e.position LIMIT p_batch - v_total) x;
        DELETE FROM nova_events e
        WHERE e.inbox_id = v_inbox AND e.position > v_from AND e.position <= v_upto;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_total := v_total + v_n;
        UPDATE nova_event_heads h
        SET pruned_through = greatest(h.pruned_through, coalesce(v_upto, v_from)),
            oldest_at = (SELECT e.occurred_at FROM nova_events e
                         WHERE e.inbox_id = v_inbox
                           AND e.position > greatest(v_from, coalesce(v_upto, v_from))
                         ORDER BY e.position LIMIT 1),
            updated_at = now()
        WHERE h.inbox_id = v_inbox;
    END LOOP;
    PERFORM nova_note_pruned('retention:events', v_total);
    RETURN v_total;
END;
$$;
