-- What exact sync under the real Nylas API needs: cleaned bodies kept apart from HTML, grant
-- events ordered by their time, webhooks that wait for their inbox, and discovery bounded at the
-- moment a backfill starts plus rounds that list what changed since.

-- A `.cleaned` notification's body is Nylas's markdown rendering, not the HTML body.
ALTER TABLE flux_email_messages ADD COLUMN body_cleaned text;

-- Provider time of the event (or local time of the check) that last set the inbox status: an
-- older grant event never overrides a newer status.
ALTER TABLE flux_inboxes ADD COLUMN status_changed_at timestamptz;

-- 'waiting': the notification's inbox does not exist or is not active yet; it is queued again
-- when the inbox becomes active (trigger in sql/020_webhooks.sql).
ALTER TABLE flux_webhook_notifications DROP CONSTRAINT flux_webhook_notifications_status_check;
ALTER TABLE flux_webhook_notifications ADD CONSTRAINT flux_webhook_notifications_status_check
    CHECK (status IN ('pending', 'processing', 'processed', 'skipped', 'error', 'waiting'));
CREATE INDEX flux_webhook_notifications_waiting_idx
    ON flux_webhook_notifications (grant_id) WHERE status = 'waiting';

-- Discovery lists threads newest first by their latest message, so a thread that gets a reply
-- while discovery pages through the mailbox jumps to a page already read. The main pass lists
-- only threads whose latest message is before discovery_cutoff (when the backfill was queued);
-- then rounds list what changed since (changes_since), each from the start of the previous
-- round, until a round finds nothing or the round limit is reached.
ALTER TABLE flux_inbox_configurations
    ADD COLUMN discovery_cutoff timestamptz,
    ADD COLUMN changes_since timestamptz,            -- NULL: the main pass
    ADD COLUMN changes_rounds integer NOT NULL DEFAULT 0,
    ADD COLUMN changes_round_started_at timestamptz;
