"""`fluxfarm rerender DATASET JOB_ID --model DIR`: render a stored job again on this machine and say how far the
new image is from the stored one, and which parts of the stored reproducibility record this worker does not
match (a weight file, the level, a kernel, a library, the card, the batch the image was rendered in).

Identical pixels are expected only where nothing differs and both renders ran under FLUXFARM_DETERMINISTIC;
anything else is reported as it is measured (PSNR, largest pixel difference), never judged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import RenderResult, Reproduction, read_result
from fluxfarm.shared.storage import ObjectStore
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.model.reproduction import reproduction
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.image_agreement import agreement, pixels


class RerenderReport(BaseModel):
    dataset: str
    job_id: str
    identical: bool
    psnr_db: float | None
    """None when identical (infinite)."""
    max_abs_diff: int
    mismatches: list[str]
    """Each field of the stored record this render did not match, as `field: stored -> now`."""


def record_mismatches(stored: Reproduction | None, now: Reproduction, stored_level: str, level: str) -> list[str]:
    """Every field of the stored record the new render differs in (batch place included)."""
    if stored is None:
        return ["reproduction: the stored metadata has no record (rendered by fluxfarm < 0.2)"]
    found = [f"level: {stored_level} -> {level}"] if stored_level != level else []
    before, after = stored.model_dump(), now.model_dump()
    for name, value in before.items():
        if isinstance(value, dict):
            keys = sorted(set(value) | set(after[name]))
            found += [
                f"{name}.{key}: {value.get(key)} -> {after[name].get(key)}"
                for key in keys
                if value.get(key) != after[name].get(key)
            ]
        elif value != after[name]:
            found.append(f"{name}: {value} -> {after[name]}")
    return found


def rerender(
    store: ObjectStore,
    dataset: str,
    job_id: str,
    model: str,
    transformer: str | None,
    device: str,
    settings: WorkerSettings,
    level: QuantLevel | None = None,
) -> RerenderReport:
    """Render the stored job `job_id` of `dataset` again with `model` (and `transformer`) on `device`."""
    keys = store.result_keys(dataset, job_id)
    stored: RenderResult = read_result(store, keys)
    reference = pixels(store.get(keys.image))
    record = stored.reproduction
    wanted = level or (QuantLevel(stored.quant) if record and record.level_source == "derived-from-bf16" else None)
    loaded = load_model(
        model,
        transformer,
        device,
        settings,
        level=wanted,
        text_encoders=record.text_encoders if record else "gpu",  # type: ignore[arg-type]
        text_encoder_precision=record.text_encoder_precision if record else "bf16",  # type: ignore[arg-type]
        vae_tiling=record.vae_tiling if record else False,
        flux_model=stored.job.model,
    )
    rendered = RenderEngine(loaded, max_batch=1, embedding_cache=0, settings=settings).render(stored.job)
    image = pixels(rendered.png)
    now = reproduction(loaded, rendered.batch_size, rendered.batch_position)
    mismatches = record_mismatches(record, now, stored.quant, loaded.level)
    if image.shape != reference.shape:
        return RerenderReport(
            dataset=dataset,
            job_id=job_id,
            identical=False,
            psnr_db=None,
            max_abs_diff=255,
            mismatches=[*mismatches, f"image size: {reference.shape} -> {image.shape}"],
        )
    psnr, _ = agreement(image, reference)
    diff = int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())
    return RerenderReport(
        dataset=dataset,
        job_id=job_id,
        identical=diff == 0,
        psnr_db=None if math.isinf(psnr) else psnr,
        max_abs_diff=diff,
        mismatches=mismatches,
    )


def report_lines(report: RerenderReport) -> list[str]:
    """The report as a person reads it."""
    if report.identical:
        head = f"{report.dataset}/{report.job_id}: identical to the stored image"
    else:
        head = (
            f"{report.dataset}/{report.job_id}: differs from the stored image "
            f"(PSNR {report.psnr_db:.2f} dB, largest pixel difference {report.max_abs_diff})"
            if report.psnr_db is not None
            else f"{report.dataset}/{report.job_id}: differs from the stored image"
        )
    lines: list[Any] = [head]
    lines += [f"  not matched: {mismatch}" for mismatch in report.mismatches]
    return lines
