-- Nova's tables and PGMQ queues. Functions and triggers live in sql/ and are re-applied on every
-- migrate; this file holds only what must be created once.

-- Queues (names from the Nova seed, plus attachment_downloads).
SELECT pgmq.create(q)
FROM unnest(ARRAY['nylas_webhook_notifications', 'inbox_backfill_jobs',
                  'thread_sync_jobs', 'attachment_downloads']) AS q
WHERE NOT EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = q);

-- One connected mailbox. grant_id is the provider's handle (a Nylas grant, a Gmail account).
CREATE TABLE flux_inboxes (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    provider          text NOT NULL DEFAULT 'nylas' CHECK (provider IN ('nylas', 'gmail')),
    grant_id          text,
    email             text NOT NULL CHECK (email <> ''),
    display_name      text,
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'auth_expired', 'revoked', 'disabled')),
    auth_expired_at   timestamptz,
    last_event_at     timestamptz,   -- provider time of the last event Nova applied
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    deleted_at        timestamptz
);
CREATE UNIQUE INDEX flux_inboxes_grant_key ON flux_inboxes (provider, grant_id)
    WHERE grant_id IS NOT NULL;
CREATE INDEX flux_inboxes_grant_idx ON flux_inboxes (grant_id);

-- Sync configuration of an inbox: one per inbox, carrying its backfill state and checkpoint.
CREATE TABLE flux_inbox_configurations (
    id                       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                 uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    backfill_status          text NOT NULL DEFAULT 'pending'
                             CHECK (backfill_status IN ('pending', 'queued', 'discovering',
                                                        'thread_sync', 'completed', 'failed')),
    backfill_since           timestamptz,
    backfill_until           timestamptz,
    backfill_kind            text NOT NULL DEFAULT 'full' CHECK (backfill_kind IN ('full', 'catch_up')),
    backfill_started_at      timestamptz,
    discovery_completed_at   timestamptz,
    backfill_completed_at    timestamptz,
    backfill_progress        jsonb NOT NULL DEFAULT '{}'::jsonb,
    checkpoint_page_token    text,
    checkpoint_pages_done    integer NOT NULL DEFAULT 0 CHECK (checkpoint_pages_done >= 0),
    checkpoint_threads_found integer NOT NULL DEFAULT 0 CHECK (checkpoint_threads_found >= 0),
    backfill_attempts        integer NOT NULL DEFAULT 0,
    last_error               text,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    deleted_at               timestamptz,
    CHECK (backfill_until IS NULL OR backfill_since IS NULL OR backfill_since < backfill_until)
);
CREATE UNIQUE INDEX flux_inbox_configurations_inbox_key ON flux_inbox_configurations (inbox_id)
    WHERE deleted_at IS NULL;
-- The completion monitor scans active backfills.
CREATE INDEX flux_inbox_configurations_active_idx ON flux_inbox_configurations (backfill_status)
    WHERE backfill_status IN ('queued', 'discovering', 'thread_sync');

CREATE TABLE flux_email_threads (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    provider_thread_id      text NOT NULL,
    subject                 text,
    snippet                 text,
    participants            jsonb NOT NULL DEFAULT '[]'::jsonb,
    folders                 text[] NOT NULL DEFAULT '{}',
    unread                  boolean NOT NULL DEFAULT false,
    starred                 boolean NOT NULL DEFAULT false,
    has_attachments         boolean NOT NULL DEFAULT false,
    message_count           integer NOT NULL DEFAULT 0,
    first_message_at        timestamptz,
    last_message_at         timestamptz,
    provider_updated_at     timestamptz,   -- order guard: a write older than this is ignored
    raw                     jsonb,
    synced_at               timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    deleted_at              timestamptz,
    UNIQUE (inbox_id, provider_thread_id)
);
CREATE INDEX flux_email_threads_recent_idx ON flux_email_threads (inbox_id, last_message_at DESC)
    WHERE deleted_at IS NULL;

CREATE TABLE flux_email_messages (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    thread_id               uuid REFERENCES flux_email_threads (id) ON DELETE SET NULL,
    provider_message_id     text NOT NULL,
    provider_thread_id      text,
    subject                 text,
    snippet                 text,
    from_addresses          jsonb NOT NULL DEFAULT '[]'::jsonb,
    to_addresses            jsonb NOT NULL DEFAULT '[]'::jsonb,
    cc_addresses            jsonb NOT NULL DEFAULT '[]'::jsonb,
    bcc_addresses           jsonb NOT NULL DEFAULT '[]'::jsonb,
    reply_to                jsonb NOT NULL DEFAULT '[]'::jsonb,
    body_html               text,
    body_text               text,
    folders                 text[] NOT NULL DEFAULT '{}',
    unread                  boolean NOT NULL DEFAULT false,
    starred                 boolean NOT NULL DEFAULT false,
    has_attachments         boolean NOT NULL DEFAULT false,
    sent_at                 timestamptz,   -- the message's own date
    headers                 jsonb,
    provider_updated_at     timestamptz,   -- order guard
    raw                     jsonb,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    deleted_at              timestamptz,
    UNIQUE (inbox_id, provider_message_id)
);
CREATE INDEX flux_email_messages_thread_idx ON flux_email_messages (thread_id, sent_at);
CREATE INDEX flux_email_messages_provider_thread_idx
    ON flux_email_messages (inbox_id, provider_thread_id);

