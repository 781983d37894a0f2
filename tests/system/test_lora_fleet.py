"""A fleet and LoRA sets: jobs of two sets, interleaved, reach two real worker processes through their
sets' queues (shared/routing.py, worker/serve/queue_adoption.py). Its own module: no other worker may share
the Redis while the switches are counted."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fluxfarm.producer.client import FarmClient
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.adapter_files import write_peft_lora
from tests.conftest import S3Server, fresh_farm_settings, start_worker

pytestmark = pytest.mark.slow

RESULT_TIMEOUT_S = 300
JOB = {"prompt": "a harbour at night", "width": 256, "height": 256, "steps": 2}


def test_a_fleet_keeps_each_lora_set_on_the_worker_that_fused_it(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server, s3_server: S3Server
) -> None:
    """Two LoRA sets, their jobs interleaved, two workers: each set's queue is adopted by one worker,
    which renders it alone, so the fleet fuses about once per set instead of at almost every job."""
    work = tmp_path_factory.mktemp("lora-fleet")
    lora = write_peft_lora(tiny_model, work / "style")
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/renders", work)
    env = {"FLUXFARM_JOB_FILE_ROOTS": str(work), "FLUXFARM_MAX_BATCH": "1"}  # holds 2 jobs: sets would alternate
    transformer = gguf_path(tiny_model, QuantLevel.Q8_0)
    workers = {
        name: start_worker(settings, tiny_model, transformer, work / f"{name}.log", name, env)
        for name in ("w-sticky-1", "w-sticky-2")
    }
    try:
        # Sets in a period of 3: workers taking jobs in turns, one or two at a time, would get both sets.
        weights = [(0.8, 0.5, 0.5)[seed % 3] for seed in range(12)]
        jobs = [{**JOB, "seed": seed, "loras": [{"source": str(lora), "weight": w}]} for seed, w in enumerate(weights)]
        with FarmClient(settings) as client:
            results = [handle.result(RESULT_TIMEOUT_S) for handle in client.submit_many(jobs)]
    finally:
        for worker in workers.values():
            worker.stop()
    sets = {result.job.lora_set for result in results}
    assert len(sets) == 2
    by_worker: dict[str, list[str | None]] = {}
    for result in sorted(results, key=lambda r: r.timings.started_at):
        by_worker.setdefault(result.worker.node, []).append(result.job.lora_set)
    switches = {node: sum(a != b for a, b in itertools.pairwise(seq)) for node, seq in by_worker.items()}
    fuses = {name: worker.log_text().count("LoRA set ") for name, worker in workers.items()}
    # A worker that runs out of its own set's jobs may help with the other set: one switch, once.
    assert all(count <= 1 for count in switches.values()), by_worker
    assert sum(fuses.values()) <= 3, fuses
