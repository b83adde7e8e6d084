"""Outbound webhooks (nova.hooks): the change feed delivered to local endpoints
(tests/hook_receiver.py) that verify every signature with the Standard Webhooks reference
library, through failures, an outage, 410, Retry-After, dead letters and replays, rotation and
kind filters; and `nova hooks` / `nova failures` / `nova replay hooks` as an operator runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import random
import shutil
import subprocess
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from hook_receiver import Receiver, ReceiverServer
from standardwebhooks import Webhook

from nova import cli
from nova import hooks_delivery as delivery
from nova.config import Settings, load_settings
from nova.hooks import HookDeliverer

ROOT = Path(__file__).resolve().parent.parent
RECORD = "SELECT nova_record_event($1, $2, $3, NULL, NULL, $4::jsonb)"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"hooks_retry_schedule": "50ms,100ms,200ms,400ms,800ms,1s,2s,4s,8s",
                            "hooks_poll_ms": 50, "hooks_timeout_seconds": 2.0,
                            "hooks_concurrency": 8, "hooks_endpoint_concurrency": 4,
                            "shutdown_grace_seconds": 2.0}
    return load_settings(**{**base, **overrides})


def add_endpoint(db_url: str, url: str, kinds: list[str] | None = None) -> tuple[uuid.UUID, str]:
    secret = delivery.new_secret()
    with psycopg.connect(db_url, autocommit=True) as c:
        row = c.execute("SELECT nova_hook_add(%s, %s, %s)", (url, kinds or [], secret)).fetchone()
    assert row is not None
    return row[0], secret


async def record(pool: Any, inbox: uuid.UUID, kind: str = "message.created",
                 changes: dict[str, Any] | None = None) -> None:
    """One event, in a transaction of its own (its position is assigned at commit)."""
    async with pool.acquire() as c, c.transaction():
        await c.execute(RECORD, inbox, kind, str(uuid.uuid4()), json.dumps(changes or {}))


@contextlib.asynccontextmanager
async def deliverer(s: Settings, db_url: str) -> AsyncIterator[HookDeliverer]:
    d = HookDeliverer(s, database_url=db_url)
    task = asyncio.create_task(d.run())
    try:
        yield d
    finally:
        d.stop()
        await asyncio.wait_for(task, 30)


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def fetch(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
        return c.execute(query, args).fetchall()


def nova(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--database-url", db_url, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- signing -----------------------------------------------------------------------------

def test_signatures_are_the_reference_algorithms_and_rotation_sends_one_per_secret() -> None:
    old, new = delivery.new_secret(), delivery.new_secret()
    assert old.startswith("whsec_") and len(delivery._key(old)) == delivery.SECRET_BYTES
    body = b'{"type":"message.created","data":{"id":7}}'
    ts = int(time.time())
    reference = Webhook(new).sign("7", dt.datetime.fromtimestamp(ts, dt.UTC), body)
    assert delivery.signature(new, "7", ts, body) == reference
    sent = delivery.headers([new, old], "7", body, ts)
    assert sent["webhook-signature"].split(" ") == [reference,
                                                    delivery.signature(old, "7", ts, body)]
    for secret in (new, old):  # a receiver holding either secret accepts it
        assert Webhook(secret).verify(body, sent) == json.loads(body)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(delivery.new_secret()).verify(body, sent)


def _readme_verify() -> Callable[..., bool]:
    """The verifying function the README's "Outbound webhooks" section shows an app."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Outbound webhooks", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["verify"]  # type: ignore[no-any-return]


def test_the_readmes_few_lines_verify_a_delivery_and_refuse_a_forgery() -> None:
    verify = _readme_verify()
    secret, other = delivery.new_secret(), delivery.new_secret()
    body = b'{"type":"thread.updated","data":{"id":12}}'
    sent = delivery.headers([secret], "12", body)
    assert verify(secret, sent, body)
    assert not verify(other, sent, body)
    assert not verify(secret, sent, body.replace(b"12", b"13"))
    assert verify(other, delivery.headers([secret, other], "12", body), body)  # rotation
    stale = delivery.headers([secret], "12", body, int(time.time()) - 600)
    assert not verify(secret, stale, body)


