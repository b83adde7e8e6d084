"""What the completion monitor logs about running backfills: what changed, not every backfill
on every check.

With a few backfills running (at most DETAIL_LIMIT) each one's seed line,
`[Monitor] Config 12345678... | Status: thread_sync | Progress: 75% (150/200)`, is logged
when its figures moved since the last check. With more, a backfill's line is logged when it
starts or changes phase (at most DETAIL_LIMIT such lines a check, then one that counts the
rest: the first check after a restart beside 1,000 running backfills), and one summary line
per check says how many run and what they did since the last one: 1,000 running backfills make
one line per check, not 1,000.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nova.completion")

DETAIL_LIMIT = 20


def progress_line(p: Mapping[str, Any]) -> str:
    """The seed's monitor line; never a percentage of a total that is not known yet."""
    status = p["backfill_status"]
    done = int(p["threads_completed"]) + int(p["threads_failed"])
    failed = f", {p['threads_failed']:,} failed" if p["threads_failed"] else ""
    if status == "queued":
        progress = "waiting for discovery"
    elif not p["discovery_complete"]:
        progress = (f"discovering ({p['threads_discovered']:,} threads found, "
                    f"{done:,} synced{failed})")
    else:
        pct = p["percent_complete"]
        shown = 100 if pct is None else int(pct)  # floor: 99.6% is not "100%"
        progress = f"{shown}% ({done:,}/{int(p['threads_queued']):,}{failed})"
    config = str(p["config_id"])[:8]
    return f"[Monitor] Config {config}... | Status: {status} | Progress: {progress}"


def _figures(p: Mapping[str, Any]) -> tuple[Any, ...]:
    return (p["backfill_status"], p["discovery_complete"], p["threads_discovered"],
            p["threads_queued"], p["threads_completed"], p["threads_failed"])


@dataclass
class ProgressLog:
    """The last figures seen of each running backfill, and the lines worth logging now."""

    detail_limit: int = DETAIL_LIMIT
    seen: dict[Any, tuple[Any, ...]] = field(default_factory=dict)

    def lines(self, rows: Iterable[Mapping[str, Any]]) -> list[str]:
        rows = list(rows)
        detailed = len(rows) <= self.detail_limit
        out: list[str] = []
        done_delta = messages_delta = 0
        by_status: dict[str, int] = {}
        phases = 0  # backfills new to this log or in another phase
        was = self.seen
        self.seen = {}
        for p in rows:
            figures = _figures(p)
            self.seen[p["config_id"]] = figures + (int(p["messages_synced"]),)
            by_status[p["backfill_status"]] = by_status.get(p["backfill_status"], 0) + 1
            before = was.get(p["config_id"])
            if before is None or before[:2] != figures[:2]:  # new, or another phase
                phases += 1
                if phases <= self.detail_limit:
                    out.append(progress_line(p))
            elif before[:-1] != figures:
                if detailed:
                    out.append(progress_line(p))
                done_delta += (int(p["threads_completed"]) + int(p["threads_failed"])
                               - int(before[4]) - int(before[5]))
                messages_delta += int(p["messages_synced"]) - int(before[-1])
        if phases > self.detail_limit:  # a restart beside 1,000 running: not 1,000 lines
            out.append(f"[Monitor] ... and {phases - self.detail_limit:,} more backfills "
                       f"started or changed phase")
        if not detailed and (done_delta or messages_delta or out or len(rows) != len(was)):
            statuses = " ".join(f"{s}={n:,}" for s, n in sorted(by_status.items()))
            out.append(f"[Monitor] {len(rows):,} backfills running ({statuses}): "
                       f"threads done +{done_delta:,}, messages +{messages_delta:,} since the "
                       f"last check")
        return out

    def log(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for line in self.lines(rows):
            log.info(line)
