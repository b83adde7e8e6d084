-- Thread-sync jobs are read in turns across inboxes (sql/030_backfill.sql, nova_thread_turn):
-- each message carries its lane (the inbox, or the inbox's live lane) and its turn. The reader
-- takes the lowest turns first; the sender finds the frontier (the highest turn being served,
-- from the partial index of messages read, or the lowest waiting) and its lane's last turn.
CREATE INDEX IF NOT EXISTS q_thread_sync_jobs_turn_idx
    ON pgmq.q_thread_sync_jobs ((coalesce((message->>'turn')::bigint, 0)), msg_id);
CREATE INDEX IF NOT EXISTS q_thread_sync_jobs_lane_idx
    ON pgmq.q_thread_sync_jobs ((message->>'lane'), (coalesce((message->>'turn')::bigint, 0)));
CREATE INDEX IF NOT EXISTS q_thread_sync_jobs_served_idx
    ON pgmq.q_thread_sync_jobs ((coalesce((message->>'turn')::bigint, 0))) WHERE read_ct > 0;
