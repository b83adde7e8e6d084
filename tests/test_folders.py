"""Folders and labels by name (nova.folders, sql/150_folders.sql) against the sandboxes over
HTTP: a backfill fills them for Nylas and Gmail inboxes; a Nylas folder renamed shows its new
name once its folder.updated webhook is processed, a Gmail label once the next push is; a
deleted folder is soft-deleted; a replayed webhook changes nothing; hostile names are stored
cleanly; the view names a message's folders; `nova inbox show` lists them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from googleapiclient import discovery
from googleapiclient.http import HttpMock
from nylas import Client
from servers import ServerThread
from synchelp import API_KEY, add_inbox, make_sandbox, running, settings, start_backfill, wait_for
from test_gmail_sync import add_gmail_inbox, gmail_settings, webhook_worker
from test_gmail_sync import make_sandbox as make_gmail_sandbox

from nova import cli
from nova.backfill import BackfillProcessor
from nova.config import load_settings
from nova.providers import gmail_api
from nova.providers.folders import parse_gmail_label, parse_nylas_folder
from nova.receiver import create_app
from nova.runtime import Worker
from nova.sandbox.gmail import SandboxGmail
from nova.sandbox.nylas import SandboxNylas
from nova.sandbox.nylas.webhooks import sign
from nova.webhooks import WebhookProcessor

SECRET = "folders-test-secret"
FOLDERS = """
SELECT provider_folder_id AS id, name, role, provider_parent_id AS parent, system_folder,
       background_color, text_color, total_count, unread_count, deleted_at, updated_at
FROM flux_email_folders WHERE inbox_id = $1
"""
EVENTS = """
SELECT kind, provider_id, changes FROM nova_events
WHERE inbox_id = $1 AND kind LIKE 'folder.%' ORDER BY id
"""


async def stored(pool: asyncpg.Pool, inbox: uuid.UUID) -> dict[str, asyncpg.Record]:
    return {r["id"]: r for r in await pool.fetch(FOLDERS, inbox)}


def without_times(rows: dict[str, asyncpg.Record]) -> dict[str, dict[str, Any]]:
    return {k: {c: v for c, v in r.items() if c != "updated_at"} for k, r in rows.items()}


async def folder_events(pool: asyncpg.Pool, inbox: uuid.UUID) -> list[tuple[str, str, Any]]:
    return [(r["kind"], r["provider_id"], r["changes"]) for r in await pool.fetch(EVENTS, inbox)]


# ---------------------------------------------------------------- Nylas
@pytest.fixture
def nylas() -> Iterator[SandboxNylas]:
    with make_sandbox(20, webhook_secret=SECRET, webhook_retry_delays=(0.2, 0.4)) as sb:
        yield sb


@pytest.fixture
def receiver(db_url: str, nylas: SandboxNylas) -> Iterator[str]:
    app = create_app(load_settings(nylas_webhook_secret=SECRET), database_url=db_url)
    with ServerThread(app) as server:
        nylas.outbox.url = f"{server.url}/webhooks/nylas"
        yield server.url


async def discovered(pool: asyncpg.Pool, sb: SandboxNylas) -> uuid.UUID:
    """A Nylas inbox whose backfill's discovery ran (folders are listed before its pages)."""
    inbox = await add_inbox(pool, sb.grant_ids[0])
    await start_backfill(pool, inbox)
    s = settings(sb)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    return inbox


async def drain(db_url: str, pool: asyncpg.Pool, sb: SandboxNylas) -> Any:
    await sb.await_webhooks()
    s = load_settings(batch_size=4, poll_interval_ms=500, nylas_api_key=API_KEY,
                      nylas_api_uri=sb.base_url, database_url=db_url)
    return await Worker(WebhookProcessor(s), s, pool=pool, database_url=db_url).run(burst=True)


