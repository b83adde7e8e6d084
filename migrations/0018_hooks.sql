-- Outbound webhooks (issue #20 item 3; nova.hooks delivers, sql/160_hooks.sql holds the functions).
--
-- An endpoint is a URL that receives the change feed (nova_events, migration 0015) signed as
-- Standard Webhooks do. Where an endpoint stands in an inbox's feed is the feed's own cursor,
-- nova_event_cursors with consumer 'hook:<endpoint id>'; nova_hook_streams holds the rest of
-- that (endpoint, inbox) pair's delivery state: the event being retried, its attempts and when
-- the next one is due. Events that used up their retries go to nova_hook_dead_letters, with the
-- body as it was signed, so that a replay sends it unchanged.

CREATE TABLE nova_hook_endpoints (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    url                    text NOT NULL CHECK (url ~ '^https?://[^\s]+$'),
    -- Kinds delivered ('message.created', or 'message.*' for a group); empty: every kind.
    event_kinds            text[] NOT NULL DEFAULT '{}',
    -- 'whsec_' || base64(key). Kept readable: HMAC signing needs the key itself.
    secret                 text NOT NULL CHECK (secret LIKE 'whsec\_%'),
    -- After a rotation the old secret signs too (a second signature), until this time.
    previous_secret        text CHECK (previous_secret LIKE 'whsec\_%'),
    previous_secret_until  timestamptz,
    enabled                boolean NOT NULL DEFAULT true,
    disabled_reason        text,
    disabled_at            timestamptz,
    -- Start of an unbroken run of failed deliveries (any inbox); a success clears it. An endpoint
    -- failing for NOVA_HOOKS_DISABLE_AFTER_DAYS is disabled.
    failing_since          timestamptz,
    -- A 429 or 503 with Retry-After pauses every inbox of the endpoint until then.
    throttled_until        timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CHECK (enabled OR disabled_at IS NOT NULL)
);

CREATE TABLE nova_hook_streams (
    endpoint_id       uuid NOT NULL REFERENCES nova_hook_endpoints (id) ON DELETE CASCADE,
    inbox_id          uuid NOT NULL,
    -- The event of the last failed attempt (the head of the line), and its attempts so far.
    event_id          bigint,
    attempts          integer NOT NULL DEFAULT 0,
    first_attempt_at  timestamptz,
    next_attempt_at   timestamptz,           -- NULL: due now
    last_error        text,
    last_status       integer,
    -- The last attempt never reached the endpoint (connection refused, unreachable): due again
    -- as soon as the endpoint answers another inbox's delivery.
    unreachable       boolean NOT NULL DEFAULT false,
    -- Held by one delivery task at a time, across processes; a dead process's lease runs out.
    leased_until      timestamptz,
    lease_token       uuid,
    served_at         timestamptz,           -- last claimed: the least recently served go first
    delivered         bigint NOT NULL DEFAULT 0,
    last_delivered_at timestamptz,
    PRIMARY KEY (endpoint_id, inbox_id)
);
-- What is leased now, per endpoint (its share of the concurrency).
CREATE INDEX nova_hook_streams_leased_idx ON nova_hook_streams (endpoint_id, leased_until)
    WHERE leased_until IS NOT NULL;
CREATE INDEX nova_hook_streams_unreachable_idx ON nova_hook_streams (endpoint_id)
    WHERE unreachable AND next_attempt_at IS NOT NULL;

CREATE TABLE nova_hook_dead_letters (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id       uuid NOT NULL REFERENCES nova_hook_endpoints (id) ON DELETE CASCADE,
    inbox_id          uuid NOT NULL,
    event_id          bigint NOT NULL,
    position          bigint NOT NULL,
    kind              text NOT NULL,
    body              text NOT NULL,         -- the payload as signed and sent
    attempts          integer NOT NULL,
    first_attempt_at  timestamptz NOT NULL,
    last_error        text,
    last_status       integer,
    dead_at           timestamptz NOT NULL DEFAULT now(),
    -- dead -> replaying (nova replay hooks): delivered, the row goes; else dead again after its
    -- retries.
    status            text NOT NULL DEFAULT 'dead' CHECK (status IN ('dead', 'replaying')),
    replays           integer NOT NULL DEFAULT 0,
    replay_attempts   integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    leased_until      timestamptz,
    lease_token       uuid,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX nova_hook_dead_letters_replaying_idx ON nova_hook_dead_letters (endpoint_id, next_attempt_at)
    WHERE status = 'replaying';
CREATE INDEX nova_hook_dead_letters_dead_idx ON nova_hook_dead_letters (dead_at)
    WHERE status = 'dead';