def test_kinds_schedule_and_retry_after_parse_as_documented() -> None:
    assert delivery.parse_kinds("message.created, thread.*") == ["message.created", "thread.*"]
    assert delivery.parse_kinds(None) == [] and delivery.parse_kinds("*") == []
    with pytest.raises(ValueError, match="unknown event kind 'message.sent'"):
        delivery.parse_kinds("message.sent")
    assert delivery.wanted(["thread.*"], "thread.updated")
    assert not delivery.wanted(["thread.*"], "message.updated")
    assert delivery.wanted([], "backfill.failed")
    assert delivery.parse_schedule("250ms,5s,2m,1h,1d") == [0.25, 5, 120, 3600, 86400]
    # the default schedule is Standard Webhooks' example: about three days in all
    assert 3 * 86400 < sum(load_settings().hooks_schedule) < 3.5 * 86400
    assert delivery.retry_after("120") == 120
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=90)
    date = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 85 <= (delivery.retry_after(date) or 0) <= 91
    assert delivery.retry_after("99999999") == delivery.RETRY_AFTER_MAX
    assert delivery.retry_after("soon") is None


# --- the Must-show: failures and an outage -----------------------------------------------

async def test_every_event_arrives_verified_and_in_order_through_30pct_failures_and_an_outage(
        db_url: str, pool: Any) -> None:
    """The endpoint fails 30% of deliveries and is down (port closed) for 3 s while events
    keep coming: every event is delivered, every signature verifies with the reference
    library, and per inbox no event is ever sent before the one before it was delivered.
    (benchmarks/bench_hooks.py runs the same with a full minute of outage.)"""
    receiver = Receiver(fail_rate=0.3, seed=20)
    inboxes = [uuid.uuid4() for _ in range(4)]
    per_inbox = 40
    with ReceiverServer(receiver) as server:
        endpoint, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        rng = random.Random(3)
        # The outage uses up to 7 attempts of an event; 9 more at 30% failures make a dead
        # letter a 2-in-100,000 chance (0.3 ** 9).
        schedule = "50ms,100ms,200ms,400ms,800ms," + ",".join(["1s"] * 11)
        async with deliverer(settings(hooks_retry_schedule=schedule), db_url) as d:
            async def produce() -> None:
                for _ in range(per_inbox):
                    for inbox in inboxes:
                        await record(pool, inbox, rng.choice(
                            ["message.created", "message.updated", "thread.updated"]),
                            {"unread": rng.random() < 0.5})
                    await asyncio.sleep(0.1)

            producing = asyncio.create_task(produce())
            await asyncio.sleep(1.0)
            server.down()
            down_from = len(receiver.deliveries)
            await asyncio.sleep(3.0)
            assert len(receiver.deliveries) == down_from  # nothing got through meanwhile
            server.up()
            await producing
            expected = {str(i): list(range(1, per_inbox + 1)) for i in inboxes}
            await until(lambda: {k: sorted(set(v)) for k, v in
                                 receiver.accepted_positions().items()} == expected,
                        "every event delivered", timeout=90)
            stats = d.stats
    assert receiver.unverified == []
    for inbox, attempted in receiver.attempted_positions().items():
        assert attempted == sorted(attempted), f"order broken in inbox {inbox}"
    answered_failures = sum(1 for r in receiver.deliveries if r.status >= 300)
    assert answered_failures > 0.15 * len(receiver.deliveries)
    assert stats.failed > answered_failures  # the outage's refused connections too
    assert stats.dead_lettered == 0 and stats.delivered >= 4 * per_inbox
    for r in receiver.accepted():
        assert r.msg_id == str(r.body["data"]["id"]) and r.body["type"] == r.body["data"]["kind"]
    assert fetch(db_url, "SELECT count(*) AS n FROM nova_hook_dead_letters")[0]["n"] == 0
    cursors = fetch(db_url, "SELECT position FROM nova_event_cursors WHERE consumer = %s",
                    f"hook:{endpoint}")
    assert [c["position"] for c in cursors] == [per_inbox] * 4


