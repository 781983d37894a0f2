"""What a worker loads: the level (forced, given by the operator's file, or chosen by the VRAM plan),
where its weights come from, and where the text encoders live.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel, parse_level
from fluxfarm.shared.models import LEGACY_MODEL, FluxModel
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.catalog import BASE_WEIGHT_LEVELS, available_levels, load_catalog
from fluxfarm.worker.model.host_memory import available_host_gib
from fluxfarm.worker.model.model_sizes import EncoderPrecision
from fluxfarm.worker.model.plan import Placement, Plan, PlanInputs, make_plan
from fluxfarm.worker.model.sources import resolve_file
from fluxfarm.worker.quant.gguf.writer import gguf_level
from fluxfarm.worker.settings import WorkerSettings


@dataclass(frozen=True)
class Loadout:
    level: QuantLevel
    transformer: str | None
    """The transformer source as named (for the metadata); None means the base model's own bf16 weights."""
    transformer_path: Path | None
    """That source resolved to a local file (downloaded and, where the catalog pins one, sha256-checked)."""
    text_encoders: Placement
    text_encoder_precision: EncoderPrecision
    vae_tiling: bool
    plan: Plan | None
    """None on the CPU, where there is no VRAM to plan."""


def _file_level(path: Path) -> QuantLevel:
    return parse_level(gguf_level(path)) if path.suffix == ".gguf" else QuantLevel.BF16


def _plan_size(settings: WorkerSettings) -> tuple[int, int]:
    width, _, height = settings.plan_size.partition("x")
    return int(width), int(height)


def choose_loadout(
    settings: WorkerSettings,
    model: str,
    transformer: str | None,
    device: str,
    flux_model: FluxModel = LEGACY_MODEL,
) -> Loadout:
    """Decide before loading anything, so a level that cannot fit fails at once and says why. `model` is the
    source the weights come from, `flux_model` the catalog model it is (whose sizes the plan counts)."""
    forced = settings.level
    catalog = load_catalog(settings.catalog)
    path = resolve_file(transformer, settings) if transformer is not None else None
    if path is not None:
        held = _file_level(path)
        derived = forced in (QuantLevel.FP8, QuantLevel.NF4) and held == QuantLevel.BF16
        if forced is not None and forced != held and not derived:
            raise FarmError(f"--level {forced} asked for, but the transformer file {transformer} holds {held}")
        candidates = [forced or held]
    else:
        candidates = available_levels(catalog, model)
        if forced is not None and forced not in candidates:
            raise FarmError(f"no weights for {forced} of {model}: pass --transformer or add it to the catalog")
        if forced is not None:
            candidates = [forced]
    on_gpu = torch.device(device).type == "cuda"
    if forced == QuantLevel.NF4 and not on_gpu:
        raise FarmError(f"--level nf4 needs a CUDA GPU (bitsandbytes quantizes there), not {device}")
    plan = None
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        total_gib = props.total_memory / GIB
        budget = min(settings.vram_budget_gib or total_gib, total_gib)
        width, height = _plan_size(settings)
        plan = make_plan(
            PlanInputs(
                vram_gib=budget,
                width=width,
                height=height,
                model=flux_model,
                compute_capability=(props.major, props.minor),
                gpu_name=props.name,
                forced_level=candidates[0] if len(candidates) == 1 else None,
                available_levels=candidates,
                lora_jobs=settings.lora_jobs,
                optimize=settings.optimize,
                host_gib=settings.host_memory_gib or available_host_gib(),
            )
        )
        level = QuantLevel(plan.level)
    else:
        level = candidates[0] if len(candidates) == 1 else QuantLevel.BF16
    source = transformer
    if source is None and level not in BASE_WEIGHT_LEVELS:
        entry = catalog[model][level]
        source, path = entry.source, resolve_file(entry.source, settings, entry.sha256)
    return Loadout(
        level=level,
        transformer=source,
        transformer_path=path,
        text_encoders=plan.text_encoders if plan else "gpu",
        text_encoder_precision=plan.text_encoder_precision if plan else "bf16",
        vae_tiling=plan.vae_tiling if plan else False,
        plan=plan,
    )
