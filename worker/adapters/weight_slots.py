"""The weight of each named Linear in a loaded model, readable as floats and writable in its own storage.

A LoRA names modules as diffusers does (`transformer_blocks.0.attn.to_q`), but the worker's loaded
model stores them in several ways: plain bf16/fp32 rows, fp8 rows with a scale each, GGUF blocks
(diffusers' GGUFLinear or our TritonGGUFLinear), and query/key/value stacked into one layer
(worker/fast/fused_projections.py). A slot is one named weight: its rows of whichever layer holds it, read
as a dense float32 matrix and written back encoded as that layer stores it. Writes copy into the
existing tensors, so compiled blocks and captured CUDA graphs, which hold those tensors' addresses,
see the new weights without being rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_functions
from torch import nn

from fluxfarm.shared.errors import JobInputError
from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear, quantize_weight_rows
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.linear import TritonGGUFLinear

FUSE_VALUES_PER_CHUNK = 1 << 20
"""A fuse re-quantizes a layer on the card that renders, beside the loaded model: chunks of 1M values keep
the K-quant search tensors below a step's own working memory. A rank-64 LoRA over all 494 block layers at
Q4_K on an H200 (docs/bench/adapter-memory-h200.log): 9.35 GiB above the resident weights in the
quantizer's default 32M-value chunks, 1.38 GiB in 4M, 0.59 GiB in 1M; the fuse took 24.7, 25.7 and
44.8 s. Once per set and worker: later it comes from the disk cache."""
_PLAIN_GGML = {"F32", "F16", "BF16"}

Storage = dict[str, torch.Tensor]


def _dequantize(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """GGUF byte rows (rows, bytes) -> float32 (rows, cols), with diffusers' reference dequantization."""
    ggml = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml]
    flat = blocks.contiguous().view(torch.uint8).reshape(-1, type_size)
    return dequantize_functions[ggml](flat, block_size, type_size).reshape(blocks.shape[0], cols).float()


def _gguf_qtype(module: nn.Module) -> str | None:
    """The GGUF block type of a layer's weight; None where it holds plain floats."""
    if isinstance(module, TritonGGUFLinear):
        return module.qtype
    quant_type = getattr(module.weight, "quant_type", None)
    return None if quant_type is None or quant_type.name in _PLAIN_GGML else quant_type.name


def _tensors(module: nn.Module) -> Storage:
    """The tensors that hold a layer's weight, each with one row (or byte row) per output row."""
    if isinstance(module, ScaledFp8Linear):
        return {"weight": module.weight.data.view(torch.uint8), "weight_scale": module.weight_scale.data}
    if isinstance(module, TritonGGUFLinear):
        return {"blocks": module.blocks}
    if isinstance(module, GGUFLinear):
        weight = module.weight.data.as_subclass(torch.Tensor)
        return {"weight": weight if _gguf_qtype(module) is None else weight.view(torch.uint8)}
    return {"weight": module.weight.data}


def holds_weight(module: nn.Module) -> bool:
    """Whether slots can read and write this layer's weight."""
    return isinstance(module, ScaledFp8Linear | TritonGGUFLinear | nn.Linear)


@dataclass(frozen=True)
class WeightSlot:
    """One named Linear weight: `rows` of `module` (all of them, unless the layer is a stack)."""

    name: str
    module: nn.Module
    rows: slice

    @property
    def device(self) -> torch.device:
        return next(iter(_tensors(self.module).values())).device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.module.in_features)

    def stored(self) -> Storage:
        """Views of this slot's rows in the layer's own tensors."""
        return {key: tensor[self.rows] for key, tensor in _tensors(self.module).items()}

    @property
    def requantized(self) -> bool:
        """Whether writing re-quantizes to GGUF blocks (the costly kind, worth a disk cache)."""
        return _gguf_qtype(self.module) is not None

    def read(self) -> torch.Tensor:
        """The weight as float32 (out, in), on the layer's device."""
        return self.decode(self.stored())

    def decode(self, stored: Storage) -> torch.Tensor:
        """Storage of this slot (what `stored`, `save` or `encode` give) as a new float32 (out, in) tensor."""
        if isinstance(self.module, ScaledFp8Linear):
            return stored["weight"].view(torch.float8_e4m3fn).float() * stored["weight_scale"]
        qtype = _gguf_qtype(self.module)
        if qtype is not None:
            return _dequantize(next(iter(stored.values())), qtype, self.module.in_features)
        return stored["weight"].to(torch.float32, copy=True)  # callers add to it: never the stored tensor itself

    def encode(self, dense: torch.Tensor) -> Storage:
        """`dense` (out, in) in this layer's storage, on its device: what `write` takes."""
        device = self.device
        if isinstance(self.module, ScaledFp8Linear):
            weight, scale = quantize_weight_rows(dense)
            return {"weight": weight.view(torch.uint8).to(device), "weight_scale": scale.to(device)}
        qtype = _gguf_qtype(self.module)
        if qtype is not None:
            key = next(iter(self.stored()))
            return {key: quantize_rows(dense, qtype, device, FUSE_VALUES_PER_CHUNK).to(device)}
        return {"weight": dense.to(device=device, dtype=self.stored()["weight"].dtype)}

    def write(self, data: Storage) -> None:
        for key, view in self.stored().items():
            view.copy_(data[key])

    def save(self) -> Storage:
        """A host copy of what the slot holds now, to write back later."""
        return {key: view.to("cpu", copy=True) for key, view in self.stored().items()}


def find_slots(root: nn.Module) -> dict[str, WeightSlot]:
    """Every Linear weight below `root`, by the name diffusers gives it (stacked parts by their own names)."""
    slots: dict[str, WeightSlot] = {}
    for name, module in root.named_modules():
        if not holds_weight(module):
            continue
        parts = getattr(module, "stacked_parts", None)
        if parts is None:
            slots[name] = WeightSlot(name, module, slice(0, module.out_features))
            continue
        parent, start = name.rpartition(".")[0], 0
        for part, rows in parts:
            qualified = f"{parent}.{part}" if parent else part
            slots[qualified] = WeightSlot(qualified, module, slice(start, start + rows))
            start += rows
    return slots


def check_update_shape(slot: WeightSlot, out_features: int, in_features: int, source: str) -> None:
    """A LoRA made for another architecture (FLUX.1 vs. a smaller or other model) fails here, with the reason."""
    if (out_features, in_features) != slot.shape:
        raise JobInputError(
            f"LoRA {source} does not fit this model: {slot.name} is {slot.shape[0]}x{slot.shape[1]} here, "
            f"the LoRA updates it as {out_features}x{in_features} (a LoRA for another base model?)"
        )