# --- answers that stop an endpoint -------------------------------------------------------

async def test_410_disables_the_endpoint_saying_so_and_enable_resumes_where_it_stood(
        db_url: str, pool: Any, capsys: pytest.CaptureFixture[str]) -> None:
    receiver = Receiver(script=deque([(410, {})]))
    inbox = uuid.uuid4()
    with ReceiverServer(receiver) as server:
        endpoint, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        async with deliverer(settings(), db_url):
            for _ in range(3):
                await record(pool, inbox)
            await until(lambda: fetch(db_url, "SELECT enabled FROM nova_hook_endpoints")[0][
                "enabled"] is False, "the endpoint disabled")
            await asyncio.sleep(0.5)
            assert [r.position for r in receiver.deliveries] == [1]  # nothing more was sent
            [row] = fetch(db_url, "SELECT disabled_reason FROM nova_hook_endpoints")
            assert "410 Gone" in row["disabled_reason"]
            code, out, _ = nova(capsys, db_url, "hooks", "list")
            assert code == 0 and "DISABLED" in out and "410 Gone" in out

            code, out, _ = nova(capsys, db_url, "hooks", "enable", str(endpoint))
            assert code == 0 and "410 Gone" in out
            await until(lambda: receiver.accepted_positions().get(str(inbox)) == [1, 2, 3],
                        "the three events after enable")
    assert [r.position for r in receiver.deliveries] == [1, 1, 2, 3]


async def test_retry_after_is_honoured_and_pauses_the_endpoints_other_inboxes(
        db_url: str, pool: Any) -> None:
    receiver = Receiver(script=deque([(429, {"Retry-After": "2"})]))
    first, second = uuid.uuid4(), uuid.uuid4()
    with ReceiverServer(receiver) as server:
        _, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        async with deliverer(settings(), db_url):
            await record(pool, first)
            await until(lambda: receiver.deliveries, "the first attempt")
            await record(pool, second)
            await until(lambda: len(receiver.accepted()) == 2, "both delivered")
    throttled = receiver.deliveries[0]
    assert throttled.status == 429
    later = receiver.deliveries[1:]
    # the schedule says 50 ms; the endpoint said 2 s, for this inbox and for the other one
    assert all(r.at - throttled.at >= 1.8 for r in later)
    assert sorted(r.inbox for r in later) == sorted([str(first), str(second)])


async def test_an_endpoint_failing_past_the_setting_is_disabled_and_says_since_when(
        db_url: str, pool: Any) -> None:
    receiver = Receiver(fail_rate=1.0)
    with ReceiverServer(receiver) as server:
        _, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        s = settings(hooks_retry_schedule=",".join(["100ms"] * 50),
                     hooks_disable_after_days=1.5 / 86400)
        async with deliverer(s, db_url) as d:
            await record(pool, uuid.uuid4())
            await until(lambda: d.stats.disabled == 1, "disabled after 1.5 s of failures")
            attempts = len(receiver.deliveries)
            await asyncio.sleep(0.5)
            assert len(receiver.deliveries) == attempts  # disabled: nothing more is sent
    [row] = fetch(db_url, "SELECT enabled, disabled_reason FROM nova_hook_endpoints")
    assert row["enabled"] is False and row["disabled_reason"].startswith("failing since ")
    assert "HTTP 5" in row["disabled_reason"] and attempts >= 2


