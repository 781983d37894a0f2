"""The worker-side commands of `fluxfarm`. Heavy imports (torch, diffusers) wait until a command runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.jobs import parse_dataset_name, parse_job_id
from fluxfarm.shared.ladder import parse_level
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.units import MIB
from fluxfarm.worker.model.plan import Optimize
from fluxfarm.worker.settings import WorkerSettings

_GPU_EXTRA_HINT = "the worker needs the GPU stack: pip install 'fluxfarm[gpu]'"


ALLOCATOR_DEFAULT = "expandable_segments:True"
"""What the worker image sets (infra/worker.Dockerfile): a tight VRAM budget keeps the memory that fragmentation
would strand (FLUX.2 [dev]'s LoRA fuse at 24 GiB ran out with 4.5 GiB reserved but unallocated without it)."""


def _require_gpu_stack() -> None:
    """Fail at once without the GPU extra; give every GPU command the worker image's allocator setting unless
    the operator chose one (it is read at the first CUDA allocation, after this)."""
    if "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR_DEFAULT)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise FarmError(f"{_GPU_EXTRA_HINT} ({error})") from None


def worker(
    model: Annotated[
        str | None, typer.Option(help="Diffusers folder or Hugging Face repo id [env: FLUXFARM_MODEL].")
    ] = None,
    transformer: Annotated[
        str | None,
        typer.Option(
            help="Transformer .gguf/.safetensors: path, hf://, https:// or s3:// [env: FLUXFARM_TRANSFORMER]."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="Torch device, e.g. cuda:1 [env: FLUXFARM_DEVICE].")] = None,
    level: Annotated[
        str | None,
        typer.Option(
            "--level",
            "--quant",
            help="Force a level (fails if it cannot fit) [env: FLUXFARM_LEVEL; --quant and FLUXFARM_QUANT too].",
        ),
    ] = None,
    vram_budget: Annotated[
        float | None, typer.Option(help="Use at most this many GiB of the card [env: FLUXFARM_VRAM_BUDGET_GIB].")
    ] = None,
    optimize: Annotated[
        Optimize | None,
        typer.Option(
            help="What the plan puts first: throughput (fp8 where it runs) or quality [env: FLUXFARM_OPTIMIZE]."
        ),
    ] = None,
) -> None:
    """Run a GPU worker: pick the level the card holds, load it once, render jobs until stopped."""
    settings = WorkerSettings()
    overrides = {"level": parse_level(level) if level else None, "vram_budget_gib": vram_budget, "optimize": optimize}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    model = model or settings.model
    if not model:
        raise FarmError("no model: pass --model or set FLUXFARM_MODEL")
    _require_gpu_stack()
    from fluxfarm.worker.main import run_worker
    from fluxfarm.worker.model.catalog import resolve_model

    source, served = resolve_model(model, settings.model_name)
    run_worker(settings.model_copy(update={"model_name": served}), source, transformer or settings.transformer, device)


def tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the tiny pipeline into.")],
    levels: Annotated[str, typer.Option(help="GGUF levels to write, comma-separated, e.g. Q8_0,Q4_0.")] = "Q8_0,Q4_0",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    model: Annotated[
        FluxModel, typer.Option(help="Whose family's pipeline: flux.1-dev (-schnell, -krea-dev) or flux.2-klein-4b/9b.")
    ] = FluxModel.FLUX_1_DEV,
) -> None:
    """Write an offline tiny FLUX pipeline (random weights) with one GGUF transformer per level.

    It RENDERS NOISE: it exists so the farm runs and is tested without the 24 GB FLUX.1-dev download.

    Use the folder as `--model DIR` (with FLUXFARM_MODEL_NAME for a model other than flux.1-dev), a GGUF
    file inside it as `--transformer`.
    """
    parsed = [parse_level(name) for name in levels.split(",") if name.strip()]
    _require_gpu_stack()
    from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model

    written = write_tiny_model(out_dir, parsed, seed=seed, model=model)
    typer.echo(f"tiny {model.value} pipeline (renders noise) in {written}")
    for level in parsed:
        typer.echo(f"  {level.value}: {gguf_path(written, level)}")


