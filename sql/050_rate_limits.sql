-- Provider request budgets, shared through Postgres so the limit holds across all workers, and
-- learned: a grant's real limit is not known in advance (Nylas allows 200 requests/s per grant,
-- but each call fans out to Google or Microsoft, which throttle lower, per mailbox, and change
-- over time), so each grant's rate moves with what the provider answers.
--
-- acquire_provider_budget is a GCRA (a token bucket written as a schedule): each call reserves
-- the next free slot of the grant under the row lock and returns how many seconds the caller
-- must wait before sending. 0 means "send now". The slot is the caller's: it sleeps the
-- returned time and sends WITHOUT asking again, so waiters never stampede and the grant's
-- requests leave at exactly its rate per second after a burst of `burst`.
--
-- The control law (constants below, reasons in the README):
-- * start at the configured rate (NOVA_PROVIDER_RATE_LIMIT); callers report the answers they
--   got since their last call (p_answered), so success costs no extra round trip;
-- * grow once per second of success while callers queue for slots and the provider answers
--   at least 0.7 of the current rate (a grant without demand, or whose requests are not
--   served at the rate, does not learn a rate it never used): x1.5 below ssthresh (slow
--   start), then +2% of ssthresh (congestion avoidance), never above the ceiling;
-- * on a 429 (provider_rate_limited) for a request sent after the last cut: the rate becomes
--   0.9 of what the provider really answered over the last second or two (but at least half
--   the rate before, and never below the floor); ssthresh becomes that answered rate when the
--   budget set the pace (callers holding slots ahead), but falls by at most 30% a refusal, and
--   stays when demand set it (a 429
--   below the pace Nova could use says "less for now", not where the limit is); Retry-After, when given, holds the grant for every worker. 429s of
--   requests sent before the cut are of the old rate and cut nothing more.
-- With p_ceiling NULL the rate is fixed at p_rate (no learning).

-- p_cost: what this request spends of the rate (a Nylas request 1; a Gmail call its method's
-- quota units, the rate then being units per second).
-- p_max_wait: the longest the caller will wait. When its slot would be later, no slot is taken
-- (the answers it reports and what the rate learns from the queue still count) and the wait is
-- returned negated (a slot taken returns >= 0, one refused < 0): the caller puts its job back for that long and its worker takes another inbox's
-- (nova.ratelimit.BudgetWait). NULL: the caller waits whatever it takes.
DROP FUNCTION IF EXISTS acquire_provider_budget(text, double precision, double precision);
DROP FUNCTION IF EXISTS acquire_provider_budget(text, double precision, double precision,
                                                integer, double precision);
DROP FUNCTION IF EXISTS acquire_provider_budget(text, double precision, double precision,
                                                integer, double precision, double precision);
CREATE OR REPLACE FUNCTION acquire_provider_budget(
    p_grant_id text,
    p_rate     double precision,
    p_burst    double precision DEFAULT 1,
    p_answered integer DEFAULT 0,
    p_ceiling  double precision DEFAULT NULL,
    p_cost     double precision DEFAULT 1,
    p_max_wait double precision DEFAULT NULL
)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    c_slow_start constant double precision := 1.5;
    c_additive   constant double precision := 0.02;
    v_row       provider_rate_limits;
    v_now       timestamptz;
    v_rate      double precision;
    v_step      interval;
    v_tolerance interval;
    v_tat       timestamptz;
    v_start     timestamptz;
    v_taken     boolean;
