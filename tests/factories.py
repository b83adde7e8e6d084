"""Small helpers that put rows in a test database through Nova's own SQL."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg


def add_inbox(conn: psycopg.Connection[Any], *, grant_id: str | None = None,
              email: str | None = None, status: str = "active") -> uuid.UUID:
    grant_id = grant_id or f"grant-{uuid.uuid4().hex[:8]}"
    row = conn.execute(
        "INSERT INTO flux_inboxes (grant_id, email, status) VALUES (%s, %s, %s) RETURNING id",
        (grant_id, email or f"{grant_id}@example.com", status),
    ).fetchone()
    assert row is not None
    return row["id"] if isinstance(row, dict) else row[0]


def start_backfill(conn: psycopg.Connection[Any], inbox_id: uuid.UUID, **kw: Any) -> uuid.UUID:
    row = conn.execute(
        "SELECT queue_inbox_backfill(%s, %s, %s, %s) AS id",
        (inbox_id, kw.get("since"), kw.get("until"), kw.get("kind", "full")),
    ).fetchone()
    assert row is not None
    return row["id"] if isinstance(row, dict) else row[0]


def queue_depth(conn: psycopg.Connection[Any], queue: str) -> int:
    row = conn.execute("SELECT queue_length FROM flux_pgmq_metrics(%s)", (queue,)).fetchone()
    assert row is not None
    return int(row["queue_length"] if isinstance(row, dict) else row[0])


# --- helpers for the SQL function tests -------------------------------------------------------

QUEUES = ("attachment_downloads", "inbox_backfill_jobs", "nylas_webhook_notifications",
          "thread_sync_jobs")
TRACKED_TABLES = ("flux_inboxes", "flux_inbox_configurations", "flux_webhook_notifications",
                  "queued_threads", "inbox_sync_stats")
COUNTERS = ("threads_queued", "threads_pending", "threads_processing", "threads_completed",
            "threads_failed", "messages_synced")


def _rows(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def one(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> dict[str, Any]:
    rows = _rows(conn, query, params)
    assert len(rows) == 1, rows
    return rows[0]


def scalar(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> Any:
    row = one(conn, query, params)
    return next(iter(row.values()))


def rows(conn: psycopg.Connection[Any], query: Any, params: Any = None) -> list[dict[str, Any]]:
    return _rows(conn, query, params)


def fingerprint(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Count and digest of every row Nova's SQL can write, queues and archives included."""
    from psycopg import sql

    tables = [("public", t) for t in TRACKED_TABLES]
    tables += [("pgmq", f"{kind}_{q}") for q in QUEUES for kind in ("q", "a")]
    out: dict[str, tuple[int, str]] = {}
    for schema, name in tables:
        row = one(conn, sql.SQL(
            "SELECT count(*) AS n, md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), ''))"
            " AS digest FROM {} x").format(sql.Identifier(schema, name)))
        out[f"{schema}.{name}"] = (row["n"], row["digest"])
    return out


def assert_rejected(conn: psycopg.Connection[Any], error: type[Exception], fragment: str,
                    query: Any, params: Any = None) -> psycopg.Error:
    """The call raises `error` whose message contains `fragment`, and writes nothing."""
    import pytest

    before = fingerprint(conn)
    with pytest.raises(error) as caught:
        conn.execute(query, params)
    assert fragment in str(caught.value), str(caught.value)
    assert fingerprint(conn) == before, "a rejected call left rows behind"
    return caught.value  # type: ignore[return-value]


def queue_messages(conn: psycopg.Connection[Any], queue: str) -> list[dict[str, Any]]:
    """All messages of a queue, visible or not, oldest first, without reading them."""
    from psycopg import sql

    return rows(conn, sql.SQL(
        "SELECT msg_id, read_ct, enqueued_at, vt, message FROM {} ORDER BY msg_id").format(
        sql.Identifier("pgmq", f"q_{queue}")))


def archived_messages(conn: psycopg.Connection[Any], queue: str) -> list[dict[str, Any]]:
    from psycopg import sql

    return rows(conn, sql.SQL("SELECT msg_id, message FROM {} ORDER BY msg_id").format(
        sql.Identifier("pgmq", f"a_{queue}")))


def add_config(conn: psycopg.Connection[Any], inbox_id: uuid.UUID,
               status: str = "pending") -> uuid.UUID:
    """A configuration written directly, in any state (queue_inbox_backfill makes 'queued')."""
    return scalar(conn, "INSERT INTO flux_inbox_configurations (inbox_id, backfill_status)"
                        " VALUES (%s, %s) RETURNING id", (inbox_id, status))


def set_config_status(conn: psycopg.Connection[Any], config_id: uuid.UUID, status: str) -> None:
    conn.execute("UPDATE flux_inbox_configurations SET backfill_status = %s WHERE id = %s",
                 (status, config_id))


def sync_stats(conn: psycopg.Connection[Any], config_id: uuid.UUID) -> dict[str, Any]:
    return one(conn, "SELECT * FROM inbox_sync_stats WHERE config_id = %s", (config_id,))


def real_counts(conn: psycopg.Connection[Any], config_id: uuid.UUID) -> dict[str, int]:
    """The counters as they should be, from the queued_threads rows themselves."""
    row = one(conn, """
        SELECT count(*) AS threads_queued,
               count(*) FILTER (WHERE status = 'queued') AS threads_pending,
               count(*) FILTER (WHERE status = 'processing') AS threads_processing,
               count(*) FILTER (WHERE status = 'completed') AS threads_completed,
               count(*) FILTER (WHERE status = 'failed') AS threads_failed,
               coalesce(sum(message_count) FILTER (WHERE status = 'completed'), 0)
                   AS messages_synced
        FROM queued_threads WHERE config_id = %s""", (config_id,))
    return {k: int(v) for k, v in row.items()}


def counters(conn: psycopg.Connection[Any], config_id: uuid.UUID) -> dict[str, int]:
    """The counters as a reader sees them: get_sync_progress, the base row of inbox_sync_stats
    plus the delta rows the monitor has not folded into it yet."""
    progress = one(conn, "SELECT * FROM get_sync_progress(%s)", (config_id,))
    return {k: int(progress[k]) for k in COUNTERS}


def fold(conn: psycopg.Connection[Any]) -> int:
    """Fold every delta row into the base rows (the completion monitor's step)."""
    return int(scalar(conn, "SELECT fold_sync_stats_deltas()"))


def retry_waiting(conn: psycopg.Connection[Any], config_id: uuid.UUID) -> tuple[int, int]:
    """(failed threads waiting for a retry round) as counted, and as the rows say."""
    counted = scalar(conn, "SELECT threads_retry_waiting FROM get_sync_progress(%s)",
                     (config_id,))
    real = scalar(conn, "SELECT count(*) FROM queued_threads WHERE config_id = %s"
                        " AND status = 'failed' AND retry_at IS NOT NULL", (config_id,))
    return int(counted), int(real)


def assert_stats_exact(conn: psycopg.Connection[Any], config_id: uuid.UUID) -> dict[str, int]:
    """The counters agree with the rows, and still agree once the deltas are folded."""
    expected = real_counts(conn, config_id)
    assert counters(conn, config_id) == expected
    counted, real = retry_waiting(conn, config_id)
    assert counted == real
    fold(conn)
    assert counters(conn, config_id) == expected
    if one(conn, "SELECT count(*) AS n FROM inbox_sync_stats WHERE config_id = %s",
           (config_id,))["n"]:
        assert {k: int(v) for k, v in sync_stats(conn, config_id).items()
                if k in COUNTERS} == expected
    return expected
