"""The read contract (README, "Reading Nova's tables"): the views and functions an application
may rely on keep their names, columns and types. A change to this file is a change of the
contract: it goes with a migration and a note in the README's contract section."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg

from tests.factories import add_inbox

README = Path(__file__).resolve().parent.parent / "README.md"

VIEWS: dict[str, list[tuple[str, str]]] = {
    "nova_messages": [
        ("id", "uuid"), ("inbox_id", "uuid"), ("thread_id", "uuid"),
        ("provider_message_id", "text"), ("provider_thread_id", "text"), ("subject", "text"),
        ("snippet", "text"), ("from_addresses", "jsonb"), ("to_addresses", "jsonb"),
        ("cc_addresses", "jsonb"), ("bcc_addresses", "jsonb"), ("reply_to", "jsonb"),
        ("body_text", "text"), ("body_html", "text"), ("folders", "ARRAY"),
        ("unread", "boolean"), ("starred", "boolean"), ("has_attachments", "boolean"),
        ("sent_at", "timestamp with time zone"), ("headers", "jsonb"),
        ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
    ],
    "nova_threads": [
        ("id", "uuid"), ("inbox_id", "uuid"), ("provider_thread_id", "text"),
        ("subject", "text"), ("snippet", "text"), ("participants", "jsonb"),
        ("folders", "ARRAY"), ("unread", "boolean"), ("starred", "boolean"),
        ("has_attachments", "boolean"), ("message_count", "integer"),
        ("first_message_at", "timestamp with time zone"),
        ("last_message_at", "timestamp with time zone"),
        ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
    ],
    "nova_participants": [
        ("message_id", "uuid"), ("inbox_id", "uuid"), ("thread_id", "uuid"), ("role", "text"),
        ("position", "integer"), ("email", "text"), ("email_lower", "text"), ("name", "text"),
    ],
    "nova_attachments": [
        ("id", "uuid"), ("message_id", "uuid"), ("inbox_id", "uuid"),
        ("provider_attachment_id", "text"), ("filename", "text"), ("content_type", "text"),
        ("size", "bigint"), ("is_inline", "boolean"), ("content_id", "text"),
        ("status", "text"), ("file_path", "text"), ("checksum", "text"),
        ("extracted_text", "text"), ("skipped_reason", "text"),
        ("downloaded_at", "timestamp with time zone"),
        ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
    ],
    "nova_folders": [
        ("id", "uuid"), ("inbox_id", "uuid"), ("provider_folder_id", "text"), ("name", "text"),
        ("role", "text"), ("system_folder", "boolean"), ("provider_parent_id", "text"),
        ("parent_name", "text"), ("background_color", "text"), ("text_color", "text"),
        ("total_count", "integer"), ("unread_count", "integer"),
        ("counts_at", "timestamp with time zone"), ("attributes", "ARRAY"),
        ("created_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone"),
    ],
    "nova_message_folders": [
        ("message_id", "uuid"), ("inbox_id", "uuid"), ("thread_id", "uuid"),
        ("position", "integer"), ("provider_folder_id", "text"), ("folder_id", "uuid"),
        ("name", "text"), ("role", "text"), ("folder_deleted", "boolean"),
    ],
}

# A table of the contract: its leading columns are the contract (nova_events.xid, after them,
# is the numbering's, not an app's).
TABLES: dict[str, list[tuple[str, str]]] = {
    "nova_events": [
        ("id", "bigint"), ("inbox_id", "uuid"), ("position", "bigint"), ("kind", "text"),
        ("object_id", "text"), ("provider_id", "text"), ("thread_id", "uuid"),
        ("changes", "jsonb"), ("occurred_at", "timestamp with time zone"),
    ],
}

FUNCTIONS: dict[str, str] = {
    "search_messages": "p_inbox uuid, p_query text, p_max_rows integer",
    "get_sync_progress": "p_config_id uuid",
    "nova_events_read": "p_consumer text, p_max integer",
    "nova_events_ack": "p_consumer text, p_inbox uuid, p_position bigint",
    "nova_find_folders": "p_inbox uuid, p_name_or_role text",
    "nova_folder_names": "p_inbox uuid, p_folder_ids text[]",
}


def columns(conn: psycopg.Connection[Any], relation: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        (relation,)).fetchall()
    return [(r["column_name"], r["data_type"]) for r in rows]


def test_every_contract_view_keeps_its_columns_and_types(conn: psycopg.Connection[Any]) -> None:
    for view, expected in VIEWS.items():
        assert columns(conn, view) == expected, view
    for table, expected in TABLES.items():
        assert columns(conn, table)[:len(expected)] == expected, table


def test_every_contract_function_exists_with_its_leading_arguments(
        conn: psycopg.Connection[Any]) -> None:
    for name, leading in FUNCTIONS.items():
        rows = conn.execute(
            "SELECT pg_get_function_identity_arguments(p.oid) AS args FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND p.proname = %s", (name,)).fetchall()
        assert rows, name
        assert any(r["args"].startswith(leading) for r in rows), (name, rows)


def test_the_readme_documents_every_contract_name() -> None:
    text = README.read_text()
    section = text[text.index("## Reading Nova's tables"):]
    section = section[:section.index("\n## ", 1)]
    for name in [*VIEWS, *TABLES, *FUNCTIONS]:
        assert re.search(rf"`{name}\b", section), name


def _message(conn: psycopg.Connection[Any], inbox: uuid.UUID, pid: str, **extra: Any) -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO flux_email_messages (inbox_id, provider_message_id, subject,"
        " from_addresses, to_addresses, cc_addresses, raw, body_cleaned)"
        " VALUES (%s, %s, %s, %s, %s, %s, '{\"internal\": 1}', 'x') RETURNING id",
        (inbox, pid, extra.get("subject", "s"),
         json.dumps([{"email": "Ann@Example.com", "name": "Ann"}]),
         json.dumps([{"email": "bob@example.com"}, {"email": "cy@example.com", "name": ""}]),
         json.dumps(extra.get("cc", [])))).fetchone()
    assert row is not None
    return row["id"]


def test_the_views_show_live_rows_only_and_no_internal_column(
        conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    live = _message(conn, inbox, "m-live")
    gone = _message(conn, inbox, "m-gone")
    conn.execute("UPDATE flux_email_messages SET deleted_at = now() WHERE id = %s", (gone,))
    ids = {r["id"] for r in conn.execute(
        "SELECT id FROM nova_messages WHERE inbox_id = %s", (inbox,)).fetchall()}
    assert ids == {live}
    for internal in ("raw", "body_cleaned", "provider_updated_at", "deleted_at"):
        assert internal not in dict(columns(conn, "nova_messages"))


def test_participants_are_one_row_per_address_in_order_with_roles(
        conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    msg = _message(conn, inbox, "m-1", cc=[{"name": "no address"}, "not an object"])
    rows = conn.execute(
        "SELECT role, position, email, email_lower, name FROM nova_participants"
        " WHERE message_id = %s ORDER BY role, position", (msg,)).fetchall()
    assert [tuple(r.values()) for r in rows] == [
        ("from", 1, "Ann@Example.com", "ann@example.com", "Ann"),
        ("to", 1, "bob@example.com", "bob@example.com", None),
        ("to", 2, "cy@example.com", "cy@example.com", None),
    ]
