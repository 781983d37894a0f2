"""The fp8 level's attention on the GPU (device test): cuDNN's fp8 kernel through worker/quant/fp8/attention.py
at FLUX.1's and FLUX.2's attention shapes, against bf16 SDPA: time, relative error, and the same output when replayed
from a CUDA graph. python3 tests/gpu/fp8_attention.py"""

from __future__ import annotations

import torch
from torch.nn import functional

from fluxfarm.worker.model.gpu import time_calls
from fluxfarm.worker.quant.fp8.attention import (
    attention_fp8,
    fp8_attention_op,
    fp8_attention_works,
    quantize_tensor_fp8,
)

SHAPES = {  # (tokens, heads of 128): 512 text tokens beside the image's
    "FLUX.1 1024x1024": (4096 + 512, 24),
    "FLUX.1 512x512": (1024 + 512, 24),
    "FLUX.2 [dev] 1024x1024": (4096 + 512, 48),
    "FLUX.2 [klein] 9B 1024x1024": (4096 + 512, 32),
}


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def check(size: str, tokens: int, heads: int) -> None:
    generator = torch.Generator("cuda").manual_seed(0)
    shape = (1, tokens, heads, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in "qkv")
    flops = 4 * tokens * tokens * heads * 128
    want = bf16_attention(q, k, v).float()
    got = attention_fp8(q, k, v)
    error = float((got.float() - want).norm() / want.norm())
    quantized = [quantize_tensor_fp8(x) for x in (q, k, v)]
    args = [t for t, _ in quantized] + [s for _, s in quantized] + [1 / quantized[2][1]]
    bf16_ms = time_calls(lambda: bf16_attention(q, k, v), "cuda", 50, 5) * 1e3
    kernel_ms = time_calls(lambda: fp8_attention_op(*args), "cuda", 50, 5) * 1e3
    whole_ms = time_calls(lambda: attention_fp8(q, k, v), "cuda", 50, 5) * 1e3

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        attention_fp8(q, k, v)
        with torch.cuda.graph(graph, stream=stream):
            replayed = attention_fp8(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(replayed, got)
    replay_ms = time_calls(graph.replay, "cuda", 50, 5) * 1e3
    print(
        f"{size} ({tokens} tokens, {heads} heads of 128):"
        f" bf16 SDPA {bf16_ms:.3f} ms ({flops / bf16_ms / 1e9:.0f} TFLOP/s);"
        f" fp8 kernel {kernel_ms:.3f} ms ({flops / kernel_ms / 1e9:.0f} TFLOP/s); fp8 with quantization"
        f" {whole_ms:.3f} ms eager, {replay_ms:.3f} ms replayed as a CUDA graph; relative error vs bf16"
        f" {error:.4f}; CUDA graph replay identical: {same}",
        flush=True,
    )
    assert error < 0.1 and same


def main() -> None:
    print("fp8 attention works:", fp8_attention_works(torch.device("cuda")), flush=True)
    for size, (tokens, heads) in SHAPES.items():
        check(size, tokens, heads)


if __name__ == "__main__":
    main()
