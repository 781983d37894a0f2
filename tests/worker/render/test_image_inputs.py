"""A job's images by family (issue 20, point 2): FLUX.1 img2img at a strength and FLUX.2's reference images
render through the engine exactly as diffusers' own pipelines render them, and the metadata names each image
by its bytes' sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline
from PIL import Image

from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.bench_parts import plain_diffusers_image
from fluxfarm.worker.tools.tiny_model import write_tiny_model


def _picture(path: Path, seed: int, size: int = 256) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _plain(pipe: object, job: RenderJob, **images: object) -> np.ndarray:
    return _pixels(plain_diffusers_image(pipe, job, job.steps, **images))


@pytest.fixture
def files(tmp_path: Path) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    return folder


def test_flux1_img2img_renders_as_diffusers_does_and_strength_decides_how_far(tiny_model: Path, files: Path) -> None:
    source = _picture(files / "start.png", 1)
    settings = WorkerSettings(cache_dir=files / "cache", job_file_roots=[str(files)])
    engine = RenderEngine(load_model(str(tiny_model), None, "cpu", settings), settings=settings)
    base = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 4, "seed": 3, "images": [str(source)]}
    half, most = parse_job({**base, "strength": 0.5}), parse_job({**base, "strength": 0.9})
    plain_txt2img = engine.render(parse_job({k: v for k, v in base.items() if k != "images"}))
    rendered = engine.render(half)
    img2img = FluxImg2ImgPipeline.from_pipe(engine.model.pipe)
    reference = _plain(img2img, half, image=Image.open(source).convert("RGB"), strength=0.5)
    assert np.abs(_pixels(rendered.image) - reference).max() <= 1
    assert not np.array_equal(_pixels(rendered.image), _pixels(engine.render(most).image))
    assert not np.array_equal(_pixels(rendered.image), _pixels(plain_txt2img.image))
    assert [info.sha256 for info in rendered.input_images] == [hashlib.sha256(source.read_bytes()).hexdigest()]


def test_flux2_reference_images_render_as_diffusers_does_and_batch_only_with_the_same_set(
    tmp_path: Path, files: Path
) -> None:
    refs = [_picture(files / f"ref{n}.png", n, 128) for n in range(2)]
    folder = write_tiny_model(tmp_path / "tiny-klein", model=FluxModel.FLUX_2_KLEIN_4B)
    settings = WorkerSettings(cache_dir=files / "cache", job_file_roots=[str(files)])
    loaded = load_model(str(folder), None, "cpu", settings, flux_model=FluxModel.FLUX_2_KLEIN_4B)
    engine = RenderEngine(loaded, max_batch=4, settings=settings)
    base = {"prompt": "a red fox", "model": "flux.2-klein-4b", "width": 256, "height": 256, "steps": 2, "seed": 3}
    both = parse_job({**base, "images": [str(p) for p in refs]})
    one = parse_job({**base, "seed": 4, "images": [str(refs[0])]})
    plain = engine.render(parse_job(base))
    rendered, alone = engine.render_batch([both, one])
    reference = _plain(loaded.pipe, both, image=[Image.open(p).convert("RGB") for p in refs])
    assert np.abs(_pixels(rendered.image) - reference).max() <= 1
    assert rendered.batch_size == alone.batch_size == 1, "other references, other batches"
    assert not np.array_equal(_pixels(rendered.image), _pixels(plain.image))
    assert [info.sha256 for info in rendered.input_images] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in refs]
