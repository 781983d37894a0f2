"""`fluxfarm submit FILE` and `fluxfarm wait`: a prompt file in as a dataset, its progress out.

A file is read twice unless --skip-invalid: once to check every row (a file with a bad row enqueues
nothing, and --dry-run stops there), once to stream the jobs into the queue through
`FarmClient.submit_stream`, which skips what is already stored or waiting. Neither pass holds the
file in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from producer.client import FarmClient, StreamCounts
from producer.fleet_check import warn_unserved
from producer.job_files import RowError, iter_file_jobs
from producer.progress import progress_bar
from shared.datasets import DatasetBook, DatasetRecord
from shared.errors import InvalidJob, JobFailed
from shared.jobs import DEFAULT_DATASET, RenderJob
from shared.settings import FarmSettings

ROW_ERRORS_SHOWN = 100
"""Bad rows named one by one; past this many only their number is given."""
_WAIT_POLL_S = 0.5


class _RowErrors:
    """Prints bad rows as they are found, up to ROW_ERRORS_SHOWN, and counts them all."""

    def __init__(self, path: Path, console: Console) -> None:
        self.path, self.console, self.count = path, console, 0

    def add(self, error: RowError) -> None:
        self.count += 1
        if self.count <= ROW_ERRORS_SHOWN:
            self.console.print(f"[red]{self.path}:{error.line}[/red]: {error.reason}", highlight=False)

    def summary(self) -> str:
        hidden = self.count - ROW_ERRORS_SHOWN
        return f"{self.count} invalid rows" + (f" ({hidden} not shown)" if hidden > 0 else "")


def _check(path: Path, defaults: Mapping[str, Any], seeds: int, errors: _RowErrors) -> int:
    """Validate every row; returns how many jobs the valid rows make."""
    jobs = 0
    for item in iter_file_jobs(path, defaults, seeds):
        if isinstance(item, RowError):
            errors.add(item)
        else:
            jobs += 1
    return jobs


def submit_file(
    path: Path,
    defaults: Mapping[str, Any],
    seeds: int,
    *,
    dry_run: bool,
    skip_invalid: bool,
    wait: bool,
    timeout_s: float | None,
    console: Console,
) -> StreamCounts | None:
    """Check and enqueue `path`'s jobs; returns what was enqueued (None on a dry run)."""
    errors = _RowErrors(path, console)
    expected: int | None = None
    if dry_run or not skip_invalid:
        expected = _check(path, defaults, seeds, errors)
        if dry_run:
            console.print(f"dry run: {expected} valid jobs, {errors.summary()}; nothing was enqueued")
            if errors.count:
                raise InvalidJob(f"{errors.summary()} in {path}")
            return None
        if errors.count:
            raise InvalidJob(f"{errors.summary()} in {path}; nothing was enqueued (--skip-invalid enqueues the rest)")

    queues: set[str] = set()
    datasets: set[str] = set()

    def valid_jobs() -> Iterator[RenderJob]:
        for item in iter_file_jobs(path, defaults, seeds):
            if isinstance(item, RowError):
                errors.add(item)  # only with --skip-invalid: the check above refused them otherwise
                continue
            queues.add(item.job.constraint.queue)
            datasets.add(item.job.dataset)
            yield item.job

    settings = FarmSettings()
    with FarmClient(settings) as client, progress_bar(console, "submitting") as progress:
        task = progress.add_task("jobs", total=expected)
        counts = client.submit_stream(valid_jobs(), on_progress=lambda c: progress.update(task, completed=c.seen))
        progress.update(task, completed=counts.seen, total=counts.seen)
        for dataset in datasets:
            client.datasets.set_defaults(dataset, defaults)
    skipped = f", {errors.summary()} skipped" if errors.count else ""
    if counts.enqueued == 0:
        console.print(
            f"nothing to enqueue: {counts.already_stored} jobs already stored, "
            f"{counts.already_waiting} already queued or running{skipped}"
        )
    else:
        console.print(
            f"queued {counts.enqueued} jobs ({counts.already_stored} already stored, "
            f"{counts.already_waiting} already queued or running{skipped})"
        )
    warn_unserved(queues, settings, console)
    if wait:
        failed = sum(
            report_failures(wait_for_dataset(settings, d, timeout_s, console), console) for d in sorted(datasets)
        )
        if failed:
            raise JobFailed("-", f"{failed} jobs failed (reasons above)")
    return counts


def report_failures(record: DatasetRecord, console: Console) -> int:
    """Print each failed job of the dataset with its reason; returns how many failed."""
    for job_id, reason in sorted(record.failures.items()):
        console.print(f"[red]failed[/red] {record.name}/{job_id}: {reason}", highlight=False)
    return record.failed


def wait_for_dataset(
    settings: FarmSettings,
    dataset: str = DEFAULT_DATASET,
    timeout_s: float | None = None,
    console: Console | None = None,
) -> DatasetRecord:
    """Block until none of `dataset`'s jobs is queued or running, showing done/total; TimeoutError past `timeout_s`."""
    console = console or Console(stderr=True)
    book = DatasetBook.from_url(settings.broker_url)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with progress_bar(console, f"rendering {dataset}") as progress:
            task = progress.add_task("jobs", total=None)
            while True:
                record = book.record(dataset)
                progress.update(task, completed=record.done + record.failed, total=record.total)
                if record.queued == 0 and record.running == 0:
                    return record
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"dataset {dataset}: {record.queued + record.running} jobs still waiting after {timeout_s}s"
                    )
                time.sleep(_WAIT_POLL_S)
    finally:
        book.close()
