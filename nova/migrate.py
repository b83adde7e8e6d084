"""Bring a database to Nova's schema: `nova migrate` or `python -m nova.migrate`.

1. Install PGMQ: `CREATE EXTENSION pgmq` where the server offers it, else the SQL bundled with
   the `pgmq` package (once: it cannot be re-run over an existing `pgmq` schema).
2. Apply each `migrations/NNNN_name.sql` not yet applied, in order, one transaction each, and
   record it with the SHA-256 of its text. A recorded file whose text changed is an error that
   names it: history is never rewritten silently.
3. Re-apply every file of `sql/` in name order (CREATE OR REPLACE functions, triggers, views) in
   one transaction, so code-like SQL is always the checked-out version.

Concurrent runs are serialized by an advisory lock, so many processes starting at once is safe.
The lock is transaction-scoped and held by a transaction of its own, on a second connection, for
the whole run: a session lock would not hold through a transaction pooler (PgBouncer), which may
send the unlock to another server connection than the lock. A run that finds the lock taken ends
its transaction and tries again shortly, so that while it waits it keeps none of a pooler's
server connections busy; the run holding the lock keeps two. Nothing else outlives a transaction
either: notices are silenced with SET LOCAL in each one, and psycopg prepares nothing
(db.connect).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg

from nova import db
from nova.config import settings_or_exit
from nova.logs import setup_logging

log = logging.getLogger("nova.migrate")

# Any fixed 64-bit key: "nova" "migr" in ASCII.
ADVISORY_LOCK_KEY = 0x6E6F76616D696772
LOCK_RETRY_SECONDS = 0.2
MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The database and the migration files disagree; the message says where."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass
class MigrateResult:
    pgmq_installed: str | None = None  # "extension" or "bundled-sql <version>" when installed now
    applied: list[str] = field(default_factory=list)
    sql_files: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.pgmq_installed is not None or bool(self.applied)


def schema_dir(kind: str) -> Path:
    """`migrations` or `sql`: from the source tree, else from inside the installed wheel."""
    source = Path(__file__).resolve().parent.parent / kind
    if source.is_dir():
        return source
    bundled = Path(str(files("nova").joinpath("_schema", kind)))
    if bundled.is_dir():
        return bundled
    raise MigrationError(f"cannot find the {kind}/ directory (looked in {source} and {bundled})")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or schema_dir("migrations")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        found.append(Migration(match.group(1), path.name, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        raise MigrationError(f"two migration files share the number {', '.join(duplicates)}")
    return found


def load_sql_files(directory: Path | None = None) -> list[tuple[str, str]]:
    directory = directory or schema_dir("sql")
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.sql"))]


@contextmanager
def _locked(url: str) -> Iterator[None]:
    """Hold the migration lock (module doc) while the block runs."""
    with db.connect(url, autocommit=True) as lock:
        while True:
            with lock.transaction():
                row = lock.execute("SELECT pg_try_advisory_xact_lock(%s)",
                                   (ADVISORY_LOCK_KEY,)).fetchone()
                if row and row[0]:
                    yield
                    return
            time.sleep(LOCK_RETRY_SECONDS)


@contextmanager
def _transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction whose notices ("already exists, skipping", PGMQ's install) stay on the
    server: SET LOCAL, since a session's SET would stay behind on a pooler's server connection
    for its next client."""
    with conn.transaction():
        conn.execute("SET LOCAL client_min_messages = warning")
        yield


def _install_pgmq(conn: psycopg.Connection[Any]) -> str | None:
    """Install PGMQ unless it is there; returns how it was installed, or None."""
    present = conn.execute(
        "SELECT to_regclass('pgmq.meta') IS NOT NULL"
    ).fetchone()
    if present and present[0]:
        return None
    offered = conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq'"
    ).fetchone()
    with _transaction(conn):
        if offered:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgmq")
            return "extension"
        from pgmq.install import get_embedded_install_sql, get_embedded_sql_version

        conn.execute(get_embedded_install_sql())
        return f"bundled-sql {get_embedded_sql_version()}"


def _ensure_history_table(conn: psycopg.Connection[Any]) -> None:
    with _transaction(conn):
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS nova_schema_migrations (
                version    text PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )


def migrate(url: str, *, migrations_dir: Path | None = None,
            sql_dir: Path | None = None) -> MigrateResult:
    """Apply everything pending to the database at `url`. Safe to run any number of times."""
    migrations = load_migrations(migrations_dir)
    sql_files = load_sql_files(sql_dir)
    result = MigrateResult()
    with _locked(url), db.connect(url, autocommit=True) as conn:
        result.pgmq_installed = _install_pgmq(conn)
        _ensure_history_table(conn)
        history = conn.execute("SELECT version, name, checksum FROM nova_schema_migrations")
        applied = {row[0]: (row[1], row[2]) for row in history}
        for migration in migrations:
            if migration.version in applied:
                name, checksum = applied[migration.version]
                if checksum != migration.checksum:
                    raise MigrationError(
                        f"{migration.name} was changed after it was applied (recorded as "
                        f"{name}); add a new migration instead of editing an applied one"
                    )
                continue
            with _transaction(conn):
                conn.execute(migration.text)  # type: ignore[arg-type]
                conn.execute(
                    "INSERT INTO nova_schema_migrations (version, name, checksum)"
                    " VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            result.applied.append(migration.name)
        unknown = sorted(set(applied) - {m.version for m in migrations})
        if unknown:
            log.warning("[Migrate] database has migrations this checkout lacks: %s", unknown)
        with _transaction(conn):
            for name, text in sql_files:
                try:
                    conn.execute(text)  # type: ignore[arg-type]
                except psycopg.Error as exc:
                    raise MigrationError(f"sql/{name}: {exc}") from exc
                result.sql_files.append(name)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nova migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="overrides NOVA_DATABASE_URL / DATABASE_URL")
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    url = args.database_url or db.database_url(settings)
    try:
        result = migrate(url)
    except (MigrationError, psycopg.Error) as exc:  # one line: the server's LINE/HINT too
        print(f"[Migrate] failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if result.pgmq_installed:
        print(f"[Migrate] installed PGMQ ({result.pgmq_installed})")
    for name in result.applied:
        print(f"[Migrate] applied {name}")
    if not result.changed:
        print("[Migrate] schema up to date")
    print(f"[Migrate] {db.describe(url)}: {len(result.sql_files)} sql/ files re-applied")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