async def test_a_backfill_fills_the_folders_of_a_nylas_inbox(
        pool: asyncpg.Pool, nylas: SandboxNylas) -> None:
    inbox = await discovered(pool, nylas)
    grant = nylas.grant_ids[0]
    # What the official SDK reads from the same endpoint is what Nova stored.
    theirs = Client(API_KEY, nylas.base_url).folders.list(grant).data
    rows = await stored(pool, inbox)
    assert set(rows) == {f.id for f in theirs} and len(rows) == 12
    for f in theirs:
        row = rows[f.id]
        assert (row["name"], row["total_count"], row["unread_count"]) == (
            f.name, f.total_count, f.unread_count)
        assert row["system_folder"] is bool(f.system_folder)
        assert row["parent"] == f.parent_id and row["deleted_at"] is None
    assert rows["INBOX"]["role"] == "inbox" and rows["SENT"]["role"] == "sent"
    assert rows["SPAM"]["role"] == "spam" and rows["CATEGORY_UPDATES"]["role"] == \
        "category_updates"
    projects = rows["Label_Projects"]
    assert projects["role"] is None and projects["name"] == "Projects"
    assert (projects["background_color"], projects["text_color"]) == ("#16a766", "#ffffff")
    assert rows["Label_Projects_2024"]["parent"] == "Label_Projects"
    assert (await pool.fetchrow("SELECT parent_name FROM nova_folders WHERE inbox_id = $1"
                                " AND provider_folder_id = 'Label_Projects_2024'", inbox))[
        "parent_name"] == "Projects"
    # One change-feed event per folder; a second listing (a catch-up) changes nothing.
    events = await folder_events(pool, inbox)
    assert sorted(e[1] for e in events) == sorted(rows) and {e[0] for e in events} == {
        "folder.created"}
    assert events[[e[1] for e in events].index("Label_Projects")][2] == {
        "name": "Projects", "colour": {"background": "#16a766", "text": "#ffffff"}}
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed'"
                       " WHERE inbox_id = $1", inbox)
    await start_backfill(pool, inbox, kind="catch_up")
    s = settings(nylas)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    # (Only the counts' time moves: counts read again are "as of" the new listing.)
    assert without_times(await stored(pool, inbox)) == without_times(rows)
    assert len(await folder_events(pool, inbox)) == 12
    assert nylas.get_stats()["requests"]["list_folders"] == 3  # two backfills, the SDK


async def test_the_view_names_a_messages_folders(pool: asyncpg.Pool, db_url: str,
                                                 nylas: SandboxNylas) -> None:
    inbox = await discovered(pool, nylas)
    async with running(db_url, settings(nylas), backfill=0, threads=2):
        await wait_for(lambda: pool.fetchval(
            "SELECT backfill_status = 'completed' FROM flux_inbox_configurations"
            " WHERE inbox_id = $1", inbox), 60, what="thread sync")
    names = {r["id"]: r["name"] for r in (await stored(pool, inbox)).values()}
    messages = await pool.fetch("SELECT id, folders FROM flux_email_messages"
                                " WHERE inbox_id = $1 AND cardinality(folders) > 0", inbox)
    assert len(messages) > 20
    for m in messages:
        view = await pool.fetch("SELECT * FROM nova_message_folders WHERE message_id = $1"
                                " ORDER BY position", m["id"])
        assert [v["provider_folder_id"] for v in view] == list(m["folders"])
        assert [v["name"] for v in view] == [names[f] for f in m["folders"]]
        assert await pool.fetchval("SELECT nova_folder_names($1, $2)", inbox,
                                   m["folders"]) == [names[f] for f in m["folders"]]
    projects = [m for m in messages if "Label_Projects" in m["folders"]]
    assert projects, "the sandbox files some mail under Projects"
    found = await pool.fetch("SELECT m.id FROM flux_email_messages m JOIN nova_message_folders v"
                             " ON v.message_id = m.id WHERE v.inbox_id = $1"
                             " AND v.name = 'Projects'", inbox)
    assert {r["id"] for r in found} == {m["id"] for m in projects}
    # By role, by name whatever its case, by id; nothing for a word that names none.
    assert [r["provider_folder_id"] for r in await pool.fetch(
        "SELECT * FROM nova_find_folders($1, 'Sent')", inbox)] == ["SENT"]
    assert [r["provider_folder_id"] for r in await pool.fetch(
        "SELECT * FROM nova_find_folders($1, ' PROJECTS ')", inbox)] == ["Label_Projects"]
    assert await pool.fetch("SELECT * FROM nova_find_folders($1, 'nowhere')", inbox) == []
    # Nova's own counts per folder match the messages it holds.
    counts = {r["provider_folder_id"]: r["messages"] for r in await pool.fetch(
        "SELECT * FROM nova_folder_message_counts($1)", inbox)}
    assert counts["Label_Projects"] == len(projects)


