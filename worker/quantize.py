"""Write a FLUX transformer state dict as a GGUF file that diffusers loads, and read a file's level.

Tensor names stay diffusers' own, so `FluxTransformer2DModel.from_single_file` loads the file
without conversion. As in the published FLUX GGUF files, small and sensitive tensors (biases, norms,
the embedders and the output projection) keep higher precision.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from shared.errors import FarmError
from shared.ladder import QuantLevel

GGUF_ARCHITECTURE = "flux"

_GGML_TYPE_OF_LEVEL: dict[QuantLevel, gguf.GGMLQuantizationType] = {
    QuantLevel.Q8_0: gguf.GGMLQuantizationType.Q8_0,
    QuantLevel.Q5_1: gguf.GGMLQuantizationType.Q5_1,
    QuantLevel.Q5_0: gguf.GGMLQuantizationType.Q5_0,
    QuantLevel.Q4_1: gguf.GGMLQuantizationType.Q4_1,
    QuantLevel.Q4_0: gguf.GGMLQuantizationType.Q4_0,
}
"""Levels that gguf-py can quantize in numpy. K-quants need a quantizer of our own (not yet here)."""

QUANTIZABLE_LEVELS: tuple[QuantLevel, ...] = tuple(_GGML_TYPE_OF_LEVEL)

_KEEP_HIGH_PRECISION_PREFIXES = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
"""Diffusers names of FLUX's embedders and output layers: few parameters, large effect on the image."""

_MIN_QUANTIZED_ELEMENTS = 1024


def _ggml_type_for(name: str, tensor: torch.Tensor, target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if tensor.ndim <= 1:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[target]
    if (
        name.startswith(_KEEP_HIGH_PRECISION_PREFIXES)
        or tensor.shape[-1] % block_size != 0
        or tensor.numel() < _MIN_QUANTIZED_ELEMENTS
    ):
        return gguf.GGMLQuantizationType.F16
    return target


def write_gguf(state_dict: Mapping[str, torch.Tensor], level: QuantLevel, out_path: Path) -> Path:
    """Quantize `state_dict` to `level` and write it to `out_path` (atomically)."""
    if level not in _GGML_TYPE_OF_LEVEL:
        supported = ", ".join(QUANTIZABLE_LEVELS)
        raise FarmError(f"cannot quantize to {level}: this quantizer supports {supported}")
    target = _GGML_TYPE_OF_LEVEL[level]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp_path), arch=GGUF_ARCHITECTURE)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("fluxfarm.level", level.value)
    for name, tensor in state_dict.items():
        ggml_type = _ggml_type_for(name, tensor, target)
        data = tensor.detach().to(torch.float32).cpu().numpy()
        quantized = gguf.quants.quantize(np.ascontiguousarray(data), ggml_type)
        writer.add_tensor(name, quantized, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp_path.replace(out_path)
    return out_path


def gguf_level(path: Path) -> str:
    """The level a GGUF file holds: the GGML type that stores most of its weights."""
    reader = gguf.GGUFReader(str(path))
    unquantized = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    weights: Counter[gguf.GGMLQuantizationType] = Counter()
    for tensor in reader.tensors:
        weights[tensor.tensor_type] += int(tensor.n_elements)
    quantized = {t: n for t, n in weights.items() if t not in unquantized}
    dominant = max(quantized or weights, key=lambda t: (quantized or weights)[t])
    if dominant == gguf.GGMLQuantizationType.BF16:
        return QuantLevel.BF16.value
    return dominant.name
