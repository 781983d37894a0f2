"""`fluxfarm bench`: seconds, images/hour and peak VRAM of every way a worker can render, in one run.

Builds one model (FLUX.1 [dev] or [schnell], FLUX.2 [dev] or klein) with random weights (full size on a
GPU: the same bytes and FLOPs as trained weights; its tiny pipeline on a CPU, to check the tool itself)
and measures, against baselines taken in the same run:
- steps: one transformer forward at each level, size and batch, through diffusers' stock layers
  ("diffusers") and through the worker's fast paths ("fluxfarm");
- images: whole renders (encode, 28 steps, decode, PNG) through the worker's RenderEngine and
  batcher, PNGs encoded off the GPU thread as a worker does, for each VRAM
  budget (the plan picks the level, the budget is enforced with set_per_process_memory_fraction) and
  each forced level, beside plain diffusers bf16 and the family's documented low-VRAM recipe: for FLUX.1
  the seed recipe (GGUF Q8_0 + enable_model_cpu_offload), for FLUX.2 [dev] its makers' 24-32 GB one
  (bitsandbytes 4-bit transformer and text encoder + enable_model_cpu_offload, under the smallest budget's
  cap); each image is compared with the plain-bf16 image of the same job.
No image is judged: agreement with bf16 (PSNR, relative error) is all that is reported.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from fluxfarm.shared.adapters import LoraSpec
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.shared.models import FluxFamily, FluxModel
from fluxfarm.shared.units import GIB
from fluxfarm.worker.adapters.lora_fuser import LoraFuser
from fluxfarm.worker.fast.fast_paths import FastPaths, apply_fast_paths, compile_blocks
from fluxfarm.worker.fast.step_graphs import remove_step_graphs, step_graphs
from fluxfarm.worker.model.determinism import apply_determinism
from fluxfarm.worker.model.flux_arch import (
    meta_transformer,
)
from fluxfarm.worker.model.gpu import memory_cap, synchronize, time_calls
from fluxfarm.worker.model.host_memory import process_host_memory
from fluxfarm.worker.model.host_mirror import release_pinned_cache
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights, place_pipeline, ready_pipeline
from fluxfarm.worker.model.plan import PlanInputs, make_plan
from fluxfarm.worker.quant.fp8.card import FP8_MIN_COMPUTE_CAPABILITY
from fluxfarm.worker.render.batcher import RenderBatcher, held_jobs
from fluxfarm.worker.render.engine import RenderedImage, RenderEngine, encode_png
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.bench_parts import FluxParts, build_parts, plain_diffusers_image
from fluxfarm.worker.tools.bench_rows import (
    DIFFUSERS_BF16,
    FOUR_BIT_RECIPE,
    SEED_RECIPE,
    STEP_BASELINES,
    TORCHAO_FP8_STEPS,
    BenchOptions,
    ImageRow,
    LoraFuseRow,
    StepRow,
)
from fluxfarm.worker.tools.image_agreement import agreement, pixels
from fluxfarm.worker.tools.random_lora import write_random_lora
from fluxfarm.worker.tools.torchao_fp8 import to_torchao_fp8
from fluxfarm.worker.tools.vram_probe import step_inputs

log = logging.getLogger(__name__)


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        release_pinned_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def _reset_host_peak() -> None:
    """Start the process's resident-memory high-water mark (VmHWM) afresh, so that a row's host peak is its own:
    FLUX.2 [dev]'s configurations hold 30-90 GiB of host copies, and the host, not the card, ran out (run 11)."""
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak is then the process's
        Path("/proc/self/clear_refs").write_text("5")


def _host_peak_gib() -> float | None:
    """Peak resident host memory (pinned included) since the last `_reset_host_peak`, where /proc says it."""
    memory = process_host_memory()
    return memory.peak if memory is not None else None


