"""ControlNet jobs on the tiny model: the control image steers the render, the metadata names what was
used, and unusable ControlNets and control images fail the job with the reason."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel
from PIL import Image

from fluxfarm.shared.adapters import as_inline_png
from fluxfarm.shared.errors import JobInputError
from fluxfarm.shared.jobs import RenderJob, parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.adapters.controlnet import controlnet_gib
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.adapter_files import control_png, write_tiny_controlnet

JOB = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 3, "seed": 3}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("controlnet-files")
    write_tiny_controlnet(tiny_model, folder / "canny")
    (folder / "edges.png").write_bytes(control_png(256, 256))
    return folder


@pytest.fixture(scope="module")
def engine(tiny_model: Path, files: Path) -> RenderEngine:
    settings = WorkerSettings(cache_dir=files / "cache", job_file_roots=[str(files)])
    model = load_model(str(tiny_model), str(gguf_path(tiny_model, QuantLevel.Q8_0)), "cpu", settings)
    return RenderEngine(model, settings=settings)


def _job(files: Path, image: str | None = None, scale: float = 0.9, source: str | None = None) -> RenderJob:
    control = {
        "source": source or str(files / "canny"),
        "control_image": image or str(files / "edges.png"),
        "conditioning_scale": scale,
    }
    return parse_job({**JOB, "controlnet": control})


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_the_control_image_steers_the_render_and_the_metadata_names_it(engine: RenderEngine, files: Path) -> None:
    base = _pixels(engine.render(parse_job(JOB)).png)
    controlled = engine.render(_job(files))
    other_image = engine.render(_job(files, image=as_inline_png(control_png(256, 256, seed=7))))
    unscaled = [
        engine.render(_job(files, image=image, scale=0.0)) for image in (None, as_inline_png(control_png(256, 256, 7)))
    ]
    assert np.abs(_pixels(controlled.png) - base).mean() > 1.0
    assert np.abs(_pixels(other_image.png) - _pixels(controlled.png)).mean() > 0.5
    # The image enters only through the ControlNet's residuals: at scale 0 which image it is makes no difference.
    assert np.abs(_pixels(unscaled[0].png) - _pixels(unscaled[1].png)).max() <= 2
    info = controlled.controlnet
    assert info is not None and info.source == str(files / "canny") and info.conditioning_scale == 0.9
    assert info.control_image == str(files / "edges.png")
    assert info.control_image_sha256 == hashlib.sha256((files / "edges.png").read_bytes()).hexdigest()
    assert len(info.sha256) == 64
    assert other_image.controlnet is not None and other_image.controlnet.control_image == "inline"
    # A quantized level (here Q8_0) keeps the ControlNet in scaled fp8, not bf16.
    loaded = engine.controlnets.loaded
    assert loaded is not None
    assert any(isinstance(m, ScaledFp8Linear) for m in loaded.model.modules())
    assert not any(type(m) is torch.nn.Linear and m.in_features > 64 for m in loaded.model.transformer_blocks.modules())


def test_unusable_controlnets_and_control_images_fail_with_the_reason(
    engine: RenderEngine, files: Path, tiny_model: Path
) -> None:
    huge = files / "huge.png"
    Image.new("L", (4100, 4100)).save(huge)
    (files / "not-an-image.png").write_bytes(b"hello")
    Image.new("RGB", (64, 64)).save(files / "control.tiff")  # readable by PIL, not a control image format
    other = files / "other-model"
    shutil.copytree(files / "canny", other, dirs_exist_ok=True)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 4096}))
    cases = {
        _job(files, image=str(huge)): "4100x4100: more than",
        _job(files, image=str(files / "not-an-image.png")): "not a readable image",
        _job(files, image=str(files / "control.tiff")): "not a readable image of PNG, JPEG, WEBP",
        _job(files, image=str(files / "missing.png")): "does not exist",
        _job(files, source=str(files / "no-such-controlnet")): "does not exist",
        _job(files, source=str(other)): "made for another base model: its joint_attention_dim",
        _job(files, source=str(files)): "no config.json",
        _job(files, source=str(tiny_model)): "only under FLUXFARM_JOB_FILE_ROOTS",
    }
    for job, reason in cases.items():
        with pytest.raises(JobInputError, match=reason):
            engine.render(job)
    assert engine.render(_job(files)).controlnet is not None  # the worker renders on


def test_a_controlnet_s_gpu_memory_is_known_from_its_headers_before_it_loads(files: Path) -> None:
    """Issue 18, finding 9: the plan counted no ControlNet. Its size is read from the safetensors headers
    (nothing loaded), so a worker whose card lacks the room fails the job before loading it."""
    model = FluxControlNetModel.from_pretrained(files / "canny")
    params = sum(parameter.numel() for parameter in model.parameters())
    assert controlnet_gib(files / "canny", quantized=False) == pytest.approx(params * 2 / 2**30)
    assert controlnet_gib(files / "canny", quantized=True) == pytest.approx(params / 2**30)
