"""`POST /v1/datasets/{name}/files`: a prompt file uploaded as a dataset, checked row by row as
`fluxfarm submit FILE` checks it (`dry_run`, `skip_invalid`), then streamed into the queue.

The body is spooled to a temporary file as it arrives (never whole in memory; refused past
FLUXFARM_GATEWAY_MAX_UPLOAD_MIB), then read twice from disk like the CLI's file: a check, then the submit."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.auth import Caller, check_datasets, check_priority
from fluxfarm.producer.gateway.errors import ApiError, error_responses
from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.producer.gateway.tokens import TokenRecord
from fluxfarm.producer.gateway.usage import TokenUsage
from fluxfarm.producer.job_files import FileJob, RowError, iter_file_jobs
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import RenderJob, parse_dataset_name, parse_job
from fluxfarm.shared.units import MIB

ROW_ERRORS_SHOWN = 100
"""Bad rows named one by one in an answer; past this many only their number is given."""
MAX_SEEDS = 1000
MAX_DEFAULTS_CHARS = 4096

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses=error_responses(401, 403, 413, 422, 429, 503, 507),
)


class FileFormat(StrEnum):
    """What the upload holds: a prompt a line, a job a line, a CSV with a header, or parquet."""

    TXT = "txt"
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class RowProblem(BaseModel):
    line: int
    """The file's line (parquet: its row, from 1)."""
    reason: str


class Uploaded(BaseModel):
    """What the file held and what became of it (nothing is enqueued on a dry run, nor when a row is bad
    without `skip_invalid`)."""

    dataset: str
    valid: int
    invalid: int
    errors: list[RowProblem]
    """The first bad rows, up to ROW_ERRORS_SHOWN."""
    dry_run: bool
    enqueued: int = 0
    already_stored: int = 0
    already_waiting: int = 0


async def _spool(request: Request, path: Path, limit: int) -> None:
    """Write the body to `path` as it arrives; 413 past `limit` bytes (by its Content-Length first)."""
    too_large = ApiError(413, "too_large", f"the upload is over the gateway's limit of {limit // MIB} MiB")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    size = 0
    with path.open("wb") as sink:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            sink.write(chunk)


def _defaults(text: str | None, dataset: str) -> dict[str, Any]:
    """The job fields every row starts from (the CLI's options), checked on their own first: bad defaults
    are one error, not one per row."""
    try:
        fields = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise InvalidJob(f"defaults: not JSON ({error.msg})", (("defaults", "not JSON"),)) from None
    if not isinstance(fields, dict):
        raise InvalidJob("defaults: must be a JSON object", (("defaults", "must be a JSON object"),))
    fields = {**fields, "dataset": dataset}
    try:
        parse_job({"prompt": "-", **fields})
    except InvalidJob as error:
        pairs = tuple((f"defaults.{field}", reason) for field, reason in error.problems)
        raise InvalidJob(f"defaults: {error}", pairs) from None
    return fields


def _rows(path: Path, defaults: dict[str, Any], seeds: int) -> Iterator[FileJob | RowError]:
    """The file's jobs, all in the URL's dataset: a row that names another is a bad row."""
    dataset = defaults["dataset"]
    for item in iter_file_jobs(path, defaults, seeds):
        if isinstance(item, FileJob) and item.job.dataset != dataset:
            yield RowError(item.line, f"dataset: this upload is for dataset {dataset}, not {item.job.dataset}")
        else:
            yield item


def _submit(
    client: FarmClient,
    usage: TokenUsage,
    record: TokenRecord,
    path: Path,
    defaults: dict[str, Any],
    options: tuple[bool, bool, Priority, int],
) -> Uploaded:
    dry_run, skip_invalid, priority, seeds = options
    dataset = defaults["dataset"]
    valid, problems = 0, []
    for item in _rows(path, defaults, seeds):
        if isinstance(item, RowError):
            problems.append(RowProblem(line=item.line, reason=item.reason))
        else:
            valid += 1
    shown = problems[:ROW_ERRORS_SHOWN]
    if problems and not skip_invalid and not dry_run:
        raise InvalidJob(
            f"{len(problems)} invalid rows; nothing was enqueued (skip_invalid=true enqueues the rest)",
            tuple((f"line {problem.line}", problem.reason) for problem in shown),
        )
    outcome = Uploaded(dataset=dataset, valid=valid, invalid=len(problems), errors=shown, dry_run=dry_run)
    if dry_run:
        return outcome

    def jobs() -> Iterator[RenderJob]:
        yield from (item.job for item in _rows(path, defaults, seeds) if isinstance(item, FileJob))

    with usage.room_for(record, valid):
        counts = client.for_tenant(record.name).submit_stream(jobs(), priority=priority)
        usage.note_submitted(record.name, Counter({dataset: valid}), counts.enqueued)
    client.datasets.set_defaults(dataset, defaults)
    client.store_manifest(client.dataset_record(dataset))
    audit(client.redis, "submit-file", record.name, dataset=dataset, enqueued=counts.enqueued, priority=priority)
    return outcome.model_copy(
        update={
            "enqueued": counts.enqueued,
            "already_stored": counts.already_stored,
            "already_waiting": counts.already_waiting,
        }
    )


@router.post("/{name}/files")
async def upload_file(
    request: Request,
    record: Caller,
    name: str,
    format: Annotated[FileFormat, Query(description="What the body holds.")],
    dry_run: Annotated[bool, Query(description="Check every row, enqueue nothing.")] = False,
    skip_invalid: Annotated[bool, Query(description="Enqueue the valid rows even if some are bad.")] = False,
    priority: Priority = "normal",
    seeds: Annotated[int, Query(ge=1, le=MAX_SEEDS, description="Jobs per row, consecutive seeds.")] = 1,
    defaults: Annotated[
        str | None,
        Query(max_length=MAX_DEFAULTS_CHARS, description='Job fields each row starts from, as JSON: {"steps": 20}.'),
    ] = None,
) -> Uploaded:
    """Upload a `.txt`/`.jsonl`/`.csv`/`.parquet` file (the request body, any content type) as jobs of
    the dataset. A file with a bad row enqueues nothing unless `skip_invalid`; resubmitting the same file
    sends only what is not already stored or waiting."""
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    check_priority(record, priority)
    fields = _defaults(defaults, dataset)
    settings: GatewaySettings = request.app.state.settings
    with tempfile.TemporaryDirectory(prefix="fluxfarm-upload-") as folder:
        path = Path(folder) / f"upload.{format.value}"
        await _spool(request, path, int(settings.gateway_max_upload_mib * MIB))
        options = (dry_run, skip_invalid, priority, seeds)
        state = request.app.state
        return await run_in_threadpool(_submit, state.client, state.usage, record, path, fields, options)
