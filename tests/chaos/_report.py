"""The chaos report as a table for people (the JSON form is the report dict itself)."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_n(v)}" for k, v in sorted(d.items())) or "none"


def render(r: dict[str, Any]) -> str:
    run, t, w, c = r["run"], r["timing"], r["webhooks"], r["chaos"]
    out: list[str] = []
    add = out.append
    kinds = [k for k, on in (("kills", run.get("kills", run["faults"])),
                             ("PG restart", run.get("pg_crash", run["faults"])),
                             ("sandbox faults", run.get("sandbox_faults", run["faults"])))
             if on]
    title = f"chaos run ({', '.join(kinds) or 'nothing switched on'})" if run["faults"] else \
        "baseline run (no kills, no faults, no PG restart)"
    add(f"== Nova chaos report: {title}")
    add(f"  mailbox     {run['threads']:,} threads, seed {run['seed']}, hostile share "
        f"{run['hostile']:.0%}; mail during the backfill {run['mail_rate']:g}/s")
    add(f"  processes   receiver, webhooks, backfill, completion, {run['workers']} x threads "
        f"(each its own OS process; NOVA_PROVIDER_RATE_LIMIT={run['provider_rate_limit']:g}, "
        f"every other setting at its default)")
    add(f"  database    {run['database']} (PostgreSQL {run['server_version']})")
    add(f"  nova        {run['nova']}")
    add(f"  run dir     {run['run_dir']}")
    add("")
    add(f"  {'':<10}{'expected':>10}{'present':>10}{'missing':>10}{'duplicated':>12}"
        f"{'stale':>8}")
    for kind in ("threads", "messages"):
        s = r[kind]
        add(f"  {kind:<10}{_n(s['expected']):>10}{_n(s['present']):>10}{_n(s['missing']):>10}"
            f"{_n(r['duplicated'][kind]):>12}{_n(s['stale']):>8}")
    if r["threads"].get("out_of_range"):
        add(f"  ({r['threads']['out_of_range']} thread(s) of the mailbox fell out of the "
            f"backfill's range when their newer mail was deleted: not expected)")
    other = {k: v for k, v in r["duplicated"].items() if k not in ("threads", "messages")}
    add(f"  other duplicated rows: {_counts(other)}")
    q = r["queue_work"]
    add(f"  queue work: {_n(q['provider_requests'])} provider requests "
        f"({q['requests_per_thread']} per expected thread: {_counts(q['requests_by_endpoint'])}"
        f"); {_n(q['sync_attempts'])} sync attempts; queued threads "
        f"{_counts(q['queued_threads'])} (work twice is allowed, rows twice are not)")
    add("")
    add(f"  webhooks    sent {_n(w['sent'])} (attempts {_n(w['attempts'])}, retried "
        f"{_n(w['retried'])}), delivered {_n(w['delivered'])}, undelivered "
        f"{_n(w['undelivered'])} (the sandbox gave up after its last attempt, as Nylas does)")
    add(f"              received {_n(w['received'])}, applied {_n(w['applied'])}, skipped "
        f"{_n(w['skipped'])}, waiting {_n(w['waiting'])}, error {_n(w['error'])}, unfinished "
        f"{_n(w['unfinished'])}, LOST {_n(w['lost'])}")
    add(f"              answers: {_counts(w['answers'])}")
    comp = r["completion"]
    first = t["backfill_completed_seconds"]
    add(f"  completion  status {comp['status']}; completed {comp['completed_transitions']} "
        f"time(s){f', first after {first} s' if first is not None else ''}; premature "
        f"completions {comp['premature']} (seen by the driver {comp['premature_observed']}, "
        f"monitor repairs {comp['monitor_premature_lines']}, threads synced after completion "
        f"{comp['threads_synced_after_completion']})")
    dl = r["dead_letters"]
    add(f"  dead letters {dl['total']}: {_counts(dl['by_queue'])}")
    for reason, n in sorted(dl["reasons"].items(), key=lambda kv: -kv[1])[:8]:
        add(f"              {n} x {reason}")
    add("")
    add(f"  kills       {c['kills_total']} SIGKILL ({_counts(c['kills'])}), "
        f"{c['restarts_total']} restarts, unexpected exits {len(c['unexpected_exits'])}")
    pg = c["pg_restart"]
    add(f"  PostgreSQL  restarts {c['pg_restarts']}"
        + (f" (crash at {pg['at_seconds']} s, {pg['at_synced']} threads synced, back after "
           f"{pg['seconds']} s)" if pg else f" ({c['pg_restart_note']})"))
    add(f"  sandbox     faults injected: {_counts(c['sandbox_faults'])}; 429 answers "
        f"{_n(c['sandbox_statuses'].get('429', 0))}; requests {_n(c['sandbox_requests'])}")
    lr = c.get("learned_rate") or {}
    if lr.get("samples"):
        add("  budget      learned rate (provider_rate_limits.rate) every ~10 s: "
            + ", ".join(f"{r:g}" for _, r in lr["samples"][:14])
            + (" ..." if len(lr["samples"]) > 14 else "") + f" req/s; min {lr['min']:g}")
    m = c["mail"]
    add(f"  mail        {m['new_threads']} new threads, {m['replies']} replies, "
        f"{m['random_replies']} replies to threads past page one, {m['updates']} updates, "
        f"{m['deletes']} deletes -> {m['notifications']} notifications")
    add("  shutdown    " + ", ".join(
        f"{name} {p['sigterm_status']} ({p['stop_seconds']} s)"
        for name, p in r["processes"].items()))
    logs = r["logs"]
    add(f"  logs        tracebacks {sum(v['count'] for v in logs['tracebacks'].values())}, "
        f"ERROR lines {sum(v['count'] for v in logs['error_lines'].values())}, lease lost "
        f"{logs['lease_lost']}, recovery lines {logs['recovery_lines']}")
    logged_by: Counter[str] = Counter()
    for v in logs["tracebacks"].values():
        logged_by.update(v.get("logged_by", {}))
    for line, n in logged_by.most_common(4):
        add(f"              {n} traceback(s) after: {line}")
    pglog = logs.get("postgres", {})
    if pglog.get("available"):
        add(f"  PG log      deadlocks {pglog['deadlocks']}; errors: "
            + (_counts(pglog["errors"]) if pglog["errors"] else "none"))
        for block in pglog["deadlock_reports"][:2]:
            add("              " + block.replace("\n", "\n              "))
    feed = r.get("change_feed")
    if feed and feed.get("available"):
        add(f"  feed        {_n(feed['events'])} events replayed into a copy over "
            f"{feed['steps']} steps: {feed['problems']} problem(s), {feed['differences']} "
            f"difference(s) with the tables at the end")
    if "gmail" in r:
        out.extend(render_gmail(r["gmail"], run))
    add("")
    add(f"  wall time   {t['wall_seconds']} s from the backfill's queueing to everything "
        f"drained (chaos window {t['chaos_seconds']} s, drain {t['drain_seconds']} s; "
        f"set-up {t['setup_seconds']} s, verification {t['verify_seconds']} s not counted)")
    v = r["verdict"]
    add(f"  VERDICT     {'OK' if v['ok'] else 'FAILED'}"
        + ("" if v["ok"] else ": " + "; ".join(v["problems"])))
    if v.get("warnings"):
        add(f"  WARNINGS    {'; '.join(v['warnings'])}")
    return "\n".join(out)


def render_gmail(g: dict[str, Any], run: dict[str, Any]) -> list[str]:
    out = ["", f"  -- Gmail inbox {g['email']}"]
    add = out.append
    add(f"  {'':<10}{'expected':>10}{'present':>10}{'missing':>10}{'stale':>8}")
    for kind in ("threads", "messages"):
        s = g[kind]
        add(f"  {kind:<10}{_n(s['expected']):>10}{_n(s['present']):>10}{_n(s['missing']):>10}"
            f"{_n(s['stale']):>8}")
    add(f"  threads deleted whole at the provider {g['threads_deleted_whole']} (in a history "
        f"gap as Nova saw it: {g['threads_deleted_whole_in_a_gap']}); still live here "
        f"{g['threads_deleted_whole_left_live']}, of them deleted in a gap "
        f"{g['threads_deleted_whole_in_a_gap_left_live']}")
    comp = g["completion"]
    add(f"  completion  status {comp['status']}; completed {comp['completed_transitions']} "
        f"time(s) (resyncs after a 404 complete it again); cursor {g['cursor']}, sandbox "
        f"history {g['history_id']}")
    q = g["queue_work"]
    add(f"  queue work  {_n(q['provider_requests'])} Gmail requests ("
        f"{q['requests_per_thread']} per thread); {_n(q['sync_attempts'])} sync attempts; "
        f"units {_counts(g['units'])}")
    p = g["pushes"]
    add(f"  pushes      attempts {p['attempts']} ({_counts(p['outcomes'])}), received "
        f"{p['received']} ({_counts(p['statuses'])}), LOST {p['lost']}")
    for e in g["expiries"]:
        add(f"  history 404 at {e['at_seconds']} s ({e['when']}; floor {e['floor']}, Nova's "
            f"cursor {e['nova_cursor']}): gap changes {_counts(e['gap_changes'])}")
    add(f"  gaps Nova saw (cursor -> jumped to): {g['history_gaps_seen_by_nova'] or 'none'}")
    if not g["expiries"]:
        add("  history 404 none" + (" (baseline)" if not run["faults"] else ""))
    add(f"  sandbox     faults injected: {_counts(g['sandbox_faults'])}; statuses "
        f"{_counts(g['sandbox_statuses'])}; quota refusals "
        f"{_counts({u: sum(c.values()) for u, c in g['sandbox_refusals'].items()})}")
    m = g["mail"]
    add(f"  mail        {_counts({k: v for k, v in m.items() if isinstance(v, int)})}; errors "
        f"{_counts(m['errors'])}")
    return out


def _deadlocks(r: dict[str, Any]) -> str:
    pg = r["logs"].get("postgres", {})
    return str(pg["deadlocks"]) if pg.get("available") else "not counted"


def render_comparison(baseline: dict[str, Any], chaos: dict[str, Any]) -> str:
    b, c = baseline["timing"]["wall_seconds"], chaos["timing"]["wall_seconds"]
    ratio = c / b if b else float("nan")
    gmail = chaos.get("gmail")
    gmail_faults = sum(gmail["sandbox_faults"].values()) if gmail else 0
    threads = f"{chaos['run']['threads']:,} Nylas" + (
        f" + {gmail['threads']['expected']:,} Gmail" if gmail else "")
    return (f"== wall time, {threads} threads: baseline {b} s, chaos {c} s, "
            f"ratio {ratio:.2f}x (goal <= 1.5x); kills {chaos['chaos']['kills_total']}, "
            f"PG restarts {chaos['chaos']['pg_restarts']}, sandbox faults "
            f"{sum(chaos['chaos']['sandbox_faults'].values()) + gmail_faults}"
            + (f", Gmail history 404s {len(gmail['expiries'])}" if gmail else "")
            + f"; deadlocks in the PostgreSQL log: baseline {_deadlocks(baseline)}, chaos "
            f"{_deadlocks(chaos)}")
