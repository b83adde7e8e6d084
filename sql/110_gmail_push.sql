-- Gmail push intake (POST /webhooks/gmail, nova/receiver.py): store each Pub/Sub delivery
-- once (nova_store_notification); the trigger of sql/020_webhooks.sql queues it in the same
-- transaction.

-- Stores a Gmail notification as a flux_webhook_notifications row of provider 'gmail' and type
-- 'gmail.history'. Its webhook id is 'gmail:' || the Pub/Sub messageId, which every redelivery
-- of a message repeats (https://cloud.google.com/pubsub/docs/push): a message seen before is
-- neither stored nor queued again, and the existing row's id comes back with is_new = false.
-- grant_id is the lower-cased address (Gmail addresses are case-insensitive); inbox_id is the
-- Gmail inbox of that grant, when there is one (as queue_nylas_webhook_notification does for
-- Nylas grants). event_time is the publish time, else now().
CREATE OR REPLACE FUNCTION queue_gmail_push_notification(
    p_message_id    text,
    p_email_address text,
    p_history_id    text,
    p_publish_time  text DEFAULT NULL,
    p_subscription  text DEFAULT NULL,
    p_event_time    timestamptz DEFAULT NULL
)
RETURNS TABLE (notification_id uuid, is_new boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_webhook_id text;
    v_grant      text;
    v_inbox_id   uuid;
BEGIN
    IF p_message_id IS NULL OR btrim(p_message_id) = '' THEN
        RAISE EXCEPTION 'queue_gmail_push_notification: message id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_email_address IS NULL OR btrim(p_email_address) = '' THEN
        RAISE EXCEPTION 'queue_gmail_push_notification: email address is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_history_id IS NULL OR p_history_id !~ '^[0-9]{1,20}$' THEN
        RAISE EXCEPTION 'queue_gmail_push_notification: history id must be 1 to 20 digits, got %',
            coalesce(p_history_id, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    v_webhook_id := 'gmail:' || btrim(p_message_id);
    v_grant := lower(btrim(p_email_address));
    SELECT i.id INTO v_inbox_id
    FROM flux_inboxes i
    WHERE i.provider = 'gmail' AND lower(i.grant_id) = v_grant
    ORDER BY (i.grant_id = v_grant) DESC, (i.deleted_at IS NULL) DESC, i.created_at DESC
    LIMIT 1;

    RETURN QUERY SELECT * FROM nova_store_notification(
        v_webhook_id, 'gmail.history', 'gmail', v_grant, v_inbox_id, NULL,
        jsonb_build_object('emailAddress', p_email_address, 'historyId', p_history_id,
                           'messageId', btrim(p_message_id), 'publishTime', p_publish_time,
                           'subscription', p_subscription),
        coalesce(p_event_time, now()));
END;
$$;

-- Resyncs owed by a history expiry that met a running backfill (nova.changes): queued by the
-- monitor once that backfill has ended, listing the backfill's range as the mailbox is then.
-- Driven by the partial index of owed resyncs. Returns each inbox and its resync's
-- configuration.
CREATE OR REPLACE FUNCTION nova_follow_resyncs()
RETURNS TABLE (inbox_id uuid, config_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_inbox flux_inboxes;
    v_since timestamptz;
BEGIN
    FOR v_inbox IN
        SELECT i.* FROM flux_inboxes i
        WHERE i.resync_requested_at IS NOT NULL AND i.status = 'active' AND i.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM flux_inbox_configurations c
                          WHERE c.inbox_id = i.id AND c.deleted_at IS NULL
                            AND c.backfill_status IN ('queued', 'discovering', 'thread_sync'))
        ORDER BY i.resync_requested_at
        FOR UPDATE OF i SKIP LOCKED
    LOOP
        SELECT greatest(c.backfill_since, now() - interval '1 year') INTO v_since
        FROM flux_inbox_configurations c WHERE c.inbox_id = v_inbox.id AND c.deleted_at IS NULL;
        UPDATE flux_inboxes SET resync_requested_at = NULL WHERE id = v_inbox.id;
        RETURN QUERY SELECT v_inbox.id, queue_inbox_backfill(v_inbox.id, v_since, NULL, 'full');
    END LOOP;
END;
$$;
