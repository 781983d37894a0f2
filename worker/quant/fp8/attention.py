"""The fp8 level's attention: query, key and value in e4m3, on fp8 tensor cores, through cuDNN's fp8
flash attention (the graph API of `nvidia-cudnn-frontend`; the library itself ships with torch).

At 1024^2 a FLUX step spends ~23 ms of its ~96 ms in bf16 attention, 57 times over 4,608 tokens; cuDNN's
fp8 kernel does the same attention in 0.28 instead of 0.41 ms on an H200 (918 against 643 TFLOP/s,
`tests/gpu/fp8_attention.py`, docs/benchmarks.md).

Scales are one per tensor, because that is what the kernel takes. Query and key come out of FLUX's
RMS norms and a rotation, which bound them without looking at them: an RMS-normed head vector has
length sqrt(head_dim), so no element exceeds sqrt(head_dim) * max|norm weight|, and a rotation keeps
that. Scaling by that bound costs no pass over the tensors (an absolute maximum over a whole tensor
is a reduction of its own, which measured ~0.6 ms per attention eager) and no precision: e4m3 keeps
3 mantissa bits anywhere in its normal range. Value has no such bound and is divided by its absolute
maximum / 448. The softmax probabilities lie in [0, 1] and are kept as P * 448.
Every output row is a convex combination of value rows, so |O| <= max|V|: the output takes V's scale
and cannot overflow. On Hopper the kernel writes O in e4m3 (bf16 output needs Blackwell); it is read
back at that scale by the torch ops that follow, which torch.compile fuses into the next layer's
quantization.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn
from torch.nn import functional

from fluxfarm.worker.quant.fp8.card import FP8_ATTENTION_MIN_COMPUTE_CAPABILITY
from fluxfarm.worker.quant.fp8.weights import E4M3_MAX

log = logging.getLogger(__name__)


@torch.library.custom_op("fluxfarm::fp8_attention", mutates_args=())
def fp8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    descale_q: torch.Tensor,
    descale_k: torch.Tensor,
    descale_v: torch.Tensor,
    scale_o: torch.Tensor,
) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) e4m3 tensors and their float32 descales, shaped (1, 1, 1, 1) ->
    softmax(q k^T / sqrt(head_dim)) v in e4m3, same layout, multiplied by `scale_o`."""
    return _CUDNN.run(q, k, v, descale_q, descale_k, descale_v, scale_o)


@fp8_attention_op.register_fake
def _(q: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


class _CudnnFp8Attention:
    """cuDNN graphs built once per (shape, device) and a handle per device; each call runs on the
    current stream, so a captured CUDA graph replays the kernel."""

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}
        self._graphs: dict[tuple[int, ...], tuple[Any, dict[Any, Any], dict[str, Any], int]] = {}

    def _handle(self, device: torch.device) -> Any:
        import cudnn

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = cudnn.create_handle()
        return self._handles[index]

    def _graph(self, q: torch.Tensor, handle: Any) -> tuple[Any, dict[Any, Any], dict[str, Any], int]:
        """The graph for q's shape, its constant inputs (the probabilities' scales), its tensors by name
        and its workspace size. Built on a shape's first call, which is eager: never inside a capture."""
        import cudnn

        batch, tokens, heads, dim = q.shape
        key = (batch, tokens, heads, dim, q.device.index or 0)
        if key not in self._graphs:
            e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
            dims = (batch, heads, tokens, dim)  # cuDNN's order; the memory stays (batch, tokens, heads, dim)
            strides = (tokens * heads * dim, dim, heads * dim, 1)
            tensors = {name: graph.tensor(name=name, dim=dims, stride=strides, data_type=e4m3) for name in "qkv"}
            scalar = {"dim": (1, 1, 1, 1), "stride": (1, 1, 1, 1), "data_type": fp32}
            for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
                tensors[name] = graph.tensor(name=name, **scalar)
            out, _, amax_s, amax_o = graph.sdpa_fp8(
                q=tensors["q"],
                k=tensors["k"],
                v=tensors["v"],
                descale_q=tensors["descale_q"],
                descale_k=tensors["descale_k"],
                descale_v=tensors["descale_v"],
                descale_s=tensors["descale_s"],
                scale_s=tensors["scale_s"],
                scale_o=tensors["scale_o"],
                is_inference=True,
                attn_scale=1 / math.sqrt(dim),
                use_causal_mask=False,
                name="fluxfarm_fp8_attention",
            )
            out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
            tensors.update(out=out, amax_s=amax_s, amax_o=amax_o)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            constants = {
                tensors["descale_s"]: torch.full((1, 1, 1, 1), 1 / E4M3_MAX, device=q.device),
                tensors["scale_s"]: torch.full((1, 1, 1, 1), E4M3_MAX, device=q.device),
            }
            self._graphs[key] = (graph, constants, tensors, max(graph.get_workspace_size(), 1))
        return self._graphs[key]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
        import cudnn

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        handle = self._handle(q.device)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        graph, constants, tensors, workspace_bytes = self._graph(q, handle)
        out = torch.empty_like(q)
        named = dict(zip(("descale_q", "descale_k", "descale_v", "scale_o"), scales, strict=True))
        pack = {
            **constants,
            tensors["q"]: q,
            tensors["k"]: k,
            tensors["v"]: v,
            **{tensors[name]: value.reshape(1, 1, 1, 1).float().contiguous() for name, value in named.items()},
            tensors["out"]: out,
            tensors["amax_s"]: torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device),
            tensors["amax_o"]: torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device),
        }
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=q.device)
        graph.execute(pack, workspace, handle=handle)
        return out


