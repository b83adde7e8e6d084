-- Folders and labels (issue 20, item 5; table flux_email_folders, migrations/0016_folders.sql).
-- Every write goes through the three functions below; the trigger at the end records the
-- change-feed events (folder.created / folder.updated / folder.deleted) when something really
-- changed, so a replayed webhook or a repeated listing records nothing.
--
-- Order: a write carries the provider's version (a webhook's time, a listing's fetch version);
-- one older than the row's provider_updated_at changes nothing. Rows are written in
-- provider_folder_id order, so two listings of one inbox never wait on each other in a cycle.
-- Folder rows are locked by nothing else a job holds: these transactions take no thread lock.

-- Upserts folders of one inbox. p_folders: a jsonb array of objects {id, name, parent_id,
-- role, system, attributes, background_color, text_color, total_count, unread_count}, all
-- already cleaned (nova/providers/folders.py). p_fields names the fields the payload really
-- had ('name', 'parent', 'role', 'colour', 'counts', 'attributes'): the others keep their
-- stored value (a partial webhook never blanks a name). A soft-deleted folder written again
-- by a newer version is live again. Returns how many rows were inserted and updated.
CREATE OR REPLACE FUNCTION nova_apply_folders(p_inbox uuid, p_folders jsonb, p_fields text[],
                                              p_version timestamptz)
RETURNS TABLE (inserted integer, updated integer)
LANGUAGE plpgsql AS $$
DECLARE
    v_name    boolean := 'name' = ANY (p_fields);
    v_parent  boolean := 'parent' = ANY (p_fields);
    v_role    boolean := 'role' = ANY (p_fields);
    v_colour  boolean := 'colour' = ANY (p_fields);
    v_counts  boolean := 'counts' = ANY (p_fields);
    v_attrs   boolean := 'attributes' = ANY (p_fields);
