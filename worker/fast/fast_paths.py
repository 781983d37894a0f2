"""Turn on the transformer's fast paths for the card it runs on, and say which ones took.

- GGUF levels: every quantized Linear dequantizes with one Triton kernel (worker/quant/gguf/linear.py)
  instead of diffusers' per-step torch ops.
- fp8: matmuls on fp8 tensor cores (compute capability 8.9+), activations quantized per row; on Hopper
  the attention too, through cuDNN's fp8 flash attention (worker/quant/fp8/attention.py).
- Attention: SDPA as torch picks it, or diffusers' cuDNN backend where asked.
- Query, key and value projections stacked into one matmul (worker/fast/fused_projections.py).
- compile: `torch.compile` of the repeated transformer blocks (regional compilation), which fuses
  the norms, modulation and activation quantization around the matmuls.
- CUDA graphs: each step shape is captured once and replayed (worker/fast/step_graphs.py), which removes
  the per-kernel launch cost that makes small images CPU-bound.
Each is skipped, with the reason logged, where the card or the installed stack cannot run it, so a
worker always starts.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from diffusers import FluxTransformer2DModel
from pydantic import BaseModel

from fluxfarm.worker.fast.fused_projections import fuse_attention_projections
from fluxfarm.worker.fast.step_graphs import use_step_graphs
from fluxfarm.worker.quant.fp8.attention import fp8_attention_works
from fluxfarm.worker.quant.fp8.processors import use_fp8_attention
from fluxfarm.worker.quant.fp8.weights import fp8_tensor_cores_work, use_fp8_tensor_cores

log = logging.getLogger(__name__)

AttentionChoice = Literal["auto", "native", "cudnn"]


class FastPaths(BaseModel):
    """What a transformer runs with; recorded in benchmark rows and logged by the worker."""

    triton_gguf_layers: int = 0
    fp8_tensor_core_layers: int = 0
    fp8_attentions: int = 0
    fused_attentions: int = 0
    attention: str = "native"
    compiled: bool = False
    cuda_graphs: bool = False


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401  (ships with CUDA builds of torch)
    except ImportError:
        log.warning("triton is not installed: GGUF layers dequantize with diffusers' torch ops")
        return False
    return True


def _attention_backend(choice: AttentionChoice, device: torch.device) -> str:
    """auto keeps SDPA's own choice: on an H100 with torch 2.11 that already is cuDNN's flash kernel, and
    forcing diffusers' cuDNN backend measured slower (512^2: 130 vs 84 ms a bf16 step; docs/benchmarks.md)."""
    return "_native_cudnn" if device.type == "cuda" and choice == "cudnn" else "native"


def compile_blocks(transformer: FluxTransformer2DModel) -> None:
    """Regional compilation: each repeated block type compiles once per image size and batch, with static
    shapes (a worker sees few sizes; static kernels beat dynamic ones)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.suppress_errors = True  # a block that fails to compile runs eagerly, the worker goes on
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)


def encoder_fast_paths(encoder: torch.nn.Module, device: str) -> int:
    """A quantized text encoder that encodes on `device`: Q4_K layers on the Triton kernels, fp8 layers on fp8
    tensor cores, where the card runs them (the one-off encode needs neither compile nor graphs). Returns how
    many layers were switched."""
    dev = torch.device(device)
    if not triton_available(dev):
        return 0
    from fluxfarm.worker.quant.gguf.linear import use_triton_gguf

    switched = use_triton_gguf(encoder)
    return switched + (use_fp8_tensor_cores(encoder) if fp8_tensor_cores_work(dev) else 0)


def apply_fast_paths(
    transformer: FluxTransformer2DModel,
    device: str,
    kernels: bool = True,
    attention: AttentionChoice = "auto",
    compile: bool = False,
    cuda_graphs: bool = False,
) -> FastPaths:
    """Switch `transformer` (already on `device`) to the fastest paths this card runs."""
    dev = torch.device(device)
    paths = FastPaths()
    if kernels and triton_available(dev):
        from fluxfarm.worker.quant.gguf.linear import use_triton_gguf

        paths.triton_gguf_layers = use_triton_gguf(transformer)
        if fp8_tensor_cores_work(dev):
            paths.fp8_tensor_core_layers = use_fp8_tensor_cores(transformer)
    if kernels:
        paths.fused_attentions = fuse_attention_projections(transformer)
    backend = _attention_backend(attention, dev)
    if backend != "native":
        transformer.set_attention_backend(backend)
    paths.attention = backend
    if paths.fp8_tensor_core_layers and attention == "auto" and fp8_attention_works(dev):
        paths.fp8_attentions = use_fp8_attention(transformer)
        if paths.fp8_attentions:  # a family without an fp8 processor keeps the backend above
            paths.attention = "cudnn_fp8"
    if compile and dev.type == "cuda":
        compile_blocks(transformer)
        paths.compiled = True
    if cuda_graphs and dev.type == "cuda":
        use_step_graphs(transformer)
        paths.cuda_graphs = True
    log.info("transformer fast paths: %s", paths.model_dump_json())
    return paths