async def test_a_nylas_folder_renamed_shows_its_new_name_after_its_webhook(
        pool: asyncpg.Pool, db_url: str, nylas: SandboxNylas, receiver: str) -> None:
    inbox = await discovered(pool, nylas)
    grant = nylas.grant_ids[0]
    before = await stored(pool, inbox)
    renamed = nylas.update_folder(grant, "Label_Projects", name="Clients & Projects",
                                  duplicate=True)  # delivered twice, as Nylas may
    stats = await drain(db_url, pool, nylas)
    assert stats.processed == 1
    row = (await stored(pool, inbox))["Label_Projects"]
    assert row["name"] == "Clients & Projects"
    # The payload carries no colour or parent: what it lacks is kept, not blanked.
    assert (row["background_color"], row["parent"]) == ("#16a766", None)
    assert (await pool.fetchrow("SELECT name FROM nova_folders WHERE inbox_id = $1"
                                " AND provider_folder_id = 'Label_Projects'", inbox))[
        "name"] == "Clients & Projects"
    events = await folder_events(pool, inbox)
    assert events[-1] == ("folder.updated", "Label_Projects", {"name": "Clients & Projects"})
    assert len(events) == len(before) + 1

    # Replayed under another notification id (a redelivery Nova cannot tell from a new
    # event): processed, and nothing changes, no event.
    payload = dict(renamed.notifications[0].payload)
    payload["id"] = str(uuid.uuid4())
    await post_signed(receiver, payload)
    assert (await drain(db_url, pool, nylas)).processed == 1
    assert (await stored(pool, inbox))["Label_Projects"] == row
    assert len(await folder_events(pool, inbox)) == len(events)
    # An older rename delivered late (out of order) does not undo the newer one.
    late = {**payload, "id": str(uuid.uuid4()), "time": payload["time"] - 60}
    late["data"] = {**payload["data"], "object": {**payload["data"]["object"],
                                                  "name": "Old name"}}
    await post_signed(receiver, late)
    await drain(db_url, pool, nylas)
    assert (await stored(pool, inbox))["Label_Projects"]["name"] == "Clients & Projects"

    # A folder created at the provider appears; its notification names no parent yet.
    created = nylas.create_folder(grant, "Receipts", folder_id="Label_Receipts")
    await drain(db_url, pool, nylas)
    assert (await stored(pool, inbox))["Label_Receipts"]["name"] == "Receipts"
    assert created.folder is not None and (await folder_events(pool, inbox))[-1] == (
        "folder.created", "Label_Receipts", {"name": "Receipts"})
    notes = {r["notification_type"]: r["status"] for r in await pool.fetch(
        "SELECT notification_type, status FROM flux_webhook_notifications")}
    assert notes == {"folder.updated": "processed", "folder.created": "processed"}