BEGIN
    RETURN QUERY
    WITH input AS (
        SELECT DISTINCT ON (x.id) x.*
        FROM jsonb_to_recordset(p_folders) AS x(
            id text, name text, parent_id text, role text, system boolean, attributes text[],
            background_color text, text_color text, total_count integer, unread_count integer)
        WHERE x.id IS NOT NULL AND x.id <> ''
        ORDER BY x.id
    ), written AS (
        INSERT INTO flux_email_folders AS t (
            inbox_id, provider_folder_id, name, provider_parent_id, role, system_folder,
            attributes, background_color, text_color, total_count, unread_count, counts_at,
            provider_updated_at)
        SELECT p_inbox, i.id, coalesce(nullif(i.name, ''), i.id),
               CASE WHEN v_parent THEN i.parent_id END,
               CASE WHEN v_role THEN i.role END, v_role AND coalesce(i.system, false),
               CASE WHEN v_attrs THEN i.attributes END,
               CASE WHEN v_colour THEN i.background_color END,
               CASE WHEN v_colour THEN i.text_color END,
               CASE WHEN v_counts THEN i.total_count END,
               CASE WHEN v_counts THEN i.unread_count END,
               CASE WHEN v_counts AND (i.total_count IS NOT NULL OR i.unread_count IS NOT NULL)
                    THEN p_version END,
               p_version
        FROM input i
        ORDER BY i.id
        ON CONFLICT (inbox_id, provider_folder_id) DO UPDATE SET
            name = CASE WHEN v_name THEN EXCLUDED.name ELSE t.name END,
            provider_parent_id = CASE WHEN v_parent THEN EXCLUDED.provider_parent_id
                                      ELSE t.provider_parent_id END,
            role = CASE WHEN v_role THEN EXCLUDED.role ELSE t.role END,
            system_folder = CASE WHEN v_role THEN EXCLUDED.system_folder
                                 ELSE t.system_folder END,
            attributes = CASE WHEN v_attrs THEN EXCLUDED.attributes ELSE t.attributes END,
            background_color = CASE WHEN v_colour THEN EXCLUDED.background_color
                                    ELSE t.background_color END,
            text_color = CASE WHEN v_colour THEN EXCLUDED.text_color ELSE t.text_color END,
            total_count = CASE WHEN v_counts THEN EXCLUDED.total_count ELSE t.total_count END,
            unread_count = CASE WHEN v_counts THEN EXCLUDED.unread_count
                                ELSE t.unread_count END,
            counts_at = CASE WHEN v_counts THEN EXCLUDED.counts_at ELSE t.counts_at END,
            provider_updated_at = greatest(t.provider_updated_at, EXCLUDED.provider_updated_at),
            deleted_at = NULL,
            updated_at = now()
        WHERE (t.provider_updated_at IS NULL
               OR t.provider_updated_at <= EXCLUDED.provider_updated_at)
          AND (t.deleted_at IS NOT NULL
               OR (v_name AND t.name IS DISTINCT FROM EXCLUDED.name)
               OR (v_parent AND t.provider_parent_id IS DISTINCT FROM EXCLUDED.provider_parent_id)
               OR (v_role AND (t.role, t.system_folder)
                              IS DISTINCT FROM (EXCLUDED.role, EXCLUDED.system_folder))
               OR (v_attrs AND t.attributes IS DISTINCT FROM EXCLUDED.attributes)
               OR (v_colour AND (t.background_color, t.text_color)
                                IS DISTINCT FROM (EXCLUDED.background_color, EXCLUDED.text_color))
               -- counts read again later say "as of then", even when they did not change
               OR (v_counts AND ((t.total_count, t.unread_count)
                                 IS DISTINCT FROM (EXCLUDED.total_count, EXCLUDED.unread_count)
                                 OR t.counts_at IS DISTINCT FROM EXCLUDED.counts_at
                                    AND (t.counts_at IS NULL
                                         OR t.counts_at < EXCLUDED.counts_at))))
        RETURNING (xmax = 0) AS fresh
    )
    SELECT count(*) FILTER (WHERE fresh)::integer, count(*) FILTER (WHERE NOT fresh)::integer
    FROM written;
END;
$$;

-- A folder the provider says is deleted (Nylas folder.deleted): soft-deleted. A folder never
-- stored leaves a tombstone, so that an older folder.created delivered late does not bring it
-- back. Returns true when the row changed.
CREATE OR REPLACE FUNCTION nova_delete_folder(p_inbox uuid, p_folder_id text, p_name text,
                                              p_version timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO flux_email_folders AS t (inbox_id, provider_folder_id, name,
                                         provider_updated_at, deleted_at)
    VALUES (p_inbox, p_folder_id, coalesce(nullif(p_name, ''), p_folder_id), p_version, now())
    ON CONFLICT (inbox_id, provider_folder_id) DO UPDATE SET
        deleted_at = now(), updated_at = now(),
        provider_updated_at = greatest(t.provider_updated_at, EXCLUDED.provider_updated_at)
    WHERE t.deleted_at IS NULL
      AND (t.provider_updated_at IS NULL OR t.provider_updated_at <= EXCLUDED.provider_updated_at)
    RETURNING t.id INTO v_id;
    RETURN v_id IS NOT NULL;
END;
$$;

-- After a complete listing (Nylas folders list, Gmail labels.list): the live folders of the
-- inbox that it did not list are soft-deleted, unless a newer write (a folder.created after
-- the listing was read) says otherwise. Returns how many. The listed ids are matched by a hash
-- (or merge) anti-join: the row estimate of a small inbox's folders, or of a table not yet
-- analysed, would otherwise choose a nested loop, quadratic in the number of labels (4 s at
-- 10,000, what Gmail allows).
CREATE OR REPLACE FUNCTION nova_prune_folders(p_inbox uuid, p_listed text[],
                                              p_version timestamptz)
RETURNS integer
LANGUAGE sql
SET enable_nestloop = off
AS $$
    WITH gone AS (
        SELECT f.id FROM flux_email_folders f
        WHERE f.inbox_id = p_inbox AND f.deleted_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM unnest(p_listed) AS l(id)
                          WHERE l.id = f.provider_folder_id)
          AND (f.provider_updated_at IS NULL OR f.provider_updated_at <= p_version)
        ORDER BY f.provider_folder_id
        FOR UPDATE
    ), done AS (
        UPDATE flux_email_folders f
        SET deleted_at = now(), updated_at = now(),
            provider_updated_at = greatest(f.provider_updated_at, p_version)
        FROM gone WHERE f.id = gone.id
        RETURNING 1
    )
    SELECT count(*)::integer FROM done;