-- One row per attachment: the Missive downloader's columns plus checksum, size and extraction.
CREATE TABLE flux_email_attachments (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id                uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    message_id              uuid NOT NULL REFERENCES flux_email_messages (id) ON DELETE CASCADE,
    provider_attachment_id  text NOT NULL,
    provider_message_id     text NOT NULL,
    original_filename       text,
    original_url            text,
    content_type            text,
    content_id              text,
    is_inline               boolean NOT NULL DEFAULT false,
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'downloading', 'completed', 'failed')),
    local_filename          text,
    retry_count             integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    error_message           text,
    downloaded_at           timestamptz,
    checksum                text,
    size                    bigint CHECK (size IS NULL OR size >= 0),
    extracted_text          text,
    skipped_reason          text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    deleted_at              timestamptz,
    UNIQUE (message_id, provider_attachment_id)
);
-- Claims of pending work and the reset of stuck downloads.
CREATE INDEX flux_email_attachments_work_idx ON flux_email_attachments (status, updated_at)
    WHERE status IN ('pending', 'downloading');
CREATE INDEX flux_email_attachments_local_idx ON flux_email_attachments (local_filename)
    WHERE local_filename IS NOT NULL;

-- Every webhook delivery, kept as an audit log. The trigger in sql/ queues each new row.
CREATE TABLE flux_webhook_notifications (
    id                      uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id              text NOT NULL UNIQUE,   -- the provider's notification id
    notification_type       text NOT NULL CHECK (notification_type <> ''),
    provider                text NOT NULL DEFAULT 'nylas',
    grant_id                text,
    inbox_id                uuid REFERENCES flux_inboxes (id) ON DELETE SET NULL,
    object_id               text,
    payload                 jsonb NOT NULL,
    event_time              timestamptz,            -- the provider's `time`
    status                  text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'processing', 'processed',
                                              'skipped', 'error')),
    attempts                integer NOT NULL DEFAULT 0,
    error_message           text,
    received_at             timestamptz NOT NULL DEFAULT now(),
    processed_at            timestamptz,
    processing_duration_ms  integer
);
CREATE INDEX flux_webhook_notifications_received_idx
    ON flux_webhook_notifications (received_at DESC);
CREATE INDEX flux_webhook_notifications_status_idx
    ON flux_webhook_notifications (status, received_at DESC);
-- Per-grant lookups: the last notification of a grant (catch-up), events of one object.
CREATE INDEX flux_webhook_notifications_grant_idx
    ON flux_webhook_notifications (grant_id, received_at DESC);

-- Per-thread work of a backfill. Status changes feed inbox_sync_stats through triggers.
CREATE TABLE queued_threads (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    config_id               uuid NOT NULL REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    inbox_id                uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    grant_id                text,
    provider_thread_id      text NOT NULL CHECK (provider_thread_id <> ''),
    status                  text NOT NULL DEFAULT 'queued'
                            CHECK (status IN ('queued', 'processing', 'completed', 'failed')),
    attempts                integer NOT NULL DEFAULT 0,
    message_count           integer NOT NULL DEFAULT 0,
    error_message           text,
    queue_msg_id            bigint,
    queued_at               timestamptz NOT NULL DEFAULT now(),
    started_at              timestamptz,
    processed_at            timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (config_id, provider_thread_id)
);
-- Recovery looks for rows stuck in a status for too long.
CREATE INDEX queued_threads_status_idx ON queued_threads (config_id, status, updated_at);
CREATE INDEX queued_threads_failed_idx ON queued_threads (processed_at DESC)
    WHERE status = 'failed';

-- Counters per configuration, kept exact by triggers on queued_threads.
-- threads_queued counts every thread queued for the backfill (the seed's denominator);
-- the others count threads by their current status.
CREATE TABLE inbox_sync_stats (
    config_id               uuid PRIMARY KEY REFERENCES flux_inbox_configurations (id) ON DELETE CASCADE,
    inbox_id                uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    backfill_status         text,          -- mirrors the configuration (the seed's queries read it)
    threads_queued          bigint NOT NULL DEFAULT 0,
    threads_pending         bigint NOT NULL DEFAULT 0,
    threads_processing      bigint NOT NULL DEFAULT 0,
    threads_completed       bigint NOT NULL DEFAULT 0,
    threads_failed          bigint NOT NULL DEFAULT 0,
    messages_synced         bigint NOT NULL DEFAULT 0,
    sync_started_at         timestamptz NOT NULL DEFAULT now(),
    sync_completed_at       timestamptz,
    last_updated_at         timestamptz NOT NULL DEFAULT now()
);
