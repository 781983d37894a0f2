"""`fluxfarm status`: the live fleet, the queues and the datasets, once or refreshed (`--watch`).

Workers and queue depths come from the fleet heartbeats, datasets from their records in Redis; with
`--dataset` the storage is listed too, so the record's done count can be checked against the objects.
"""

from __future__ import annotations

import time
from datetime import datetime

import redis
from pydantic import BaseModel
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from fluxfarm.producer.fleet_check import read_fleet
from fluxfarm.producer.gateway.tokens import TokenBook, TokenUse
from fluxfarm.producer.gateway.usage import TokenUsage
from fluxfarm.producer.redis_room import RedisRoom, Room
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.datasets import DatasetBook, DatasetRecord
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.fleet import FleetReport
from fluxfarm.shared.job_records import DeadLetter
from fluxfarm.shared.redis_conn import open_redis
from fluxfarm.shared.settings import redact_url
from fluxfarm.shared.storage import open_store
from fluxfarm.shared.units import MIB, duration_text

WATCH_INTERVAL_S = 2.0
DEAD_LETTERS_SHOWN = 20
MEMORY_WARNING_SHARE = 0.8
"""Where the memory line turns red, as infra/prometheus/alerts.yml's FluxfarmRedisMemoryHigh fires."""


class DatasetStatus(BaseModel):
    record: DatasetRecord
    stored_images: int | None = None
    """PNG objects in storage (listed only for `--dataset`)."""
    stored_metadata: int | None = None


class FarmStatus(BaseModel):
    fleet: FleetReport
    datasets: list[DatasetStatus]
    dead_letters: list[DeadLetter] = []
    """The newest jobs the farm gave up on (of `--dataset` when given), newest first."""
    dead_letter_count: int = 0
    """Every dead letter kept, of all datasets."""
    redis_memory: Room | None = None
    """Redis' used memory, its limit and the bytes a queued job takes; None where this Redis user may not
    read INFO."""
    tokens: list[TokenUse] = []
    """Each gateway token's usage, where this Redis user may read the tokens (the gateway's, an admin's);
    through the gateway, the calling token's (an admin token's: every token's)."""


def read_status(settings: ProducerSettings, dataset: str | None = None, list_storage: bool = False) -> FarmStatus:
    """The fleet and every dataset (or just `dataset`, with its stored objects counted if `list_storage`).
    Through the gateway (FLUXFARM_API_URL): the fleet and the token's datasets, no dead letters or Redis."""
    if settings.api_url:
        return _read_status_via_gateway(settings, dataset)
    fleet = read_fleet(settings)
    client = open_redis(settings)
    book = DatasetBook(client)
    try:
        names = [dataset] if dataset is not None else book.names()
        records = book.records(names)
        letters = book.dead_letters(DEAD_LETTERS_SHOWN, dataset)
        letter_count = book.dead_letter_count()
        memory = _redis_memory(RedisRoom.of(client, settings), fleet, records)
        tokens = _token_usage(client, book)
    except redis.RedisError as error:
        raise FarmError(f"cannot reach the broker at {redact_url(settings.broker_url)}: {error}") from None
    finally:
        book.close()
    datasets = [DatasetStatus(record=record) for record in records]
    if dataset is not None and list_storage:
        images, metadata = open_store(settings).count_stored(dataset)
        datasets = [datasets[0].model_copy(update={"stored_images": images, "stored_metadata": metadata})]
    return FarmStatus(
        fleet=fleet,
        datasets=datasets,
        dead_letters=letters,
        dead_letter_count=letter_count,
        redis_memory=memory,
        tokens=tokens,
    )


def _token_usage(client: redis.Redis, book: DatasetBook) -> list[TokenUse]:
    usage = TokenUsage(client, book)
    try:
        return [usage.usage(record.name) for record in TokenBook(client).records()]
    except redis.exceptions.NoPermissionError:
        return []  # a producer's Redis user may not read the gateway's tokens


def _read_status_via_gateway(settings: ProducerSettings, dataset: str | None) -> FarmStatus:
    from fluxfarm.producer.http_client import HttpFarmClient

    with HttpFarmClient(settings) as gateway:
        names = [dataset] if dataset is not None else gateway.dataset_names()
        records = [DatasetStatus(record=gateway.dataset_record(name)) for name in names]
        return FarmStatus(fleet=gateway.fleet(), datasets=records, tokens=gateway.usage())


def _redis_memory(room: RedisRoom, fleet: FleetReport, records: list[DatasetRecord]) -> Room | None:
    """Redis' memory, the bytes per queued job sampled from the queues and the records read; None where
    this Redis user may not read INFO or MEMORY USAGE (a managed service may forbid them too)."""
    try:
        return room.sampled(fleet.queues, records)
    except redis.exceptions.NoPermissionError:
        return None


def _memory_line(room: Room) -> str:
    if room.limit_bytes is None:
        limit = "no maxmemory: set one (or FLUXFARM_REDIS_MAXMEMORY_MIB), or Redis grows until the host kills it"
    else:
        limit = f"of {room.limit_bytes / MIB:,.1f} MiB maxmemory ({room.used_share:.0%})"
    per_job = f"~{room.bytes_per_job:,.0f} bytes a queued job" if room.measured else "nothing queued to measure"
    fits = f", room for ~{room.jobs:,} more jobs" if room.jobs is not None and room.measured else ""
    line = f"Redis: {room.used_bytes / MIB:,.1f} MiB {limit}; {per_job}{fits}"
    return f"[red]{line}[/red]" if (room.used_share or 0) >= MEMORY_WARNING_SHARE else line


