"""torchao's fp8 as a diffusers user gets it without fluxfarm, for the bench's step baseline `torchao+compile`:
diffusers' `TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))` hands every Linear
to torchao's `quantize_` as its loader reads a checkpoint (diffusers/quantizers/torchao): e4m3 weights and
activations, one scale a row, multiplied on fp8 tensor cores. The bench's weights are drawn, not read, so the
same config goes to torchao's `quantize_` over the drawn transformer, with its default filter (every Linear),
and the bench then compiles it (`torch.compile`, its default mode), as the recipe does. torchao is the
`torchao` extra, not a worker dependency; its fp8 needs a card with fp8 tensor cores (compute capability 8.9+).
"""

from __future__ import annotations

from torch import nn


def to_torchao_fp8(module: nn.Module) -> nn.Module:
    """Quantize every Linear of `module` in place with torchao's per-row fp8 (weights and dynamic activations)."""
    from torchao.quantization import (  # the torchao extra: imported only where the baseline runs
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return module
