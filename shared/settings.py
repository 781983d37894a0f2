"""Settings for every fluxfarm process, from `FLUXFARM_*` environment variables (and a `.env` file).

AWS credentials are not settings: boto3 reads them from its usual chain (environment, profile, role).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fluxfarm.shared.errors import FarmError, PlaceholderSecret
from fluxfarm.shared.ladder import QuantLevel, parse_level

DEFAULT_STORAGE_URL = "file://./fluxfarm-output"
PLACEHOLDER_SECRET_PREFIX = "change-me"
"""How every secret in infra/env.example begins: a farm started with one is refused, not run open."""


def _refuse_placeholder(value: str | None, what: str) -> None:
    # Not a ValueError: pydantic would wrap it with the whole input, every other secret included.
    if value and value.startswith(PLACEHOLDER_SECRET_PREFIX):
        raise PlaceholderSecret(f"{what} is still the placeholder of infra/env.example: set a secret of your own")


class FarmSettings(BaseSettings):
    """One settings class per process; every field is a `FLUXFARM_<NAME>` variable."""

    model_config = SettingsConfigDict(env_prefix="FLUXFARM_", env_file=".env", extra="ignore")

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
    model: str | None = Field(
        default=None, description="Base pipeline for workers: a diffusers folder or a Hugging Face repo id."
    )
    transformer: str | None = Field(
        default=None,
        description="Transformer weights for workers: a .gguf/.safetensors path, hf://, https:// or s3:// URL.",
    )
    device: str | None = Field(default=None, description="Torch device for workers; cuda:0 when present.")
    level: QuantLevel | None = Field(
        default=None,
        # FLUXFARM_QUANT, its name before `quant` came to mean only a job's constraint, still works.
        validation_alias=AliasChoices("level", "fluxfarm_level", "quant", "fluxfarm_quant"),
        description="Force the worker's level (e.g. Q4_K); the VRAM policy picks when unset. Also FLUXFARM_QUANT.",
    )
    vram_budget_gib: float | None = Field(
        default=None, gt=0, description="Use at most this much GPU memory (a shared card, or to emulate a smaller one)."
    )
    plan_size: str = Field(
        default="2048x2048", pattern=r"^\d+x\d+$", description="Largest job the VRAM plan must fit, WxH."
    )
    catalog: Path | None = Field(default=None, description="TOML file overriding where each level's weights live.")
    worker_name: str | None = Field(default=None, description="Celery node name; host and device when unset.")
    lease_s: int = Field(
        default=30,
        ge=5,
        le=3600,
        description=(
            "A job's lease: a live worker renews it every lease_s/6 however long the render takes; a dead "
            "worker's jobs are delivered again within about lease_s + lease_s/6."
        ),
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Render attempts a job gets (failures and worker deaths) before it is dead-lettered.",
    )
    retry_backoff_s: float = Field(
        default=1.0,
        ge=0,
        le=3600,
        description=(
            "Workers: the back-off after a job's first failed attempt, doubling with each further one; the job "
            "waits in Redis' delayed-retry set meanwhile, holding no worker thread."
        ),
    )
    retry_backoff_max_s: float = Field(default=30.0, ge=0, le=86_400, description="Workers: the longest back-off.")
    storage_retry_s: float = Field(
        default=600,
        ge=0,
        description="Seconds a worker retries (with backoff) a store it cannot reach before the attempt fails.",
    )
    oom_step_down: bool = Field(
        default=True,
        description=(
            "A job that runs out of GPU memory even alone makes the worker reload one level down (only a "
            "worker that picked its own level: no FLUXFARM_LEVEL, no FLUXFARM_TRANSFORMER)."
        ),
    )
    inject_faults: str | None = Field(
        default=None,
        description="Fault drills only: JSON of worker.fault_injection.FaultPlan (poison prompts, injected OOM).",
    )
    result_expires_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="How long task results stay in the result backend."
    )
    submit_chunk: int = Field(
        default=500, ge=1, le=10_000, description="Jobs a file submit publishes per pipelined round trip to Redis."
    )
    redis_maxmemory_mib: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Producers: the memory Redis may use where its own maxmemory is 0 (unlimited); submits stop "
            "before it. Redis' maxmemory wins when set."
        ),
    )
    redis_reserve_share: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Producers: the share of Redis' maxmemory submits leave for the workers' bookkeeping.",
    )
    cache_dir: Path = Field(default=Path("~/.cache/fluxfarm"), description="Downloaded models and file digests.")
    cache_max_gib: float | None = Field(
        default=200.0,
        gt=0,
        description=(
            "Size limit of the model download cache (models and the files jobs name); least recently used "
            "files go first. Empty: unbounded, only where something else bounds the disk."
        ),
    )
    fused_cache_max_gib: float = Field(
        default=64.0,
        gt=0,
        description="Size limit of the fused-LoRA block cache; the least recently used LoRA sets go first, whole.",
    )
    job_file_max_gib: float = Field(
        default=2.0,
        gt=0,
        description=(
            "Largest file a job may make a worker fetch or read (a LoRA), checked from the size the store, "
            "the Hub or the disk reports before it is downloaded or read."
        ),
    )
    job_folder_max_gib: float = Field(
        default=8.0, gt=0, description="Largest model folder a job may make a worker fetch (a ControlNet)."
    )
    job_folder_max_files: int = Field(
        default=64, ge=1, description="Most files of a model folder a job may make a worker fetch (a ControlNet)."
    )
    dataset_retention_s: float = Field(
        default=7 * 24 * 3600,
        gt=0,
        description=(
            "A dataset with nothing queued or running leaves the active index (status, the exporter, the lost-job "
            "sweep) this long after its last change; its record stays, read by name."
        ),
    )
    lora_jobs: bool = Field(
        default=True,
        description=(
            "The worker takes LoRA jobs (it adopts LoRA sets' queues) and its VRAM plan keeps room to fuse them; "
            "off, it never adopts a set and the plan gives that room to the best level that fits."
        ),
    )
    lora_fleet_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "While base jobs wait, LoRA set queues that are no more urgent hold at most this share of the live "
            "fleet (at least one worker)."
        ),
    )
    lora_stint_max_s: float = Field(
        default=900.0,
        gt=0,
        description=(
            "A worker on a LoRA set's queue goes back to its base queues after this long when base jobs as urgent wait."
        ),
    )
    job_file_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description=(
            "Folders (':'-separated) under which jobs may name worker paths for LoRAs, ControlNets and control "
            "images; jobs naming any other path fail. Empty: jobs may only name hf:// and s3:// sources."
        ),
    )
    log_level: str = Field(default="INFO", description="Python logging level of the worker.")
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="The worker's Prometheus /metrics port (one per worker on a host); 0 turns metrics off.",
    )
    metrics_address: str = Field(default="0.0.0.0", description="Address the worker's /metrics listens on.")
    fast_kernels: bool = Field(
        default=True,
        description="Triton GGUF dequantization and fp8 tensor-core matmuls on GPUs that run them.",
    )
    attention: Literal["auto", "native", "cudnn"] = Field(
        default="auto",
        description="Attention kernel: cudnn (SDPA's cuDNN backend), native SDPA, or auto (also fp8 attention "
        "on the fp8 level where cuDNN runs it: Hopper).",
    )
    compile: bool = Field(
        default=True,
        description="torch.compile the transformer blocks on GPUs: faster steps after 10-30 s of compiling per size.",
    )
    cuda_graphs: bool = Field(
        default=True, description="Replay each step shape as a CUDA graph on GPUs: no per-kernel launch cost."
    )
    max_batch: int = Field(
        default=4, ge=1, le=64, description="Jobs a worker holds at once and renders together (same size: one batch)."
    )
    batch_wait_s: float = Field(
        default=0.05, ge=0, le=10, description="How long the worker waits for more held jobs before it renders."
    )
    embedding_cache: int = Field(default=256, ge=0, description="Prompt embeddings kept in host memory (4 MiB each).")
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

    @field_validator("level", mode="before")
    @classmethod
    def _level_by_name(cls, value: object) -> object:
        """A level's name in any case (q4_k, Q4_K); empty means unset."""
        if value is None or value == "" or isinstance(value, QuantLevel):
            return value or None
        try:
            return parse_level(str(value))
        except FarmError as error:
            raise ValueError(str(error)) from None

    @field_validator(
        "tls_ca_file", "s3_endpoint_url", "transformer", "cache_max_gib", "redis_maxmemory_mib", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        """An empty variable (compose's `${VAR:-}`) means unset: not the current folder, not an endpoint."""
        return None if value == "" else value

    @field_validator("job_file_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part]
        return value

    @field_validator("job_file_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        return [root.expanduser().resolve() for root in value]

    @field_validator("cache_dir")
    @classmethod
    def _expand_cache_dir(cls, value: Path) -> Path:
        return value.expanduser()

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
