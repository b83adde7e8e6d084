-- Progress counters no job transaction locks, and failed threads that are retried later.

-- The counter triggers on queued_threads used to add each change to the configuration's one
-- inbox_sync_stats row: every job of a backfill locked that row from its status change to its
-- commit, so the backfill's workers queued on it, and it closed deadlock cycles with the thread
-- rows (DESIGN.md, "One lock order"). Now each statement appends its change here, insert-only;
-- get_sync_progress adds these rows to the base row, and the completion monitor folds them
-- into it (fold_sync_stats_deltas). No foreign key on purpose: its check would lock the
-- configuration row (FOR KEY SHARE) in every job transaction. The fold drops the rows of a
-- configuration that no longer exists.
CREATE TABLE inbox_sync_stats_deltas (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    config_id              uuid NOT NULL,
    threads_queued         bigint NOT NULL DEFAULT 0,
    threads_pending        bigint NOT NULL DEFAULT 0,
    threads_processing     bigint NOT NULL DEFAULT 0,
    threads_completed      bigint NOT NULL DEFAULT 0,
    threads_failed         bigint NOT NULL DEFAULT 0,
    messages_synced        bigint NOT NULL DEFAULT 0,
    threads_retry_waiting  bigint NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_sync_stats_deltas_config_idx ON inbox_sync_stats_deltas (config_id);

-- Failed threads waiting for a retry round (a subset of threads_failed).
ALTER TABLE inbox_sync_stats
    ADD COLUMN threads_retry_waiting bigint NOT NULL DEFAULT 0;

-- A thread that failed its attempts is tried again later, a bounded number of rounds
-- (nova.threads: NOVA_THREAD_RETRY_ROUNDS, NOVA_THREAD_RETRY_SECONDS).
--   retry_rounds  rounds already started
--   retry_at      when the monitor looks at the thread again: for a failed thread, when its
--                 next round is due (NULL: no round left, or none wanted); for a thread of a
--                 round in flight, when to check that its job still exists
ALTER TABLE queued_threads
    ADD COLUMN retry_rounds integer NOT NULL DEFAULT 0 CHECK (retry_rounds >= 0),
    ADD COLUMN retry_at timestamptz;
-- What is due, for the monitor's sweep: never a scan of all history.
CREATE INDEX queued_threads_retry_due_idx ON queued_threads (retry_at)
    WHERE retry_at IS NOT NULL;
-- One backfill's next retry, for get_sync_progress.
CREATE INDEX queued_threads_retry_config_idx ON queued_threads (config_id, retry_at)
    WHERE retry_at IS NOT NULL;
