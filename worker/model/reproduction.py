"""The worker's side of an image's reproducibility record (shared/metadata.py's Reproduction): what a
loaded model contributes (weights by sha256, how its level was made, scheduler, kernels, libraries, card),
read once at load; the engine adds each image's place in its batch."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fluxfarm.shared import package_version
from fluxfarm.shared.metadata import Reproduction
from fluxfarm.worker.model.file_digest import DigestCache, folder_digest, weight_files

if TYPE_CHECKING:
    from fluxfarm.worker.model.pipeline import LoadedModel

COMPONENTS = ("text_encoder", "text_encoder_2", "vae")
"""Pipeline folders hashed beside the transformer (FLUX.2 has no text_encoder_2)."""


def weight_digests(base: Path, transformer_file: Path | None, digests: DigestCache) -> dict[str, str]:
    """sha256 of the transformer (`transformer_file`, or the pipeline folder's own `transformer/` shards as one
    digest) and of each component folder (COMPONENTS) under `base`: every file hashed in one parallel pass."""
    folders = {name: weight_files(base / name) for name in ("transformer", *COMPONENTS) if (base / name).is_dir()}
    if transformer_file is None and not folders.get("transformer"):
        raise FileNotFoundError(f"no *.safetensors files in {base / 'transformer'}")
    if transformer_file is not None:
        folders.pop("transformer", None)
    files = [path for group in folders.values() for path in group]
    known = digests.sha256_all([*files, *([transformer_file] if transformer_file is not None else [])])
    found = {name: folder_digest(group, known) for name, group in folders.items() if group}
    if transformer_file is not None:
        found["transformer"] = known[transformer_file.resolve()]
    return found


@cache
def library_versions() -> dict[str, str]:
    """Read once a process: looking packages up costs milliseconds, and they do not change under it."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "triton": package_version("triton"),
        "cuda": torch.version.cuda or "none",
        "cudnn": str(cudnn) if cudnn else "none",
    }


def scheduler_record(scheduler: Any) -> dict[str, Any]:
    """The scheduler's class and config, as JSON values."""
    config = {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}
    return {"class": type(scheduler).__name__, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}


@cache
def device_record(device: str) -> tuple[str | None, str | None]:
    """(GPU name, compute capability) of a CUDA device; (None, None) on a CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None, None
    return torch.cuda.get_device_name(dev), ".".join(map(str, torch.cuda.get_device_capability(dev)))


def reproduction(model: LoadedModel, batch_size: int, batch_position: int) -> Reproduction:
    """An image's record: what `model` contributes, and where the image was in its batch."""
    gpu, capability = device_record(model.device)
    paths = model.fast_paths.model_dump()
    return Reproduction(
        weights_sha256=model.weights_sha256,
        level_source=model.level_source,
        text_encoder_precision=model.text_encoder_precision,
        text_encoders=model.text_encoders,
        vae_tiling=model.vae_tiling,
        scheduler=scheduler_record(model.pipe.scheduler),
        fast_paths={**paths, "fp8_fast_accumulation": paths["fp8_tensor_core_layers"] > 0},
        versions=dict(library_versions()),
        gpu=gpu,
        compute_capability=capability,
        batch_size=batch_size,
        batch_position=batch_position,
        deterministic=model.deterministic,
    )