def bench_jobs(options: BenchOptions, count: int, offset: int = 0) -> list[RenderJob]:
    """Distinct prompts (nothing comes from the embedding cache) and seeds, the same for every configuration;
    guidance is the model's own default."""
    width, height = options.image_size
    words = ["lighthouse", "forest", "harbour", "desert", "glacier", "market", "orchard", "canyon"]
    return [
        parse_job(
            {
                "prompt": f"a {words[i % len(words)]} at dawn, study {i}",
                "seed": 1000 + i,
                "width": width,
                "height": height,
                "steps": options.steps,
                "model": options.flux_model.value,
            }
        )
        for i in range(offset, offset + count)
    ]


def render_as_worker(
    engine: RenderEngine, jobs: list[RenderJob], batch: int, wait_s: float
) -> tuple[list[RenderedImage], list[bytes]]:
    """Render `jobs` the way a worker does: one GPU thread gathering batches, and a thread a held job
    that encodes its PNG while the next batch renders. Returns the images and their PNGs, in job order."""
    batcher = RenderBatcher(engine, max_jobs=batch, wait_s=wait_s)

    def task(job: RenderJob) -> tuple[RenderedImage, bytes]:
        rendered = batcher.render(job)
        return rendered, rendered.png

    try:
        with ThreadPoolExecutor(held_jobs(batch)) as pool:
            done = list(pool.map(task, jobs))
    finally:
        batcher.close()
    return [r for r, _ in done], [png for _, png in done]


