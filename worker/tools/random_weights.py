"""Full-size random transformer weights at any level, for the VRAM probe and the benchmarks.

Each tensor is drawn from a seed of its own name, so a tensor is the same at every level and in every run
(the levels' images can be compared with bf16's) and no copy of the whole model is ever held to make one:
FLUX.2 [dev]'s 32B parameters are 60 GiB in bf16, more than half the host memory of the machines we measure
on. bf16 and fp8 transformers are drawn directly on the device (fp8 quantized there, a layer as it is
drawn); GGUF
levels are quantized tensor by tensor on the device into host memory and loaded through diffusers' own GGUF
loader, as a worker loads a file.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import gguf
import torch
from diffusers import GGUFQuantizationConfig
from diffusers.quantizers.gguf.utils import GGUFParameter
from torch import nn

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.model.flux_arch import meta_transformer, transformer_class_of, write_transformer_config
from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.writer import ggml_type_for, keeps_high_precision

STD = 0.02
"""Trained FLUX linear weights have a standard deviation of about this."""


class SeededWeights:
    """The random weights of one transformer config, each tensor drawn on demand from its name's seed."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype, config_dir: Path) -> None:
        self.config = config
        self.dtype = dtype
        self.shapes = {name: tuple(p.shape) for name, p in meta_transformer(config).state_dict().items()}
        self.config_dir = write_transformer_config(config_dir, config)

    def tensor(self, name: str, device: str) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(zlib.crc32(name.encode()))
        drawn = torch.randn(self.shapes[name], generator=generator, device=device, dtype=torch.float32)
        return drawn.mul_(STD).to(self.dtype)

    def gguf_state(self, level: QuantLevel, device: str) -> dict[str, torch.Tensor]:
        """Host-memory weights at a GGUF `level` (diffusers' GGUF parameters): what a worker reads from a file."""
        target = gguf.GGMLQuantizationType[level.value]
        state: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            ggml_type = ggml_type_for(name, shape, target)
            tensor = self.tensor(name, device)
            if ggml_type == gguf.GGMLQuantizationType.F32:
                state[name] = tensor.float().cpu()
            elif ggml_type == gguf.GGMLQuantizationType.F16:
                state[name] = tensor.half().cpu()
            else:
                rows = quantize_rows(tensor.reshape(-1, shape[-1]), ggml_type.name, device)
                state[name] = GGUFParameter(rows.reshape(*shape[:-1], -1), quant_type=ggml_type)
        return state

    def transformer(
        self, level: QuantLevel, device: str, gguf_state: dict[str, torch.Tensor] | None = None
    ) -> torch.nn.Module:
        """The transformer at `level` on `device`. fp8 is e4m3 with a scale per row (a worker's fp8 level);
        GGUF levels load `gguf_state` (made here when not given) through diffusers' GGUF quantizer."""
        if level in (QuantLevel.BF16, QuantLevel.FP8):
            model = meta_transformer(self.config).to(self.dtype)
            if level == QuantLevel.FP8:
                self._fp8_linears(model, device)
            with torch.no_grad():
                for module_name, module in model.named_modules():
                    for name, param in list(module.named_parameters(recurse=False)):
                        if param.is_meta:
                            drawn = self.tensor(f"{module_name}.{name}" if module_name else name, device)
                            module._parameters[name] = nn.Parameter(drawn, requires_grad=False)
            return model
        state = gguf_state if gguf_state is not None else self.gguf_state(level, device)
        model = transformer_class_of(self.config).from_single_file(
            state,
            quantization_config=GGUFQuantizationConfig(compute_dtype=self.dtype),
            config=str(self.config_dir),
            subfolder="transformer",
            dtype=self.dtype,
        )
        return model.to(device)

    def _fp8_linears(self, model: nn.Module, device: str) -> None:
        """Each Linear the fp8 level quantizes, drawn on `device` and quantized at once (a worker's fp8 format):
        the bf16 model is never whole on the card, so an fp8 transformer is built under an fp8-sized cap."""
        for module_name, module in list(model.named_modules()):
            for name, child in list(module.named_children()):
                qualified = f"{module_name}.{name}" if module_name else name
                if not isinstance(child, nn.Linear) or keeps_high_precision(f"{qualified}."):
                    continue
                dense = nn.Linear(child.in_features, child.out_features, child.bias is not None, device, self.dtype)
                with torch.no_grad():
                    dense.weight.copy_(self.tensor(f"{qualified}.weight", device))
                    if dense.bias is not None:
                        dense.bias.copy_(self.tensor(f"{qualified}.bias", device))
                setattr(module, name, ScaledFp8Linear(dense, self.dtype))

    def master(self, device: str) -> dict[str, torch.Tensor]:
        """Every tensor in bf16 on the host (small models only: a diagnostic's reference weights)."""
        return {name: self.tensor(name, device).cpu() for name in self.shapes}
