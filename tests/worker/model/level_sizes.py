"""Exact resident bytes of a FLUX transformer at each level, counted from its architecture: what keeps
shared.ladder's RESIDENT_TRANSFORMER_GIB table honest (test_plan.py), and how a new model's row is made.

GGUF levels: quantized weights at their block size; tensors kept in higher precision (see
`worker.quant.gguf.writer.ggml_type_for`) are loaded into the bf16 compute dtype. fp8 (`worker.quant.fp8`): every
Linear weight outside the kept layers in e4m3 plus a float32 scale per output row; the rest in bf16.
"""

from __future__ import annotations

import gguf
import torch

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.quant.gguf.writer import ggml_type_for, keeps_high_precision

_BF16_BYTES = 2
_FP32_BYTES = 4


def fp8_bytes(model: torch.nn.Module) -> int:
    """Every Linear weight outside the kept layers in e4m3 with a float32 scale per output row; the rest bf16."""
    total = 0
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            fp8 = isinstance(module, torch.nn.Linear) and not keeps_high_precision(f"{module_name}.")
            if fp8 and name == "weight":
                total += param.numel() + param.shape[0] * _FP32_BYTES
            else:
                total += param.numel() * _BF16_BYTES
    return total


def bf16_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) * _BF16_BYTES


def transformer_bytes(model: torch.nn.Module, level: QuantLevel) -> int:
    """`model`: the transformer on the meta device."""
    if level == QuantLevel.BF16:
        return bf16_bytes(model)
    if level == QuantLevel.FP8:
        return fp8_bytes(model)
    if not level.is_gguf:
        raise ValueError(f"no size model for {level}")
    target = gguf.GGMLQuantizationType[level.value]
    total = 0
    for name, param in model.state_dict().items():
        ggml_type = ggml_type_for(name, tuple(param.shape), target)
        if ggml_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            total += param.numel() * _BF16_BYTES
        else:
            block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            total += param.numel() // block_size * type_size
    return total


def gguf_linear_bytes(model: torch.nn.Module, level: QuantLevel) -> int:
    """Every Linear weight whose rows hold whole blocks at GGUF `level`'s block size; the rest bf16 (how
    `worker.quant.gguf.linear.to_gguf_linears` stores a FLUX.2 text encoder)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[level.value]]
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear) and name == "weight" and param.shape[-1] % block_size == 0:
                total += param.numel() // block_size * type_size
            else:
                total += param.numel() * _BF16_BYTES
    return total
