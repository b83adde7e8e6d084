-- Where a sweep keyed by a uuid left off (issue #19, item 5): the premature-completion sweep
-- walks the configurations with open threads in slices, by id, as the stuck-thread sweep
-- walks the open threads by their bigint id (nova_monitor_state.position).
ALTER TABLE nova_monitor_state ADD COLUMN cursor_id uuid;
