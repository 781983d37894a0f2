"""Settings both sides of the farm read, from `FLUXFARM_*` environment variables (and a `.env` file).

Each side adds its own on top: `fluxfarm.producer.settings.ProducerSettings` (clients, submits, status,
the exporter) and `fluxfarm.worker.settings.WorkerSettings` (GPU workers). One `.env` may hold both
sides' variables: each class ignores the other's. AWS credentials are not settings: boto3 reads them from
its usual chain (environment, profile, role).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fluxfarm.shared.errors import InvalidSettings, PlaceholderSecret
from fluxfarm.shared.validation_errors import validation_problems

DEFAULT_STORAGE_URL = "file://./fluxfarm-output"
PLACEHOLDER_SECRET_PREFIX = "change-me"
"""How every secret in infra/env.example begins: a farm started with one is refused, not run open."""


def _refuse_placeholder(value: str | None, what: str) -> None:
    # Not a ValueError: pydantic would wrap it with the whole input, every other secret included.
    if value and value.startswith(PLACEHOLDER_SECRET_PREFIX):
        raise PlaceholderSecret(f"{what} is still the placeholder of infra/env.example: set a secret of your own")


def blank_is_none(value: object) -> object:
    """An empty variable (compose's `${VAR:-}`) means unset: not the current folder, not an endpoint."""
    return None if value == "" else value


def _describe_settings_error(error: ValidationError) -> str:
    """`invalid setting FLUXFARM_MAX_BATCH: Input should be a valid integer, ...`, one clause a problem; the
    variable is named as the environment spells it (a field's alias already carries the prefix)."""
    clauses = []
    for where, reason in validation_problems(error, whole=""):
        if not where:  # a model validator's problem: it names its variables itself
            clauses.append(reason)
            continue
        head, _, rest = where.partition(".")
        name = head.upper() if head.lower().startswith("fluxfarm_") else f"FLUXFARM_{head.upper()}"
        clauses.append(f"{name}{'.' + rest if rest else ''}: {reason}")
    return "invalid setting " + "; ".join(clauses)


class FarmSettings(BaseSettings):
    """Where the farm is (Redis, storage, TLS) and the queue's contract; every field is a `FLUXFARM_<NAME>`."""

    # `extra="ignore"`: the environment holds the other side's FLUXFARM_* variables too.
    model_config = SettingsConfigDict(env_prefix="FLUXFARM_", env_file=".env", extra="ignore")

    def __init__(self, **values: Any) -> None:
        """A keyword that names no setting of this class is an error, not silently dropped as the
        environment's strangers are: `WorkerSettings` fields given to `FarmSettings` would vanish."""
        unknown = sorted(name for name in values if not name.startswith("_") and name not in self._init_names())
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise InvalidSettings(_describe_settings_error(error)) from None

    @classmethod
    def _init_names(cls) -> set[str]:
        names = set(cls.model_fields)
        for field in cls.model_fields.values():
            if isinstance(field.validation_alias, AliasChoices):
                names.update(choice for choice in field.validation_alias.choices if isinstance(choice, str))
        return names

    broker_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL of the job queue (redis:// or rediss:// for TLS; a password goes in the URL).",
    )
    result_backend_url: str | None = Field(
        default=None, description="Where task results live; defaults to the broker's Redis."
    )
    storage_url: str = Field(
        default=DEFAULT_STORAGE_URL,
        description="Where images and metadata go: s3://bucket/prefix or file:///dir.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, R2, ...); AWS when unset."
    )
    s3_region: str | None = Field(default=None, description="S3 region; boto3's default chain when unset.")
    tls_ca_file: Path | None = Field(
        default=None,
        description="CA certificate (PEM) that signed the Redis (rediss://) and S3 (https://) servers' certificates, "
        "for a private CA; the system's CAs when unset.",
    )
    lease_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description=(
            "A job's lease: a live worker renews it every lease_s/6 however long the render takes; a dead "
            "worker's jobs are delivered again within about lease_s + lease_s/6."
        ),
    )
    result_expires_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="How long task results stay in the result backend."
    )
    remote_control: bool = Field(
        default=False,
        description=(
            "Workers answer Celery's remote control (inspect, add/cancel consumer, shutdown): only where Flower "
            "or an operator's tool needs it, and then with Redis users that keep producers off the control channel."
        ),
    )

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> FarmSettings:
        for name, url in (("BROKER_URL", self.broker_url), ("RESULT_BACKEND_URL", self.result_backend_url)):
            _refuse_placeholder(urlsplit(url).password if url else None, f"the Redis password of FLUXFARM_{name}")
        # boto3 reads the S3 secret from the environment; refused here too, where every process starts.
        _refuse_placeholder(os.environ.get("AWS_SECRET_ACCESS_KEY"), "AWS_SECRET_ACCESS_KEY")
        return self

    @field_validator("storage_url")
    @classmethod
    def _known_storage_scheme(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError("storage_url must start with s3:// or file://")
        return value

    @field_validator("broker_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        """Checked here, where the error names the variable: redis-py's own refusal is a traceback at the first
        connection, after the worker has loaded its model."""
        if value is not None and not value.startswith(("redis://", "rediss://")):
            raise ValueError("a Redis URL starts with redis:// or rediss:// (TLS)")
        return value

    _blank_is_none = field_validator("tls_ca_file", "s3_endpoint_url", "result_backend_url", mode="before")(
        blank_is_none
    )

    @property
    def result_backend(self) -> str:
        return self.result_backend_url or self.broker_url


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
