"""Every image's reproducibility record (issue 22, point 2 and acceptance 3): a worker render fills every field,
and changing any one weight file changes the record, on the tiny model through the real job runner."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from safetensors.torch import load_file, save_file

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.metadata import RenderResult
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.model.reproduction import reproduction
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from tests.job_runner_harness import in_process_runner

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def _settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(broker_url="redis://127.0.0.1:1/0", storage_url="file:///unused", cache_dir=tmp_path / "c")


def _filled(value: object) -> bool:
    return value is not None and value != "" and value != {} and value != []


def test_a_worker_render_fills_every_field_of_the_record(
    tiny_model: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    loaded = load_model(str(tiny_model), None, "cpu", _settings(tmp_path))
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    farm = in_process_runner(
        RenderEngine(loaded, max_batch=2, embedding_cache=0), client, tmp_path / "out", "w-record", 2, 0.5
    )
    jobs = [parse_job({"prompt": f"a lighthouse {i}", "width": 256, "height": 256, "steps": 1}) for i in range(2)]
    farm.queue(*jobs)
    try:
        with ThreadPoolExecutor(2) as pool:  # two task threads: the batcher renders them as one batch
            results: list[RenderResult] = list(pool.map(farm.run, jobs))
    finally:
        farm.batcher.close()
    stored = [RenderResult.model_validate_json((tmp_path / "out" / r.metadata_key).read_bytes()) for r in results]
    records = [result.reproduction for result in stored]
    assert all(record is not None for record in records)
    for record in records:
        assert record is not None
        empty = [name for name, value in record if not _filled(value) and name not in ("gpu", "compute_capability")]
        assert not empty, empty  # on a CPU there is no GPU name or capability; everything else is there
        assert set(record.weights_sha256) == set(COMPONENTS)
        assert record.weights_sha256["transformer"] == stored[0].model.transformer_sha256
        assert record.level_source == "file" and record.text_encoder_precision == "bf16"
        assert record.scheduler["class"] == type(loaded.pipe.scheduler).__name__
        assert {"torch", "diffusers", "transformers", "triton", "cuda", "cudnn"} <= set(record.versions)
        assert {"compiled", "cuda_graphs", "attention", "fp8_fast_accumulation"} <= set(record.fast_paths)
    assert sorted((r.batch_size, r.batch_position) for r in records if r) == [(2, 0), (2, 1)]


@pytest.mark.parametrize("component", COMPONENTS)
def test_changing_one_weight_file_changes_only_its_digest(tiny_model: Path, tmp_path: Path, component: str) -> None:
    settings = _settings(tmp_path)
    before = reproduction(load_model(str(tiny_model), None, "cpu", settings), 1, 0).weights_sha256
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed, ignore=shutil.ignore_patterns("*.gguf"))
    weights = sorted((changed / component).glob("*.safetensors"))[0]
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    after = reproduction(load_model(str(changed), None, "cpu", settings), 1, 0).weights_sha256
    assert [part for part in COMPONENTS if before[part] != after[part]] == [component]
