"""`fluxfarm status`: the live fleet and the queues, with jobs that no live worker can serve in red."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.table import Table

from shared.fleet import FleetReport


def _ago(moment: datetime, now: datetime) -> str:
    return f"{max(0.0, (now - moment).total_seconds()):.0f}s ago"


def print_report(report: FleetReport, console: Console) -> None:
    now = report.checked_at
    workers = Table(title=f"{len(report.workers)} workers")
    for column in ("node", "host", "device", "GPU", "VRAM GiB", "level", "done", "failed", "rendering", "seen"):
        workers.add_column(column, overflow="fold")
    for w in report.workers:
        workers.add_row(
            w.node,
            w.hostname,
            w.device,
            w.gpu_name or "-",
            f"{w.vram_gib:.0f}" if w.vram_gib else "-",
            w.level,
            str(w.jobs_done),
            str(w.jobs_failed),
            w.current_job or "-",
            _ago(w.last_seen, now),
        )
    console.print(workers)
    queues = Table(title="queues")
    for column in ("queue", "jobs for", "waiting", "served by"):
        queues.add_column(column, overflow="fold")
    for q in report.queues:
        served = ", ".join(q.consumers) if q.consumers else "[red]no live worker[/red]"
        queues.add_row(q.name, q.constraint, str(q.waiting), served)
    console.print(queues)
    for q in report.unserved:
        console.print(
            f"[red]unserved:[/red] {q.waiting} jobs need {q.constraint} and no live worker serves {q.name}",
            highlight=False,
        )
