"""On the GPU: LoRA and ControlNet jobs through the worker's fast paths (Triton GGUF layers with stacked
q/k/v, fp8 tensor cores, CUDA graphs), which the CPU tests cannot reach. Prints one JSON line per level:
the LoRA render's error against diffusers' own LoRA loader (peft layers, bf16), beside the level's own
error on the base render, and whether a ControlNet job renders.

    python3 tests/gpu/adapter_check.py
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.metadata import ModelInfo
from fluxfarm.worker.model.pipeline import LoadedModel, LoadedWeights, load_model
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings
from fluxfarm.worker.tools.tiny_model import gguf_path, write_tiny_model
from tests.adapter_files import control_png, write_peft_lora, write_tiny_controlnet

JOB = {"prompt": "a red fox in the snow", "width": 256, "height": 256, "steps": 4, "seed": 11}


def pixels(engine: RenderEngine, job: dict) -> np.ndarray:
    png = engine.render(parse_job(job)).png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "tiny", (QuantLevel.Q8_0, QuantLevel.Q4_K))
        lora = write_peft_lora(model, root / "style")
        write_tiny_controlnet(model, root / "canny")
        (root / "edges.png").write_bytes(control_png(256, 256))
        settings = WorkerSettings(cache_dir=root / "cache", job_file_roots=[str(root)], compile=False)
        lora_job = {**JOB, "loras": [{"source": str(lora), "weight": 0.8}]}
        control_job = {**JOB, "controlnet": {"source": str(root / "canny"), "control_image": str(root / "edges.png")}}

        pipe = FluxPipeline.from_pretrained(model, dtype=torch.bfloat16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        info = ModelInfo(id="reference", transformer="reference", transformer_sha256="0" * 64)
        reference = RenderEngine(
            LoadedModel(pipe=pipe, weights=LoadedWeights.known(info), level=QuantLevel.BF16, device="cuda"),
            settings=settings,
        )
        want_base = pixels(reference, JOB)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
        pipe.set_adapters(["style"], [0.8])
        want_lora = pixels(reference, JOB)
        del reference, pipe
        torch.cuda.empty_cache()

        for level in (QuantLevel.BF16, QuantLevel.FP8, QuantLevel.Q8_0, QuantLevel.Q4_K):
            transformer = None if level in (QuantLevel.BF16, QuantLevel.FP8) else str(gguf_path(model, level))
            loaded = load_model(str(model), transformer, "cuda", settings, level=level)
            engine = RenderEngine(loaded, settings=settings)
            base = pixels(engine, JOB)
            fused = pixels(engine, lora_job)
            again = pixels(engine, JOB)
            controlled = engine.render(parse_job(control_job))
            row = {
                "level": level.value,
                "fast_paths": loaded.fast_paths.model_dump(),
                "base_error_vs_diffusers": float(np.abs(base - want_base).mean()),
                "lora_error_vs_diffusers_lora": float(np.abs(fused - want_lora).mean()),
                "lora_effect": float(np.abs(want_lora - want_base).mean()),
                "base_again_identical": bool(np.array_equal(base, again)),
                "fuse_s": engine.loras.last_fuse_s,
                "controlnet_rendered": controlled.controlnet is not None,
            }
            print(json.dumps(row), flush=True)
            engine.unload()
            del engine, loaded
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
