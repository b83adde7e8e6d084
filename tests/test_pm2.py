"""ecosystem.config.js under real PM2 (installed from npm into a temporary folder) against the
test database and a sandbox mailbox: every app comes up with its metrics, `pm2 scale
nova-threads 4` gives four thread workers on four metrics ports, each of them syncs threads of
a backfill that completes, and `pm2 stop` stops them all with exit code 0."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import metrics_base
from synchelp import API_KEY, FULL_YEAR, make_sandbox

ROOT = Path(__file__).resolve().parent.parent
NODE, NPM = shutil.which("node"), shutil.which("npm")
pytestmark = pytest.mark.skipif(NODE is None or NPM is None,
                                reason="node and npm are not installed: PM2 cannot run here")
APPS = ["nova-receiver", "nova-webhooks", "nova-backfill", "nova-threads", "nova-completion",
        "nova-attachments"]
THREADS = 300


@pytest.fixture(scope="session")
def pm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PM2 from npm, in a folder of its own (nothing global is installed)."""
    folder = tmp_path_factory.mktemp("pm2")
    assert NPM is not None
    subprocess.run([NPM, "install", "--prefix", str(folder), "--no-audit", "--no-fund",
                    "--loglevel=error", "pm2"], check=True, timeout=600,
                   capture_output=True, text=True)
    return folder / "node_modules" / ".bin" / "pm2"


class Pm2:
    def __init__(self, binary: Path, home: Path, env: dict[str, str]) -> None:
        self.binary = binary
        self.env = {**env, "PM2_HOME": str(home)}

    def __call__(self, *args: str) -> str:
        done = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              timeout=120, env=self.env, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def processes(self) -> list[dict[str, Any]]:
        listed = json.loads(self("jlist"))
        return [{"name": p["name"], "status": p["pm2_env"]["status"],
                 "port": int(p["pm2_env"]["NOVA_METRICS_PORT"]),
                 "restarts": p["pm2_env"]["restart_time"],
                 "exit_code": p["pm2_env"].get("exit_code")} for p in listed]


def _wait(check: Any, what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _sample(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not served on {port}")


@pytest.fixture
def fleet(pm2: Path, db_url: str, tmp_path: Path) -> Iterator[tuple[Pm2, Any, int]]:
    with make_sandbox(THREADS, seed=5, latency_ms=100, thread_bodies=False) as sandbox:
        base = metrics_base(instances=10)  # room for `pm2 scale`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            receiver = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NYLAS_", "NOVA_", "DATABASE_URL", "PM2", "pm_"))}
        env.update({
            "NOVA_PYTHON": sys.executable, "NOVA_METRICS_PORT_BASE": str(base),
            "NOVA_METRICS_HOST": "127.0.0.1", "NOVA_DATABASE_URL": db_url,
            "NYLAS_API_KEY": API_KEY, "NYLAS_API_URI": sandbox.base_url,
            "NYLAS_WEBHOOK_SECRET": "pm2-webhook-secret", "NOVA_RECEIVER_HOST": "127.0.0.1",
            "NOVA_RECEIVER_PORT": str(receiver), "NOVA_ATTACHMENT_PATH": str(tmp_path / "nas"),
            "BATCH_SIZE": "2", "POLL_INTERVAL_MS": "500", "VISIBILITY_TIMEOUT": "10",
            "NOVA_PROVIDER_RATE_LIMIT": "200", "NOVA_PROVIDER_BURST": "50",
            "COMPLETION_CHECK_INTERVAL_MS": "300", "NOVA_CATCHUP_GAP_SECONDS": "0",
            "NOVA_SHUTDOWN_GRACE_SECONDS": "5"})
        run = Pm2(pm2, tmp_path / "pm2-home", env)
        try:
            run("start", "ecosystem.config.js")
            yield run, sandbox, base
        finally:
            subprocess.run([str(pm2), "kill"], capture_output=True, timeout=120,
                           env=run.env, cwd=ROOT)


def test_pm2_runs_every_app_and_scaled_thread_workers_each_process_jobs(
        fleet: tuple[Pm2, Any, int], db_url: str) -> None:
    run, sandbox, base = fleet
    ports = {"nova-receiver": base, "nova-webhooks": base + 100, "nova-backfill": base + 200,
             "nova-completion": base + 400, "nova-attachments": base + 500}

    def all_online() -> list[dict[str, Any]] | None:
        listed = run.processes()
        return listed if len(listed) == 7 and all(
            p["status"] == "online" for p in listed) else None

    started = _wait(all_online, "every app online")
    assert sorted(p["name"] for p in started) == sorted([*APPS, "nova-threads"])
    for name, port in ports.items():
        _wait(lambda port=port: _healthy(port), f"{name} /healthz")

    run("scale", "nova-threads", "4")

    def four_online() -> list[dict[str, Any]] | None:
        online = [p for p in run.processes() if p["name"] == "nova-threads"
                  and p["status"] == "online"]
        return online if len(online) == 4 else None

    threads = _wait(four_online, "four thread workers")
    thread_ports = sorted(p["port"] for p in threads)
    assert thread_ports == [base + 300 + n for n in range(4)]  # increment_var: one port each
    for port in thread_ports:
        _wait(lambda port=port: _healthy(port), f"thread worker {port} /healthz")

    grant = sandbox.grant_ids[0]
    with psycopg.connect(db_url, autocommit=True) as c:
        inbox = c.execute("INSERT INTO flux_inboxes (grant_id, email) VALUES (%s, 'pm2@x.com')"
                          " RETURNING id", (grant,)).fetchone()
        assert inbox is not None
        c.execute("SELECT queue_inbox_backfill(%s, now() - %s::interval)",
                  (inbox[0], f"{int(FULL_YEAR.total_seconds())} seconds"))
        _wait(lambda: c.execute("SELECT backfill_status FROM flux_inbox_configurations"
                                " WHERE inbox_id = %s", (inbox[0],)).fetchone() == (
                                    "completed",), "the backfill", timeout=180)
        stored = c.execute("SELECT count(*) FROM flux_email_threads").fetchone()
    assert stored == (len(sandbox.thread_ids(grant)),)

    done = {port: _sample(port, "nova_jobs_total", queue="thread_sync_jobs", outcome="done")
            for port in thread_ports}
    print(f"thread jobs done per scaled worker (by metrics port): {done}")
    assert all(n > 0 for n in done.values()), done  # every scaled worker synced threads
    assert sum(done.values()) >= THREADS, done
    assert _sample(ports["nova-completion"], "nova_backfills", status="completed") == 1
    assert all(p["restarts"] == 0 for p in run.processes())

    run("stop", "all")
    stopped = run.processes()
    assert {p["status"] for p in stopped} == {"stopped"}
    assert {p["exit_code"] for p in stopped} == {0}, stopped