async def test_inboxes_that_could_not_reach_the_endpoint_are_due_once_it_answers_again(
        db_url: str, pool: Any) -> None:
    """A refused connection backs off like any failure, but once the endpoint answers another
    inbox's delivery, the inboxes whose attempts never reached it go at once; an inbox whose
    attempts got an error answer (500) keeps its schedule."""
    receiver = Receiver(script=deque([(500, {}), (500, {})]))
    answered, a, b, c = (uuid.uuid4() for _ in range(4))
    with ReceiverServer(receiver) as server:
        _, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        async with deliverer(settings(hooks_retry_schedule="50ms,20s,20s"), db_url) as d:
            await record(pool, answered)
            await until(lambda: len(receiver.deliveries) == 2, "two 500 answers")
            server.down()
            await record(pool, a)
            await record(pool, b)
            await until(lambda: d.stats.failed == 6, "two refused attempts each")
            server.up()
            await record(pool, c)
            started = time.monotonic()
            await until(lambda: {r.inbox for r in receiver.accepted()} == {str(a), str(b),
                                                                           str(c)},
                        "the refused inboxes delivered", timeout=10)
            assert time.monotonic() - started < 5  # not their 20 s backoff
            assert str(answered) not in {r.inbox for r in receiver.accepted()}
    [row] = fetch(db_url, "SELECT attempts, unreachable, next_attempt_at > now() AS waits "
                          "FROM nova_hook_streams WHERE inbox_id = %s", answered)
    assert row == {"attempts": 2, "unreachable": False, "waits": True}


# --- dead letters and replay -------------------------------------------------------------

async def test_an_event_dead_lettered_after_its_schedule_lets_the_next_go_then_replays(
        db_url: str, pool: Any, capsys: pytest.CaptureFixture[str]) -> None:
    receiver = Receiver(fail_if=lambda body: body["data"]["position"] == 2)
    inbox = uuid.uuid4()
    with ReceiverServer(receiver) as server:
        endpoint, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        async with deliverer(settings(hooks_retry_schedule="30ms,60ms"), db_url) as d:
            for _ in range(5):
                await record(pool, inbox)
            [second] = fetch(db_url, "SELECT id FROM nova_events WHERE position = 2")
            await until(lambda: 5 in receiver.accepted_positions().get(str(inbox), []),
                        "the events after the dead letter")
            code, out, _ = nova(capsys, db_url, "failures", "--queue", "hooks", "--json")
            [failure] = json.loads(out)
            assert failure["queue_name"] == "hooks" and failure["read_ct"] == 3
            assert failure["message"]["event_id"] == second["id"]
            assert failure["message"]["status"] == "dead"
            assert failure["message"]["last_error"].startswith("HTTP 500")
            code, text, _ = nova(capsys, db_url, "failures")
            assert code == 0 and text.startswith("hooks ")
            assert f"msg={failure['msg_id']} " in text

            receiver.fail_if = None
            code, out, _ = nova(capsys, db_url, "replay", "hooks", str(failure["msg_id"]))
            assert code == 0 and f"hooks {failure['msg_id']} -> replaying" in out
            await until(lambda: d.stats.replayed == 1, "the replay delivered")
    second_attempts = [r for r in receiver.deliveries if r.msg_id == str(second["id"])]
    assert [r.status for r in second_attempts][-1] == 204
    accepted = receiver.accepted_positions()[str(inbox)]
    # 1, 3, 4, 5 in order (the dead letter did not hold them), then 2 again on replay
    assert accepted[-1] == 2 and [p for p in accepted if p != 2] == [1, 3, 4, 5]
    assert fetch(db_url, "SELECT count(*) AS n FROM nova_hook_dead_letters")[0]["n"] == 0
    code, out, _ = nova(capsys, db_url, "failures", "--queue", "hooks")
    assert "0 dead letter(s)" in out
    assert receiver.unverified == [] and endpoint


# --- rotation and filters ----------------------------------------------------------------

