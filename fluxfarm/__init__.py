"""fluxfarm: a distributed render farm for FLUX text-to-image.

The public API a program needs to submit jobs and wait for their results:

    from fluxfarm import FarmClient, RenderJob

The names load on first use (PEP 562), so `import fluxfarm.worker` on a GPU host does not pay for the
client's imports and `import fluxfarm` stays cheap. The installed packages are `fluxfarm.shared` (the
vocabulary both sides import), `fluxfarm.producer` (the client) and `fluxfarm.worker` (the GPU worker,
which needs the `[gpu]` extra); in the repository they are the top-level folders `shared/`, `producer/`
and `worker/`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxfarm.producer.client import FarmClient
    from fluxfarm.producer.dataset_stream import DatasetOutcome
    from fluxfarm.producer.job_handles import JobBatch, JobHandle
    from fluxfarm.producer.settings import ProducerSettings
    from fluxfarm.shared import __version__
    from fluxfarm.shared.errors import (
        FarmError,
        InvalidJob,
        InvalidSettings,
        JobCancelled,
        JobDeadLettered,
        JobFailed,
        ObjectNotFound,
        StorageError,
    )
    from fluxfarm.shared.jobs import RenderJob
    from fluxfarm.shared.metadata import RenderResult
    from fluxfarm.shared.settings import FarmSettings

# Each public name, and the module that defines it.
_EXPORTS: dict[str, str] = {
    "FarmClient": "fluxfarm.producer.client",
    "JobHandle": "fluxfarm.producer.job_handles",
    "JobBatch": "fluxfarm.producer.job_handles",
    "DatasetOutcome": "fluxfarm.producer.dataset_stream",
    "RenderJob": "fluxfarm.shared.jobs",
    "RenderResult": "fluxfarm.shared.metadata",
    "FarmSettings": "fluxfarm.shared.settings",
    "ProducerSettings": "fluxfarm.producer.settings",
    "FarmError": "fluxfarm.shared.errors",
    "InvalidJob": "fluxfarm.shared.errors",
    "InvalidSettings": "fluxfarm.shared.errors",
    "JobFailed": "fluxfarm.shared.errors",
    "JobDeadLettered": "fluxfarm.shared.errors",
    "JobCancelled": "fluxfarm.shared.errors",
    "StorageError": "fluxfarm.shared.errors",
    "ObjectNotFound": "fluxfarm.shared.errors",
    "__version__": "fluxfarm.shared",
}

__all__ = [  # noqa: RUF022 (grouped as _EXPORTS is)
    "FarmClient",
    "JobHandle",
    "JobBatch",
    "DatasetOutcome",
    "RenderJob",
    "RenderResult",
    "FarmSettings",
    "ProducerSettings",
    "FarmError",
    "InvalidJob",
    "InvalidSettings",
    "JobFailed",
    "JobDeadLettered",
    "JobCancelled",
    "StorageError",
    "ObjectNotFound",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fluxfarm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
