"""The shipped files, run as an operator would: `.env.example` copied to `.env` with only the
values its header calls required filled in (plus, here, the sandboxes' URIs in place of the
providers' and free ports); every `python -m nova.*` process and `python -m nova` start with
it, stay up, do their work and exit 0 on SIGTERM; the commands of docker-compose.yml and
ecosystem.config.js do the same with the environment those files give them. An empty webhook
secret leaves no way in: a webhook signed with the empty key is not stored."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from cryptography.fernet import Fernet
from servers import free_port, metrics_base
from synchelp import API_KEY, FULL_YEAR, make_sandbox

from nova.sandbox.nylas import SandboxNylas

# What differs on the embedded Postgres: CI runs these there too (README's test command).
pytestmark = pytest.mark.embedded


ROOT = Path(__file__).resolve().parent.parent
# hooks is optional (a compose profile, a PM2 switch) but shipped: it starts from the same files.
PROCESSORS = ["webhooks", "backfill", "threads", "completion", "attachments", "receiver", "hooks"]
SECRET = "shipped-webhook-secret"


def env_file(folder: Path, values: dict[str, str]) -> Path:
    """`.env.example` as shipped, with `values` filled into its own empty lines: each name
    must be in the file already (a value the example does not offer is not a shipped one)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    filled: set[str] = set()
    for i, line in enumerate(lines):
        name = line.split("=", 1)[0]
        if "=" in line and not line.startswith("#") and name in values:
            lines[i] = f"{name}={values[name]}"
            filled.add(name)
    assert filled == set(values), f"not in .env.example: {set(values) - filled}"
    path = folder / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def bare_env(**extra: str) -> dict[str, str]:
    """This machine's environment without any Nova, Nylas or Gmail setting: only .env counts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NYLAS_", "NOVA_", "GMAIL_", "DATABASE_URL", "PM2", "pm_"))}
    return {**env, **extra}


class Fleet:
    """Processes started in one folder; their output goes to a log file each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = (self.folder / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(argv, cwd=self.folder, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{self.log(name)}"

    def wait(self, what: str, check: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self.alive()
            assert time.monotonic() < deadline, f"timed out: {what}"
            time.sleep(0.2)

    def stop(self) -> dict[str, int | None]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        return codes


@pytest.fixture
def port() -> int:
    """The receiver's port."""
    return free_port()


@pytest.fixture
def sandbox(port: int) -> Iterator[SandboxNylas]:
    """A Nylas mailbox whose webhooks go to the receiver, signed with the shipped secret."""
    with make_sandbox(20, seed=7, webhook_secret=SECRET,
                      webhook_url=f"http://127.0.0.1:{port}/webhooks/nylas") as sb:
        yield sb


def required(db_url: str, sb: SandboxNylas, receiver_port: int) -> dict[str, str]:
    """What .env.example's header calls required for both providers, the sandbox's URI for
    Nylas's, and a free receiver port."""
    return {"NOVA_DATABASE_URL": db_url, "NYLAS_API_KEY": API_KEY, "NYLAS_WEBHOOK_SECRET": SECRET,
            "NOVA_CREDENTIALS_KEY": Fernet.generate_key().decode(),
            "GMAIL_PUSH_TOKEN": "shipped-gmail-push-token", "NYLAS_API_URI": sb.base_url,
            "NOVA_RECEIVER_PORT": str(receiver_port)}


def completed(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM flux_inbox_configurations"
                           " WHERE backfill_status = 'completed'").fetchone()
    return row == (1,)


def queue_backfill(db_url: str, grant: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        inbox = conn.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES (%s, 'op@x.com')"
                             " RETURNING id", (grant,)).fetchone()
        assert inbox is not None
        conn.execute("SELECT queue_inbox_backfill(%s, now() - %s)", (inbox[0], FULL_YEAR))


def processed_webhooks(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM flux_webhook_notifications"
                           " WHERE status = 'processed'").fetchone()
    return int(row[0]) if row else 0


def test_env_example_with_the_required_values_runs_every_processor(
        db_url: str, sandbox: SandboxNylas, port: int, tmp_path: Path) -> None:
    env_file(tmp_path, required(db_url, sandbox, port))
    fleet = Fleet(tmp_path)
    for name in PROCESSORS:
        fleet.start(name, [sys.executable, "-m", f"nova.{name}"], bare_env())
    try:
        fleet.wait("the receiver to answer", lambda: _answers(port))
        queue_backfill(db_url, sandbox.grant_ids[0])
        fleet.wait("the backfill to complete", lambda: completed(db_url))
        sandbox.add_message(sandbox.grant_ids[0])
        fleet.wait("the sandbox's webhook to be processed",
                   lambda: processed_webhooks(db_url) >= 1)
        time.sleep(1)
        fleet.alive()
    finally:
        codes = fleet.stop()
    assert codes == {name: 0 for name in PROCESSORS}, {n: fleet.log(n)[-800:] for n in codes}
    assert not any("Traceback" in fleet.log(name) for name in PROCESSORS)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_python_m_nova_with_the_env_example_runs_no_sandbox(
        db_url: str, sandbox: SandboxNylas, port: int, tmp_path: Path) -> None:
    env_file(tmp_path, required(db_url, sandbox, port))
    queue_backfill(db_url, sandbox.grant_ids[0])
    fleet = Fleet(tmp_path)
    fleet.start("nova", [sys.executable, "-m", "nova"], bare_env())
    try:
        fleet.wait("the backfill to complete", lambda: completed(db_url))
        fleet.alive()
    finally:
        codes = fleet.stop()
    assert codes == {"nova": 0}, fleet.log("nova")[-2000:]
    assert "sandbox at" not in fleet.log("nova")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM flux_inboxes WHERE demo").fetchone() == (0,)


def test_an_empty_webhook_secret_lets_no_signed_webhook_in(
        db_url: str, sandbox: SandboxNylas, port: int, tmp_path: Path) -> None:
    """`NYLAS_WEBHOOK_SECRET=` as shipped (Gmail pushes keep the receiver up): a delivery
    signed with the empty key is refused and nothing is stored."""
    values = required(db_url, sandbox, port)
    del values["NYLAS_WEBHOOK_SECRET"]
    env_file(tmp_path, values)
    fleet = Fleet(tmp_path)
    fleet.start("receiver", [sys.executable, "-m", "nova.receiver"], bare_env())
    try:
        fleet.wait("the receiver to answer", lambda: _answers(port))
        body = json.dumps({"specversion": "1.0", "type": "grant.deleted", "id": "forged-1",
                           "time": int(time.time()), "webhook_delivery_attempt": 1,
                           "data": {"application_id": "x", "object": {
                               "grant_id": sandbox.grant_ids[0]}}}).encode()
        signature = hmac.new(b"", body, hashlib.sha256).hexdigest()
        answer = httpx.post(f"http://127.0.0.1:{port}/webhooks/nylas", content=body,
                            headers={"X-Nylas-Signature": signature,
                                     "Content-Type": "application/json"})
        assert answer.status_code >= 400
    finally:
        codes = fleet.stop()
    assert codes == {"receiver": 0}, fleet.log("receiver")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM flux_webhook_notifications").fetchone() \
            == (0,)


def backfills_and_stops(fleet: Fleet, db_url: str, sandbox: SandboxNylas, port: int) -> None:
    """The fleet's receiver answers, a backfill queued now completes, and SIGTERM ends every
    process with exit status 0."""
    try:
        fleet.wait("the receiver to answer", lambda: _answers(port))
        queue_backfill(db_url, sandbox.grant_ids[0])
        fleet.wait("the backfill to complete", lambda: completed(db_url))
    finally:
        codes = fleet.stop()
    assert codes == {name: 0 for name in fleet.procs}, {n: fleet.log(n)[-800:] for n in codes}


def _python(argv: list[str]) -> list[str]:
    """A file's command with this test's interpreter: `python -m x` and the `nova` script."""
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    if argv[0] == "nova":
        return [sys.executable, "-m", "nova", *argv[1:]]
    raise AssertionError(f"unexpected command {argv}")


def test_the_compose_services_start_with_their_environment_and_stop_cleanly(
        db_url: str, sandbox: SandboxNylas, port: int, tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env_file(tmp_path, required(db_url, sandbox, port))
    fleet = Fleet(tmp_path)
    started = []
    for name, service in compose["services"].items():
        if "build" not in service and service.get("image") != "nova":
            continue  # postgres, prometheus, grafana: not Nova's
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert env.pop("NOVA_DATABASE_URL").startswith("postgresql://")  # the compose db
        env.update(NOVA_DATABASE_URL=db_url)  # the one value a host without compose changes
        if "NOVA_METRICS_PORT" in env:  # each container has its own; here they share a host
            env["NOVA_METRICS_PORT"] = str(free_port())
        if "NOVA_ATTACHMENT_PATH" in env:
            env["NOVA_ATTACHMENT_PATH"] = str(tmp_path / "nas")
        argv = _python(list(service["command"]))
        if service.get("restart") == "no":  # the one-shot migrate
            done = subprocess.run(argv, cwd=tmp_path, env=bare_env(**env), timeout=120,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr
            continue
        fleet.start(name, argv, bare_env(**env))
        started.append(name)
    assert sorted(started) == sorted(PROCESSORS)
    backfills_and_stops(fleet, db_url, sandbox, port)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the PM2 file "
                                                          "cannot be read")
def test_the_pm2_apps_start_with_their_environment_and_stop_cleanly(
        db_url: str, sandbox: SandboxNylas, port: int, tmp_path: Path) -> None:
    base = metrics_base()  # the apps' blocks of 100 metrics ports from here
    listed = subprocess.run(
        ["node", "-e", "console.log(JSON.stringify(require(process.argv[1]).apps))",
         str(ROOT / "ecosystem.config.js")], capture_output=True, text=True, check=True,
        env=bare_env(NOVA_PYTHON=sys.executable, NOVA_METRICS_PORT_BASE=str(base)))
    apps = json.loads(listed.stdout)
    env_file(tmp_path, required(db_url, sandbox, port))
    fleet = Fleet(tmp_path)
    for app in apps:
        assert app["interpreter"] == "none" and app["cwd"] == str(ROOT)
        # cwd is the checkout, where the operator's .env lies; here: the test's folder
        fleet.start(app["name"], [app["script"], *app["args"]], bare_env(**app["env"]))
    backfills_and_stops(fleet, db_url, sandbox, port)
