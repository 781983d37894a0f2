"""The VRAM policy: from a model, a card (or a budget) and the job's size, the best level that fits, and
where and at which precision the text encoders live. A pure function of its inputs, no torch, so
`fluxfarm plan` runs anywhere.

Predicted peak = what `torch.cuda.max_memory_allocated` will show: resident weights plus the
largest phase's working memory (a denoising step, the VAE decode, or fusing a LoRA set into the
weights: any worker may be sent LoRA jobs). The CUDA context and allocator slack come on top (`headroom`).
Working-memory figures were measured on an H100 with full-size random-weight FLUX.1-dev
(`fluxfarm probe-vram`, docs/VRAM.md) and are interpolated in pixel count between 512² and 1024²;
each architecture's sizes and scales are in worker/model/model_sizes.py.

What comes first is the operator's choice (`Optimize`, FLUXFARM_OPTIMIZE). `quality`: the best level that fits.
`throughput` (the default): fp8 first on cards with fp8 tensor cores, then the same order. On the H200
the fp8 worker renders 1.8x the images/hour of plain diffusers bf16 and 1.3-1.5x the bf16 worker's
(docs/benchmarks.md), its images agreeing with bf16's at 62 dB PSNR; a farm renders datasets, where
images/hour is the cost, and a job or dataset that must have bf16 says `min:bf16` (no fp8 worker takes
it). Where fp8 cannot run both policies choose alike: every other level is slower than bf16 (run 9),
so the fastest that fits is the best that fits.

Each level is tried with every encoder arrangement before the next level down: encoders resident on the
GPU in bf16, then (for FLUX.2's LLM encoders) in fp8, then swapped in per encode phase in bf16 or fp8, then
(FLUX.2) resident or swapped in Q4_K, then run on the CPU (before the swaps where that is the faster).

Host memory counts too where it is known (`PlanInputs.host_gib`): a swapped arrangement keeps the transformer and
the encoders in pinned host memory, a CPU encode keeps the encoders there, and an arrangement whose host side does
not fit beside the process is passed over like one whose GPU peak does not fit (FLUX.2 [dev] at 24 GiB keeps 34
GiB pinned with its fp8 encoder: more than a 32 GB desktop has to spare).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.model.model_sizes import ENCODE_TOKENS, ArchitectureSizes, EncoderPrecision, sizes_of
from fluxfarm.worker.quant.fp8.card import FP8_MIN_COMPUTE_CAPABILITY

Placement = Literal["gpu", "gpu-swap", "cpu"]


class Optimize(StrEnum):
    """What the plan puts first when several levels fit."""

    QUALITY = "quality"
    THROUGHPUT = "throughput"


_PIXELS_512 = 512 * 512
_PIXELS_1024 = 1024 * 1024

# Measured on an H100 (docs/VRAM.md): GiB above resident weights at (512², 1024²), batch 1.
STEP_WORKING_GIB: dict[QuantLevel, tuple[float, float]] = {
    QuantLevel.BF16: (0.156, 0.462),
    QuantLevel.FP8: (0.547, 0.779),
    QuantLevel.Q8_0: (0.440, 0.673),
    QuantLevel.Q6_K: (0.403, 0.635),
    QuantLevel.Q5_K: (0.471, 0.704),
    QuantLevel.Q5_1: (0.684, 0.916),
    QuantLevel.Q4_K: (0.408, 0.638),
    QuantLevel.Q4_1: (0.350, 0.584),
    QuantLevel.Q4_0: (0.356, 0.588),
    QuantLevel.Q3_K: (0.577, 0.809),
    QuantLevel.Q2_K: (0.402, 0.635),
}
_GGUF_STEP_WORKING_GIB = (0.684, 0.916)
"""Unmeasured GGUF levels (Q5_0): the largest measured GGUF figures."""
EXTRA_IMAGE_STEP_GIB = (0.154, 0.448)
"""Measured on an H100 (docs/bench/run1-steps-eager.jsonl: step peaks at batch 1 and 2, 512² and 1024²): GiB
each further image of a batch adds to a step, alike at bf16, fp8, Q8_0 and Q6_K (the activations)."""
MAX_PLANNED_BATCH = 64
BATCH_SIZES = ((512, 512), (768, 768), (1024, 1024), (1536, 1536), (2048, 2048))
"""The sizes `max_batch_by_size` reports."""
FUSE_WORKING_GIB: dict[QuantLevel, float] = {
    QuantLevel.BF16: 0.564,
    QuantLevel.FP8: 0.686,
    QuantLevel.Q8_0: 0.583,
    QuantLevel.Q6_K: 0.571,
    QuantLevel.Q4_K: 0.588,
    QuantLevel.Q2_K: 0.545,
}
"""Measured on an H200 (docs/bench/adapter-memory-h200.log): GiB above the resident transformer while a
rank-64 LoRA over every block layer is fused (K-quants re-quantized in 1M-value chunks; Q8_0 in 4M, an
upper bound). Unmeasured GGUF levels take their family's largest: K-quants Q4_K's, legacy levels Q8_0's."""
VAE_DECODE_WORKING_GIB = (0.627, 2.410)
VAE_TILE_PX = 512
"""Tiled decoding works on 512² tiles: its working memory is that of a 512² decode."""
CUDA_CONTEXT_GIB = 0.6
HOST_PROCESS_GIB = 2.0
"""Host memory a worker process holds beside the model's parts: its imports take 0.5 GiB on the CPU build
(measured here, max RSS); a whole-card fp8 worker on the H200, CUDA's host side included, held 1.6 GiB once
loaded (docs/benchmarks.md, run 16: the worker's model-loaded line)."""
ALLOCATOR_SLACK = 0.04
"""Fragmentation margin, as a share of the budget."""

