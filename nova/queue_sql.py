"""The statements a worker runs against its PGMQ queue (nova.runtime).

PGMQ has no call that checks read_ct, so the lease statements address the queue's table,
pgmq.q_<queue>, as PGMQ's own functions do.

The read is PGMQ's (`pgmq.read`: visible messages, locked SKIP LOCKED, vt pushed out, read_ct
+1), with two differences:
- it leaves out the messages of grants the worker was just told have no budget for a while
  (`runtime.Defer` with a grant): their jobs would only go back to the queue;
- on queues whose messages carry turns (`TURN_QUEUES`: thread-sync jobs, sql/030_backfill.sql
  nova_thread_turn), the lowest turn goes first, so inboxes take turns; elsewhere the oldest.
"""

from __future__ import annotations

import re

_QUEUE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,46}")

# Queues whose messages are ordered by turn across inboxes (indexed in
# migrations/0012_fair_queue.sql).
TURN_QUEUES = frozenset({"thread_sync_jobs"})
_TURN = "coalesce((message->>'turn')::bigint, 0)"
# A message whose grant the worker leaves alone for now ($n: the grants, text[]).
_NOT_BLOCKED = "coalesce(message->>'grant_id', '') <> ALL(${n}::text[])"
# A finished job's message goes (TESTING_MODE: stays, its read undone), only while the lease
# (msg_id $m, read_ct $r) is the job's.
_DELETE = "DELETE FROM {table} WHERE msg_id = ${m} AND read_ct = ${r} RETURNING msg_id"
_KEEP = ("UPDATE {table} SET read_ct = greatest(read_ct - 1, 0)"
         " WHERE msg_id = ${m} AND read_ct = ${r} RETURNING msg_id")


class QueueSQL:
    def __init__(self, queue: str) -> None:
        if not _QUEUE_NAME.fullmatch(queue):
            raise ValueError(f"not a PGMQ queue name: {queue!r}")
        table = f"pgmq.q_{queue}"
        order = f"{_TURN}, msg_id" if queue in TURN_QUEUES else "msg_id"
        # $1 how many, $2 the lease in seconds, $3 the grants to leave alone.
        self.read = (
            f"WITH cte AS (SELECT msg_id FROM {table}"
            f" WHERE vt <= clock_timestamp() AND {_NOT_BLOCKED.format(n=3)}"
            f" ORDER BY {order} LIMIT $1 FOR UPDATE SKIP LOCKED)"
            f" UPDATE {table} m SET last_read_at = clock_timestamp(),"
            " vt = clock_timestamp() + make_interval(secs => $2::float8),"
            " read_ct = m.read_ct + 1"
            " FROM cte WHERE m.msg_id = cte.msg_id"
            " RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.message")
        # When the next message the worker would take becomes visible ($1: grants left alone).
        self.next_vt = (f"SELECT extract(epoch FROM min(vt) - clock_timestamp()) FROM {table}"
                        f" WHERE {_NOT_BLOCKED.format(n=1)}")
        # The heartbeat: every lease of the worker at once; the ones it no longer holds are
        # missing from the result.
        self.renew = (
            f"UPDATE {table} q SET vt = clock_timestamp() + make_interval(secs => $3::float8)"
            " FROM unnest($1::bigint[], $2::int[]) AS l(msg_id, read_ct)"
            " WHERE q.msg_id = l.msg_id AND q.read_ct = l.read_ct RETURNING q.msg_id")
        self.hold = f"SELECT msg_id FROM {table} WHERE msg_id = $1 AND read_ct = $2 FOR UPDATE"
        self.delete = _DELETE.format(table=table, m=1, r=2)
        self.retry = (
            f"UPDATE {table} SET vt = clock_timestamp() + make_interval(secs => $3::float8)"
            " WHERE msg_id = $1 AND read_ct = $2 RETURNING msg_id")
        # Giving a message back costs no attempt: the read is undone. It is visible again
        # after $3 seconds: at once (shutdown, Fatal), or later (Defer).
        self.release = (
            f"UPDATE {table} SET read_ct = greatest(read_ct - 1, 0),"
            " vt = clock_timestamp() + make_interval(secs => $3::float8)"
            " WHERE msg_id = $1 AND read_ct = $2 RETURNING msg_id")
        # TESTING_MODE keeps a finished job's message; its run costs no attempt either.
        self.keep = _KEEP.format(table=table, m=1, r=2)
        self._table = table
        self.archive = "SELECT pgmq.archive($1, $2::bigint)"

    def finishing(self, statement: str, params: int, keep: bool) -> str:
        """A job's whole commit as one statement: its finish (the message's delete, or keep)
        and `statement`, a SELECT of one value with parameters $1..$params, which runs only
        when the finish found the message still held (the job's msg_id and read_ct are
        $params+1 and $params+2). Returns one row: `held` (the msg_id, NULL when the lease was
        lost) and `value` (the statement's, NULL when it did not run). The message is taken
        first, as a failure's record takes it: only its job and its worker's heartbeat (queue
        rows, nothing else) ever lock it, so the order makes no cycle."""
        finish = (_KEEP if keep else _DELETE).format(table=self._table, m=params + 1,
                                                     r=params + 2)
        return (f"WITH finished AS ({finish})"
                " SELECT (SELECT msg_id FROM finished) AS held,"
                f" CASE WHEN EXISTS (SELECT FROM finished) THEN ({statement}) END AS value")
