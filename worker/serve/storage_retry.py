"""Retry a store that cannot be reached, with backoff, for as long as the settings allow.

An S3 outage (a restarting MinIO, a network blip) must not fail the jobs in flight: the worker keeps
its message (the lease keeps it) and tries again, 0.5 s, 1 s, 2 s ... up to 30 s apart, until the
store answers or `FLUXFARM_STORAGE_RETRY_S` is spent. Answers are not retried: a missing object, a
lost conditional put.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from fluxfarm.shared.errors import ObjectExists, ObjectNotFound, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0


def with_storage_retries(action: Callable[[], T], what: str, budget_s: float) -> T:
    """`action()`, retried on StorageError (other than an answer) until `budget_s` seconds have passed."""
    deadline = time.monotonic() + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            return action()
        except (ObjectNotFound, ObjectExists):
            raise
        except StorageError as error:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(delay, left)
            log.warning("%s failed (%s); retrying in %.1fs", what, error, pause)
            time.sleep(pause)
            delay = min(delay * 2, MAX_DELAY_S)
