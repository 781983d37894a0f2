"""Fair share through the gateway (issue 19, acceptance 5), on this machine: a private redis-server, a local
storage folder, `fluxfarm gateway` and tiny-model CPU workers as processes.

Tenant A (token `alice`) uploads 5,000 jobs; once the fleet renders them steadily, tenant B (token `bob`)
posts 10. The figure: how long after B's post B's last image is stored, against the bound the issue sets,
2 x (B's jobs / fleet rate) + one batch, with the fleet rate measured over the same window (every image
stored in it, A's and B's). Then A's dataset is cancelled.

    .venv/bin/python -m tests.measure_fair_share [--a-jobs 5000] [--b-jobs 10] [--workers 2]

Prints one JSON line; docs/benchmarks.md keeps it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx

from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.shared.ladder import QuantLevel
from tests.conftest import WORKER_READY_TIMEOUT_S, farm_env
from tests.gateway_process import running_gateway
from tests.host_settings import HostSettings

JOB = {"width": 256, "height": 256, "steps": 2}
WARM_S = 15.0
"""A's jobs render this long before B posts: the workers have taken up A's queue and run steadily."""


def _done(http: httpx.Client, dataset: str) -> int:
    record = http.get(f"/v1/datasets/{dataset}")
    assert record.status_code == 200, record.text
    return int(record.json()["done"])


def measure(work: Path, a_jobs: int, b_jobs: int, workers: int, max_batch: int) -> dict[str, float | int]:
    from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model

    model = write_tiny_model(work / "tiny-flux", [QuantLevel.Q8_0])
    with RedisServer(work / "redis") as server:
        settings = HostSettings(broker_url=server.url, storage_url=f"file://{work / 'out'}", cache_dir=work / "cache")
        fleet = []
        for index in range(workers):
            args = ["--model", str(model), "--transformer", str(gguf_path(model, QuantLevel.Q8_0)), "--device", "cpu"]
            env = {**farm_env(settings), "FLUXFARM_WORKER_NAME": f"w{index}", "FLUXFARM_MAX_BATCH": str(max_batch)}
            fleet.append(WorkerProcess(args, env, work / f"worker-{index}.log").start())
        try:
            for worker in fleet:
                worker.wait_ready(WORKER_READY_TIMEOUT_S)
            with running_gateway(settings, work / "gateway.log") as gateway:
                alice = gateway.client(gateway.token("alice", "--datasets", "alice-*"))
                bob = gateway.client(gateway.token("bob", "--datasets", "bob-*"))
                rows = "".join(json.dumps({"prompt": f"a moth {i}", "seed": i, **JOB}) + "\n" for i in range(a_jobs))
                sent = alice.post("/v1/datasets/alice-moths/files", params={"format": "jsonl"}, content=rows.encode())
                assert sent.status_code == 200 and sent.json()["enqueued"] == a_jobs, sent.text
                time.sleep(WARM_S)
                a_before = _done(alice, "alice-moths")
                jobs = [{"prompt": f"a heron {i}", "seed": i, "dataset": "bob-herons", **JOB} for i in range(b_jobs)]
                start = time.monotonic()
                posted = bob.post("/v1/jobs", json=jobs)
                assert posted.status_code == 202 and posted.json()["enqueued"] == b_jobs, posted.text
                while _done(bob, "bob-herons") < b_jobs:
                    assert time.monotonic() - start < 600, "B's jobs did not finish in 10 minutes"
                    time.sleep(0.05)
                b_last_s = time.monotonic() - start
                a_during = _done(alice, "alice-moths") - a_before
                a_left = a_jobs - _done(alice, "alice-moths")
                alice.post("/v1/datasets/alice-moths/cancel")
        finally:
            for worker in fleet:
                worker.stop()
    rate = (a_during + b_jobs) / b_last_s
    batch_s = max_batch / (rate / workers)
    bound_s = 2 * b_jobs / rate + batch_s
    return {
        "workers": workers,
        "max_batch": max_batch,
        "a_jobs": a_jobs,
        "b_jobs": b_jobs,
        "b_last_s": round(b_last_s, 2),
        "fleet_images_per_s": round(rate, 2),
        "one_batch_s": round(batch_s, 2),
        "bound_s": round(bound_s, 2),
        "a_images_while_b_waited": a_during,
        "a_jobs_still_queued": a_left,
        "without_tenant_queues_b_waits_behind": a_left + a_during,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a-jobs", type=int, default=5000)
    parser.add_argument("--b-jobs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fluxfarm-fair-share-") as work:
        figure = measure(Path(work), args.a_jobs, args.b_jobs, args.workers, args.max_batch)
    print(json.dumps({"figure": "fair_share", **figure}), flush=True)


if __name__ == "__main__":
    main()