async def test_a_deleted_folder_is_soft_deleted(pool: asyncpg.Pool, db_url: str,
                                               nylas: SandboxNylas, receiver: str) -> None:
    inbox = await discovered(pool, nylas)
    grant = nylas.grant_ids[0]
    await pool.execute(
        "INSERT INTO flux_email_messages (inbox_id, provider_message_id, folders)"
        " VALUES ($1, 'm1', ARRAY['INBOX', 'Label_Projects_2024'])", inbox)
    deleted = nylas.delete_folder(grant, "Label_Projects_2024")
    await drain(db_url, pool, nylas)
    row = (await stored(pool, inbox))["Label_Projects_2024"]
    assert row["deleted_at"] is not None and row["name"] == "2024"  # kept, marked
    assert await pool.fetchval("SELECT count(*) FROM nova_folders WHERE inbox_id = $1"
                               " AND provider_folder_id = 'Label_Projects_2024'", inbox) == 0
    view = await pool.fetch("SELECT name, folder_deleted FROM nova_message_folders v"
                            " JOIN flux_email_messages m ON m.id = v.message_id"
                            " WHERE m.provider_message_id = 'm1' ORDER BY position")
    assert [(v["name"], v["folder_deleted"]) for v in view] == [("INBOX", False),
                                                                ("2024", True)]
    assert (await folder_events(pool, inbox))[-1] == ("folder.deleted", "Label_Projects_2024",
                                                      {})
    # A folder.updated older than the deletion, delivered late, does not bring it back.
    late = dict(deleted.notifications[0].payload)
    late |= {"id": str(uuid.uuid4()), "type": "folder.updated", "time": late["time"] - 30}
    await post_signed(receiver, late)
    await drain(db_url, pool, nylas)
    assert (await stored(pool, inbox))["Label_Projects_2024"]["deleted_at"] is not None
    # A deletion of a folder Nova never saw leaves a tombstone: a late creation stays dead.
    gone = {**late, "id": str(uuid.uuid4()), "type": "folder.deleted", "time": int(time.time())}
    gone["data"] = {**late["data"], "object": {"id": "Label_Never", "grant_id": grant,
                                               "object": "folder", "name": "Never"}}
    await post_signed(receiver, gone)
    await drain(db_url, pool, nylas)  # the tombstone first: two posts may be applied either way
    born = {**gone, "id": str(uuid.uuid4()), "type": "folder.created", "time": gone["time"] - 5}
    await post_signed(receiver, born)
    await drain(db_url, pool, nylas)
    assert (await stored(pool, inbox))["Label_Never"]["deleted_at"] is not None
    assert "Label_Never" not in {e[1] for e in await folder_events(pool, inbox)}
    # A listing that no longer has a folder soft-deletes it too (a catch-up backfill).
    nylas.delete_folder(grant, "Label_Projects", send=False)
    await pool.execute("UPDATE flux_inbox_configurations SET backfill_status = 'completed'"
                       " WHERE inbox_id = $1", inbox)
    await start_backfill(pool, inbox, kind="catch_up")
    s = settings(nylas)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    assert (await stored(pool, inbox))["Label_Projects"]["deleted_at"] is not None


HOSTILE = {
    "Label_Nul": ("Bad\x00Name", "BadName"),
    "Label_Lone": ("half \ud800 pair", "half \ufffd pair"),
    "Label_Huge": ("x" * 100_000, "x" * 400),
    "Label_Path": ("../../etc/passwd", "../../etc/passwd"),
    "Label_Dots": ("C:\\Windows\\..\\a/b", "C:\\Windows\\..\\a/b"),
    "Label_Bidi": ("\u202eevil\n\x1b[31mred", "\u202eevil\n\x1b[31mred"),
}


async def test_hostile_names_are_stored_cleanly(pool: asyncpg.Pool, db_url: str,
                                               nylas: SandboxNylas, receiver: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    grant = nylas.grant_ids[0]
    nylas.create_folder(grant, HOSTILE["Label_Nul"][0], folder_id="Label_Nul", send=False)
    nylas.create_folder(grant, HOSTILE["Label_Lone"][0], folder_id="Label_Lone", send=False)
    inbox = await discovered(pool, nylas)  # two through the listing
    for fid in ("Label_Huge", "Label_Path", "Label_Dots", "Label_Bidi"):  # the rest by webhook
        nylas.create_folder(grant, HOSTILE[fid][0], folder_id=fid)
    await drain(db_url, pool, nylas)
    rows = await stored(pool, inbox)
    for fid, (_, want) in HOSTILE.items():
        assert rows[fid]["name"] == want, fid
    # Shown escaped, one line per folder, the huge one cut.
    code = await asyncio.to_thread(cli.main, ["--database-url", db_url, "inbox", "show",
                                              grant])
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if "Label_Bidi" in x)
    assert "\\u202eevil\\x0a\\x1b[31mred" in line and "\x1b" not in out
    assert "x" * 39 + "\u2026" in out and len(out.splitlines()) == 2 + len(rows) + 1


