"""A full-size random-weight pipeline on disk: the real model's shapes, bytes and FLOPs (random weights drawn on
a GPU, as the bench draws them), written as a diffusers folder a worker loads with `--model DIR`, the text
encoder whole as a checkpoint holds it (the worker trims it as it would a real one). It renders noise; it
exists so the whole farm (load, plan, compile, render, store) is measured on a GPU without the Hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffusers import DiffusionPipeline

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import transformer_config
from fluxfarm.worker.model.flux_arch import meta_transformer, randomize
from fluxfarm.worker.model.pipeline import compute_dtype
from fluxfarm.worker.tools.bench_parts import full_size_components
from fluxfarm.worker.tools.random_weights import STD
from fluxfarm.worker.tools.tiny_model import build_tiny, write_model_folder
from fluxfarm.worker.tools.tiny_parts import flux_scheduler


def random_pipeline(model: FluxModel, device: str) -> DiffusionPipeline:
    """`model`'s pipeline at full size with random weights, drawn on `device`, kept on the host."""
    dtype = compute_dtype(device)
    transformer = randomize(meta_transformer(transformer_config(model)).to(dtype), device, dtype, STD).cpu()
    components = full_size_components(model, device, dtype, trimmed=False)
    family = MODELS[model].family
    extra = {"is_distilled": True} if family == FluxFamily.FLUX_2_KLEIN else {}
    pipeline_class: type[DiffusionPipeline] = FAMILIES[family].pipeline
    return pipeline_class(scheduler=flux_scheduler(), transformer=transformer, **components, **extra)


def write_random_model(
    out_dir: Path, model: FluxModel, device: str, levels: Sequence[QuantLevel] = (), tiny: bool = False
) -> Path:
    """Write `model` at full size (`tiny`: its family's tiny pipeline, to check the tool) to `out_dir`."""
    pipe = build_tiny(model) if tiny else random_pipeline(model, device)
    about: dict[str, object] = {"size": "tiny" if tiny else "full", "weights": "random"}
    return write_model_folder(out_dir, pipe, model, levels, about, device)