BEGIN
    IF p_grant_id IS NULL OR p_grant_id = '' THEN
        RAISE EXCEPTION 'acquire_provider_budget: grant id is required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_rate IS NULL OR p_rate <= 0 OR p_burst IS NULL OR p_burst < 1
       OR p_answered IS NULL OR p_answered < 0 OR p_ceiling <= 0 OR p_cost IS NULL OR p_cost <= 0 THEN
        RAISE EXCEPTION 'acquire_provider_budget: rate and ceiling must be > 0, burst >= 1, answered >= 0, cost > 0 (got %, %, %, %, %)',
            p_rate, p_burst, p_answered, p_ceiling, p_cost USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO provider_rate_limits (grant_id, next_free_at) VALUES (p_grant_id, clock_timestamp())
    ON CONFLICT (grant_id) DO NOTHING;
    SELECT * INTO v_row FROM provider_rate_limits WHERE grant_id = p_grant_id FOR UPDATE;
    v_now := clock_timestamp();   -- after the lock wait
    IF p_ceiling IS NULL THEN
        v_rate := p_rate;
    ELSE
        v_rate := least(coalesce(v_row.rate, p_rate), p_ceiling);
        -- Growth: a second of answers while callers queue for slots (this one would wait a
        -- whole step at the current rate), and the provider really answering most of the
        -- current rate: demand that the rate serves, not a burst or idleness, earns more.
        IF (p_answered > 0 OR v_row.answered > v_row.tick_answered)
           AND v_now - v_row.rate_changed_at >= interval '1 second'
           AND v_row.next_free_at - make_interval(secs => (p_burst - 1) / v_rate)
               >= v_now + make_interval(secs => 1.0 / v_rate)
           AND (v_row.answered_rate IS NULL OR v_row.answered_rate >= 0.7 * v_rate) THEN
            IF v_row.ssthresh IS NULL OR v_rate < v_row.ssthresh THEN
                v_rate := least(v_rate * c_slow_start, coalesce(v_row.ssthresh, p_ceiling));
            ELSE
                v_rate := v_rate + greatest(c_additive * v_row.ssthresh, 0.1);
            END IF;
            v_rate := least(v_rate, p_ceiling);
            v_row.rate_changed_at := v_now;
        END IF;
        -- Measure the rate the provider answered, over windows of two seconds.
        IF v_row.tick_at IS NULL THEN
            v_row.tick_at := v_now;
            v_row.tick_answered := v_row.answered;
        ELSIF v_now - v_row.tick_at >= interval '2 seconds' THEN
            v_row.answered_rate := (v_row.answered + p_answered - v_row.tick_answered)
                                   / extract(epoch FROM v_now - v_row.tick_at);
            v_row.tick_at := v_now;
            v_row.tick_answered := v_row.answered + p_answered;
        END IF;
    END IF;
    v_step := make_interval(secs => p_cost / v_rate);
    v_tolerance := make_interval(secs => (p_burst - 1) / v_rate);
    v_tat := greatest(v_row.next_free_at, v_now);
    IF v_row.held_until > v_now THEN
        -- After a 429 the first request goes when the hold ends, then at `rate`, no burst.
        v_tat := greatest(v_tat, v_row.held_until + v_tolerance);
    END IF;
    v_start := greatest(v_now, v_tat - v_tolerance);
    -- Too far off for this caller: no slot taken, it stays for whoever can use it now.
    v_taken := p_max_wait IS NULL OR v_start - v_now <= make_interval(secs => p_max_wait);
    UPDATE provider_rate_limits
    SET next_free_at = CASE WHEN v_taken THEN v_tat + v_step ELSE next_free_at END,
        requests = requests + CASE WHEN v_taken THEN 1 ELSE 0 END,
        updated_at = v_now,
        answered = answered + p_answered,
        rate = CASE WHEN p_ceiling IS NULL THEN rate ELSE v_rate END,
        rate_changed_at = v_row.rate_changed_at,
        tick_answered = v_row.tick_answered, tick_at = v_row.tick_at,
        answered_rate = v_row.answered_rate
    WHERE grant_id = p_grant_id;
    RETURN CASE WHEN v_taken THEN 1 ELSE -1 END
           * extract(epoch FROM v_start - v_now)::double precision;
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

