"""Measure what each FLUX component and quantization level really takes on a GPU.

Builds a full-size model with random weights (same bytes and FLOPs as trained ones), then for each
level: the resident transformer, the peak of one denoising step at each size, and the step time;
plus (FLUX.1) the VAE decode, T5 and CLIP encode peaks; or, given budgets, whole plans of any family
(encode, a step, a decode and a LoRA fuse as the plan places them) beside the plan's prediction. The numbers
calibrate and check the VRAM policy (`worker.plan`). Peaks are `torch.cuda.max_memory_allocated` above
the empty baseline: the CUDA context itself (about 0.5 GiB) is outside them.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fluxfarm.shared.adapters import LoraSpec
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.shared.units import GIB
from fluxfarm.worker.adapters.lora_fuser import LoraFuser
from fluxfarm.worker.fast.fast_paths import encoder_fast_paths
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import (
    ENCODER_LAYERS_READ,
    flux2_step_inputs,
    random_flux2_vae,
    random_text_encoder,
    transformer_config,
)
from fluxfarm.worker.model.flux_arch import meta_transformer, random_clip, random_t5, random_vae
from fluxfarm.worker.model.gpu import cap_memory, time_calls
from fluxfarm.worker.model.model_sizes import EncoderPrecision
from fluxfarm.worker.model.pipeline import enable_vae_tiling
from fluxfarm.worker.model.plan import VAE_TILE_PX, Optimize, Plan, PlanInputs, make_plan
from fluxfarm.worker.model.text_encoders import store_text_encoder
from fluxfarm.worker.render.engine import PROMPTS_PER_ENCODE
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.random_lora import write_random_lora
from fluxfarm.worker.tools.random_weights import SeededWeights

T5_TOKENS = 512
DTYPE = torch.bfloat16
LORA_RANK = 64
"""The rank the plan's fuse room was measured with (FUSE_WORKING_GIB): a LoRA over every block layer."""


