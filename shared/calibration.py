"""Calibrations: how far a level renders from bf16 on given weights, card and fast paths (`fluxfarm calibrate`
measures them), kept in the farm's Redis (and its storage) so every worker rendering at that level can cite
its figures in each image's metadata, and exports can filter by them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import redis
from pydantic import BaseModel

from fluxfarm.shared import keys
from fluxfarm.shared.metadata import CalibrationCite
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.storage import JSON_CONTENT_TYPE, ObjectStore


class Calibration(BaseModel):
    """One level's agreement with bf16 on one transformer's weights, card and fast paths."""

    id: str
    """sha256 of what it is valid for: the bf16 transformer's weights, level, fast paths, probe set, size, steps."""
    model: str
    flux_model: FluxModel
    base_transformer_sha256: str
    level: str
    transformer_sha256: str
    fast_paths: dict[str, Any]
    gpu: str | None
    probe_sha256: str
    images: int
    width: int
    height: int
    steps: int
    psnr_db: float | None
    """Over the whole probe set (its mean squared error); None where every image is identical to bf16's."""
    ssim: float
    perceptual: float | None
    perceptual_metric: str | None
    perceptual_note: str
    created_at: datetime

    def cite(self) -> CalibrationCite:
        """What an image's metadata carries of it."""
        return CalibrationCite(
            id=self.id,
            psnr_db=self.psnr_db,
            ssim=self.ssim,
            perceptual=self.perceptual,
            perceptual_metric=self.perceptual_metric,
            images=self.images,
            gpu=self.gpu,
        )


def keep_calibration(client: redis.Redis, row: Calibration, store: ObjectStore | None = None) -> None:
    """Into the farm's Redis, under its id, where workers read it, and into `store` (the farm's storage), where
    it outlives Redis: a later row for the same weights, level and fast paths replaces it in both."""
    if store is not None:
        store.put(store.calibration_key(row.id), row.model_dump_json().encode(), JSON_CONTENT_TYPE)
    client.hset(keys.CALIBRATIONS, row.id, row.model_dump_json())


def read_calibrations(client: redis.Redis) -> list[Calibration]:
    return [Calibration.model_validate_json(raw) for raw in client.hvals(keys.CALIBRATIONS)]


def find_calibration(
    client: redis.Redis, transformer_sha256: str, level: str, fast_paths: dict[str, Any]
) -> Calibration | None:
    """The newest calibration of exactly these weights, level and fast paths; None when there is none."""
    found = [
        row
        for row in read_calibrations(client)
        if (row.transformer_sha256, row.level, row.fast_paths) == (transformer_sha256, level, fast_paths)
    ]
    return max(found, key=lambda row: row.created_at, default=None)
