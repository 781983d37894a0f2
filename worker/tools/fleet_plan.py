"""`fluxfarm plan FILE --fleet live|fleet.toml`: how a dataset would render on a fleet of mixed cards.

Per card class: the level its VRAM plan picks for the dataset's model, its images/hour and where that
figure comes from, and for the whole dataset the ETA, the GPU-hours and, with prices, the cost. A rate
is never invented:
- a fleet file's class takes the `images_per_hour` it gives, else the measured table below (whole
  images through the worker's engine, full-size random FLUX.1-dev, 1024², 28 steps, docs/benchmarks.md);
  a class with neither is listed without a rate and left out of the ETA, which says so;
- the live fleet takes each worker's own images/hour while rendering, over its last minutes (its heartbeat:
  its renders over the GPU seconds they took, so a worker that finished a short run and sits idle is not
  shown slower than it is).
Table rates count a job as `steps / 28 * pixels / 1024²` images of the table's kind; live rates were
measured on whatever the workers rendered, so a job counts as one image.

A fleet file:

    [[cards]]
    name = "H200"            # also the GPU name the plan reads fp8 support from, unless `gpu` is given
    count = 4
    vram_gib = 141
    price_per_hour = 3.5     # optional, any currency

    [[cards]]
    name = "RTX 3060"
    count = 12
    vram_gib = 12
    host_gib = 32            # optional: the host memory each card's worker may use
    images_per_hour = 95     # optional: a rate you measured (`fluxfarm bench`), used as given
"""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fluxfarm.producer.fleet_check import read_fleet
from fluxfarm.producer.job_files import FileJob, iter_file_jobs
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.shared.units import MIB
from fluxfarm.worker.model.plan import Optimize, PlanInputs, make_plan

REFERENCE_STEPS = 28
REFERENCE_PIXELS = 1024 * 1024
MEASURED_S_PER_IMAGE: dict[tuple[str, QuantLevel], tuple[float, str]] = {
    ("H200", QuantLevel.FP8): (2.99, "measured: H200 fp8, docs/benchmarks.md run 8"),
    ("H200", QuantLevel.Q6_K): (5.16, "measured: H200 Q6_K at 12 GiB, docs/benchmarks.md run 8"),
    ("H100", QuantLevel.FP8): (3.62, "measured: H100 fp8, docs/benchmarks.md run 3"),
    ("H100", QuantLevel.Q6_K): (5.25, "measured: H100 Q6_K at 12 GiB, docs/benchmarks.md run 3"),
}
"""Seconds an image of FLUX.1 [dev]'s architecture at 1024² and 28 steps, batch 1, through the engine."""
FLEET_FILE_MAX_BYTES = MIB


class CardClass(BaseModel):
    """One kind of card in a fleet file, and how many."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    count: int = Field(ge=1, le=1_000_000)
    vram_gib: float = Field(gt=0, le=4096)
    host_gib: float | None = Field(default=None, gt=0, le=65536, description="Each card's share of host memory.")
    gpu: str | None = Field(default=None, max_length=128, description="The GPU's name, when `name` is not one.")
    images_per_hour: float | None = Field(default=None, gt=0, description="A measured rate, used as given.")
    price_per_hour: float | None = Field(default=None, ge=0)


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cards: list[CardClass] = Field(min_length=1, max_length=1000)


class ClassRow(BaseModel):
    name: str
    count: int
    level: str | None
    text_encoders: str | None
    images_per_hour_per_card: float | None
    images_per_hour: float | None
    rate_source: str
    price_per_hour: float | None = None


class FleetPlan(BaseModel):
    model: str
    jobs: int
    bad_rows: int
    work_images: float
    """The jobs as images of the rates' kind (table rates: 1024², 28 steps; live rates: one a job)."""
    classes: list[ClassRow]
    images_per_hour: float
    eta_hours: float | None
    gpu_hours: float | None
    cost: float | None
    notes: list[str]


def read_fleet_file(path: Path) -> FleetFile:
    if path.stat().st_size > FLEET_FILE_MAX_BYTES:
        raise FarmError(f"{path}: a fleet file is at most {FLEET_FILE_MAX_BYTES // MIB} MiB")
    try:
        return FleetFile.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError, UnicodeDecodeError) as error:
        raise FarmError(f"{path}: not a fleet file: {error}") from None


def _read_jobs(path: Path, settings: ProducerSettings) -> tuple[list[RenderJob], int]:
    jobs: list[RenderJob] = []
    bad = 0
    for item in iter_file_jobs(path, {}):
        if isinstance(item, FileJob):
            jobs.append(parse_job(item.job, settings.default_model) if settings.default_model else item.job)
        else:
            bad += 1
    return jobs, bad


def _work(jobs: Iterable[RenderJob]) -> float:
    return sum(job.steps / REFERENCE_STEPS * job.width * job.height / REFERENCE_PIXELS for job in jobs)


