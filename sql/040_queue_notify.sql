-- Wake idle workers the moment a message is queued, so pickup never waits for a poll.
--
-- Why not pgmq.enable_notify_insert: its throttle is a single row that every inserting
-- transaction updates (with throttling off) and holds locked until commit, which serializes
-- concurrent senders; with throttling on, a message sent inside the throttle window raises no
-- notification and waits for the next poll. A statement-level trigger calling pg_notify takes
-- no row lock, and Postgres folds repeated notifications of one transaction into one.
CREATE OR REPLACE FUNCTION nova_notify_queue()
RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nova_' || TG_TABLE_NAME, '');
    RETURN NULL;
END;
$$;

DO $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT queue_name FROM pgmq.meta LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER nova_notify AFTER INSERT ON pgmq.%I'
                       ' FOR EACH STATEMENT EXECUTE FUNCTION nova_notify_queue()', 'q_' || q);
    END LOOP;
END;
$$;
