"""`fluxfarm`: the command line. Producer commands live here; worker commands come from `worker.cli`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from producer.client import FarmClient
from producer.job_files import read_job_file
from producer.progress import wait_with_progress
from shared.errors import FarmError, InvalidJob
from shared.jobs import RenderJob, parse_job
from shared.settings import FarmSettings, redact_url
from worker import cli as worker_cli

if TYPE_CHECKING:
    from shared.fleet import FleetReport

EXIT_FAILED = 1
EXIT_INVALID = 2

app = typer.Typer(
    name="fluxfarm",
    help="A distributed render farm for FLUX.1: Redis queue, Celery GPU workers, S3 storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

app.command("worker")(worker_cli.worker)
app.command("tiny-model")(worker_cli.tiny_model)
app.command("quantize")(worker_cli.quantize)
app.command("probe-vram")(worker_cli.probe_vram)
app.command("plan")(worker_cli.plan)
app.command("bench")(worker_cli.bench)


def _job_defaults(**options: Any) -> dict[str, Any]:
    """CLI options that were given, as job fields (unset options leave the schema's defaults)."""
    return {name: value for name, value in options.items() if value is not None}


def _read_fleet(settings: FarmSettings) -> FleetReport:
    """The fleet as the broker's Redis sees it; FarmError when the broker cannot be reached."""
    import redis

    from shared.fleet import fleet_report

    client = redis.Redis.from_url(settings.broker_url)
    try:
        return fleet_report(client)
    except redis.RedisError as error:
        raise FarmError(f"cannot reach the broker at {redact_url(settings.broker_url)}: {error}") from None
    finally:
        client.close()


def _warn_unserved(queues: set[str], settings: FarmSettings) -> None:
    """Say at once when jobs went to a queue no live worker consumes, instead of letting them wait silently."""
    if not queues:
        return
    try:
        report = _read_fleet(settings)
    except FarmError:
        return  # the jobs are queued; the fleet check is advice, not a condition
    for queue in report.unserved:
        if queue.name in queues:
            err.print(
                f"[yellow]warning:[/yellow] no live worker serves {queue.constraint}: {queue.waiting} jobs wait "
                f"in {queue.name} until one starts (see `fluxfarm status`)",
                highlight=False,
            )


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
    quant: Annotated[
        str | None, typer.Option(help="Level: auto, min:LEVEL (or better) or exact:LEVEL [default: auto].")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the images, with a progress bar.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds.")] = None,
) -> None:
    """Validate and enqueue render jobs. Nothing is enqueued unless every job is valid."""
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
    )
    jobs: list[RenderJob]
    if (file is None) == (prompt is None):
        raise InvalidJob("give either --prompt or a prompt file, not both and not neither")
    if file is not None:
        if job_id is not None:
            raise InvalidJob("--job-id names a single job; it cannot apply to a whole file")
        if not file.is_file():
            raise InvalidJob(f"{file}: no such file")
        parsed, errors = read_job_file(file, defaults)
        if errors:
            for problem in errors:
                err.print(f"[red]{file}:{problem.line}[/red]: {problem.reason}", highlight=False)
            raise InvalidJob(f"{len(errors)} invalid rows in {file}; nothing was enqueued")
        jobs = list(parsed)
    else:
        jobs = [parse_job({"prompt": prompt, **defaults})]
    with FarmClient.from_env() as client:
        batch = client.submit_many(jobs)
        cached = sum(handle.cached for handle in batch)
        err.print(f"queued {len(batch) - cached} jobs ({cached} already stored)")
        _warn_unserved({handle.job.constraint.queue for handle in batch if not handle.cached}, client.settings)
        if not wait:
            for handle in batch:
                typer.echo(handle.job_id)
            return
        outcome = wait_with_progress(batch, err, timeout_s=timeout)
    for result in outcome.results:
        typer.echo(f"{result.job_id}\t{result.image.uri}")
    for failure in outcome.failures:
        err.print(f"[red]failed[/red] {failure}", highlight=False)
    if outcome.failures:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The live fleet (workers, levels, jobs done) and the queues; jobs no live worker can serve are flagged."""
    from producer.status import print_report

    report = _read_fleet(FarmSettings())
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        print_report(report, out)


@app.command()
def demo(
    jobs: Annotated[int, typer.Option(help="How many images to render.")] = 6,
    out_dir: Annotated[Path, typer.Option(help="Where the demo keeps its model, data and logs.")] = Path(
        "fluxfarm-demo"
    ),
) -> None:
    """Run the whole farm on this machine: a private Redis, one worker, local storage, a few prompts.

    Uses FLUXFARM_MODEL (and FLUXFARM_TRANSFORMER) when set, else an offline tiny model that renders noise.
    """
    from producer.demo import run_demo

    run_demo(jobs, out_dir, out, err)


def main() -> None:
    """Console entry point: our errors become one red line and an exit code, not a traceback."""
    try:
        code = app(standalone_mode=False)  # click returns an Exit's code instead of raising it here
    except typer.Abort:
        err.print("aborted")
        sys.exit(EXIT_FAILED)
    except InvalidJob as error:
        err.print(f"[red]invalid job[/red]: {error}", highlight=False)
        sys.exit(EXIT_INVALID)
    except (FarmError, TimeoutError) as error:
        err.print(f"[red]error[/red]: {error}", highlight=False)
        sys.exit(EXIT_FAILED)
    except Exception as error:
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
