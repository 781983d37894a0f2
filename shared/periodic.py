"""Background duties (the worker's heartbeat, lease renewal and lost-job sweep; the gateway's export leases),
each a daemon thread that runs its action every interval. An error is logged and the next beat tries again:
no duty may end its thread (a lease thread that died would give every job the worker holds away)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)


class Periodic:
    """`action()` every `interval_s` seconds from `start()` until `stop()`."""

    def __init__(self, name: str, interval_s: float, action: Callable[[], object]) -> None:
        self.name = name
        self._interval_s = interval_s
        self._action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a duty started late may never have been)
            self._thread.join(timeout=max(5.0, 2 * self._interval_s))

    def run_once(self) -> None:
        try:
            self._action()
        except redis.RedisError as error:
            log.warning("%s: Redis unreachable (%s); next try in %.0fs", self.name, error, self._interval_s)
        except Exception:
            log.exception("%s failed; next try in %.0fs", self.name, self._interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.run_once()
