"""search_messages (sql/130_search.sql) and `nova search`: Gmail's operators over one inbox."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from nova import search, store
from nova.providers.models import Message, Participant
from tests import synchelp
from tests.factories import add_inbox

NOW = datetime.now(UTC)


def person(email: str, name: str | None = None) -> str:
    return json.dumps([{"name": name, "email": email}])


def add_message(conn: psycopg.Connection[Any], inbox: uuid.UUID, pid: str, *,
                subject: str = "", body: str = "", sender: str = "someone@example.net",
                sender_name: str | None = None, to: str = "me@example.com",
                cc: str | None = None, days_ago: float = 1.0, at: datetime | None = None,
                folders: tuple[str, ...] = ("INBOX",), unread: bool = False,
                starred: bool = False, attachment: tuple[str, str | None] | None = None,
                ) -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO flux_email_messages (inbox_id, provider_message_id, subject, body_text,"
        " from_addresses, to_addresses, cc_addresses, sent_at, folders, unread, starred,"
        " has_attachments) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (inbox, pid, subject, body, person(sender, sender_name), person(to),
         person(cc) if cc else "[]", at or NOW - timedelta(days=days_ago), list(folders),
         unread, starred, attachment is not None)).fetchone()
    assert row is not None
    if attachment:
        conn.execute(
            "INSERT INTO flux_email_attachments (inbox_id, message_id, provider_attachment_id,"
            " provider_message_id, original_filename) VALUES (%s, %s, 'a1', %s, %s)",
            (inbox, row["id"], pid, attachment[0]))
        if attachment[1] is not None:  # the attachment processor writes the text later
            conn.execute("UPDATE flux_email_attachments SET extracted_text = %s,"
                         " status = 'completed' WHERE message_id = %s", (attachment[1], row["id"]))
    return row["id"]  # type: ignore[no-any-return]


def index(conn: psycopg.Connection[Any]) -> int:
    """The completion monitor's step: build the search rows of mail written since."""
    return search.index_pending(conn, batch=2)


def found(conn: psycopg.Connection[Any], inbox: uuid.UUID, query: str) -> list[str]:
    """Provider ids of every match, newest first (all pages)."""
    out: list[str] = []
    cursor = None
    while True:
        rows = conn.execute("SELECT provider_message_id, next_cursor FROM search_messages"
                            "(%s, %s, 2, %s)", (inbox, query, cursor)).fetchall()
        out += [r["provider_message_id"] for r in rows]
        cursor = rows[-1]["next_cursor"] if rows else None
        if cursor is None:
            return out


@pytest.fixture
def mailbox(conn: psycopg.Connection[Any]) -> uuid.UUID:
    inbox = add_inbox(conn, grant_id="g-search", email="me@example.com")
    add_message(conn, inbox, "invoice", subject="Quarterly invoice", days_ago=1,
                body="Please find the invoice for March attached. Payment is due soon.",
                sender="alice.smith@mail.example.com", sender_name="Alice Smith",
                unread=True, attachment=("Q3-report.pdf", "zebra revenue figures"))
    add_message(conn, inbox, "lunch", subject="Lunch tomorrow?", days_ago=2,
                body="Are we still running for lunch? The invoice can wait.",
                sender="bob@other.org", sender_name="Bob Jones", cc="carol@example.com",
                folders=("SENT",), starred=True)
    add_message(conn, inbox, "news", subject="Weekly news", days_ago=40,
                body="Nothing about money here, only news from the project.",
                sender="news@lists.example.org", folders=("INBOX", "Label_42"))
    add_message(conn, inbox, "old", subject="Old contract", days_ago=800,
                body="The contract renewal. Invoice number 17.",
                sender="legal@firm.com", to="boss@example.com", cc="me@example.com",
                attachment=("contract-final.docx", None))
    assert index(conn) == 4 + 2                         # queue rows: 4 messages, 2 attachments
    return inbox


