"""`fluxfarm bench` as a user runs it, on the tiny model on the CPU: every row kind, the baselines,
agreement with bf16 and the ratios table (the full-size run needs a GPU; docs/benchmarks.md has it)."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from rich.console import Console

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.text_encoders import prepare_text_encoder
from fluxfarm.worker.tools.bench import Bench
from fluxfarm.worker.tools.bench_parts import build_parts
from fluxfarm.worker.tools.bench_report import BenchLog
from fluxfarm.worker.tools.bench_rows import BenchOptions, StepRow
from tests.conftest import run_fluxfarm


def test_bench_on_the_tiny_model_reports_steps_images_baselines_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    result = run_fluxfarm(
        "bench", "--model", "tiny", "--levels", "bf16,Q8_0", "--sizes", "128x128", "--batches", "1,2",
        "--image-batches", "1,2",
        "--vram-budget", "12", "--image-levels", "Q4_K", "--image-size", "256x256", "--steps", "2",
        "--images", "2", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert {(r["level"], r["path"], r["batch"]) for r in steps} == {
        (level, path, batch) for level in ("bf16", "Q8_0") for path in ("diffusers", "fluxfarm") for batch in (1, 2)
    }
    assert all(r["step_ms"] > 0 and r["ms_per_image_step"] * r["batch"] == r["step_ms"] for r in steps)
    images = {(r["name"], r["batch"]): r for r in rows if r["kind"] == "image"}
    assert {"diffusers-bf16", "seed-recipe", "fluxfarm@12GiB", "fluxfarm-Q4_K"} == {name for name, _ in images}
    assert {batch for name, batch in images if name == "fluxfarm@12GiB"} == {1, 2}
    planned = images[("fluxfarm@12GiB", 1)]
    assert (planned["level"], planned["text_encoders"], planned["images"]) == ("Q6_K", "gpu-swap", 2)
    assert planned["images_per_hour"] == 3600 / planned["s_per_image"]
    assert images[("seed-recipe", 1)]["level"] == "Q8_0"
    # the quantized images differ from bf16, by less than noise would
    assert 20 < images[("fluxfarm-Q4_K", 1)]["psnr_db_vs_bf16"] < 99
    ratios = next(r for r in rows if r["kind"] == "ratios")["ratios"]
    assert "step Q8_0 fluxfarm / bf16 fluxfarm @128x128" in ratios
    assert "images/hour fluxfarm@12GiB batch 1 / seed-recipe" in ratios
    assert "ratios" in result.stderr  # the tables are printed for people
    # the step baselines compile, which the bench does on CUDA only: said, and no row made up
    assert "step baselines ['diffusers-bf16-compile', 'torchao-fp8-compile'] left out" in result.stderr


def test_the_compiled_step_is_set_against_what_a_user_compiles_without_fluxfarm() -> None:
    log = BenchLog(None, {}, Console(file=io.StringIO()))
    for level, path, ms in [("fp8", "fluxfarm+compile", 90.0), ("fp8", "torchao+compile", 100.0),
                            ("bf16", "fluxfarm+compile", 120.0), ("bf16", "diffusers+compile", 150.0),
                            ("bf16", "diffusers", 200.0)]:  # fmt: skip
        log(StepRow(level=level, path=path, width=1024, height=1024, batch=1, step_ms=ms, ms_per_image_step=ms,
                    peak_gib=None))  # fmt: skip
    ratios = log.ratios()
    assert ratios["step fp8 fluxfarm+compile / fp8 torchao+compile @1024x1024"] == 0.9
    assert ratios["step bf16 fluxfarm+compile / bf16 diffusers+compile @1024x1024"] == 0.8
    assert ratios["step fp8 torchao+compile / bf16 diffusers @1024x1024"] == 0.5


def test_bench_refuses_full_size_without_a_gpu() -> None:
    result = run_fluxfarm("bench", "--device", "cpu")
    assert result.returncode == 1
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


def test_bench_fuses_a_lora_and_times_the_steps_with_it(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    result = run_fluxfarm(
        "bench", "--model", "tiny", "--levels", "Q8_0", "--sizes", "128x128", "--batches", "1",
        "--vram-budget", "", "--image-levels", "", "--baselines", "", "--lora-rank", "4",
        "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["path"] for r in rows if r["kind"] == "step"} == {"diffusers", "fluxfarm", "fluxfarm+lora4"}
    (fuse,) = [r for r in rows if r["kind"] == "lora-fuse"]
    assert (fuse["level"], fuse["rank"]) == ("Q8_0", 4)
    assert fuse["layers"] == 14 + 2 * 6  # every Linear of its blocks: one double block, two single blocks
    assert fuse["fuse_s"] > 0 and fuse["cached_fuse_s"] > 0
    ratios = next(r for r in rows if r["kind"] == "ratios")["ratios"]
    assert "step Q8_0 fluxfarm+lora4 / Q8_0 fluxfarm @128x128" in ratios


def test_bench_runs_each_flux2_family_on_its_tiny_pipeline(tmp_path: Path) -> None:
    """FLUX.2 [dev] and klein through the same bench: the plain diffusers baseline, the engine at a budget
    (FLUX.2 [dev]'s smallest plan needs ~15 GiB: at 12 it is reported unfit and the run goes on) and steps;
    for FLUX.2 [dev] also its makers' 4-bit recipe (bitsandbytes NF4 transformer and encoder) at the smallest
    budget, each image compared with bf16's."""
    for model in ("flux.2-klein-4b", "flux.2-dev"):
        out = tmp_path / f"{model}.jsonl"
        result = run_fluxfarm(
            "bench", "--model", model, "--tiny", "--levels", "bf16", "--sizes", "128x128", "--batches", "1",
            "--image-batches", "1", "--vram-budget", "12,24", "--image-levels", "", "--image-size", "256x256",
            "--steps", "2", "--images", "1", "--out", str(out), "--device", "cpu",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(row["model"] == model for row in rows)
        images = {row["name"]: row for row in rows if row["kind"] == "image"}
        assert "seed-recipe" not in images, "the seed recipe is FLUX.1's"
        assert {"diffusers-bf16", "fluxfarm@24GiB"} <= set(images)
        assert ("fluxfarm@12GiB" in images) == (model == "flux.2-klein-4b")
        assert images["fluxfarm@24GiB"]["psnr_db_vs_bf16"] > 20
        assert all(row["host_peak_gib"] > 0 for row in images.values()), "each row's host memory, from /proc"
        assert ("diffusers-nf4-offload" in images) == (model == "flux.2-dev")
        if model == "flux.2-dev":
            recipe = images["diffusers-nf4-offload"]
            assert (recipe["level"], recipe["budget_gib"], recipe["text_encoders"]) == ("nf4", 12, "cpu-offload")
            assert recipe["psnr_db_vs_bf16"] > 10
            ratios = next(r for r in rows if r["kind"] == "ratios")["ratios"]
            assert "images/hour fluxfarm@24GiB batch 1 / diffusers-nf4-offload" in ratios
        assert {(r["path"], r["level"]) for r in rows if r["kind"] == "step"} == {
            ("diffusers", "bf16"),
            ("fluxfarm", "bf16"),
        }


def test_bench_runs_only_the_baselines_named(tmp_path: Path) -> None:
    """A run that has some baselines' rows already names the others: FLUX.2 [dev]'s 24 GiB plan beside the 4-bit
    recipe alone, without the plain bf16 run (so no agreement column); a name it does not know is refused."""
    out = tmp_path / "bench.jsonl"
    result = run_fluxfarm(
        "bench", "--model", "flux.2-dev", "--tiny", "--levels", "", "--vram-budget", "24", "--image-levels", "",
        "--image-batches", "1", "--image-size", "256x256", "--steps", "2", "--images", "1",
        "--baselines", "diffusers-nf4-offload", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    images = {row["name"]: row for row in map(json.loads, out.read_text().splitlines()) if row["kind"] == "image"}
    assert set(images) == {"fluxfarm@24GiB", "diffusers-nf4-offload"}
    assert images["fluxfarm@24GiB"]["psnr_db_vs_bf16"] is None
    refused = run_fluxfarm("bench", "--model", "tiny", "--baselines", "diffusers-bf16,sd15", "--out", str(out))
    assert refused.returncode != 0 and "unknown baseline sd15" in refused.stderr, refused.stderr[-2000:]
    assert "torchao-fp8-compile" in refused.stderr  # the step baselines are named among the known


def test_bench_renders_as_a_deterministic_worker_when_asked(tmp_path: Path) -> None:
    """Its cost is this run's rows against a run without it: one job a batch, whatever batches are asked."""
    out = tmp_path / "bench.jsonl"
    result = run_fluxfarm(
        "bench", "--model", "tiny", "--levels", "", "--image-batches", "1,2", "--vram-budget", "",
        "--image-levels", "Q8_0", "--image-size", "256x256", "--steps", "2", "--images", "2", "--baselines", "",
        "--deterministic", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    images = [json.loads(line) for line in out.read_text().splitlines() if '"kind":"image"' in line.replace(" ", "")]
    assert [(r["name"], r["batch"], r["deterministic"]) for r in images] == [("fluxfarm-Q8_0", 1, True)]


def test_a_released_flux2_encoder_is_drawn_again_with_the_same_weights(tmp_path: Path) -> None:
    """The bench drops FLUX.2's bf16 encoder from host memory while a plan with another encoder precision runs
    (FLUX.2 [dev]'s is 32 GiB); the copy drawn when a later configuration asks must be the one the bf16
    reference images were made with, or every later agreement figure compares different models."""
    parts = build_parts("flux.2-klein-4b", "cpu", tmp_path, tiny=True)
    before = {name: t.clone() for name, t in parts.text_encoder("bf16").state_dict().items()}
    # the fp8 encoder is made from a fresh draw, not a copy of the kept bf16 one: the same weights either way
    from_copy = prepare_text_encoder(copy.deepcopy(parts.text_encoder("bf16")), parts.family, "fp8", parts.dtype)
    from_draw = parts.text_encoder("fp8").state_dict()
    assert from_draw.keys() == from_copy.state_dict().keys()
    assert all(_same(from_draw[name], tensor) for name, tensor in from_copy.state_dict().items())
    parts.release_bf16_encoder()
    assert "text_encoder" not in parts.components
    redrawn = parts.pipeline(None).text_encoder.state_dict()
    assert redrawn.keys() == before.keys()
    assert all(torch.equal(redrawn[name], tensor) for name, tensor in before.items())
    flux1 = build_parts("tiny", "cpu", tmp_path / "flux1")
    assert flux1.draw_encoder is None
    flux1.release_bf16_encoder()
    assert "text_encoder" in flux1.components, "FLUX.1's encoders are never dropped"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, fp8 included (compared as bytes: CPU torch has no fp8 equality)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


def test_a_level_that_runs_out_of_memory_leaves_its_rows_out_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Run 17 lost every row after FLUX.2 [dev]'s bf16 draw ran out of an H100's memory: the process ended there.
    A level that does not fit is said, and the levels and baselines after it still run."""
    parts = build_parts("tiny", "cpu", tmp_path, tiny=True)
    draw = parts.transformer

    def transformer(level: QuantLevel, device: str) -> torch.nn.Module:
        if level is QuantLevel.BF16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 648.00 MiB")
        return draw(level, device)

    monkeypatch.setattr(parts, "transformer", transformer)
    options = BenchOptions(
        model="tiny", tiny=True, levels=[QuantLevel.BF16, QuantLevel.Q8_0], sizes=[(128, 128)], batches=[1],
        budgets=[], image_levels=[], baselines=[], step_repeats=1,
    )  # fmt: skip
    rows: list[BaseModel] = []
    with caplog.at_level(logging.ERROR):
        Bench(parts, options, "cpu", rows.append).run()
    steps = [row for row in rows if isinstance(row, StepRow)]
    assert [(row.level, row.path) for row in steps] == [("Q8_0", "diffusers"), ("Q8_0", "fluxfarm")]
    assert "step rows of bf16 left out: CUDA out of memory" in caplog.text
