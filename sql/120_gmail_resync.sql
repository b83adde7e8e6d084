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
