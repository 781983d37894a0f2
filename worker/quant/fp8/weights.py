"""The fp8 level: Linear weights stored in e4m3 with one scale per output channel.

Plain casting to e4m3 (diffusers' layerwise casting) has no scale: FLUX's weights (std ~0.02) then
sit largely in e4m3's subnormal range and lose most of their precision. Scaling each output row by
its absolute maximum / 448 uses e4m3's whole range.

Two ways to compute with the same weights: on cards with fp8 tensor cores (compute capability 8.9+:
Ada, Hopper) the activations are quantized per row on the fly and multiplied in e4m3 by
`torch._scaled_mm` at twice the bf16 rate; elsewhere each layer is upcast to the compute dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional

from fluxfarm.worker.quant.fp8.card import FP8_MIN_COMPUTE_CAPABILITY
from fluxfarm.worker.quant.gguf.writer import keeps_high_precision

log = logging.getLogger(__name__)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@torch.library.custom_op("fluxfarm::fp8_rows", mutates_args=())
def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) activations -> e4m3 rows and their float32 scales, shaped (rows, 1)."""
    from fluxfarm.worker.quant.fp8.kernels import launch_quantize_rows

    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    launch_quantize_rows(x, q, scales)
    return q, scales


@quantize_rows_fp8.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same per-row quantization in torch ops. Inside torch.compile this is the one to use: Inductor
    fuses it into the kernel that produced `x` (norm, modulation, GELU), which an opaque kernel prevents."""
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    q = (x.float() / scales).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scales


def fp8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    fast_accum: bool = True,
) -> torch.Tensor:
    """x @ weight.T on fp8 tensor cores: x quantized per row, weight (out, in) e4m3 with scales (out, 1).
    `fast_accum` lets Hopper accumulate in its fp8 units without promoting partial sums to fp32: on the
    H100 it took the compiled 1024^2 step from 108.8 to 99.7 ms with the same error against bf16
    (tests/gpu/fp8_fast_accum.py, docs/benchmarks.md)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    quantize = quantize_rows_torch if torch.compiler.is_compiling() else quantize_rows_fp8
    q, scales = quantize(rows)
    out = torch._scaled_mm(
        q,
        weight.t(),
        scale_a=scales,
        scale_b=weight_scale.view(1, -1),
        bias=bias,
        out_dtype=x.dtype,
        use_fast_accum=fast_accum,
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantize_weight_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (out, in) weight as e4m3 rows and their float32 scales (out, 1): each row's absolute maximum
    maps to e4m3's largest value."""
    weight = weight.to(torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (weight / scale).to(torch.float8_e4m3fn), scale


class ScaledFp8Linear(nn.Module):
    """A Linear whose weight is e4m3 with a float32 scale per output row."""

    def __init__(
        self,
        linear: nn.Linear,
        compute_dtype: torch.dtype,
        work_device: torch.device | str | None = None,
        keep_on_work_device: bool = False,
    ) -> None:
        """`linear` quantized on `work_device` (default: where its weight lies), the result left where `linear`
        lies, or on `work_device` when `keep_on_work_device`."""
        super().__init__()
        source = linear.weight.detach()
        work = torch.device(work_device) if work_device is not None else source.device
        place = work if keep_on_work_device else source.device
        weight, scale = quantize_weight_rows(source.to(work))
        weight, scale = weight.to(place), scale.to(place)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None
        self.tensor_cores = False
        """Set by `use_fp8_tensor_cores` once the card is known to run the fp8 matmul."""
        self.fast_accum = True
        """Fast fp8 accumulation (see `fp8_matmul`); a diagnostic switches it off to compare."""
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().to(place, compute_dtype), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.tensor_cores:
            return fp8_matmul(x, self.weight, self.weight_scale, self.bias, self.fast_accum)
        return functional.linear(x, self.dequantized_weight(), self.bias)


def to_scaled_fp8(
    module: nn.Module,
    compute_dtype: torch.dtype,
    work_device: torch.device | str | None = None,
    prefix: str = "",
    keep_on_work_device: bool = False,
) -> nn.Module:
    """Replace every nn.Linear below `module` in place, except the layers every level keeps in 16 bits
    (embedders, output layers), each quantized on `work_device` (default: where its weight lies) and left where
    its weight lies, or on `work_device` when `keep_on_work_device`. A model on the host quantized on the GPU a
    layer at a time never needs its bf16 whole on the card, and takes seconds where the host takes tens of them
    (FLUX.1's 12B parameters: ~46 s on 2 cores); one that will live on that card keeps each result there rather
    than copy it back and up again (run 12: fp8's load took 15 s against bf16's 8.4 s; the trip moved 24 GB more
    over pageable memory)."""
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if keeps_high_precision(f"{qualified}."):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, ScaledFp8Linear(child, compute_dtype, work_device, keep_on_work_device))
        else:
            to_scaled_fp8(child, compute_dtype, work_device, f"{qualified}.", keep_on_work_device)
    return module


def fp8_tensor_cores_work(device: torch.device) -> bool:
    """Whether this card and build run the per-row-scaled fp8 matmul (tried once on a small case)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_COMPUTE_CAPABILITY:
        return False
    probe = ScaledFp8Linear(nn.Linear(64, 32, bias=True), torch.bfloat16).to(device)
    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16)
    try:
        got = fp8_matmul(x, probe.weight, probe.weight_scale, probe.bias)
    except (RuntimeError, NotImplementedError) as error:  # an older torch or a card without the kernel
        log.warning("fp8 tensor cores unavailable, upcasting fp8 weights instead: %s", error)
        return False
    want = functional.linear(x, probe.dequantized_weight(), probe.bias)
    return bool(torch.allclose(got.float(), want.float(), rtol=0.1, atol=0.1))


def use_fp8_tensor_cores(module: nn.Module) -> int:
    """Switch every ScaledFp8Linear below `module` to the fp8 matmul; returns how many."""
    layers = [m for m in module.modules() if isinstance(m, ScaledFp8Linear)]
    for layer in layers:
        layer.tensor_cores = True
    return len(layers)
