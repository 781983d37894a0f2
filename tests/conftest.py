"""Real parts only: a private redis-server, moto's S3 server over HTTP, worker processes on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

if not os.path.exists("/dev/nvidiactl"):
    # No NVIDIA GPU: Triton kernels run in its interpreter. Triton reads this when a kernel (its own
    # library's too) is defined, so it must be set before torch or diffusers import triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, ModelMixin

from fluxfarm.producer.local_stack import RedisServer, WorkerProcess, free_port
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import QUEUE_ANY, waiting_messages
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.settings import WorkerSettings
from tests.host_settings import HostSettings
from tests.redis_users import AclRedis, run_acl_redis

TINY_LEVELS = (
    QuantLevel.Q8_0,
    QuantLevel.Q6_K,
    QuantLevel.Q5_K,
    QuantLevel.Q4_K,
    QuantLevel.Q4_0,
    QuantLevel.Q3_K,
    QuantLevel.Q2_K,
)
WORKER_READY_TIMEOUT_S = 180.0

# Fake credentials for moto, set before anything builds a boto3 client; real ones never reach tests.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "fluxfarm-test-key",
        "AWS_SECRET_ACCESS_KEY": "fluxfarm-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
)
for _name in [name for name in os.environ if name.startswith("FLUXFARM_")]:
    del os.environ[_name]  # a developer's own farm settings must not leak into tests


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fluxfarm.worker.tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", TINY_LEVELS)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def client(self) -> Any:  # boto3 clients have no public type
        return boto3.client("s3", endpoint_url=self.endpoint_url)

    def new_bucket(self) -> str:
        name = f"farm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    """A redis-server as the compose file starts it, with its ACL users (tests/redis_users.py)."""
    yield from run_acl_redis(tmp_path_factory.mktemp("acl-redis"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    server.stop()


@dataclass(frozen=True)
class Farm:
    """A running farm: Redis, S3 bucket, one worker process, and the settings a client needs."""

    settings: HostSettings
    bucket: str
    prefix: str
    worker: WorkerProcess
    s3: S3Server

    def worker_env(self) -> dict[str, str]:
        return farm_env(self.settings)


def farm_env(settings: WorkerSettings) -> dict[str, str]:
    env = {
        "FLUXFARM_BROKER_URL": settings.broker_url,
        "FLUXFARM_STORAGE_URL": settings.storage_url,
        "FLUXFARM_CACHE_DIR": str(settings.cache_dir),
        "FLUXFARM_LOG_LEVEL": "INFO",
        "FLUXFARM_METRICS_PORT": "0",  # many workers share this host; tests/system/test_metrics.py turns them on
    }
    if settings.s3_endpoint_url:
        env["FLUXFARM_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def start_worker(
    settings: WorkerSettings,
    model: Path,
    transformer: Path | None,
    log_path: Path,
    name: str,
    extra_env: dict[str, str] | None = None,
) -> WorkerProcess:
    args = ["--model", str(model), "--device", "cpu"]
    if transformer is not None:
        args += ["--transformer", str(transformer)]
    # Long enough for jobs submitted together to be rendered together even on a busy CI machine.
    env = {**farm_env(settings), "FLUXFARM_WORKER_NAME": name, "FLUXFARM_BATCH_WAIT_S": "0.5", **(extra_env or {})}
    worker = WorkerProcess(args, env, log_path).start()
    worker.wait_ready(WORKER_READY_TIMEOUT_S)
    return worker


@pytest.fixture(scope="module")
def farm(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    redis_server: RedisServer,
    s3_server: S3Server,
) -> Iterator[Farm]:
    """One GGUF Q8_0 worker for a whole test module, storing into a fresh bucket."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    bucket = s3_server.new_bucket()
    prefix = "renders"
    work = tmp_path_factory.mktemp("farm")
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{bucket}/{prefix}", work)
    worker = start_worker(
        settings,
        tiny_model,
        gguf_path(tiny_model, QuantLevel.Q8_0),
        work / "worker.log",
        f"w-{request.module.__name__}",
    )
    yield Farm(settings=settings, bucket=bucket, prefix=prefix, worker=worker, s3=s3_server)
    worker.stop()


@pytest.fixture(scope="module")
def farm_api(farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProducerSettings]:
    """The settings of a client that reaches the module's farm only through the gateway, with a token that
    may touch every dataset: no Redis, no storage credentials."""
    from tests.gateway_process import running_gateway

    with running_gateway(farm.settings, tmp_path_factory.mktemp("gateway") / "gateway.log") as gateway:
        token = gateway.token("tests", "--datasets", "*", "--priorities", "high,normal,low")
        yield ProducerSettings(api_url=gateway.url, api_token=token, broker_url="redis://unreachable.invalid:1/0")


@pytest.fixture(params=["redis", "http"])
def client_settings(request: pytest.FixtureRequest, farm: Farm) -> ProducerSettings:
    """A client's settings for the module's farm: straight to Redis and storage, or through the gateway;
    the client tests run both ways (issue 19, acceptance 2)."""
    if request.param == "redis":
        return farm.settings
    settings: ProducerSettings = request.getfixturevalue("farm_api")
    return settings


def client_env(settings: ProducerSettings) -> dict[str, str]:
    """The environment of a `fluxfarm` command run as a producer with `settings`: the gateway's URL and
    token, or the farm's Redis and storage."""
    if settings.api_url and settings.api_token:
        return {"FLUXFARM_API_URL": settings.api_url, "FLUXFARM_API_TOKEN": settings.api_token.get_secret_value()}
    env = {"FLUXFARM_BROKER_URL": settings.broker_url, "FLUXFARM_STORAGE_URL": settings.storage_url}
    if settings.s3_endpoint_url:
        env["FLUXFARM_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def via(settings: ProducerSettings) -> str:
    """`http` for a client through the gateway, `redis` for one straight to the farm."""
    return "http" if settings.api_url else "redis"


def farm_settings(redis_server: RedisServer, s3_server: S3Server, work: Path, storage_url: str = "") -> HostSettings:
    """Settings for a farm on `redis_server` (as it is: it need not be up yet) and moto S3, with its own cache dir;
    its storage is `storage_url`, or a fresh bucket's renders/."""
    return HostSettings(
        broker_url=redis_server.url,
        storage_url=storage_url or f"s3://{s3_server.new_bucket()}/renders",
        s3_endpoint_url=s3_server.endpoint_url,
        cache_dir=work / "cache",
    )


def fresh_farm_settings(redis_server: RedisServer, s3_server: S3Server, storage_url: str, work: Path) -> HostSettings:
    """Settings for a farm on the test Redis (emptied) and moto S3, with its own cache dir."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return farm_settings(redis_server, s3_server, work, storage_url)


def load_gguf_transformer(
    path: Path, model_dir: Path, transformer_class: type[ModelMixin] = FluxTransformer2DModel
) -> torch.nn.Module:
    """A GGUF transformer file as diffusers loads it (FLUX.1's class unless told), in fp32 on the CPU."""
    return transformer_class.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(model_dir),
        subfolder="transformer",
        dtype=torch.float32,
    )


FLUXFARM = str(Path(sys.executable).parent / "fluxfarm")
"""The installed console script, as a user runs it."""


def run_fluxfarm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `fluxfarm ARGS` with `env` over this process's environment; output captured as text."""
    return subprocess.run(
        [FLUXFARM, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def queue_length(client: redis.Redis) -> int:
    return waiting_messages(client, [QUEUE_ANY])[0]
