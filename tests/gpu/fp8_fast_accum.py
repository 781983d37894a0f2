"""The fp8 step with and without fast accumulation (device diagnostic): compiled blocks replayed as one
CUDA graph, as the worker runs them, and each output's relative error against the bf16 step.

python3 tests/gpu/fp8_fast_accum.py 1024,512 [autotune]   (autotune: Inductor's GEMM autotuning, fp8 only)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.fast.fast_paths import apply_fast_paths
from fluxfarm.worker.model.gpu import time_calls
from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear
from fluxfarm.worker.tools.bench_parts import build_parts
from fluxfarm.worker.tools.vram_probe import step_inputs


def graphed_ms(model: torch.nn.Module, inputs: dict) -> tuple[float, torch.Tensor]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(**inputs)[0]
    seconds = time_calls(graph.replay, "cuda", 10, warmup=2)
    result = out.clone()
    del graph
    return seconds * 1000, result


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    device = "cuda:0"
    autotune = sys.argv[2:] == ["autotune"]
    if autotune:
        torch._inductor.config.max_autotune_gemm = True
        torch._inductor.config.max_autotune_gemm_backends = "ATEN,TRITON"
        torch._inductor.config.coordinate_descent_tuning = True
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        parts = build_parts("flux.1-dev", device, Path(tmp))
        inputs = {s: step_inputs(parts.transformer_config, s, s, 1, device) for s in sizes}
        reference = {}
        if not autotune:
            bf16 = parts.transformer(QuantLevel.BF16, device)
            apply_fast_paths(bf16, device, True, "auto", compile=True)
            for s in sizes:
                ms, reference[s] = graphed_ms(bf16, inputs[s])
                print(f"bf16 compiled {s}: {ms:.1f} ms", flush=True)
            del bf16
            torch.cuda.empty_cache()
        model = parts.transformer(QuantLevel.FP8, device)
        apply_fast_paths(model, device, True, "auto", compile=True)
        layers = [m for m in model.modules() if isinstance(m, ScaledFp8Linear)]
        for fast in (True,) if autotune else (False, True):
            for layer in layers:
                layer.fast_accum = fast
            for s in sizes:
                ms, out = graphed_ms(model, inputs[s])
                ref = reference.get(s, out).float()
                error = ((out.float() - ref).norm() / ref.norm()).item()
                print(
                    f"fp8 compiled autotune={autotune} fast_accum={fast} {s}: {ms:.1f} ms, "
                    f"rel. error vs bf16 {error:.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
