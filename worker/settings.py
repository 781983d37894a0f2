"""What only GPU workers read, on top of the farm's own settings: the model and its level, the VRAM plan,
leases and retries, what jobs may fetch, the caches and the fast paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel, parse_level
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.settings import FarmSettings, blank_is_none
from fluxfarm.worker.model.plan import Optimize


class WorkerSettings(FarmSettings):
    """The farm's settings and a worker's; every field is a `FLUXFARM_<NAME>` variable."""

    model: str | None = Field(
        default=None,
        description="Base pipeline for workers: a catalog name (flux.2-klein-4b), a Hugging Face repo id or a folder.",
    )
    model_name: FluxModel | None = Field(
        default=None,
        description=(
            "The catalog model a worker's weights are, whose queues it consumes: needed for a folder or another "
            "repo (a fine-tune); a catalog name or repo in FLUXFARM_MODEL says it. Unset: flux.1-dev."
        ),
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
    host_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Host memory the worker may use, which the VRAM plan counts a swap's pinned copies and a CPU encode "
            "against; unset: what the machine (or its cgroup) has available when the worker starts. Give each "
            "worker its share on a host with several."
        ),
    )
    render_free: bool = Field(
        default=False,
        description=(
            "Measure the control plane: load no model, store an 8x8 placeholder PNG for each job, do all the rest "
            "(claims, leases, storage, records) as a real worker. Never for real datasets."
        ),
    )
    optimize: Optimize = Field(
        default=Optimize.THROUGHPUT,
        description=(
            "What the VRAM plan puts first: throughput (fp8 first on cards with fp8 tensor cores) or quality (the "
            "best level that fits). A job that must have a level says min:LEVEL."
        ),
    )
    plan_size: str = Field(
        default="2048x2048", pattern=r"^\d+x\d+$", description="Largest job the VRAM plan must fit, WxH."
    )
    catalog: Path | None = Field(default=None, description="TOML file overriding where each level's weights live.")
    worker_name: str | None = Field(default=None, description="Celery node name; host and device when unset.")
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
    deterministic: bool = Field(
        default=False,
        description=(
            "Renders that repeat bit for bit on one card: deterministic kernels only, and one job a batch (a "
            "batch's rows may differ in the last bits). `fluxfarm rerender` checks an image against it."
        ),
    )
    compile_cache_url: str | None = Field(
        default=None,
        description=(
            "Where workers share torch.compile's artifacts (s3://bucket/prefix or file:///dir), so a new worker "
            "of a GPU class loads what the first one compiled; needs FLUXFARM_COMPILE_CACHE_SECRET. Unset: none."
        ),
    )
    compile_cache_secret: SecretStr | None = Field(
        default=None,
        description=(
            "Signs and checks the shared compile artifacts (HMAC-SHA256), which are code workers run: at least 16 "
            "characters, held by workers only, never by producers or the gateway."
        ),
    )
    compile_cache_max_mib: int = Field(
        default=1024, ge=1, description="Shared compile artifacts larger than this are neither read nor published."
    )
    warmup: Literal["first-use", "before-jobs"] = Field(
        default="first-use",
        description=(
            "When a compiling worker prepares its shapes: on the first job of each (size, batch), or before it takes "
            "jobs, for every batch size the plan allows at each FLUXFARM_WARMUP_SIZES size (then it publishes them)."
        ),
    )
    warmup_sizes: Annotated[list[str], NoDecode] = Field(
        default=["1024x1024"], description="Image sizes (WxH, comma-separated) prepared by before-jobs warm-up."
    )
    max_batch: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "Jobs a worker renders together (same size: one batch), at most; on a GPU the VRAM plan's batch for "
            "the size caps it further."
        ),
    )
    batch_wait_s: float = Field(
        default=0.05, ge=0, le=10, description="How long the worker waits for more held jobs before it renders."
    )
    embedding_cache: int = Field(default=256, ge=0, description="Prompt embeddings kept in host memory (4 MiB each).")

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

    _blank_worker_is_none = field_validator(
        "transformer",
        "cache_max_gib",
        "host_memory_gib",
        "model_name",
        "compile_cache_url",
        "compile_cache_secret",
        mode="before",
    )(blank_is_none)

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup_sizes")
    @classmethod
    def _sizes_are_sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit()):
                raise ValueError(f"warm-up size {size!r} is not WxH, e.g. 1024x1024")
        return value

    @model_validator(mode="after")
    def _deterministic_renders_alone(self) -> WorkerSettings:
        if self.deterministic:
            self.max_batch = 1
        return self

    @model_validator(mode="after")
    def _compile_cache_is_signed(self) -> WorkerSettings:
        secret = self.compile_cache_secret.get_secret_value() if self.compile_cache_secret else ""
        if self.compile_cache_url and len(secret) < 16:
            # Not a ValueError: pydantic would wrap it with the whole input, the secrets included.
            raise FarmError("FLUXFARM_COMPILE_CACHE_URL needs FLUXFARM_COMPILE_CACHE_SECRET of 16 characters or more")
        return self

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
