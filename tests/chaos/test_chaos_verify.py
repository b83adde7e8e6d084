"""The chaos report's comparison flags each kind of difference it claims to (no database)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos._verify import compare_mailbox, scan_logs, webhook_figures


def _msg(mid: str, tid: str, date: int, **kw: Any) -> dict[str, Any]:
    return {"id": mid, "thread_id": tid, "subject": kw.get("subject", "Hi"), "date": date,
            "unread": kw.get("unread", False), "starred": False,
            "folders": kw.get("folders", ["INBOX"])}


def _row(m: dict[str, Any], **kw: Any) -> dict[str, Any]:
    row = {"provider_message_id": m["id"], "provider_thread_id": m["thread_id"],
           "thread_pid": m["thread_id"], "subject": m["subject"], "unread": m["unread"],
           "starred": m["starred"], "folders": list(m["folders"]),
           "sent_at": datetime.fromtimestamp(m["date"], UTC), "deleted_at": None}
    row.update(kw)
    return row


def _mailbox() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]],
                        list[dict[str, Any]]]:
    msgs = {"a1": _msg("a1", "a", 100), "a2": _msg("a2", "a", 200, unread=True),
            "b1": _msg("b1", "b", 150, subject="Caf\x00e")}
    threads = {"a": {"id": "a", "message_ids": ["a1", "a2"], "unread": True,
                     "folders": ["INBOX"]},
               "b": {"id": "b", "message_ids": ["b1"], "unread": False, "folders": ["INBOX"]}}
    rows = [_row(msgs["a1"]), _row(msgs["a2"]), _row(msgs["b1"], subject="Cafe")]
    trows = [{"provider_thread_id": "a", "deleted_at": None, "message_count": 2,
              "last_message_at": datetime.fromtimestamp(200, UTC), "unread": True,
              "folders": ["INBOX"]},
             {"provider_thread_id": "b", "deleted_at": None, "message_count": 1,
              "last_message_at": datetime.fromtimestamp(150, UTC), "unread": False,
              "folders": ["INBOX"]}]
    return threads, msgs, trows, rows


def test_an_exact_copy_has_nothing_missing_or_stale_and_strings_are_compared_cleaned() -> None:
    threads, msgs, trows, rows = _mailbox()
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert (out["threads"]["present"], out["threads"]["missing"], out["threads"]["stale"]) \
        == (2, 0, 0)
    assert (out["messages"]["present"], out["messages"]["missing"],
            out["messages"]["stale"]) == (3, 0, 0)


def test_a_missing_message_a_deleted_row_and_a_changed_flag_are_each_counted() -> None:
    threads, msgs, trows, rows = _mailbox()
    rows = [r for r in rows if r["provider_message_id"] != "a1"]  # a1: no row
    rows[0]["unread"] = False  # a2: stale flag
    rows[1]["deleted_at"] = datetime.now(UTC)  # b1: deleted here, live at the provider
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert out["messages"]["missing"] == 2 and out["messages"]["stale"] == 1
    whys = {e["id"]: e["why"] for e in out["messages"]["examples_missing"]}
    assert whys == {"a1": "no row", "b1": "deleted here"}
    # Thread a lost a1, thread b its only message: both differ from the provider.
    assert out["threads"]["stale"] == 2
    stale_a = next(e for e in out["threads"]["examples_stale"] if e["id"] == "a")
    assert stale_a["diff"]["messages"] == {"missing_here": ["a1"], "extra_here": []}


def test_rows_for_mail_the_provider_no_longer_has_are_stale() -> None:
    threads, msgs, trows, rows = _mailbox()
    del msgs["b1"], threads["b"]  # deleted at the provider, still live here
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert out["messages"]["stale"] == 1 and out["threads"]["stale"] == 1
    assert out["threads"]["expected"] == 1 and out["threads"]["missing"] == 0


def test_a_thread_with_a_wrong_summary_is_stale() -> None:
    threads, msgs, trows, rows = _mailbox()
    trows[0]["last_message_at"] = datetime.fromtimestamp(100, UTC)
    trows[1]["folders"] = ["INBOX", "Archive"]
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert out["threads"]["stale"] == 2 and out["threads"]["missing"] == 0


def test_webhooks_delivered_but_not_stored_are_lost_and_retries_are_not_undelivered() -> None:
    log = [{"id": "w1", "type": "message.created", "attempt": 1, "status": 200,
            "outcome": "delivered"},
           {"id": "w2", "type": "message.created", "attempt": 1, "error": "refused",
            "outcome": "retrying"},
           {"id": "w2", "type": "message.created", "attempt": 2, "status": 200,
            "outcome": "delivered"},
           {"id": "w3", "type": "message.updated", "attempt": 1, "status": 500,
            "outcome": "dropped"}]
    rows = [{"webhook_id": "w1", "status": "processed", "error_message": None}]
    out = webhook_figures(log, rows)  # type: ignore[arg-type]
    assert (out["sent"], out["delivered"], out["retried"], out["undelivered"]) == (3, 2, 1, 1)
    assert out["lost"] == 1 and out["lost_ids"] == ["w2"]
    assert out["received"] == 1 and out["applied"] == 1


def test_only_a_monitor_repair_counts_as_a_premature_completion(tmp_path: Path) -> None:
    log = tmp_path / "completion.log"
    log.write_text(
        "2026-11-21 13:25:11,967 WARNING [Recovery] premature completions failed "
        "(FileNotFoundError: [Errno 2] No such file or directory); the other steps go on\n"
        "2026-11-21 13:25:40,001 WARNING [Recovery] premature completion repaired config=c1 "
        "open_threads=3 completed_at=2026-11-21T13:25:39+00:00 -> thread_sync\n")
    out = scan_logs({"completion": log})
    assert len(out["premature_lines"]) == 1 and "repaired" in out["premature_lines"][0]


def test_a_thread_whose_remaining_mail_is_older_than_the_range_is_not_expected() -> None:
    threads, msgs, trows, rows = _mailbox()
    # Thread b's only message is older than the backfill's start and it was never stored.
    trows = [t for t in trows if t["provider_thread_id"] != "b"]
    rows = [r for r in rows if r["provider_message_id"] != "b1"]
    out = compare_mailbox(threads, msgs, trows, rows, since=160)  # type: ignore[arg-type]
    assert out["threads"]["out_of_range"] == 1
    assert (out["threads"]["expected"], out["threads"]["missing"]) == (1, 0)
    assert (out["messages"]["expected"], out["messages"]["missing"]) == (2, 0)
    # Without the range it would be missing: the check is not blind.
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert out["threads"]["missing"] == 1 and out["messages"]["missing"] == 1


def test_gmail_shaped_messages_are_compared_without_a_subject_but_labels_still_count() -> None:
    threads, msgs, trows, rows = _mailbox()
    for m in msgs.values():
        del m["subject"]  # Gmail: subjects are not compared
    rows[2]["subject"] = "anything"
    assert compare_mailbox(threads, msgs, trows, rows)["messages"]["stale"] == 0  # type: ignore[arg-type]
    rows[0]["folders"] = ["INBOX", "STARRED"]
    out = compare_mailbox(threads, msgs, trows, rows)  # type: ignore[arg-type]
    assert out["messages"]["stale"] == 1
    assert out["messages"]["examples_stale"][0]["diff"]["folders"]["stored"] == ["INBOX",
                                                                                 "STARRED"]


def test_the_time_breakdown_blames_a_stall_on_the_disturbance_that_covers_it() -> None:
    from tests.chaos._timing import breakdown

    def run(progress: list[tuple[float, int, int]], wall: float, end: float,
            events: list[tuple[float, str, str]]) -> dict[str, Any]:
        return {"timing": {"wall_seconds": wall, "backfill_completed_seconds": end,
                           "progress": progress, "events": events}}

    # Baseline: 10 threads a second for 10 s. Chaos: the same rate, but nothing for 3 s after
    # the PostgreSQL crash at 2 s (back at 3 s: its window runs to 3 + PG_AFTER = 13 s) and
    # nothing between 13 and 14 s, which no disturbance covers.
    base = run([(float(t), 10 * t, 0) for t in range(11)], 12.0, 10.0, [])
    counts = [0, 10, 20, 20, 20, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 110]
    chaos = run([(float(t), n, 0) for t, n in enumerate(counts)], 17.0, 15.0,
                [(2.0, "pg_crash", ""), (3.0, "pg_back", ""), (20.0, "kill", "threads-1")])
    out = breakdown(base, chaos)
    assert out["reference_threads_per_second"] == 10.0
    assert out["extra_wall_seconds"] == 5.0
    lost = out["backfill_seconds_lost"]
    assert (lost["pg_restart"], lost["other"], lost["worker_kills"]) == (3.0, 1.0, 0.0)
    assert out["backfill_seconds_lost_total"] == 4.0
