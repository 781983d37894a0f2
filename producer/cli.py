"""The producer's commands of `fluxfarm` (submit, wait, status, cancel, export, exporter, bench-submit).

The one `fluxfarm` command is composed in fluxfarm/cli.py, above this module and the worker's."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fluxfarm.producer.bulk_submit import report_failures, submit_file, wait_for_dataset
from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.export import ExportFormat
from fluxfarm.producer.fleet_check import warn_unserved
from fluxfarm.producer.progress import wait_with_progress
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.errors import FarmError, InvalidJob
from fluxfarm.shared.jobs import DEFAULT_DATASET, parse_dataset_name, parse_job
from fluxfarm.shared.metadata import RenderResult
from fluxfarm.shared.storage import open_store
from fluxfarm.shared.units import MIB

EXIT_FAILED = 1
EXIT_INVALID = 2

app = typer.Typer()  # the producer's commands; fluxfarm/cli.py serves them in the one `fluxfarm` command
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _job_defaults(**options: Any) -> dict[str, Any]:
    """CLI options that were given, as job fields (unset options leave the schema's defaults)."""
    return {name: value for name, value in options.items() if value is not None}


def _lora_fields(values: list[str]) -> list[dict[str, Any]] | None:
    """`--lora SOURCE[=WEIGHT]` options as the job's `loras` (weight 1.0 when not given)."""
    loras: list[dict[str, str | float]] = []
    for value in values:
        source, sep, weight = value.rpartition("=")
        if not sep:
            loras.append({"source": value})
            continue
        try:
            loras.append({"source": source, "weight": float(weight)})
        except ValueError:
            raise InvalidJob(f"--lora {value!r}: the weight after '=' must be a number") from None
    return loras or None


def _controlnet_field(source: str | None, image: str | None, scale: float | None) -> dict[str, Any] | None:
    """`--controlnet`, `--control-image` and `--control-scale` as the job's `controlnet`."""
    if source is None:
        if image is not None or scale is not None:
            raise InvalidJob("--control-image and --control-scale need --controlnet")
        return None
    if image is None:
        raise InvalidJob("--controlnet needs --control-image")
    return _job_defaults(source=source, control_image=image, conditioning_scale=scale)


@app.command()
def submit(
    file: Annotated[
        Path | None, typer.Argument(help="A .txt (one prompt a line) or .jsonl (one job a line) file.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="The prompt of a single job.")] = None,
    prompt_2: Annotated[str | None, typer.Option(help="T5 prompt; the prompt is used when absent.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed, 0..2^32-1 [default: 0].")] = None,
    width: Annotated[int | None, typer.Option(help="Width, multiple of 16 in 256..2048 [default: 1024].")] = None,
    height: Annotated[int | None, typer.Option(help="Height, multiple of 16 in 256..2048 [default: 1024].")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps, 1..100 [default: 28].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale [default: 3.5].")] = None,
    max_sequence_length: Annotated[int | None, typer.Option(help="T5 tokens, 1..512 [default: 512].")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name: the storage folder [default: default].")] = None,
    job_id: Annotated[str | None, typer.Option(help="Explicit job id (single job only).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="The model: flux.1-dev, flux.2-klein-4b, ... [default: FLUXFARM_DEFAULT_MODEL, else flux.1-dev]."
        ),
    ] = None,
    quant: Annotated[
        str | None, typer.Option(help="Level: auto, min:LEVEL (or better) or exact:LEVEL [default: auto].")
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="With a file: render each row with this many seeds (seed, seed+1, ...).")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With a file: validate every row, report bad ones, enqueue nothing.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="With a file: enqueue the valid rows even if some are bad.")
    ] = False,
    wait_for_room: Annotated[
        bool,
        typer.Option(
            "--wait-for-room", help="With a file: when Redis reaches its maxmemory, wait for the fleet to drain it."
        ),
    ] = False,
    priority: Annotated[
        Priority, typer.Option(help="Queue priority: high jobs overtake every normal and low job still waiting.")
    ] = "normal",
    lora: Annotated[
        list[str] | None,
        typer.Option(help="A LoRA: SOURCE or SOURCE=WEIGHT (hf://, s3:// or a worker path); repeat for up to 4."),
    ] = None,
    controlnet: Annotated[
        str | None, typer.Option(help="FLUX ControlNet folder: hf://owner/repo(/sub), s3:// prefix, worker path.")
    ] = None,
    control_image: Annotated[
        str | None, typer.Option(help="With --controlnet: the control image (s3://, a worker path or a PNG data URL).")
    ] = None,
    control_scale: Annotated[float | None, typer.Option(help="With --controlnet: conditioning scale 0..2.")] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(
            help="An input image (s3://, a worker path or a PNG data URL): FLUX.1 img2img, Kontext's edit, or one "
            "of up to 4 FLUX.2 references; repeat for more."
        ),
    ] = None,
    strength: Annotated[
        float | None, typer.Option(help="FLUX.1 img2img: how far the image is noised, 0..1 [default: 0.6].")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the images, with a progress bar.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
) -> None:
    """Validate and enqueue render jobs: one --prompt, or a .txt/.jsonl/.csv/.parquet file as a dataset.

    A file is checked row by row first and refused whole if any row is bad (unless --skip-invalid);
    jobs already stored or queued are not sent again, so a file can be resubmitted after any crash."""
    defaults = _job_defaults(
        prompt_2=prompt_2,
        seed=seed,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        max_sequence_length=max_sequence_length,
        dataset=dataset,
        job_id=job_id,
        quant=quant,
        model=model,
        loras=_lora_fields(lora or []),
        controlnet=_controlnet_field(controlnet, control_image, control_scale),
        images=image or None,
        strength=strength,
    )
    if (file is None) == (prompt is None):
        raise InvalidJob("give either --prompt or a prompt file, not both and not neither")
    if file is not None:
        if job_id is not None:
            raise InvalidJob("--job-id names a single job; it cannot apply to a whole file")
        if not file.is_file() and not file.is_fifo():
            raise InvalidJob(f"{file}: no such file")
        submit_file(
            file,
            defaults,
            seeds,
            dry_run=dry_run,
            skip_invalid=skip_invalid,
            priority=priority,
            wait=wait,
            wait_for_room=wait_for_room,
            timeout_s=timeout,
            console=err,
        )
        return
    if seeds != 1 or dry_run or skip_invalid or wait_for_room:
        raise InvalidJob("--seeds, --dry-run, --skip-invalid and --wait-for-room apply to a prompt file")
    jobs = [parse_job({"prompt": prompt, **defaults})]
    with FarmClient.from_env() as client:
        batch = client.submit_many(jobs, priority)
        cached = sum(handle.cached for handle in batch)
        err.print(f"queued {len(batch) - cached} jobs ({cached} already stored)")
        warn_unserved({handle.job.queue for handle in batch if not handle.cached}, client.settings, err)
        if not wait:
            for handle in batch:
                typer.echo(handle.job_id)
            return
        outcome = wait_with_progress(batch, err, timeout_s=timeout)
    for result in outcome.results:
        typer.echo(f"{result.job_id}\t{result.image.uri}")
    for failure in outcome.failures:
        err.print(f"[red]failed[/red] {escape(str(failure))}", highlight=False)
    if outcome.failures:
        raise typer.Exit(EXIT_FAILED)


@app.command("wait")
def wait_command(
    dataset: Annotated[str, typer.Option(help="The dataset to wait for.")] = DEFAULT_DATASET,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    results: Annotated[
        bool, typer.Option("--results", help="Print each image as it lands: job id, tab, its URI.")
    ] = False,
    presign: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=7 * 24 * 3600,
            help="With --results: print URLs that work without credentials for this many seconds.",
        ),
    ] = None,
) -> None:
    """Wait until none of a dataset's jobs is queued or running, with a progress bar; fails if any failed."""
    settings = ProducerSettings()
    with FarmClient(settings) as client:

        def show(result: RenderResult) -> None:
            url = client.image_url(result, presign) if presign else result.image.uri
            typer.echo(f"{result.job_id}\t{url}")

        record = wait_for_dataset(settings, parse_dataset_name(dataset), timeout, err, show if results else None)
    if report_failures(record, err):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def cancel(
    dataset: Annotated[str, typer.Option(help="The dataset whose queued jobs are dropped.")],
) -> None:
    """Drop a dataset's queued jobs (workers discard their messages unrendered); running jobs finish.
    Submitting the file again later queues the dropped jobs anew."""
    from fluxfarm.producer.bulk_submit import cancel_dataset

    cancel_dataset(ProducerSettings(), parse_dataset_name(dataset), err)


@app.command()
def export(
    dataset: Annotated[str, typer.Option(help="The dataset to export (its finished jobs).")],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="imagefolder, parquet, jsonl, webdataset or contact-sheet."),
    ],
    out: Annotated[
        str | None,
        typer.Option(
            help="A folder, or s3://bucket/prefix (same S3 endpoint as the farm's). Through the gateway: "
            "none, the export goes beside the dataset and its URLs are printed."
        ),
    ] = None,
    shard_mb: Annotated[int, typer.Option(min=1, help="webdataset: shard size in MiB.")] = 1024,
    count: Annotated[int, typer.Option(min=1, help="contact-sheet: how many images.")] = 64,
) -> None:
    """Export a dataset from storage: Hugging Face imagefolder, parquet (a row per image), jsonl, webdataset
    tar shards, or a contact sheet of the first images with their prompts."""
    from fluxfarm.producer.export import export_dataset
    from fluxfarm.producer.progress import progress_bar
    from fluxfarm.shared.storage import open_store_url

    settings = ProducerSettings()
    name = parse_dataset_name(dataset)
    if settings.api_url:
        from fluxfarm.producer.http_client import HttpFarmClient

        with HttpFarmClient(settings) as client:
            done = client.export(name, fmt, count=count, shard_mb=shard_mb)
        err.print(f"exported {done['rows']} jobs of {name} as {fmt} to {done['location']}")
        for url in done["urls"]:
            typer.echo(url)
        return
    if out is None:
        raise FarmError("--out: where to write the export (a folder or s3://bucket/prefix)")
    source = open_store(settings)
    dest = open_store_url(out, settings)
    with progress_bar(err, f"exporting {name} as {fmt}") as progress:
        task = progress.add_task("jobs", total=None)
        summary = export_dataset(
            source,
            name,
            fmt,
            dest,
            shard_bytes=shard_mb * MIB,
            limit=count if fmt == "contact-sheet" else None,
            on_start=lambda total: progress.update(task, total=total),
            on_row=lambda: progress.advance(task),
        )
    if summary.rows == 0:
        raise FarmError(f"dataset {name} has no finished jobs in {settings.storage_url}")
    err.print(f"exported {summary.rows} jobs of {name} as {fmt} to {out}")
    for uri in summary.files:
        typer.echo(uri)


