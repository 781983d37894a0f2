"""LoRA jobs on the tiny model: fused into the weights at each level, matched against diffusers' own
LoRA loader (peft layers beside the base weights), cached on disk for GGUF, and refused clearly."""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxfarm.shared.errors import JobInputError
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.worker.model.flux_arch import FLUX_DEV_TRANSFORMER, meta_transformer
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights, load_model
from fluxfarm.worker.render.batcher import RenderBatcher
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.render.fault_injection import FaultPlan
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.random_lora import write_random_lora
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.adapter_files import load_clip_lora_with_peft, write_peft_lora

WEIGHT = 0.8
JOB = {"prompt": "a red fox in the snow", "width": 256, "height": 256, "steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-files")


@pytest.fixture(scope="module")
def settings(files: Path) -> WorkerSettings:
    return WorkerSettings(cache_dir=files / "cache", job_file_roots=[str(files)])


@pytest.fixture(scope="module")
def lora(tiny_model: Path, files: Path) -> Path:
    return write_peft_lora(tiny_model, files / "style")


def _job(lora: Path | None, weight: float = WEIGHT) -> RenderJob:
    loras = [] if lora is None else [{"source": str(lora), "weight": weight}]
    return parse_job({**JOB, "loras": loras})


def _pixels(engine: RenderEngine, job: RenderJob) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(engine.render(job).png)).convert("RGB"), dtype=np.float64)


def _engine(tiny_model: Path, level: QuantLevel, settings: WorkerSettings) -> RenderEngine:
    transformer = None if level in (QuantLevel.BF16, QuantLevel.FP8) else str(gguf_path(tiny_model, level))
    model = load_model(str(tiny_model), transformer, "cpu", settings, level=level)
    return RenderEngine(model, settings=settings)


@pytest.fixture(scope="module")
def diffusers_lora(tiny_model: Path, lora: Path, settings: WorkerSettings) -> np.ndarray:
    """The reference: diffusers' loader puts peft LoRA layers beside the base weights (nothing fused)."""
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    pipe.set_adapters(["style"], [WEIGHT])
    pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(id="reference", transformer="reference", transformer_sha256="0" * 64)
    engine = RenderEngine(
        LoadedModel(pipe=pipe, weights=LoadedWeights.known(info), level=QuantLevel.BF16, device="cpu"),
        settings=settings,
    )
    return _pixels(engine, _job(None))


@pytest.fixture(scope="module")
def diffusers_base(tiny_model: Path, settings: WorkerSettings) -> np.ndarray:
    return _pixels(_engine(tiny_model, QuantLevel.BF16, settings), _job(None))


def test_a_fused_lora_renders_as_diffusers_own_loader_does(
    tiny_model: Path, lora: Path, settings: WorkerSettings, diffusers_lora: np.ndarray, diffusers_base: np.ndarray
) -> None:
    engine = _engine(tiny_model, QuantLevel.BF16, settings)
    fused = _pixels(engine, _job(lora))
    lora_effect = np.abs(diffusers_lora - diffusers_base).mean()
    difference = np.abs(fused - diffusers_lora)
    print(f"\nLoRA effect {lora_effect:.3f}, fused vs diffusers: mean {difference.mean():.4f} max {difference.max()}")
    assert lora_effect > 1.0, "the LoRA changes the image"
    assert difference.max() <= 2 and difference.mean() < 0.05, "the same image, up to float summation order"
    assert np.array_equal(_pixels(engine, _job(None)), diffusers_base), "no LoRA: exactly the base weights again"


