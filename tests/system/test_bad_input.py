"""Bad input never reaches the queue: a clear error from the client and from the CLI, and an empty queue;
both straight to Redis and through the gateway (issue 19, acceptance 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway.tokens import TokenBook
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared import keys
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import MAX_PROMPT_CHARS
from tests.conftest import client_env, queue_length
from tests.gateway_process import Gateway, running_gateway
from tests.host_settings import HostSettings

# (what is wrong, the job, CLI options that say the same, the field the error must name)
BAD_JOBS = [
    ("width below 256", {"prompt": "p", "width": 128}, ["--width", "128"], "width"),
    ("width above 2048", {"prompt": "p", "width": 2064}, ["--width", "2064"], "width"),
    ("height not a multiple of 16", {"prompt": "p", "height": 1000}, ["--height", "1000"], "height"),
    ("zero steps", {"prompt": "p", "steps": 0}, ["--steps", "0"], "steps"),
    ("too many steps", {"prompt": "p", "steps": 101}, ["--steps", "101"], "steps"),
    ("negative seed", {"prompt": "p", "seed": -1}, ["--seed", "-1"], "seed"),
    ("seed past 2^32-1", {"prompt": "p", "seed": 2**32}, ["--seed", str(2**32)], "seed"),
    ("prompt too long", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, [], "prompt"),
    ("dataset escaping its folder", {"prompt": "p", "dataset": "../etc"}, ["--dataset", "../etc"], "dataset"),
]


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("bad-input-gateway")
    settings = HostSettings(broker_url=redis_server.url, storage_url=f"file://{work / 'out'}", cache_dir=work / "cache")
    with running_gateway(settings, work / "gateway.log") as gateway:
        yield gateway


@pytest.fixture(params=["redis", "http"])
def client_settings(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path, redis_client: redis.Redis
) -> ProducerSettings:
    """Straight to Redis and storage, or through the gateway with a token that may touch every dataset."""
    redis_client.flushdb()
    if request.param == "redis":
        return ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}")
    gateway: Gateway = request.getfixturevalue("gateway")
    token = TokenBook(redis_client).create("tests", {"datasets": ["*"]})
    return ProducerSettings(api_url=gateway.url, api_token=token, broker_url="redis://unreachable.invalid:1/0")


def _untouched(client: redis.Redis) -> bool:
    """Nothing at all was written to Redis (the gateway's token aside)."""
    return set(client.keys()) <= {keys.TOKENS.encode(), keys.TOKEN_NAMES.encode()}


def _cli(args: list[str], settings: ProducerSettings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxfarm", "submit", *args],
        env={**os.environ, **client_env(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("case", "job", "options", "field"), BAD_JOBS, ids=[case[0] for case in BAD_JOBS])
def test_client_refuses_bad_job(
    case: str, job: dict, options: list[str], field: str, client_settings: ProducerSettings, redis_client: redis.Redis
) -> None:
    with FarmClient(client_settings) as client, pytest.raises(InvalidJob, match=field):
        client.submit(job)
    assert queue_length(redis_client) == 0
    assert _untouched(redis_client), "nothing at all was written to Redis"


def test_client_refuses_unknown_field(client_settings: ProducerSettings, redis_client: redis.Redis) -> None:
    with FarmClient(client_settings) as client, pytest.raises(InvalidJob, match="negative_prompt: unknown field"):
        client.submit({"prompt": "p", "negative_prompt": "blurry"})
    assert _untouched(redis_client)


def test_one_bad_job_in_a_batch_enqueues_none(client_settings: ProducerSettings, redis_client: redis.Redis) -> None:
    jobs = [{"prompt": "fine"}, {"prompt": "also fine", "seed": 3}, {"prompt": "bad", "steps": 500}]
    with FarmClient(client_settings) as client, pytest.raises(InvalidJob, match="job 2: steps"):
        client.submit_many(jobs)
    assert _untouched(redis_client)


@pytest.mark.parametrize(
    ("case", "job", "options", "field"),
    [case for case in BAD_JOBS if case[2]],
    ids=[case[0] for case in BAD_JOBS if case[2]],
)
def test_cli_refuses_bad_options(
    case: str, job: dict, options: list[str], field: str, client_settings: ProducerSettings, redis_client: redis.Redis
) -> None:
    done = _cli(["--prompt", "p", *options], client_settings)
    assert done.returncode == 2, done.stderr
    assert f"invalid job: {field}" in done.stderr
    assert "Traceback" not in done.stderr
    assert _untouched(redis_client)


def test_cli_reports_bad_rows_of_a_file_by_line_and_enqueues_nothing(
    tmp_path: Path, client_settings: ProducerSettings, redis_client: redis.Redis
) -> None:
    rows = [
        {"prompt": "a fine row"},
        {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        {"prompt": "unknown field", "sampler": "euler"},
        {"prompt": "fine again", "seed": 4},
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    done = _cli([str(path)], client_settings)
    assert done.returncode == 2
    assert f"{path}:2" in done.stderr and "prompt" in done.stderr
    assert f"{path}:3" in done.stderr and "sampler: unknown field" in done.stderr
    assert f"{path}:5" in done.stderr and "not valid JSON" in done.stderr
    assert f"{path}:1" not in done.stderr and f"{path}:4" not in done.stderr
    assert "3 invalid rows" in done.stderr
    assert _untouched(redis_client)


def test_cli_refuses_a_too_long_prompt(client_settings: ProducerSettings, redis_client: redis.Redis) -> None:
    done = _cli(["--prompt", "x" * (MAX_PROMPT_CHARS + 1)], client_settings)
    assert done.returncode == 2
    assert f"prompt: String should have at most {MAX_PROMPT_CHARS} characters" in done.stderr
    assert _untouched(redis_client)
