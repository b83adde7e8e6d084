"""Every setting Nova reads, in one pydantic-settings class.

The names and defaults of the Nova seed's configuration table are kept as they were, so an
existing `.env` keeps working. Values come from the environment, then from a `.env` file in the
working directory. A bad value stops start-up with a message that names the variable.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """The environment holds a value Nova cannot use; the message names each variable."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    # Database. Unset means: the embedded Postgres under NOVA_EMBEDDED_PGDATA.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("NOVA_DATABASE_URL", "DATABASE_URL")
    )
    embedded_pgdata: Path = Field(
        default=Path.home() / ".local" / "share" / "nova" / "pgdata",
        validation_alias="NOVA_EMBEDDED_PGDATA",
    )

    # The Nova seed's configuration table, names and defaults unchanged.
    poll_interval_ms: int = Field(default=5000, ge=1, validation_alias="POLL_INTERVAL_MS")
    batch_size: int = Field(default=10, ge=1, le=1000, validation_alias="BATCH_SIZE")
    visibility_timeout: int = Field(default=300, ge=1, validation_alias="VISIBILITY_TIMEOUT")
    completion_check_interval_ms: int = Field(
        default=5000, ge=1, validation_alias="COMPLETION_CHECK_INTERVAL_MS"
    )
    enable_auto_recovery: bool = Field(default=True, validation_alias="ENABLE_AUTO_RECOVERY")
    recovery_check_interval_ms: int = Field(
        default=60000, ge=1, validation_alias="RECOVERY_CHECK_INTERVAL_MS"
    )
    # The seed paced its API calls with fixed sleeps (3000/1000/200 ms). Nova paces them with a
    # per-grant budget shared through Postgres (NOVA_PROVIDER_RATE_LIMIT), so these default to 0;
    # set, they still add their pause.
    thread_delay_ms: int = Field(default=0, ge=0, validation_alias="THREAD_DELAY_MS")
    message_delay_ms: int = Field(default=0, ge=0, validation_alias="MESSAGE_DELAY_MS")
    api_delay_ms: int = Field(default=0, ge=0, validation_alias="API_DELAY_MS")
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, validation_alias="NOVA_SHUTDOWN_GRACE_SECONDS"
    )
    testing_mode: bool = Field(default=False, validation_alias="TESTING_MODE")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        default="info", validation_alias="LOG_LEVEL"
    )
    log_format: Literal["text", "json"] = Field(default="text", validation_alias="NOVA_LOG_FORMAT")

    # Nylas v3.
    nylas_api_key: SecretStr | None = Field(default=None, validation_alias="NYLAS_API_KEY")
    nylas_api_uri: str = Field(
        default="https://api.us.nylas.com", validation_alias="NYLAS_API_URI"
    )
    nylas_webhook_secret: SecretStr | None = Field(
        default=None, validation_alias="NYLAS_WEBHOOK_SECRET"
    )

    # Provider request budget per grant, shared by every worker (nova.ratelimit). Nylas allows
    # 200 requests/s per grant, but each call fans out to the mailbox provider, whose limits are
    # far lower (Microsoft Graph: 10,000 requests per 10 minutes per mailbox, about 16/s).
    provider_rate_limit: float = Field(
        default=10.0, gt=0, validation_alias="NOVA_PROVIDER_RATE_LIMIT"
    )
    provider_burst: float = Field(default=5.0, ge=1, validation_alias="NOVA_PROVIDER_BURST")

    # Catch-up backfills (after a grant comes back, or a silence of webhooks).
    catchup_overlap_seconds: int = Field(
        default=600, ge=0, validation_alias="NOVA_CATCHUP_OVERLAP_SECONDS"
    )
    catchup_gap_seconds: int = Field(
        default=3600, ge=0, validation_alias="NOVA_CATCHUP_GAP_SECONDS"
    )

    # Webhook receiver.
    receiver_host: str = Field(default="0.0.0.0", validation_alias="NOVA_RECEIVER_HOST")
    receiver_port: int = Field(default=8080, ge=0, le=65535, validation_alias="NOVA_RECEIVER_PORT")
    receiver_max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, validation_alias="NOVA_RECEIVER_MAX_BODY_BYTES"
    )

    # `python -m nova` without NYLAS_API_KEY runs against the built-in Nylas sandbox.
    sandbox_threads: int = Field(default=100, ge=1, le=100_000,
                                 validation_alias="NOVA_SANDBOX_THREADS")
    sandbox_seed: int = Field(default=0, validation_alias="NOVA_SANDBOX_SEED")
    sandbox_event_seconds: float = Field(default=10.0, ge=0,
                                         validation_alias="NOVA_SANDBOX_EVENT_SECONDS")

    # Attachments (NAS mount).
    attachment_path: Path = Field(
        default=Path("./attachments"), validation_alias="NOVA_ATTACHMENT_PATH"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("nylas_api_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The environment variable(s) behind an error location (pydantic reports the alias)."""
    name = str(loc[0]) if loc else "?"
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if name == field or name in choices:
            return " / ".join(str(c) for c in choices if c) or field.upper()
    return name.upper()


def load_settings(**overrides: object) -> Settings:
    """Read the settings; on a bad value raise ConfigError naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [
            f"{_env_name(err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        ]
        raise ConfigError("Invalid Nova settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def settings_or_exit() -> Settings:
    """For entrypoints: the settings, or a clear message on stderr and exit code 2."""
    try:
        return get_settings()
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        raise SystemExit(2) from None
