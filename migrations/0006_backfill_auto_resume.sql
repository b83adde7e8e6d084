-- A backfill that failed (its attempts spent on crashes, an outage, a provider that kept
-- failing) is resumed from its checkpoint by the completion monitor, a bounded number of times
-- since it was queued (resume_failed_backfills in sql/060_backfill_recovery.sql).
ALTER TABLE flux_inbox_configurations
    ADD COLUMN auto_resumes integer NOT NULL DEFAULT 0 CHECK (auto_resumes >= 0);