def _ago(moment: datetime, now: datetime) -> str:
    return f"{max(0.0, (now - moment).total_seconds()):.0f}s ago"


def _rate(per_hour: float | None) -> str:
    return f"{per_hour:,.0f}" if per_hour is not None else "-"


def _workers_table(report: FleetReport) -> Table:
    now = report.checked_at
    table = Table(title=f"{len(report.workers)} workers")
    for column in (
        "node",
        "host",
        "device",
        "GPU",
        "VRAM GiB",
        "peak GiB",
        "model",
        "level",
        "done",
        "rendered",
        "failed",
        "images/h",
        "rendering",
    ):
        table.add_column(column, overflow="fold")
    table.add_column("heartbeat")
    for w in report.workers:
        table.add_row(
            escape(w.node),
            escape(w.hostname),
            escape(w.device),
            escape(w.gpu_name or "-"),
            f"{w.vram_gib:.0f}" if w.vram_gib else "-",
            f"{w.vram_peak_gib:.1f}" if w.vram_peak_gib is not None else "-",
            escape(w.flux_model.value),
            escape(w.level.value if w.lora_set is None else f"{w.level.value} + LoRA set {w.lora_set}"),
            str(w.jobs_done),
            str(w.images_rendered),
            str(w.jobs_failed),
            _rate(w.images_per_hour),
            escape(w.current_job or "-"),
            _ago(w.last_seen, now),
        )
    return table


def _queues_table(report: FleetReport) -> Table:
    table = Table(title="queues")
    for column in ("queue", "jobs for", "waiting", "served by"):
        table.add_column(column, overflow="fold")
    for q in report.queues:
        if q.consumers:
            served = escape(", ".join(q.consumers))
        elif q.adopters:
            served = f"[yellow]waiting for one of {len(q.adopters)} workers to adopt it[/yellow]"
        else:
            served = "[red]no live worker[/red]"
        table.add_row(escape(q.name), escape(q.needs), str(q.waiting), served)
    return table


def _datasets_table(datasets: list[DatasetStatus]) -> Table:
    table = Table(title=f"{len(datasets)} datasets")
    columns = ["dataset", "progress", "done/total", "queued", "running", "failed", "cancelled", "images/h", "eta"]
    storage = any(d.stored_metadata is not None for d in datasets)
    for column in columns + (["stored png/json"] if storage else []) + ["levels"]:
        table.add_column(column, overflow="fold")
    for d in datasets:
        r = d.record
        cells: list[RenderableType] = [
            escape(r.name),
            ProgressBar(total=max(r.total, 1), completed=r.done + r.failed, width=24),
            f"{r.done}/{r.total}",
            str(r.queued),
            str(r.running),
            f"[red]{r.failed}[/red]" if r.failed else "0",
            str(r.cancelled),
            _rate(r.rate_per_hour),
            duration_text(r.eta_s),
        ]
        if storage:
            cells.append(f"{d.stored_images}/{d.stored_metadata}" if d.stored_metadata is not None else "-")
        table.add_row(*cells, ", ".join(r.levels) or "-")
    return table


def _dead_letters_table(letters: list[DeadLetter], now: datetime) -> Table:
    table = Table(title=f"dead letters (newest {len(letters)})", title_style="red")
    for column in ("dataset", "job", "attempts", "last worker", "when", "reason"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            *map(escape, (letter.dataset, letter.job_id, str(letter.attempts), letter.node)),
            _ago(letter.at, now),
            escape(letter.reason),
        )
    return table


def render_status(status: FarmStatus) -> Group:
    """The report as rich renderables: workers, queues, datasets, unserved queues, then dead letters."""
    parts: list = [_workers_table(status.fleet), _queues_table(status.fleet), _datasets_table(status.datasets)]
    if status.redis_memory is not None:
        parts.append(_memory_line(status.redis_memory))
    for q in status.fleet.unserved:
        needs = escape(f"{q.waiting} jobs need {q.needs} and no live worker serves {q.name}")
        parts.append(f"[red]unserved:[/red] {needs}")
    if status.tokens:
        parts.append(_tokens_table(status.tokens))
    if status.dead_letters:
        parts.append(_dead_letters_table(status.dead_letters, status.fleet.checked_at))
    return Group(*parts)


def _tokens_table(tokens: list[TokenUse]) -> Table:
    table = Table(title=f"{len(tokens)} gateway tokens")
    for column in ("token", "jobs submitted", "images", "GPU hours"):
        table.add_column(column, overflow="fold")
    for use in tokens:
        table.add_row(escape(use.token), f"{use.jobs_submitted:,}", f"{use.images:,}", f"{use.gpu_seconds / 3600:.2f}")
    return table


def watch_status(settings: ProducerSettings, dataset: str | None, console: Console) -> None:
    """Refresh the report every WATCH_INTERVAL_S until Ctrl-C, or until `dataset` has nothing left to do."""
    with Live(render_status(read_status(settings, dataset)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                status = read_status(settings, dataset)
                live.update(render_status(status), refresh=True)
                record = status.datasets[0].record if dataset is not None else None
                if record is not None and record.total and not (record.queued or record.running):
                    return
        except KeyboardInterrupt:
            return
