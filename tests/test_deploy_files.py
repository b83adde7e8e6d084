"""The Dockerfile, docker-compose.yml and PM2 file start processes that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _module_has_main(module: str) -> bool:
    return callable(getattr(importlib.import_module(module), "main", None))


def test_compose_services_run_existing_processors() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"db", "migrate", "receiver", "webhooks", "backfill", "threads",
            "completion"} <= set(services)
    assert services["migrate"]["command"] == ["nova", "migrate"]
    for name, service in services.items():
        command = service.get("command")
        if command and command[:2] == ["python", "-m"]:
            assert _module_has_main(command[2]), name
            assert service["environment"]["NOVA_DATABASE_URL"].startswith("postgresql://")


def test_pm2_apps_run_existing_processors() -> None:
    text = (ROOT / "ecosystem.config.js").read_text()
    modules = re.findall(r'processor\("nova-[a-z]+", "([a-z.]+)"', text)
    assert len(modules) >= 5
    for module in modules:
        assert _module_has_main(module), module


def test_dockerfile_installs_the_package_and_defaults_to_all_processors() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "COPY migrations migrations" in text
    assert 'CMD ["python", "-m", "nova"]' in text
