-- Per-grant request budget shared by every worker on every machine (see sql/050_rate_limits.sql).
-- One row per provider grant: a GCRA schedule (next_free_at is the theoretical arrival time of
-- the next request) plus a hold set from a 429's Retry-After.
CREATE TABLE provider_rate_limits (
    grant_id      text PRIMARY KEY CHECK (grant_id <> ''),
    next_free_at  timestamptz NOT NULL DEFAULT now(),
    held_until    timestamptz,
    requests      bigint NOT NULL DEFAULT 0,   -- slots handed out
    holds         bigint NOT NULL DEFAULT 0,   -- 429s reported
    updated_at    timestamptz NOT NULL DEFAULT now()
);
