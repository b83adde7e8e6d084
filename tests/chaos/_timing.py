"""Where a chaos run's extra wall time goes, from the driver's own records.

The driver samples the threads synced (both backfills) every half second and notes each
disturbance it causes: a SIGKILL (with its victim), the PostgreSQL crash and its return, a
forced 429 (Nylas) or quota refusal (Gmail), a Gmail history expiry. `breakdown` compares the
chaos run with the baseline's steady rate:

- the reference rate is the baseline's threads per second over its backfill (both inboxes);
- each second of the chaos backfill that synced fewer threads than that lost the shortfall
  (1 - rate / reference, so a second that synced nothing lost a whole second);
- a lost second is blamed on the latest disturbance whose window covers it, in this order: the
  PostgreSQL restart (crash to back, plus `PG_AFTER` seconds of reconnecting), a killed
  thread/backfill worker (`KILL_WINDOW`: its job's lease is the visibility timeout, 10 s by
  default, plus its restart), a forced quota refusal (`QUOTA_WINDOW`), a history expiry
  (`EXPIRY_WINDOW`, the resync's listing); anything else is "other" (random 5xx, hangs and
  429s, the adaptive rate, the work the resyncs add, the other engineers' load on the host);
- the rest of the difference is the end: the drain after the backfills (mail, webhooks and
  pushes settling), and the work after the first completion (Gmail resyncs after a 404).

A heuristic: windows overlap, and a second lost to one cause may be blamed on another. The
figures say where to look, not to the second.
"""

from __future__ import annotations

from typing import Any

PG_AFTER = 10.0
KILL_WINDOW = 12.0
QUOTA_WINDOW = 5.0
EXPIRY_WINDOW = 10.0
WORKERS = ("threads", "backfill")


def downsample(samples: list[tuple[float, int, int]], step: float = 1.0,
               ) -> list[tuple[float, int, int]]:
    """One sample per `step` seconds (the last of each)."""
    out: list[tuple[float, int, int]] = []
    for t, a, b in samples:
        if out and t - out[-1][0] < step:
            out[-1] = (t, a, b)
        else:
            out.append((t, a, b))
    return out


def _total(progress: list[Any]) -> list[tuple[float, int]]:
    return [(float(t), int(a) + int(b)) for t, a, b in progress]


def _end_of_backfill(r: dict[str, Any]) -> float | None:
    t = r["timing"]
    ends = [t.get("backfill_completed_seconds"), t.get("gmail_backfill_completed_seconds")]
    if "gmail" not in r:
        ends = ends[:1]
    return None if any(e is None for e in ends) else max(float(e) for e in ends)


def reference_rate(baseline: dict[str, Any]) -> float | None:
    end = _end_of_backfill(baseline)
    prog = _total(baseline["timing"].get("progress") or [])
    if not end or not prog:
        return None
    upto = [n for t, n in prog if t <= end]
    return (max(upto) / end) if upto and end > 0 else None


def _windows(events: list[Any]) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    crash = None
    for t, kind, detail in events:
        if kind == "pg_crash":
            crash = float(t)
        elif kind == "pg_back" and crash is not None:
            out.append((crash, float(t) + PG_AFTER, "pg_restart"))
        elif kind == "kill" and str(detail).split("-")[0] in WORKERS:
            out.append((float(t), float(t) + KILL_WINDOW, "worker_kills"))
        elif kind == "kill":
            out.append((float(t), float(t) + 3.0, "other_kills"))
        elif kind in ("429", "gmail_quota"):
            out.append((float(t), float(t) + QUOTA_WINDOW, "forced_quota_refusals"))
        elif kind == "gmail_expiry":
            out.append((float(t), float(t) + EXPIRY_WINDOW, "history_404"))
    return out


ORDER = ("pg_restart", "worker_kills", "forced_quota_refusals", "history_404", "other_kills")


def breakdown(baseline: dict[str, Any], chaos: dict[str, Any]) -> dict[str, Any]:
    ref = reference_rate(baseline)
    b_end, c_end = _end_of_backfill(baseline), _end_of_backfill(chaos)
    bt, ct = baseline["timing"], chaos["timing"]
    out: dict[str, Any] = {
        "reference_threads_per_second": None if ref is None else round(ref, 1),
        "extra_wall_seconds": round(ct["wall_seconds"] - bt["wall_seconds"], 1),
        "backfill_seconds": {"baseline": b_end, "chaos": c_end},
        "after_backfill_seconds": {
            "baseline": None if b_end is None else round(bt["wall_seconds"] - b_end, 1),
            "chaos": None if c_end is None else round(ct["wall_seconds"] - c_end, 1)},
    }
    if ref is None or c_end is None:
        return out
    prog = _total(ct.get("progress") or [])
    windows = _windows(ct.get("events") or [])
    lost = dict.fromkeys((*ORDER, "other"), 0.0)
    for (t0, n0), (t1, n1) in zip(prog, prog[1:], strict=False):
        if t1 > c_end or t1 <= t0:
            continue
        span = t1 - t0
        # A resync after a 404 starts its count again: a drop is no progress, not lost time.
        short = min(span, max(0.0, span - max(0, n1 - n0) / ref))
        if not short:
            continue
        mid = (t0 + t1) / 2
        hit = [k for a, b, k in windows if a <= mid <= b]
        cause = next((k for k in ORDER if k in hit), "other")
        lost[cause] += short
    out["backfill_seconds_lost"] = {k: round(v, 1) for k, v in lost.items()}
    out["backfill_seconds_lost_total"] = round(sum(lost.values()), 1)
    return out


def render(b: dict[str, Any]) -> str:
    lines = [f"== where the extra {b['extra_wall_seconds']} s went (heuristic, tests/chaos/"
             f"_timing.py): backfills done at {b['backfill_seconds']['baseline']} s (baseline)"
             f" / {b['backfill_seconds']['chaos']} s (chaos); after them "
             f"{b['after_backfill_seconds']['baseline']} s / "
             f"{b['after_backfill_seconds']['chaos']} s of drain"]
    lost = b.get("backfill_seconds_lost")
    if lost:
        lines.append(f"   backfill seconds lost against the baseline's "
                     f"{b['reference_threads_per_second']} threads/s: "
                     + ", ".join(f"{k} {v}" for k, v in lost.items())
                     + f" (total {b['backfill_seconds_lost_total']})")
    return "\n".join(lines)
