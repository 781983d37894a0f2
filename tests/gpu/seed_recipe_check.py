"""Why does `fluxfarm bench`'s seed-recipe row (25.9 s/image on the H200) differ from an independent
script of the same recipe (19.4 s)? Runs the recipe (GGUF Q8_0 transformer + enable_model_cpu_offload,
plain `pipe(...)`, 1024², 28 steps) several ways in one process, and times every phase of every image:

- bench:           the bench's own path (components and GGUF state built in memory), under inference_mode;
- bench-no-grad:   the same pipeline, under the pipeline's own no_grad only;
- files:           as a user runs the article: GGUF file -> from_single_file, FluxPipeline.from_pretrained of
                   saved components, enable_model_cpu_offload(), no inference_mode;
- files-inference: the same pipeline under inference_mode;
- bench-after-bf16: the bench's path again, after the bench's diffusers-bf16 baseline, as the bench orders them.

Per image: CLIP, T5, the first transformer call (it offloads T5 and loads the transformer), the mean
of the other 27, the VAE decode (offloads the transformer, loads the VAE), the PNG and the whole.
Also the raw host->GPU and GPU->host copy of each transformer. One JSON row per image and a table.
Usage (device): python3 tests/gpu/seed_recipe_check.py OUT_DIR [IMAGES]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.flux_arch import write_transformer_config
from fluxfarm.worker.quant.gguf.writer import write_gguf
from fluxfarm.worker.render.engine import encode_png
from fluxfarm.worker.tools.bench import Bench, bench_jobs
from fluxfarm.worker.tools.bench_parts import build_parts, plain_diffusers_image
from fluxfarm.worker.tools.bench_rows import SEED_RECIPE, BenchOptions

DEVICE = "cuda:0"
GIB = 1024**3


class PhaseClock:
    """Synchronized wall time of every call of the pipeline's components (onload included: the forward
    pre-hook runs before accelerate's hook moves the module)."""

    def __init__(self, pipe: FluxPipeline):
        self.calls: list[tuple[str, float]] = []
        self.handles = []
        for name in ("text_encoder", "text_encoder_2", "transformer"):
            module = getattr(pipe, name)
            self.handles.append(module.register_forward_pre_hook(self._start))
            self.handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._stop(name)))
        self.vae = pipe.vae
        self.decode = pipe.vae.decode
        pipe.vae.decode = self._timed_decode
        self._began = 0.0

    def _start(self, *_: Any) -> None:
        torch.cuda.synchronize(DEVICE)
        self._began = time.perf_counter()

    def _stop(self, name: str) -> None:
        torch.cuda.synchronize(DEVICE)
        self.calls.append((name, time.perf_counter() - self._began))

    def _timed_decode(self, *args: Any, **kwargs: Any) -> Any:
        self._start()
        out = self.decode(*args, **kwargs)
        self._stop("vae")
        return out

    def take(self) -> dict[str, float]:
        steps = [s for n, s in self.calls if n == "transformer"]
        phases = {
            "clip_s": sum(s for n, s in self.calls if n == "text_encoder"),
            "t5_s": sum(s for n, s in self.calls if n == "text_encoder_2"),
            "first_step_s": steps[0],
            "step_s": statistics.mean(steps[1:]),
            "vae_s": sum(s for n, s in self.calls if n == "vae"),
        }
        self.calls = []
        return phases

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.vae.decode = self.decode


def render(pipe: FluxPipeline, job: Any, steps: int) -> tuple[float, float]:
    """One image as the bench renders it; (seconds for the image, seconds of it for the PNG)."""
    torch.cuda.synchronize(DEVICE)
    start = time.perf_counter()
    image = plain_diffusers_image(pipe, job, steps)
    png_start = time.perf_counter()
    encode_png(image, job)
    end = time.perf_counter()
    return end - start, end - png_start