def test_a_text_encoder_lora_is_fused_into_clip_and_keys_the_embedding_cache(
    tiny_model: Path, files: Path, settings: WorkerSettings, diffusers_base: np.ndarray
) -> None:
    clip_lora = write_peft_lora(tiny_model, files / "clip", part="text_encoder")
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    load_clip_lora_with_peft(pipe, clip_lora)
    pipe.set_progress_bar_config(disable=True)
    info = ModelInfo(id="reference", transformer="reference", transformer_sha256="0" * 64)
    reference = RenderEngine(
        LoadedModel(pipe=pipe, weights=LoadedWeights.known(info), level=QuantLevel.BF16, device="cpu"),
        settings=settings,
    )
    want = _pixels(reference, _job(None))
    engine = _engine(tiny_model, QuantLevel.BF16, settings)
    assert np.array_equal(_pixels(engine, _job(None)), diffusers_base)  # base embeddings now cached
    got = _pixels(engine, _job(clip_lora, 1.0))
    assert engine.loras.touches_text_encoder
    assert np.abs(want - diffusers_base).mean() > 0.5, "the CLIP LoRA changes the image"
    assert np.abs(got - want).max() <= 2, "fused CLIP renders as peft's layers do, not from the cached embedding"


@pytest.mark.parametrize("level", [QuantLevel.Q8_0, QuantLevel.Q4_K, QuantLevel.FP8])
def test_quantized_levels_match_the_diffusers_lora_render_within_their_own_error(
    tiny_model: Path,
    lora: Path,
    settings: WorkerSettings,
    diffusers_lora: np.ndarray,
    diffusers_base: np.ndarray,
    level: QuantLevel,
) -> None:
    engine = _engine(tiny_model, level, settings)
    base_error = np.abs(_pixels(engine, _job(None)) - diffusers_base).mean()
    lora_error = np.abs(_pixels(engine, _job(lora)) - diffusers_lora).mean()
    lora_effect = np.abs(diffusers_lora - diffusers_base).mean()
    print(f"\n{level}: base error {base_error:.3f}, LoRA error {lora_error:.3f}, LoRA effect {lora_effect:.3f}")
    assert lora_error <= 1.5 * base_error + 0.1, "fusing adds no more error than the level has"
    assert lora_error < lora_effect / 2, "the render is the LoRA's, not the base's"


def test_gguf_fused_blocks_come_from_the_disk_cache_the_second_time(
    tiny_model: Path, lora: Path, settings: WorkerSettings
) -> None:
    first = _engine(tiny_model, QuantLevel.Q4_K, settings)
    image = _pixels(first, _job(lora, 0.5))
    assert not first.loras.last_fuse_from_cache
    second = _engine(tiny_model, QuantLevel.Q4_K, settings)  # a restarted worker, the same cache folder
    assert np.array_equal(_pixels(second, _job(lora, 0.5)), image)
    assert second.loras.last_fuse_from_cache
    assert not np.array_equal(_pixels(second, _job(lora, -0.5)), image)  # another weight is another set
    assert not second.loras.last_fuse_from_cache


def test_jobs_with_different_lora_sets_in_one_batch_each_render_with_their_own(
    tiny_model: Path, lora: Path, settings: WorkerSettings
) -> None:
    engine = _engine(tiny_model, QuantLevel.Q8_0, settings)
    alone = {weight: _pixels(engine, _job(lora, weight)) for weight in (0.5, 1.0)}
    base = _pixels(engine, _job(None))
    engine.max_batch = 4
    batch = engine.render_batch([_job(lora, 0.5), _job(None), _job(lora, 1.0), _job(lora, 0.5)])
    images = [np.asarray(Image.open(io.BytesIO(r.png)).convert("RGB"), dtype=np.float64) for r in batch]
    for image, want in zip(images, [alone[0.5], base, alone[1.0], alone[0.5]], strict=True):
        assert np.abs(image - want).max() <= 2
    assert [r.batch_size for r in batch] == [2, 1, 1, 2]
    assert [len(r.loras) for r in batch] == [1, 0, 1, 1] and batch[0].loras[0].weight == 0.5


