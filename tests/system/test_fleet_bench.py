"""`fluxfarm bench-fleet` (issue 21, point 5): render-free workers drain a dataset through the real queue,
Redis and a store, and the farm's own cost per job comes back as JSON."""

from __future__ import annotations

import json

from fluxfarm.producer.fleet_replay import parse_monitor_line
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


def test_bench_fleet_replays_the_recorded_mix_as_new_jobs_on_a_fresh_redis() -> None:
    """Each round's jobs are new (renamed ids): the fresh Redis ends with every replayed job recorded done,
    and no command of the recording fails there."""
    done = run_fluxfarm(
        "bench-fleet", "--replay", "--workers", "1", "--jobs", "30", "--rounds", "3", "--clients", "2", "--json",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["jobs"], result["jobs_recorded_done"], result["replay_errors"]) == (90, 90, 0)
    assert result["commands_per_job"] > 8, "a job's claim, moves and acknowledgement were recorded"
    assert result["jobs_per_s"] > 0 and result["redis_cpu_ms_per_job"] > 0


def test_a_monitor_line_parses_back_to_the_bytes_sent() -> None:
    line = b'1733412345.123456 [0 127.0.0.1:5555] "HSET" "k" "a \\"q\\" \\\\ \\x00\\xff\\n"'
    assert parse_monitor_line(line) == (False, [b"HSET", b"k", b'a "q" \\ \x00\xff\n'])
    assert parse_monitor_line(b'1.0 [0 lua] "SMOVE" "a" "b" "m"') == (True, [b"SMOVE", b"a", b"b", b"m"])
