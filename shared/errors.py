"""One error tree for the farm, so callers can catch `FarmError` and know it came from us."""

from __future__ import annotations


class FarmError(Exception):
    """Base class of every error fluxfarm raises on purpose."""


class InvalidJob(FarmError, ValueError):
    """A job failed validation: at the client, at the CLI, or again at the worker.

    `problems`: (field path, reason) pairs where validation named them (`width`, `loras.0.weight`), for
    callers that answer per field (the gateway's JSON errors); the message says the same in one line."""

    def __init__(self, message: str, problems: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class JobConflict(InvalidJob):
    """A job id already names another job of its dataset (stored, queued or running) with other
    parameters. Nothing is sent, and the other job's result stays its own: an explicit `job_id` cannot
    pre-fill or take over a result."""

    @classmethod
    def naming(cls, dataset: str, job_id: str, where: str) -> JobConflict:
        """The conflict for a job whose id already names another job `where` (stored, queued, ...)."""
        return cls(
            f"dataset {dataset}: job id {job_id} already names another job ({where}) with other parameters; "
            "give this job another job_id, or leave job_id out to use its content id"
        )


class AccessDenied(FarmError):
    """The gateway refused the caller: no token, an unknown or revoked one (401), or one whose grant does
    not reach what was asked (403)."""


class QuotaExceeded(FarmError):
    """The gateway refused a submit past the token's quota (429); the message says which."""


class JobFailed(FarmError):
    """The worker tried the job and reported a failure; the message is the worker's reason."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class RenderAttemptFailed(FarmError):
    """One attempt at a job failed and it has attempts left: the message goes back to the queue."""


class JobDeadLettered(FarmError):
    """The farm gave up on a job after its attempts; its dead letter holds the reason and the job."""


class JobCancelled(FarmError):
    """The job's dataset was cancelled while it waited: the worker dropped it without rendering."""


class StorageError(FarmError):
    """The object store refused or could not be reached."""


class ObjectNotFound(StorageError, KeyError):
    """The key is not in the object store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object not found"


class ObjectExists(StorageError):
    """A put meant only for a new object found one already there (a concurrent or earlier writer)."""


class ModelLoadError(FarmError):
    """The worker could not resolve or load the model it was asked to serve."""


class ModelMissing(ModelLoadError):
    """The named model file or folder does not exist at its source (not a transient failure to reach it)."""


class JobInputError(FarmError):
    """A job's own inputs (a LoRA, a ControlNet, a control image) cannot be used: missing, of another
    architecture, too large. Another attempt would fail the same way, so the job fails at once."""


class InvalidSettings(FarmError, ValueError):
    """A `FLUXFARM_*` setting (or a keyword given for one) does not validate: one line naming each variable and
    the reason, never its value (a setting may be a secret), where pydantic would print a traceback."""


class PlaceholderSecret(FarmError):
    """A secret is still the placeholder of infra/env.example: the farm refuses to start open."""
