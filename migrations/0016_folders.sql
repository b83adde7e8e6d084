-- Folders and labels as objects (issue 20, item 5): each inbox's folders (Nylas) or labels
-- (Gmail) with their names, parents, system roles, colours and counts. Messages keep their
-- provider ids in flux_email_messages.folders; the views and functions of sql/150_folders.sql
-- give the names. Written by nova.folders (listings at backfill and, for Gmail, at every push)
-- and nova.webhooks (Nylas folder.created / folder.updated / folder.deleted), always through
-- nova_apply_folders / nova_delete_folder / nova_prune_folders.
CREATE TABLE flux_email_folders (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    inbox_id            uuid NOT NULL REFERENCES flux_inboxes (id) ON DELETE CASCADE,
    provider_folder_id  text NOT NULL,            -- what flux_email_messages.folders holds
    -- The display name, cleaned where it entered (no NUL, no lone surrogate, at most 400
    -- characters): data, never a path. The provider id when the provider gave none.
    name                text NOT NULL CHECK (name <> '' AND length(name) <= 400),
    provider_parent_id  text,                     -- the parent's provider id (Nylas parent_id;
                                                  -- Gmail: the label named by the path prefix)
    -- The system role, provider-neutral: inbox, sent, drafts, trash, spam, archive, starred,
    -- important, all, unread, chat, category_* ... NULL for a user's own folder.
    role                text CHECK (role ~ '^[a-z][a-z_]{0,39}$'),
    system_folder       boolean NOT NULL DEFAULT false,  -- the provider calls it a system one
    attributes          text[],                   -- Nylas attributes (\Inbox, \Sent ...)
    background_color    text CHECK (background_color ~ '^#[0-9a-f]{3,8}$'),
    text_color          text CHECK (text_color ~ '^#[0-9a-f]{3,8}$'),
    total_count         integer CHECK (total_count >= 0),   -- messages, as of counts_at
    unread_count        integer CHECK (unread_count >= 0),
    counts_at           timestamptz,              -- when the provider last gave the counts
    provider_updated_at timestamptz,              -- order guard: an older write is ignored
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz,
    UNIQUE (inbox_id, provider_folder_id)
);
-- Finding a folder by name (case-insensitively) or by role in one inbox.
CREATE INDEX flux_email_folders_name_idx ON flux_email_folders (inbox_id, lower(name))
    WHERE deleted_at IS NULL;
CREATE INDEX flux_email_folders_role_idx ON flux_email_folders (inbox_id, role)
    WHERE deleted_at IS NULL AND role IS NOT NULL;
