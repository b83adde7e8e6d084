"""A throwaway, migrated database for a benchmark run.

NOVA_BENCH_DATABASE_URL (any database on the target server; the role needs CREATEDB) selects the
server; without it a temporary embedded Postgres is started and removed afterwards.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from nova import db
from nova.migrate import migrate


@contextmanager
def bench_database() -> Iterator[str]:
    server_url = os.environ.get("NOVA_BENCH_DATABASE_URL")
    if not server_url:
        tmp = tempfile.mkdtemp(prefix="nova-bench-pg-")
        os.chmod(tmp, 0o755)
        server_url = str(db.start_embedded(Path(tmp) / "pgdata").get_uri("postgres"))
    name = f"nova_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = db.url_with_database(server_url, name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def server_version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
