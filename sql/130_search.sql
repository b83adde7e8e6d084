-- Search (issue 20, item 4): search_messages(inbox, query, max_rows, cursor) understands Gmail's
-- operators, over the vectors and columns of migrations/0014_search.sql and 0020_search_order.sql.
-- A message or attachment write only queues it (triggers here); nova_search_index_pending,
-- called by the completion monitor, builds the message's search row later in batches.
--
-- The parser is plpgsql, so that an app calling search_messages needs nothing else. It turns
-- the query into a WHERE clause made of fixed fragments of this file only; every value the user
-- typed goes in as a bound parameter (an element or a slice of $2..$5), never into the text.
--
-- Grammar (what nova_search_compile accepts):
--   query   := item*                        items side by side: AND (OR inside { })
--   item    := ["-"] term | ["-"] "(" query ")" | ["-"] "{" query "}" | "OR" | "AND"
--   term    := word | "phrase" | op ":" (word | "phrase")
-- OR binds tighter than the implicit AND (Gmail: a OR b c = (a OR b) AND c). An unclosed quote
-- runs to the end; an unclosed group closes at the end; a stray ")" or "}" is ignored.

-- ------------------------------------------------------------------ documents
CREATE OR REPLACE FUNCTION nova_search_config()
RETURNS regconfig
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce((SELECT s.config::regconfig FROM nova_search_settings s), 'simple'::regconfig);
$$;

-- The entries of a message's address fields an index reads: in each field (from, to, cc, bcc:
-- field 1-4, prefix f:, t:, c:, b:) its first 100 elements that are objects, in order. SETOF and
-- plain SQL, like nova_search_document, so that it is inlined too.
CREATE OR REPLACE FUNCTION nova_search_addresses(m flux_email_messages)
RETURNS TABLE (prefix text, field integer, n bigint, email text, name text)
LANGUAGE sql STABLE AS $$
    SELECT f.prefix, f.field, e.n, e.a ->> 'email', e.a ->> 'name'
    FROM (VALUES ('f:', 1, m.from_addresses), ('t:', 2, m.to_addresses),
                 ('c:', 3, m.cc_addresses), ('b:', 4, m.bcc_addresses)) AS f(prefix, field, list)
    CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(f.list) = 'array'
                                                 THEN f.list ELSE '[]'::jsonb END)
        WITH ORDINALITY AS e(a, n)
    WHERE e.n <= 100 AND jsonb_typeof(e.a) = 'object';
$$;

-- The tokens an address is found by, each after its field's prefix: the whole address, its
-- local part, its domain and the domain's parent domains (mail.example.com: example.com), and
-- every run of letters and digits of the address and of the name.
CREATE OR REPLACE FUNCTION nova_search_address_tokens(p_prefix text, p_email text, p_name text)
RETURNS SETOF text
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_prefix || t.tok
    FROM (SELECT lower(left(p_email, 320)) AS email, lower(left(p_name, 200)) AS name) x
    CROSS JOIN LATERAL (
        SELECT x.email
        UNION ALL SELECT split_part(x.email, '@', 1) WHERE x.email LIKE '%@%'
        UNION ALL SELECT split_part(x.email, '@', 2)
        UNION ALL SELECT array_to_string(d.parts[i:], '.')
                  FROM (SELECT string_to_array(split_part(x.email, '@', 2), '.') AS parts) d,
                       generate_series(2, coalesce(array_length(d.parts, 1), 0) - 1) AS i
        UNION ALL SELECT regexp_split_to_table(x.email, '[^[:alnum:]]+')
        UNION ALL SELECT regexp_split_to_table(x.name, '[^[:alnum:]]+')
    ) t(tok)
    WHERE t.tok <> '';
$$;

