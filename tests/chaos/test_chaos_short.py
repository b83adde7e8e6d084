"""The chaos suite, short: a 300-thread Nylas backfill with webhooks and a 100-thread Gmail
backfill with Pub/Sub pushes, under kills, a PostgreSQL crash, provider faults (429s, Gmail
quota refusals, 5xx, hangs) and two Gmail history expiries (404: one while the backfill runs,
one after), end with the database equal to both mailboxes and no deadlock in the server log.

It runs `python -m tests.chaos.run_chaos` (the long suite's driver, see README "Chaos suite")
as a subprocess on a private embedded Postgres, which it must be able to crash, so it ignores
NOVA_TEST_DATABASE_URL. Every processor is its own OS process with the runtime's defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# 429s of every kind at a rate a short run actually meets (each holds the grant for a second).
FAULTS = ("nylas_rate_limit=0.004,provider_rate_limit=0.004,rate_limit=0.004,"
          "error_5xx=0.02,timeout=0.004")
GMAIL_FAULTS = "rate_limit=0.004,user_rate_limit=0.004,project_rate_limit=0.004," \
    "error_5xx=0.02,timeout=0.004"


@pytest.mark.timeout(300)
def test_backfill_and_webhooks_heal_from_kills_a_postgres_crash_and_provider_faults(
        tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "tests.chaos.run_chaos", "--threads", "300", "--workers", "2",
           "--seconds-between-kills", "1-2", "--min-chaos-seconds", "25", "--seed", "11",
           "--fault-rates", FAULTS, "--gmail-threads", "100", "--gmail-fault-rates",
           GMAIL_FAULTS, "--gmail-expiries", "2", "--run-dir", str(tmp_path / "run"),
           "--report-json", str(report_path), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    shown = f"{done.stdout}\n{done.stderr[-3000:]}"
    assert report_path.exists(), shown
    r = json.loads(report_path.read_text())

    # The data: every thread and message of the mailbox, once, current.
    assert r["threads"]["expected"] > 300 and r["messages"]["expected"] > 600, shown
    for kind in ("threads", "messages"):
        assert r[kind]["missing"] == 0, shown
        assert r[kind]["stale"] == 0, shown
    assert not any(r["duplicated"].values()), shown
    # Webhooks arrived during the backfill, and every delivered one was stored and applied.
    hooks = r["webhooks"]
    assert hooks["sent"] > 50 and hooks["delivered"] == hooks["sent"], shown
    assert hooks["lost"] == 0 and hooks["unfinished"] == 0 and hooks["error"] == 0, shown
    assert r["completion"]["status"] == "completed" and r["completion"]["premature"] == 0, shown
    # The chaos really happened, and nothing died on its own.
    chaos = r["chaos"]
    assert chaos["kills_total"] >= 10 and chaos["pg_restarts"] == 1, shown
    assert sum(chaos["sandbox_faults"].values()) > 0, shown
    assert chaos["unexpected_exits"] == [], shown

    # The Gmail inbox too: equal to the mailbox after quota refusals, 5xx and two history
    # 404s with mail (threads deleted whole among it) changed in the gaps.
    g = r["gmail"]
    assert g["threads"]["expected"] > 100 and g["messages"]["expected"] > 200, shown
    for kind in ("threads", "messages"):
        assert g[kind]["missing"] == 0 and g[kind]["stale"] == 0, shown
    assert g["threads_deleted_whole_left_live"] == 0, shown
    assert len(g["expiries"]) == 2 and len(g["history_gaps_seen_by_nova"]) >= 2, shown
    assert sum(e["gap_changes"].get("delete_thread", 0) for e in g["expiries"]) == 2, shown
    assert g["completion"]["status"] == "completed", shown
    assert sum(g["sandbox_faults"].values()) > 0 and g["pushes"]["lost"] == 0, shown
    assert str(g["cursor"]) == str(g["history_id"]), shown
    # Deadlocks are counted from the server's own log (one log: both inboxes' work).
    assert r["logs"]["postgres"]["available"] and r["logs"]["postgres"]["deadlocks"] == 0, shown

    # Every processor exits 0 on SIGTERM.
    assert {name: p["sigterm_status"] for name, p in r["processes"].items()
            if p["sigterm_status"] != 0} == {}, shown
    assert r["verdict"]["ok"], shown