async def test_rotation_signs_with_both_secrets_until_the_window_ends(
        db_url: str, pool: Any, capsys: pytest.CaptureFixture[str]) -> None:
    receiver = Receiver()
    inbox = uuid.uuid4()
    with ReceiverServer(receiver) as server:
        endpoint, old = add_endpoint(db_url, server.url)
        code, out, err = nova(capsys, db_url, "hooks", "rotate", str(endpoint))
        assert code == 0 and "previous one too" in err
        new = out.split("secret: ")[1].strip()
        assert new.startswith("whsec_") and new != old
        receiver.secrets[:] = [old, new]
        async with deliverer(settings(), db_url):
            await record(pool, inbox)
            await until(lambda: len(receiver.accepted()) == 1, "a delivery during rotation")
            fetch(db_url, "UPDATE nova_hook_endpoints SET previous_secret_until = now() "
                          "RETURNING id")
            await record(pool, inbox)
            await until(lambda: len(receiver.accepted()) == 2, "a delivery after the window")
    during, after = receiver.accepted()
    assert len(during.signatures) == 2 and during.verified_by == [0, 1]
    assert len(after.signatures) == 1 and after.verified_by == [1]


async def test_kinds_not_subscribed_move_the_cursor_without_a_request(
        db_url: str, pool: Any) -> None:
    created, threads = Receiver(), Receiver()
    inbox = uuid.uuid4()
    kinds = ["message.created", "message.updated", "thread.created", "message.created",
             "backfill.completed", "thread.updated"]
    with ReceiverServer(created) as one, ReceiverServer(threads) as two:
        first, s1 = add_endpoint(db_url, one.url, ["message.created"])
        second, s2 = add_endpoint(db_url, two.url, ["thread.*"])
        created.secrets.append(s1)
        threads.secrets.append(s2)
        async with deliverer(settings(), db_url):
            for kind in kinds:
                await record(pool, inbox, kind)

            def cursors() -> list[int]:
                return [r["position"] for r in fetch(
                    db_url, "SELECT position FROM nova_event_cursors WHERE consumer IN "
                            "(%s, %s) ORDER BY consumer", f"hook:{min(first, second)}",
                    f"hook:{max(first, second)}")]
            await until(lambda: cursors() == [6, 6], "both cursors at the head")
    assert [(r.position, r.body["type"]) for r in created.deliveries] == [
        (1, "message.created"), (4, "message.created")]
    assert [(r.position, r.body["type"]) for r in threads.deliveries] == [
        (3, "thread.created"), (6, "thread.updated")]


async def test_a_slow_endpoint_does_not_hold_up_another(db_url: str, pool: Any) -> None:
    slow, fast = Receiver(delay=1.0), Receiver()
    inboxes = [uuid.uuid4() for _ in range(4)]
    with ReceiverServer(slow) as s, ReceiverServer(fast) as f:
        _, s1 = add_endpoint(db_url, s.url)
        _, s2 = add_endpoint(db_url, f.url)
        slow.secrets.append(s1)
        fast.secrets.append(s2)
        async with deliverer(settings(hooks_concurrency=6, hooks_endpoint_concurrency=2),
                             db_url):
            for _ in range(5):
                for inbox in inboxes:
                    await record(pool, inbox)
            started = time.monotonic()
            await until(lambda: len(fast.accepted()) == 20, "the fast endpoint's 20 events",
                        timeout=8)
            fast_done = time.monotonic() - started
            slow_then = len(slow.deliveries)
    # the slow one takes 1 s a request, two inboxes at a time: 10 s for its 20
    assert fast_done < 5 and slow_then < 15


