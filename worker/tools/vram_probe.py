"""Measure what each FLUX component and quantization level really takes on a GPU.

Builds full-size FLUX.1 with random weights (same bytes and FLOPs as trained ones), then for each
level: the resident transformer, the peak of one denoising step at each size, and the step time;
plus the VAE decode, T5 and CLIP encode peaks. The numbers calibrate and check the VRAM policy
(`worker.plan`). Peaks are `torch.cuda.max_memory_allocated` above the empty baseline: the CUDA
context itself (about 0.5 GiB) is outside them.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import torch
from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFParameter

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.flux_arch import (
    TRANSFORMERS,
    meta_transformer,
    random_clip,
    random_t5,
    random_vae,
    write_transformer_config,
)
from fluxfarm.worker.model.gpu import cap_memory, time_calls
from fluxfarm.worker.model.pipeline import enable_vae_tiling
from fluxfarm.worker.model.plan import VAE_TILE_PX, Plan, PlanInputs, make_plan
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.writer import ggml_type_for

T5_TOKENS = 512
DTYPE = torch.bfloat16


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


def random_master_weights(config: dict[str, Any], device: str, dtype: torch.dtype = DTYPE) -> dict[str, torch.Tensor]:
    """Random weights for every transformer tensor, generated on `device`, kept in host memory."""
    weights = {}
    for name, param in meta_transformer(config).state_dict().items():
        weights[name] = (torch.randn(param.shape, device=device, dtype=dtype) * 0.02).cpu()
    return weights


def gguf_state_dict(master: dict[str, torch.Tensor], level: QuantLevel, device: str) -> dict[str, torch.Tensor]:
    """The master weights as diffusers' GGUF parameters at `level`, encoded on `device`."""
    target = gguf.GGMLQuantizationType[level.value]
    state = {}
    for name, tensor in master.items():
        ggml_type = ggml_type_for(name, tuple(tensor.shape), target)
        if ggml_type == gguf.GGMLQuantizationType.F32:
            state[name] = tensor.float()
        elif ggml_type == gguf.GGMLQuantizationType.F16:
            state[name] = tensor.half()
        else:
            rows = quantize_rows(tensor.reshape(-1, tensor.shape[-1]), ggml_type.name, device)
            state[name] = GGUFParameter(rows.reshape(*tensor.shape[:-1], -1), quant_type=ggml_type)
    return state


def level_state_dict(master: dict[str, torch.Tensor], level: QuantLevel, device: str) -> dict[str, torch.Tensor]:
    """Host-memory weights at `level`: what a worker would read from the level's file."""
    if level in (QuantLevel.BF16, QuantLevel.FP8):
        return master
    return gguf_state_dict(master, level, device)


def load_level(
    state: dict[str, torch.Tensor], level: QuantLevel, config_dir: Path, device: str, dtype: torch.dtype = DTYPE
) -> FluxTransformer2DModel:
    """A transformer at `level` on `device`, the way diffusers loads it (fp8 = e4m3 storage, upcast)."""
    if level in (QuantLevel.BF16, QuantLevel.FP8):
        model = FluxTransformer2DModel.from_single_file(
            state, config=str(config_dir), subfolder="transformer", dtype=dtype
        )
        if level == QuantLevel.FP8:  # quantize on the host: a bf16 copy on the GPU would not fit the card
            to_scaled_fp8(model, dtype)
        return model.to(device)
    model = FluxTransformer2DModel.from_single_file(
        state,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=str(config_dir),
        subfolder="transformer",
        dtype=dtype,
    )
    return model.to(device)


def step_inputs(
    config: dict[str, Any], width: int, height: int, batch: int, device: str, dtype: torch.dtype = DTYPE
) -> dict[str, Any]:
    """Random inputs of one denoising step at `width`x`height`, as FluxPipeline passes them."""
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
    model_name: str,
    levels: Iterable[QuantLevel],
    sizes: Iterable[tuple[int, int]],
    device: str,
    on_row: Callable[[dict[str, Any]], None],
    repeats: int = 5,
) -> None:
    """One row per level: resident GiB, and per size the step's peak GiB and seconds."""
    config = TRANSFORMERS[model_name]
    base = _settle(device)
    master = random_master_weights(config, device)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        config_dir = write_transformer_config(Path(tmp), config)
        for level in levels:
            started = time.perf_counter()
            model = load_level(level_state_dict(master, level, device), level, config_dir, device)
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
    model_name: str,
    budgets: Iterable[float],
    width: int,
    height: int,
    device: str,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """For each budget: make the plan, build exactly that configuration under the budget's memory cap,
    run encode, one step and decode as the plan says, and record the measured peak beside the prediction."""
    config = TRANSFORMERS[model_name]
    capability = torch.cuda.get_device_capability(device)
    base = _settle(device)
    master = random_master_weights(config, device)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        config_dir = write_transformer_config(Path(tmp), config)
        for budget in budgets:
            plan = make_plan(
                PlanInputs(vram_gib=budget, width=width, height=height, model=model_name, compute_capability=capability)
            )
            state = level_state_dict(master, QuantLevel(plan.level), device)  # quantizing is not the worker's cost
            _settle(device)
            cap_memory(device, budget)
            row: dict[str, Any] = {
                "budget_gib": budget,
                "size": f"{width}x{height}",
                "plan": plan.model_dump(exclude={"reasons", "vram_budget_gib"}),
            }
            try:
                row["measured_peak_gib"] = _run_plan(plan, state, config, config_dir, width, height, device, base)
                row["error"] = (plan.predicted_peak_gib - row["measured_peak_gib"]) / row["measured_peak_gib"]
            except torch.cuda.OutOfMemoryError as error:
                row["oom"] = str(error).splitlines()[0]
            on_row(row)
            del state
            _settle(device)
            cap_memory(device, None)


def _run_plan(
    plan: Plan,
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    config_dir: Path,
    width: int,
    height: int,
    device: str,
    base: int,
) -> float:
    """Build the planned configuration, run encode, a step and decode as planned; the peak GiB above base."""
    transformer = load_level(state, QuantLevel(plan.level), config_dir, device)
    vae = random_vae(device, DTYPE)
    if plan.vae_tiling:
        enable_vae_tiling(vae, VAE_TILE_PX)
    torch.cuda.reset_peak_memory_stats(device)
    if plan.text_encoders != "cpu":  # on "cpu" the encoders never touch the GPU
        if plan.text_encoders == "gpu-swap":
            transformer.to("cpu")
        t5, clip = random_t5(device, DTYPE), random_clip(device, DTYPE)
        t5(torch.randint(0, 1000, (1, T5_TOKENS), device=device))
        clip(torch.randint(0, 1000, (1, 77), device=device))
        if plan.text_encoders == "gpu-swap":
            del t5, clip
            gc.collect()
            transformer.to(device)
    transformer(**step_inputs(config, width, height, 1, device))
    vae.decode(torch.randn(1, 16, height // 8, width // 8, device=device, dtype=DTYPE))
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def run_probe(
    out: Path,
    model_name: str,
    levels: list[QuantLevel],
    sizes: list[tuple[int, int]],
    device: str,
    plan_budgets: list[float] | None = None,
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
            probe_plans(model_name, plan_budgets, width, height, device, write)
        return
    probe_components(sizes, device, write)
    probe_levels(model_name, levels, sizes, device, write)