-- (Before: one scalar SQL function per field. Those are not inlined: each call started an
-- executor of its own, half of the index step's time.)
DROP FUNCTION IF EXISTS nova_search_addr_tokens(text, jsonb);
DROP FUNCTION IF EXISTS nova_search_people_text(jsonb, jsonb, jsonb, jsonb);

-- Two fields' vectors side by side, the second one position further: between them a lexeme
-- no parser makes (it holds a space), taken out again when the document is done
-- (nova_search_document). A phrase never runs from the end of one field (the subject, an
-- attachment's name) into the start of the next.
CREATE OR REPLACE FUNCTION nova_search_join(p_a tsvector, p_b tsvector)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_a || $g$'nova gap':1$g$::tsvector || p_b;
$$;

CREATE OR REPLACE AGGREGATE nova_search_join_all(tsvector) (
    SFUNC = nova_search_join, STYPE = tsvector, INITCOND = '');

-- Subject (A) over people (B) over body (C). Inputs are cut (subject 2,000 characters, body
-- 60,000) so that a vector stays well under PostgreSQL's 1 MB limit for any text: a message
-- write must never fail on its search vector. Positions past 16,383 are folded by PostgreSQL,
-- so a phrase deep in a long body may not be found.
CREATE OR REPLACE FUNCTION nova_search_message_tsv(p_config regconfig, p_subject text,
                                                   p_people text, p_body text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT nova_search_join(nova_search_join(
               setweight(to_tsvector(p_config, left(coalesce(p_subject, ''), 2000)), 'A'),
               setweight(to_tsvector(p_config, coalesce(p_people, '')), 'B')),
               setweight(to_tsvector(p_config, left(coalesce(p_body, ''), 60000)), 'C'));
$$;

-- A file name is searched by its parts too: "Q3-report.pdf" -> q3, report, pdf.
CREATE OR REPLACE FUNCTION nova_search_filename_text(p_name text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(left(coalesce(p_name, ''), 500), '[^[:alnum:]]+', ' ', 'g');
$$;

-- A message's search row: the vector (subject A, people B, body C, then each live attachment's
-- file name and text D, fields one position apart) and addr (the address tokens, and 'n:'
-- before each part of each file name, for filename:), with its inbox and sort date. The
-- attachments' text is cut at 60,000 characters together (at most 100 attachments), as the
-- body is: the vector stays well under PostgreSQL's 1 MB.
-- SETOF and plain SQL on purpose, as the functions it reads addresses with: the planner inlines
-- them all into the statement that calls it, which is planned once and then run row by row.
-- A function that is not inlined starts an executor of its own at every call: as a scalar
-- function per message this one cost 1.6-3.4 ms a message, and the address fields read by
-- scalar functions were still half of the index step's time (0.16 ms a message, now 0.12).
CREATE OR REPLACE FUNCTION nova_search_document(p_config regconfig, m flux_email_messages)
RETURNS SETOF flux_email_message_search
LANGUAGE sql STABLE AS $$
    SELECT m.id,
           ts_delete(nova_search_join(
               nova_search_message_tsv(p_config, m.subject, p.people,
                                       coalesce(m.body_text, m.body_cleaned, m.snippet)),
               coalesce(a.tsv, '')), 'nova gap'),
           coalesce(p.tokens, '{}') || coalesce(a2.tokens, '{}'),
           m.inbox_id,
           coalesce(m.sent_at, m.created_at)
    -- people: names and addresses as words (weight B), so that "alice", "example" and
    -- "alice@example.com" all find alice@example.com; tokens: what from: to: cc: bcc: match
    FROM (SELECT left(coalesce(string_agg(concat_ws(' ', x.name, x.email,
                                                    regexp_replace(x.email, '[^[:alnum:]]+',
                                                                   ' ', 'g')),
                                          ' ' ORDER BY x.field, x.n), ''), 20000) AS people,
                 (SELECT array_agg(DISTINCT t.tok)
                  FROM nova_search_addresses(m) y
                  CROSS JOIN LATERAL nova_search_address_tokens(y.prefix, y.email, y.name) t(tok)
                 ) AS tokens
          FROM nova_search_addresses(m) x) p
    CROSS JOIN LATERAL
         (SELECT nova_search_join_all(nova_search_join(
                     setweight(to_tsvector(p_config,
                                           nova_search_filename_text(f.original_filename)), 'D'),
                     setweight(to_tsvector(p_config, coalesce(left(f.extracted_text, f.room), '')),
                               'D'))
                     ORDER BY f.id) AS tsv,
                 array_agg(f.original_filename) AS files
          FROM (SELECT x.id, x.original_filename, x.extracted_text,
                       -- what is left of the 60,000 characters after the attachments before
                       greatest(0, 60000 - coalesce(sum(length(x.extracted_text)) OVER (
                           ORDER BY x.id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
                           0))::integer AS room
                FROM (SELECT y.id, y.original_filename, left(y.extracted_text, 60000) AS extracted_text
                      FROM flux_email_attachments y
                      WHERE y.message_id = m.id AND y.deleted_at IS NULL
                      ORDER BY y.id LIMIT 100) x) f) a
    CROSS JOIN LATERAL (
        SELECT array_agg(DISTINCT 'n:' || t.part) AS tokens
        FROM unnest(a.files) AS n(name)
        CROSS JOIN LATERAL regexp_split_to_table(lower(left(n.name, 500)), '[^[:alnum:]]+') AS t(part)
        WHERE t.part <> '') a2;
$$;

-- ------------------------------------------------------------------ triggers
-- Indexing is off the write path: a message write only queues its id in
-- flux_email_search_pending, an attachment write its attachment in
-- flux_email_search_pending_attachments; nova_search_index_pending (run by the thread
-- processes as mail arrives, nova/search_index.py) builds the search rows later, in batches. AFTER INSERT
-- fires only for a row really inserted (not for an upsert that updated a stored row), and AFTER
-- UPDATE only when a searched column changed, so a thread re-sync or a flag change that leaves
-- the text alone costs nothing here. Lock order: the messages a statement writes, then their
-- queue rows; the attachments, then theirs.
--
-- DO UPDATE, not DO NOTHING: a writer whose message is already queued must still lock the
-- queued row until it commits. Else a batch could take that row, read the text as it was
-- before this uncommitted write, index it and delete the row: the new text would never be
-- indexed. Locked, the row is skipped by the batch (SKIP LOCKED) until the writer commits; a
-- writer that comes while a batch holds the row waits for it, then queues the message again.
CREATE OR REPLACE FUNCTION flux_email_messages_search()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flux_email_search_pending AS p (message_id) VALUES (NEW.id)
    ON CONFLICT (message_id) DO UPDATE SET queued_at = EXCLUDED.queued_at;
    RETURN NULL;
END;
$$;

-- Inserted messages: one statement per writing statement (a thread's messages, a webhook
-- batch), in id order, from its transition table.
CREATE OR REPLACE FUNCTION flux_email_messages_search_queue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flux_email_search_pending AS p (message_id)
    SELECT n.id FROM new_messages n ORDER BY n.id
    ON CONFLICT (message_id) DO UPDATE SET queued_at = EXCLUDED.queued_at;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_messages_search_insert
    AFTER INSERT ON flux_email_messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION flux_email_messages_search_queue();

-- sent_at too: the search row keeps the message's sort date
CREATE OR REPLACE TRIGGER flux_email_messages_search_update
    AFTER UPDATE OF subject, snippet, from_addresses, to_addresses, cc_addresses,
                    bcc_addresses, body_text, body_cleaned, sent_at ON flux_email_messages
    FOR EACH ROW
    WHEN (OLD.subject IS DISTINCT FROM NEW.subject
          OR OLD.body_text IS DISTINCT FROM NEW.body_text
          OR OLD.from_addresses IS DISTINCT FROM NEW.from_addresses
          OR OLD.to_addresses IS DISTINCT FROM NEW.to_addresses
          OR OLD.cc_addresses IS DISTINCT FROM NEW.cc_addresses
          OR OLD.bcc_addresses IS DISTINCT FROM NEW.bcc_addresses
          OR OLD.body_cleaned IS DISTINCT FROM NEW.body_cleaned
          OR OLD.snippet IS DISTINCT FROM NEW.snippet
          OR OLD.sent_at IS DISTINCT FROM NEW.sent_at)
    EXECUTE FUNCTION flux_email_messages_search();

-- Attachments: the same protocol on their own queue (see migrations/0020_search_order.sql for
-- why not the message's). Inserted rows in one statement, in id order.
CREATE OR REPLACE FUNCTION flux_email_attachments_search_queue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flux_email_search_pending_attachments AS p (attachment_id, message_id)
    SELECT n.id, n.message_id FROM new_attachments n ORDER BY n.id
    ON CONFLICT (attachment_id) DO UPDATE SET queued_at = EXCLUDED.queued_at;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_attachments_search_queue
    AFTER INSERT ON flux_email_attachments
    REFERENCING NEW TABLE AS new_attachments
    FOR EACH STATEMENT EXECUTE FUNCTION flux_email_attachments_search_queue();

CREATE OR REPLACE FUNCTION flux_email_attachments_search_requeue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO flux_email_search_pending_attachments AS p (attachment_id, message_id)
    VALUES (NEW.id, NEW.message_id)
    ON CONFLICT (attachment_id) DO UPDATE SET queued_at = EXCLUDED.queued_at;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_attachments_search_requeue
    AFTER UPDATE OF original_filename, extracted_text, deleted_at ON flux_email_attachments
    FOR EACH ROW
    WHEN (OLD.original_filename IS DISTINCT FROM NEW.original_filename
          OR OLD.extracted_text IS DISTINCT FROM NEW.extracted_text
          OR (OLD.deleted_at IS NULL) <> (NEW.deleted_at IS NULL))
    EXECUTE FUNCTION flux_email_attachments_search_requeue();

-- Every writer of search rows (this step, nova_search_rebuild) holds this transaction lock:
-- two batches building one message from two snapshots could otherwise leave the older text
-- last (one taking its queue row, the other an attachment's). ("nova" "srch" in ASCII.)
CREATE OR REPLACE FUNCTION nova_search_lock_key()
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT x'6e6f766173726368'::bigint $$;

-- One batch of the index: up to p_limit queue rows, the oldest first (messages, then
-- attachments), are taken, their messages get their search rows (in the current configuration), built and
-- upserted in one statement, and the queue rows go. Returns how many queue rows were taken (a
-- message deleted meanwhile counts, and only leaves the queue); 0 also when another batch is
-- running. Locks queue rows (FOR UPDATE SKIP LOCKED: one a writer holds waits for a later
-- batch) and search rows, in message id order; never a thread, message or attachment row.
-- Two statements on purpose: the text is read with a snapshot taken after the queue rows are
-- locked, so every write that queued them has committed and is seen; a write that comes later
-- waits on its queue row and queues again once this batch commits.
CREATE OR REPLACE FUNCTION nova_search_index_pending(p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
    v_atts uuid[];
    v_messages uuid[];
    v_config regconfig;
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'search: p_limit must be >= 1, got %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT pg_try_advisory_xact_lock(nova_search_lock_key()) THEN
        RETURN 0;
    END IF;
    SELECT coalesce(array_agg(x.message_id), '{}') INTO v_ids FROM (
        SELECT p.message_id FROM flux_email_search_pending p
        ORDER BY p.queued_at LIMIT p_limit FOR UPDATE SKIP LOCKED) x;
    SELECT coalesce(array_agg(x.attachment_id), '{}'),
           coalesce(array_agg(x.message_id), '{}')
    INTO v_atts, v_messages FROM (
        SELECT p.attachment_id, p.message_id FROM flux_email_search_pending_attachments p
        ORDER BY p.queued_at LIMIT p_limit - cardinality(v_ids) FOR UPDATE SKIP LOCKED) x;
    IF cardinality(v_ids) + cardinality(v_atts) = 0 THEN
        RETURN 0;
    END IF;
    v_messages := ARRAY(SELECT DISTINCT u FROM unnest(v_ids || v_messages) u ORDER BY u);
    v_config := nova_search_config();
    INSERT INTO flux_email_message_search AS s (message_id, tsv, addr, inbox_id, sort_at)
    SELECT d.message_id, d.tsv, d.addr, d.inbox_id, d.sort_at
    FROM flux_email_messages m
    CROSS JOIN LATERAL nova_search_document(v_config, m) d
    WHERE m.id = ANY (v_messages)
    ORDER BY m.id
    ON CONFLICT (message_id) DO UPDATE
        SET tsv = EXCLUDED.tsv, addr = EXCLUDED.addr, inbox_id = EXCLUDED.inbox_id,
            sort_at = EXCLUDED.sort_at;
    DELETE FROM flux_email_search_pending p WHERE p.message_id = ANY (v_ids);
    DELETE FROM flux_email_search_pending_attachments p WHERE p.attachment_id = ANY (v_atts);
    RETURN cardinality(v_ids) + cardinality(v_atts);
END;
$$;

-- ------------------------------------------------------------------ configuration
-- Sets the configuration ('simple', 'english', 'french' ...: any of pg_ts_config) and, when it
-- changed, rewinds the rebuild. Returns true when a rebuild is now due. New mail is indexed with
-- the new configuration at once; stored mail as nova_search_rebuild reaches it.
CREATE OR REPLACE FUNCTION nova_search_set_config(p_config text)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_config regconfig;
    v_old text;
BEGIN
    BEGIN
        v_config := p_config::regconfig;  -- (to_regconfig is PostgreSQL 16+)
    EXCEPTION WHEN OTHERS THEN
        v_config := NULL;
    END;
    IF v_config IS NULL THEN
        RAISE EXCEPTION 'search: % is not a text search configuration (see \dF: simple, english, ...)',
            coalesce(quote_literal(p_config), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.config INTO v_old FROM nova_search_settings s FOR UPDATE;
    IF v_old::regconfig = v_config THEN
        RETURN false;
    END IF;
    UPDATE nova_search_settings
    SET config = v_config::text, updated_at = now(), rebuild_started_at = now(),
        rebuild_messages_after = '00000000-0000-0000-0000-000000000000';
    RETURN true;
END;
$$;

-- One step of a rebuild: up to p_batch messages in id order get vectors of the configuration
-- (with their attachments'); returns how many. 0: nothing left. Rows a writer holds are
-- skipped and the cursor stops before them, so the next call takes them; each call is one
-- short transaction (`nova search --reindex` calls it until it returns 0). Holds the index
-- step's lock (nova_search_lock_key): it waits for a running batch, and a batch for it.
CREATE OR REPLACE FUNCTION nova_search_rebuild(p_batch integer DEFAULT 2000)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_config regconfig;
    v_after uuid;
    v_ids uuid[];
    v_next uuid;
    v_skipped uuid;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'search: p_batch must be >= 1, got %', p_batch
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock(nova_search_lock_key());
    SELECT s.config::regconfig, s.rebuild_messages_after INTO v_config, v_after
    FROM nova_search_settings s FOR UPDATE;
    IF v_after IS NULL THEN
        UPDATE nova_search_settings SET rebuild_started_at = NULL, rebuild_attachments_after = NULL
        WHERE rebuild_started_at IS NOT NULL OR rebuild_attachments_after IS NOT NULL;
        RETURN 0;
    END IF;
    -- FOR SHARE: a writer changing one of these messages waits for this short batch
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM (
        SELECT m.id FROM flux_email_messages m WHERE m.id > v_after
        ORDER BY m.id LIMIT p_batch FOR SHARE SKIP LOCKED) x;
    INSERT INTO flux_email_message_search AS s (message_id, tsv, addr, inbox_id, sort_at)
    SELECT d.message_id, d.tsv, d.addr, d.inbox_id, d.sort_at
    FROM flux_email_messages m CROSS JOIN LATERAL nova_search_document(v_config, m) d
    WHERE m.id = ANY (v_ids)
    ORDER BY m.id
    ON CONFLICT (message_id) DO UPDATE
        SET tsv = EXCLUDED.tsv, addr = EXCLUDED.addr, inbox_id = EXCLUDED.inbox_id,
            sort_at = EXCLUDED.sort_at;
    SELECT m.id INTO v_skipped FROM flux_email_messages m  -- (no min(uuid) before PostgreSQL 16)
    WHERE m.id > v_after AND m.id <= v_ids[cardinality(v_ids)] AND m.id <> ALL (v_ids)
    ORDER BY m.id LIMIT 1;
    IF v_ids IS NULL THEN
        v_next := NULL;  -- done
    ELSIF v_skipped IS NULL THEN
        v_next := v_ids[cardinality(v_ids)];
    ELSE  -- stop before the first row a writer held
        SELECT coalesce((SELECT i FROM unnest(v_ids) i WHERE i < v_skipped ORDER BY i DESC LIMIT 1),
                        v_after) INTO v_next;
    END IF;
    UPDATE nova_search_settings
    SET rebuild_messages_after = v_next, rebuild_attachments_after = NULL, updated_at = now(),
        rebuild_started_at = CASE WHEN v_next IS NOT NULL THEN rebuild_started_at END;
    RETURN coalesce(cardinality(v_ids), 0);
END;
$$;

-- ------------------------------------------------------------------ the parser
-- The folder or label ids a label:/in: value names: the value itself (an id), upper-cased too
-- (Gmail's system labels: in:inbox -> INBOX) and the usual Gmail spellings (in:drafts ->
-- DRAFT); and the inbox's live folders whose role it is (in:sent finds a Nylas "Sent Items"
-- folder's id) or whose name it is, case-insensitively, with Gmail's spelling of spaces and
-- slashes as hyphens (label:my-receipts finds "My Receipts").
CREATE OR REPLACE FUNCTION nova_search_folder_ids(p_inbox uuid, p_value text)
RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT array_agg(DISTINCT v) FROM (
        SELECT unnest(ARRAY[
            p_value, upper(p_value),
            CASE lower(p_value) WHEN 'drafts' THEN 'DRAFT' WHEN 'chats' THEN 'CHAT'
                                WHEN 'sent' THEN 'SENT' WHEN 'trash' THEN 'TRASH'
                                WHEN 'spam' THEN 'SPAM' END])
        UNION ALL
        SELECT f.provider_folder_id FROM flux_email_folders f
        WHERE f.inbox_id = p_inbox AND f.deleted_at IS NULL
          AND (f.role = CASE lower(p_value) WHEN 'draft' THEN 'drafts' WHEN 'junk' THEN 'spam'
                                            ELSE lower(p_value) END
               OR lower(f.name) = lower(p_value)
               OR lower(translate(f.name, ' /', '--')) = lower(p_value))
    ) x(v)
    WHERE v IS NOT NULL AND v <> '';
$$;

-- The tokens an address value must all have (see nova_search_address_tokens): an address or a
-- domain as a whole, other values by their runs of letters and digits.
CREATE OR REPLACE FUNCTION nova_search_addr_query(p_value text)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v ~ '^[^[:space:]<>@]*@?[^[:space:]<>@]+\.[^[:space:]<>@]+$'
                  OR v ~ '^[^[:space:]<>@]+@[^[:space:]<>@]+$'
                THEN ARRAY[ltrim(v, '@')]
                ELSE array_remove(regexp_split_to_array(v, '[^[:alnum:]]+'), '') END
    FROM (SELECT btrim(lower(p_value), ' <>"') AS v) x;
$$;

-- A date for after:/before: (YYYY/MM/DD, YYYY-MM-DD, at 00:00 UTC) or epoch seconds.
CREATE OR REPLACE FUNCTION nova_search_date(p_op text, p_value text)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_parts text[];
BEGIN
    IF p_value ~ '^[0-9]{1,11}$' THEN
        RETURN to_timestamp(p_value::bigint);
    END IF;
    v_parts := regexp_match(p_value, '^([0-9]{4})[/-]([0-9]{1,2})[/-]([0-9]{1,2})$');
    IF v_parts IS NOT NULL AND v_parts[2]::int BETWEEN 1 AND 12
       AND v_parts[3]::int BETWEEN 1 AND 31 THEN
        BEGIN
            RETURN make_date(v_parts[1]::int, v_parts[2]::int, v_parts[3]::int)::timestamp
                   AT TIME ZONE 'UTC';
        EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
            NULL;  -- 2024/02/31: the error below
        END;
    END IF;
    RAISE EXCEPTION 'search: %:% is not a date (YYYY/MM/DD or epoch seconds)', p_op, p_value
        USING ERRCODE = 'invalid_parameter_value';
END;
$$;

-- The query as a WHERE clause over flux_email_messages m and its flux_email_message_search s,
-- and the values it binds:
-- $2 tsquery[], $3 text[] (address and file name tokens, folder ids), $4 uuid[] (empty since
-- attachments are in their message's vector; kept so the function keeps its shape),
-- $5 timestamptz[]. Errors: SQLSTATE 22023, the message starting "search: ".
CREATE OR REPLACE FUNCTION nova_search_compile(
    p_inbox uuid, p_query text,
    OUT where_sql text, OUT tsqueries tsquery[], OUT texts text[], OUT ids uuid[],
    OUT times timestamptz[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    c_max_chars constant integer := 4000;
    c_max_terms constant integer := 64;
    c_max_depth constant integer := 16;
    v_config regconfig := nova_search_config();
    v_tok text[];
    v_neg boolean;
    v_op text;
    v_body text;
    v_quoted boolean;
    v_value text;
    v_frag text;
    v_q tsquery;
    v_list text[];
    v_fields text[];
    v_field text;
    v_parts text[];
    v_ts timestamptz;
    v_n integer;
    v_terms integer := 0;
    v_operands text[] := '{}';
    v_ops text[] := '{}';       -- 'AND', 'OR', '(', '-(', '{', '-{'
    v_prev boolean := false;    -- the last thing seen was an operand
    v_implicit text;
    v_top text;
    v_a text;
    v_b text;
BEGIN
    tsqueries := '{}'; texts := '{}'; ids := '{}'; times := '{}';
    IF p_query IS NULL OR btrim(p_query) = '' THEN
        where_sql := 'true';
        RETURN;
    END IF;
    IF length(p_query) > c_max_chars THEN
        RAISE EXCEPTION 'search: the query is % characters long; at most %', length(p_query),
            c_max_chars USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_tok IN
        SELECT regexp_matches(p_query,
            '(-?)(?:([A-Za-z_]+):)?("[^"]*"?|[(){}]|[^[:space:](){}"]+)', 'g')
    LOOP
        v_neg := v_tok[1] = '-';
        v_op := lower(v_tok[2]);
        v_body := v_tok[3];
        v_frag := NULL;
        IF v_op IS NULL AND v_body IN ('(', '{') THEN
            IF v_prev THEN  -- an implicit operator before the group
                v_implicit := CASE WHEN v_ops[cardinality(v_ops)] IN ('{', '-{') THEN 'OR'
                                   ELSE 'AND' END;
                LOOP  -- apply waiting operators that bind at least as tightly
                    v_top := v_ops[cardinality(v_ops)];
                    EXIT WHEN v_top IS NULL OR v_top NOT IN ('AND', 'OR')
                           OR (v_top = 'AND' AND v_implicit = 'OR');
                    v_ops := trim_array(v_ops, 1);
                    IF cardinality(v_operands) >= 2 THEN
                        v_b := v_operands[cardinality(v_operands)];
                        v_a := v_operands[cardinality(v_operands) - 1];
                        v_operands := trim_array(v_operands, 2) || format('(%s %s %s)', v_a, v_top, v_b);
                    END IF;
                END LOOP;
                v_ops := v_ops || v_implicit;
            END IF;
            IF (SELECT count(*) FROM unnest(v_ops) o WHERE o IN ('(', '-(', '{', '-{')) >= c_max_depth THEN
                RAISE EXCEPTION 'search: groups nested more than % deep', c_max_depth
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            v_ops := v_ops || (CASE WHEN v_neg THEN '-' ELSE '' END || v_body);
            v_operands := v_operands || '('::text;  -- a mark: where the group's operands start
            v_prev := false;
            CONTINUE;
        END IF;
        IF v_op IS NULL AND v_body IN (')', '}') THEN
            IF NOT EXISTS (SELECT 1 FROM unnest(v_ops) o WHERE o IN ('(', '-(', '{', '-{')) THEN
                CONTINUE;  -- a stray closing bracket
            END IF;
            LOOP
                v_top := v_ops[cardinality(v_ops)];
                v_ops := trim_array(v_ops, 1);
                EXIT WHEN v_top IN ('(', '-(', '{', '-{');
                IF cardinality(v_operands) >= 2 AND v_operands[cardinality(v_operands) - 1] <> '(' THEN
                    v_b := v_operands[cardinality(v_operands)];
                    v_a := v_operands[cardinality(v_operands) - 1];
                    v_operands := trim_array(v_operands, 2) || format('(%s %s %s)', v_a, v_top, v_b);
                END IF;
            END LOOP;
            IF v_operands[cardinality(v_operands)] = '(' THEN  -- an empty group: nothing
                v_operands := trim_array(v_operands, 1);
                -- an operator pushed before the empty group now waits with one operand: drop it
                IF v_ops[cardinality(v_ops)] IN ('AND', 'OR') THEN
                    v_ops := trim_array(v_ops, 1);
                    v_prev := cardinality(v_operands) > 0
                              AND v_operands[cardinality(v_operands)] <> '(';
                ELSE
                    v_prev := false;
                END IF;
                CONTINUE;
            END IF;
            v_a := v_operands[cardinality(v_operands)];
            v_operands := trim_array(v_operands, 2)  -- the group's result and its mark
                          || CASE WHEN v_top LIKE '-%' THEN format('(NOT %s)', v_a) ELSE v_a END;
            v_prev := true;
            CONTINUE;
        END IF;
        IF v_op IS NULL AND NOT v_neg AND v_body IN ('OR', 'AND') THEN
            IF v_prev THEN
                LOOP
                    v_top := v_ops[cardinality(v_ops)];
                    EXIT WHEN v_top IS NULL OR v_top NOT IN ('AND', 'OR')
                           OR (v_top = 'AND' AND v_body = 'OR');
                    v_ops := trim_array(v_ops, 1);
                    v_b := v_operands[cardinality(v_operands)];
                    v_a := v_operands[cardinality(v_operands) - 1];
                    v_operands := trim_array(v_operands, 2) || format('(%s %s %s)', v_a, v_top, v_b);
                END LOOP;
                v_ops := v_ops || v_body;
                v_prev := false;
            END IF;  -- else a dangling OR/AND: ignored
            CONTINUE;
        END IF;

        -- a term
        v_terms := v_terms + 1;
        IF v_terms > c_max_terms THEN
            RAISE EXCEPTION 'search: the query has more than % terms', c_max_terms
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_quoted := left(v_body, 1) = '"';
        v_value := CASE WHEN v_quoted THEN btrim(v_body, '"') ELSE v_body END;
        IF v_op IS NOT NULL AND v_value = '' THEN  -- "from:" alone: a word
            v_value := v_op || ':';
            v_op := NULL;
        END IF;
        IF v_op IN ('larger', 'smaller', 'size', 'list', 'deliveredto', 'rfc822msgid', 'around') THEN
            RAISE EXCEPTION 'search: %: is not supported', v_op
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF v_op IN ('from', 'to', 'cc', 'bcc') THEN
            IF lower(v_value) = 'me' THEN
                SELECT lower(i.email) INTO v_value FROM flux_inboxes i WHERE i.id = p_inbox;
            END IF;
            v_list := nova_search_addr_query(v_value);
            IF cardinality(v_list) > 0 THEN
                v_fields := CASE v_op WHEN 'from' THEN ARRAY['f'] WHEN 'to' THEN ARRAY['t', 'c', 'b']
                                      WHEN 'cc' THEN ARRAY['c'] ELSE ARRAY['b'] END;
                v_parts := '{}';
                FOREACH v_field IN ARRAY v_fields LOOP
                    v_n := cardinality(texts);
                    texts := texts || (SELECT array_agg(v_field || ':' || t) FROM unnest(v_list) t);
                    v_parts := v_parts || format('s.addr @> $3[%s:%s]', v_n + 1,
                                                 cardinality(texts));
                END LOOP;
                v_frag := '(' || array_to_string(v_parts, ' OR ') || ')';
            END IF;
        ELSIF v_op IN ('label', 'in', 'category') THEN
            IF v_op = 'category' THEN
                v_value := 'CATEGORY_' || upper(v_value);
            END IF;
            IF lower(v_value) <> 'anywhere' THEN
                v_list := nova_search_folder_ids(p_inbox, v_value);
                v_n := cardinality(texts);
                texts := texts || v_list;
                v_frag := format('m.folders && $3[%s:%s]', v_n + 1, cardinality(texts));
            END IF;
        ELSIF v_op = 'is' THEN
            v_frag := CASE lower(v_value) WHEN 'unread' THEN 'm.unread' WHEN 'read' THEN 'NOT m.unread'
                      WHEN 'starred' THEN 'm.starred' WHEN 'unstarred' THEN 'NOT m.starred' END;
            IF v_frag IS NULL THEN
                IF lower(v_value) = 'important' THEN
                    texts := texts || 'IMPORTANT'::text;
                    v_frag := format('m.folders && $3[%s:%s]', cardinality(texts), cardinality(texts));
                ELSE
                    RAISE EXCEPTION 'search: is:% is not supported (is:unread, is:read, is:starred, is:unstarred, is:important)',
                        v_value USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END IF;
        ELSIF v_op = 'has' THEN
            IF lower(v_value) NOT IN ('attachment', 'attachments') THEN
                RAISE EXCEPTION 'search: has:% is not supported (has:attachment)', v_value
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
            v_frag := 'm.has_attachments';
        ELSIF v_op IN ('after', 'before', 'newer', 'older') THEN
            times := times || nova_search_date(v_op, v_value);
            v_frag := format('s.sort_at %s $5[%s]',
                             CASE WHEN v_op IN ('after', 'newer') THEN '>=' ELSE '<' END,
                             cardinality(times));
        ELSIF v_op IN ('newer_than', 'older_than') THEN
            v_parts := regexp_match(lower(v_value), '^([0-9]{1,5})([dmy])$');
            IF v_parts IS NULL THEN
                RAISE EXCEPTION 'search: %:% is not an age (a number and d, m or y: 7d, 2m, 1y)',
                    v_op, v_value USING ERRCODE = 'invalid_parameter_value';
            END IF;
            times := times || (now() - CASE v_parts[2]
                WHEN 'd' THEN make_interval(days => v_parts[1]::int)
                WHEN 'm' THEN make_interval(months => v_parts[1]::int)
                ELSE make_interval(years => v_parts[1]::int) END);
            v_frag := format('s.sort_at %s $5[%s]',
                             CASE WHEN v_op = 'newer_than' THEN '>=' ELSE '<' END,
                             cardinality(times));
        ELSIF v_op = 'filename' THEN  -- every part of the value: 'n:' tokens of addr
            v_list := array_remove(regexp_split_to_array(lower(v_value), '[^[:alnum:]]+'), '');
            IF cardinality(v_list) > 0 THEN
                v_n := cardinality(texts);
                texts := texts || (SELECT array_agg('n:' || t) FROM unnest(v_list) t);
                v_frag := format('s.addr @> $3[%s:%s]', v_n + 1, cardinality(texts));
            END IF;
        ELSE
            IF v_op IS NOT NULL AND v_op <> 'subject' THEN  -- not an operator: words, as Gmail
                v_value := v_op || ':' || v_value;
                v_op := NULL;
            END IF;
            v_q := CASE WHEN v_quoted THEN phraseto_tsquery(v_config, v_value)
                        ELSE plainto_tsquery(v_config, v_value) END;
            IF numnode(v_q) > 0 THEN  -- else only stop words or punctuation: no condition
                tsqueries := tsqueries || v_q;
                v_n := cardinality(tsqueries);
                IF v_op = 'subject' THEN
                    v_frag := format('(s.tsv @@ $2[%s] AND ts_filter(s.tsv, ''{a}'') @@ $2[%s])',
                                     v_n, v_n);
                ELSE  -- subject, people, body and attachments: one vector
                    v_frag := format('s.tsv @@ $2[%s]', v_n);
                END IF;
            END IF;
        END IF;
        CONTINUE WHEN v_frag IS NULL;
        IF v_neg THEN
            v_frag := format('(NOT %s)', v_frag);
        END IF;
        IF v_prev THEN
            v_implicit := CASE WHEN v_ops[cardinality(v_ops)] IN ('{', '-{') THEN 'OR' ELSE 'AND' END;
            LOOP
                v_top := v_ops[cardinality(v_ops)];
                EXIT WHEN v_top IS NULL OR v_top NOT IN ('AND', 'OR')
                       OR (v_top = 'AND' AND v_implicit = 'OR');
                v_ops := trim_array(v_ops, 1);
                v_b := v_operands[cardinality(v_operands)];
                v_a := v_operands[cardinality(v_operands) - 1];
                v_operands := trim_array(v_operands, 2) || format('(%s %s %s)', v_a, v_top, v_b);
            END LOOP;
            v_ops := v_ops || v_implicit;
        END IF;
        v_operands := v_operands || v_frag;
        v_prev := true;
    END LOOP;

    -- the end closes what is open
    WHILE cardinality(v_ops) > 0 LOOP
        v_top := v_ops[cardinality(v_ops)];
        v_ops := trim_array(v_ops, 1);
        IF v_top IN ('AND', 'OR') THEN
            IF cardinality(v_operands) >= 2 AND v_operands[cardinality(v_operands)] <> '('
               AND v_operands[cardinality(v_operands) - 1] <> '(' THEN
                v_b := v_operands[cardinality(v_operands)];
                v_a := v_operands[cardinality(v_operands) - 1];
                v_operands := trim_array(v_operands, 2) || format('(%s %s %s)', v_a, v_top, v_b);
            END IF;
        ELSIF v_operands[cardinality(v_operands)] = '(' THEN  -- an empty group
            v_operands := trim_array(v_operands, 1);
        ELSE
            v_a := v_operands[cardinality(v_operands)];
            v_operands := trim_array(v_operands, 2)
                          || CASE WHEN v_top LIKE '-%' THEN format('(NOT %s)', v_a) ELSE v_a END;
        END IF;
    END LOOP;
    v_operands := array_remove(v_operands, '(');
    where_sql := CASE WHEN cardinality(v_operands) = 0 THEN 'true'
                      ELSE array_to_string(v_operands, ' AND ') END;
END;
$$;

-- ------------------------------------------------------------------ search
-- The cursor is the position after a row: its date and id, base64url. It means "older than
-- this", so it stays valid whatever is written meanwhile: no duplicates, no gaps.
CREATE OR REPLACE FUNCTION nova_search_cursor(p_at timestamptz, p_id uuid)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT rtrim(translate(encode(convert_to(
        to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '|' || p_id::text,
        'UTF8'), 'base64'), E'+/\n', '-_'), '=');
$$;

CREATE OR REPLACE FUNCTION search_messages(p_inbox uuid, p_query text,
                                           p_max_rows integer DEFAULT 50,
                                           p_cursor text DEFAULT NULL)
RETURNS TABLE (message_id uuid, thread_id uuid, provider_message_id text,
               provider_thread_id text, sent_at timestamptz, subject text, from_name text,
               from_email text, snippet text, unread boolean, starred boolean,
               has_attachments boolean, folders text[], next_cursor text)
LANGUAGE plpgsql STABLE
SET jit = off
-- the pages a search reads (the inbox's newest rows, posting lists) are mostly in memory: at
-- the default 4 the planner prefers a BitmapAnd with tens of thousands of dates to reading
-- the few hundred rows a rare word's GIN match gives (12 ms against 2 at 1,000,000 messages)
SET random_page_cost = 1.1
AS $$
#variable_conflict use_column
DECLARE
    -- The inbox is searched newest first in date windows: the first holds its newest
    -- c_first_rows messages (below the cursor), each next one is older and wider, sized by
    -- how many matches the windows so far gave (at least c_growth times what they covered),
    -- until the page is full or the inbox ends. The first window is walked in date order
    -- (bitmap scans off: at most c_first_rows rows, a few ms, where a GIN match costs what the
    -- word's posting list over the whole table costs: a phrase of two words in 10% of the
    -- mail, 17 ms). In the next ones the planner picks: the walk, or a GIN match cut to the
    -- window. One statement over the whole inbox would have to bet on one of the two, and the
    -- wrong bet is a walk of every message (a rare word) or a match of most of them sorted by
    -- date (a common one): seconds at 1,000,000 messages.
    c_first_rows constant integer := 1000;
    c_growth constant double precision := 4;
    v_c record;
    v_sql text;
    v_after_at timestamptz;
    v_after_id uuid;
    v_plain text;
    v_row record;
    v_prev record;
    v_have boolean := false;  -- v_prev holds a row (a record with a NULL field IS NULL)
    v_count integer := 0;
    v_hi timestamptz;         -- the window: sort_at >= v_lo AND sort_at < v_hi
    v_lo timestamptz;
    v_newest timestamptz;
    v_oldest timestamptz;
    v_covered interval;
    v_span interval;
    v_bitmaps text;
BEGIN
    IF p_inbox IS NULL OR NOT EXISTS (SELECT 1 FROM flux_inboxes i WHERE i.id = p_inbox) THEN
        RAISE EXCEPTION 'search: no inbox %', coalesce(p_inbox::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_max_rows IS NULL OR p_max_rows < 1 OR p_max_rows > 1000 THEN
        RAISE EXCEPTION 'search: max_rows must be 1 to 1000, got %', p_max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_cursor IS NOT NULL THEN
        BEGIN
            v_plain := convert_from(decode(
                rpad(translate(p_cursor, '-_', '+/'),
                     ((length(p_cursor) + 3) / 4) * 4, '='), 'base64'), 'UTF8');
            v_after_at := (split_part(v_plain, '|', 1)::timestamp) AT TIME ZONE 'UTC';
            v_after_id := split_part(v_plain, '|', 2)::uuid;
        EXCEPTION WHEN OTHERS THEN
            v_after_at := NULL;
        END;
        IF v_after_at IS NULL OR v_after_id IS NULL THEN
            RAISE EXCEPTION 'search: invalid cursor %', quote_literal(left(p_cursor, 100))
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    SELECT * INTO v_c FROM nova_search_compile(p_inbox, p_query);
    v_sql := format($q$
        SELECT m.id, m.thread_id, m.provider_message_id, m.provider_thread_id,
               s.sort_at AS at, coalesce(m.sent_at, m.created_at) AS shown, m.subject,
               m.from_addresses -> 0 ->> 'name' AS from_name,
               m.from_addresses -> 0 ->> 'email' AS from_email, m.snippet, m.unread,
               m.starred, m.has_attachments, m.folders
        FROM flux_email_message_search s JOIN flux_email_messages m ON m.id = s.message_id
        WHERE s.inbox_id = $1 AND s.sort_at >= $9 AND s.sort_at < $10
          AND m.inbox_id = $1 AND m.deleted_at IS NULL AND (%s)%s
        ORDER BY s.sort_at DESC, s.message_id DESC
        LIMIT $8$q$,
        v_c.where_sql,
        CASE WHEN p_cursor IS NULL THEN ''
             ELSE ' AND (s.sort_at, s.message_id) < ($6, $7)' END);
    v_hi := CASE WHEN p_cursor IS NULL THEN 'infinity'
                 ELSE v_after_at + interval '1 microsecond' END;
    SELECT s.sort_at INTO v_newest FROM flux_email_message_search s
    WHERE s.inbox_id = p_inbox AND s.sort_at < v_hi ORDER BY s.sort_at DESC LIMIT 1;
    SELECT s.sort_at INTO v_oldest FROM flux_email_message_search s
    WHERE s.inbox_id = p_inbox ORDER BY s.sort_at LIMIT 1;
    IF v_newest IS NULL THEN
        RETURN;
    END IF;
    SELECT s.sort_at INTO v_lo FROM flux_email_message_search s
    WHERE s.inbox_id = p_inbox AND s.sort_at < v_hi
    ORDER BY s.sort_at DESC OFFSET c_first_rows LIMIT 1;
    v_bitmaps := current_setting('enable_bitmapscan');
    IF v_lo IS NULL OR v_lo < v_newest THEN  -- (not when they all share one date: no bound)
        PERFORM set_config('enable_bitmapscan', 'off', true);
    END IF;
    LOOP
        v_lo := coalesce(v_lo, '-infinity');
        FOR v_row IN EXECUTE v_sql
            USING p_inbox, v_c.tsqueries, v_c.texts, v_c.ids, v_c.times, v_after_at,
                  v_after_id, p_max_rows + 1 - v_count, v_lo, v_hi
        LOOP
            v_count := v_count + 1;
            -- The output row holds the previous match until this one says whether a next page
            -- exists (its cursor goes on the page's last row only); RETURN NEXT copies it.
            IF v_have THEN
                next_cursor := CASE WHEN v_count > p_max_rows
                                    THEN nova_search_cursor(v_prev.at, v_prev.id) END;
                RETURN NEXT;
            END IF;
            message_id := v_row.id; thread_id := v_row.thread_id;
            provider_message_id := v_row.provider_message_id;
            provider_thread_id := v_row.provider_thread_id; sent_at := v_row.shown;
            subject := v_row.subject; from_name := v_row.from_name;
            from_email := v_row.from_email; snippet := v_row.snippet;
            unread := v_row.unread; starred := v_row.starred;
            has_attachments := v_row.has_attachments; folders := v_row.folders;
            v_prev := v_row;
            v_have := true;
        END LOOP;
        PERFORM set_config('enable_bitmapscan', v_bitmaps, true);
        EXIT WHEN v_count > p_max_rows OR v_lo = '-infinity';
        -- the next window: what the windows so far covered, times the matches still wanted
        -- over those found (plus one), twice over; at least c_growth times
        v_covered := greatest(v_newest - v_lo, interval '1 second');
        v_span := v_covered * greatest(c_growth,
                                       2.0 * (p_max_rows + 1 - v_count) / (v_count + 1));
        v_hi := v_lo;
        v_lo := CASE WHEN v_oldest IS NULL OR v_span >= v_hi - v_oldest THEN NULL
                     ELSE v_hi - v_span END;
    END LOOP;
    IF v_have AND v_count <= p_max_rows THEN  -- the last match, no page after it
        next_cursor := NULL;
        RETURN NEXT;
    END IF;
END;
$$;
