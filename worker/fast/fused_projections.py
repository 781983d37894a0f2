"""One matmul for an attention's query, key and value instead of three, at every level.

The three projections read the same input, so their weights stacked by output row compute all three
at once: one GEMM of 9,216 columns runs closer to peak than three of 3,072, the fp8 level quantizes
its input once instead of three times, and a GGUF level launches one dequantization instead of three.
Stacking by rows is exact for every storage this worker uses: bf16 rows, fp8 rows with their own
scales, and GGUF rows (a GGUF block never spans two rows). diffusers' own `fuse_projections` only
handles plain `nn.Linear`; this one also stacks the quantized layers.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.models.transformers.transformer_flux2 import Flux2Attention
from torch import nn

from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear
from fluxfarm.worker.quant.gguf.linear import TritonGGUFLinear


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Row-stack tensors of any dtype (fp8 included, through a byte view)."""
    if tensors[0].dtype == torch.float8_e4m3fn:
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(torch.float8_e4m3fn)
    return torch.cat(tensors)


def _bias(layers: list[nn.Module]) -> nn.Parameter | None:
    if layers[0].bias is None:
        return None
    return nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)


def _stacked(kind: type[nn.Module], layers: list[nn.Module], **attributes: object) -> nn.Module:
    """A `kind` layer for `layers` side by side, made without `kind`'s constructor (which converts a
    source layer); tensors among `attributes` become buffers unless they are Parameters."""
    stacked = kind.__new__(kind)
    nn.Module.__init__(stacked)
    stacked.in_features, stacked.out_features = layers[0].in_features, sum(layer.out_features for layer in layers)
    for name, value in attributes.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            stacked.register_buffer(name, value)
        else:
            setattr(stacked, name, value)
    stacked.bias = _bias(layers)
    return stacked


def _settings(layer: nn.Module) -> dict[str, object]:
    """A layer's plain attributes (compute dtype, block type, fp8 flags): the stacked layer keeps them
    all, so a setting added to a layer class later cannot be lost in stacking."""
    skipped = {"training", "in_features", "out_features"}
    return {name: value for name, value in vars(layer).items() if not name.startswith("_") and name not in skipped}


def stack_layers(layers: list[nn.Module], names: tuple[str, ...] | None = None) -> nn.Module | None:
    """One layer of the same kind computing `layers`' outputs side by side; None where they differ in
    kind, input width, settings or bias (the attention then keeps its separate projections). The stacked
    layer's `stacked_parts` names each layer's rows (worker/adapters/weight_slots.py finds them there)."""
    stacked = _stack(layers)
    if stacked is not None and names is not None:
        stacked.stacked_parts = tuple(zip(names, (layer.out_features for layer in layers), strict=True))
    return stacked


def _stack(layers: list[nn.Module]) -> nn.Module | None:
    first = layers[0]
    if len({type(layer) for layer in layers}) != 1 or len({layer.in_features for layer in layers}) != 1:
        return None
    if {layer.bias is None for layer in layers} != {first.bias is None}:
        return None
    settings = _settings(first)
    if any(_settings(layer) != settings for layer in layers):
        return None
    if isinstance(first, TritonGGUFLinear):
        blocks = torch.cat([layer.blocks for layer in layers])
        return _stacked(TritonGGUFLinear, layers, blocks=blocks, **settings)
    if isinstance(first, ScaledFp8Linear):
        weight = nn.Parameter(_cat_rows([layer.weight.detach() for layer in layers]), requires_grad=False)
        scale = nn.Parameter(torch.cat([layer.weight_scale.detach() for layer in layers]), requires_grad=False)
        return _stacked(ScaledFp8Linear, layers, weight=weight, weight_scale=scale, **settings)
    if type(first) is nn.Linear:
        weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
        return _stacked(nn.Linear, layers, weight=weight)
    return None


def fuse_attention_projections(module: nn.Module) -> int:
    """Stack query, key and value (and the text stream's added ones) of every FLUX.1 attention and FLUX.2
    double-stream attention below `module` (FLUX.2's single-stream blocks come stacked: one projection for query,
    key, value and the MLP); returns how many attentions now run fused."""
    fused = 0
    for attn in [m for m in module.modules() if isinstance(m, FluxAttention | Flux2Attention)]:
        if attn.fused_projections:
            continue
        qkv = stack_layers([attn.to_q, attn.to_k, attn.to_v], ("to_q", "to_k", "to_v"))
        added = None
        if attn.added_kv_proj_dim is not None:
            added = stack_layers(
                [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], ("add_q_proj", "add_k_proj", "add_v_proj")
            )
            if added is None:
                continue
        if qkv is None:
            continue
        attn.to_qkv = qkv
        del attn.to_q, attn.to_k, attn.to_v
        if added is not None:
            attn.to_added_qkv = added
            del attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
        attn.fused_projections = True
        fused += 1
    return fused
