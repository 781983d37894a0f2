"""bitsandbytes NF4 copies of random-weight modules, for the baseline FLUX.2 [dev]'s makers document for 24-32 GB
cards (black-forest-labs/flux2, docs/flux2_dev_hf.md: "4-bit transformer and 4-bit text-encoder", both through
bitsandbytes, run with `enable_model_cpu_offload`). `fluxfarm bench` runs it beside the plan's choice at the
same budget. diffusers' and transformers' loaders quantize a checkpoint as they read it; the bench's weights
are drawn, not read, so each Linear is swapped for bitsandbytes' own Linear4bit with the settings those loaders
use by default (NF4 blocks, no double quantization, bf16 compute; transformers leaves `lm_head` alone).
bitsandbytes is the `baselines` extra, not a worker dependency.
"""

from __future__ import annotations

import torch
from torch import nn

KEPT_FULL = ("lm_head",)
"""Layers transformers' bitsandbytes loader leaves unquantized (the output head)."""


def to_bnb_nf4(module: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """Replace every Linear of `module` (in place) by bitsandbytes' NF4 Linear4bit, quantized on `device` a
    layer at a time; the rest of the module moves to `device` as it is."""
    import bitsandbytes as bnb  # the baselines extra: imported only where the recipe runs

    for child in list(module.modules()):
        for attr, layer in list(child.named_children()):
            if not isinstance(layer, nn.Linear) or attr in KEPT_FULL:
                continue
            four_bit = bnb.nn.Linear4bit(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                compute_dtype=dtype,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            weight = layer.weight.data.to(device, dtype)
            four_bit.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, compress_statistics=False, quant_type="nf4", module=four_bit
            ).to(device)
            if layer.bias is not None:
                four_bit.bias = nn.Parameter(layer.bias.data.to(device, dtype), requires_grad=False)
            setattr(child, attr, four_bit)
            del layer, weight
    return module.to(device)
