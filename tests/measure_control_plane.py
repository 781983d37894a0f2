"""What a queued job costs the control plane: Redis bytes per job (a plain job, and a ControlNet job with
a 1 MiB inline control image), and the lost-job sweep's peak memory and time with 20,000 jobs waiting.

    .venv/bin/python -m tests.measure_control_plane [--jobs 200] [--waiting 20000]

Runs on a private redis-server and a local storage folder (nothing else is touched) through the real
client (`FarmClient.submit_stream`) and the real sweep (`LostJobSweeper.message_ids`). Prints one JSON
line per figure; docs/benchmarks.md keeps the figures (issue 18, finding 2).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.worker.serve.lost_jobs import LostJobSweeper
from tests.host_settings import HostSettings

INLINE_SIDE_PX = 580
"""A 580x580 random-pixel PNG is just under 1 MiB: the largest inline image a job may carry."""


def _noise_png_url(side: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def bytes_per_job(client: redis.Redis, farm: FarmClient, jobs: list[dict], dataset: str) -> float:
    before = _used_memory(client)
    farm.submit_stream({**job, "dataset": dataset} for job in jobs)
    return (_used_memory(client) - before) / len(jobs)


def sweep_peak(client: redis.Redis, farm: FarmClient, waiting: int) -> tuple[float, float, int]:
    """Peak Python memory (MiB) and seconds of one sweep's scan with `waiting` jobs queued."""
    client.flushdb()
    farm.submit_stream({"prompt": f"a study of light on water, plate {i}", "dataset": "sweep"} for i in range(waiting))
    sweeper = LostJobSweeper(client, farm.datasets, lambda sent: None, grace_s=60, interval_s=60)
    tracemalloc.start()
    start = time.perf_counter()
    ids = sweeper.message_ids()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20, seconds, len(ids or ())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--waiting", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fluxfarm-measure-") as work:
        server = RedisServer(Path(work) / "redis").start()
        try:
            client = redis.Redis.from_url(server.url)
            settings = HostSettings(broker_url=server.url, storage_url=f"file://{work}/out", cache_dir=Path(work))
            with FarmClient(settings) as farm:
                plain = [{"prompt": f"a lighthouse at dusk, plate {i}", "seed": i} for i in range(args.jobs)]
                image = _noise_png_url(INLINE_SIDE_PX)
                controlnet = [
                    {
                        "prompt": f"a harbour at night, plate {i}",
                        "seed": i,
                        "controlnet": {"source": "hf://owner/canny", "control_image": image},
                    }
                    for i in range(args.jobs)
                ]
                bytes_per_job(client, farm, plain[:10], "warm-up")  # the queues and the dataset index exist
                rows = {
                    "plain job": bytes_per_job(client, farm, plain, "plain"),
                    "ControlNet job, 1 MiB inline image": bytes_per_job(client, farm, controlnet, "controlnet"),
                }
                for what, size in rows.items():
                    print(json.dumps({"figure": "Redis bytes per queued job", "job": what, "bytes": round(size)}))
                peak, seconds, ids = sweep_peak(client, farm, args.waiting)
                print(
                    json.dumps(
                        {
                            "figure": "lost-job sweep scan",
                            "waiting_jobs": args.waiting,
                            "ids_read": ids,
                            "peak_python_mib": round(peak, 1),
                            "seconds": round(seconds, 2),
                        }
                    )
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
