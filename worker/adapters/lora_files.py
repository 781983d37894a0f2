"""Read a FLUX LoRA file into low-rank updates per module, scaled as diffusers' own loader scales them.

diffusers' `FluxPipeline.lora_state_dict` reads the file and converts the community formats (kohya,
xlabs, BFL, ai-toolkit) to diffusers' module names; the scale of each module (alpha / rank, with the
alpha and rank patterns of the adapter's saved config, or its `.alpha` keys) follows diffusers'
`get_peft_kwargs` and peft's pattern matching, so a fused LoRA renders as diffusers' peft path does.
Formats that are not plain low-rank updates (DoRA, LoKr, LoRA biases, Control LoRAs that widen the
input layer) are refused with the reason rather than applied wrongly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxfarm.shared.errors import JobInputError

COMPONENTS = ("transformer", "text_encoder")
"""The pipeline parts a FLUX LoRA may train: the transformer and the CLIP text encoder."""

_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


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


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: a key matches a module name that ends with it at a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def _scales(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], alphas: dict[str, float], config: dict[str, Any] | None
) -> dict[str, float]:
    """alpha / rank per module, as diffusers derives the peft config it loads the adapter with."""
    if config is not None:
        rslora = bool(config.get("use_rslora", False))
        scales = {}
        for name, (down, _) in modules.items():
            rank = _pattern_value(config.get("rank_pattern") or {}, name, float(config.get("r", down.shape[0])))
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, float(config.get("lora_alpha", rank)))
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


def read_lora(path: Path, source: str) -> dict[str, LowRank]:
    """`component.module` -> its update, for every module the LoRA trains. Raises JobInputError for a file
    that is not a FLUX LoRA diffusers can read (the job fails with that reason)."""
    from diffusers import FluxPipeline

    try:
        state, alphas, metadata = FluxPipeline.lora_state_dict(
            str(path.parent),
            weight_name=path.name,
            use_safetensors=True,
            local_files_only=True,
            return_alphas=True,
            return_lora_metadata=True,
        )
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
            key[len(prefix) :].removesuffix(".alpha"): float(value)
            for key, value in (alphas or {}).items()
            if key.startswith(prefix)
        }
        config = None
        if metadata:
            config = {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)} or None
        for name, scale in _scales(modules, part_alphas, config).items():
            down, up = modules[name]
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise JobInputError(f"LoRA {source}: {component}.{name} is not a linear low-rank pair")
            updates[f"{prefix}{name}"] = LowRank(down=down, up=up, scale=scale)
    if not updates:
        raise JobInputError(f"LoRA {source} has no FLUX transformer or text encoder LoRA weights")
    return updates
