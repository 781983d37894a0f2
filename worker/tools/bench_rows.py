"""What `fluxfarm bench` is asked (BenchOptions) and the rows it answers with: steps, whole images and
LoRA fuses, each a JSON line as it comes (worker/tools/bench_report.py shows them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.fast.fast_paths import AttentionChoice, FastPaths

SEED_RECIPE = "seed-recipe"
DIFFUSERS_BF16 = "diffusers-bf16"
FOUR_BIT_RECIPE = "diffusers-nf4-offload"
"""FLUX.2 [dev]'s documented 24-32 GB recipe (worker/tools/bnb_nf4.py)."""
BASELINES = (SEED_RECIPE, DIFFUSERS_BF16, FOUR_BIT_RECIPE)
"""Whole-image baselines."""
COMPILED_BF16_STEPS = "diffusers-bf16-compile"
"""diffusers' bf16 transformer under `torch.compile`: step rows of path `diffusers+compile`."""
TORCHAO_FP8_STEPS = "torchao-fp8-compile"
"""torchao's per-row fp8 under `torch.compile` (worker/tools/torchao_fp8.py): step rows of path `torchao+compile`."""
STEP_BASELINES = {COMPILED_BF16_STEPS: "diffusers+compile", TORCHAO_FP8_STEPS: "torchao+compile"}
"""Step baselines, each with the path its rows carry: what a user reaches without fluxfarm, timed as the
worker's steps are, on CUDA only (the bench compiles there alone)."""
ALL_BASELINES = (*BASELINES, *STEP_BASELINES)
"""Every baseline's name, what `--baselines all` means."""


class BenchOptions(BaseModel):
    model: Literal["flux.1-dev", "flux.1-schnell", "flux.2-dev", "flux.2-klein-4b", "flux.2-klein-9b", "tiny"] = (
        "flux.1-dev"
    )
    tiny: bool = False
    """The model's tiny pipeline (on a CPU, to check the tool); "tiny" alone is FLUX.1's."""
    levels: list[QuantLevel] = [QuantLevel.BF16, QuantLevel.FP8, QuantLevel.Q8_0, QuantLevel.Q6_K, QuantLevel.Q4_K]
    sizes: list[tuple[int, int]] = [(512, 512), (1024, 1024)]
    batches: list[int] = [1, 2, 4]
    image_batches: list[int] = [1, 2, 4]
    budgets: list[float] = [12.0, 80.0]
    image_levels: list[QuantLevel] = [QuantLevel.FP8]
    image_size: tuple[int, int] = (1024, 1024)
    steps: int = 28
    images: int = 4
    step_repeats: int = 5
    baselines: list[str] = list(ALL_BASELINES)
    """The baselines to run (those that apply to the model: the seed recipe is FLUX.1's, the 4-bit recipe
    FLUX.2 [dev]'s; the step baselines where steps are timed); empty for none. A run that has a baseline's rows
    already can leave it out."""
    attention: AttentionChoice = "auto"
    compile: bool = True
    cuda_graphs: bool = True
    lora_rank: int = 0
    """Above 0: after a level's step rows, fuse a random LoRA of this rank and measure its steps again."""
    lora_levels: list[QuantLevel] = [QuantLevel.Q8_0]
    deterministic: bool = False
    """The engine's rows as a FLUXFARM_DETERMINISTIC worker renders (deterministic kernels, one job a batch),
    set for the whole process before any GPU work: its cost is this run's rows against a run without it."""

    @property
    def flux_model(self) -> FluxModel:
        return FluxModel.FLUX_1_DEV if self.model == "tiny" else FluxModel(self.model)


class StepRow(BaseModel):
    kind: Literal["step"] = "step"
    level: str
    path: str
    width: int
    height: int
    batch: int
    step_ms: float
    ms_per_image_step: float
    peak_gib: float | None
    fast_paths: FastPaths | None = None


class ImageRow(BaseModel):
    kind: Literal["image"] = "image"
    name: str
    budget_gib: float | None
    level: str
    text_encoders: str
    vae_tiling: bool
    width: int
    height: int
    steps: int
    images: int
    batch: int
    s_per_image: float
    images_per_hour: float
    peak_gib: float | None
    host_peak_gib: float | None = None
    """The process's peak resident host memory (pinned copies included) from this configuration's setup on."""
    encode_s: float | None = None
    denoise_s: float | None = None
    decode_s: float | None = None
    psnr_db_vs_bf16: float | None = None
    rel_error_vs_bf16: float | None = None
    fast_paths: FastPaths | None = None
    deterministic: bool = False


class LoraFuseRow(BaseModel):
    """The one-time cost of a LoRA set: fused and re-quantized, then again from the disk cache."""

    kind: Literal["lora-fuse"] = "lora-fuse"
    level: str
    rank: int
    layers: int
    fuse_s: float
    cached_fuse_s: float
    unfuse_s: float
