"""A full-size random-weight pipeline on disk: the real model's shapes, bytes and FLOPs (random weights drawn on
a GPU, as the bench draws them), written as a diffusers folder a worker loads with `--model DIR`, the text
encoder whole as a checkpoint holds it (the worker trims it as it would a real one). It renders noise; it
exists so the whole farm (load, plan, compile, render, store) is measured on a GPU without the Hub.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from diffusers import DiffusionPipeline

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxModel
from fluxfarm.worker.model.flux2_arch import transformer_config
from fluxfarm.worker.model.pipeline import compute_dtype
from fluxfarm.worker.tools.bench_parts import assemble_pipeline, full_size_components
from fluxfarm.worker.tools.random_weights import SeededWeights
from fluxfarm.worker.tools.tiny_model import build_tiny, write_model_folder


def random_pipeline(model: FluxModel, device: str) -> DiffusionPipeline:
    """`model`'s pipeline at full size with random weights, drawn on `device`, kept on the host; the
    transformer's tensors are the bench's (SeededWeights: each drawn from its name's seed)."""
    dtype = compute_dtype(device)
    with tempfile.TemporaryDirectory() as config_dir:
        weights = SeededWeights(transformer_config(model), dtype, Path(config_dir))
        transformer = weights.transformer(QuantLevel.BF16, device).cpu()
    components = full_size_components(model, device, dtype, trimmed=False)
    return assemble_pipeline(MODELS[model].family, transformer, components)


def write_random_model(
    out_dir: Path, model: FluxModel, device: str, levels: Sequence[QuantLevel] = (), tiny: bool = False
) -> Path:
    """Write `model` at full size (`tiny`: its family's tiny pipeline, to check the tool) to `out_dir`."""
    pipe = build_tiny(model) if tiny else random_pipeline(model, device)
    about: dict[str, object] = {"size": "tiny" if tiny else "full", "weights": "random"}
    return write_model_folder(out_dir, pipe, model, levels, about, device)
