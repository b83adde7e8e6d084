"""The Dockerfile, docker-compose.yml, the PM2 file and the Grafana dashboard: every processor
is deployed, with metrics, health checks and restarts, and the dashboard asks only for series
Nova exports. (tests/test_pm2.py runs the PM2 file under real PM2.)"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import nova
from nova import metrics
from nova.runtime import Processor

ROOT = Path(__file__).resolve().parent.parent
# Every long-running process Nova has: the receiver, the completion monitor, and one per
# queue processor (checked below against the Processor subclasses in the package).
PROCESSES = {"receiver": "nova.receiver", "webhooks": "nova.webhooks",
             "backfill": "nova.backfill", "threads": "nova.threads",
             "completion": "nova.completion", "attachments": "nova.attachments"}


def _module_has_main(module: str) -> bool:
    return callable(getattr(importlib.import_module(module), "main", None))


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_every_queue_processor_has_a_process() -> None:
    modules = set()
    for info in pkgutil.iter_modules(nova.__path__, "nova."):
        if info.name.startswith(("nova.sandbox", "nova.__main__")):
            continue
        module = importlib.import_module(info.name)
        for _name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Processor) and cls.__module__ == info.name and \
                    "queue" in vars(cls):
                modules.add(info.name)
    assert modules and modules <= set(PROCESSES.values())


def test_compose_names_every_processor_with_metrics_health_and_restarts() -> None:
    services = _compose()["services"]
    assert {"db", "migrate", *PROCESSES} <= set(services)
    assert services["migrate"]["command"] == ["nova", "migrate"]
    for name, module in PROCESSES.items():
        service = services[name]
        assert service["command"] == ["python", "-m", module], name
        assert _module_has_main(module), name
        env = service["environment"]
        assert env["NOVA_DATABASE_URL"].startswith("postgresql://"), name
        assert env["NOVA_METRICS_PORT"] == "9100" and service["expose"] == ["9100"], name
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "nova.metrics",
                                                  "healthcheck"], name
        assert service["restart"] == "unless-stopped", name
        assert service["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully", name
        assert service["stop_grace_period"] == "40s", name
        # a published port would collide as soon as the service is scaled
        assert name == "receiver" or "ports" not in service, name
    assert services["receiver"]["ports"] == ["8080:8080"]
    assert services["threads"]["deploy"]["replicas"] == 2
    migrate = services["migrate"]
    assert migrate["restart"] == "no" and migrate["healthcheck"] == {"disable": True}
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["db"]["healthcheck"]["test"][0] == "CMD-SHELL"


def test_the_attachment_service_writes_to_a_mounted_nas_folder() -> None:
    service = _compose()["services"]["attachments"]
    assert service["command"] == ["python", "-m", "nova.attachments"]
    root = service["environment"]["NOVA_ATTACHMENT_PATH"]
    mounts = [v.rsplit(":", 1) for v in service["volumes"]]
    assert [target for _, target in mounts] == [root]
    assert mounts[0][0].startswith("${HOST_ATTACHMENT_PATH")  # the Missive downloader's name
    assert service["environment"]["NOVA_DATABASE_URL"].startswith("postgresql://")


def test_the_monitoring_profile_scrapes_every_replica_of_every_service() -> None:
    services = _compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    config = yaml.safe_load((ROOT / "grafana" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert set(sd["names"]) == set(PROCESSES) and sd["port"] == 9100
    mounts = [v.split(":")[0] for v in services["grafana"]["volumes"]]
    for mount in mounts:
        assert (ROOT / mount).exists(), mount


def test_dockerfile_is_one_non_root_image_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY migrations migrations" in text
    assert "FROM python:3.11-slim" in text and "\nUSER nova\n" in text
    assert "NOVA_METRICS_PORT=9100" in text
    assert re.search(r'HEALTHCHECK .*\n\s+CMD \["python", "-m", "nova.metrics", "healthcheck"\]',
                     text)
    assert 'CMD ["python", "-m", "nova"]' in text


def _pm2_apps() -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the PM2 file cannot be evaluated")
    out = subprocess.run([node, "-e", "process.stdout.write(JSON.stringify("
                          "require(process.argv[1]).apps))", str(ROOT / "ecosystem.config.js")],
                         capture_output=True, text=True, timeout=60, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_pm2_has_an_app_per_processor_on_ports_that_never_collide() -> None:
    apps = {app["name"]: app for app in _pm2_apps()}
    assert set(apps) == {f"nova-{name}" for name in PROCESSES}
    ports = []
    for name, module in PROCESSES.items():
        app = apps[f"nova-{name}"]
        assert app["args"] == ["-m", module] and _module_has_main(module)
        assert app["exec_mode"] == "fork" and app["autorestart"] is True
        assert app["kill_timeout"] >= 40000
        assert app["increment_var"] == "NOVA_METRICS_PORT"
        ports.append(int(app["env"]["NOVA_METRICS_PORT"]))
    assert apps["nova-threads"]["instances"] == 2
    # a block of 100 ports per app: instance N of an app gets its block's first port + N
    assert sorted(ports) == list(range(9100, 9700, 100))


def test_the_grafana_dashboard_asks_only_for_series_nova_exports() -> None:
    dashboard = json.loads((ROOT / "grafana" / "nova-dashboard.json").read_text())
    assert dashboard["uid"] == "nova"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {name for expr in exprs for name in re.findall(r"\bnova_[a-z_]+", expr)}
    exported = set(metrics.POSTGRES_SERIES)
    for family in metrics.REGISTRY.collect():
        exported |= {s.name for s in family.samples} | {family.name}
    exported |= {f"{n}_total" for n in ("nova_jobs", "nova_provider_requests")}
    exported |= {f"{h}_bucket" for h in ("nova_job_duration_seconds",
                                         "nova_webhook_lag_seconds")}
    assert used and used <= exported, used - exported
    for series in ("nova_jobs_total", "nova_job_duration_seconds_bucket", "nova_queue_depth",
                   "nova_queue_oldest_message_age_seconds", "nova_provider_requests_total",
                   "nova_provider_rate", "nova_backfill_threads",
                   "nova_webhook_lag_seconds_bucket"):
        assert series in used, series