async def test_nova_inbox_show_lists_folders_by_name_with_counts(
        pool: asyncpg.Pool, db_url: str, nylas: SandboxNylas,
        capsys: pytest.CaptureFixture[str]) -> None:
    inbox = await discovered(pool, nylas)
    await pool.execute(
        "INSERT INTO flux_email_messages (inbox_id, provider_message_id, folders, unread)"
        " VALUES ($1, 'a', ARRAY['INBOX'], true), ($1, 'b', ARRAY['INBOX', 'SENT'], false)",
        inbox)
    code = await asyncio.to_thread(cli.main, ["--database-url", db_url, "inbox", "show",
                                              str(inbox), "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["id"] == str(inbox)
    by_id = {f["provider_folder_id"]: f for f in shown["folders"]}
    want = await pool.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE unread) AS u FROM flux_email_messages"
        " WHERE inbox_id = $1 AND 'INBOX' = ANY (folders) AND deleted_at IS NULL", inbox)
    assert (by_id["INBOX"]["messages"], by_id["INBOX"]["unread"]) == (want["n"], want["u"])
    assert want["n"] >= 2 and want["u"] >= 1
    assert by_id["Label_Projects_2024"]["path"] == "Projects/2024"
    assert [f["role"] for f in shown["folders"]][:2] == ["inbox", "starred"]  # roles first
    code = await asyncio.to_thread(cli.main, ["--database-url", db_url, "inbox", "show",
                                              str(inbox)])
    text = capsys.readouterr().out
    assert code == 0 and "Projects/2024" in text and "12 folder(s)" in text
    inbox_line = next(x for x in text.splitlines() if x.endswith("  INBOX"))
    assert inbox_line.split()[1:4] == ["inbox", str(want["n"]), str(want["u"])]
    assert await asyncio.to_thread(cli.main, ["--database-url", db_url, "inbox", "show",
                                              "nobody@nowhere"]) == 1


async def post_signed(receiver: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{receiver}/webhooks/nylas", content=body,
                              headers={"X-Nylas-Signature": sign(body, SECRET)})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- Gmail
@pytest.fixture
def gmail() -> Iterator[SandboxGmail]:
    with make_gmail_sandbox(15) as sb:
        yield sb


async def gmail_discovered(pool: asyncpg.Pool, sb: SandboxGmail) -> uuid.UUID:
    s = gmail_settings(sb)
    inbox = await add_gmail_inbox(pool, sb, s)
    await start_backfill(pool, inbox)
    await Worker(BackfillProcessor(s), s, pool=pool).run(burst=True)
    return inbox


async def push(pool: asyncpg.Pool, db_url: str, sb: SandboxGmail, inbox: uuid.UUID) -> None:
    """A Pub/Sub push of the user's mailbox, stored as the receiver stores it, processed."""
    email = sb.users[0]
    nid = await pool.fetchval(
        "SELECT notification_id FROM queue_gmail_push_notification($1, $2, $3)",
        str(uuid.uuid4()), email, str(sb.history_id(email)))
    async with webhook_worker(db_url, gmail_settings(sb)):
        await wait_for(lambda: pool.fetchval(
            "SELECT status = 'processed' FROM flux_webhook_notifications WHERE id = $1", nid),
            30, what="push processed")


async def test_a_backfill_fills_the_labels_of_a_gmail_inbox(
        pool: asyncpg.Pool, gmail: SandboxGmail) -> None:
    email = gmail.users[0]
    parent = gmail.create_label(email, "Clients")  # "Clients/Acme" now sits under it
    inbox = await gmail_discovered(pool, gmail)
    rows = await stored(pool, inbox)
    listed = gmail.labels.listed(email)
    assert set(rows) == {lb["id"] for lb in listed}
    for lb in listed:
        full = gmail.labels.get(email, lb["id"])
        row = rows[lb["id"]]
        assert row["name"] == lb["name"] and row["system_folder"] is (lb["type"] == "system")
        assert (row["total_count"], row["unread_count"]) == (full["messagesTotal"],
                                                             full["messagesUnread"])
        assert (row["background_color"], row["text_color"]) == (
            (full.get("color") or {}).get("backgroundColor"),
            (full.get("color") or {}).get("textColor"))
    assert rows["INBOX"]["role"] == "inbox" and rows["DRAFT"]["role"] == "drafts"
    assert rows["CATEGORY_SOCIAL"]["role"] == "category_social" and rows["Label_1"]["role"] \
        is None
    assert rows["Label_1"]["background_color"] == "#16a766"
    assert rows["Label_3"]["parent"] == parent["id"] and rows["Label_1"]["parent"] is None
    units = gmail.get_stats()["units"][email]
    assert units["labels.list"] == 1 and units["labels.get"] == len(listed)