async def test_an_inbox_behind_pruned_events_waits_and_says_so(
        db_url: str, pool: Any) -> None:
    receiver = Receiver()
    inbox = uuid.uuid4()
    with ReceiverServer(receiver) as server:
        endpoint, secret = add_endpoint(db_url, server.url)
        receiver.secrets.append(secret)
        for _ in range(3):
            await record(pool, inbox)
        fetch(db_url, "SELECT nova_prune_events(now() + interval '1 minute', 2)")
        async with deliverer(settings(), db_url):
            await until(lambda: fetch(db_url, "SELECT 1 FROM nova_hook_streams "
                                              "WHERE last_error IS NOT NULL"),
                        "the stream's error")
            assert receiver.deliveries == []
    [row] = fetch(db_url, "SELECT last_error, next_attempt_at > now() AS waits "
                          "FROM nova_hook_streams")
    assert "behind" in row["last_error"] and row["waits"]
    assert f"hook:{endpoint}" in row["last_error"]


# --- the operator's side -----------------------------------------------------------------

def test_hooks_commands_show_a_secret_once_and_manage_endpoints(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = nova(capsys, db_url, "hooks", "add", "https://app.example/hooks",
                          "--events", "message.created,thread.*")
    assert code == 0 and "shown this once" in err
    endpoint = out.split("id: ")[1].split()[0]
    secret = out.split("secret: ")[1].strip()
    assert secret.startswith("whsec_")
    code, out, _ = nova(capsys, db_url, "hooks", "list")
    assert code == 0 and endpoint in out and "message.created, thread.*" in out
    assert secret not in out and "enabled" in out
    code, out, _ = nova(capsys, db_url, "hooks", "list", "--json")
    [listed] = json.loads(out)
    assert listed["id"] == endpoint and "secret" not in json.dumps(listed)
    code, _, err = nova(capsys, db_url, "hooks", "add", "https://x.example", "--events",
                        "mail.sent")
    assert code == 2 and "unknown event kind 'mail.sent'" in err
    code, _, err = nova(capsys, db_url, "hooks", "add", "ftp://x.example")
    assert code == 2 and "not an http(s) URL" in err
    code, _, err = nova(capsys, db_url, "hooks", "rotate", str(uuid.uuid4()))
    assert code == 1 and "no webhook endpoint" in err
    code, out, _ = nova(capsys, db_url, "hooks", "enable", endpoint)
    assert code == 0 and "already enabled" in out
    code, out, _ = nova(capsys, db_url, "hooks", "remove", endpoint)
    assert code == 0 and "removed" in out
    assert fetch(db_url, "SELECT count(*) AS n FROM nova_event_cursors WHERE consumer = %s",
                 f"hook:{endpoint}")[0]["n"] == 0
    code, _, err = nova(capsys, db_url, "hooks", "remove", endpoint)
    assert code == 1 and "no webhook endpoint" in err


def test_a_new_endpoint_starts_at_every_inboxs_head(db_url: str) -> None:
    inbox = uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as c:
        for _ in range(3):
            c.execute("SELECT nova_record_event(%s, 'message.created', 'x', NULL, NULL, '{}')",
                      (inbox,))
    endpoint, _ = add_endpoint(db_url, "http://127.0.0.1:9/hooks")
    assert fetch(db_url, "SELECT position FROM nova_event_cursors WHERE consumer = %s",
                 f"hook:{endpoint}") == [{"position": 3}]


def test_the_processor_is_deployed_as_an_optional_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["hooks"]
    assert service["command"] == ["python", "-m", "nova.hooks"]
    assert service["profiles"] == ["hooks"]  # off unless asked for
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the PM2 file cannot be evaluated")

    def apps(env: dict[str, str]) -> dict[str, Any]:
        out = subprocess.run([node, "-e", "process.stdout.write(JSON.stringify(require("
                              "process.argv[1]).apps))", str(ROOT / "ecosystem.config.js")],
                             capture_output=True, text=True, timeout=60, check=True,
                             env={"PATH": "/usr/bin:/bin", **env})
        return {app["name"]: app for app in json.loads(out.stdout)}

    assert "nova-hooks" not in apps({})
    hooks = apps({"NOVA_PM2_HOOKS": "1"})["nova-hooks"]
    assert hooks["args"] == ["-m", "nova.hooks"] and hooks["env"]["NOVA_METRICS_PORT"] == "9700"
