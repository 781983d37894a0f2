"""A daemon thread that keeps this worker's fleet entry alive while the main thread renders."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import redis

from shared.fleet import HEARTBEAT_INTERVAL_S, WorkerStatus, publish_heartbeat, remove_worker

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes `snapshot()` every couple of seconds; a Redis hiccup is logged and retried, never fatal."""

    def __init__(self, client: redis.Redis, snapshot: Callable[[], WorkerStatus]) -> None:
        self._client = client
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fluxfarm-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def _beat(self) -> None:
        try:
            status = self._snapshot().model_copy(update={"last_seen": datetime.now(UTC)})
            publish_heartbeat(self._client, status)
        except redis.RedisError as error:
            log.warning("heartbeat not published: %s", error)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            self._beat()

    def stop(self, node: str) -> None:
        """Stop beating and leave the fleet at once (a killed worker leaves when its key expires)."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_INTERVAL_S * 2)
        try:
            remove_worker(self._client, node)
        except redis.RedisError as error:
            log.warning("could not remove fleet entry %s: %s", node, error)
