-- Gmail inboxes (and any provider with per-inbox OAuth credentials and a change feed).

-- The inbox's OAuth client and refresh token. `secret` is a Fernet token (AES-128-CBC +
-- HMAC-SHA256) of {"client_secret", "refresh_token"} under the key in NOVA_CREDENTIALS_KEY:
-- a dump of the database alone does not give the token away (nova/credentials.py).
CREATE TABLE flux_inbox_credentials (
    inbox_id    uuid PRIMARY KEY REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    kind        text NOT NULL DEFAULT 'authorized_user' CHECK (kind = 'authorized_user'),
    client_id   text NOT NULL,
    token_uri   text NOT NULL,
    scopes      text[] NOT NULL DEFAULT '{}',
    secret      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Incremental sync from a provider's change feed (Gmail: history.list from a historyId).
--   sync_cursor           where the next sync starts (Gmail: the last applied historyId)
--   sync_cursor_at        when it last moved
--   changes_requested_at  a push or poll asked for a sync; a running sync that started before
--                         it runs again, so a push during a sync is never lost
--   watch_expires_at      users.watch registration (GMAIL_PUBSUB_TOPIC), renewed daily
ALTER TABLE flux_inboxes
    ADD COLUMN sync_cursor text,
    ADD COLUMN sync_cursor_at timestamptz,
    ADD COLUMN changes_requested_at timestamptz,
    ADD COLUMN changes_synced_at timestamptz,
    ADD COLUMN watch_expires_at timestamptz;