$$;

-- ------------------------------------------------------------------ reading
-- The live folders with their parent's name (the read contract's folder view).
CREATE OR REPLACE VIEW nova_folders AS
SELECT f.id, f.inbox_id, f.provider_folder_id, f.name, f.role, f.system_folder,
       f.provider_parent_id, p.name AS parent_name, f.background_color, f.text_color,
       f.total_count, f.unread_count, f.counts_at, f.attributes, f.created_at, f.updated_at
FROM flux_email_folders f
LEFT JOIN flux_email_folders p
       ON p.inbox_id = f.inbox_id AND p.provider_folder_id = f.provider_parent_id
      AND p.deleted_at IS NULL
WHERE f.deleted_at IS NULL;

-- One row per folder id of each live message, in the message's order, with the folder's name
-- and role (NULL when the id names no folder Nova knows). A folder deleted since keeps its
-- last name here, with folder_deleted.
CREATE OR REPLACE VIEW nova_message_folders AS
SELECT m.id AS message_id, m.inbox_id, m.thread_id, u.position::integer AS position,
       u.provider_folder_id, f.id AS folder_id, f.name, f.role,
       (f.deleted_at IS NOT NULL) AS folder_deleted
FROM flux_email_messages m
CROSS JOIN LATERAL unnest(m.folders) WITH ORDINALITY AS u(provider_folder_id, position)
LEFT JOIN flux_email_folders f
       ON f.inbox_id = m.inbox_id AND f.provider_folder_id = u.provider_folder_id
WHERE m.deleted_at IS NULL;

-- The live folders of an inbox that a word names: its role ('sent', 'trash'...), its name
-- (case-insensitively) or its provider id. Roles first, then exact names, then ids.
CREATE OR REPLACE FUNCTION nova_find_folders(p_inbox uuid, p_name_or_role text)
RETURNS SETOF nova_folders
LANGUAGE sql STABLE AS $$
    SELECT v.* FROM nova_folders v
    WHERE v.inbox_id = p_inbox
      AND (v.role = lower(btrim(p_name_or_role))
           OR lower(v.name) = lower(btrim(p_name_or_role))
           OR v.provider_folder_id = p_name_or_role)
    ORDER BY (v.role = lower(btrim(p_name_or_role))) DESC NULLS LAST,
             (lower(v.name) = lower(btrim(p_name_or_role))) DESC, v.name, v.provider_folder_id;
$$;

-- The names of a list of folder ids (a message's folders), in order; an unknown id stays as
-- it is.
CREATE OR REPLACE FUNCTION nova_folder_names(p_inbox uuid, p_folder_ids text[])
RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(coalesce(f.name, u.id) ORDER BY u.n), '{}')
    FROM unnest(p_folder_ids) WITH ORDINALITY AS u(id, n)
    LEFT JOIN flux_email_folders f ON f.inbox_id = p_inbox AND f.provider_folder_id = u.id;
$$;

