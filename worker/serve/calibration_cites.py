"""Which calibration a worker's images cite: the newest one of exactly its weights, level and fast paths
(shared/calibration.py), read from Redis at most once a minute per loaded model, so a calibration measured
while the worker runs is cited within a minute and Redis is not read per image."""

from __future__ import annotations

import json
import logging
import time

import redis

from fluxfarm.shared.calibration import find_calibration
from fluxfarm.shared.metadata import CalibrationCite
from fluxfarm.worker.model.pipeline import LoadedModel
from fluxfarm.worker.serve.redis_writes import unless_redis_is_down

log = logging.getLogger(__name__)

REFRESH_S = 60.0


class CalibrationCites:
    def __init__(self, client: redis.Redis, refresh_s: float = REFRESH_S) -> None:
        self._redis = client
        self._refresh_s = refresh_s
        self._known: dict[str, tuple[float, CalibrationCite | None]] = {}

    def for_model(self, model: LoadedModel) -> CalibrationCite | None:
        paths = model.fast_paths.model_dump()
        key = json.dumps([model.info.transformer_sha256, model.level.value, paths], sort_keys=True)
        read_at, cite = self._known.get(key, (float("-inf"), None))
        if time.monotonic() - read_at < self._refresh_s:
            return cite
        found: list[CalibrationCite | None] = [cite]

        def read() -> None:
            row = find_calibration(self._redis, model.info.transformer_sha256, model.level.value, paths)
            found[0] = row.cite() if row else None

        unless_redis_is_down(read, "calibration lookup")  # an image never waits on Redis for its citation
        self._known[key] = (time.monotonic(), found[0])
        return found[0]