-- Answers a process got and no slot request has carried yet (nova.ratelimit reports them on
-- their own after half a second): counted as if they had come with one. Rows locked in grant
-- order, one per grant.
CREATE OR REPLACE FUNCTION provider_answers_reported(p_grants text[], p_counts integer[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_grant text;
    v_count integer;
BEGIN
    FOR v_grant, v_count IN
        SELECT g, sum(n)::integer FROM unnest(p_grants, p_counts) AS x(g, n)
        WHERE g IS NOT NULL AND n > 0 GROUP BY g ORDER BY g
    LOOP
        UPDATE provider_rate_limits SET answered = answered + v_count WHERE grant_id = v_grant;
    END LOOP;
END;
$$;

-- A 429 for a request whose slot was granted at p_sent_at: the grant's rate is cut (once per
-- congestion event: only for a slot granted after the last cut; slots handed out ahead at the
-- old rate are of the old rate, though they are sent after the cut) to 0.9 of what the provider answered lately
-- (measured over windows of a second or two), or of the rate when nothing was measured, never below p_floor; with a
-- Retry-After (p_retry_after seconds) every worker waits it out. Returns the new rate.
CREATE OR REPLACE FUNCTION provider_rate_limited(
    p_grant_id    text,
    p_sent_at     timestamptz,
    p_retry_after double precision DEFAULT NULL,
    p_rate        double precision DEFAULT 10,
    p_floor       double precision DEFAULT 1
)
RETURNS double precision
LANGUAGE plpgsql AS $$
DECLARE
    c_cut     constant double precision := 0.9;
    c_keep    constant double precision := 0.7;
    v_row     provider_rate_limits;
    v_now     timestamptz;
    v_rate    double precision;
    v_seen    double precision;
BEGIN
    IF p_grant_id IS NULL OR p_grant_id = '' OR p_sent_at IS NULL OR p_rate IS NULL
       OR p_rate <= 0 OR p_floor IS NULL OR p_floor <= 0 OR p_retry_after < 0 THEN
        RAISE EXCEPTION 'provider_rate_limited: grant, sent time, rate > 0, floor > 0 and retry_after >= 0 are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO provider_rate_limits (grant_id) VALUES (p_grant_id) ON CONFLICT (grant_id) DO NOTHING;
    SELECT * INTO v_row FROM provider_rate_limits WHERE grant_id = p_grant_id FOR UPDATE;
    v_now := clock_timestamp();
    v_rate := coalesce(v_row.rate, p_rate);
    IF v_row.decreased_at IS NULL OR p_sent_at > v_row.decreased_at THEN
        -- What the provider really answered: the higher of the last whole window and the
        -- current one once it is a second long. Answers reach this row late (each process
        -- reports them with its next slot request, or after half a second), and a burst of
        -- 429s comes before the answers of the requests sent just ahead of them: the current
        -- window alone understated a 60/s limit as 27/s, and the known level then took a
        -- minute to climb back.
        v_seen := v_row.answered_rate;
        IF v_row.tick_at IS NOT NULL AND v_now - v_row.tick_at >= interval '1 second' THEN
            v_seen := greatest(v_seen, (v_row.answered - v_row.tick_answered)
                                       / extract(epoch FROM v_now - v_row.tick_at));
        END IF;
        -- Paced by the budget, and not by a Retry-After hold: during a hold and for a window
        -- after it, slots wait for the hold's end and the answers measured span its silence,
        -- so neither says where the limit is (forced 429s in the chaos suite took a 200/s
        -- grant's known level from 63 to 26 through holds).
        IF (v_row.next_free_at > v_now
            AND (v_row.held_until IS NULL OR v_row.held_until <= v_now - interval '2 seconds'))
           OR v_row.ssthresh IS NULL AND v_seen IS NULL THEN
            -- Paced by the budget (callers hold slots ahead): what the provider answered at
            -- that pace is its limit; but one refusal lowers the level by at most 30%: the
            -- answers of the last second or two understate it whenever something else slowed
            -- the workers (a restart, a starved CPU), and a lone 429 then cost the level for
            -- minutes. A limit that really fell is reached in a few refusals.
            v_row.ssthresh := greatest(
                CASE WHEN v_seen > 0 THEN least(v_seen, v_rate) ELSE v_rate END,
                c_keep * coalesce(v_row.ssthresh, v_rate));
        END IF;
        -- Otherwise demand, not the budget, set the pace: the provider wants less for now,
        -- but the level it answered before (ssthresh) stands, and slow start returns there as
        -- soon as callers queue again. Never below half the rate in one cut: answers measured
        -- while demand was falling understate what the provider allows.
        v_rate := greatest(p_floor, c_cut * least(coalesce(v_seen, v_rate), v_rate),
                           0.5 * v_rate);
        v_row.decreased_at := v_now;
        v_row.rate_changed_at := v_now;
    END IF;
    UPDATE provider_rate_limits
    SET rate = v_rate, ssthresh = v_row.ssthresh, decreased_at = v_row.decreased_at,
        rate_changed_at = v_row.rate_changed_at, limited = limited + 1, holds = holds + (p_retry_after IS NOT NULL)::int,
        held_until = CASE WHEN p_retry_after IS NULL THEN held_until
                          ELSE greatest(held_until, v_now + make_interval(secs => p_retry_after)) END,
        updated_at = v_now
    WHERE grant_id = p_grant_id;
    RETURN v_rate;
END;
$$;
