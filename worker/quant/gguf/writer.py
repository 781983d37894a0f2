"""Write a FLUX transformer as a GGUF file that diffusers loads, at any GGUF level of the ladder.

Sources are a diffusers transformer folder (sharded safetensors) or one safetensors file, with
diffusers or BFL tensor names; the names are kept, since diffusers loads both (it converts BFL
names on load, as for the published city96 files). As in those files, small and sensitive tensors
(biases, norms, the embedders and the output layer) keep higher precision. gguf-py quantizes the
legacy levels and `worker.gguf_blocks` the K-quants; with a GPU at hand, it encodes every level.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.quant.gguf.blocks import ENCODERS, quantize_rows

GGUF_ARCHITECTURE = "flux"

_GGML_TYPE_OF_LEVEL: dict[QuantLevel, gguf.GGMLQuantizationType] = {
    level: gguf.GGMLQuantizationType[level.value] for level in QuantLevel if level.is_gguf
}
QUANTIZABLE_LEVELS: tuple[QuantLevel, ...] = tuple(_GGML_TYPE_OF_LEVEL)

_KEEP_HIGH_PRECISION_PREFIXES = (
    # diffusers names
    "x_embedder.",
    "context_embedder.",
    "time_text_embed.",
    "time_guidance_embed.",  # FLUX.2's
    "norm_out.",
    "proj_out.",
    # BFL names
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
)
"""FLUX's embedders and output layers: few parameters, large effect on the image."""

_CHECKPOINT_PREFIX = "model.diffusion_model."  # ComfyUI-saved BFL checkpoints
_MIN_QUANTIZED_ELEMENTS = 1024


def keeps_high_precision(name: str) -> bool:
    """True for tensors (or modules) of FLUX's embedders and output layers, at every quantized level."""
    return name.removeprefix(_CHECKPOINT_PREFIX).startswith(_KEEP_HIGH_PRECISION_PREFIXES)


def ggml_type_for(name: str, shape: tuple[int, ...], target: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The storage type of one tensor in a file of level `target`."""
    if len(shape) <= 1:
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[target]
    elements = int(np.prod(shape))
    if keeps_high_precision(name) or shape[-1] % block_size != 0 or elements < _MIN_QUANTIZED_ELEMENTS:
        return gguf.GGMLQuantizationType.F16
    return target


def encode_tensor(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType, device: str = "cpu") -> np.ndarray:
    """One tensor as GGUF data of `ggml_type`: byte rows for quantized types, plain floats otherwise.

    K-quants always come from our torch encoders; legacy types too when a GPU does the work (the
    bytes are gguf-py's either way), since gguf-py's numpy is slow for a 12B-parameter model.
    """
    if ggml_type.name in ENCODERS and (torch.device(device).type == "cuda" or ggml_type.name.endswith("_K")):
        rows = quantize_rows(tensor.reshape(-1, tensor.shape[-1]), ggml_type.name, device)
        return rows.numpy().reshape(*tensor.shape[:-1], -1)
    data = tensor.detach().to(torch.float32).cpu().numpy()
    return gguf.quants.quantize(np.ascontiguousarray(data), ggml_type)


def safetensors_files(src: Path) -> list[Path]:
    """The weight files of a source: one file, a transformer folder, or a pipeline folder's transformer/."""
    if src.is_file():
        return [src]
    folder = src / "transformer" if (src / "transformer").is_dir() else src
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FarmError(f"no .safetensors weights in {folder}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time, so a 24 GB checkpoint never sits in memory whole."""
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle.get_tensor(name)


def write_gguf(
    tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    level: QuantLevel,
    out_path: Path,
    device: str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Quantize tensors to `level` and write them to `out_path` (atomically, via a .partial file)."""
    if level not in _GGML_TYPE_OF_LEVEL:
        supported = ", ".join(QUANTIZABLE_LEVELS)
        raise FarmError(f"cannot quantize to {level}: GGUF levels are {supported}")
    target = _GGML_TYPE_OF_LEVEL[level]
    items = tensors.items() if isinstance(tensors, dict) else tensors
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp_path), arch=GGUF_ARCHITECTURE, use_temp_file=True)
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("fluxfarm.level", level.value)
        for name, tensor in items:
            ggml_type = ggml_type_for(name, tuple(tensor.shape), target)
            writer.add_tensor(name, encode_tensor(tensor, ggml_type, device), raw_dtype=ggml_type)
            if on_tensor is not None:
                on_tensor(name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
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
    pool = quantized or weights
    dominant = max(pool, key=lambda t: pool[t])
    if dominant == gguf.GGMLQuantizationType.BF16:
        return QuantLevel.BF16.value
    return dominant.name
