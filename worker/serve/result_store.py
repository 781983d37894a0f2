"""Store one job's PNG and metadata so that a job id has exactly one stored result, whoever races.

The claim (worker/serve/leases.py) keeps a second worker from rendering a job that is being rendered; this
is the check for when a claim lapsed anyway (a worker frozen past its lease, a Redis that lost its
last second of writes). The PNG goes first, then the JSON with a conditional put (`If-None-Match: *`):
one writer's JSON wins. The loser reads what won and makes the pair agree: if the stored JSON
describes the stored PNG (same sha256) it is the result; if the PNG is the loser's own (it replaced
the winner's), the loser's JSON replaces the winner's. A reader never keeps a JSON whose PNG differs.
Every call retries an unreachable store (worker/serve/storage_retry.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from pydantic import ValidationError

from fluxfarm.shared.errors import ObjectExists, ObjectNotFound
from fluxfarm.shared.metadata import RenderResult, read_result
from fluxfarm.shared.storage import JSON_CONTENT_TYPE, PNG_CONTENT_TYPE, ObjectStore, ResultKeys
from fluxfarm.worker.serve.storage_retry import with_storage_retries

log = logging.getLogger(__name__)

_RECONCILE_ROUNDS = 3


class ResultStore:
    """The worker's reads and writes of job results, each retried for `retry_s` if the store is down."""

    def __init__(self, store: ObjectStore, retry_s: float) -> None:
        self.store = store
        self.retry_s = retry_s

    def stored(self, keys: ResultKeys) -> RenderResult | None:
        """The job's stored result, or None (also when its JSON is unreadable: it is rendered again)."""
        try:
            return with_storage_retries(lambda: read_result(self.store, keys), f"reading {keys.metadata}", self.retry_s)
        except ObjectNotFound:
            return None
        except ValidationError:
            log.warning("stored metadata %s is unreadable; rendering the job again", keys.metadata)
            return None

    def put_image(self, keys: ResultKeys, png: bytes, metadata: dict[str, str]) -> None:
        with_storage_retries(
            lambda: self.store.put(keys.image, png, PNG_CONTENT_TYPE, metadata), f"storing {keys.image}", self.retry_s
        )

    def _put_json(self, keys: ResultKeys, result: RenderResult, if_absent: bool) -> None:
        data = result.model_dump_json(indent=2).encode()
        with_storage_retries(
            lambda: self.store.put(keys.metadata, data, JSON_CONTENT_TYPE, if_absent=if_absent),
            f"storing {keys.metadata}",
            self.retry_s,
        )

    def _stored_image_sha256(self, keys: ResultKeys) -> str | None:
        try:
            data = with_storage_retries(lambda: self.store.get(keys.image), f"reading {keys.image}", self.retry_s)
        except ObjectNotFound:
            return None
        return hashlib.sha256(data).hexdigest()

    def put_result(
        self, keys: ResultKeys, result: RenderResult, png: bytes, png_metadata: Callable[[], dict[str, str]]
    ) -> RenderResult:
        """Store the JSON after its PNG (already stored); returns the result that is stored for the job."""
        for _ in range(_RECONCILE_ROUNDS):
            try:
                self._put_json(keys, result, if_absent=True)
                return result
            except ObjectExists:
                pass
            stored, image_sha = self.stored(keys), self._stored_image_sha256(keys)
            if stored is not None and stored.image.sha256 == image_sha:
                log.warning("job %s was stored by %s first; keeping that result", result.job_id, stored.worker.node)
                return stored
            if image_sha == result.image.sha256:
                log.warning("job %s: the stored JSON described another PNG; storing the pair of ours", result.job_id)
                self._put_json(keys, result, if_absent=False)
                return result
            self.put_image(keys, png, png_metadata())  # a third writer's PNG: ours again, then retry
        raise ObjectExists(f"{keys.metadata}: writers kept racing for it")