-- How many live messages Nova holds in each folder id of an inbox, and how many of them are
-- unread: Nova's own count (the provider's, when it gives one, is in total_count /
-- unread_count as of counts_at). Reads the inbox's messages: an operator's question, not a
-- hot path.
CREATE OR REPLACE FUNCTION nova_folder_message_counts(p_inbox uuid)
RETURNS TABLE (provider_folder_id text, messages bigint, unread bigint)
LANGUAGE sql STABLE AS $$
    SELECT u.fid, count(*), count(*) FILTER (WHERE m.unread)
    FROM flux_email_messages m CROSS JOIN LATERAL unnest(m.folders) AS u(fid)
    WHERE m.inbox_id = p_inbox AND m.deleted_at IS NULL
    GROUP BY u.fid;
$$;

-- ------------------------------------------------------------------ change feed
-- folder.created (a new live row, or a deleted one live again), folder.updated (what changed
-- of name, parent, role, colour: counts and attributes alone make no event) and folder.deleted,
-- recorded in the writing transaction through nova_record_event (sql/140_events.sql).
CREATE OR REPLACE FUNCTION nova_folder_changes(f flux_email_folders)
RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'name', f.name, 'parent', f.provider_parent_id, 'role', f.role,
        'colour', CASE WHEN f.background_color IS NOT NULL OR f.text_color IS NOT NULL
                       THEN jsonb_build_object('background', f.background_color,
                                               'text', f.text_color) END));
$$;

CREATE OR REPLACE FUNCTION nova_folder_event()
RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_changes jsonb := '{}'::jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.deleted_at IS NULL THEN
            PERFORM nova_record_event(NEW.inbox_id, 'folder.created', NEW.id::text,
                                      NEW.provider_folder_id, NULL, nova_folder_changes(NEW));
        END IF;
        RETURN NULL;
    END IF;
    IF OLD.deleted_at IS NULL AND NEW.deleted_at IS NOT NULL THEN
        PERFORM nova_record_event(NEW.inbox_id, 'folder.deleted', NEW.id::text,
                                  NEW.provider_folder_id, NULL, '{}'::jsonb);
    ELSIF OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL THEN
        PERFORM nova_record_event(NEW.inbox_id, 'folder.created', NEW.id::text,
                                  NEW.provider_folder_id, NULL, nova_folder_changes(NEW));
    ELSIF NEW.deleted_at IS NULL THEN
        IF NEW.name IS DISTINCT FROM OLD.name THEN
            v_changes := v_changes || jsonb_build_object('name', NEW.name);
        END IF;
        IF NEW.provider_parent_id IS DISTINCT FROM OLD.provider_parent_id THEN
            v_changes := v_changes || jsonb_build_object('parent', NEW.provider_parent_id);
        END IF;
        IF NEW.role IS DISTINCT FROM OLD.role THEN
            v_changes := v_changes || jsonb_build_object('role', NEW.role);
        END IF;
        IF (NEW.background_color, NEW.text_color)
           IS DISTINCT FROM (OLD.background_color, OLD.text_color) THEN
            v_changes := v_changes || jsonb_build_object('colour', jsonb_build_object(
                'background', NEW.background_color, 'text', NEW.text_color));
        END IF;
        IF v_changes <> '{}'::jsonb THEN
            PERFORM nova_record_event(NEW.inbox_id, 'folder.updated', NEW.id::text,
                                      NEW.provider_folder_id, NULL, v_changes);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- The trigger exists once the change feed does (sql/140_events.sql defines nova_record_event
-- and is applied before this file): without it, folders are written without events.
DO $$
BEGIN
    DROP TRIGGER IF EXISTS flux_email_folders_events ON flux_email_folders;
    IF to_regprocedure('nova_record_event(uuid, text, text, text, uuid, jsonb)') IS NOT NULL
    THEN
        CREATE TRIGGER flux_email_folders_events
            AFTER INSERT OR UPDATE ON flux_email_folders
            FOR EACH ROW EXECUTE FUNCTION nova_folder_event();
    END IF;
END;
$$;
