-- Gmail without gaps: after a history expiry, what the resync did not list is gone.
--
-- A history.list 404 (nova.changes) stamps the inbox's configuration `history_expired_at` and
-- queues a full, open-ended backfill (the resync), or owes one to the monitor when a backfill
-- runs (nova_follow_resyncs). The resync lists the whole mailbox as it is (threads.list with
-- includeSpamTrash, `after:` its range's start, no end), so once its listing has ended every
-- thread of the window that exists at Gmail is one of its queued_threads. A thread stored for
-- the inbox in that window that it did not list, and that nothing wrote since the listing
-- began (no version at or after the listing's: history sync stores what arrived or moved
-- after the listing passed with a newer one), was deleted at Gmail during the gap, where no
-- history record will ever say so: it is soft-deleted with its messages, as a thread sync's
-- 404 would (store.soft_delete_thread), with the listing's version.
--
-- What makes it safe:
-- * only Gmail inboxes, only the first full backfill with no end queued at or after the
--   expiry (a catch-up or a closed range does not list everything; a backfill queued before
--   the expiry may have listed before the gap's deletions);
-- * only after discovery has ended, and after a history pass that started once it had ended
--   (flux_inboxes.history_pass_started_at, set by nova.changes): a thread that a reply moved to
--   the listing's first page while it ran, already read, has that reply stored by then with a
--   newer version, and is kept;
-- * a thread that still holds a stored message from before the range's start may live on at
--   Gmail with only those (its newer messages deleted): it is not deleted here but queued for
--   a thread sync, whose threads.get decides (a 404 soft-deletes it);
-- * thread rows are taken in id order with SKIP LOCKED: a thread a writer holds now is being
--   changed and is left alone.
--
-- Lock order (README): the configuration (FOR UPDATE, as complete_backfill_if_done holds it),
-- thread rows by id, their messages, then queued_threads (queue_thread_sync) and the counters'
-- delta rows. Called by complete_backfill_if_done before it counts, and by nova.changes after
-- a history pass; the first call that finds everything ready does the work and clears the mark,
-- every other call returns at once.
CREATE OR REPLACE FUNCTION nova_prune_unlisted_threads(p_config_id uuid)
RETURNS TABLE (pruned integer, queued integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_config  flux_inbox_configurations;
    v_inbox   flux_inboxes;
    v_version timestamptz;
    v_locked  uuid[];
    v_gone    uuid[];
    v_check   text[];
    v_pruned  integer := 0;
    v_queued  integer := 0;
BEGIN
    SELECT * INTO v_config FROM flux_inbox_configurations
    WHERE id = p_config_id AND deleted_at IS NULL AND history_expired_at IS NOT NULL;
    IF NOT FOUND THEN
        RETURN;   -- nothing owed (the common case: one index probe)
    END IF;
    SELECT * INTO v_config FROM flux_inbox_configurations WHERE id = p_config_id FOR UPDATE;
    IF v_config.history_expired_at IS NULL
       OR v_config.backfill_kind IS DISTINCT FROM 'full' OR v_config.backfill_until IS NOT NULL
       OR coalesce(v_config.discovery_cutoff, v_config.updated_at) < v_config.history_expired_at
       OR v_config.discovery_completed_at IS NULL
       OR v_config.backfill_status NOT IN ('thread_sync', 'completed') THEN
        RETURN;   -- not the resync, or its listing has not ended: the mark stays for it
    END IF;
    SELECT * INTO v_inbox FROM flux_inboxes WHERE id = v_config.inbox_id;
    IF v_inbox.provider IS DISTINCT FROM 'gmail' OR v_inbox.deleted_at IS NOT NULL
       OR v_inbox.status <> 'active' THEN
        RETURN;
    END IF;
    IF v_inbox.history_pass_started_at IS NULL
       OR v_inbox.history_pass_started_at < v_config.discovery_completed_at THEN
        RETURN;   -- a history pass after the listing comes first (see above)
    END IF;

    -- The listing's version, as store.sync_version gives it for a fetch at the cutoff.
    v_version := date_trunc('second', coalesce(v_config.discovery_cutoff, v_config.updated_at))
                 - interval '2 seconds';
    SELECT array_agg(x.id ORDER BY x.id) INTO v_locked FROM (
        SELECT t.id FROM flux_email_threads t
        WHERE t.inbox_id = v_config.inbox_id AND t.deleted_at IS NULL
          AND t.last_message_at >= v_config.backfill_since
          AND (t.provider_updated_at IS NULL OR t.provider_updated_at < v_version)
          AND NOT EXISTS (SELECT 1 FROM queued_threads q WHERE q.config_id = p_config_id
                          AND q.provider_thread_id = t.provider_thread_id)
        ORDER BY t.id
        FOR UPDATE OF t SKIP LOCKED
    ) x;
    IF v_locked IS NOT NULL THEN
        -- Locked now, checked again on a fresh snapshot: nothing written since the listing
        -- began, the thread or any of its messages.
        WITH c AS (
            SELECT t.id, t.provider_thread_id,
                   t.first_message_at < v_config.backfill_since
                   OR EXISTS (SELECT 1 FROM flux_email_messages m WHERE m.thread_id = t.id
                              AND m.deleted_at IS NULL
                              AND m.sent_at < v_config.backfill_since) AS older
            FROM flux_email_threads t
            WHERE t.id = ANY (v_locked) AND t.deleted_at IS NULL
              AND (t.provider_updated_at IS NULL OR t.provider_updated_at < v_version)
              AND NOT EXISTS (SELECT 1 FROM flux_email_messages m WHERE m.thread_id = t.id
                              AND m.provider_updated_at >= v_version)
        )
        SELECT array_agg(c.id ORDER BY c.id) FILTER (WHERE NOT c.older),
               array_agg(c.provider_thread_id ORDER BY c.provider_thread_id) FILTER (WHERE c.older)
        INTO v_gone, v_check FROM c;
    END IF;
    IF v_gone IS NOT NULL THEN
        UPDATE flux_email_messages
        SET deleted_at = now(), provider_updated_at = v_version, updated_at = now()
        WHERE thread_id = ANY (v_gone) AND deleted_at IS NULL;
        UPDATE flux_email_threads
        SET deleted_at = now(), provider_updated_at = v_version, message_count = 0,
            updated_at = now()
        WHERE id = ANY (v_gone);
        v_pruned := cardinality(v_gone);
    END IF;
    IF v_check IS NOT NULL THEN
        PERFORM queue_thread_sync(p_config_id, t) FROM unnest(v_check) AS t;
        v_queued := cardinality(v_check);
    END IF;
    UPDATE flux_inbox_configurations SET history_expired_at = NULL WHERE id = p_config_id;
    IF v_pruned + v_queued > 0 THEN
        RAISE LOG 'nova_prune_unlisted_threads: config % soft-deleted % thread(s) gone at Gmail, queued % to check',
            p_config_id, v_pruned, v_queued;
    END IF;
    RETURN QUERY SELECT v_pruned, v_queued;
END;
$$;

-- Gmail resync fetches only threads that may differ (nova.gmail_resync). Before the resync
-- lists its threads, it lists the mailbox's messages (id and thread id) into
-- gmail_resync_listed_messages; then, for each page of threads.list, a listed thread is
-- unchanged, and needs no request, only when all of these hold:
-- * it is stored (a live thread row): (c) a thread not stored at all is fetched;
-- * its listed historyId ("the ID of the last history record that modified this thread") is
--   known and at most the thread's own historyId as of its last threads.get, which a thread
--   sync keeps on each message it writes (raw.threadHistoryId): (a) a message added or a label
--   changed since that fetch moves it. Only that fetch counts: a message's own historyId,
--   moved by a history record applied after the expiry, says nothing of the records of the
--   thread's other messages lost in the gap, and a fetch wrote every message it saw;
-- * the ids of its live stored messages are exactly the ones messages.list gave for it: (b) a
--   message deleted in the gap (whose deletion need not move the thread's historyId, and in
--   the sandbox does not) is still stored live, and a message never stored is listed. A
--   stored message the listing missed (one older than its `after:`) makes the sets differ:
--   the thread is fetched. A message neither listed nor stored cannot hide behind the first
--   test: the last threads.get wrote every message the thread had, and one added since moved
--   the thread's historyId past it.
-- Anything the listings saw after the history expiry that changed since is on its way through
-- history sync, which restarted at the expiry. Threads stored but not listed are the prune's
-- (above). Reads only: the caller's page transaction holds the configuration.
CREATE OR REPLACE FUNCTION nova_resync_unchanged_threads(
    p_config_id uuid, p_thread_ids text[], p_history_ids text[])
RETURNS TABLE (provider_thread_id text, live integer)
LANGUAGE sql STABLE AS $$
    WITH listed AS (
        SELECT DISTINCT ON (x.tid) x.tid,
               CASE WHEN x.hid ~ '^[0-9]{1,30}$' THEN x.hid::numeric END AS hid
        FROM unnest(p_thread_ids, p_history_ids) AS x(tid, hid)
        WHERE x.tid IS NOT NULL
        ORDER BY x.tid, x.hid DESC
    )
    SELECT l.tid, cardinality(s.ids)
    FROM listed l
    JOIN flux_inbox_configurations c ON c.id = p_config_id
    JOIN flux_email_threads t
      ON t.inbox_id = c.inbox_id AND t.provider_thread_id = l.tid AND t.deleted_at IS NULL
    CROSS JOIN LATERAL (
        SELECT max(CASE WHEN m.raw ->> 'threadHistoryId' ~ '^[0-9]{1,30}$'
                        THEN (m.raw ->> 'threadHistoryId')::numeric END) AS fetched,
               coalesce(array_agg(m.provider_message_id COLLATE "C"
                                  ORDER BY m.provider_message_id COLLATE "C")
                        FILTER (WHERE m.deleted_at IS NULL), '{}') AS ids
        FROM flux_email_messages m WHERE m.thread_id = t.id
    ) s
    WHERE l.hid IS NOT NULL AND s.fetched >= l.hid AND cardinality(s.ids) > 0
      AND s.ids = ARRAY(SELECT g.provider_message_id COLLATE "C"
                        FROM gmail_resync_listed_messages g
                        WHERE g.config_id = p_config_id AND g.provider_thread_id = l.tid
                        ORDER BY g.provider_message_id COLLATE "C")
$$;

-- One page of a resync's threads: the unchanged ones (above) are recorded completed with their
-- live messages' count and get no job; the others are queued as queue_discovered_threads
-- queues a page (its lock order: queued threads in id order; counters by delta rows).
-- Returns how many were queued and how many were unchanged.
CREATE OR REPLACE FUNCTION nova_queue_resync_page(
    p_config_id uuid, p_thread_ids text[], p_history_ids text[])
RETURNS TABLE (queued integer, unchanged integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_same   text[];
    v_live   integer[];
    v_queued integer;
BEGIN
    SELECT coalesce(array_agg(u.provider_thread_id ORDER BY u.provider_thread_id), '{}'),
           coalesce(array_agg(u.live ORDER BY u.provider_thread_id), '{}')
    INTO v_same, v_live
    FROM nova_resync_unchanged_threads(p_config_id, p_thread_ids, p_history_ids) u;
    SELECT count(*) INTO v_queued FROM queue_discovered_threads(
        p_config_id, ARRAY(SELECT DISTINCT t FROM unnest(p_thread_ids) AS t
                           WHERE t <> ALL (v_same) ORDER BY t),
        false, v_same);
    IF cardinality(v_same) > 0 THEN
        UPDATE queued_threads q SET message_count = u.live
        FROM unnest(v_same, v_live) AS u(t, live)
        WHERE q.config_id = p_config_id AND q.provider_thread_id = u.t
          AND q.status = 'completed' AND q.message_count <> u.live;
    END IF;
    RETURN QUERY SELECT v_queued, cardinality(v_same);
END;
$$;

-- Where a resync's message listing starts: the backfill's range, or earlier when a thread of
-- the range holds older live messages (each must be listed for its thread to compare equal).
CREATE OR REPLACE FUNCTION nova_resync_listing_start(p_config_id uuid)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT least(c.backfill_since, (
        SELECT min(m.sent_at) FROM flux_email_threads t
        JOIN flux_email_messages m ON m.thread_id = t.id AND m.deleted_at IS NULL
        WHERE t.inbox_id = c.inbox_id AND t.deleted_at IS NULL
          AND t.last_message_at >= c.backfill_since))
    FROM flux_inbox_configurations c WHERE c.id = p_config_id
$$;
