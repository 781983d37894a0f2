"""The fp8 level: Linear weights stored in e4m3 with one scale per output channel.

Plain casting to e4m3 (diffusers' layerwise casting) has no scale: FLUX's weights (std ~0.02) then
sit largely in e4m3's subnormal range and lose most of their precision. Scaling each output row by
its absolute maximum / 448 uses e4m3's whole range. Compute upcasts one layer at a time to the
compute dtype; fp8 tensor-core matmuls can use the same weights and scales.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from worker.quantize import keeps_high_precision

E4M3_MAX = 448.0


class ScaledFp8Linear(nn.Module):
    """A Linear whose weight is e4m3 with a float32 scale per output row."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().to(torch.float32)
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x.to(self.compute_dtype), self.dequantized_weight(), self.bias)


def to_scaled_fp8(module: nn.Module, compute_dtype: torch.dtype, prefix: str = "") -> nn.Module:
    """Replace every nn.Linear below `module` in place, except the layers every level keeps in 16 bits
    (embedders, output layers). Run it on the host, before moving the model to a GPU."""
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if keeps_high_precision(f"{qualified}."):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, ScaledFp8Linear(child, compute_dtype))
        else:
            to_scaled_fp8(child, compute_dtype, f"{qualified}.")
    return module
