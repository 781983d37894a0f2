"""Random-weight LoRA files for a FLUX transformer, in diffusers' peft format: what `fluxfarm bench`
fuses at full size (a rank-64 LoRA costs the same to fuse as a trained one) and what tests use to
stand in for LoRAs made for another model."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
"""Where trainers such as ai-toolkit put LoRA layers: every Linear of the repeated blocks."""


def random_lora_state(
    transformer: nn.Module, rank: int, alpha: float, std: float = 0.01, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A LoRA over every Linear of the transformer's blocks (`transformer` may be on the meta device)."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not (isinstance(module, nn.Linear) and name.startswith(BLOCK_PREFIXES)):
            continue
        prefix = f"transformer.{name}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * std
        state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * std
        state[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return {key: value.to(torch.bfloat16) if value.ndim else value for key, value in state.items()}


def write_random_lora(transformer: nn.Module, path: Path, rank: int, alpha: float, std: float = 0.01) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_lora_state(transformer, rank, alpha, std), str(path))
    return path
