"""The worker runtime starts its duties in the stated order and stops them in reverse (issue 31,
point 3): a real runtime on the tiny model and a real Redis, and the order rule itself."""

from __future__ import annotations

from pathlib import Path

import redis
from celery import Celery

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.fleet import fleet_report
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.local_store import LocalStore
from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.serve.runtime import Duties, WorkerRuntime
from fluxfarm.worker.settings import WorkerSettings


class Recorded:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self._log = log

    def start(self) -> None:
        self._log.append(f"start {self.name}")

    def stop(self) -> None:
        self._log.append(f"stop {self.name}")


def test_duties_start_in_order_and_only_those_started_stop_in_reverse() -> None:
    log: list[str] = []
    duties = Duties(*(Recorded(name, log) for name in ("beat", "lease", "sweep", "adopt")))
    duties.start("beat", "lease", "sweep")
    duties.start("beat")  # already running: not started twice
    duties.stop()
    assert log == ["start beat", "start lease", "start sweep", "stop sweep", "stop lease", "stop beat"]
    log.clear()
    duties.start()
    duties.stop()
    assert log == [f"start {n}" for n in ("beat", "lease", "sweep", "adopt")] + [
        f"stop {n}" for n in ("adopt", "sweep", "lease", "beat")
    ]


def test_a_worker_runtime_joins_the_fleet_first_and_leaves_it_last(
    tiny_model: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    settings = WorkerSettings(
        broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}", cache_dir=tmp_path / "cache"
    )
    transformer = str(gguf_path(tiny_model, QuantLevel.Q8_0))
    worker = WorkerInfo(node="w-runtime", hostname="here", device="cpu", gpu_name=None, vram_gib=None)
    loader = EngineLoader(settings, str(tiny_model), transformer, "cpu", worker, WorkerMetrics())
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()  # heartbeats other tests' workers left (they live HEARTBEAT_TTL_S)
    runtime = WorkerRuntime(
        Celery("runtime-test"), client, LocalStore(tmp_path / "out"), loader, worker, WorkerMetrics(), None, exit
    )
    names = runtime.duties.names
    assert names == ["fluxfarm-heartbeat", "fluxfarm-leases", "fluxfarm-lost-jobs", "fluxfarm-retries",
                     "fluxfarm-tenant-queues", "fluxfarm-lora-queues"]  # fmt: skip
    runtime.start()
    try:
        assert [w.node for w in fleet_report(client).workers] == ["w-runtime"], "in the fleet once started"
        assert runtime.duties.running == names[:4], "adoption waits for Celery's consumer"
    finally:
        runtime.stop()
    assert [w.node for w in fleet_report(client).workers] == [], "gone from the fleet once stopped"
    assert runtime.duties.running == []