def _measured(gpu: str, level: QuantLevel, model: FluxModel) -> tuple[float, str] | None:
    if MODELS[model].family not in (FluxFamily.FLUX_1, FluxFamily.FLUX_1_KONTEXT):
        return None
    upper = gpu.upper()
    for (card, measured_level), (seconds, source) in MEASURED_S_PER_IMAGE.items():
        if card in upper and measured_level == level:
            return 3600 / seconds, source
    return None


def _file_class(card: CardClass, model: FluxModel, optimize: Optimize, size: tuple[int, int]) -> ClassRow:
    gpu = card.gpu or card.name
    try:
        plan = make_plan(
            PlanInputs(
                vram_gib=card.vram_gib,
                host_gib=card.host_gib,
                gpu_name=gpu,
                model=model,
                optimize=optimize,
                width=size[0],
                height=size[1],
            )
        )
    except FarmError as error:
        return ClassRow(
            name=card.name, count=card.count, level=None, text_encoders=None, images_per_hour_per_card=None,
            images_per_hour=None, rate_source=f"cannot render: {error}", price_per_hour=card.price_per_hour,
        )  # fmt: skip
    level = QuantLevel(plan.level)
    rate: float | None
    if card.images_per_hour is not None:
        rate, source = card.images_per_hour, "given in the fleet file"
    else:
        found = _measured(gpu, level, model)
        rate, source = found if found else (None, f"no measured rate for {gpu} at {level}: give images_per_hour")
    return ClassRow(
        name=card.name,
        count=card.count,
        level=level.value,
        text_encoders=plan.text_encoders,
        images_per_hour_per_card=rate,
        images_per_hour=rate * card.count if rate else None,
        rate_source=source,
        price_per_hour=card.price_per_hour,
    )


def _live_classes(settings: ProducerSettings, model: FluxModel, prices: dict[str, float]) -> list[ClassRow]:
    """The live workers of the dataset's model, a class per card name and level."""
    groups: dict[tuple[str, str], list[float | None]] = {}
    for worker in read_fleet(settings).workers:
        if worker.flux_model == model:
            rate = worker.busy_images_per_hour or worker.images_per_hour  # an older worker sends only the latter
            groups.setdefault((worker.gpu_name or "cpu", worker.level.value), []).append(rate)
    rows = []
    for (name, level), rates in sorted(groups.items()):
        known = [rate for rate in rates if rate]
        total = sum(known) if known else None
        rows.append(
            ClassRow(
                name=name,
                count=len(rates),
                level=level,
                text_encoders=None,
                images_per_hour_per_card=total / len(known) if total else None,
                images_per_hour=total,
                rate_source=f"live: {len(known)} of {len(rates)} workers report their rate while rendering, over their "
                "last minutes",
                price_per_hour=prices.get(name),
            )
        )
    return rows


def plan_fleet(
    path: Path,
    fleet: str,
    settings: ProducerSettings,
    prices: dict[str, float] | None = None,
    optimize: Optimize = Optimize.THROUGHPUT,
) -> FleetPlan:
    """The dataset in `path` on `fleet` ("live", or a fleet file's path)."""
    jobs, bad = _read_jobs(path, settings)
    if not jobs:
        raise FarmError(f"{path}: no valid job to plan ({bad} bad rows)")
    models = Counter(job.model for job in jobs)
    model = models.most_common(1)[0][0]
    notes = []
    if len(models) > 1:
        notes.append(f"the file names {len(models)} models; planned for the most common, {model.value}")
    live = fleet == "live"
    if live:
        classes = _live_classes(settings, model, prices or {})
        work = float(len(jobs))
        if not classes:
            notes.append(f"no live worker serves {model.value}")
    else:
        largest = max(jobs, key=lambda job: job.width * job.height)
        size = (largest.width, largest.height)
        cards = read_fleet_file(Path(fleet)).cards
        for card in cards:
            if prices and card.name in prices:
                card.price_per_hour = prices[card.name]
        classes = [_file_class(card, model, optimize, size) for card in cards]
        work = _work(jobs)
    rate = sum(row.images_per_hour or 0.0 for row in classes)
    unrated = [row.name for row in classes if not row.images_per_hour]
    if unrated:
        notes.append(f"left out of the ETA, no rate: {', '.join(unrated)}")
    eta = work / rate if rate else None
    rated = [row for row in classes if row.images_per_hour]
    gpu_hours = eta * sum(row.count for row in rated) if eta is not None else None
    priced = [row for row in rated if row.price_per_hour is not None]
    cost = eta * sum(row.count * (row.price_per_hour or 0.0) for row in priced) if eta is not None and priced else None
    if priced and len(priced) < len(rated):
        notes.append("the cost counts only the classes with a price")
    return FleetPlan(
        model=model.value,
        jobs=len(jobs),
        bad_rows=bad,
        work_images=round(work, 3),
        classes=classes,
        images_per_hour=rate,
        eta_hours=eta,
        gpu_hours=gpu_hours,
        cost=cost,
        notes=notes,
    )
