"""Settings: the seed's names and defaults, aliases, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import AliasChoices

from nova.config import ConfigError, Settings, load_settings

SEED_DEFAULTS = {
    "POLL_INTERVAL_MS": ("poll_interval_ms", 5000),
    "BATCH_SIZE": ("batch_size", 10),
    "COMPLETION_CHECK_INTERVAL_MS": ("completion_check_interval_ms", 5000),
    "ENABLE_AUTO_RECOVERY": ("enable_auto_recovery", True),
    "RECOVERY_CHECK_INTERVAL_MS": ("recovery_check_interval_ms", 60000),
    "TESTING_MODE": ("testing_mode", False),
    "LOG_LEVEL": ("log_level", "info"),
}
# The seed's pacing sleeps (3000/1000/200 ms) default to 0: the shared per-grant budget paces.
# Its 300 s visibility timeout is 10 s: a heartbeat renews the lease of a running job, and a
# killed worker's jobs come back in seconds.
NOVA_DEFAULTS = {
    "VISIBILITY_TIMEOUT": ("visibility_timeout", 10),
    "THREAD_DELAY_MS": ("thread_delay_ms", 0),
    "MESSAGE_DELAY_MS": ("message_delay_ms", 0),
    "API_DELAY_MS": ("api_delay_ms", 0),
    "NOVA_PROVIDER_RATE_LIMIT": ("provider_rate_limit", 10.0),
    "NOVA_PROVIDER_BURST": ("provider_burst", 5.0),
    "NOVA_CATCHUP_OVERLAP_SECONDS": ("catchup_overlap_seconds", 600),
    "NOVA_CATCHUP_GAP_SECONDS": ("catchup_gap_seconds", 3600),
}
def _every_variable() -> list[str]:
    names: list[str] = []
    for info in Settings.model_fields.values():
        alias = info.validation_alias
        names += [str(c) for c in alias.choices] if isinstance(alias, AliasChoices) else [
            str(alias)]
    return names


ALL_NAMES = _every_variable()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ALL_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_seed_variables_keep_their_defaults() -> None:
    settings = load_settings()
    for env, (attr, default) in SEED_DEFAULTS.items():
        assert getattr(settings, attr) == default, env
    for env, (attr, default) in NOVA_DEFAULTS.items():
        assert getattr(settings, attr) == default, env
    assert settings.database_url is None
    assert settings.nylas_api_uri == "https://api.us.nylas.com"


def test_values_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_INTERVAL_MS", "250")
    monkeypatch.setenv("ENABLE_AUTO_RECOVERY", "false")
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("NYLAS_API_URI", "http://127.0.0.1:9999/")
    monkeypatch.setenv("NYLAS_API_KEY", "secret-key")
    settings = load_settings()
    assert settings.poll_interval_ms == 250
    assert settings.enable_auto_recovery is False
    assert settings.log_level == "debug"
    assert settings.nylas_api_uri == "http://127.0.0.1:9999"
    assert settings.nylas_api_key is not None
    assert settings.nylas_api_key.get_secret_value() == "secret-key"
    assert "secret-key" not in repr(settings)


def test_database_url_alias_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://a@h/x")
    assert load_settings().database_url == "postgresql://a@h/x"
    monkeypatch.setenv("NOVA_DATABASE_URL", "postgresql://b@h/y")
    assert load_settings().database_url == "postgresql://b@h/y"


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("BATCH_SIZE=42\nTESTING_MODE=true\n")
    settings = load_settings()
    assert settings.batch_size == 42 and settings.testing_mode is True


@pytest.mark.parametrize(("name", "value"), [
    ("BATCH_SIZE", "ten"),
    ("BATCH_SIZE", "0"),
    ("POLL_INTERVAL_MS", "-5"),
    ("VISIBILITY_TIMEOUT", "0"),
    ("ENABLE_AUTO_RECOVERY", "perhaps"),
    ("THREAD_DELAY_MS", "-1"),
    ("NOVA_PROVIDER_RATE_LIMIT", "0"),
    ("NOVA_PROVIDER_BURST", "0.5"),
    ("LOG_LEVEL", "verbose"),
    ("NYLAS_API_URI", "api.nylas.com"),
    ("NOVA_DATABASE_URL", "mysql://root@localhost/db"),
])
def test_bad_value_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str,
                                                   value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in info.value.message
    if name == "NOVA_DATABASE_URL":  # a URL may carry a password: never repeated
        assert value not in info.value.message and "value not shown" in info.value.message
    else:
        assert repr(value) in info.value.message


def test_blank_means_unset_for_every_setting(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    (tmp_path / ".env").write_text("".join(f"{name}=\n" for name in ALL_NAMES))
    assert load_settings() == defaults
    for name in ALL_NAMES:
        monkeypatch.setenv(name, "  ")
    assert load_settings() == defaults


def test_the_shipped_env_example_loads_as_it_is(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / ".env.example"
    (tmp_path / ".env").write_text(example.read_text())
    settings = load_settings()
    assert settings.nylas_api_key is None and settings.credentials_key is None
    assert settings.nylas_webhook_secret is None and settings.gmail_push_token is None
    assert settings.database_url is None and settings.demo is False
    assert settings.metrics_host == "127.0.0.1"


@pytest.mark.parametrize("name", ["NYLAS_WEBHOOK_SECRET", "GMAIL_PUSH_TOKEN"])
def test_a_short_webhook_secret_is_refused_without_echoing_it(
        monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "fifteen-chars!!")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert name in info.value.message and "at least 16 characters" in info.value.message
    assert "fifteen-chars" not in info.value.message
    monkeypatch.setenv(name, "sixteen-chars!!!")
    assert getattr(load_settings(), name.lower()) is not None


def test_an_error_never_prints_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOVA_DATABASE_URL", "mysql://nova:hunter2-secret@db.internal/nova")
    monkeypatch.setenv("NOVA_DATABASE_DIRECT_URL", "http://nova:other-secret@db/nova")
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = info.value.message
    assert "NOVA_DATABASE_URL" in text and "NOVA_DATABASE_DIRECT_URL" in text
    assert "hunter2" not in text and "other-secret" not in text


def test_env_example_lists_every_setting() -> None:
    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    for name in ALL_NAMES:
        if name != "DATABASE_URL":
            assert f"{name}=" in example, name
