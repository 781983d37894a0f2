"""`fluxfarm rerender` (issue 22, acceptance 2, on CPU): a job rendered by the worker's job runner under
FLUXFARM_DETERMINISTIC renders again bit for bit in another process from its stored record; another level or
another kernel setting is named in the report, with the difference measured as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from tests.conftest import run_fluxfarm
from tests.job_runner_harness import in_process_runner


def _store_one(
    tiny_model: Path, redis_server: RedisServer, folder: Path, level: QuantLevel | None, prompt: str
) -> RenderJob:
    """One job rendered at `level` (None: the base's bf16) under FLUXFARM_DETERMINISTIC by the job runner."""
    from fluxfarm.worker.tools.tiny_model import gguf_path

    settings = WorkerSettings(storage_url=f"file://{folder / 'out'}", cache_dir=folder / "cache", deterministic=True)
    transformer = str(gguf_path(tiny_model, level)) if level else None
    loaded = load_model(str(tiny_model), transformer, "cpu", settings)
    engine = RenderEngine(loaded, 1, 0, settings=settings)
    farm = in_process_runner(engine, redis.Redis.from_url(redis_server.url), folder / "out", "w-rerender")
    job = parse_job({"prompt": prompt, "width": 256, "height": 256, "steps": 2, "dataset": "again"})
    farm.queue(job)
    try:
        farm.run(job)
    finally:
        farm.batcher.close()
    return job


@pytest.fixture(scope="module")
def stored(
    tiny_model: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RenderJob, RenderJob]:
    """A job stored at Q8_0 and one at bf16."""
    folder = tmp_path_factory.mktemp("rerender")
    gguf = _store_one(tiny_model, redis_server, folder, QuantLevel.Q8_0, "a lighthouse, again")
    bf16 = _store_one(tiny_model, redis_server, folder, None, "a lighthouse in bf16, again")
    return folder, gguf, bf16


def _rerender(
    tiny_model: Path, folder: Path, job: RenderJob, level: QuantLevel | None, **env: str
) -> dict[str, object]:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    transformer = ["--transformer", str(gguf_path(tiny_model, level))] if level else []
    done = run_fluxfarm(
        "rerender", job.dataset, job.id, "--model", str(tiny_model), *transformer, "--device", "cpu", "--json",
        env={
            "FLUXFARM_STORAGE_URL": f"file://{folder / 'out'}",
            "FLUXFARM_CACHE_DIR": str(folder / "cache"),
            "FLUXFARM_DETERMINISTIC": "true",
            **env,
        },
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("at", ["Q8_0", "bf16"])
def test_a_deterministic_render_is_made_again_bit_for_bit(
    tiny_model: Path, stored: tuple[Path, RenderJob, RenderJob], at: str
) -> None:
    folder, gguf, bf16 = stored
    job, level = (gguf, QuantLevel.Q8_0) if at == "Q8_0" else (bf16, None)
    report = _rerender(tiny_model, folder, job, level)
    assert report == {
        "dataset": job.dataset,
        "job_id": job.id,
        "identical": True,
        "psnr_db": None,
        "max_abs_diff": 0,
        "mismatches": [],
    }


def test_another_level_is_named_and_its_difference_measured(
    tiny_model: Path, stored: tuple[Path, RenderJob, RenderJob]
) -> None:
    folder, job, _ = stored
    report = _rerender(tiny_model, folder, job, QuantLevel.Q4_0)
    assert report["identical"] is False and isinstance(report["psnr_db"], float)
    assert int(report["max_abs_diff"]) > 0  # type: ignore[call-overload]
    mismatches = report["mismatches"]
    assert isinstance(mismatches, list)
    assert "level: Q8_0 -> Q4_0" in mismatches
    assert any(m.startswith("weights_sha256.transformer: ") for m in mismatches)


def test_another_kernel_setting_is_named(tiny_model: Path, stored: tuple[Path, RenderJob, RenderJob]) -> None:
    folder, _, job = stored  # bf16: its attention projections run fused unless the fast kernels are off
    report = _rerender(tiny_model, folder, job, None, FLUXFARM_FAST_KERNELS="false")
    mismatches = report["mismatches"]
    assert isinstance(mismatches, list)
    assert any(m.startswith("fast_paths.fused_attentions: ") for m in mismatches), mismatches
    assert report["identical"] is (report["max_abs_diff"] == 0)  # whatever it is, as measured
