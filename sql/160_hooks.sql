-- Outbound webhooks (migrations/0018_hooks.sql): the statements of nova.hooks and `nova hooks`.
--
-- Delivery is per (endpoint, inbox) stream, in the order of the inbox's events: a stream is held
-- by one delivery task at a time (a lease with a token, across processes), its position is the
-- change feed's cursor of consumer 'hook:<endpoint id>', and the next event is not sent before
-- the previous one succeeded or was dead-lettered. Lock order: stream rows (or dead letters),
-- then cursors (nova_events_ack), then the endpoint row.

CREATE OR REPLACE FUNCTION nova_hook_consumer(p_endpoint uuid)
RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'hook:' || p_endpoint::text $$;

-- A new endpoint receives what happens from now on: its cursors start at every inbox's head.
-- An inbox without a head yet has no cursor, and its first event is delivered.
CREATE OR REPLACE FUNCTION nova_hook_add(p_url text, p_kinds text[], p_secret text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO nova_hook_endpoints (url, event_kinds, secret)
    VALUES (p_url, coalesce(p_kinds, '{}'), p_secret)
    RETURNING id INTO v_id;
    INSERT INTO nova_event_cursors (consumer, inbox_id, position)
    SELECT nova_hook_consumer(v_id), h.inbox_id, h.position FROM nova_event_heads h
    ON CONFLICT DO NOTHING;
    RETURN v_id;
END;
$$;

-- Removes an endpoint, its delivery state, its dead letters and its cursors (streams first:
-- the lock order). Returns false when there is no such endpoint.
CREATE OR REPLACE FUNCTION nova_hook_remove(p_id uuid)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM nova_hook_streams WHERE endpoint_id = p_id;
    DELETE FROM nova_hook_dead_letters WHERE endpoint_id = p_id;
    DELETE FROM nova_event_cursors WHERE consumer = nova_hook_consumer(p_id);
    DELETE FROM nova_hook_endpoints WHERE id = p_id;
    RETURN FOUND;
END;
$$;

-- A new current secret; the old one still signs (a second signature) for p_keep. A rotation
-- within that window drops the oldest secret: at most two sign.
CREATE OR REPLACE FUNCTION nova_hook_rotate(p_id uuid, p_secret text, p_keep interval)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz;
BEGIN
    UPDATE nova_hook_endpoints
    SET previous_secret = secret, previous_secret_until = now() + p_keep, secret = p_secret,
        updated_at = now()
    WHERE id = p_id
    RETURNING previous_secret_until INTO v_until;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no webhook endpoint %', p_id USING ERRCODE = 'no_data_found';
    END IF;
    RETURN v_until;
END;
$$;

-- The operator's word: the endpoint works again. Its waiting inboxes get a full retry schedule
-- and are due now; the events that came meanwhile are delivered from where each inbox stood.
CREATE OR REPLACE FUNCTION nova_hook_enable(p_id uuid)
RETURNS TABLE (was_enabled boolean, disabled_reason text, disabled_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_old nova_hook_endpoints;
BEGIN
    UPDATE nova_hook_streams s
    SET attempts = 0, first_attempt_at = NULL, next_attempt_at = NULL
    FROM (SELECT t.inbox_id FROM nova_hook_streams t
          WHERE t.endpoint_id = p_id AND t.next_attempt_at IS NOT NULL
          ORDER BY t.inbox_id FOR UPDATE) w
    WHERE s.endpoint_id = p_id AND s.inbox_id = w.inbox_id;
    SELECT * INTO v_old FROM nova_hook_endpoints WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no webhook endpoint %', p_id USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE nova_hook_endpoints
    SET enabled = true, disabled_reason = NULL, disabled_at = NULL, failing_since = NULL,
        throttled_until = NULL, updated_at = now()
    WHERE id = p_id;
    RETURN QUERY SELECT v_old.enabled, v_old.disabled_reason, v_old.disabled_at;
END;
$$;

-- Work for delivery tasks, leased (p_lease) with a fresh token: for every enabled endpoint not
-- paused by a Retry-After, at most p_per_endpoint leases at once (across processes), replays of
-- dead letters first, then inboxes with events past the endpoint's cursor whose retry is due,
-- the least recently served first; p_max in all. dead_letter_id is set for a replay.
CREATE OR REPLACE FUNCTION nova_hook_claim(p_per_endpoint integer, p_max integer,
                                           p_lease interval)
RETURNS TABLE (endpoint_id uuid, inbox_id uuid, dead_letter_id bigint, lease_token uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_endpoint uuid;
    v_free     integer;
    v_left     integer := p_max;
    v_n        integer;
BEGIN
    FOR v_endpoint IN
        SELECT e.id FROM nova_hook_endpoints e
        WHERE e.enabled AND coalesce(e.throttled_until, '-infinity') <= now()
        ORDER BY e.id
    LOOP
        EXIT WHEN v_left <= 0;
        v_free := p_per_endpoint
            - (SELECT count(*) FROM nova_hook_streams s
               WHERE s.endpoint_id = v_endpoint AND s.leased_until > now())::integer
            - (SELECT count(*) FROM nova_hook_dead_letters d
               WHERE d.endpoint_id = v_endpoint AND d.status = 'replaying'
                 AND d.leased_until > now())::integer;
        v_free := least(v_free, v_left);
        CONTINUE WHEN v_free <= 0;

        RETURN QUERY
        WITH due AS (
            SELECT d.id FROM nova_hook_dead_letters d
            WHERE d.endpoint_id = v_endpoint AND d.status = 'replaying'
              AND d.next_attempt_at <= now() AND coalesce(d.leased_until, '-infinity') < now()
            ORDER BY d.next_attempt_at
            LIMIT v_free
            FOR UPDATE SKIP LOCKED
        )
        UPDATE nova_hook_dead_letters d
        SET leased_until = now() + p_lease, lease_token = gen_random_uuid()
        FROM due WHERE d.id = due.id
        RETURNING d.endpoint_id, d.inbox_id, d.id, d.lease_token;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_free := v_free - v_n;
        v_left := v_left - v_n;
        CONTINUE WHEN v_free <= 0;

        RETURN QUERY
        INSERT INTO nova_hook_streams AS s (endpoint_id, inbox_id, leased_until, lease_token,
                                            served_at)
        SELECT v_endpoint, w.inbox_id, now() + p_lease, gen_random_uuid(), now()
        FROM (
            SELECT u.inbox_id
            FROM nova_events_unread(nova_hook_consumer(v_endpoint)) u
            LEFT JOIN nova_hook_streams t
                ON t.endpoint_id = v_endpoint AND t.inbox_id = u.inbox_id
            WHERE coalesce(t.next_attempt_at, '-infinity') <= now()
              AND coalesce(t.leased_until, '-infinity') < now()
            ORDER BY t.served_at NULLS FIRST
            LIMIT v_free
        ) w
        ORDER BY w.inbox_id  -- rows of one table are locked in id order
        ON CONFLICT (endpoint_id, inbox_id) DO UPDATE
            SET leased_until = EXCLUDED.leased_until, lease_token = EXCLUDED.lease_token,
                served_at = EXCLUDED.served_at
            WHERE coalesce(s.next_attempt_at, '-infinity') <= now()
              AND coalesce(s.leased_until, '-infinity') < now()
        RETURNING s.endpoint_id, s.inbox_id, NULL::bigint, s.lease_token;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        v_left := v_left - v_n;
    END LOOP;
END;
$$;

-- The next events of a stream, after its cursor, in order (the change feed's read: an
-- endpoint behind events that retention pruned gets its error, SQLSTATE NV020).
CREATE OR REPLACE FUNCTION nova_hook_read(p_endpoint uuid, p_inbox uuid, p_max integer)
RETURNS TABLE (id bigint, inbox_id uuid, "position" bigint, kind text, object_id text,
               provider_id text, thread_id uuid, changes jsonb, occurred_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.id, r.inbox_id, r.position, r.kind, r.object_id, r.provider_id, r.thread_id,
           r.changes, r.occurred_at
    FROM nova_events_read(nova_hook_consumer(p_endpoint), p_max, p_inbox) r
    ORDER BY r.position
$$;

-- The stream's events up to p_position are done: delivered (p_delivered, a 2xx for the event
-- at p_position) or not subscribed to. Moves the cursor, renews the lease. go: false when the
-- lease is no longer this task's, or the endpoint was disabled or paused meanwhile (the task
-- stops); recovered: the endpoint had been failing (nova_hook_reachable is then due).
CREATE OR REPLACE FUNCTION nova_hook_done(p_endpoint uuid, p_inbox uuid, p_token uuid,
                                          p_position bigint, p_delivered boolean,
                                          p_lease interval)
RETURNS TABLE (go boolean, recovered boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_go        boolean;
    v_recovered boolean := false;
BEGIN
    UPDATE nova_hook_streams
    SET leased_until = now() + p_lease,
        event_id = CASE WHEN p_delivered THEN NULL ELSE event_id END,
        attempts = CASE WHEN p_delivered THEN 0 ELSE attempts END,
        first_attempt_at = CASE WHEN p_delivered THEN NULL ELSE first_attempt_at END,
        next_attempt_at = NULL,
        delivered = delivered + p_delivered::integer,
        last_delivered_at = CASE WHEN p_delivered THEN now() ELSE last_delivered_at END,
        unreachable = unreachable AND NOT p_delivered
    WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox AND lease_token = p_token;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false;
        RETURN;
    END IF;
    PERFORM nova_events_ack(nova_hook_consumer(p_endpoint), p_inbox, p_position);
    IF p_delivered THEN
        UPDATE nova_hook_endpoints SET failing_since = NULL
        WHERE id = p_endpoint AND failing_since IS NOT NULL;
        v_recovered := FOUND;
    END IF;
    SELECT e.enabled AND coalesce(e.throttled_until, '-infinity') <= now() INTO v_go
    FROM nova_hook_endpoints e WHERE e.id = p_endpoint;
    RETURN QUERY SELECT coalesce(v_go, false), v_recovered;
END;
$$;

-- The endpoint answers again: the inboxes whose last attempt never reached it (refused,
-- unreachable) are due now rather than at their backoff's end. Attempts keep their count; an
-- answer that was an error (a 5xx, a timeout) keeps its schedule. Skips the streams a task
-- holds (no waiting, no lock order). Returns how many.
CREATE OR REPLACE FUNCTION nova_hook_reachable(p_endpoint uuid)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
BEGIN
    WITH due AS (
        SELECT s.inbox_id FROM nova_hook_streams s
        WHERE s.endpoint_id = p_endpoint AND s.unreachable AND s.next_attempt_at IS NOT NULL
          AND s.next_attempt_at > now()
        ORDER BY s.inbox_id
        FOR UPDATE SKIP LOCKED
    )
    UPDATE nova_hook_streams s SET next_attempt_at = now()
    FROM due WHERE s.endpoint_id = p_endpoint AND s.inbox_id = due.inbox_id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END;
$$;

-- The delay before attempt p_attempts + 1 (the schedule's entry, ±10% jitter, never sooner than
-- a Retry-After), or NULL when the schedule is used up.
CREATE OR REPLACE FUNCTION nova_hook_delay(p_schedule interval[], p_attempts integer,
                                           p_retry_after interval)
RETURNS interval LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN p_attempts > coalesce(array_length(p_schedule, 1), 0) THEN NULL
                ELSE greatest(p_schedule[p_attempts] * (0.9 + random() * 0.2),
                              coalesce(p_retry_after, '0'::interval)) END
$$;

-- What a failed attempt does to its endpoint: a 410 disables it; any other failure starts (or
-- continues) its failing run, and a run of p_disable_after disables it; a Retry-After pauses all
-- its inboxes. Returns the reason when the endpoint is disabled now.
CREATE OR REPLACE FUNCTION nova_hook_endpoint_failed(p_endpoint uuid, p_status integer,
                                                     p_error text, p_retry_after interval,
                                                     p_gone boolean, p_disable_after interval)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_since  timestamptz;
    v_reason text;
BEGIN
    IF p_gone THEN
        v_reason := format('the endpoint answered 410 Gone at %s',
                           to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'));
    ELSE
        UPDATE nova_hook_endpoints
        SET failing_since = coalesce(failing_since, now()),
            throttled_until = CASE WHEN p_retry_after IS NULL THEN throttled_until
                                   ELSE greatest(throttled_until, now() + p_retry_after) END
        WHERE id = p_endpoint AND enabled
        RETURNING failing_since INTO v_since;
        IF v_since IS NULL OR v_since > now() - p_disable_after THEN
            RETURN NULL;
        END IF;
        v_reason := format('failing since %s (over %s): last error %s',
                           to_char(v_since AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                           justify_interval(date_trunc('second', p_disable_after)),
                           coalesce(p_error, '?'));
    END IF;
    UPDATE nova_hook_endpoints
    SET enabled = false, disabled_reason = v_reason, disabled_at = now(), updated_at = now()
    WHERE id = p_endpoint AND enabled;
    RETURN CASE WHEN FOUND THEN v_reason END;
END;
$$;

-- A failed attempt of the stream's head event. outcome: 'retry' (next_attempt_at set), 'dead'
-- (schedule used up: dead-lettered with its body, the cursor moves on), 'gone' (410: the
-- endpoint is disabled, the event stays at the head and the attempt does not count), or 'lost'
-- (the lease is no longer this task's: nothing written). disabled_reason: the endpoint was
-- disabled by this failure.
CREATE OR REPLACE FUNCTION nova_hook_failed(
    p_endpoint uuid, p_inbox uuid, p_token uuid, p_event_id bigint, p_position bigint,
    p_kind text, p_body text, p_status integer, p_error text, p_schedule interval[],
    p_retry_after interval, p_gone boolean, p_disable_after interval, p_lease interval,
    p_unreachable boolean)
RETURNS TABLE (outcome text, attempts integer, next_attempt_at timestamptz,
               disabled_reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_stream   nova_hook_streams;
    v_attempts integer;
    v_first    timestamptz;
    v_delay    interval;
    v_reason   text;
BEGIN
    SELECT * INTO v_stream FROM nova_hook_streams
    WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox AND lease_token = p_token
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::integer, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;
    IF p_gone THEN
        UPDATE nova_hook_streams
        SET last_error = p_error, last_status = p_status, leased_until = NULL
        WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox;
        v_reason := nova_hook_endpoint_failed(p_endpoint, p_status, p_error, NULL, true, NULL);
        RETURN QUERY SELECT 'gone'::text, v_stream.attempts, NULL::timestamptz, v_reason;
        RETURN;
    END IF;
    IF v_stream.event_id IS NOT DISTINCT FROM p_event_id THEN
        v_attempts := v_stream.attempts + 1;
        v_first := coalesce(v_stream.first_attempt_at, now());
    ELSE
        v_attempts := 1;
        v_first := now();
    END IF;
    v_delay := nova_hook_delay(p_schedule, v_attempts, p_retry_after);
    IF v_delay IS NULL THEN
        INSERT INTO nova_hook_dead_letters AS d (endpoint_id, inbox_id, event_id, position, kind,
                                                 body, attempts, first_attempt_at, last_error,
                                                 last_status)
        VALUES (p_endpoint, p_inbox, p_event_id, p_position, p_kind, p_body, v_attempts,
                v_first, p_error, p_status)
        ON CONFLICT (endpoint_id, event_id) DO UPDATE
            SET status = 'dead', body = EXCLUDED.body, attempts = EXCLUDED.attempts,
                first_attempt_at = EXCLUDED.first_attempt_at, last_error = EXCLUDED.last_error,
                last_status = EXCLUDED.last_status, dead_at = now(), next_attempt_at = NULL,
                leased_until = NULL, lease_token = NULL;
        UPDATE nova_hook_streams
        SET event_id = NULL, attempts = 0, first_attempt_at = NULL, next_attempt_at = NULL,
            last_error = p_error, last_status = p_status, unreachable = false,
            leased_until = now() + p_lease
        WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox;
        PERFORM nova_events_ack(nova_hook_consumer(p_endpoint), p_inbox, p_position);
    ELSE
        UPDATE nova_hook_streams
        SET event_id = p_event_id, attempts = v_attempts, first_attempt_at = v_first,
            next_attempt_at = now() + v_delay, last_error = p_error, last_status = p_status,
            unreachable = p_unreachable, leased_until = NULL
        WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox;
    END IF;
    v_reason := nova_hook_endpoint_failed(p_endpoint, p_status, p_error, p_retry_after, false,
                                          p_disable_after);
    RETURN QUERY SELECT CASE WHEN v_delay IS NULL THEN 'dead' ELSE 'retry' END, v_attempts,
                        CASE WHEN v_delay IS NULL THEN NULL ELSE now() + v_delay END, v_reason;
END;
$$;

-- A stream's task is over: its lease goes (if it is still the task's). With p_delay the stream
-- is looked at again only then, p_error saying why (it could not be read: not an attempt).
CREATE OR REPLACE FUNCTION nova_hook_release(p_endpoint uuid, p_inbox uuid, p_token uuid,
                                             p_delay interval DEFAULT NULL,
                                             p_error text DEFAULT NULL)
RETURNS void LANGUAGE sql AS $$
    UPDATE nova_hook_streams
    SET leased_until = NULL,
        next_attempt_at = CASE WHEN p_delay IS NULL THEN next_attempt_at
                               ELSE now() + p_delay END,
        last_error = coalesce(p_error, last_error)
    WHERE endpoint_id = p_endpoint AND inbox_id = p_inbox AND lease_token = p_token
      AND (leased_until IS NOT NULL OR p_delay IS NOT NULL)
$$;

-- `nova replay hooks ID`: a dead letter is sent again (out of its inbox's order, by nature: the
-- events after it went on), with a new retry schedule. Returns its status after the call.
CREATE OR REPLACE FUNCTION nova_hook_replay(p_id bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
BEGIN
    UPDATE nova_hook_dead_letters
    SET status = 'replaying', replays = replays + 1, replay_attempts = 0,
        next_attempt_at = now(), leased_until = NULL, lease_token = NULL
    WHERE id = p_id AND status = 'dead'
    RETURNING status INTO v_status;
    IF NOT FOUND THEN
        SELECT status INTO v_status FROM nova_hook_dead_letters WHERE id = p_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'nova_hook_replay: no webhook dead letter %', p_id
                USING ERRCODE = 'no_data_found';
        END IF;
    END IF;
    RETURN v_status;
END;
$$;

-- A replayed dead letter was delivered: it is resolved, and goes.
CREATE OR REPLACE FUNCTION nova_hook_replay_done(p_id bigint, p_token uuid)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_endpoint uuid;
BEGIN
    DELETE FROM nova_hook_dead_letters WHERE id = p_id AND lease_token = p_token
    RETURNING endpoint_id INTO v_endpoint;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE nova_hook_endpoints SET failing_since = NULL
    WHERE id = v_endpoint AND failing_since IS NOT NULL;
    RETURN true;
END;
$$;

-- A replay's attempt failed: retried on the schedule, dead again once it is used up ('dead'),
-- 'gone' on a 410 (the endpoint is disabled; the replay waits for it), 'lost' without the lease.
CREATE OR REPLACE FUNCTION nova_hook_replay_failed(
    p_id bigint, p_token uuid, p_status integer, p_error text, p_schedule interval[],
    p_retry_after interval, p_gone boolean, p_disable_after interval)
RETURNS TABLE (outcome text, attempts integer, next_attempt_at timestamptz,
               disabled_reason text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_dead   nova_hook_dead_letters;
    v_delay  interval;
    v_reason text;
BEGIN
    SELECT * INTO v_dead FROM nova_hook_dead_letters
    WHERE id = p_id AND lease_token = p_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'lost'::text, NULL::integer, NULL::timestamptz, NULL::text;
        RETURN;
    END IF;
    IF p_gone THEN
        UPDATE nova_hook_dead_letters
        SET last_error = p_error, last_status = p_status, leased_until = NULL
        WHERE id = p_id;
        v_reason := nova_hook_endpoint_failed(v_dead.endpoint_id, p_status, p_error, NULL, true,
                                              NULL);
        RETURN QUERY SELECT 'gone'::text, v_dead.replay_attempts, NULL::timestamptz, v_reason;
        RETURN;
    END IF;
    v_delay := nova_hook_delay(p_schedule, v_dead.replay_attempts + 1, p_retry_after);
    UPDATE nova_hook_dead_letters
    SET replay_attempts = v_dead.replay_attempts + 1, last_error = p_error,
        last_status = p_status, leased_until = NULL, lease_token = NULL,
        status = CASE WHEN v_delay IS NULL THEN 'dead' ELSE 'replaying' END,
        dead_at = CASE WHEN v_delay IS NULL THEN now() ELSE dead_at END,
        next_attempt_at = CASE WHEN v_delay IS NULL THEN NULL ELSE now() + v_delay END
    WHERE id = p_id;
    v_reason := nova_hook_endpoint_failed(v_dead.endpoint_id, p_status, p_error, p_retry_after,
                                          false, p_disable_after);
    RETURN QUERY SELECT CASE WHEN v_delay IS NULL THEN 'dead' ELSE 'retry' END,
                        v_dead.replay_attempts + 1,
                        CASE WHEN v_delay IS NULL THEN NULL ELSE now() + v_delay END, v_reason;
END;
$$;

CREATE OR REPLACE FUNCTION nova_hook_replay_release(p_id bigint, p_token uuid)
RETURNS void LANGUAGE sql AS $$
    UPDATE nova_hook_dead_letters SET leased_until = NULL
    WHERE id = p_id AND lease_token = p_token AND leased_until IS NOT NULL
$$;

-- Dead letters still owed (dead, or being replayed), in the shape of nova_dead_letters, for
-- `nova failures` (queue_name 'hooks'; msg_id is the dead letter's id, what `nova replay hooks`
-- takes).
CREATE OR REPLACE FUNCTION nova_hook_dead_letter_list()
RETURNS TABLE (queue_name text, msg_id bigint, read_ct integer, enqueued_at timestamptz,
               archived_at timestamptz, message jsonb)
LANGUAGE sql STABLE AS $$
    SELECT 'hooks'::text, d.id, d.attempts + d.replay_attempts, d.first_attempt_at, d.dead_at,
           jsonb_build_object('endpoint_id', d.endpoint_id, 'url', e.url,
                              'inbox_id', d.inbox_id, 'event_id', d.event_id,
                              'position', d.position, 'kind', d.kind, 'status', d.status,
                              'replays', d.replays, 'last_status', d.last_status,
                              'last_error', d.last_error)
    FROM nova_hook_dead_letters d
    JOIN nova_hook_endpoints e ON e.id = d.endpoint_id
    ORDER BY d.dead_at DESC, d.id DESC
$$;

-- `nova hooks list`: every endpoint with where its delivery stands.
CREATE OR REPLACE FUNCTION nova_hook_overview()
RETURNS TABLE (id uuid, url text, event_kinds text[], enabled boolean, disabled_reason text,
               disabled_at timestamptz, failing_since timestamptz, throttled_until timestamptz,
               rotating_until timestamptz, created_at timestamptz, delivered bigint,
               last_delivered_at timestamptz, inboxes_waiting bigint, inboxes_retrying bigint,
               next_attempt_at timestamptz, last_error text, dead_letters bigint,
               inboxes_pruned bigint)
LANGUAGE sql STABLE AS $$
    SELECT e.id, e.url, e.event_kinds, e.enabled, e.disabled_reason, e.disabled_at,
           e.failing_since, e.throttled_until,
           CASE WHEN e.previous_secret_until > now() THEN e.previous_secret_until END,
           e.created_at,
           coalesce(s.delivered, 0), s.last_delivered_at,
           u.waiting, coalesce(s.retrying, 0), s.next_attempt_at, s.last_error,
           (SELECT count(*) FROM nova_hook_dead_letters d WHERE d.endpoint_id = e.id),
           u.pruned
    FROM nova_hook_endpoints e
    LEFT JOIN LATERAL (
        SELECT sum(t.delivered)::bigint AS delivered, max(t.last_delivered_at) AS last_delivered_at,
               count(*) FILTER (WHERE t.next_attempt_at IS NOT NULL) AS retrying,
               min(t.next_attempt_at) AS next_attempt_at,
               (array_agg(t.last_error ORDER BY t.next_attempt_at DESC NULLS LAST)
                    FILTER (WHERE t.next_attempt_at IS NOT NULL))[1] AS last_error
        FROM nova_hook_streams t WHERE t.endpoint_id = e.id
    ) s ON true
    CROSS JOIN LATERAL (
        SELECT count(*) AS waiting, count(*) FILTER (WHERE w.behind) AS pruned
        FROM nova_events_unread(nova_hook_consumer(e.id)) w
    ) u
    ORDER BY e.created_at, e.id
$$;
