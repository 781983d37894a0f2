"""Read a FLUX LoRA file into low-rank updates per module, scaled as diffusers' own loader scales them.

The family's pipeline reads the file: diffusers' `FluxPipeline.lora_state_dict` converts FLUX.1's community
formats (kohya, xlabs, BFL, ai-toolkit) to diffusers' module names, `Flux2Pipeline.lora_state_dict` FLUX.2's
(kohya, BFL/ComfyUI); the scale of each module (alpha / rank, with the
alpha and rank patterns of the adapter's saved config, or its `.alpha` keys) follows diffusers'
`get_peft_kwargs` and peft's pattern matching, so a fused LoRA renders as diffusers' peft path does.
Formats that are not plain low-rank updates (DoRA, LoKr, LoRA biases, Control LoRAs that widen the
input layer) are refused with the reason rather than applied wrongly.
"""

from __future__ import annotations

import inspect
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxfarm.shared.errors import JobInputError
from fluxfarm.shared.units import MIB

COMPONENTS = ("transformer", "text_encoder")
"""The pipeline parts a FLUX LoRA may train: the transformer and the CLIP text encoder."""

_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"
HEADER_MAX_BYTES = 16 * MIB
"""A safetensors header (tensor names, shapes and the adapter config) larger than this is refused before it
is parsed: a FLUX LoRA's header is a few hundred KiB, and the file's own 8-byte length is untrusted."""
PATTERNS_MAX = 4096
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]{1,128}(?:\.[A-Za-z0-9_]{1,128}){0,32}")
"""What a rank/alpha pattern key may be: a dotted module name. A fixed expression over bounded text."""


@dataclass(frozen=True)
class LowRank:
    """One module's update `scale * up @ down`."""

    down: torch.Tensor
    """lora_A: (rank, in_features)."""
    up: torch.Tensor
    """lora_B: (out_features, rank)."""
    scale: float

    def delta(self, device: torch.device | str, weight: float = 1.0) -> torch.Tensor:
        """The dense (out, in) update in float32, times the job's LoRA weight."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (up @ down).mul_(self.scale * weight)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: a key matches a module name that ends with it at a dot. The keys
    come from the file, so they are compared as text, never compiled as regular expressions (a crafted
    one takes exponential time, holding the GIL: heartbeat, leases and shutdown would stop with it)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _patterns(config: dict[str, Any], field: str, source: str) -> dict[str, float]:
    """A rank_pattern or alpha_pattern of the saved adapter config, checked: module names to numbers."""
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict) or len(patterns) > PATTERNS_MAX:
        raise JobInputError(f"LoRA {source}: its {field} is not a mapping of at most {PATTERNS_MAX} module names")
    checked = {}
    for key, value in patterns.items():
        if not isinstance(key, str) or _MODULE_NAME.fullmatch(key) is None:
            raise JobInputError(
                f"LoRA {source}: its {field} key {str(key)[:80]!r} is not a module name (patterns that are "
                "regular expressions are not supported)"
            )
        checked[key] = _positive(value, f"its {field} value for {key!r}", source)
    return checked


def _positive(value: Any, what: str, source: str) -> float:
    """A rank or alpha from the file: a number in (0, 1e6), or the job fails with the reason."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise JobInputError(f"LoRA {source}: {what} is not a positive number")
    return float(value)


def _scales(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alphas: dict[str, float],
    config: dict[str, Any] | None,
    source: str,
) -> dict[str, float]:
    """alpha / rank per module, as diffusers derives the peft config it loads the adapter with."""
    if config is not None:
        rslora = bool(config.get("use_rslora", False))
        rank_pattern = _patterns(config, "rank_pattern", source)
        alpha_pattern = _patterns(config, "alpha_pattern", source)
        scales = {}
        for name, (down, _) in modules.items():
            rank = _pattern_value(rank_pattern, name, _positive(config.get("r", down.shape[0]), "its r", source))
            default_alpha = _positive(config.get("lora_alpha", rank), "its lora_alpha", source)
            alpha = _pattern_value(alpha_pattern, name, default_alpha)
            scales[name] = alpha / (math.sqrt(rank) if rslora else rank)
        return scales
    common = Counter(alphas.values()).most_common(1)[0][0] if alphas else None
    return {
        name: (alphas.get(name, common if common is not None else down.shape[0])) / down.shape[0]
        for name, (down, _) in modules.items()
    }


