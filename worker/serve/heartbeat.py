"""A daemon thread that keeps this worker's fleet entry alive while the main thread renders."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from fluxfarm.shared.fleet import HEARTBEAT_INTERVAL_S, WorkerStatus, publish_heartbeat, remove_worker
from fluxfarm.shared.periodic import Periodic

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes `snapshot()` every couple of seconds; a Redis hiccup is logged and retried, never fatal."""

    name = "fluxfarm-heartbeat"

    def __init__(self, client: redis.Redis, node: str, snapshot: Callable[[], WorkerStatus]) -> None:
        self._client = client
        self._node = node
        self._snapshot = snapshot
        self._beats = Periodic("fluxfarm-heartbeat", HEARTBEAT_INTERVAL_S, self._beat)

    def start(self) -> Heartbeat:
        self._beats.run_once()
        self._beats.start()
        return self

    def _beat(self) -> None:
        publish_heartbeat(self._client, self._snapshot().model_copy(update={"last_seen": datetime.now(UTC)}))

    def stop(self) -> None:
        """Stop beating and leave the fleet at once (a killed worker leaves when its key expires)."""
        self._beats.stop()
        try:
            remove_worker(self._client, self._node)
        except redis.RedisError as error:
            log.warning("could not remove fleet entry %s: %s", self._node, error)