@pytest.mark.parametrize(("query", "expected"), [
    ("invoice", ["invoice", "lunch", "old"]),           # subject or body
    ("INVOICE", ["invoice", "lunch", "old"]),           # case-insensitive
    ("invoice payment", ["invoice"]),                   # words side by side: AND
    ("alice", ["invoice"]),                             # a sender's name is a word too
    ("from:alice", ["invoice"]),
    ("from:alice.smith@mail.example.com", ["invoice"]),
    ("from:example.com", ["invoice"]),                  # a parent domain
    ('from:"alice smith"', ["invoice"]),
    ("from:bob@example.com", []),
    ("to:carol@example.com", ["lunch"]),                # to: is any recipient (Cc too)
    ("cc:carol", ["lunch"]),
    ("cc:me", ["old"]),                                 # me: the inbox's own address
    ("to:boss", ["old"]),
    ("subject:invoice", ["invoice"]),                   # not the bodies that say invoice
    ('subject:"lunch tomorrow"', ["lunch"]),
    ('"invoice for march"', ["invoice"]),
    ('"march invoice"', []),                            # a phrase keeps its order
    ("has:attachment", ["invoice", "old"]),
    ("filename:pdf", ["invoice"]),
    ("filename:contract-final.docx", ["old"]),
    ("filename:report", ["invoice"]),
    ("label:Label_42", ["news"]),
    ("in:inbox", ["invoice", "news", "old"]),           # in:inbox -> INBOX
    ("in:sent", ["lunch"]),
    ("in:anywhere invoice", ["invoice", "lunch", "old"]),
    ("is:unread", ["invoice"]),
    ("is:read", ["lunch", "news", "old"]),
    ("is:starred", ["lunch"]),
    ("newer_than:7d", ["invoice", "lunch"]),
    ("older_than:1y", ["old"]),
    ("newer_than:2m -newer_than:7d", ["news"]),
    ("-invoice", ["news"]),
    ("invoice -from:bob", ["invoice", "old"]),
    ("-(invoice OR news)", []),
    ("from:alice OR from:bob", ["invoice", "lunch"]),
    ("from:alice OR from:bob is:starred", ["lunch"]),   # OR binds tighter than AND
    ("{news contract}", ["news", "old"]),               # braces: OR
    ("(lunch OR news) -is:starred", ["news"]),
    ("zebra", ["invoice"]),                             # attachment text
    ("revenue figures", ["invoice"]),
    ('"zebra revenue"', ["invoice"]),
    ("-zebra invoice", ["lunch", "old"]),
    ("", ["invoice", "lunch", "news", "old"]),
    ("http://example.com/x", []),                       # not an operator: words
])
def test_operators(conn: psycopg.Connection[Any], mailbox: uuid.UUID, query: str,
                   expected: list[str]) -> None:
    assert found(conn, mailbox, query) == expected