class Bench:
    """Runs the measurements of one `fluxfarm bench` call, handing each row to `on_row` as it is made."""

    def __init__(self, parts: FluxParts, options: BenchOptions, device: str, on_row: Callable[[BaseModel], None]):
        self.parts, self.options, self.device, self.on_row = parts, options, device, on_row
        self.reference: dict[int, np.ndarray] = {}
        """Pixels of each bench job rendered by plain diffusers bf16: what every configuration is compared with."""

    # ---- steps -------------------------------------------------------------------------------------------

    def _step_row(self, model: torch.nn.Module, level: QuantLevel, path: str, paths: FastPaths | None) -> None:
        for width, height in self.options.sizes:
            for batch in self.options.batches:
                inputs = step_inputs(self.parts.transformer_config, width, height, batch, self.device, self.parts.dtype)
                _free(self.device)
                try:
                    seconds = time_calls(
                        lambda inputs=inputs: model(**inputs), self.device, self.options.step_repeats, warmup=2
                    )
                except torch.cuda.OutOfMemoryError:
                    del inputs
                    break
                self.on_row(
                    StepRow(
                        level=level.value,
                        path=path,
                        width=width,
                        height=height,
                        batch=batch,
                        step_ms=seconds * 1000,
                        ms_per_image_step=seconds * 1000 / batch,
                        peak_gib=_peak_gib(self.device),
                        fast_paths=paths,
                    )
                )
                del inputs

    @torch.inference_mode()
    def steps(self) -> None:
        for level in self.options.levels:
            try:
                self._level_steps(level)
            except torch.cuda.OutOfMemoryError as error:  # one level too big beside the rest: the run goes on
                log.error("step rows of %s left out: %s", level.value, error)
            torch._dynamo.reset()  # compiled code keeps the blocks' weights alive past the model
            _free(self.device)

    def _level_steps(self, level: QuantLevel) -> None:
        """One level's step rows. Its transformer, and all that holds it (the step graphs' handle: kept past the
        level, it kept the weights beside the next level's draw, run 17), goes with this frame."""
        model = self.parts.transformer(level, self.device)
        self._step_row(model, level, "diffusers", None)
        paths = apply_fast_paths(model, self.device, True, self.options.attention, False, self.options.cuda_graphs)
        self._step_row(model, level, "fluxfarm", paths)
        if self.options.compile and torch.device(self.device).type == "cuda":
            graphs = step_graphs(model)
            if graphs is not None:
                graphs.release()  # captured from the eager blocks
            compile_blocks(model)
            paths = paths.model_copy(update={"compiled": True})
            self._step_row(model, level, "fluxfarm+compile", paths)
        if self.options.lora_rank and level in self.options.lora_levels and self.parts.family == FluxFamily.FLUX_1:
            self._lora_rows(model, level, paths)
        remove_step_graphs(model)

    @torch.inference_mode()
    def step_baselines(self) -> None:
        """The steps a user reaches without fluxfarm (STEP_BASELINES), timed as the step rows above: a fresh bf16
        transformer under `torch.compile` (its default mode), and one quantized by torchao's fp8 and compiled.
        CUDA only, as the bench compiles there alone; torchao's fp8 only on a card with fp8 tensor cores."""
        wanted = [name for name in STEP_BASELINES if name in self.options.baselines]
        device = torch.device(self.device)
        if wanted and (device.type != "cuda" or not self.options.compile):
            log.warning("step baselines %s left out: they compile, which the bench does on CUDA only", wanted)
            return
        for name in wanted:
            level = QuantLevel.BF16
            if name == TORCHAO_FP8_STEPS:
                fp8_card = torch.cuda.get_device_capability(device) >= FP8_MIN_COMPUTE_CAPABILITY
                if not fp8_card or importlib.util.find_spec("torchao") is None:
                    log.warning("step baseline %s left out: it needs torchao (the torchao extra) and a card of compute "
                                "capability 8.9+", name)  # fmt: skip
                    continue
                level = QuantLevel.FP8
            try:
                self._step_baseline(name, level)
            except (ImportError, RuntimeError) as error:  # torchao against this torch, say, or its compile
                log.error("step baseline %s failed, its rows left out: %s", name, error)  # the rest of the run stands
            torch._dynamo.reset()
            _free(self.device)

    def _step_baseline(self, name: str, level: QuantLevel) -> None:
        """One step baseline's rows; its transformer goes with this frame, whether the rows came or it failed."""
        model = self.parts.transformer(QuantLevel.BF16, self.device)
        if level == QuantLevel.FP8:
            to_torchao_fp8(model)
        self._step_row(torch.compile(model), level, STEP_BASELINES[name], None)

    def _lora_rows(self, model: torch.nn.Module, level: QuantLevel, paths: FastPaths) -> None:
        """Fuse a random LoRA of the asked rank into the running model, time its steps, and unfuse it."""
        rank = self.options.lora_rank
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            lora = write_random_lora(
                meta_transformer(self.parts.transformer_config), folder / "lora.safetensors", rank, rank
            )
            settings = WorkerSettings(cache_dir=folder / "cache", job_file_roots=[str(folder)])
            fuser = LoraFuser({"transformer": model}, lambda: "0" * 64, level.value, settings)
            spec = [LoraSpec(source=str(lora), weight=1.0)]
            fuser.activate(spec)
            fuse_s = fuser.last_fuse_s
            layers = len(fuser.active[0].updates)
            start = time.perf_counter()
            fuser.activate([])
            unfuse_s = time.perf_counter() - start
            fuser.activate(spec)
            _free(self.device)
            self.on_row(
                LoraFuseRow(
                    level=level.value,
                    rank=rank,
                    layers=layers,
                    fuse_s=fuse_s,
                    cached_fuse_s=fuser.last_fuse_s,
                    unfuse_s=unfuse_s,
                )
            )
            self._step_row(model, level, f"{'fluxfarm+compile' if paths.compiled else 'fluxfarm'}+lora{rank}", paths)
            fuser.activate([])

    # ---- whole images ------------------------------------------------------------------------------------

    def _record(self, row: ImageRow, pngs: list[bytes], jobs: list[RenderJob]) -> ImageRow:
        row.host_peak_gib = _host_peak_gib()
        if self.reference:
            scores = [agreement(pixels(png), self.reference[i]) for i, png in enumerate(pngs) if i in self.reference]
            if scores:
                row.psnr_db_vs_bf16 = float(np.mean([s[0] for s in scores]))
                row.rel_error_vs_bf16 = float(np.mean([s[1] for s in scores]))
        self.on_row(row)
        return row

    def _diffusers_run(
        self, name: str, pipe: Any, level: QuantLevel, offload: bool, budget: float | None = None
    ) -> list[bytes]:
        """Plain `pipe(prompt=...)`, one image a call, the way the diffusers docs and the seed article run it."""
        jobs = bench_jobs(self.options, self.options.images)

        def render(job: RenderJob, steps: int) -> bytes:
            return encode_png(plain_diffusers_image(pipe, job, steps), job)

        render(bench_jobs(self.options, 1, offset=100)[0], 2)  # warm-up: allocations, cuDNN plans
        _free(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        pngs = [render(job, job.steps) for job in jobs]
        synchronize(self.device)
        elapsed = (time.perf_counter() - start) / len(jobs)
        width, height = self.options.image_size
        row = ImageRow(
            name=name,
            budget_gib=budget,
            level=level.value,
            text_encoders="cpu-offload" if offload else "gpu",
            vae_tiling=False,
            width=width,
            height=height,
            steps=self.options.steps,
            images=len(jobs),
            batch=1,
            s_per_image=elapsed,
            images_per_hour=3600 / elapsed,
            peak_gib=_peak_gib(self.device),
        )
        self._record(row, pngs, jobs)
        return pngs

    @torch.inference_mode()
    def diffusers_bf16(self) -> None:
        _reset_host_peak()
        pipe = self.parts.pipeline(self.parts.transformer(QuantLevel.BF16, self.device))
        place_pipeline(pipe, self.device, "gpu")
        pipe.set_progress_bar_config(disable=True)
        pngs = self._diffusers_run(DIFFUSERS_BF16, pipe, QuantLevel.BF16, offload=False)
        self.reference = {i: pixels(png) for i, png in enumerate(pngs)}
        self._release(pipe)

    @torch.inference_mode()
    def seed_recipe(self) -> None:
        """GGUF Q8_0 through diffusers with enable_model_cpu_offload: the article this project started from."""
        _reset_host_peak()
        pipe = self.parts.pipeline(self.parts.transformer(QuantLevel.Q8_0, "cpu"))
        pipe.set_progress_bar_config(disable=True)
        if torch.device(self.device).type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        self._diffusers_run(SEED_RECIPE, pipe, QuantLevel.Q8_0, offload=True)
        pipe.remove_all_hooks()
        self._release(pipe)

    @torch.inference_mode()
    def four_bit_recipe(self) -> None:
        """FLUX.2 [dev] on a 24-32 GB card as its makers document it: bitsandbytes 4-bit transformer and text
        encoder, enable_model_cpu_offload, under the cap of the smallest budget the engine is measured at."""
        _reset_host_peak()
        pipe = self.parts.four_bit_pipeline()
        pipe.set_progress_bar_config(disable=True)
        budget = min(self.options.budgets, default=None)
        _free(self.device)
        with memory_cap(self.device, budget):
            if torch.device(self.device).type == "cuda":
                pipe.enable_model_cpu_offload(device=self.device)
            self._diffusers_run(FOUR_BIT_RECIPE, pipe, QuantLevel.NF4, offload=True, budget=budget)
            pipe.remove_all_hooks()
        self._release(pipe)

    def _release(self, pipe: Any) -> None:
        remove_step_graphs(pipe.transformer)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to("cpu")
        del pipe
        _free(self.device)

    @torch.inference_mode()
    def engine_run(self, name: str, budget: float | None, level: QuantLevel | None) -> ImageRow | None:
        """The worker's engine: the plan for `budget` (or `level` forced), fast paths, all jobs in hand."""
        _reset_host_peak()
        width, height = self.options.image_size
        cuda = torch.device(self.device).type == "cuda"
        total = torch.cuda.get_device_properties(self.device).total_memory / GIB if cuda else 64.0
        try:
            plan = make_plan(
                PlanInputs(
                    vram_gib=budget or total,
                    width=width,
                    height=height,
                    model=self.options.flux_model,
                    compute_capability=torch.cuda.get_device_capability(self.device) if cuda else (9, 0),
                    forced_level=level,
                )
            )
        except FarmError as error:  # a budget too small for this model: said, and the other rows still run
            log.warning("%s: %s", name, error)
            return None
        chosen = QuantLevel(plan.level)
        self.parts.state(chosen, self.device)  # quantizing is the quantizer's cost, not the worker's
        if self.parts.family != FluxFamily.FLUX_1:
            self.parts.text_encoder(plan.text_encoder_precision)  # made before the cap: drawn on the device
            if plan.text_encoder_precision != "bf16":
                self.parts.release_bf16_encoder()
        _free(self.device)
        best: ImageRow | None = None
        with memory_cap(self.device, budget):
            transformer = self.parts.transformer(chosen, self.device)
            pipe = self.parts.pipeline(transformer, plan.text_encoder_precision)
            settings = WorkerSettings(
                fast_kernels=True,
                attention=self.options.attention,
                compile=self.options.compile,
                cuda_graphs=self.options.cuda_graphs,
                deterministic=self.options.deterministic,
            )
            paths = ready_pipeline(pipe, self.device, plan.text_encoders, plan.vae_tiling, settings)
            model = LoadedModel(
                pipe=pipe,
                weights=LoadedWeights.known(
                    ModelInfo(id=f"random-{self.options.model}", transformer=chosen.value, transformer_sha256="0" * 64)
                ),
                level=chosen,
                device=self.device,
                text_encoders=plan.text_encoders,
                fast_paths=paths,
                family=self.parts.family,
                plan=plan,
            )
            for batch in sorted({min(b, settings.max_batch) for b in self.options.image_batches}):
                engine = RenderEngine(model, max_batch=batch, embedding_cache=0, settings=settings)
                try:
                    engine.render_batch(bench_jobs(self.options, batch, offset=100))  # warm-up at this batch
                    _free(self.device)
                    jobs = bench_jobs(self.options, max(self.options.images, batch))
                    synchronize(self.device)
                    start = time.perf_counter()
                    rendered, pngs = render_as_worker(engine, jobs, batch, settings.batch_wait_s)
                    elapsed = (time.perf_counter() - start) / len(jobs)
                except torch.cuda.OutOfMemoryError:
                    break
                row = ImageRow(
                    name=name,
                    budget_gib=budget,
                    level=chosen.value,
                    text_encoders=plan.text_encoders,
                    vae_tiling=plan.vae_tiling,
                    width=width,
                    height=height,
                    steps=self.options.steps,
                    images=len(jobs),
                    batch=batch,
                    s_per_image=elapsed,
                    images_per_hour=3600 / elapsed,
                    peak_gib=_peak_gib(self.device),
                    encode_s=float(np.mean([r.encode_s for r in rendered])),
                    denoise_s=float(np.mean([r.denoise_s for r in rendered])),
                    decode_s=float(np.mean([r.decode_s for r in rendered])),
                    fast_paths=paths,
                    deterministic=settings.deterministic,
                )
                self._record(row, pngs, jobs)
                if best is None or row.s_per_image < best.s_per_image:
                    best = row
            self._release(pipe)
            del transformer, model
            _free(self.device)
        return best

    def run(self) -> None:
        """Whole images first: the baselines, the engine at each forced level (whole card), the engine at each
        budget, FLUX.2 [dev]'s 4-bit recipe beside them (it drops the host copies the budgets kept); then steps,
        and the step baselines after them.
        The rows a goal compares come early, so a run cut short still has them."""
        if DIFFUSERS_BF16 in self.options.baselines:
            self.diffusers_bf16()
        if SEED_RECIPE in self.options.baselines and self.parts.family == FluxFamily.FLUX_1:
            self.seed_recipe()
        for level in self.options.image_levels:
            self.engine_run(f"fluxfarm-{level.value}", None, level)
        for budget in self.options.budgets:
            self.engine_run(f"fluxfarm@{budget:g}GiB", budget, None)
        if FOUR_BIT_RECIPE in self.options.baselines and self.parts.model == FluxModel.FLUX_2_DEV:
            self.four_bit_recipe()
        if self.options.levels:
            self.steps()
            self.step_baselines()


def run_bench(options: BenchOptions, device: str, on_row: Callable[[BaseModel], None]) -> None:
    apply_determinism(options.deterministic)  # before the first GPU work: cuBLAS reads its workspace setting then
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_parts(options.model, device, Path(tmp), options.tiny)
        Bench(parts, options, device, on_row).run()
