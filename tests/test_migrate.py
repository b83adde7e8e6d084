"""nova migrate: PGMQ install, ordered checksummed migrations, re-applied sql/, locking."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from nova.migrate import MigrationError, migrate, schema_dir

# What differs on the embedded Postgres: CI runs these there too (README's test command).
pytestmark = pytest.mark.embedded


QUEUES = ["attachment_downloads", "inbox_backfill_jobs", "nylas_webhook_notifications",
          "thread_sync_jobs"]
TABLES = ["flux_inboxes", "flux_email_threads", "flux_email_messages", "flux_inbox_configurations",
          "flux_webhook_notifications", "inbox_sync_stats", "queued_threads",
          "flux_email_attachments"]
FUNCTIONS = ["flux_pgmq_send", "flux_pgmq_read", "flux_pgmq_delete", "flux_pgmq_metrics",
             "flux_pgmq_list_queues", "queue_nylas_webhook_notification",
             "acknowledge_webhook_notification", "queue_inbox_backfill",
             "insert_queued_thread_idempotent", "transition_to_thread_sync",
             "initialize_sync_stats", "queue_thread_sync", "update_backfill_orchestration_progress",
             "get_sync_progress", "get_webhook_metrics"]


def snapshot(url: str) -> dict[str, object]:
    """What a migrate could change: history, objects and their definitions, queue contents."""
    with psycopg.connect(url) as c:
        return {
            "history": c.execute(
                "SELECT version, checksum, applied_at FROM nova_schema_migrations ORDER BY 1"
            ).fetchall(),
            "tables": c.execute(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema IN ('public', 'pgmq') ORDER BY 1, 2").fetchall(),
            "functions": c.execute(
                "SELECT p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid)) FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'public' AND p.prokind = 'f' ORDER BY 1").fetchall(),
            "triggers": c.execute(
                # one name (nova_notify) on every queue table: order by the definition too
                "SELECT tgname, md5(pg_get_triggerdef(oid)) FROM pg_trigger"
                " WHERE NOT tgisinternal ORDER BY 1, 2").fetchall(),
            "queues": c.execute("SELECT queue_name FROM flux_pgmq_list_queues()").fetchall(),
        }


def test_fresh_database_gets_pgmq_queues_tables_and_functions(empty_db_url: str) -> None:
    result = migrate(empty_db_url)
    every = sorted(path.name for path in schema_dir("migrations").glob("*.sql"))
    assert every[0] == "0001_core_schema.sql"
    assert result.pgmq_installed and result.applied == every
    with psycopg.connect(empty_db_url) as c:
        queues = [r[0] for r in c.execute("SELECT queue_name FROM flux_pgmq_list_queues()")]
        assert queues == QUEUES
        tables = {r[0] for r in c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert set(TABLES) <= tables
        functions = {r[0] for r in c.execute(
            "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public'")}
        assert set(FUNCTIONS) <= functions


def test_second_run_changes_nothing(empty_db_url: str) -> None:
    migrate(empty_db_url)
    before = snapshot(empty_db_url)
    again = migrate(empty_db_url)
    assert not again.changed and again.applied == [] and again.pgmq_installed is None
    assert snapshot(empty_db_url) == before


def _copy_schema(tmp_path: Path) -> tuple[Path, Path]:
    migrations = tmp_path / "migrations"
    sql_dir = tmp_path / "sql"
    shutil.copytree(schema_dir("migrations"), migrations)
    shutil.copytree(schema_dir("sql"), sql_dir)
    return migrations, sql_dir


def test_new_migration_applies_once_in_order(empty_db_url: str, tmp_path: Path) -> None:
    migrations, sql_dir = _copy_schema(tmp_path)
    migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)
    (migrations / "9003_third.sql").write_text("INSERT INTO steps VALUES ('third');")
    (migrations / "9002_second.sql").write_text("CREATE TABLE steps (name text);"
                                                "INSERT INTO steps VALUES ('second');")
    result = migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)
    assert result.applied == ["9002_second.sql", "9003_third.sql"]
    migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT name FROM steps").fetchall() == [("second",), ("third",)]


def test_changed_applied_migration_is_an_error_naming_it(empty_db_url: str, tmp_path: Path) -> None:
    migrations, sql_dir = _copy_schema(tmp_path)
    migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)
    path = migrations / "0001_core_schema.sql"
    path.write_text(path.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0001_core_schema.sql was changed"):
        migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)


def test_failing_migration_rolls_back_and_is_not_recorded(empty_db_url: str,
                                                          tmp_path: Path) -> None:
    migrations, sql_dir = _copy_schema(tmp_path)
    (migrations / "9002_broken.sql").write_text(
        "CREATE TABLE half_done (x int); SELECT no_such_function();")
    with pytest.raises(psycopg.Error):
        migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        versions = [r[0] for r in c.execute("SELECT version FROM nova_schema_migrations")]
        assert "9002" not in versions and versions[0] == "0001"


def test_badly_named_migration_is_rejected(empty_db_url: str, tmp_path: Path) -> None:
    migrations, sql_dir = _copy_schema(tmp_path)
    (migrations / "2_oops.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="2_oops.sql"):
        migrate(empty_db_url, migrations_dir=migrations, sql_dir=sql_dir)


def test_concurrent_runs_are_serialized(empty_db_url: str) -> None:
    errors: list[BaseException] = []
    results = []

    def run() -> None:
        try:
            results.append(migrate(empty_db_url))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(1 for r in results if r.applied) == 1
    assert sum(1 for r in results if r.pgmq_installed) == 1


def test_cli_migrates_the_given_database_and_reports(empty_db_url: str) -> None:
    first = subprocess.run([sys.executable, "-m", "nova.migrate", "--database-url", empty_db_url],
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "applied 0001_core_schema.sql" in first.stdout
    second = subprocess.run([sys.executable, "-m", "nova.migrate", "--database-url", empty_db_url],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "schema up to date" in second.stdout


def test_cli_rejects_a_bad_setting_naming_it(empty_db_url: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "nova.migrate"], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "BATCH_SIZE": "lots",
                                           "NOVA_DATABASE_URL": empty_db_url})
    assert proc.returncode == 2
    assert re.search(r"BATCH_SIZE: .*integer", proc.stderr)


def test_a_failing_migration_is_one_line_on_stderr(empty_db_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from nova import migrate as migrate_module

    migrations, sql_dir = _copy_schema(tmp_path)
    (migrations / "9003_broken.sql").write_text("SELECT no_such_function(1, 'x');")
    monkeypatch.setattr(migrate_module, "schema_dir",
                        lambda kind: migrations if kind == "migrations" else sql_dir)
    monkeypatch.setenv("NOVA_DATABASE_URL", empty_db_url)
    assert migrate_module.main(["--database-url", empty_db_url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("[Migrate] failed: function no_such_function")
    assert "HINT:" in err  # the server's hint kept, on the same line
