-- Search (issue 20, item 4): search_messages(inbox, query, max_rows, cursor) understands Gmail's
-- operators, over the vectors and columns of migrations/0014_search.sql. A message write only
-- queues the message (triggers here); nova_search_index_pending, called by the completion
-- monitor, builds its search row later in batches.
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

-- The tokens an address field is found by: the whole address, its local part, its domain and
-- the domain's parent domains (mail.example.com: example.com), and every run of letters and
-- digits of the address and of the name. At most 100 addresses of a field.
CREATE OR REPLACE FUNCTION nova_search_addr_tokens(p_prefix text, p_addrs jsonb)
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(array_agg(DISTINCT p_prefix || t.tok), '{}')
    FROM (SELECT lower(left(e.a ->> 'email', 320)) AS email, lower(left(e.a ->> 'name', 200)) AS name
          FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_addrs) = 'array' THEN p_addrs
                                         ELSE '[]'::jsonb END) WITH ORDINALITY AS e(a, n)
          WHERE e.n <= 100 AND jsonb_typeof(e.a) = 'object') x
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

-- Names and addresses as words (weight B): "alice", "example" and "alice@example.com" all find
-- alice@example.com.
CREATE OR REPLACE FUNCTION nova_search_people_text(p_from jsonb, p_to jsonb, p_cc jsonb,
                                                   p_bcc jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT left(coalesce(string_agg(concat_ws(' ', e.a ->> 'name', e.a ->> 'email',
                                              regexp_replace(e.a ->> 'email', '[^[:alnum:]]+',
                                                             ' ', 'g')), ' '), ''), 20000)
    FROM unnest(ARRAY[p_from, p_to, p_cc, p_bcc]) AS f(list)
    CROSS JOIN LATERAL (
        SELECT a FROM jsonb_array_elements(CASE WHEN jsonb_typeof(f.list) = 'array' THEN f.list
                                                ELSE '[]'::jsonb END) WITH ORDINALITY AS e(a, n)
        WHERE e.n <= 100 AND jsonb_typeof(e.a) = 'object') e;
$$;

-- Subject (A) over people (B) over body (C). Inputs are cut (subject 2,000 characters, body
-- 60,000) so that a vector stays well under PostgreSQL's 1 MB limit for any text: a message
-- write must never fail on its search vector. Positions past 16,383 are folded by PostgreSQL,
-- so a phrase deep in a long body may not be found.
CREATE OR REPLACE FUNCTION nova_search_message_tsv(p_config regconfig, p_subject text,
                                                   p_people text, p_body text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT setweight(to_tsvector(p_config, left(coalesce(p_subject, ''), 2000)), 'A')
        || setweight(to_tsvector(p_config, coalesce(p_people, '')), 'B')
        || setweight(to_tsvector(p_config, left(coalesce(p_body, ''), 60000)), 'C');
$$;

-- A file name is searched by its parts too: "Q3-report.pdf" -> q3, report, pdf.
CREATE OR REPLACE FUNCTION nova_search_filename_text(p_name text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(left(coalesce(p_name, ''), 500), '[^[:alnum:]]+', ' ', 'g');
$$;

CREATE OR REPLACE FUNCTION nova_search_attachment_tsv(p_config regconfig, p_filename text,
                                                      p_text text)
RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT setweight(to_tsvector(p_config, nova_search_filename_text(p_filename)), 'A')
        || setweight(to_tsvector(p_config, left(coalesce(p_text, ''), 60000)), 'D');
$$;

-- ------------------------------------------------------------------ triggers
-- Indexing is off the write path: a message write only queues its id in
-- flux_email_search_pending; nova_search_index_pending (the completion monitor, every
-- COMPLETION_CHECK_INTERVAL_MS) builds the search rows later, in batches. AFTER INSERT fires
-- only for a row really inserted (not for an upsert that updated a stored message), and AFTER
-- UPDATE only when a searched column changed, so a thread re-sync or a flag change that leaves
-- the text alone costs nothing here. Lock order: the message, then its pending row.
CREATE OR REPLACE FUNCTION nova_search_message_row(p_config regconfig, m flux_email_messages)
RETURNS flux_email_message_search
LANGUAGE sql STABLE AS $$
    SELECT m.id,
           nova_search_message_tsv(
               p_config, m.subject,
               nova_search_people_text(m.from_addresses, m.to_addresses, m.cc_addresses,
                                       m.bcc_addresses),
               coalesce(m.body_text, m.body_cleaned, m.snippet)),
           nova_search_addr_tokens('f:', m.from_addresses)
               || nova_search_addr_tokens('t:', m.to_addresses)
               || nova_search_addr_tokens('c:', m.cc_addresses)
               || nova_search_addr_tokens('b:', m.bcc_addresses);
$$;

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

CREATE OR REPLACE TRIGGER flux_email_messages_search_insert
    AFTER INSERT ON flux_email_messages
    FOR EACH ROW EXECUTE FUNCTION flux_email_messages_search();

CREATE OR REPLACE TRIGGER flux_email_messages_search_update
    AFTER UPDATE OF subject, snippet, from_addresses, to_addresses, cc_addresses,
                    bcc_addresses, body_text, body_cleaned ON flux_email_messages
    FOR EACH ROW
    WHEN (OLD.subject IS DISTINCT FROM NEW.subject
          OR OLD.body_text IS DISTINCT FROM NEW.body_text
          OR OLD.from_addresses IS DISTINCT FROM NEW.from_addresses
          OR OLD.to_addresses IS DISTINCT FROM NEW.to_addresses
          OR OLD.cc_addresses IS DISTINCT FROM NEW.cc_addresses
          OR OLD.bcc_addresses IS DISTINCT FROM NEW.bcc_addresses
          OR OLD.body_cleaned IS DISTINCT FROM NEW.body_cleaned
          OR OLD.snippet IS DISTINCT FROM NEW.snippet)
    EXECUTE FUNCTION flux_email_messages_search();

-- One batch of the index: up to p_limit queued messages get their search rows (in the current
-- configuration), built and upserted in one statement; their queue rows go. Returns how many
-- queue rows were taken (a message deleted meanwhile counts, and only leaves the queue). Locks
-- queue rows (FOR UPDATE SKIP LOCKED: one a writer holds waits for a later batch) and search
-- rows, in message id order; never a thread or message row. Two statements on purpose: the
-- text is read with a snapshot taken after the queue rows are locked, so every write that
-- queued them has committed and is seen; a write that comes later waits on its queue row and
-- queues the message again once this batch commits.
CREATE OR REPLACE FUNCTION nova_search_index_pending(p_limit integer DEFAULT 500)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
BEGIN
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'search: p_limit must be >= 1, got %', p_limit
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(x.message_id ORDER BY x.message_id) INTO v_ids FROM (
        SELECT p.message_id FROM flux_email_search_pending p
        LIMIT p_limit FOR UPDATE SKIP LOCKED) x;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    WITH built AS (
        INSERT INTO flux_email_message_search AS s (message_id, tsv, addr)
        SELECT r.message_id, r.tsv, r.addr
        FROM flux_email_messages m
        CROSS JOIN LATERAL nova_search_message_row(nova_search_config(), m) r
        WHERE m.id = ANY (v_ids)
        ORDER BY m.id
        ON CONFLICT (message_id) DO UPDATE SET tsv = EXCLUDED.tsv, addr = EXCLUDED.addr
        RETURNING 1
    )
    DELETE FROM flux_email_search_pending p WHERE p.message_id = ANY (v_ids);
    RETURN cardinality(v_ids);
END;
$$;

CREATE OR REPLACE FUNCTION flux_email_attachments_search()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.search_tsv := nova_search_attachment_tsv(nova_search_config(), NEW.original_filename,
                                                 NEW.extracted_text);
    RETURN NEW;
END;
$$;

CREATE OR REPLACE TRIGGER flux_email_attachments_search_insert
    BEFORE INSERT ON flux_email_attachments
    FOR EACH ROW EXECUTE FUNCTION flux_email_attachments_search();

CREATE OR REPLACE TRIGGER flux_email_attachments_search_update
    BEFORE UPDATE OF original_filename, extracted_text ON flux_email_attachments
    FOR EACH ROW
    WHEN (OLD.original_filename IS DISTINCT FROM NEW.original_filename
          OR OLD.extracted_text IS DISTINCT FROM NEW.extracted_text)
    EXECUTE FUNCTION flux_email_attachments_search();

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
        rebuild_messages_after = '00000000-0000-0000-0000-000000000000',
        rebuild_attachments_after = '00000000-0000-0000-0000-000000000000';
    RETURN true;
END;
$$;

-- One step of a rebuild: up to p_batch messages (then attachments) in id order get vectors of
-- the configuration; returns how many. 0: nothing left. Rows a writer holds are skipped and the
-- cursor stops before them, so the next call takes them; each call is one short transaction
-- (`nova search --reindex` calls it until it returns 0).
CREATE OR REPLACE FUNCTION nova_search_rebuild(p_batch integer DEFAULT 2000)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_config regconfig;
    v_after uuid;
    v_ids uuid[];
    v_next uuid;
    v_skipped uuid;
    v_is_msg boolean;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 THEN
        RAISE EXCEPTION 'search: p_batch must be >= 1, got %', p_batch
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT s.config::regconfig, coalesce(s.rebuild_messages_after, s.rebuild_attachments_after),
           s.rebuild_messages_after IS NOT NULL
    INTO v_config, v_after, v_is_msg
    FROM nova_search_settings s FOR UPDATE;
    IF v_after IS NULL THEN
        RETURN 0;
    END IF;
    IF v_is_msg THEN
        -- FOR SHARE: a writer changing one of these messages waits for this short batch,
        -- so no vector of an older text is written over a newer one
        SELECT array_agg(id ORDER BY id) INTO v_ids FROM (
            SELECT m.id FROM flux_email_messages m WHERE m.id > v_after
            ORDER BY m.id LIMIT p_batch FOR SHARE SKIP LOCKED) x;
        INSERT INTO flux_email_message_search AS s (message_id, tsv, addr)
        SELECT r.message_id, r.tsv, r.addr
        FROM flux_email_messages m CROSS JOIN LATERAL nova_search_message_row(v_config, m) r
        WHERE m.id = ANY (v_ids)
        ORDER BY m.id
        ON CONFLICT (message_id) DO UPDATE SET tsv = EXCLUDED.tsv, addr = EXCLUDED.addr;
        SELECT m.id INTO v_skipped FROM flux_email_messages m  -- (no min(uuid) before PostgreSQL 16)
        WHERE m.id > v_after AND m.id <= v_ids[cardinality(v_ids)] AND m.id <> ALL (v_ids)
        ORDER BY m.id LIMIT 1;
    ELSE
        SELECT array_agg(id ORDER BY id) INTO v_ids FROM (
            SELECT a.id FROM flux_email_attachments a WHERE a.id > v_after
            ORDER BY a.id LIMIT p_batch FOR UPDATE SKIP LOCKED) x;
        UPDATE flux_email_attachments a
        SET search_tsv = nova_search_attachment_tsv(v_config, a.original_filename, a.extracted_text)
        WHERE a.id = ANY (v_ids);
        SELECT a.id INTO v_skipped FROM flux_email_attachments a  -- (no min(uuid) before PostgreSQL 16)
        WHERE a.id > v_after AND a.id <= v_ids[cardinality(v_ids)] AND a.id <> ALL (v_ids)
        ORDER BY a.id LIMIT 1;
    END IF;
    IF v_ids IS NULL THEN
        v_next := NULL;  -- this table is done
    ELSIF v_skipped IS NULL THEN
        v_next := v_ids[cardinality(v_ids)];
    ELSE  -- stop before the first row a writer held
        SELECT coalesce((SELECT i FROM unnest(v_ids) i WHERE i < v_skipped ORDER BY i DESC LIMIT 1),
                        v_after) INTO v_next;
    END IF;
    IF v_is_msg THEN
        UPDATE nova_search_settings SET rebuild_messages_after = v_next, updated_at = now();
    ELSE
        UPDATE nova_search_settings SET rebuild_attachments_after = v_next, updated_at = now();
    END IF;
    UPDATE nova_search_settings SET rebuild_started_at = NULL
    WHERE rebuild_messages_after IS NULL AND rebuild_attachments_after IS NULL;
    IF v_ids IS NULL AND v_is_msg THEN  -- go on with the attachments in this call
        RETURN nova_search_rebuild(p_batch);
    END IF;
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

-- The tokens an address value must all have (see nova_search_addr_tokens): an address or a
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
-- $2 tsquery[], $3 text[] (address tokens, folder ids), $4 uuid[] (messages found by their
-- attachments), $5 timestamptz[]. Errors: SQLSTATE 22023, the message starting "search: ".
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
    v_found uuid[];
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
            v_frag := format('coalesce(m.sent_at, m.created_at) %s $5[%s]',
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
            v_frag := format('coalesce(m.sent_at, m.created_at) %s $5[%s]',
                             CASE WHEN v_op = 'newer_than' THEN '>=' ELSE '<' END,
                             cardinality(times));
        ELSIF v_op = 'filename' THEN
            v_q := phraseto_tsquery(v_config, nova_search_filename_text(v_value));
            IF numnode(v_q) > 0 THEN
                SELECT coalesce(array_agg(DISTINCT a.message_id), '{}') INTO v_found
                FROM flux_email_attachments a
                WHERE a.inbox_id = p_inbox AND a.deleted_at IS NULL AND a.search_tsv @@ v_q
                  AND ts_filter(a.search_tsv, '{a}') @@ v_q;
                v_n := cardinality(ids);
                ids := ids || v_found;
                v_frag := CASE WHEN cardinality(v_found) = 0 THEN 'false'
                               ELSE format('m.id = ANY ($4[%s:%s])', v_n + 1, cardinality(ids)) END;
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
                ELSE
                    SELECT coalesce(array_agg(DISTINCT a.message_id), '{}') INTO v_found
                    FROM flux_email_attachments a
                    WHERE a.inbox_id = p_inbox AND a.deleted_at IS NULL AND a.search_tsv @@ v_q;
                    IF cardinality(v_found) = 0 THEN
                        v_frag := format('s.tsv @@ $2[%s]', v_n);
                    ELSE
                        v_frag := format('(s.tsv @@ $2[%s] OR m.id = ANY ($4[%s:%s]))',
                                         v_n, cardinality(ids) + 1, cardinality(ids) + cardinality(v_found));
                        ids := ids || v_found;
                    END IF;
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
AS $$
#variable_conflict use_column
DECLARE
    v_c record;
    v_after_at timestamptz;
    v_after_id uuid;
    v_plain text;
    v_row record;
    v_prev record;
    v_have boolean := false;  -- v_prev holds a row (a record with a NULL field IS NULL)
    v_count integer := 0;
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
    FOR v_row IN EXECUTE format($q$
        SELECT m.id, m.thread_id, m.provider_message_id, m.provider_thread_id,
               coalesce(m.sent_at, m.created_at) AS at, m.subject,
               m.from_addresses -> 0 ->> 'name' AS from_name,
               m.from_addresses -> 0 ->> 'email' AS from_email, m.snippet, m.unread,
               m.starred, m.has_attachments, m.folders
        FROM flux_email_messages m JOIN flux_email_message_search s ON s.message_id = m.id
        WHERE m.inbox_id = $1 AND m.deleted_at IS NULL AND (%s)%s
        ORDER BY coalesce(m.sent_at, m.created_at) DESC, m.id DESC
        LIMIT $8$q$,
        v_c.where_sql,
        CASE WHEN p_cursor IS NULL THEN ''
             ELSE ' AND (coalesce(m.sent_at, m.created_at), m.id) < ($6, $7)' END)
        USING p_inbox, v_c.tsqueries, v_c.texts, v_c.ids, v_c.times, v_after_at, v_after_id,
              p_max_rows + 1
    LOOP
        v_count := v_count + 1;
        IF v_have THEN
            message_id := v_prev.id; thread_id := v_prev.thread_id;
            provider_message_id := v_prev.provider_message_id;
            provider_thread_id := v_prev.provider_thread_id; sent_at := v_prev.at;
            subject := v_prev.subject; from_name := v_prev.from_name;
            from_email := v_prev.from_email; snippet := v_prev.snippet;
            unread := v_prev.unread; starred := v_prev.starred;
            has_attachments := v_prev.has_attachments; folders := v_prev.folders;
            next_cursor := CASE WHEN v_count > p_max_rows
                                THEN nova_search_cursor(v_prev.at, v_prev.id) END;
            RETURN NEXT;
        END IF;
        EXIT WHEN v_count > p_max_rows;
        v_prev := v_row;
        v_have := true;
    END LOOP;
    IF v_have AND v_count <= p_max_rows THEN
        message_id := v_prev.id; thread_id := v_prev.thread_id;
        provider_message_id := v_prev.provider_message_id;
        provider_thread_id := v_prev.provider_thread_id; sent_at := v_prev.at;
        subject := v_prev.subject; from_name := v_prev.from_name;
        from_email := v_prev.from_email; snippet := v_prev.snippet;
        unread := v_prev.unread; starred := v_prev.starred;
        has_attachments := v_prev.has_attachments; folders := v_prev.folders;
        next_cursor := NULL;
        RETURN NEXT;
    END IF;
END;
$$;