_CUDNN = _CudnnFp8Attention()


def quantize_tensor_fp8(x: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in e4m3 with one float32 descale, shaped (1, 1, 1, 1): `bound` (x's absolute maximum where not
    given) maps to 448."""
    largest = x.abs().amax().float() if bound is None else bound.float()
    descale = (largest.clamp(min=1e-12) / E4M3_MAX).reshape(1, 1, 1, 1)
    # One float32 copy, scaled and clamped in place: eager attention (a worker that does not compile) would
    # otherwise hold two float32 temporaries of q, k or v at once, ~0.1 GiB each for FLUX.2 [dev] at 1024².
    scaled = x.to(torch.float32, copy=True)
    return scaled.div_(descale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), descale


def rms_norm_bound(norms: list[nn.Module], head_dim: int) -> torch.Tensor | None:
    """The largest absolute element these RMS norms (then any rotation) can output, sqrt(head_dim) *
    max|weight|; None where one is another kind of norm, or has no weight or a bias."""
    plain = (
        isinstance(norm, nn.RMSNorm | RMSNorm) and norm.weight is not None and getattr(norm, "bias", None) is None
        for norm in norms
    )
    if not all(plain):
        return None
    return torch.stack([norm.weight.detach().abs().amax().float() for norm in norms]).amax() * math.sqrt(head_dim)


def attention_fp8(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_bound: torch.Tensor | None = None,
    key_bound: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over (batch, tokens, heads, head_dim) tensors, computed in fp8; returned in query's dtype.
    A bound on |query| or |key| (`rms_norm_bound`) is used as its scale; without one, its absolute maximum."""
    q, descale_q = quantize_tensor_fp8(query, query_bound)
    k, descale_k = quantize_tensor_fp8(key, key_bound)
    v, descale_v = quantize_tensor_fp8(value)
    out = fp8_attention_op(q, k, v, descale_q, descale_k, descale_v, 1 / descale_v)
    return (out.float() * descale_v).to(query.dtype)


def fp8_attention_works(device: torch.device) -> bool:
    """Whether cuDNN's fp8 attention runs on this card and build, and agrees with bf16 attention on a small
    case (tried once at startup; a worker without it keeps bf16 attention)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_ATTENTION_MIN_COMPUTE_CAPABILITY:
        return False
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, 256, 2, 128, device=device, dtype=torch.bfloat16, generator=generator) for _ in "qkv")
    try:
        got = attention_fp8(q, k, v)
    except Exception as error:  # no frontend, no cuDNN 9, an unsupported card: all mean bf16 attention
        log.warning("fp8 attention unavailable, attention stays bf16: %s", error)
        return False
    want = functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    error = float((got.float() - want.float()).norm() / want.float().norm())
    if not error < 0.15:
        log.warning("fp8 attention disagrees with bf16 (relative error %.3f), attention stays bf16", error)
    return error < 0.15
