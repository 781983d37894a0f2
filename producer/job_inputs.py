"""Job inputs leave the broker: an inline control image over `INLINE_KEEP_BYTES` is stored in the farm's
storage at submit, and the job names it by digest.

A 1 MiB inline image cost 3.5 MiB of Redis per job (the queue message and the dataset record's copy,
base64 both) and a lost-job sweep held every copy in memory. Stored once per dataset and digest, the
same image used by many jobs is uploaded once, and the message stays a few hundred bytes. The job id
is taken from the job as sent (a digest names the image as surely as its bytes), so resubmitting the
same image finds the same job.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from fluxfarm.shared.adapters import INLINE_KEEP_BYTES, STORED_INPUT_PREFIX, inline_png
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.storage import ObjectStore

_IMAGE_TYPE = "image/png"


REMEMBERED_INPUTS = 10_000
"""Stored inputs a stager remembers, the most recently used: a gateway's lives as long as the gateway."""


class InputStager:
    """Stores the inputs of the jobs a client sends; remembers the inputs it stored last, so a stream of
    jobs that share an image asks storage once, and a long-lived client (the gateway's) stays bounded."""

    def __init__(self, store: ObjectStore, remember: int = REMEMBERED_INPUTS) -> None:
        self._store = store
        self._stored: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def store(self, dataset: str, data: bytes, content_type: str = _IMAGE_TYPE) -> str:
        """Store `data` as an input of `dataset` (once per digest); returns the `sha256:<hex>` naming it."""
        digest = hashlib.sha256(data).hexdigest()
        key = self._store.input_key(dataset, digest)
        if key in self._stored:
            self._stored.move_to_end(key)
        else:
            if not self._store.exists(key):
                self._store.put(key, data, content_type)
            self._stored[key] = None
            if len(self._stored) > self._remember:
                self._stored.popitem(last=False)
        return STORED_INPUT_PREFIX + digest

    def stage(self, job: RenderJob) -> RenderJob:
        """`job` as it is sent: each large inline image (a control image, an input image) replaced by the
        digest of its stored copy."""
        control = job.controlnet.control_image if job.controlnet is not None else None
        staged_control = self._stage_image(job.dataset, control) if control is not None else None
        staged_images = [self._stage_image(job.dataset, source) for source in job.images]
        if staged_control is None and not any(staged_images):
            return job  # the common case, on every job of a stream: no copy of the job made
        fields = job.model_dump(mode="json")
        if staged_control is not None:
            fields["controlnet"]["control_image"] = staged_control
        fields["images"] = [staged or source for staged, source in zip(staged_images, job.images, strict=True)]
        if not job.named:
            del fields["job_id"]  # the content id of the job as sent
        return parse_job(fields)

    def _stage_image(self, dataset: str, source: str) -> str | None:
        """The digest an inline image over INLINE_KEEP_BYTES is sent as, once stored; None to keep it."""
        if not source.startswith("data:"):
            return None
        data = inline_png(source)
        return self.store(dataset, data) if len(data) > INLINE_KEEP_BYTES else None
