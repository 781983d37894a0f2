"""GGUF linear layers that dequantize with the Triton kernels instead of diffusers' torch ops.

The swap keeps diffusers' loader (file parsing, names, which tensors stay 16-bit) and replaces only
the per-step work: each quantized Linear becomes one dequantize launch plus one cuBLAS matmul, or,
for an input of a few rows (the modulation layers), one fused dequantize + matrix-vector kernel that
never writes a bf16 weight. Both are registered custom ops, so `torch.compile` treats each as one
opaque node and still fuses everything around it.
"""

from __future__ import annotations

import logging

import gguf
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
from torch import nn
from torch.nn import functional

from fluxfarm.worker.quant.gguf.blocks import ENCODERS, quantize_rows
from fluxfarm.worker.quant.gguf.kernel_support import KERNEL_TYPES, gemv_fits

log = logging.getLogger(__name__)


@torch.library.custom_op("fluxfarm::dequantize_gguf", mutates_args=())
def dequantize_gguf(blocks: torch.Tensor, qtype: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, cols) weight in `dtype` from its GGUF blocks (uint8, contiguous)."""
    from fluxfarm.worker.quant.gguf.dequant_kernel import launch_dequantize  # Triton loads where a kernel runs

    out = torch.empty((rows, cols), dtype=dtype, device=blocks.device)
    launch_dequantize(blocks, out, qtype)
    return out


@dequantize_gguf.register_fake
def _(blocks: torch.Tensor, qtype: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    return blocks.new_empty((rows, cols), dtype=dtype)


@torch.library.custom_op("fluxfarm::gemv_gguf", mutates_args=())
def gemv_gguf(blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, qtype: str, rows: int) -> torch.Tensor:
    """x (M, cols) times the transposed (rows, cols) GGUF weight, plus bias: (M, rows) in x's dtype."""
    from fluxfarm.worker.quant.gguf.gemv_kernel import launch_gemv  # Triton loads where a kernel runs

    out = torch.empty((x.shape[0], rows), dtype=x.dtype, device=x.device)
    launch_gemv(blocks, x, bias, out, qtype)
    return out


@gemv_gguf.register_fake
def _(blocks: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, qtype: str, rows: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], rows))


class TritonGGUFLinear(nn.Module):
    """A Linear whose weight stays in GGUF blocks and is dequantized by one kernel per call."""

    def __init__(self, source: GGUFLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.qtype = source.weight.quant_type.name
        self.compute_dtype = source.compute_dtype or torch.bfloat16
        self.register_buffer("blocks", source.weight.as_tensor().view(torch.uint8).contiguous())
        bias = source.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(self.compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if gemv_fits(self.qtype, rows, self.in_features):
            flat = x.reshape(rows, self.in_features).to(self.compute_dtype).contiguous()
            out = gemv_gguf(self.blocks, flat, self.bias, self.qtype, self.out_features)
            return out.reshape(*x.shape[:-1], self.out_features)
        weight = dequantize_gguf(self.blocks, self.qtype, self.out_features, self.in_features, self.compute_dtype)
        return functional.linear(x.to(self.compute_dtype), weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


def use_triton_gguf(module: nn.Module) -> int:
    """Swap every GGUFLinear below `module` whose block type has a kernel; returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, GGUFLinear) and child.weight.quant_type.name in KERNEL_TYPES:
            setattr(module, name, TritonGGUFLinear(child))
            swapped += 1
        else:
            swapped += use_triton_gguf(child)
    return swapped


def to_gguf_linears(
    module: nn.Module, qtype: str, compute_dtype: torch.dtype, work_device: torch.device | str | None = None
) -> nn.Module:
    """Store every Linear below `module` whose rows hold whole `qtype` blocks as a GGUF Linear, left where its
    weight lies, quantized on `work_device` (default: there) a chunk at a time. Embeddings and norms stay as
    they are. The layers are diffusers' own GGUFLinear (its torch dequantize runs anywhere); `use_triton_gguf`
    swaps them for the Triton kernels on a GPU, as for a GGUF transformer."""
    block_size, _ = ENCODERS[qtype]
    quant_type = gguf.GGMLQuantizationType[qtype]
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and child.in_features % block_size == 0:
            weight = child.weight.detach()
            blocks = quantize_rows(weight, qtype, work_device or weight.device).to(weight.device)
            layer = GGUFLinear(
                child.in_features, child.out_features, child.bias is not None, compute_dtype, device="meta"
            )
            layer.weight = GGUFParameter(blocks, quant_type=quant_type)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.detach().to(compute_dtype), requires_grad=False)
            setattr(module, name, layer)
        else:
            to_gguf_linears(child, qtype, compute_dtype, work_device)
    return module
