"""The Celery task: thin. It hands the message to the job runner and returns the metadata as JSON, less
the job itself: the sender holds the job, and the result backend need not hold its payload again."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore, Reject

from fluxfarm.shared.celery_app import RENDER_TASK
from fluxfarm.shared.errors import InvalidJob, JobCancelled, JobDeadLettered, RenderAttemptFailed
from fluxfarm.worker.serve.job_runner import JobRunner
from fluxfarm.worker.serve.leases import InFlight
from fluxfarm.worker.serve.redis_writes import REDIS_AWAY
from fluxfarm.worker.serve.retry_policy import RetryScheduled


def register_render_task(app: Celery, runner: JobRunner, in_flight: InFlight) -> None:
    """Bind the render task to `app`, closing over the loaded runner (no global model)."""

    @app.task(name=RENDER_TASK, bind=True, throws=(InvalidJob, JobCancelled, JobDeadLettered))
    def render(task: Task, job: Any, queued_at: Any = None) -> dict[str, Any]:
        try:
            with in_flight.running(task.request.id):  # its message's lease is renewed meanwhile
                result = runner.run(job, queued_at)
                return {**result.model_dump(mode="json", exclude={"job"}), "dataset": result.job.dataset}
        except RetryScheduled as error:
            # The delayed-retry set holds the job until its back-off is over: acknowledge the message and
            # leave its result pending (a Reject without requeue would record a final FAILURE).
            raise Ignore() from error
        except RenderAttemptFailed as error:
            # The same message goes back, to the far end of its queue: other jobs flow meanwhile.
            raise Reject(str(error), requeue=True) from error
        except REDIS_AWAY as error:
            # Redis went away during the job (a restart): nothing about it can be recorded, so it is no failure.
            # Its message goes back; with Redis still away it stays unacknowledged and returns after its lease.
            # Its reason is the whole story: without the redis-py traceback, which Celery would log a job.
            raise Reject(f"Redis unreachable: {error}", requeue=True) from None
