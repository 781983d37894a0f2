"""A real worker on the GPU serves its metrics: VRAM peak and card size (samples a CPU worker does not
have), the heartbeat's GPU facts in `fluxfarm status --json`, and the exporter's fleet view.

Tiny model (GGUF Q8_0), a private redis-server, local storage; prints the families as JSON lines.
    python3 tests/gpu/metrics_check.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess, free_port
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model
from tests.host_settings import HostSettings

SHOWN = ("fluxfarm_vram_peak_bytes", "fluxfarm_vram_total_bytes", "fluxfarm_worker_info", "fluxfarm_jobs")


def scrape(port: int) -> dict[str, list[dict[str, object]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fluxfarm-metrics-"))
    model = write_tiny_model(work / "tiny-flux", (QuantLevel.Q8_0,))
    with RedisServer(work / "redis") as redis_server:
        settings = HostSettings(broker_url=redis_server.url, storage_url=f"file://{work / 'out'}")
        metrics_port, exporter_port = free_port(), free_port()
        env = {
            "FLUXFARM_BROKER_URL": settings.broker_url,
            "FLUXFARM_STORAGE_URL": settings.storage_url,
            "FLUXFARM_CACHE_DIR": str(work / "cache"),
            "FLUXFARM_METRICS_PORT": str(metrics_port),
            "FLUXFARM_WORKER_NAME": "gpu-metrics",
            "FLUXFARM_COMPILE": "false",
            "FLUXFARM_CUDA_GRAPHS": "false",
        }
        args = ["--model", str(model), "--transformer", str(gguf_path(model, QuantLevel.Q8_0)), "--device", "cuda:0"]
        worker = WorkerProcess(args, env, work / "worker.log").start()
        worker.wait_ready(300)
        exporter = subprocess.Popen(
            [sys.executable, "-m", "fluxfarm", "exporter", "--port", str(exporter_port)],
            env={**os.environ, **env},
        )
        try:
            with FarmClient(settings) as client:
                jobs = [{"prompt": f"a heron {i}", "width": 512, "height": 512, "steps": 4} for i in range(4)]
                for handle in list(client.submit_many(jobs)):
                    handle.result(timeout=300)
            families = scrape(metrics_port)
            for name in SHOWN:
                print(json.dumps({"family": name, "samples": families.get(name)}))
            status = subprocess.run(
                [sys.executable, "-m", "fluxfarm", "status", "--json"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            (facts,) = json.loads(status.stdout)["fleet"]["workers"]
            keys = ("node", "gpu_name", "vram_gib", "compute_capability", "vram_peak_gib", "torch_version")
            keys += ("metrics_url",)
            print(json.dumps({"heartbeat": {key: facts[key] for key in keys}}))
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", exporter_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            fleet = scrape(exporter_port)
            print(json.dumps({"exporter": {k: fleet[k] for k in ("fluxfarm_fleet_worker_vram_peak_bytes",)}}))
        finally:
            exporter.terminate()
            worker.stop()


if __name__ == "__main__":
    main()
