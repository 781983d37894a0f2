"""`fluxfarm`: the one command, composed here above both sides.

The producer's commands come from `fluxfarm.producer.cli`, the worker's from `fluxfarm.worker.cli`;
the worker's module imports no torch until one of its commands runs, so a client-only install
(`pip install fluxfarm`, no `[gpu]`) runs `fluxfarm submit` and `fluxfarm status`. `fluxfarm demo`
lives here too: it starts both sides (fluxfarm/demo.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fluxfarm.producer import cli as producer_cli
from fluxfarm.producer.cli import EXIT_FAILED, EXIT_INVALID, err, out
from fluxfarm.producer.gateway import cli as gateway_cli
from fluxfarm.shared.errors import FarmError, InvalidJob
from fluxfarm.worker import cli as worker_cli

app = typer.Typer(
    name="fluxfarm",
    help="A distributed render farm for FLUX: Redis queue, Celery GPU workers, S3 storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.registered_commands += producer_cli.app.registered_commands
app.add_typer(gateway_cli.tokens, name="token")
app.command("gateway")(gateway_cli.gateway)
app.command("worker")(worker_cli.worker)
app.command("tiny-model")(worker_cli.tiny_model)
app.command("random-model")(worker_cli.random_model)
app.command("quantize")(worker_cli.quantize)
app.command("probe-vram")(worker_cli.probe_vram)
app.command("plan")(worker_cli.plan)
app.command("bench")(worker_cli.bench)
app.command("bench-scale")(worker_cli.bench_scale)
app.command("rerender")(worker_cli.rerender)
app.command("calibrate")(worker_cli.calibrate)


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
    from fluxfarm.demo import run_demo

    run_demo(jobs, out_dir, out, err)


def main() -> None:
    """Console entry point: our errors become one red line and an exit code, not a traceback.

    Typer runs in standalone mode, so usage errors (a missing or unknown option, a bad value) are
    handled by the click that typer itself uses: the usage, the reason, exit code 2. Catching click's
    exceptions here instead broke once typer began to vendor its own click (0.29)."""
    try:
        app()
    except InvalidJob as error:
        err.print(f"[red]invalid job[/red]: {escape(str(error))}", highlight=False)
        sys.exit(EXIT_INVALID)
    except (FarmError, TimeoutError) as error:
        err.print(f"[red]error[/red]: {escape(str(error))}", highlight=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
