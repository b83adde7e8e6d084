-- The change feed (issue 20, items 1-2): every change Nova applies to the mailbox writes an
-- event in the same transaction (triggers and nova_record_event in sql/140_events.sql), with a
-- position that orders the events of an inbox in commit order; named consumers read them past
-- their per-inbox cursors and acknowledge them. The contract other code builds on is
-- /work/notes/EVENTS_CONTRACT.md and the README's "Change feed" section.

-- One row per change. Thin: ids and what changed, never bodies. No foreign key: an insert costs
-- its indexes and nothing else, and events outlive nothing they name (a consumer reads the
-- object's current row by object_id).
CREATE TABLE nova_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    inbox_id    uuid NOT NULL,
    -- per-inbox order, assigned at commit by nova_events_number (a deferred constraint
    -- trigger): never NULL in a committed row
    position    bigint,
    kind        text NOT NULL CHECK (kind ~ '^[a-z_]+\.[a-z_]+$'),
    object_id   text NOT NULL,
    provider_id text,
    thread_id   uuid,
    changes     jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (inbox_id, position)
);
-- The events of the committing transaction, found by its id at commit. Holds only events not
-- yet numbered: written and emptied by the same transaction.
CREATE INDEX nova_events_unnumbered_idx ON nova_events (xid) WHERE position IS NULL;

-- Per inbox: the last position assigned (so listing the inboxes with unread events costs one
-- row per inbox, never the history) and what retention pruned: every position up to
-- pruned_through is gone. oldest_at: when the oldest event kept was written (NULL: none kept),
-- the retention pass's index of what is due.
CREATE TABLE nova_event_heads (
    inbox_id       uuid PRIMARY KEY,
    position       bigint NOT NULL DEFAULT 0,
    pruned_through bigint NOT NULL DEFAULT 0,
    oldest_at      timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX nova_event_heads_oldest_idx ON nova_event_heads (oldest_at)
    WHERE oldest_at IS NOT NULL;

-- A named consumer's acknowledged position per inbox: it has handled every event up to it.
-- No row: nothing acknowledged (position 0). Outbound webhooks use 'hook:<endpoint id>'.
CREATE TABLE nova_event_cursors (
    consumer   text NOT NULL CHECK (consumer <> '' AND length(consumer) <= 200),
    inbox_id   uuid NOT NULL,
    position   bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, inbox_id)
);