async def test_a_gmail_label_renamed_shows_its_new_name_after_the_next_push(
        pool: asyncpg.Pool, db_url: str, gmail: SandboxGmail) -> None:
    email = gmail.users[0]
    inbox = await gmail_discovered(pool, gmail)
    events = len(await folder_events(pool, inbox))
    gmail.rename_label(email, "Label_2", "Invoices")
    made = gmail.create_label(email, "Travel", background_color="#4a86e8",
                              text_color="#ffffff")
    gmail.delete_label(email, "Label_4")
    gmail.reset_stats()
    # Gmail records none of these: the next change of the mailbox pushes.
    gmail.add_message(email, subject="Your flight", labels=["INBOX", made["id"]])
    await push(pool, db_url, gmail, inbox)
    rows = await stored(pool, inbox)
    assert rows["Label_2"]["name"] == "Invoices"
    assert rows[made["id"]]["name"] == "Travel" and rows[made["id"]]["background_color"] == \
        "#4a86e8"  # a label new to Nova is asked for in full
    assert rows["Label_4"]["deleted_at"] is not None
    assert rows["Label_1"]["background_color"] == "#16a766"  # the list's silence kept it
    units = gmail.get_stats()["units"][email]
    assert units["labels.list"] == 1 and units["labels.get"] == 1
    assert sorted(e[:2] for e in (await folder_events(pool, inbox))[events:]) == [
        ("folder.created", made["id"]), ("folder.deleted", "Label_4"),
        ("folder.updated", "Label_2")]
    fresh = await pool.fetchval(
        "SELECT array_agg(v.name ORDER BY v.position) FROM nova_message_folders v"
        " JOIN flux_email_messages m ON m.id = v.message_id"
        " WHERE m.inbox_id = $1 AND m.subject = 'Your flight'", inbox)
    assert fresh == ["INBOX", "Travel"]
    # A push with nothing new changes nothing.
    before = await stored(pool, inbox)
    total = len(await folder_events(pool, inbox))
    await push(pool, db_url, gmail, inbox)
    assert await stored(pool, inbox) == before and len(await folder_events(pool, inbox)) == total


# ---------------------------------------------------------------- parsing
def test_payloads_are_read_with_their_exact_fields_and_absent_ones_kept() -> None:
    partial = parse_nylas_folder({"id": "f1", "name": "New", "object": "folder",
                                  "system_folder": False}, partial=True)
    assert partial is not None and partial.fields == {"name"}
    inbox = parse_nylas_folder({"id": "INBOX", "system_folder": True}, partial=True)
    assert inbox is not None and (inbox.fields, inbox.role) == ({"role"}, "inbox")
    listed = parse_nylas_folder({"id": "x", "name": "Junk Email", "attributes": ["\\Junk"],
                                 "background_color": "#ZZZ", "total_count": -3})
    assert listed is not None and (listed.role, listed.system) == ("spam", True)
    assert listed.background_color is None and listed.total_count is None
    assert "counts" in listed.fields and "colour" in listed.fields
    assert parse_nylas_folder({"id": "y" * 600, "name": "too long an id"}) is None
    label = parse_gmail_label({"id": "CATEGORY_FORUMS", "name": "CATEGORY_FORUMS",
                               "type": "system"})
    assert label is not None and label.role == "category_forums"
    assert label.fields == {"name", "parent", "role"}  # labels.list: no colour, no counts
    detailed = parse_gmail_label({"id": "Label_9", "name": "Mine", "type": "user",
                                  "messagesTotal": 4, "messagesUnread": 1}, detailed=True)
    assert detailed is not None and detailed.fields >= {"colour", "counts"}
    assert detailed.background_color is None and detailed.total_count == 4


@pytest.mark.parametrize("name", ["labels.list", "labels.get"])
def test_label_requests_are_the_ones_the_discovery_client_builds(name: str) -> None:
    params = {"userId": "Ann.O'Neil+mail@example.com"} | (
        {"id": "Label_1/x"} if name == "labels.get" else {})
    ours = gmail_api.build("http://127.0.0.1:8765", name, **params)
    service = discovery.build("gmail", "v1", http=HttpMock(), static_discovery=True,
                              cache_discovery=False,
                              client_options={"api_endpoint": "http://127.0.0.1:8765"})
    theirs = getattr(service.users().labels(), name.split(".")[1])(**params)
    assert (ours.method, ours.uri) == (theirs.method, theirs.uri.replace("?alt=json", ""))
