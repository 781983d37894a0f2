"""`fluxfarm bench-fleet`: what the farm itself costs per job, with render-free workers (issue 21, point 5).

A private redis-server, a local store, N `fluxfarm worker` processes with FLUXFARM_RENDER_FREE (each
claims, leases, stores an 8x8 placeholder and records every job as a real worker does, but loads no
model), and M jobs sent as a dataset stream. Measured:
- Redis bytes per queued job: `used_memory` after the jobs are sent to a farm with no worker, over M;
- jobs/s: M over the time from the first job sent to the last recorded done, workers already up;
- Redis commands per job: `total_commands_processed` over that drain, over M (the sending, the workers'
  claims, leases, records and heartbeats, and their idle polling while it lasts: all of it but this tool's
  own poll for the end, counted and left out);
- worker CPU per job: the worker processes' user + system time over the drain (Linux /proc), over M;
- Redis CPU per job: the redis-server's own user + system time over the drain (INFO cpu), over M: one
  Redis core then serves about 1000 / that many jobs a second, whatever sends them;
- the idle fleet's cost: commands and Redis CPU a worker-second over IDLE_S after the drain (heartbeats,
  polling), which grows with the fleet's size and not with its work.
On one small machine the workers and Redis share the cores, so jobs/s is a floor for the control plane,
and what limits it is part of the result (docs/scale.md).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import redis
from pydantic import BaseModel

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared import keys
from fluxfarm.shared.datasets import JobState
from fluxfarm.shared.errors import FarmError

DATASET = "bench-fleet"
_READY_TIMEOUT_S = 120.0
IDLE_S = 10.0
"""How long the idle fleet is watched after the drain."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class FleetBenchResult(BaseModel):
    workers: int
    jobs: int
    jobs_per_s: float
    drain_s: float
    redis_commands_per_job: float
    redis_bytes_per_queued_job: float
    worker_cpu_ms_per_job: float
    redis_cpu_ms_per_job: float
    """The redis-server's own CPU over the drain (INFO cpu), a job: what bounds the jobs/s one Redis serves."""
    idle_commands_per_worker_s: float
    """Commands an idle worker costs a second (heartbeats, polling for work, the sweep, queue follow-ups)."""
    idle_commands_per_worker_s_by_name: dict[str, float]
    idle_redis_cpu_ms_per_worker_s: float
    jobs_failed: int
    cores: int | None
    commands_per_job_by_name: dict[str, float]
    """The drain's commands a job, by command, most first (INFO commandstats)."""


def _cpu_s(pid: int) -> float:
    """User + system seconds of a process so far (Linux /proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def redis_cpu_s(broker: redis.Redis) -> float:
    cpu = broker.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _idle(broker: redis.Redis, seconds: float) -> tuple[dict[str, int], float]:
    """Commands (by name) and Redis CPU seconds of the fleet with nothing to do, over `seconds`."""
    calls, cpu = _command_calls(broker), redis_cpu_s(broker)
    time.sleep(seconds)
    after = _command_calls(broker)
    return {name: n - calls.get(name, 0) for name, n in after.items()}, redis_cpu_s(broker) - cpu


_POLL_COMMANDS = 2


def _finished(broker: redis.Redis) -> tuple[int, int]:
    """The bench dataset's done and failed counts: this tool's poll, two SCARDs (`_POLL_COMMANDS`), left out
    of the farm's commands (a reader of the whole record, `fluxfarm status`'s, would count ~0.5 a job)."""
    with broker.pipeline(transaction=False) as pipe:
        pipe.scard(keys.dataset(DATASET, JobState.DONE))
        pipe.scard(keys.dataset(DATASET, JobState.FAILED))
        done, failed = pipe.execute()
    return int(done), int(failed)


def wait_drained(broker: redis.Redis, jobs: int, begin: float, timeout_s: float) -> tuple[int, int]:
    """Poll until the bench dataset's `jobs` are all done or failed (FarmError after `timeout_s` from `begin`,
    a `time.perf_counter()`); returns (polls made, jobs failed)."""
    polls, (done, failed) = 1, _finished(broker)
    while done + failed < jobs:
        if time.perf_counter() - begin > timeout_s:
            raise FarmError(f"bench-fleet: {done} of {jobs} jobs done after {timeout_s:.0f}s")
        time.sleep(0.05)
        polls, (done, failed) = polls + 1, _finished(broker)
    return polls, failed


def _per(calls: dict[str, int], divisor: float) -> dict[str, float]:
    """Calls by name over `divisor`, most first, without this tool's own INFO."""
    ranked = sorted(((name, n) for name, n in calls.items() if n and name != "info"), key=lambda item: -item[1])
    return {name: round(n / divisor, 2) for name, n in ranked}