PCIE_GIB_S = 20.0
CPU_ENCODER_TFLOPS = 0.5

KNOWN_GPUS: dict[str, tuple[int, int]] = {
    "H200": (9, 0), "H100": (9, 0), "GH200": (9, 0), "B200": (10, 0), "RTX 5090": (12, 0), "RTX 5080": (12, 0),
    "L40S": (8, 9), "L40": (8, 9), "L4": (8, 9), "RTX 4090": (8, 9), "RTX 4080": (8, 9), "RTX 4070": (8, 9),
    "RTX 4060": (8, 9), "RTX 6000 ADA": (8, 9), "A100": (8, 0), "A800": (8, 0), "A40": (8, 6), "A10G": (8, 6),
    "A10": (8, 6), "RTX A6000": (8, 6), "RTX 3090": (8, 6), "RTX 3080": (8, 6), "RTX 3070": (8, 6),
    "RTX 3060": (8, 6), "V100": (7, 0), "T4": (7, 5), "RTX 2080": (7, 5),
}  # fmt: skip


def compute_capability_of(gpu_name: str) -> tuple[int, int] | None:
    """Compute capability from a marketing name ("NVIDIA GeForce RTX 3060" -> (8, 6)); None if unknown."""
    upper = gpu_name.upper()
    for key in sorted(KNOWN_GPUS, key=len, reverse=True):
        if key in upper:
            return KNOWN_GPUS[key]
    return None


class PlanInputs(BaseModel):
    vram_gib: float = Field(gt=0, description="The budget: the card's memory, or --vram-budget.")
    width: int = 1024
    height: int = 1024
    model: FluxModel = FluxModel.FLUX_1_DEV
    compute_capability: tuple[int, int] | None = None
    gpu_name: str | None = None
    forced_level: QuantLevel | None = None
    available_levels: list[QuantLevel] = Field(
        default_factory=lambda: [lv for lv in QuantLevel if lv != QuantLevel.NF4]
    )
    lora_jobs: bool = Field(
        default=True, description="Keep room to fuse a LoRA set into the weights (a worker that takes LoRA jobs)."
    )
    optimize: Optimize = Optimize.THROUGHPUT
    host_gib: float | None = Field(
        default=None, gt=0, description="Host memory the worker may use; None: not counted (only the GPU's)."
    )


