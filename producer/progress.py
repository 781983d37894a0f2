"""Wait for a batch of jobs with a progress bar; shared by `fluxfarm submit --wait` and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fluxfarm.producer.job_handles import JobBatch
from fluxfarm.shared.errors import JobFailed
from fluxfarm.shared.metadata import RenderResult


@dataclass
class BatchOutcome:
    results: list[RenderResult] = field(default_factory=list)
    failures: list[JobFailed] = field(default_factory=list)


def progress_bar(console: Console, verb: str, *extra: TextColumn) -> Progress:
    """The one bar of the CLI: verb, bar, done/total, elapsed, eta, and any extra columns."""
    return Progress(
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        *extra,
        console=console,
        transient=False,
    )


def wait_with_progress(batch: JobBatch, console: Console, timeout_s: float | None = None) -> BatchOutcome:
    """Collect every job's result as it lands, advancing a bar; raises TimeoutError past `timeout_s`."""
    outcome = BatchOutcome()
    with progress_bar(console, "rendering", TextColumn("{task.fields[failed]} failed")) as progress:
        task = progress.add_task("jobs", total=len(batch), failed=0)
        for handle in batch.as_completed(timeout=timeout_s):
            try:
                outcome.results.append(handle.result(timeout=timeout_s))
            except JobFailed as failure:
                outcome.failures.append(failure)
            progress.update(task, advance=1, failed=len(outcome.failures))
    return outcome
