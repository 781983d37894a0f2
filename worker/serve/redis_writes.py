"""Bookkeeping writes a worker may lose: storage holds the truth, Redis the farm's view of it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError)
"""Errors that say Redis cannot be reached now (a restart, a network cut), not that it refused a command: a job
that meets one goes back to its queue (worker/serve/tasks.py, worker/serve/thread_pool.py)."""


def unless_redis_is_down(action: Callable[[], object], what: str) -> bool:
    """Run a bookkeeping write; if Redis cannot be reached or does not answer in time (REDIS_AWAY), or is full
    (maxmemory, noeviction), log it and go on (False): storage holds the result, and a redelivery finds it there
    and records it."""
    try:
        action()
    except REDIS_AWAY as error:
        log.warning("%s not written, Redis is unreachable or did not answer: %s", what, error)
    except redis.exceptions.OutOfMemoryError as error:
        log.warning("%s not written, Redis is full: %s", what, error)
    else:
        return True
    return False
