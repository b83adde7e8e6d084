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
        "SELECT queue_inbox_backfill(%s, %s, %s) AS id",
        (inbox_id, kw.get("since"), kw.get("until")),
    ).fetchone()
    assert row is not None
    return row["id"] if isinstance(row, dict) else row[0]


def queue_depth(conn: psycopg.Connection[Any], queue: str) -> int:
    row = conn.execute("SELECT queue_length FROM flux_pgmq_metrics(%s)", (queue,)).fetchone()
    assert row is not None
    return int(row["queue_length"] if isinstance(row, dict) else row[0])