def _command_calls(broker: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in broker.info("commandstats").items()}


def bench_jobs(count: int, offset: int = 0) -> list[dict[str, object]]:
    return [
        {"prompt": f"a lighthouse at dawn, study {offset + i}", "seed": i, "dataset": DATASET, "steps": 1}
        for i in range(count)
    ]


def bench_settings(url: str, store: Path) -> ProducerSettings:
    """A producer of a private bench farm: its Redis at `url`, a local store, no gateway."""
    return ProducerSettings(broker_url=url, result_backend_url=url, storage_url=f"file://{store}", api_url=None)


def _queued_bytes(folder: Path, jobs: int) -> float:
    """Bytes of Redis memory a queued job holds, on a farm with no worker."""
    with RedisServer(folder / "redis-queued") as server:
        broker = redis.Redis.from_url(server.url)
        before = int(broker.info("memory")["used_memory"])
        with FarmClient(bench_settings(server.url, folder / "store-queued")) as farm:
            farm.submit_stream(bench_jobs(jobs))
        after = int(broker.info("memory")["used_memory"])
        broker.close()
    return (after - before) / jobs


def start_workers(count: int, url: str, store: Path, folder: Path) -> list[WorkerProcess]:
    env = {
        "FLUXFARM_BROKER_URL": url,
        "FLUXFARM_RESULT_BACKEND_URL": url,
        "FLUXFARM_STORAGE_URL": f"file://{store}",
        "FLUXFARM_RENDER_FREE": "true",
        "FLUXFARM_MODEL": "flux.1-dev",
        "FLUXFARM_METRICS_PORT": "0",
        "FLUXFARM_API_URL": "",
    }
    workers = [
        WorkerProcess([], {**env, "FLUXFARM_WORKER_NAME": f"bench-{i}"}, folder / f"worker-{i}.log").start()
        for i in range(count)
    ]
    for worker in workers:
        worker.wait_ready(_READY_TIMEOUT_S)
    return workers


def run_fleet_bench(workers: int, jobs: int, timeout_s: float = 3600.0) -> FleetBenchResult:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bytes_per_job = _queued_bytes(folder, jobs)
        with RedisServer(folder / "redis") as server:
            store = folder / "store"
            started = start_workers(workers, server.url, store, folder)
            try:
                broker = redis.Redis.from_url(server.url)
                pids = [worker.process.pid for worker in started if worker.process is not None]
                commands = int(broker.info("stats")["total_commands_processed"])
                calls = _command_calls(broker)
                cpu, redis_cpu = sum(_cpu_s(pid) for pid in pids), redis_cpu_s(broker)
                begin = time.perf_counter()
                with FarmClient(bench_settings(server.url, store)) as farm:
                    farm.submit_stream(bench_jobs(jobs))
                polls, failed = wait_drained(broker, jobs, begin, timeout_s)
                drain = time.perf_counter() - begin
                own = _POLL_COMMANDS * polls
                commands = int(broker.info("stats")["total_commands_processed"]) - commands - own
                calls = {name: n - calls.get(name, 0) for name, n in _command_calls(broker).items()}
                calls["scard"] -= own
                cpu, redis_cpu = sum(_cpu_s(pid) for pid in pids) - cpu, redis_cpu_s(broker) - redis_cpu
                idle_calls, idle_cpu = _idle(broker, IDLE_S)
                broker.close()
            finally:
                for worker in started:
                    worker.stop()
    return FleetBenchResult(
        workers=workers,
        jobs=jobs,
        jobs_per_s=jobs / drain,
        drain_s=drain,
        redis_commands_per_job=commands / jobs,
        redis_bytes_per_queued_job=bytes_per_job,
        worker_cpu_ms_per_job=cpu / jobs * 1000,
        redis_cpu_ms_per_job=redis_cpu / jobs * 1000,
        idle_commands_per_worker_s=sum(_per(idle_calls, workers * IDLE_S).values()),
        idle_commands_per_worker_s_by_name=_per(idle_calls, workers * IDLE_S),
        idle_redis_cpu_ms_per_worker_s=idle_cpu / workers / IDLE_S * 1000,
        jobs_failed=failed,
        cores=os.cpu_count(),
        commands_per_job_by_name=_per(calls, jobs),
    )
