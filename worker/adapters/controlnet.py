"""ControlNet jobs: the FLUX ControlNet a job names, its control image, and the pipeline that uses both.

The ControlNet loads from the same resolver as every model (a worker folder, hf://, s3://), is
checked against the loaded transformer's architecture, and on every quantized level (fp8, GGUF, NF4)
is stored in scaled fp8 (as DiffSynth does for FLUX ControlNets): half its bf16 bytes on the card a
quantized level was chosen for, computing on fp8 tensor cores where the card has them and upcast per
layer elsewhere. (Not GGUF blocks: a ControlNet is a few blocks, run once per step, and 8 bits keep
its residuals closer to bf16.) One ControlNet stays loaded at a time: a dataset uses one, and each costs 1-4 GB.
Control images are read as every image a job names is (worker/adapters/job_images.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline
from PIL import Image
from safetensors import safe_open

from fluxfarm.shared.adapters import (
    ControlNetSpec,
)
from fluxfarm.shared.errors import FarmError, JobInputError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ControlNetInfo
from fluxfarm.shared.units import GIB
from fluxfarm.worker.adapters.job_images import JobImages
from fluxfarm.worker.model.families import flux1_pipeline_over
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.model.pipeline import compute_dtype
from fluxfarm.worker.model.sources import resolve_job_folder
from fluxfarm.worker.quant.fp8.weights import fp8_tensor_cores_work, to_scaled_fp8, use_fp8_tensor_cores
from fluxfarm.worker.settings import WorkerSettings

log = logging.getLogger(__name__)

CONTROLNET_MARGIN_GIB = 0.5
"""Room a ControlNet's own activations take in a step beside its weights (a 3.3B-parameter one holds
6.15 GiB at bf16 and 3.14 GiB scaled fp8 on an H200: docs/bench/adapter-memory-h200.log)."""


class ControlNetDoesNotFit(FarmError):
    """The ControlNet's weights do not fit the memory this worker's card has free."""


def controlnet_gib(folder: Path, quantized: bool) -> float:
    """What a ControlNet folder's weights hold on the GPU, from its safetensors headers alone: 2 bytes a
    parameter at bf16, 1 (plus a scale per row) as the scaled fp8 a quantized level stores."""
    params = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                params += math.prod(handle.get_slice(name).get_shape())
    return params * (1.0 if quantized else 2.0) / GIB


_MATCHING_CONFIG = ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "pooled_projection_dim")
"""What a ControlNet shares with the transformer it was trained beside: another base model differs here."""


@dataclass(frozen=True)
class LoadedControlNet:
    source: str
    model: FluxControlNetModel
    sha256: str
    pipeline: FluxControlNetPipeline


def _check_architecture(folder: Path, transformer_config: dict, source: str) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise JobInputError(f"ControlNet {source} has no config.json: it is not a diffusers model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise JobInputError(f"ControlNet {source}: config.json is unreadable ({error})") from None
    if config.get("_class_name") != FluxControlNetModel.__name__:
        raise JobInputError(f"ControlNet {source} is a {config.get('_class_name')}, not a FluxControlNetModel")
    for key in _MATCHING_CONFIG:
        if config.get(key) != transformer_config.get(key):
            raise JobInputError(
                f"ControlNet {source} was made for another base model: its {key} is {config.get(key)}, "
                f"this worker's transformer has {transformer_config.get(key)}"
            )


class ControlNets:
    """The ControlNet a worker holds now (at most one) and the control images of its jobs."""

    def __init__(
        self, pipe: FluxPipeline, level: str, device: str, settings: WorkerSettings, images: JobImages
    ) -> None:
        self._pipe = pipe
        self._level = level
        self._device = device
        self._settings = settings
        self._digests = DigestCache(settings.cache_dir)
        self._images = images
        """The engine's reader of job images (its storage opened once for both)."""
        self.loaded: LoadedControlNet | None = None

    def get(self, spec: ControlNetSpec) -> LoadedControlNet:
        if self.loaded is not None and self.loaded.source == spec.source:
            return self.loaded
        self.release()
        folder = resolve_job_folder(spec.source, self._settings, "ControlNet")
        _check_architecture(folder, dict(self._pipe.transformer.config), spec.source)
        quantized = self._level != QuantLevel.BF16.value
        self._check_room(spec.source, controlnet_gib(folder, quantized))
        dtype = compute_dtype(self._device)
        try:
            model = FluxControlNetModel.from_pretrained(folder, dtype=dtype)
            sha256 = self._digests.folder_sha256(folder)
        except (OSError, ValueError, RuntimeError) as error:
            raise JobInputError(f"ControlNet {spec.source} could not be loaded: {error}") from None
        if quantized:
            to_scaled_fp8(model, dtype)  # on the host: the room checked above is the fp8 copy's alone
        model.to(self._device)
        if quantized and fp8_tensor_cores_work(torch.device(self._device)):
            use_fp8_tensor_cores(model)
        pipeline = flux1_pipeline_over(self._pipe, FluxControlNetPipeline, controlnet=model)
        self.loaded = LoadedControlNet(source=spec.source, model=model, sha256=sha256, pipeline=pipeline)
        log.info("loaded ControlNet %s (sha256 %s)", spec.source, sha256[:12])
        return self.loaded

    def _check_room(self, source: str, needed_gib: float) -> None:
        """The VRAM plan leaves a step's working memory, not a ControlNet's weights: one that does not fit
        the card's free memory fails its job (another worker, or a later attempt, may hold it) before a
        byte loads, instead of running the card out of memory mid-render."""
        device = torch.device(self._device)
        if device.type != "cuda":
            return
        free_gib = torch.cuda.mem_get_info(device)[0] / GIB
        if needed_gib + CONTROLNET_MARGIN_GIB > free_gib:
            raise ControlNetDoesNotFit(
                f"ControlNet {source} needs {needed_gib:.2f} GiB at {self._level} and a "
                f"{CONTROLNET_MARGIN_GIB} GiB margin; this worker's card has {free_gib:.2f} GiB free"
            )

    def release(self) -> None:
        """Drop the loaded ControlNet (before another loads, or the worker's weights go)."""
        if self.loaded is not None:
            self.loaded = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def image(self, spec: ControlNetSpec, dataset: str) -> tuple[Image.Image, ControlNetInfo]:
        """The decoded RGB control image (checked for bytes and pixels before decoding) and the metadata
        entry; `dataset` is the job's (where an image stored by digest is)."""
        read = self._images.read(spec.control_image, dataset, "control image")
        loaded = self.get(spec)
        info = ControlNetInfo(
            source=spec.source,
            sha256=loaded.sha256,
            conditioning_scale=spec.conditioning_scale,
            control_mode=spec.control_mode,
            control_image=read.origin,
            control_image_sha256=read.sha256,
        )
        return read.image, info
