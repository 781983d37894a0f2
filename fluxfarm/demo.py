"""`fluxfarm demo`: the whole farm on one machine, started and stopped by one command.

A private redis-server, one worker subprocess, local storage (or FLUXFARM_STORAGE_URL), a handful of
prompts with a progress bar, then a clean shutdown.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.producer.progress import wait_with_progress
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.errors import FarmError
from fluxfarm.worker.settings import WorkerSettings

DEMO_PROMPTS = (
    "a red fox curled up in fresh snow at dawn, soft light",
    "an astronaut reading a paper map in a quiet forest",
    "a lighthouse on a cliff in a storm, oil painting",
    "a cozy cabin window at night with warm golden light",
    "a futuristic city bridge over a misty river, cinematic",
    "a watercolor owl on an ancient stone tower",
    "a small robot watering a garden of neon flowers",
    "a dragon made of paper flying over a desert",
)
_WORKER_READY_TIMEOUT_S = 600.0


def _demo_model(settings: WorkerSettings, out_dir: Path, err: Console) -> tuple[str, str | None, bool]:
    """(model, transformer, is_tiny): the configured FLUX model, else the tiny one, built once."""
    if settings.model:
        return settings.model, settings.transformer, False
    from fluxfarm.shared.ladder import QuantLevel
    from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model

    tiny_dir = out_dir / "tiny-model"
    level = QuantLevel.Q8_0
    if not gguf_path(tiny_dir, level).is_file():
        err.print(f"no FLUXFARM_MODEL set: building the offline tiny model (renders noise) in {tiny_dir}")
        write_tiny_model(tiny_dir, [level])
    return str(tiny_dir), str(gguf_path(tiny_dir, level)), True


def run_demo(jobs: int, out_dir: Path, out: Console, err: Console) -> None:
    if jobs < 1:
        raise FarmError("--jobs must be at least 1")
    out_dir = out_dir.resolve()
    base = WorkerSettings()
    storage_url = os.environ.get("FLUXFARM_STORAGE_URL") or f"file://{out_dir / 'output'}"
    model, transformer, tiny = _demo_model(base, out_dir, err)
    side, steps = (512, 8) if tiny else (1024, 28)
    with RedisServer(out_dir / "redis") as redis_server:
        env = {
            "FLUXFARM_BROKER_URL": redis_server.url,
            "FLUXFARM_RESULT_BACKEND_URL": redis_server.url,
            "FLUXFARM_STORAGE_URL": storage_url,
            "FLUXFARM_MODEL": model,
            "FLUXFARM_WORKER_NAME": "demo-worker@localhost",
            "FLUXFARM_LOG_LEVEL": "INFO",
        }
        if transformer:
            env["FLUXFARM_TRANSFORMER"] = transformer
        worker = WorkerProcess([], env, out_dir / "worker.log").start()
        try:
            with err.status("starting the worker and loading the model ..."):
                worker.wait_ready(_WORKER_READY_TIMEOUT_S)
            # The demo's own Redis and storage, never a gateway the environment may name.
            settings = ProducerSettings(
                broker_url=redis_server.url, result_backend_url=redis_server.url, storage_url=storage_url, api_url=None
            )
            prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(jobs)]
            requests = [
                {"prompt": p, "seed": i, "width": side, "height": side, "steps": steps, "dataset": "demo"}
                for i, p in enumerate(prompts)
            ]
            with FarmClient(settings) as client:
                batch = client.submit_many(requests)
                outcome = wait_with_progress(batch, err)
        finally:
            worker.stop()
    table = Table(title=f"{len(outcome.results)} images" + (" (tiny model: noise)" if tiny else ""))
    for column in ("seed", "prompt", "render s", "image key"):
        table.add_column(column, overflow="fold")
    for result in sorted(outcome.results, key=lambda r: r.job.seed):
        t = result.timings
        table.add_row(
            str(result.job.seed), result.job.prompt, f"{t.encode_s + t.denoise_s + t.decode_s:.2f}", result.image.key
        )
    out.print(table)
    out.print(f"images and metadata (<key>.png, <key>.json) under: {storage_url}", highlight=False)
    out.print(f"worker log: {worker.log_path}", highlight=False)
    if outcome.failures:
        raise FarmError(f"{len(outcome.failures)} jobs failed: {outcome.failures[0]}")