def _settle(device: str) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_above(device: str, base: int, run: Callable[[], Any]) -> float:
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def step_inputs(
    config: dict[str, Any], width: int, height: int, batch: int, device: str, dtype: torch.dtype = DTYPE
) -> dict[str, Any]:
    """Random inputs of one denoising step at `width`x`height`, as the family's pipeline passes them."""
    if "timestep_guidance_channels" in config:
        return flux2_step_inputs(config, width, height, batch, device, dtype, T5_TOKENS)
    tokens = (width // 16) * (height // 16)
    inputs = {
        "hidden_states": torch.randn(batch, tokens, config["in_channels"], device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            batch, T5_TOKENS, config["joint_attention_dim"], device=device, dtype=dtype
        ),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
        "txt_ids": torch.zeros(T5_TOKENS, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs


def probe_levels(
    model_name: FluxModel,
    levels: Iterable[QuantLevel],
    sizes: Iterable[tuple[int, int]],
    device: str,
    on_row: Callable[[dict[str, Any]], None],
    repeats: int = 5,
) -> None:
    """One row per level: resident GiB, and per size the step's peak GiB and seconds."""
    config = transformer_config(model_name)
    base = _settle(device)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        weights = SeededWeights(config, DTYPE, Path(tmp))
        for level in levels:
            started = time.perf_counter()
            model = weights.transformer(level, device)
            torch.cuda.synchronize(device)
            row: dict[str, Any] = {
                "level": level.value,
                "resident_gib": (torch.cuda.memory_allocated(device) - base) / GIB,
                "build_s": time.perf_counter() - started,
            }
            for width, height in sizes:
                inputs = step_inputs(config, width, height, 1, device)
                step = lambda inputs=inputs, model=model: model(**inputs)  # noqa: E731
                row[f"step_peak_gib_{width}x{height}"] = _peak_above(device, base, step)
                row[f"step_s_{width}x{height}"] = time_calls(step, device, repeats)
                del inputs, step
            del model  # casting hooks make cycles: _settle's gc.collect frees them before the next level
            row["leftover_gib"] = (_settle(device) - base) / GIB
            on_row(row)


def probe_components(sizes: Iterable[tuple[int, int]], device: str, on_row: Callable[[dict[str, Any]], None]) -> None:
    """VAE decode, T5-XXL and CLIP-L encode: resident GiB and peak GiB above the baseline."""
    base = _settle(device)
    with torch.inference_mode():
        vae = random_vae(device, DTYPE)
        row: dict[str, Any] = {"component": "vae", "resident_gib": (torch.cuda.memory_allocated(device) - base) / GIB}
        for width, height in sizes:
            latents = torch.randn(1, 16, height // 8, width // 8, device=device, dtype=DTYPE)
            row[f"decode_peak_gib_{width}x{height}"] = _peak_above(
                device, base, lambda latents=latents, vae=vae: vae.decode(latents)
            )
        on_row(row)
        del vae
        base = _settle(device)
        for name, build, tokens in (("t5-xxl", random_t5, T5_TOKENS), ("clip-l", random_clip, 77)):
            encoder = build(device, DTYPE)
            ids = torch.randint(0, 1000, (1, tokens), device=device)
            resident = (torch.cuda.memory_allocated(device) - base) / GIB
            peak = _peak_above(device, base, lambda encoder=encoder, ids=ids: encoder(ids))
            on_row({"component": name, "resident_gib": resident, "encode_peak_gib": peak})
            del encoder
            base = _settle(device)


def probe_plans(
    model_name: FluxModel,
    budgets: Iterable[float],
    width: int,
    height: int,
    device: str,
    on_row: Callable[[dict[str, Any]], None],
    optimize: Optimize = Optimize.THROUGHPUT,
) -> None:
    """For each budget: make the plan (under `optimize`), build exactly that configuration under the budget's
    memory cap, run encode, one step, decode and a LoRA fuse as the plan says, and record the measured peak
    beside the prediction."""
    config = transformer_config(model_name)
    capability = torch.cuda.get_device_capability(device)
    base = _settle(device)
    encoders: dict[str, torch.nn.Module] = {}
    plans = [
        (
            budget,
            make_plan(
                PlanInputs(
                    vram_gib=budget,
                    width=width,
                    height=height,
                    model=model_name,
                    compute_capability=capability,
                    optimize=optimize,
                )
            ),
        )
        for budget in budgets
    ]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        weights = SeededWeights(config, DTYPE, Path(tmp))
        lora = write_random_lora(meta_transformer(config), Path(tmp) / "lora.safetensors", LORA_RANK, LORA_RANK)
        for index, (budget, plan) in enumerate(plans):
            level = QuantLevel(plan.level)
            # The host holds FLUX.2 [dev]'s encoders at several precisions: each goes once no later plan needs it.
            later = {later_plan.text_encoder_precision for _, later_plan in plans[index:]}
            for precision in set(encoders) - later:
                del encoders[precision]
            # Quantizing and drawing weights are not the worker's cost: done before the cap and the measurement.
            state = weights.gguf_state(level, device) if level.is_gguf else None
            if MODELS[model_name].family in ENCODER_LAYERS_READ and plan.text_encoder_precision not in encoders:
                encoders[plan.text_encoder_precision] = _host_encoder(model_name, plan.text_encoder_precision, device)
            _settle(device)
            cap_memory(device, budget)
            row: dict[str, Any] = {
                "budget_gib": budget,
                "optimize": optimize.value,
                "size": f"{width}x{height}",
                "plan": plan.model_dump(exclude={"reasons", "vram_budget_gib"}),
            }
            try:
                encoder = encoders.get(plan.text_encoder_precision)
                row.update(_run_plan(plan, weights, state, encoder, model_name, (width, height), base, lora))
                row["error"] = (plan.predicted_peak_gib - row["measured_peak_gib"]) / row["measured_peak_gib"]
            except torch.cuda.OutOfMemoryError as error:
                row["oom"] = str(error).splitlines()[0]
            on_row(row)
            del state
            for encoder in encoders.values():
                encoder.to("cpu")
            _settle(device)
            cap_memory(device, None)


def _host_encoder(model: FluxModel, precision: EncoderPrecision, device: str) -> torch.nn.Module:
    """A FLUX.2 text encoder as a worker keeps it (trimmed, at the planned precision), drawn and quantized on
    `device` (on the host FLUX.2 [dev]'s 17B parameters take minutes), kept on the host."""
    encoder = store_text_encoder(random_text_encoder(model, device, DTYPE), precision, DTYPE)
    encoder.cpu()
    _settle(device)
    return encoder


def _encode(model: FluxModel, encoder: torch.nn.Module | None, device: str) -> list[torch.nn.Module]:
    """One encode phase as the engine runs it: FLUX.1's T5 and CLIP built on the card for a prompt; a FLUX.2
    encoder brought onto the card for a chunk of prompts, its read hidden states stacked. Returns the
    encoders now on the card."""
    if encoder is None:
        t5, clip = random_t5(device, DTYPE), random_clip(device, DTYPE)
        t5(torch.randint(0, 1000, (1, T5_TOKENS), device=device))
        clip(torch.randint(0, 1000, (1, 77), device=device))
        return [t5, clip]
    encoder.to(device)
    encoder_fast_paths(encoder, device)
    ids = torch.randint(0, 1000, (PROMPTS_PER_ENCODE, T5_TOKENS), device=device)
    out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    torch.stack([out.hidden_states[k] for k in ENCODER_LAYERS_READ[MODELS[model].family]], dim=1)
    return [encoder]


def fuse_lora(transformer: torch.nn.Module, lora: Path, level: QuantLevel, model: FluxModel) -> int:
    """Fuse `lora` into the transformer as a worker does between batches (its fused-block cache included),
    then put the base weights back. Returns how many layers it changed."""
    with tempfile.TemporaryDirectory(dir=lora.parent) as cache:
        settings = WorkerSettings(cache_dir=Path(cache), job_file_roots=[str(lora.parent)])
        loader = FAMILIES[MODELS[model].family].pipeline
        fuser = LoraFuser({"transformer": transformer}, lambda: "0" * 64, level.value, settings, loader=loader)
        (fused,) = fuser.activate([LoraSpec(source=str(lora), weight=1.0)])
        fuser.activate([])
        return len(fused.updates)


def _run_plan(
    plan: Plan,
    weights: SeededWeights,
    state: dict[str, torch.Tensor] | None,
    encoder: torch.nn.Module | None,
    model: FluxModel,
    size: tuple[int, int],
    base: int,
    lora: Path,
) -> dict[str, float]:
    """Build the planned configuration, run encode, a step, decode and (where the plan keeps room for one) a
    LoRA fuse as planned. Returns GiB above `base`: the whole peak, what is resident while denoising, and each
    phase's peak above what is resident in it, the numbers the plan adds up (components_gib), so a plan's
    working memory can be set from them."""
    width, height = size
    device = f"cuda:{torch.cuda.current_device()}"
    flux2 = MODELS[model].family in (FluxFamily.FLUX_2, FluxFamily.FLUX_2_KLEIN)
    transformer = weights.transformer(QuantLevel(plan.level), device, state)
    vae = random_flux2_vae(device, DTYPE) if flux2 else random_vae(device, DTYPE)
    if plan.vae_tiling:
        enable_vae_tiling(vae, VAE_TILE_PX)
    _settle(device)
    phases: dict[str, float] = {}

    def held() -> float:
        return (torch.cuda.memory_allocated(device) - base) / GIB

    if plan.text_encoders != "cpu":  # on "cpu" the encoders never touch the GPU
        if plan.text_encoders == "gpu-swap":
            transformer.to("cpu")
        encoding: list[torch.nn.Module] = []
        phases["encode_above_gib"] = (
            _peak_above(device, base, lambda: encoding.extend(_encode(model, encoder, device))) - held()
        )
        phases["encode_resident_gib"] = held()
        if plan.text_encoders == "gpu-swap":  # resident ones stay through the step and decode
            for module in encoding:
                module.to("cpu")
            encoding.clear()
            gc.collect()
            transformer.to(device)
    phases["denoise_resident_gib"] = held()
    inputs = step_inputs(weights.config, width, height, 1, device)
    phases["step_above_gib"] = _peak_above(device, base, lambda: transformer(**inputs)) - held()
    latents = torch.randn(1, vae.config.latent_channels, height // 8, width // 8, device=device, dtype=DTYPE)
    phases["decode_above_gib"] = _peak_above(device, base, lambda: vae.decode(latents)) - held()
    if plan.components_gib["lora_fuse"] > 0:
        phases["fuse_above_gib"] = (
            _peak_above(device, base, lambda: fuse_lora(transformer, lora, QuantLevel(plan.level), model)) - held()
        )
    above = max(phases["step_above_gib"], phases["decode_above_gib"], phases.get("fuse_above_gib", 0.0))
    peaks = [phases["denoise_resident_gib"] + above]
    if "encode_above_gib" in phases:
        peaks.append(phases["encode_resident_gib"] + phases["encode_above_gib"])
    return {"measured_peak_gib": max(peaks), **phases}


def run_probe(
    out: Path,
    model_name: FluxModel,
    levels: list[QuantLevel],
    sizes: list[tuple[int, int]],
    device: str,
    plan_budgets: list[float] | None = None,
    optimize: Optimize = Optimize.THROUGHPUT,
) -> None:
    """Probe components and levels (or, given budgets, whole plans), appending each row to `out` (JSON lines)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "model": model_name}

    def write(row: dict[str, Any]) -> None:
        with out.open("a") as handle:
            handle.write(json.dumps({**header, **row}) + "\n")
        print(json.dumps(row), flush=True)

    if plan_budgets:
        for width, height in sizes:
            probe_plans(model_name, plan_budgets, width, height, device, write, optimize)
        return
    if MODELS[model_name].family in (FluxFamily.FLUX_1, FluxFamily.FLUX_1_KONTEXT):
        probe_components(sizes, device, write)
    probe_levels(model_name, levels, sizes, device, write)