def random_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the pipeline into.")],
    model: Annotated[FluxModel, typer.Option(help="Which catalog model's shapes.")] = FluxModel.FLUX_1_DEV,
    levels: Annotated[str, typer.Option(help="GGUF levels to write beside it, comma-separated (none: derived).")] = "",
    device: Annotated[
        str | None, typer.Option(help="Where weights are drawn and quantized; cuda:0 when present.")
    ] = None,
    tiny: Annotated[bool, typer.Option(help="The family's tiny pipeline instead, to check the tool on a CPU.")] = False,
) -> None:
    """Write a full-size random-weight pipeline (the real model's shapes, bytes and FLOPs) to measure the farm on a GPU.

    It RENDERS NOISE. Use the folder as `--model DIR` (with FLUXFARM_MODEL_NAME for a model other than flux.1-dev).
    """
    parsed = [parse_level(name) for name in levels.split(",") if name.strip()]
    _require_gpu_stack()
    import torch

    from fluxfarm.worker.model.gpu import default_device
    from fluxfarm.worker.tools.random_model import write_random_model

    device = device or default_device()
    if not tiny and torch.device(device).type != "cuda":
        raise FarmError("a full-size random model is drawn on a CUDA GPU; add --tiny to check the tool on a CPU")
    written = write_random_model(out_dir, model, device, parsed, tiny=tiny)
    typer.echo(f"{'tiny' if tiny else 'full-size'} random {model.value} pipeline (renders noise) in {written}")