def run_variant(name: str, pipe: FluxPipeline, options: BenchOptions, images: int, mode: Callable, out: Path) -> None:
    clock = PhaseClock(pipe)
    rows = []
    with mode():
        render(pipe, bench_jobs(options, 1, offset=100)[0], 2)
        clock.take()
        for job in bench_jobs(options, images):
            seconds, png_s = render(pipe, job, job.steps)
            row = {"variant": name, "s_per_image": seconds, "png_s": png_s, **clock.take()}
            row["peak_gib"] = torch.cuda.max_memory_allocated(DEVICE) / GIB
            rows.append(row)
            with out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    clock.close()
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k not in ("variant",)}
    print(f"SUMMARY {name}: " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()), flush=True)


def copy_rates(name: str, transformer: torch.nn.Module, out: Path) -> None:
    """Raw transfers of the whole transformer, as accelerate's hook makes them (module.to)."""
    size = sum(t.numel() * t.element_size() for t in transformer.state_dict().values()) / GIB
    row: dict[str, Any] = {"variant": name, "copy": "transformer", "gib": size}
    for direction, device in (
        ("to_gpu_s", DEVICE),
        ("to_host_s", "cpu"),
        ("to_gpu_again_s", DEVICE),
        ("to_host_again_s", "cpu"),
    ):
        torch.cuda.synchronize(DEVICE)
        start = time.perf_counter()
        transformer.to(device)
        torch.cuda.synchronize(DEVICE)
        row[direction] = time.perf_counter() - start
    pinned = all(t.is_pinned() for t in transformer.state_dict().values() if t.device.type == "cpu")
    row["host_pinned"] = pinned
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


@contextlib.contextmanager
def no_mode() -> Iterator[None]:
    yield


def main() -> None:
    out_dir = Path(sys.argv[1])
    images = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "seed-recipe.jsonl"
    options = BenchOptions(images=images)
    print("torch", torch.__version__, torch.cuda.get_device_name(DEVICE), flush=True)
    with tempfile.TemporaryDirectory(dir="/root") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        parts = build_parts("flux.1-dev", DEVICE, folder / "bench")
        parts.state(QuantLevel.Q8_0, "cpu")
        print(f"parts built and Q8_0 state quantized: {time.perf_counter() - started:.0f} s", flush=True)

        # 1. the bench's path
        pipe = parts.pipeline(parts.transformer(QuantLevel.Q8_0, "cpu"))
        pipe.set_progress_bar_config(disable=True)
        copy_rates("bench", pipe.transformer, out)
        pipe.enable_model_cpu_offload(device=DEVICE)
        run_variant("bench", pipe, options, images, torch.inference_mode, out)
        run_variant("bench-no-grad", pipe, options, images, no_mode, out)
        pipe.remove_all_hooks()
        del pipe

        # 2. the article's path, from files
        started = time.perf_counter()
        saved = folder / "flux"
        parts.pipeline(None).save_pretrained(saved)
        write_transformer_config(saved, {k: v for k, v in parts.transformer_config.items() if not k.startswith("_")})
        gguf_path = write_gguf(parts.master, QuantLevel.Q8_0, folder / "flux1-dev-Q8_0.gguf", device=DEVICE)
        print(f"files written: {time.perf_counter() - started:.0f} s", flush=True)
        transformer = FluxTransformer2DModel.from_single_file(
            str(gguf_path),
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
            config=str(saved),
            subfolder="transformer",
            torch_dtype=torch.bfloat16,
        )
        pipe = FluxPipeline.from_pretrained(saved, transformer=transformer, torch_dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        copy_rates("files", pipe.transformer, out)
        pipe.enable_model_cpu_offload()
        run_variant("files", pipe, options, images, no_mode, out)
        run_variant("files-inference", pipe, options, images, torch.inference_mode, out)
        pipe.remove_all_hooks()
        del pipe, transformer

        # 3. the bench's order: its bf16 baseline, then its seed recipe
        rows: list[Any] = []
        bench = Bench(parts, options.model_copy(update={"images": 2}), DEVICE, rows.append)
        bench.diffusers_bf16()
        print("bf16 baseline:", rows[-1].model_dump_json(), flush=True)
        bench.options = options
        bench.seed_recipe()
        seed_row = rows[-1]
        print(f"bench seed_recipe() after bf16 ({SEED_RECIPE}): {seed_row.s_per_image:.2f} s/image", flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps({"variant": "bench-after-bf16", **seed_row.model_dump(mode="json")}) + "\n")


if __name__ == "__main__":
    main()
