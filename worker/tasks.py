"""The Celery task: thin. It hands the message to the job runner and returns the metadata as JSON."""

from __future__ import annotations

from typing import Any

from celery import Celery

from shared.celery_app import RENDER_TASK
from shared.errors import InvalidJob, JobCancelled
from worker.job_runner import JobRunner


def register_render_task(app: Celery, runner: JobRunner) -> None:
    """Bind the render task to `app`, closing over the loaded runner (no global model)."""

    @app.task(name=RENDER_TASK, throws=(InvalidJob, JobCancelled))
    def render(job: Any, queued_at: Any = None) -> dict[str, Any]:
        return runner.run(job, queued_at).model_dump(mode="json")