def quantize(
    src: Annotated[
        Path, typer.Argument(help="A diffusers transformer folder (or pipeline folder) or a .safetensors file.")
    ],
    level: Annotated[str, typer.Option(help="GGUF level: Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0, Q3_K, Q2_K.")],
    out: Annotated[Path, typer.Option(help="The .gguf file to write.")],
    device: Annotated[str | None, typer.Option(help="Where K-quants are computed; cuda:0 when present.")] = None,
) -> None:
    """Quantize a FLUX transformer (diffusers or BFL tensor names) to a GGUF file that diffusers loads.

    Fine-tunes join the fleet this way. Norms, biases, embedders and the output layer keep higher precision.
    """
    parsed = parse_level(level)
    if out.suffix != ".gguf":
        raise FarmError(f"--out must name a .gguf file, not {out}")
    _require_gpu_stack()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors import safe_open

    from fluxfarm.worker.model.gpu import default_device
    from fluxfarm.worker.quant.gguf.writer import iter_safetensors, safetensors_files, write_gguf

    files = safetensors_files(src)
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            total += len(list(handle.keys()))
    columns = (TextColumn(f"[bold]{parsed.value}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("tensors", total=total)
        write_gguf(
            iter_safetensors(files),
            parsed,
            out,
            device=device or default_device(),
            on_tensor=lambda _name: progress.advance(task),
        )
    typer.echo(f"wrote {out} ({out.stat().st_size / MIB:.1f} MiB, {parsed.value})")


def probe_vram(
    out: Annotated[Path, typer.Option(help="JSON-lines file the measurements are appended to.")],
    levels: Annotated[
        str, typer.Option(help="Levels to load, comma-separated.")
    ] = "bf16,fp8,Q8_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K",
    sizes: Annotated[str, typer.Option(help="Image sizes, comma-separated WxH.")] = "1024x1024,512x512",
    model: Annotated[FluxModel, typer.Option(help="The catalog model whose architecture is measured.")] = (
        FluxModel.FLUX_1_DEV
    ),
    device: Annotated[str, typer.Option(help="CUDA device.")] = "cuda:0",
    plans: Annotated[
        str | None, typer.Option(help="Budgets in GiB, comma-separated: check whole plans instead of levels.")
    ] = None,
    optimize: Annotated[
        Optimize, typer.Option(help="The policy the checked plans are made under, as a worker's FLUXFARM_OPTIMIZE.")
    ] = Optimize.THROUGHPUT,
) -> None:
    """Measure resident and peak VRAM of full-size random-weight FLUX at each level (needs a GPU).

    The table it writes calibrates and checks `fluxfarm plan`.
    """
    _require_gpu_stack()
    import torch

    from fluxfarm.worker.tools.vram_probe import run_probe

    if not torch.cuda.is_available():
        raise FarmError("probe-vram measures GPU memory: it needs a CUDA GPU")

    budgets = [float(b) for b in plans.split(",")] if plans else None
    run_probe(out, model, _levels(levels), _sizes(sizes), device, budgets, optimize)


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for size in text.split(","):
        width, _, height = size.strip().partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise FarmError(f"size {size!r} is not WxH, e.g. 1024x1024")
        sizes.append((int(width), int(height)))
    return sizes


def _levels(text: str) -> list:
    return [parse_level(name) for name in text.split(",") if name.strip()]


def _baselines(text: str, known: tuple[str, ...]) -> list[str]:
    names = list(known) if text.strip() == "all" else [name.strip() for name in text.split(",") if name.strip()]
    if unknown := sorted(set(names) - set(known)):
        raise FarmError(f"unknown baseline {', '.join(unknown)}; baselines are {', '.join(known)}")
    return names


def bench(
    out: Annotated[Path | None, typer.Option(help="JSON-lines file the rows are appended to.")] = None,
    model: Annotated[
        str, typer.Option(help="flux.1-dev, flux.1-schnell, flux.2-dev, flux.2-klein-4b or -9b; tiny: FLUX.1's tiny.")
    ] = "flux.1-dev",
    tiny: Annotated[bool, typer.Option(help="The model's tiny pipeline (a CPU check of the tool).")] = False,
    levels: Annotated[str, typer.Option(help="Levels whose transformer step is timed.")] = "bf16,fp8,Q8_0,Q6_K,Q4_K",
    sizes: Annotated[str, typer.Option(help="Step sizes, WxH comma-separated.")] = "512x512,1024x1024",
    batches: Annotated[str, typer.Option(help="Step batch sizes to try.")] = "1,2,4",
    image_batches: Annotated[str, typer.Option(help="Whole-image batch sizes to try.")] = "1,2,4",
    vram_budget: Annotated[
        str, typer.Option("--vram-budget", help="Budgets in GiB for whole-image runs; the plan picks the level.")
    ] = "12,80",
    image_levels: Annotated[str, typer.Option(help="Levels forced for whole-image runs on the whole card.")] = "fp8",
    image_size: Annotated[str, typer.Option(help="Whole-image size, WxH.")] = "1024x1024",
    steps: Annotated[int, typer.Option(help="Denoising steps per image.")] = 28,
    images: Annotated[int, typer.Option(help="Images per whole-image measurement.")] = 4,
    baselines: Annotated[
        str,
        typer.Option(
            help="Baselines run beside the engine, comma-separated, or all, or empty for none: diffusers-bf16, "
            "seed-recipe (FLUX.1), diffusers-nf4-offload (FLUX.2 [dev]) for images; diffusers-bf16-compile and "
            "torchao-fp8-compile (a CUDA GPU; torchao's fp8 on compute capability 8.9+) for steps."
        ),
    ] = "all",
    compile_blocks: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Also time torch.compile, and compile for images.")
    ] = True,
    cuda_graphs: Annotated[bool, typer.Option(help="Replay steps as CUDA graphs (the worker's default).")] = True,
    attention: Annotated[
        str, typer.Option(help="auto (fp8 attention on the fp8 level on Hopper), native or cudnn.")
    ] = "auto",
    lora_rank: Annotated[
        int, typer.Option(help="Above 0: also fuse a random LoRA of this rank and time the steps with it.")
    ] = 0,
    lora_levels: Annotated[str, typer.Option(help="Levels whose steps are timed with the LoRA fused.")] = "Q8_0",
    deterministic: Annotated[
        bool,
        typer.Option(
            help="Render as a FLUXFARM_DETERMINISTIC worker (deterministic kernels, one job a batch); its cost is "
            "a run with it against one without."
        ),
    ] = False,
    device: Annotated[str | None, typer.Option(help="Torch device; cuda:0 when present.")] = None,
) -> None:
    """Time transformer steps and whole images at each level and VRAM budget, with baselines from the same run.

    Full-size random-weight FLUX.1 (same bytes and FLOPs as trained weights) needs a GPU; budgets are
    enforced with torch.cuda.set_per_process_memory_fraction. Every performance figure in docs/benchmarks.md
    comes from this command.
    """
    _require_gpu_stack()
    import torch
    from rich.console import Console

    from fluxfarm.worker.model.gpu import default_device
    from fluxfarm.worker.tools.bench import bench_jobs, run_bench
    from fluxfarm.worker.tools.bench_report import BenchLog
    from fluxfarm.worker.tools.bench_rows import ALL_BASELINES, BenchOptions

    device = device or default_device()
    if model != "tiny" and not tiny and torch.device(device).type != "cuda":
        raise FarmError(
            "full-size bench needs a CUDA GPU; add --tiny (FLUX.1: --model tiny) to check the tool on a CPU"
        )
    bench_jobs(BenchOptions(image_size=_sizes(image_size)[0], steps=steps), 1)  # a bad size fails before any work
    options = BenchOptions(
        model=model,
        tiny=tiny,
        levels=_levels(levels),
        sizes=_sizes(sizes),
        batches=[int(b) for b in batches.split(",")],
        image_batches=[int(b) for b in image_batches.split(",")],
        budgets=[float(b) for b in vram_budget.split(",") if b.strip()],
        image_levels=_levels(image_levels),
        image_size=_sizes(image_size)[0],
        steps=steps,
        images=images,
        baselines=_baselines(baselines, ALL_BASELINES),
        attention=attention,
        compile=compile_blocks,
        cuda_graphs=cuda_graphs,
        lora_rank=lora_rank,
        lora_levels=_levels(lora_levels),
        deterministic=deterministic,
    )
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    log = BenchLog(out, {"gpu": gpu, "torch": torch.__version__, "model": model}, Console(stderr=True))
    run_bench(options, device, log)
    log.print_tables()


def plan(
    file: Annotated[
        Path | None, typer.Argument(help="With --fleet: a prompt file (.txt/.jsonl/.csv/.parquet) to plan for.")
    ] = None,
    vram_gib: Annotated[
        float | None, typer.Option(help="The card's memory, or the budget to plan for, in GiB.")
    ] = None,
    fleet: Annotated[
        str | None, typer.Option(help="With a FILE: `live` (the workers now alive) or a fleet.toml of card classes.")
    ] = None,
    price: Annotated[
        list[str] | None, typer.Option(help="With --fleet: CLASS=PRICE per card-hour (overrides the fleet file's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --fleet: print the plan as JSON.")] = False,
    width: Annotated[int, typer.Option(help="Largest image width the worker will render.")] = 1024,
    height: Annotated[int, typer.Option(help="Largest image height the worker will render.")] = 1024,
    gpu: Annotated[str | None, typer.Option(help="GPU name, e.g. 'RTX 4090' (tells fp8 support).")] = None,
    compute_capability: Annotated[str | None, typer.Option(help="e.g. 8.9; overrides --gpu.")] = None,
    model: Annotated[FluxModel, typer.Option(help="The catalog model the worker serves.")] = FluxModel.FLUX_1_DEV,
    level: Annotated[
        str | None, typer.Option("--level", "--quant", help="Force this level; fails if it cannot fit.")
    ] = None,
    lora_jobs: Annotated[
        bool, typer.Option(help="Keep room to fuse LoRA sets, as a worker that takes LoRA jobs does.")
    ] = True,
    optimize: Annotated[
        Optimize, typer.Option(help="What comes first: throughput (fp8 where it runs) or quality (the best level).")
    ] = Optimize.THROUGHPUT,
    host_gib: Annotated[
        float | None,
        typer.Option(help="The machine's host memory in GiB: a plan that would keep more there is passed over."),
    ] = None,
) -> None:
    """Which level, and where and at which precision the text encoders live, a worker of `model` would choose
    for a card, as JSON; or, given a prompt FILE and --fleet, how the dataset would render on a fleet: each
    card class's level and images/hour, the ETA, GPU-hours and cost."""
    from fluxfarm.worker.model.plan import PlanInputs, make_plan

    if file is not None or fleet is not None:
        if file is None or fleet is None:
            raise FarmError("a fleet plan needs both a prompt FILE and --fleet live|fleet.toml")
        _plan_fleet(file, fleet, price or [], optimize, as_json)
        return
    if vram_gib is None:
        raise FarmError("give --vram-gib (one card), or a prompt FILE with --fleet")
    capability = None
    if compute_capability:
        major, _, minor = compute_capability.partition(".")
        capability = (int(major), int(minor or 0))
    inputs = PlanInputs(
        vram_gib=vram_gib,
        width=width,
        height=height,
        model=model,
        gpu_name=gpu,
        compute_capability=capability,
        forced_level=parse_level(level) if level else None,
        lora_jobs=lora_jobs,
        optimize=optimize,
        host_gib=host_gib,
    )
    typer.echo(make_plan(inputs).model_dump_json(indent=2))


def _prices(values: list[str]) -> dict[str, float]:
    prices = {}
    for value in values:
        name, _, amount = value.rpartition("=")
        try:
            prices[name] = float(amount)
        except ValueError:
            raise FarmError(f"--price {value!r}: give CLASS=PRICE, e.g. 'H200=3.5'") from None
        if not name or prices[name] < 0:
            raise FarmError(f"--price {value!r}: give CLASS=PRICE with a price of at least 0")
    return prices


def _plan_fleet(file: Path, fleet: str, prices: list[str], optimize: Optimize, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from fluxfarm.producer.settings import ProducerSettings
    from fluxfarm.worker.tools.fleet_plan import plan_fleet

    result = plan_fleet(file, fleet, ProducerSettings(), _prices(prices), optimize)
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    table = Table(title=f"{result.jobs} jobs of {result.model} ({result.work_images:g} images of the rates' kind)")
    for column in ("class", "cards", "level", "images/hour a card", "images/hour", "rate from"):
        table.add_column(column)
    for row in result.classes:
        per_card = f"{row.images_per_hour_per_card:.0f}" if row.images_per_hour_per_card else "-"
        total = f"{row.images_per_hour:.0f}" if row.images_per_hour else "-"
        table.add_row(row.name, str(row.count), row.level or "-", per_card, total, row.rate_source)
    console = Console()
    console.print(table)
    if result.eta_hours is not None:
        line = f"ETA {result.eta_hours:.2f} h at {result.images_per_hour:.0f} images/hour"
        line += f", {result.gpu_hours:.1f} GPU-hours" + (f", cost {result.cost:.2f}" if result.cost is not None else "")
        console.print(line)
    else:
        console.print("no ETA: no card class has a rate")
    for note in result.notes:
        console.print(f"note: {note}")


def bench_scale(
    backlogs: Annotated[str, typer.Option(help="Queued jobs of one dataset to measure at, comma-separated.")] = (
        "10000,100000"
    ),
    datasets: Annotated[str, typer.Option(help="Dataset counts (one queued job each), comma-separated.")] = ("10,1000"),
    out: Annotated[Path | None, typer.Option(help="JSON-lines file the rows are appended to.")] = None,
) -> None:
    """What `fluxfarm status`, an exporter scrape and a lost-job sweep cost as Redis fills, with Redis'
    memory (and a dataset's once its largest backlog is drained), each on a private redis-server."""
    from fluxfarm.worker.tools.scale_bench import ScaleRow, run_scale_bench

    def row(found: ScaleRow) -> None:
        line = found.model_dump_json()
        typer.echo(line)
        if out is not None:
            with out.open("a") as handle:
                handle.write(line + "\n")

    run_scale_bench(
        [int(n) for n in backlogs.split(",") if n.strip()], [int(n) for n in datasets.split(",") if n.strip()], row
    )


def rerender(
    dataset: Annotated[str, typer.Argument(help="The stored job's dataset.")],
    job_id: Annotated[str, typer.Argument(help="The stored job's id.")],
    model: Annotated[str, typer.Option(help="Base pipeline: a catalog name, a Hugging Face repo id or a folder.")],
    transformer: Annotated[
        str | None, typer.Option(help="Transformer weights (.gguf/.safetensors path, hf://, s3://); else the base's.")
    ] = None,
    quant: Annotated[str | None, typer.Option(help="Level to make at load (fp8, nf4); else the record's.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device; cuda:0 when present.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
) -> None:
    """Render a stored job again with the given weights and report how far the new image is from the stored
    one (identical, or PSNR and the largest pixel difference), and every field of its reproducibility record
    this worker does not match. Set FLUXFARM_DETERMINISTIC (here and when it was rendered) for bit-identical
    renders on one card."""
    _require_gpu_stack()
    from fluxfarm.shared.storage import open_store
    from fluxfarm.worker.model.gpu import default_device
    from fluxfarm.worker.tools.rerender import report_lines
    from fluxfarm.worker.tools.rerender import rerender as run_rerender

    settings = WorkerSettings()
    report = run_rerender(
        open_store(settings),
        parse_dataset_name(dataset),
        parse_job_id(job_id),
        model,
        transformer,
        device or default_device(),
        settings,
        level=parse_level(quant) if quant else None,
    )
    if as_json:
        typer.echo(report.model_dump_json())
        return
    for line in report_lines(report):
        typer.echo(line)


def calibrate(
    model: Annotated[str, typer.Option(help="Base pipeline: a catalog name, a Hugging Face repo id or a folder.")],
    levels: Annotated[str, typer.Option(help="Levels to measure against bf16, comma-separated.")] = "fp8,Q8_0,Q4_K",
    prompts: Annotated[
        Path | None, typer.Option(help="A probe set, one prompt a line; else the built-in eight.")
    ] = None,
    size: Annotated[str, typer.Option(help="Image size, WxH.")] = "1024x1024",
    steps: Annotated[int, typer.Option(min=1, max=100, help="Denoising steps per image.")] = 28,
    device: Annotated[str | None, typer.Option(help="Torch device; cuda:0 when present.")] = None,
    keep: Annotated[
        bool,
        typer.Option(
            help="Keep the rows in the farm's Redis (FLUXFARM_BROKER_URL) and storage (FLUXFARM_STORAGE_URL)."
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a level.")] = False,
) -> None:
    """How far each level renders from bf16 on these weights and this card: the probe set rendered at bf16 and
    at each level (loaded as a worker loads it), mean PSNR and SSIM against bf16, and LPIPS where its weights
    are on this machine (otherwise the row says it was not measured)."""
    _require_gpu_stack()
    from fluxfarm.shared.calibration import Calibration, keep_calibration
    from fluxfarm.shared.redis_conn import open_redis
    from fluxfarm.shared.storage import open_store
    from fluxfarm.worker.model.gpu import default_device
    from fluxfarm.worker.tools.calibrate import PROBE_PROMPTS
    from fluxfarm.worker.tools.calibrate import calibrate as run_calibrate

    settings = WorkerSettings()
    probe = [line.strip() for line in prompts.read_text().splitlines() if line.strip()] if prompts else PROBE_PROMPTS
    width, height = _sizes(size)[0]
    client = open_redis(settings) if keep else None
    store = open_store(settings) if keep else None

    def row(found: Calibration) -> None:
        if client is not None:
            keep_calibration(client, found, store)
        if as_json:
            typer.echo(found.model_dump_json())
            return
        psnr = "identical" if found.psnr_db is None else f"PSNR {found.psnr_db:.2f} dB"
        perceptual = f"{found.perceptual_metric} {found.perceptual:.4f}" if found.perceptual is not None else "-"
        typer.echo(f"{found.level:>6}  {psnr:>16}  SSIM {found.ssim:.4f}  {perceptual}  ({found.id[:12]})")

    rows = run_calibrate(settings, model, _levels(levels), probe, width, height, steps, device or default_device(), row)
    if not as_json and rows:
        typer.echo(
            f"{len(probe)} images a level, {width}x{height}, {steps} steps; perceptual: {rows[0].perceptual_note}"
        )
