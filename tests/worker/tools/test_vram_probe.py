"""The VRAM probe's LoRA-fuse phase (worker/tools/vram_probe.py): the plan keeps room for a fuse, so the probe
fuses a rank-64 LoRA over every block layer of each family's transformer at each kind of level, through the
worker's own LoraFuser, and leaves the base weights as they were for the phases after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.model.flux_arch import meta_transformer
from fluxfarm.worker.tools.random_lora import BLOCK_PREFIXES, write_random_lora
from fluxfarm.worker.tools.random_weights import SeededWeights
from fluxfarm.worker.tools.tiny_model import build_tiny
from fluxfarm.worker.tools.vram_probe import LORA_RANK, fuse_lora


def _block_linears(config: dict[str, object]) -> int:
    model = meta_transformer(config)
    return sum(isinstance(m, nn.Linear) and name.startswith(BLOCK_PREFIXES) for name, m in model.named_modules())


@pytest.mark.parametrize("model", [FluxModel.FLUX_1_DEV, FluxModel.FLUX_2_DEV, FluxModel.FLUX_2_KLEIN_4B])
@pytest.mark.parametrize("level", [QuantLevel.BF16, QuantLevel.FP8, QuantLevel.Q4_K])
def test_the_probe_fuses_every_block_layer_and_restores_the_base(
    model: FluxModel, level: QuantLevel, tmp_path: Path
) -> None:
    config = {k: v for k, v in build_tiny(model).transformer.config.items() if not k.startswith("_")}
    weights = SeededWeights(config, torch.float32, tmp_path / "config")
    transformer = weights.transformer(level, "cpu")
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    lora = write_random_lora(meta_transformer(config), tmp_path / "lora.safetensors", LORA_RANK, LORA_RANK, std=0.1)

    assert fuse_lora(transformer, lora, level, model) == _block_linears(config)

    after = transformer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not [path for path in tmp_path.iterdir() if path.name not in ("config", "lora.safetensors")]