def _refuse_unsupported(state: dict[str, torch.Tensor], source: str) -> None:
    checks = [
        ("lora_magnitude_vector", "it is a DoRA adapter"),
        (".lokr_", "it is a LoKr adapter"),
        (".lora_B.bias", "its LoRA layers carry biases"),
    ]
    for marker, reason in checks:
        if any(marker in key for key in state):
            raise JobInputError(f"LoRA {source} cannot be fused: {reason}, and only plain low-rank LoRAs are supported")
    others = [key for key in state if ".lora_" not in key]
    if others:
        raise JobInputError(
            f"LoRA {source} holds weights that are not low-rank updates ({others[0]} ...): Flux Control LoRAs "
            "and full-weight patches are not supported"
        )


def _check_header_size(path: Path, source: str) -> None:
    """Refuse a file whose header claims more than HEADER_MAX_BYTES, before anything parses it."""
    with path.open("rb") as file:
        prefix = file.read(8)
    if len(prefix) < 8:
        raise JobInputError(f"LoRA {source} could not be read as a FLUX LoRA: it is shorter than a safetensors header")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > HEADER_MAX_BYTES:
        raise JobInputError(
            f"LoRA {source} could not be read as a FLUX LoRA: its safetensors header claims {header_bytes} bytes, "
            f"more than the {HEADER_MAX_BYTES} a LoRA may have"
        )


def _lora_state(path: Path, loader: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Any]:
    """The file's diffusers-named tensors, its `.alpha` values (FLUX.1's loaders return them apart; FLUX.2's
    fold them into the tensors they convert) and its adapter metadata."""
    kwargs = {"weight_name": path.name, "use_safetensors": True, "local_files_only": True}
    if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:
        state, alphas, metadata = loader.lora_state_dict(
            str(path.parent), return_alphas=True, return_lora_metadata=True, **kwargs
        )
        return state, alphas, metadata
    state, metadata = loader.lora_state_dict(str(path.parent), return_lora_metadata=True, **kwargs)
    alphas = {key: state.pop(key) for key in [k for k in state if k.endswith(".alpha")]}
    return state, alphas, metadata


def read_lora(path: Path, source: str, loader: Any = None) -> dict[str, LowRank]:
    """`component.module` -> its update, for every module the LoRA trains, read by `loader` (the family's
    pipeline class; FluxPipeline when not given). Raises JobInputError for a file that is not a FLUX LoRA
    diffusers can read (the job fails with that reason)."""
    from diffusers import FluxPipeline

    _check_header_size(path, source)
    try:
        state, alphas, metadata = _lora_state(path, loader or FluxPipeline)
    except Exception as error:  # a broken file, or a format diffusers' converters reject
        raise JobInputError(f"LoRA {source} could not be read as a FLUX LoRA: {error}") from None
    _refuse_unsupported(state, source)
    updates: dict[str, LowRank] = {}
    for component in COMPONENTS:
        prefix = f"{component}."
        modules = {
            key[len(prefix) : -len(_DOWN)]: (tensor, state.get(key[: -len(_DOWN)] + _UP))
            for key, tensor in state.items()
            if key.startswith(prefix) and key.endswith(_DOWN)
        }
        missing = [name for name, (_, up) in modules.items() if up is None]
        if missing:
            raise JobInputError(f"LoRA {source} has lora_A without lora_B for {component}.{missing[0]}")
        part_alphas = {
            key[len(prefix) :].removesuffix(".alpha"): _positive(float(value), f"its {key}", source)
            for key, value in (alphas or {}).items()
            if key.startswith(prefix)
        }
        config = None
        if metadata:
            config = {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)} or None
        for name, scale in _scales(modules, part_alphas, config, source).items():
            down, up = modules[name]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise JobInputError(f"LoRA {source}: {component}.{name} is not a linear low-rank pair")
            updates[f"{prefix}{name}"] = LowRank(down=down, up=up, scale=scale)
    if not updates:
        raise JobInputError(f"LoRA {source} has no FLUX transformer or text encoder LoRA weights")
    return updates
