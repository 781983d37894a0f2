"""Where a transformer step's time goes on the GPU: top kernels per level and path (device diagnostic).

python3 tests/gpu/profile_step.py bf16,fp8,Q8_0 1024 [compile]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.fast.fast_paths import apply_fast_paths
from fluxfarm.worker.model.gpu import time_calls
from fluxfarm.worker.tools.bench_parts import build_parts
from fluxfarm.worker.tools.vram_probe import step_inputs


def main() -> None:
    levels = [QuantLevel(name) for name in sys.argv[1].split(",")]
    size = int(sys.argv[2])
    compile_blocks = len(sys.argv) > 3 and sys.argv[3] == "compile"
    device = "cuda:0"
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        parts = build_parts("flux.1-dev", device, Path(tmp))
        for level in levels:
            model = parts.transformer(level, device)
            apply_fast_paths(model, device, True, "auto", compile_blocks)
            inputs = step_inputs(parts.transformer_config, size, size, 1, device)
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            print(f"first call {time.perf_counter() - start:.1f} s", flush=True)
            eager = time_calls(lambda model=model, inputs=inputs: model(**inputs), device, 5, warmup=2)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(**inputs)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                model(**inputs)
            graphed = time_calls(graph.replay, device, 5, warmup=2)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
            print(
                f"== {level.value} {size}: eager {eager * 1000:.1f} ms, cuda graph {graphed * 1000:.1f} ms", flush=True
            )
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
            del model, graph
            torch.cuda.empty_cache()
            time.sleep(0.1)


if __name__ == "__main__":
    main()
