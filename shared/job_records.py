"""What the farm keeps of a job beside its dataset record: what a producer sent (so the farm can send it
again should its message be lost) and what it gave up on (a dead letter, with the reason)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from fluxfarm.shared.jobs import RenderJob, job_payload


class SentJob(BaseModel):
    """What a producer published for a job: enough for the farm to publish it again should its
    message be lost (worker/serve/lost_jobs.py)."""

    model_config = ConfigDict(frozen=True)

    job: dict[str, Any]
    priority: int
    queued_at: str
    keep_result: bool
    tenant: str | None = None
    """The tenant whose queue it was sent to (shared/routing.py): a resend goes there again."""

    @classmethod
    def of(cls, job: RenderJob, priority: int, queued_at: str, keep_result: bool, tenant: str | None = None) -> SentJob:
        return cls(job=job_payload(job), priority=priority, queued_at=queued_at, keep_result=keep_result, tenant=tenant)

    def is_of(self, job: RenderJob) -> bool:
        return self.job == job_payload(job)


class DeadLetter(BaseModel):
    """A job the farm gave up on after its attempts: what it was, why, and where it was last tried."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    job_id: str
    reason: str
    attempts: int
    node: str
    at: datetime
    job: dict[str, Any]
    """The job as the worker validated it: enough to submit it again."""
