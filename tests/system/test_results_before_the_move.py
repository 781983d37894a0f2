"""Results a farm stored before the `fluxfarm` namespace move are still what the farm reads: the same
storage layout, metadata schema and job ids. The fixture was rendered by the code of commit 83c1ac4
(the last one with top-level `shared`/`producer`/`worker`): two tiny-model jobs through its client,
Redis and a worker process, into a local store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fluxfarm import FarmClient, RenderJob, RenderResult
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from tests.conftest import run_fluxfarm

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results-0.1.0"


def _stored(root: Path) -> list[RenderResult]:
    return [RenderResult.model_validate_json(path.read_text()) for path in sorted(root.glob("compat/*.json"))]


def test_old_metadata_reads_and_its_job_ids_are_computed_alike() -> None:
    results = _stored(FIXTURE)
    assert len(results) == 2
    for result in results:
        fields = result.job.model_dump(exclude={"job_id"})
        assert RenderJob(**fields).job_id == result.job_id  # the same job hashes to the same key
        assert result.image.key == f"compat/{result.job_id}.png"
        assert result.metadata_key == f"compat/{result.job_id}.json"
        assert (FIXTURE / result.image.key).stat().st_size == result.image.bytes


def test_resubmitting_an_old_job_returns_its_stored_result(tmp_path: Path, redis_server: RedisServer) -> None:
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store)
    settings = ProducerSettings(broker_url=redis_server.url, storage_url=f"file://{store}")
    with FarmClient(settings) as client:
        for old in _stored(store):
            handle = client.submit(old.job.model_dump(exclude={"job_id"}))
            assert handle.cached, "an old result must count as done, not be rendered again"
            assert handle.result(timeout=5).image.sha256 == old.image.sha256


def test_the_command_line_exports_old_results(tmp_path: Path, redis_server: RedisServer) -> None:
    store = tmp_path / "store"
    shutil.copytree(FIXTURE, store)
    env = {"FLUXFARM_BROKER_URL": redis_server.url, "FLUXFARM_STORAGE_URL": f"file://{store}"}
    out = tmp_path / "export"
    done = run_fluxfarm("export", "--dataset", "compat", "--format", "jsonl", "--out", str(out), env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    exported = [json.loads(line) for path in out.rglob("*.jsonl") for line in path.read_text().splitlines()]
    assert sorted(doc["job_id"] for doc in exported) == sorted(r.job_id for r in _stored(store))