def test_unusable_loras_fail_with_the_reason_and_leave_the_weights_alone(
    tiny_model: Path, files: Path, settings: WorkerSettings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    engine = _engine(tiny_model, QuantLevel.Q8_0, settings)
    base = _pixels(engine, _job(None))
    other_model = write_random_lora(meta_transformer(FLUX_DEV_TRANSFORMER), files / "dev.safetensors", rank=1, alpha=1)
    garbage = files / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    outside = tmp_path_factory.mktemp("elsewhere") / "lora.safetensors"
    outside.write_bytes(b"")
    cases = {
        other_model: "does not fit this model",
        files / "missing.safetensors": "does not exist",
        garbage: "could not be read as a FLUX LoRA",
        outside: "FLUXFARM_JOB_FILE_ROOTS",
    }
    for path, reason in cases.items():
        with pytest.raises(JobInputError, match=reason):
            engine.render(_job(path))
    assert np.array_equal(_pixels(engine, _job(None)), base)


def test_a_fuse_that_fails_half_way_puts_the_base_weights_back(tiny_model: Path, lora: Path, tmp_path: Path) -> None:
    """Issue 18, finding 6: the GPU runs out of memory after two layers of a set are fused; the next job
    without LoRAs renders exactly as on a clean worker, and the set fuses cleanly once memory allows."""
    settings = WorkerSettings(cache_dir=tmp_path / "cache", job_file_roots=[str(lora.parent)])
    clean = _engine(tiny_model, QuantLevel.Q8_0, settings)
    base, with_lora = _pixels(clean, _job(None)), _pixels(clean, _job(lora))
    engine = _engine(tiny_model, QuantLevel.Q8_0, settings)
    assert np.array_equal(_pixels(engine, _job(None)), base)
    engine.faults = FaultPlan(oom_fusing_after_layers=2)
    with pytest.raises(torch.OutOfMemoryError, match="fusing a LoRA set's layer 3"):
        engine.render(_job(lora))
    assert engine.loras.active_id is None and not engine.loras.active
    assert np.array_equal(_pixels(engine, _job(None)), base), "no half-fused LoRA left in the base weights"
    engine.faults = None
    assert np.array_equal(_pixels(engine, _job(lora)), with_lora)
    assert np.array_equal(_pixels(engine, _job(None)), base)


def test_a_full_disk_drops_the_fused_cache_not_the_job(
    tiny_model: Path, lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = WorkerSettings(cache_dir=tmp_path / "cache", job_file_roots=[str(lora.parent)])
    want = _pixels(_engine(tiny_model, QuantLevel.Q8_0, settings), _job(lora, 0.3))
    fused = settings.cache_dir / "fused-lora"
    shutil.rmtree(fused)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fluxfarm.worker.adapters.lora_fuser.save_file", disk_full)
    engine = _engine(tiny_model, QuantLevel.Q8_0, settings)
    assert np.array_equal(_pixels(engine, _job(lora, 0.3)), want)
    assert list(fused.iterdir()) == [], "no half-written cache folder is left to be read later"


def test_an_adapter_job_out_of_memory_fails_alone_and_the_worker_keeps_its_level(
    tiny_model: Path, lora: Path, settings: WorkerSettings
) -> None:
    """Issue 18, finding 9: an adapter job that ran out of memory stepped the worker down a level for
    every job after it."""
    engine = _engine(tiny_model, QuantLevel.Q8_0, settings)
    engine.faults = FaultPlan(oom_fusing_after_layers=0)
    stepped: list[str] = []

    def step_down(current: RenderEngine, job: RenderJob) -> RenderEngine | None:
        stepped.append(job.id)
        return None

    batcher = RenderBatcher(engine, 1, 0.0, step_down)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="fails alone, the worker keeps its level"):
            batcher.render(_job(lora))
        assert stepped == []
        engine.faults = FaultPlan(oom_pixels_over=1)
        with pytest.raises(torch.OutOfMemoryError):
            batcher.render(_job(None))
        assert len(stepped) == 1, "a base job that does not fit alone still steps the worker down"
    finally:
        batcher.close()