class Plan(BaseModel):
    level: str
    predicted_peak_gib: float
    text_encoders: Placement
    text_encoder_precision: EncoderPrecision = "bf16"
    vae_tiling: bool
    vram_budget_gib: float
    host_gib: float = Field(
        default=0.0,
        description="Host memory the placement keeps while the worker runs: pinned copies of what a swap moves, "
        "encoders that encode on the CPU (the process and loading come on top).",
    )
    components_gib: dict[str, float]
    max_batch: int = Field(default=1, description="The largest denoising batch that fits at the planned size.")
    max_batch_by_size: dict[str, int] = Field(default_factory=dict, description="The same at common sizes.")
    denoise_resident_gib: float = 0.0
    """What stays on the card while a batch denoises (transformer, VAE, resident encoders)."""
    step_scale: float = 1.0
    reasons: list[str]

    def batch_limit(self, width: int, height: int) -> int:
        """The largest batch at `width`x`height` whose step fits beside what stays resident: the worker's
        batches are planned, and its out-of-memory split is a safety net a normal run never meets."""
        return max(1, self._batches_fitting(width, height, beside=0.0))

    def graph_batch_limit(self, width: int, height: int) -> int:
        """The largest batch at `width`x`height` whose step can replay as a CUDA graph: the graph's memory pool
        keeps the step's working memory reserved while each image decodes, so both must fit beside what stays
        resident; 0 where not even one does (the steps then run eagerly)."""
        return self._batches_fitting(width, height, beside=decode_working_gib(width * height, self.vae_tiling))

    def _batches_fitting(self, width: int, height: int, beside: float) -> int:
        usable = self.vram_budget_gib - headroom_gib(self.vram_budget_gib)
        pixels = width * height
        first = self.step_scale * step_working_gib(QuantLevel(self.level), pixels)
        extra = self.step_scale * _interpolate(*EXTRA_IMAGE_STEP_GIB, pixels)
        room = usable - self.denoise_resident_gib - beside - first
        return min(MAX_PLANNED_BATCH, 1 + int(room // extra)) if room >= 0 else 0


def _interpolate(at_512: float, at_1024: float, pixels: int) -> float:
    share = (pixels - _PIXELS_512) / (_PIXELS_1024 - _PIXELS_512)
    return max(0.0, at_512 + (at_1024 - at_512) * share)


def step_working_gib(level: QuantLevel, pixels: int, sizes: ArchitectureSizes | None = None) -> float:
    default = _GGUF_STEP_WORKING_GIB if level.is_gguf else STEP_WORKING_GIB[QuantLevel.BF16]
    scale = sizes.step_scale if sizes else 1.0
    return scale * _interpolate(*STEP_WORKING_GIB.get(level, default), pixels)


def fuse_working_gib(level: QuantLevel, sizes: ArchitectureSizes | None = None) -> float:
    scale = sizes.fuse_scale if sizes else 1.0
    if level in FUSE_WORKING_GIB:
        return scale * FUSE_WORKING_GIB[level]
    return scale * FUSE_WORKING_GIB[QuantLevel.Q4_K if level.value.endswith("_K") else QuantLevel.Q8_0]


def decode_working_gib(pixels: int, tiled: bool) -> float:
    return _interpolate(*VAE_DECODE_WORKING_GIB, min(pixels, VAE_TILE_PX**2) if tiled else pixels)


def headroom_gib(vram_gib: float) -> float:
    return CUDA_CONTEXT_GIB + ALLOCATOR_SLACK * vram_gib


def _peaks(
    level: QuantLevel, precision: EncoderPrecision, inputs: PlanInputs, tiled: bool
) -> tuple[dict[Placement, float], dict[str, float]]:
    sizes = sizes_of(inputs.model)
    pixels = inputs.width * inputs.height
    transformer = sizes.transformer(level)
    encoders = sizes.encoders_gib[precision]
    step = step_working_gib(level, pixels, sizes)
    decode = decode_working_gib(pixels, tiled)
    fuse = fuse_working_gib(level, sizes) if inputs.lora_jobs else 0.0
    encode = sizes.encode_working_gib
    vae = sizes.vae_gib
    denoise_and_decode = transformer + vae + max(step, decode, fuse)
    peaks: dict[Placement, float] = {
        "gpu": transformer + vae + encoders + max(step, decode, fuse, encode),
        # The transformer leaves the GPU while the encoders are in: the phases never overlap.
        "gpu-swap": max(encoders + vae + encode, denoise_and_decode),
        "cpu": denoise_and_decode,
    }
    components = {
        "transformer": transformer,
        "vae": vae,
        "text_encoders": encoders,
        "encode": encode,
        "step": step,
        "decode": decode,
        "lora_fuse": fuse,
    }
    return peaks, {name: round(value, 3) for name, value in components.items()}


def host_held_gib(placement: Placement, components: dict[str, float]) -> float:
    """What `placement` keeps in host memory: a swap's pinned copies of the transformer and the encoders
    (worker/model/host_mirror.py), a CPU encode's encoders; nothing for parts resident on the GPU."""
    if placement == "gpu-swap":
        return components["transformer"] + components["text_encoders"]
    return components["text_encoders"] if placement == "cpu" else 0.0


def _seconds_per_encode(level: QuantLevel, precision: EncoderPrecision, inputs: PlanInputs) -> tuple[float, float]:
    """Estimated seconds a swapped encode phase costs (both ways over PCIe) and a CPU encode of one prompt."""
    sizes = sizes_of(inputs.model)
    swap_s = 2 * (sizes.transformer(level) + sizes.encoders_gib[precision]) / PCIE_GIB_S
    cpu_s = 2 * sizes.encoder_parameters * ENCODE_TOKENS / 1e12 / CPU_ENCODER_TFLOPS
    return swap_s, cpu_s


def _encode_reason(level: QuantLevel, precision: EncoderPrecision, inputs: PlanInputs) -> str:
    swap_s, cpu_s = _seconds_per_encode(level, precision, inputs)
    return f"encoders: swapping costs ~{swap_s:.1f}s per encode phase, a CPU encode ~{cpu_s:.1f}s per prompt"


LOSSY_ENCODER_PRECISIONS: tuple[EncoderPrecision, ...] = ("Q4_K",)
"""A 4-bit LLM encoder changes the embeddings more than fp8 does: a last resort before the CPU."""


def _arrangements(level: QuantLevel, inputs: PlanInputs) -> list[tuple[Placement, EncoderPrecision, str]]:
    """Where and at which precision the encoders may live, best first: resident beats swapped, bf16 beats fp8,
    and both beat Q4_K at any place on the GPU; a CPU encode (bf16) comes last, or before the swaps where it is
    the faster (a CPU encode of FLUX.2 [dev]'s encoder takes half a minute a prompt: a swap of its Q4_K copy
    beats it, and the Q4_K copy fits the cards where even fp8's 17 GiB cannot come in)."""
    precisions = list(sizes_of(inputs.model).encoders_gib)
    fine = [p for p in precisions if p not in LOSSY_ENCODER_PRECISIONS]
    lossy = [p for p in precisions if p in LOSSY_ENCODER_PRECISIONS]
    swap_s, cpu_s = _seconds_per_encode(level, fine[0], inputs)
    resident: list[tuple[Placement, EncoderPrecision, str]] = [("gpu", p, "") for p in fine]
    later: list[tuple[Placement, EncoderPrecision, str]] = [
        *(("gpu-swap", p, _encode_reason(level, p, inputs)) for p in fine),
        *(("gpu", p, "") for p in lossy),
        *(("gpu-swap", p, _encode_reason(level, p, inputs)) for p in lossy),
    ]
    cpu: list[tuple[Placement, EncoderPrecision, str]] = [("cpu", fine[0], _encode_reason(level, fine[0], inputs))]
    return resident + (cpu + later if cpu_s < swap_s else later + cpu)


def _ladder(optimize: Optimize, cc: tuple[int, int] | None) -> list[QuantLevel]:
    """The levels in the order the policy tries them."""
    levels = list(QuantLevel)
    if optimize == Optimize.THROUGHPUT and cc is not None and cc >= FP8_MIN_COMPUTE_CAPABILITY:
        levels.remove(QuantLevel.FP8)
        levels.insert(0, QuantLevel.FP8)
    return levels


def make_plan(inputs: PlanInputs) -> Plan:
    """The best level that fits, with the best encoder arrangement that fits it; FarmError if none does."""
    usable = inputs.vram_gib - headroom_gib(inputs.vram_gib)
    cc = inputs.compute_capability or (compute_capability_of(inputs.gpu_name) if inputs.gpu_name else None)
    reasons = [f"budget {inputs.vram_gib:.1f} GiB, {usable:.2f} GiB after CUDA context and allocator slack"]
    host_room = None if inputs.host_gib is None else inputs.host_gib - HOST_PROCESS_GIB
    if host_room is not None:
        reasons.append(f"host {inputs.host_gib:.1f} GiB, {host_room:.1f} GiB beside the worker process")
    candidates = [inputs.forced_level] if inputs.forced_level else _ladder(inputs.optimize, cc)
    if inputs.optimize == Optimize.THROUGHPUT and candidates[:1] == [QuantLevel.FP8] and not inputs.forced_level:
        reasons.append("throughput: fp8 first, on fp8 tensor cores the fastest level (docs/benchmarks.md)")
    for level in candidates:
        if level not in inputs.available_levels:
            reasons.append(f"{level}: not available on this worker")
            continue
        if level == QuantLevel.FP8 and (cc is None or cc < FP8_MIN_COMPUTE_CAPABILITY):
            reasons.append(f"fp8: needs fp8 tensor cores (compute capability >= 8.9), card has {cc or 'unknown'}")
            continue
        smallest = float("inf")
        for tiled in (False, True):
            for placement, precision, encode_reason in _arrangements(level, inputs):
                peaks, components = _peaks(level, precision, inputs, tiled)
                smallest = min(smallest, peaks[placement])
                if peaks[placement] > usable:
                    continue
                host = host_held_gib(placement, components)
                if host_room is not None and host > host_room:
                    why = f"{level}: {placement} text encoders in {precision} would keep {host:.1f} GiB in host memory"
                    if why not in reasons:  # once, not again for the tiled decode
                        reasons.append(why)
                    continue
                reasons.append(
                    f"{level}: {placement} text encoders in {precision}{' with tiled VAE decode' if tiled else ''} "
                    f"peak {peaks[placement]:.2f} GiB fits"
                )
                if placement != "gpu":
                    reasons.append(f"encoders resident would peak at {peaks['gpu']:.2f} GiB; {encode_reason}")
                if not sizes_of(inputs.model).measured:
                    reasons.append(f"{inputs.model}: working memory scaled from FLUX.1's measurements")
                resident = components["transformer"] + components["vae"]
                plan = Plan(
                    level=level.value,
                    predicted_peak_gib=round(peaks[placement], 3),
                    text_encoders=placement,
                    text_encoder_precision=precision,
                    vae_tiling=tiled,
                    vram_budget_gib=inputs.vram_gib,
                    host_gib=round(host, 3),
                    components_gib=components,
                    denoise_resident_gib=resident + (components["text_encoders"] if placement == "gpu" else 0.0),
                    step_scale=sizes_of(inputs.model).step_scale,
                    reasons=reasons,
                )
                plan.max_batch = plan.batch_limit(inputs.width, inputs.height)
                plan.max_batch_by_size = {f"{w}x{h}": plan.batch_limit(w, h) for w, h in BATCH_SIZES}
                return plan
        reasons.append(
            f"{level}: fits the card ({smallest:.2f} GiB) but not the host"
            if smallest <= usable
            else f"{level}: even {smallest:.2f} GiB does not fit"
        )
    raise FarmError(
        f"nothing of {inputs.model} fits {inputs.vram_gib:.1f} GiB at {inputs.width}x{inputs.height}"
        + (f" at level {inputs.forced_level}" if inputs.forced_level else "")
        + ": "
        + "; ".join(reasons[1:])
    )
