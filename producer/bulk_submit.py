"""`fluxfarm submit FILE` and `fluxfarm wait`: a prompt file in as a dataset, its progress out.

A file is read twice unless --skip-invalid: once to check every row (a file with a bad row enqueues
nothing, and --dry-run stops there), once to stream the jobs into the queue through
`FarmClient.submit_stream`, which skips what is already stored or waiting. Neither pass holds the
file in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import TextColumn

from fluxfarm.producer.client import FarmClient, StreamCounts
from fluxfarm.producer.fleet_check import warn_unserved
from fluxfarm.producer.job_files import RowError, iter_file_jobs
from fluxfarm.producer.progress import progress_bar
from fluxfarm.producer.redis_room import Room
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.datasets import DatasetRecord
from fluxfarm.shared.errors import InvalidJob, JobFailed
from fluxfarm.shared.jobs import DEFAULT_DATASET, RenderJob
from fluxfarm.shared.metadata import RenderResult

ROW_ERRORS_SHOWN = 100
"""Bad rows named one by one; past this many only their number is given."""


class _RowErrors:
    """Prints bad rows as they are found, up to ROW_ERRORS_SHOWN, and counts them all."""

    def __init__(self, path: Path, console: Console) -> None:
        self.path, self.console, self.count = path, console, 0

    def add(self, error: RowError) -> None:
        self.count += 1
        if self.count <= ROW_ERRORS_SHOWN:
            self.console.print(
                f"[red]{escape(str(self.path))}:{error.line}[/red]: {escape(error.reason)}", highlight=False
            )

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
    priority: Priority = "normal",
    wait: bool,
    wait_for_room: bool = False,
    timeout_s: float | None,
    console: Console,
) -> StreamCounts | None:
    """Check and enqueue `path`'s jobs; returns what was enqueued (None on a dry run). Through the gateway
    (FLUXFARM_API_URL) the file is uploaded and the gateway checks and enqueues it the same way."""
    settings = ProducerSettings()
    if settings.api_url:
        counts = _upload(settings, path, defaults, seeds, dry_run, skip_invalid, priority, console)
        if wait and counts is not None:
            _wait_all(settings, {str(defaults.get("dataset", DEFAULT_DATASET))}, timeout_s, console)
        return counts
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
            queues.add(item.job.queue)
            datasets.add(item.job.dataset)
            yield item.job

    with (
        FarmClient(settings) as client,
        progress_bar(console, "submitting", TextColumn("{task.description}")) as progress,
    ):
        task = progress.add_task("", total=expected)

        def waiting(room: Room) -> None:
            progress.update(task, description=f"waiting for room: {room.describe()}")

        counts = client.submit_stream(
            valid_jobs(),
            on_progress=lambda c: progress.update(task, completed=c.seen, description=""),
            priority=priority,
            wait_for_room=wait_for_room,
            on_wait=waiting,
        )
        progress.update(task, completed=counts.seen, total=counts.seen)
        for dataset in datasets:
            client.datasets.set_defaults(dataset, defaults)
            client.store_manifest(client.dataset_record(dataset))
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
        _wait_all(settings, datasets, timeout_s, console)
    return counts


def _wait_all(settings: ProducerSettings, datasets: set[str], timeout_s: float | None, console: Console) -> None:
    failed = sum(report_failures(wait_for_dataset(settings, d, timeout_s, console), console) for d in sorted(datasets))
    if failed:
        raise JobFailed("-", f"{failed} jobs failed (reasons above)")


def _upload(
    settings: ProducerSettings,
    path: Path,
    defaults: Mapping[str, Any],
    seeds: int,
    dry_run: bool,
    skip_invalid: bool,
    priority: Priority,
    console: Console,
) -> StreamCounts | None:
    """`fluxfarm submit FILE` through the gateway: the file goes up as it is read, and the gateway's
    answer is told as the local check and submit tell theirs."""
    from fluxfarm.producer.http_client import HttpFarmClient

    fields = {name: value for name, value in defaults.items() if name != "dataset"}
    dataset = str(defaults.get("dataset", DEFAULT_DATASET))
    errors = _RowErrors(path, console)
    with HttpFarmClient(settings) as client:
        try:
            answer = client.upload_file(path, dataset, fields, seeds, dry_run, skip_invalid, priority)
        except InvalidJob as refused:
            for where, reason in refused.problems:
                if where.startswith("line "):
                    errors.add(RowError(int(where.removeprefix("line ")), reason))
            raise
    for problem in answer["errors"]:
        errors.add(RowError(problem["line"], problem["reason"]))
    errors.count = answer["invalid"]
    if dry_run:
        console.print(f"dry run: {answer['valid']} valid jobs, {errors.summary()}; nothing was enqueued")
        if errors.count:
            raise InvalidJob(f"{errors.summary()} in {path}")
        return None
    counts = StreamCounts(
        enqueued=answer["enqueued"], already_stored=answer["already_stored"], already_waiting=answer["already_waiting"]
    )
    skipped = f", {errors.summary()} skipped" if errors.count else ""
    console.print(
        f"queued {counts.enqueued} jobs ({counts.already_stored} already stored, "
        f"{counts.already_waiting} already queued or running{skipped})"
    )
    return counts


def cancel_dataset(settings: ProducerSettings, dataset: str, console: Console) -> int:
    """`fluxfarm cancel`: queued jobs become cancelled at once; returns how many."""
    with FarmClient(settings) as client:
        dropped = client.cancel(dataset)
        record = client.dataset_record(dataset)
        client.store_manifest(record)
    console.print(
        f"cancelled {dropped} queued jobs of {dataset}; {record.running} running will finish "
        f"({record.done} done, {record.failed} failed)"
    )
    return dropped


def report_failures(record: DatasetRecord, console: Console) -> int:
    """Print each failed job of the dataset with its reason; returns how many failed."""
    for job_id, reason in sorted(record.failures.items()):
        console.print(f"[red]failed[/red] {record.name}/{job_id}: {escape(reason)}", highlight=False)
    return record.failed


def wait_for_dataset(
    settings: ProducerSettings,
    dataset: str = DEFAULT_DATASET,
    timeout_s: float | None = None,
    console: Console | None = None,
    on_result: Callable[[RenderResult], None] | None = None,
) -> DatasetRecord:
    """Block until none of `dataset`'s jobs is queued or running, showing done/total, handing each
    result to `on_result` as it lands (if given); TimeoutError past `timeout_s`. Returns the final record
    (also written to storage as the dataset's manifest)."""
    console = console or Console(stderr=True)
    with FarmClient(settings) as client, progress_bar(console, f"rendering {dataset}") as progress:
        task = progress.add_task("jobs", total=None)
        polled: list[DatasetRecord] = []

        def show(record: DatasetRecord) -> None:
            polled[:] = [record]  # the stream's last poll is the final record
            progress.update(task, completed=record.done + record.failed, total=record.total)

        for outcome in client.as_completed(dataset, timeout_s, with_results=on_result is not None, on_poll=show):
            if on_result is not None and outcome.result is not None:
                on_result(outcome.result)
        client.store_manifest(polled[0])
    return polled[0]
