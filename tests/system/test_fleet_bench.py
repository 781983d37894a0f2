"""`fluxfarm bench-fleet` (issue 21, point 5): render-free workers drain a dataset through the real queue,
Redis and a store, and the farm's own cost per job comes back as JSON."""

from __future__ import annotations

import json

from tests.conftest import run_fluxfarm


def test_bench_fleet_drains_a_dataset_on_render_free_workers_and_reports_its_cost() -> None:
    done = run_fluxfarm("bench-fleet", "--workers", "2", "--jobs", "60", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["workers"], result["jobs"], result["jobs_failed"]) == (2, 60, 0)
    assert result["jobs_per_s"] > 0 and result["worker_cpu_ms_per_job"] > 0
    assert result["redis_bytes_per_queued_job"] > 500, "a queued job's message and record take Redis memory"
    by_name = result["commands_per_job_by_name"]
    assert by_name["brpop"] >= 1, "every job was claimed from the queue"
    assert abs(sum(by_name.values()) - result["redis_commands_per_job"]) < 0.5
