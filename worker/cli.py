"""The worker-side commands of `fluxfarm`. Heavy imports (torch, diffusers) wait until a command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.errors import FarmError
from shared.ladder import parse_level
from shared.settings import FarmSettings

_GPU_EXTRA_HINT = "the worker needs the GPU stack: pip install 'fluxfarm[gpu]'"


def _require_gpu_stack() -> None:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise FarmError(f"{_GPU_EXTRA_HINT} ({error})") from None


def worker(
    model: Annotated[
        str | None, typer.Option(help="Diffusers folder or Hugging Face repo id [env: FLUXFARM_MODEL].")
    ] = None,
    transformer: Annotated[
        str | None,
        typer.Option(
            help="Transformer .gguf/.safetensors: path, hf://, https:// or s3:// [env: FLUXFARM_TRANSFORMER]."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Torch device, e.g. cuda:1 [env: FLUXFARM_DEVICE].")] = None,
) -> None:
    """Run a GPU worker: load the pipeline once, then render jobs from the queue until stopped."""
    settings = FarmSettings()
    model = model or settings.model
    if not model:
        raise FarmError("no model: pass --model or set FLUXFARM_MODEL")
    _require_gpu_stack()
    from worker.main import run_worker

    run_worker(settings, model, transformer or settings.transformer, device)


def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the tiny pipeline into.")],
    levels: Annotated[str, typer.Option(help="GGUF levels to write, comma-separated, e.g. Q8_0,Q4_0.")] = "Q8_0,Q4_0",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write an offline tiny FLUX pipeline (random weights) with one GGUF transformer per level.

    It RENDERS NOISE: it exists so the farm runs and is tested without the 24 GB FLUX.1-dev download.

    Use the folder as `--model DIR`, a GGUF file inside it as `--transformer`.
    """
    parsed = [parse_level(name) for name in levels.split(",") if name.strip()]
    _require_gpu_stack()
    from worker.tiny_model import gguf_path, write_tiny_model

    written = write_tiny_model(out_dir, parsed, seed=seed)
    typer.echo(f"tiny FLUX pipeline (renders noise) in {written}")
    for level in parsed:
        typer.echo(f"  {level.value}: {gguf_path(written, level)}")