def test_after_and_before_take_dates_and_epoch_seconds(conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    add_message(conn, inbox, "jan", body="x", at=datetime(2024, 1, 10, 12, tzinfo=UTC))
    add_message(conn, inbox, "feb", body="x", at=datetime(2024, 2, 1, 0, tzinfo=UTC))
    add_message(conn, inbox, "mar", body="x", at=datetime(2024, 3, 5, tzinfo=UTC))
    index(conn)
    assert found(conn, inbox, "after:2024/02/01") == ["mar", "feb"]  # from 00:00 UTC on
    assert found(conn, inbox, "before:2024/02/01") == ["jan"]
    assert found(conn, inbox, "after:2024-01-01 before:2024/3/1") == ["feb", "jan"]
    epoch = int(datetime(2024, 2, 1, tzinfo=UTC).timestamp())
    assert found(conn, inbox, f"after:{epoch}") == ["mar", "feb"]
    assert found(conn, inbox, f"older:{epoch}") == ["jan"]


def test_deleted_messages_never_match(conn: psycopg.Connection[Any],
                                      mailbox: uuid.UUID) -> None:
    conn.execute("UPDATE flux_email_messages SET deleted_at = now() WHERE provider_message_id"
                 " IN ('invoice', 'news')")
    assert found(conn, mailbox, "invoice") == ["lunch", "old"]
    assert found(conn, mailbox, "zebra") == []          # nor by its attachment
    assert found(conn, mailbox, "") == ["lunch", "old"]
    assert found(conn, mailbox, "-lunch") == ["old"]


def test_label_and_in_find_folders_by_name_and_role(conn: psycopg.Connection[Any],
                                                    mailbox: uuid.UUID) -> None:
    conn.execute(
        "INSERT INTO flux_email_folders (inbox_id, provider_folder_id, name, role) VALUES"
        " (%(i)s, 'Label_42', 'My Receipts/2026', NULL), (%(i)s, 'SENT', 'SENT', 'sent'),"
        " (%(i)s, 'Label_9', 'Gone', NULL)", {"i": mailbox})
    conn.execute("UPDATE flux_email_folders SET deleted_at = now() WHERE name = 'Gone'")
    assert found(conn, mailbox, 'label:"my receipts/2026"') == ["news"]
    assert found(conn, mailbox, "label:my-receipts-2026") == ["news"]   # Gmail's spelling
    assert found(conn, mailbox, "in:sent") == ["lunch"]
    assert found(conn, mailbox, "label:gone") == []                     # a deleted folder
    other = add_inbox(conn)
    conn.execute("INSERT INTO flux_email_folders (inbox_id, provider_folder_id, name)"
                 " VALUES (%s, 'INBOX', 'Receipts')", (other,))
    assert found(conn, mailbox, "label:receipts") == []                 # another inbox's name


def test_other_inboxes_never_match(conn: psycopg.Connection[Any], mailbox: uuid.UUID) -> None:
    other = add_inbox(conn)
    add_message(conn, other, "elsewhere", subject="invoice", attachment=("zebra.pdf", "zebra"))
    index(conn)
    assert found(conn, mailbox, "zebra") == ["invoice"]
    assert found(conn, other, "invoice") == ["elsewhere"]


def test_paging_has_no_duplicates_and_no_gaps_under_equal_dates(
        conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    same = datetime(2024, 5, 1, 9, tzinfo=UTC)
    for i in range(23):  # 15 share one date, the rest spread around it
        add_message(conn, inbox, f"m{i:02d}", body="status report",
                    at=same if i < 15 else same + timedelta(hours=i - 18))
    assert index(conn) == 23
    everything = conn.execute("SELECT provider_message_id FROM search_messages(%s, 'report',"
                              " 1000)", (inbox,)).fetchall()
    pages: list[list[str]] = []
    cursor = None
    while True:
        rows = conn.execute("SELECT provider_message_id, next_cursor FROM search_messages"
                            "(%s, 'report', 5, %s)", (inbox, cursor)).fetchall()
        pages.append([r["provider_message_id"] for r in rows])
        assert all(r["next_cursor"] is None for r in rows[:-1])  # only the last row has one
        cursor = rows[-1]["next_cursor"] if rows else None
        if cursor is None:
            break
    flat = [p for page in pages for p in page]
    assert len(everything) == 23
    assert flat == [r["provider_message_id"] for r in everything]
    assert sorted(flat) == sorted(f"m{i:02d}" for i in range(23))
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]


def test_a_cursor_stays_valid_while_mail_arrives(conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    for i in range(6):
        add_message(conn, inbox, f"m{i}", body="hello", days_ago=i + 1)
    index(conn)
    first = conn.execute("SELECT provider_message_id, next_cursor FROM search_messages"
                         "(%s, 'hello', 3)", (inbox,)).fetchall()
    add_message(conn, inbox, "newest", body="hello", days_ago=0)  # lands on page one
    index(conn)
    rest = conn.execute("SELECT provider_message_id FROM search_messages(%s, 'hello', 3, %s)",
                        (inbox, first[-1]["next_cursor"])).fetchall()
    assert [r["provider_message_id"] for r in first] == ["m0", "m1", "m2"]
    assert [r["provider_message_id"] for r in rest] == ["m3", "m4", "m5"]


def test_rows_name_the_message(conn: psycopg.Connection[Any], mailbox: uuid.UUID) -> None:
    row = conn.execute("SELECT * FROM search_messages(%s, 'zebra')", (mailbox,)).fetchone()
    assert row is not None
    stored = conn.execute("SELECT id, subject FROM flux_email_messages WHERE"
                          " provider_message_id = 'invoice'").fetchone()
    assert stored is not None
    assert (row["message_id"], row["subject"]) == (stored["id"], "Quarterly invoice")
    assert (row["from_name"], row["from_email"]) == ("Alice Smith", "alice.smith@mail.example.com")
    assert row["unread"] and row["has_attachments"] and row["next_cursor"] is None


@pytest.mark.parametrize(("query", "fragment"), [
    ("is:bogus", "is:bogus is not supported"),
    ("has:spaceship", "has:spaceship is not supported"),
    ("after:2024/02/31", "after:2024/02/31 is not a date"),
    ("after:yesterday", "is not a date"),
    ("newer_than:3w", "is not an age"),
    ("larger:10M", "larger: is not supported"),
    ("from:a " * 70, "more than 64 terms"),
    ("from:a OR " * 1100, "at most 4000"),               # 10 KB of operators
    ("(" * 40 + "x", "nested more than 16 deep"),
])
def test_a_bad_query_is_a_clear_error(conn: psycopg.Connection[Any], mailbox: uuid.UUID,
                                      query: str, fragment: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        conn.execute("SELECT * FROM search_messages(%s, %s)", (mailbox, query))
    assert err.value.diag.message_primary is not None
    assert err.value.diag.message_primary.startswith("search: ")
    assert fragment in err.value.diag.message_primary


@pytest.mark.parametrize(("query", "expected"), [
    ('"invoice for march', ["invoice"]),                # an unclosed quote runs to the end
    ("(invoice OR news", ["invoice", "lunch", "news", "old"]),  # closed at the end
    ("invoice)", ["invoice", "lunch", "old"]),          # a stray bracket is ignored
    ("invoice OR", ["invoice", "lunch", "old"]),
    ("OR AND ( ) { } - \" \"", ["invoice", "lunch", "news", "old"]),
    ("'; DROP TABLE flux_email_messages; --", []),
    ("invoice' OR 1=1 --", ["invoice", "lunch", "old"]),  # words: invoice OR 1
    ("$1 $2[1] %s {}", []),
    ("subject:(a b)", []),
    ("!!! ??? invoice", ["invoice", "lunch", "old"]),  # punctuation alone: no condition
])
def test_a_hostile_query_gets_a_sane_result(conn: psycopg.Connection[Any], mailbox: uuid.UUID,
                                            query: str, expected: list[str]) -> None:
    assert found(conn, mailbox, query) == expected
    assert conn.execute("SELECT count(*) AS n FROM flux_email_messages").fetchone() == {"n": 4}


def test_bad_arguments_are_clear_errors(conn: psycopg.Connection[Any],
                                        mailbox: uuid.UUID) -> None:
    for args, fragment in (((mailbox, "x", 0, None), "max_rows must be 1 to 1000"),
                           ((mailbox, "x", 5, "bm90IGEgY3Vyc29y"), "invalid cursor"),
                           ((mailbox, "x", 5, "!!"), "invalid cursor"),
                           ((uuid.uuid4(), "x", 5, None), "no inbox")):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=fragment):
            conn.execute("SELECT * FROM search_messages(%s, %s, %s, %s)", args)


def test_nul_bytes_are_refused_before_the_database(conn: psycopg.Connection[Any],
                                                   mailbox: uuid.UUID) -> None:
    with pytest.raises(search.SearchError, match="NUL"):
        search.search(conn, mailbox, "invoice\x00; DROP TABLE x")


async def test_the_write_path_keeps_the_index(pool: Any, conn: psycopg.Connection[Any]) -> None:
    """Messages written by store.upsert_messages are found; a new text replaces the old one,
    an unchanged re-write leaves the search row alone."""
    inbox = add_inbox(conn)
    me = Participant("me@example.com", "Me")

    def message(body: str, unread: bool) -> Message:
        return Message(id="w1", grant_id="g", thread_id="t1", subject="Plans", from_=(me,),
                       to=(me,), cc=(), bcc=(), reply_to=(), date=NOW, snippet=body[:20],
                       body=f"<p>{body}</p>", folders=("INBOX",), unread=unread,
                       starred=False, attachments=(), raw={"id": "w1"})

    async def write(m: Message) -> None:
        async with pool.acquire() as c, c.transaction():
            await store.upsert_messages(c, inbox, await store.prepare_messages([m]),
                                        datetime.now(UTC))

    await write(message("first draft of the itinerary", unread=True))
    assert found(conn, inbox, "itinerary") == []         # queued, not indexed yet
    assert index(conn) == 1
    assert found(conn, inbox, "itinerary") == ["w1"]
    xmin = conn.execute("SELECT xmin::text AS x FROM flux_email_message_search").fetchone()
    await write(message("first draft of the itinerary", unread=False))  # a flag change
    assert waiting(conn) == 0                            # queues nothing
    assert index(conn) == 0
    assert conn.execute("SELECT xmin::text AS x FROM flux_email_message_search").fetchone() == xmin
    assert found(conn, inbox, "itinerary is:read") == ["w1"]
    await write(message("final schedule", unread=False))
    assert waiting(conn) == 1
    assert found(conn, inbox, "schedule") == []          # the old text until the index step
    assert found(conn, inbox, "itinerary") == ["w1"]
    assert index(conn) == 1
    assert found(conn, inbox, "itinerary") == []
    assert found(conn, inbox, "schedule") == ["w1"]


def waiting(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) AS n FROM flux_email_search_pending").fetchone()
    return int(row["n"]) if row else 0


def test_a_new_message_is_found_after_the_index_step(conn: psycopg.Connection[Any],
                                                     mailbox: uuid.UUID) -> None:
    mid = add_message(conn, mailbox, "fresh", subject="Walrus sighting", body="near the pier",
                      sender="dana@example.net", days_ago=0)
    assert waiting(conn) == 1
    assert found(conn, mailbox, "walrus") == []
    assert found(conn, mailbox, "from:dana") == []
    assert index(conn) == 1
    assert waiting(conn) == 0
    assert found(conn, mailbox, "walrus") == ["fresh"]
    assert found(conn, mailbox, "from:dana pier") == ["fresh"]
    assert index(conn) == 0                              # nothing left
    # a message deleted (for good) before its turn only leaves the queue
    conn.execute("UPDATE flux_email_messages SET subject = 'Walrus again' WHERE id = %s", (mid,))
    conn.execute("DELETE FROM flux_email_messages WHERE id = %s", (mid,))
    assert (waiting(conn), index(conn), waiting(conn)) == (1, 1, 0)


def test_an_edit_is_indexed_again(conn: psycopg.Connection[Any], mailbox: uuid.UUID) -> None:
    conn.execute("UPDATE flux_email_messages SET subject = 'Narwhal report',"
                 " to_addresses = %s WHERE provider_message_id = 'news'",
                 (person("erin@example.com"),))
    conn.execute("UPDATE flux_email_messages SET unread = true, folders = '{INBOX,X}'"
                 " WHERE provider_message_id = 'lunch'")  # no searched text: nothing queued
    assert waiting(conn) == 1
    assert found(conn, mailbox, "narwhal") == []
    assert found(conn, mailbox, "subject:weekly") == ["news"]
    assert index(conn) == 1
    assert found(conn, mailbox, "narwhal") == ["news"]
    assert found(conn, mailbox, "to:erin") == ["news"]
    assert found(conn, mailbox, "subject:weekly") == []


def test_a_batch_skips_a_message_a_writer_holds(db_url: str, conn: psycopg.Connection[Any],
                                                mailbox: uuid.UUID) -> None:
    """A write not yet committed keeps its queue row locked: the batch leaves it for later,
    and never indexes the text as it was before that write."""
    conn.execute("UPDATE flux_email_messages SET subject = 'Heron' WHERE"
                 " provider_message_id = 'news'")  # queued, committed
    with psycopg.connect(db_url) as writer:           # a second edit, not committed yet
        writer.execute("UPDATE flux_email_messages SET subject = 'Egret' WHERE"
                       " provider_message_id = 'news'")
        assert index(conn) == 0                        # its queue row is held: skipped
        writer.commit()
    assert index(conn) == 1
    assert found(conn, mailbox, "egret") == ["news"]
    assert found(conn, mailbox, "heron") == []


def test_the_index_step_refuses_a_bad_limit(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_limit"):
        conn.execute("SELECT nova_search_index_pending(0)")


def test_configuration_change_and_rebuild(conn: psycopg.Connection[Any],
                                          mailbox: uuid.UUID) -> None:
    assert found(conn, mailbox, "runs") == []            # 'simple': no stemming
    changed, done = search.reindex(conn, "english", batch=2)
    assert changed and done == 4                         # messages (with their attachments)
    assert found(conn, mailbox, "runs") == ["lunch"]     # running ~ runs
    assert search.reindex(conn, "english") == (False, 0)
    with pytest.raises(search.SearchError, match="not a text search configuration"):
        search.reindex(conn, "klingon")
    search.reindex(conn, "simple")
    assert found(conn, mailbox, "runs") == []


def nova(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOVA_DATABASE_URL": db_url, "NOVA_SEARCH_CONFIG": "simple"}
    return subprocess.run([sys.executable, "-m", "nova", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_nova_search_prints_and_json_parses(db_url: str, conn: psycopg.Connection[Any],
                                            mailbox: uuid.UUID) -> None:
    out = nova(db_url, "search", "me@example.com", "invoice", "--limit", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Quarterly invoice" in lines[0] and "Lunch tomorrow?" in lines[1]
    assert lines[2].startswith("more: --cursor ")
    rest = nova(db_url, "search", "g-search", "invoice", "--json", "--cursor",
                lines[2].split()[-1])
    assert rest.returncode == 0, rest.stderr
    page = json.loads(rest.stdout)
    assert [m["subject"] for m in page["messages"]] == ["Old contract"]
    assert page["next_cursor"] is None and page["inbox"] == str(mailbox)

    assert "waiting" not in out.stderr
    add_message(conn, mailbox, "fresh", subject="invoice")
    queued = nova(db_url, "search", "me@example.com", "invoice")
    assert queued.returncode == 0
    assert "1 new or edited message(s) or attachment(s) waiting for the index" in queued.stderr
    assert len(queued.stdout.splitlines()) == 3         # not the new one yet

    bad = nova(db_url, "search", str(mailbox), "is:bogus")
    assert bad.returncode == 2 and bad.stderr.startswith("nova: search: is:bogus")
    missing = nova(db_url, "search", "nobody@example.com", "x")
    assert missing.returncode == 1 and "no inbox" in missing.stderr


async def test_the_index_step_drains_the_queue_survives_errors_and_reports_once_a_minute(
        pool: Any, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from nova import search_index

    inbox = add_inbox(conn)
    for i in range(5):
        add_message(conn, inbox, f"m{i}", body="kestrel")
    monkeypatch.setattr(search_index, "SEARCH_INDEX_BATCH", 2)   # 2 + 2 + 1 in one drain
    monkeypatch.setattr(search_index, "SEARCH_INDEX_IDLE_SECONDS", 0.1)
    monkeypatch.setattr(search_index, "REPORT_SECONDS", 0.3)
    indexer = search_index.SearchIndexer(pool)
    assert await indexer.drain() == 5
    assert waiting(conn) == 0 and len(found(conn, inbox, "kestrel")) == 5
    with caplog.at_level("INFO", logger="nova.search"):
        monkeypatch.setattr(search_index, "SEARCH_INDEX_BATCH", 0)  # the statement refuses it
        task = asyncio.create_task(indexer.run())
        try:
            add_message(conn, inbox, "late", body="osprey")  # written while it runs
            for _ in range(50):
                if "[Search] index step failed" in caplog.text:
                    break
                await asyncio.sleep(0.05)
            assert "p_limit must be >= 1" in caplog.text and not task.done()
            monkeypatch.setattr(search_index, "SEARCH_INDEX_BATCH", 2)  # it goes on
            for _ in range(50):
                if found(conn, inbox, "osprey"):
                    break
                await asyncio.sleep(0.1)
            assert found(conn, inbox, "osprey") == ["late"]
            await asyncio.sleep(0.5)                     # a quiet report window: no line
        finally:
            indexer.stop()
            await task
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("[Search] indexed")]
    assert len(lines) == 1 and lines[0].startswith("[Search] indexed 1 message(s) in the last")


async def test_a_thread_worker_indexes_the_mail_it_syncs(pool: Any, db_url: str,
                                                        conn: psycopg.Connection[Any]) -> None:
    """The index step runs in the thread processes (nova.search_index), not the monitor."""
    with synchelp.make_sandbox(12) as sb:
        inbox = await synchelp.add_inbox(pool, sb.grant_ids[0])
        await synchelp.start_backfill(pool, inbox)
        async with synchelp.running(db_url, synchelp.settings(sb), threads=1, monitor=False):
            for _ in range(200):
                stored = await pool.fetchval(
                    "SELECT count(*) FROM flux_email_messages WHERE inbox_id = $1", inbox)
                indexed = await pool.fetchval(
                    "SELECT count(*) FROM flux_email_message_search WHERE inbox_id = $1", inbox)
                if stored and indexed == stored and waiting(conn) == 0:
                    break
                await asyncio.sleep(0.1)
        assert stored > 12 and indexed == stored and waiting(conn) == 0


def test_attachment_text_written_later_and_a_removed_attachment(
        conn: psycopg.Connection[Any], mailbox: uuid.UUID) -> None:
    """An attachment's name and text are words of its message: text the attachment processor
    writes later is found after the index step, a removed attachment's words no longer."""
    conn.execute("UPDATE flux_email_attachments SET extracted_text = 'platypus clause'"
                 " WHERE original_filename = 'contract-final.docx'")
    assert found(conn, mailbox, "platypus") == []
    assert index(conn) == 1                              # the attachment's queue row
    assert found(conn, mailbox, "platypus") == ["old"]
    assert found(conn, mailbox, '"platypus clause" filename:docx') == ["old"]
    conn.execute("UPDATE flux_email_attachments SET deleted_at = now()"
                 " WHERE original_filename = 'Q3-report.pdf'")
    assert index(conn) == 1
    assert found(conn, mailbox, "zebra") == []
    assert found(conn, mailbox, "filename:pdf") == []
    assert found(conn, mailbox, "invoice") == ["invoice", "lunch", "old"]  # its own text stays


def test_a_phrase_never_runs_from_one_field_into_the_next(conn: psycopg.Connection[Any]) -> None:
    inbox = add_inbox(conn)
    add_message(conn, inbox, "m", subject="Weekly gannet", body="report attached",
                attachment=("gannet-notes.txt", "summary follows"))
    index(conn)
    assert found(conn, inbox, '"weekly gannet"') == ["m"]
    assert found(conn, inbox, '"gannet report"') == []   # subject's end, body's start
    assert found(conn, inbox, '"attached gannet"') == []  # body's end, attachment's name
    assert found(conn, inbox, '"txt summary"') == []      # the name's end, its text's start
    assert found(conn, inbox, '"summary follows"') == ["m"]


def test_a_large_inbox_is_searched_in_windows_newest_first(
        conn: psycopg.Connection[Any]) -> None:
    """More messages than the first date window holds (1,000): matches only among the oldest
    and the newest, many sharing a date; pages by cursor across windows equal one big page."""
    inbox = add_inbox(conn)
    conn.execute("""
        INSERT INTO flux_email_messages (inbox_id, provider_message_id, subject, body_text,
                                         from_addresses, sent_at)
        SELECT %s, 'm' || lpad(g::text, 4, '0'), 'Note ' || g,
               CASE WHEN g %% 997 = 0 OR g > 2990 OR g < 4 THEN 'common rare' ELSE 'common' END,
               '[{"email": "x@example.com"}]',
               timestamptz '2024-01-01' + (g / 3) * interval '1 hour'
        FROM generate_series(1, 3000) g""", (inbox,))
    assert search.index_pending(conn, batch=500) == 3000
    rows = conn.execute("SELECT provider_message_id AS p, sent_at FROM search_messages"
                        "(%s, 'rare', 1000)", (inbox,)).fetchall()
    everything = [r["p"] for r in rows]
    expected = {g for g in range(1, 3001) if g % 997 == 0 or g > 2990 or g < 4}
    assert sorted(everything) == sorted(f"m{g:04d}" for g in expected)  # 15: 3 windows' worth
    assert [r["sent_at"] for r in rows] == sorted((r["sent_at"] for r in rows), reverse=True)
    assert set(everything[:10]) == {f"m{g:04d}" for g in range(2991, 3001)}
    assert set(everything[-3:]) == {"m0001", "m0002", "m0003"}
    assert found(conn, inbox, "rare") == everything      # pages of 2, by cursor
    assert len(found(conn, inbox, "common before:2024/01/05")) == 287  # g / 3 < 96 hours
    assert found(conn, inbox, "absent") == []


def test_a_changed_date_moves_the_message_after_the_index_step(
        conn: psycopg.Connection[Any], mailbox: uuid.UUID) -> None:
    conn.execute("UPDATE flux_email_messages SET sent_at = now() - interval '5 years'"
                 " WHERE provider_message_id = 'invoice'")
    assert waiting(conn) == 1
    assert index(conn) == 1
    assert found(conn, mailbox, "invoice") == ["lunch", "old", "invoice"]
    assert found(conn, mailbox, "invoice before:2022/01/01") == ["invoice"]


def test_one_index_batch_at_a_time(db_url: str, conn: psycopg.Connection[Any],
                                   mailbox: uuid.UUID) -> None:
    """Two batches never build one message from two snapshots: a batch finding another one
    running does nothing."""
    conn.execute("UPDATE flux_email_messages SET subject = 'Osprey' WHERE"
                 " provider_message_id = 'news'")
    with psycopg.connect(db_url) as other:
        other.execute("SELECT pg_advisory_xact_lock(nova_search_lock_key())")
        assert conn.execute("SELECT nova_search_index_pending(10) AS n").fetchone() == {"n": 0}
    assert index(conn) == 1
    assert found(conn, mailbox, "osprey") == ["news"]


def test_the_index_step_takes_the_oldest_queued_first(conn: psycopg.Connection[Any],
                                                      mailbox: uuid.UUID) -> None:
    add_message(conn, mailbox, "newer", subject="Puffin")
    add_message(conn, mailbox, "older", subject="Puffin")
    conn.execute("UPDATE flux_email_search_pending SET queued_at = queued_at - interval '1 minute'"
                 " WHERE message_id = (SELECT id FROM flux_email_messages"
                 " WHERE provider_message_id = 'older')")
    assert conn.execute("SELECT nova_search_index_pending(1) AS n").fetchone() == {"n": 1}
    assert found(conn, mailbox, "puffin") == ["older"]
    assert index(conn) == 1
    assert sorted(found(conn, mailbox, "puffin")) == ["newer", "older"]