@app.command()
def status(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset, with its objects in storage counted.")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every 2 s (Ctrl-C stops).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The live fleet (each worker's card, level, jobs, images/hour, heartbeat), the queues and the datasets
    (progress, rate, ETA, failures with reasons); jobs no live worker can serve are flagged."""
    from fluxfarm.producer.status import read_status, render_status, watch_status

    settings = ProducerSettings()
    dataset = None if dataset is None else parse_dataset_name(dataset)
    if watch:
        watch_status(settings, dataset, out)
        return
    report = read_status(settings, dataset, list_storage=dataset is not None)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        out.print(render_status(report))


@app.command()
def exporter(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the /metrics endpoint.")] = 9463,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
) -> None:
    """Serve the farm (live workers, queue depths, dataset progress, dead letters) as Prometheus
    metrics, read from Redis at each scrape; each worker serves its own on FLUXFARM_METRICS_PORT."""
    import logging

    from fluxfarm.producer.exporter import run_exporter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_exporter(ProducerSettings(), address, port)


@app.command("bench-submit")
def bench_submit(
    rows: Annotated[int, typer.Option(min=1, help="Rows in the generated prompt file.")] = 100_000,
    out_file: Annotated[Path | None, typer.Option("--out", help="Also append the rows here as JSON lines.")] = None,
) -> None:
    """How fast `fluxfarm submit FILE` enqueues a dataset and its peak memory, on a private redis-server."""
    from rich.table import Table

    from fluxfarm.producer.submit_bench import run_submit_bench

    results = run_submit_bench(rows)
    table = Table(title=f"fluxfarm submit, {rows} rows")
    for column in ("run", "seconds", "jobs/s", "peak RSS MiB", "queue length after"):
        table.add_column(column)
    for row in results:
        table.add_row(
            row.run, f"{row.seconds:.2f}", f"{row.jobs_per_s:.0f}", f"{row.peak_rss_mib:.0f}", str(row.queue_length)
        )
    out.print(table)
    if out_file is not None:
        with out_file.open("a", encoding="utf-8") as handle:
            for row in results:
                handle.write(row.model_dump_json() + "\n")


@app.command("bench-fleet")
def bench_fleet(
    workers: Annotated[int, typer.Option(min=1, max=256, help="Render-free worker processes to start.")] = 4,
    jobs: Annotated[int, typer.Option(min=1, max=10_000_000, help="Jobs sent as one dataset.")] = 2_000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    replay: Annotated[
        bool,
        typer.Option(
            "--replay",
            help="Record the farm's commands for --jobs jobs, then replay them --rounds times from --clients "
            "pipelined redis-cli streams on a fresh Redis: the jobs/s one Redis sustains for the mix.",
        ),
    ] = False,
    rounds: Annotated[int, typer.Option(min=1, max=100_000, help="With --replay: times the recording is sent.")] = 100,
    clients: Annotated[int, typer.Option(min=1, max=256, help="With --replay: concurrent redis-cli streams.")] = 8,
) -> None:
    """The farm's own cost per job, on a private redis-server with render-free workers (no model, 8x8
    placeholders): jobs/s, Redis commands and bytes per job, worker CPU per job; with --replay, the jobs/s one
    Redis sustains for the farm's recorded command mix."""
    if replay:
        from fluxfarm.producer.fleet_replay import run_replay

        replayed = run_replay(jobs, rounds, clients, workers)
        if as_json:
            typer.echo(replayed.model_dump_json())
            return
        out.print(
            f"{replayed.jobs} jobs replayed ({replayed.jobs_captured} recorded x {replayed.rounds}, "
            f"{replayed.commands_per_job:.1f} commands a job) from {replayed.clients} streams: "
            f"{replayed.jobs_per_s:.0f} jobs/s, {replayed.redis_cpu_ms_per_job:.3f} ms Redis CPU a job, "
            f"{replayed.replay_errors} error replies"
        )
        return
    from fluxfarm.producer.fleet_bench import run_fleet_bench

    result = run_fleet_bench(workers, jobs)
    if as_json:
        typer.echo(result.model_dump_json())
        return
    out.print(
        f"{result.jobs} jobs on {result.workers} render-free workers ({result.cores} cores): "
        f"{result.jobs_per_s:.0f} jobs/s, {result.redis_commands_per_job:.1f} Redis commands a job, "
        f"{result.redis_bytes_per_queued_job:.0f} Redis bytes a queued job, "
        f"{result.worker_cpu_ms_per_job:.1f} ms worker CPU and {result.redis_cpu_ms_per_job:.2f} ms Redis CPU a job, "
        f"{result.jobs_failed} failed"
    )
