-- Provider request budgets, shared through Postgres so the limit holds across all workers.
--
-- acquire_provider_budget is a GCRA (a token bucket written as a schedule): each call reserves
-- the next free slot of the grant under the row lock and returns how many seconds the caller
-- must wait before sending. 0 means "send now". The slot is the caller's: it sleeps the
-- returned time and sends WITHOUT asking again, so waiters never stampede and the grant's
-- requests leave at exactly `rate` per second after a burst of `burst`.

CREATE OR REPLACE FUNCTION acquire_provider_budget(
    p_grant_id text,
    p_rate     double precision,
    p_burst    double precision DEFAULT 1
)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    v_row       provider_rate_limits;
    v_now       timestamptz;
    v_step      interval;
    v_tolerance interval;
    v_tat       timestamptz;
    v_start     timestamptz;
BEGIN
    IF p_grant_id IS NULL OR p_grant_id = '' THEN
        RAISE EXCEPTION 'acquire_provider_budget: grant id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_rate IS NULL OR p_rate <= 0 OR p_burst IS NULL OR p_burst < 1 THEN
        RAISE EXCEPTION 'acquire_provider_budget: rate must be > 0 and burst >= 1 (got %, %)',
            p_rate, p_burst USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_step := make_interval(secs => 1.0 / p_rate);
    v_tolerance := make_interval(secs => (p_burst - 1) / p_rate);
    INSERT INTO provider_rate_limits (grant_id, next_free_at) VALUES (p_grant_id, clock_timestamp())
    ON CONFLICT (grant_id) DO NOTHING;
    SELECT * INTO v_row FROM provider_rate_limits WHERE grant_id = p_grant_id FOR UPDATE;
    v_now := clock_timestamp();   -- after the lock wait
    v_tat := greatest(v_row.next_free_at, v_now);
    IF v_row.held_until > v_now THEN
        -- After a 429 the first request goes when the hold ends, then at `rate`, no burst.
        v_tat := greatest(v_tat, v_row.held_until + v_tolerance);
    END IF;
    v_start := greatest(v_now, v_tat - v_tolerance);
    UPDATE provider_rate_limits
    SET next_free_at = v_tat + v_step, requests = requests + 1, updated_at = v_now
    WHERE grant_id = p_grant_id;
    RETURN extract(epoch FROM v_start - v_now)::double precision;
END;
$$;

-- A 429's Retry-After, made binding for every worker: no slot starts before p_until.
CREATE OR REPLACE FUNCTION hold_provider_grant(p_grant_id text, p_until timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    v_until timestamptz;
BEGIN
    IF p_grant_id IS NULL OR p_grant_id = '' OR p_until IS NULL THEN
        RAISE EXCEPTION 'hold_provider_grant: grant id and until are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO provider_rate_limits AS r (grant_id, held_until, holds)
    VALUES (p_grant_id, p_until, 1)
    ON CONFLICT (grant_id) DO UPDATE
    SET held_until = greatest(r.held_until, EXCLUDED.held_until), holds = r.holds + 1,
        updated_at = now()
    RETURNING held_until INTO v_until;
    RETURN v_until;
END;
$$;
