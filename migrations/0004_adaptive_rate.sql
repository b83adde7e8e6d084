-- The per-grant request budget learns the grant's real limit (sql/050_rate_limits.sql): the rate
-- lives beside the schedule, so every worker on every machine paces to the same learned rate and
-- it survives restarts.
ALTER TABLE provider_rate_limits
    ADD COLUMN rate             double precision,   -- learned requests/s; NULL: not learned yet
    ADD COLUMN ssthresh         double precision,   -- what the provider answered at the last 429
    ADD COLUMN rate_changed_at  timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN decreased_at     timestamptz,        -- the last cut: 429s of requests sent before
                                                    -- it belong to the old rate
    ADD COLUMN answered         bigint NOT NULL DEFAULT 0,  -- non-429 answers reported
    ADD COLUMN limited          bigint NOT NULL DEFAULT 0,  -- 429s reported
    ADD COLUMN tick_at          timestamptz,        -- start of the current measuring window
    ADD COLUMN tick_answered    bigint NOT NULL DEFAULT 0,  -- `answered` at its start
    ADD COLUMN answered_rate    double precision;   -- answers/s over the last whole window
