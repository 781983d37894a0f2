"""Random transformer weights by seed (worker/tools/random_weights.py): the same tensor for a name at every
level, and an fp8 transformer built a layer at a time equal to the worker's fp8 of the bf16 one."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.tools.random_weights import SeededWeights
from fluxfarm.worker.tools.tiny_model import build_tiny


def test_fp8_drawn_a_layer_at_a_time_equals_fp8_of_the_bf16_transformer(tmp_path: Path) -> None:
    for model in (FluxModel.FLUX_1_DEV, FluxModel.FLUX_2_KLEIN_4B):
        config = {k: v for k, v in build_tiny(model).transformer.config.items() if not k.startswith("_")}
        weights = SeededWeights(config, torch.float32, tmp_path / model.value)
        bf16 = weights.transformer(QuantLevel.BF16, "cpu")
        again = weights.transformer(QuantLevel.BF16, "cpu")
        assert all(
            torch.equal(a, b) for a, b in zip(bf16.state_dict().values(), again.state_dict().values(), strict=True)
        )
        want = to_scaled_fp8(bf16, torch.float32).state_dict()
        got = weights.transformer(QuantLevel.FP8, "cpu").state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[name].float(), got[name].float()) for name in want), model
        assert not any(tensor.is_meta for tensor in got.values())
