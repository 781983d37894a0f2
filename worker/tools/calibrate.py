"""`fluxfarm calibrate`: how far each level renders from bf16 on these weights and this card, measured.

Renders a probe set (a prompt file, or the small set below) at bf16 and at each asked level, loaded as a
worker loads it (catalog, loadout, fast paths), and reports per level the mean PSNR and SSIM against the
bf16 images of the same jobs, and a perceptual distance (LPIPS) only where its weights are already present
on this machine: otherwise the row says it was not measured. Rows are kept in the farm's Redis
(`fluxfarm:calibrations`), one per (transformer weights, level, fast paths), for workers to cite.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from fluxfarm.shared.calibration import Calibration
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import WorkerInfo
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.storage import CALIBRATION_DATASET
from fluxfarm.worker.serve.engine_loader import EngineLoader
from fluxfarm.worker.serve.metrics import WorkerMetrics
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.image_agreement import pixels

PROBE_PROMPTS = (
    "a lighthouse on a cliff at dawn, waves breaking below",
    "a bowl of ripe figs on a wooden table, soft window light",
    "a red fox in fresh snow, looking over its shoulder",
    "the facade of a tiled Lisbon building, noon sun",
    "a close-up of a watch movement, gears and jewels",
    "a crowded night market with paper lanterns",
    "a handwritten note that reads 'back at nine' on a fridge",
    "an astronaut reading a book in a sunflower field",
)
"""The default probe set: scenes, textures, fine detail, text and people-free crowds, eight images a level."""
DATASET = CALIBRATION_DATASET


def _chw(array: np.ndarray) -> torch.Tensor:
    """An 8-bit HxWx3 image as a 1x3xHxW tensor in [0, 1], as the metrics take it."""
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).double() / 255.0


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM (torchmetrics: Gaussian window 11, sigma 1.5) of two 8-bit RGB images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_chw(image), _chw(reference), data_range=1.0))


def perceptual_metric() -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """LPIPS where its network weights are already on this machine; else None and why (never a made-up number:
    nothing is downloaded, and a farm machine often cannot)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError as error:
        return None, f"LPIPS unavailable: {error}"
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    except Exception as error:  # its weights are fetched on first use: offline, that fails
        return None, f"LPIPS weights not present on this machine ({type(error).__name__}); not measured"

    def distance(image: np.ndarray, reference: np.ndarray) -> float:
        return float(metric(_chw(image).float(), _chw(reference).float()))

    return distance, "LPIPS (AlexNet)"


def probe_jobs(prompts: Sequence[str], flux_model: FluxModel, width: int, height: int, steps: int) -> list[RenderJob]:
    return [
        RenderJob(prompt=prompt, model=flux_model, width=width, height=height, steps=steps, seed=i, dataset=DATASET)
        for i, prompt in enumerate(prompts)
    ]


def _render(
    loader: EngineLoader, settings: WorkerSettings, level: QuantLevel, jobs: list[RenderJob]
) -> tuple[list[np.ndarray], str, dict[str, Any]]:
    """The probe set rendered at `level`, one job at a time (no batch effects): its pixels, and the
    transformer's sha256 and fast paths; the model is let go before the next level loads."""
    engine, _ = loader.load(settings.model_copy(update={"level": level, "max_batch": 1}))
    images = [pixels(engine.render(job).png) for job in jobs]
    found = engine.model.info.transformer_sha256, engine.model.fast_paths.model_dump()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return images, *found


def _psnr_db(images: list[np.ndarray], reference: list[np.ndarray]) -> float | None:
    """PSNR of the probe set as one (its mean squared error over every image); None where all are identical."""
    mse = np.mean(
        [np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) for a, b in zip(images, reference, strict=True)]
    )
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def calibrate(
    settings: WorkerSettings,
    model: str,
    levels: Sequence[QuantLevel],
    prompts: Sequence[str],
    width: int,
    height: int,
    steps: int,
    device: str,
    on_row: Callable[[Calibration], None],
) -> list[Calibration]:
    """Render the probe set at bf16, then at each of `levels`; a Calibration per level (bf16's own included)."""
    worker = WorkerInfo(node="calibrate", hostname="calibrate", device=device, gpu_name=None, vram_gib=None)
    loader = EngineLoader(settings, model, None, device, worker, WorkerMetrics())
    jobs = probe_jobs(prompts, loader.flux_model, width, height, steps)
    probe = hashlib.sha256(json.dumps([job.prompt for job in jobs]).encode()).hexdigest()
    reference, base_sha, base_paths = _render(loader, settings, QuantLevel.BF16, jobs)
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    distance, metric_note = perceptual_metric()
    rows: list[Calibration] = []
    for level in [QuantLevel.BF16, *(level for level in levels if level != QuantLevel.BF16)]:
        if level == QuantLevel.BF16:
            images, transformer_sha, fast_paths = reference, base_sha, base_paths
        else:
            images, transformer_sha, fast_paths = _render(loader, settings, level, jobs)
        key = {
            "base": base_sha,
            "level": level.value,
            "fast_paths": fast_paths,
            "probe": probe,
            "size": [width, height],
            "steps": steps,
        }
        perceptual = (
            float(np.mean([distance(image, ref) for image, ref in zip(images, reference, strict=True)]))
            if distance
            else None
        )
        row = Calibration(
            id=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(),
            model=model,
            flux_model=loader.flux_model,
            base_transformer_sha256=base_sha,
            level=level.value,
            transformer_sha256=transformer_sha,
            fast_paths=fast_paths,
            gpu=gpu,
            probe_sha256=probe,
            images=len(jobs),
            width=width,
            height=height,
            steps=steps,
            psnr_db=_psnr_db(images, reference),
            ssim=float(np.mean([ssim(image, ref) for image, ref in zip(images, reference, strict=True)])),
            perceptual=perceptual,
            perceptual_metric=metric_note if distance else None,
            perceptual_note=metric_note,
            created_at=datetime.now(UTC),
        )
        rows.append(row)
        on_row(row)
    return rows
