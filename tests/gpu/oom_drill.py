"""Real CUDA out-of-memory on the device, through the worker's own batcher and step-down (no injection).

Full-size random-weight FLUX.1-dev at Q8_0 (11.98 GiB resident) under a 14 GiB budget: eight
1024² jobs handed in together do not fit as one batch, so the engine splits them; a 2048² job does
not fit at Q8_0 even alone, so the worker unloads Q8_0 and reloads Q4_0 (what a worker that picked
its own level does) and renders it; with step-down off, the same job fails with
torch.OutOfMemoryError and the worker goes on. Prints one JSON line per event.
    python3 tests/gpu/oom_drill.py [budget_gib] [steps]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import torch

from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.worker.model.gpu import memory_cap
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights, ready_pipeline
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.serve.level_step_down import LevelStepDown
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.bench_parts import build_parts

GIB = 1024**3
DEVICE = "cuda:0"


def report(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 14.0
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    parts = build_parts("flux.1-dev", DEVICE, Path(tempfile.mkdtemp()))
    for level in (QuantLevel.Q8_0, QuantLevel.Q4_0):
        parts.state(level, DEVICE)  # quantized up front (on the GPU), kept on the host like a file
    settings = WorkerSettings(compile=False, cuda_graphs=False)

    def load(level: QuantLevel) -> RenderEngine:
        start = time.perf_counter()
        pipe = parts.pipeline(parts.transformer(level, DEVICE))
        paths = ready_pipeline(pipe, DEVICE, "gpu-swap", True, settings)
        info = ModelInfo(id="random-flux.1-dev", transformer=level.value, transformer_sha256="0" * 64)
        model = LoadedModel(
            pipe=pipe,
            weights=LoadedWeights.known(info),
            level=level,
            device=DEVICE,
            text_encoders="gpu-swap",
            fast_paths=paths,
        )
        allocated = round(torch.cuda.memory_allocated() / GIB, 2)
        report("loaded", level=level.value, seconds=round(time.perf_counter() - start, 1), allocated_gib=allocated)
        return RenderEngine(model, max_batch=8, embedding_cache=16)

    def stranded(reason: str) -> NoReturn:
        report("stranded", reason=reason)
        raise SystemExit(1)

    def job(prompt: str, size: int) -> RenderJob:
        return parse_job({"prompt": prompt, "width": size, "height": size, "steps": steps, "seed": 1})

    def render_together(batcher: RenderBatcher, jobs: list[RenderJob]) -> list[dict[str, object]]:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(batcher.render, j) for j in jobs]
            out = []
            for future in futures:
                try:
                    image = future.result()
                    out.append({"ok": True, "level": image.model.level, "batch": image.batch_size})
                except Exception as error:  # the worker's task would report this reason
                    out.append({"ok": False, "error": f"{type(error).__name__}: {str(error)[:160]}"})
            return out

    with memory_cap(DEVICE, budget):
        report("budget", gib=budget, card_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1))
        for step_down in (False, True):
            torch.cuda.reset_peak_memory_stats()
            engine = load(QuantLevel.Q8_0)
            levels = [QuantLevel.Q8_0, QuantLevel.Q4_0]
            stepper = LevelStepDown(levels, load, lambda level: report("switch", to=level.value), stranded)
            batcher = RenderBatcher(engine, 8, 0.5, stepper.step_down if step_down else None)
            eight = render_together(batcher, [job(f"a harbour {i}", 1024) for i in range(8)])
            report("eight 1024 jobs", step_down=step_down, results=eight, max_batch_after=batcher.engine.max_batch)
            big = render_together(batcher, [job("a wide valley", 2048)])
            report("one 2048 job", step_down=step_down, results=big, level_after=batcher.engine.model.level)
            after = render_together(batcher, [job("a small pond", 1024)])
            peak = round(torch.cuda.max_memory_allocated() / GIB, 2)
            report("then a 1024 job", step_down=step_down, results=after, peak_gib=peak)
            batcher.close()
            batcher.engine.unload()
            del batcher, engine, stepper
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
