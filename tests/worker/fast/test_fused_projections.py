"""Stacked query/key/value projections compute what the separate ones compute, at every storage kind."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.models.transformers.transformer_flux2 import Flux2Attention

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.fast.fused_projections import fuse_attention_projections, stack_layers
from fluxfarm.worker.model.flux2_arch import flux2_step_inputs
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.quant.gguf.linear import TritonGGUFLinear, use_triton_gguf
from fluxfarm.worker.tools.tiny_flux2 import tiny_flux2_transformer
from fluxfarm.worker.tools.tiny_model import gguf_path
from fluxfarm.worker.tools.tiny_parts import TINY_DIMS
from fluxfarm.worker.tools.vram_probe import step_inputs
from tests.conftest import load_gguf_transformer


def _fused_matches(model: torch.nn.Module, tolerance: float) -> None:
    attentions = [m for m in model.modules() if isinstance(m, FluxAttention | Flux2Attention)]
    torch.manual_seed(0)
    if isinstance(model, Flux2Transformer2DModel):
        inputs = flux2_step_inputs(dict(model.config), 128, 128, 2, "cpu", torch.float32, text_tokens=24)
    else:
        inputs = step_inputs(dict(model.config), 128, 128, 2, "cpu", torch.float32)
    with torch.inference_mode():
        want = model(**inputs)[0]
        assert fuse_attention_projections(model) == len(attentions) > 0
        got = model(**inputs)[0]
    assert all(a.fused_projections and not hasattr(a, "to_q") for a in attentions)
    assert ((got - want).norm() / want.norm()).item() < tolerance


def test_stacked_bf16_attention_equals_separate(tiny_model) -> None:
    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    _fused_matches(model, 1e-6)


def test_stacked_fp8_attention_equals_separate(tiny_model) -> None:
    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    to_scaled_fp8(model, torch.float32)
    _fused_matches(model, 1e-6)  # rows keep their own scales, so stacking changes no number


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_stacked_flux2_double_stream_attention_equals_separate(fp8: bool) -> None:
    """FLUX.2's double-stream attention has separate query, key and value (and text ones) like FLUX.1's."""
    torch.manual_seed(0)
    model = tiny_flux2_transformer(replace(TINY_DIMS, double_blocks=2), guidance=True)
    if fp8:
        to_scaled_fp8(model, torch.float32)
    _fused_matches(model, 1e-6)


@pytest.mark.parametrize("level", [QuantLevel.Q8_0, QuantLevel.Q4_K])
def test_stacked_gguf_attention_equals_separate(tiny_model, level: QuantLevel) -> None:
    model = load_gguf_transformer(gguf_path(tiny_model, level), tiny_model)
    use_triton_gguf(model)  # Triton's interpreter on a CPU
    _fused_matches(model, 1e-6)
    assert isinstance(model.transformer_blocks[0].attn.to_qkv, TritonGGUFLinear)


def test_layers_of_different_kinds_are_left_separate() -> None:
    plain = torch.nn.Linear(8, 8)
    fp8 = to_scaled_fp8(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.float32)[0]
    assert stack_layers([plain, fp8]) is None
    assert stack_layers([plain, torch.nn.Linear(4, 8)]) is None
    assert stack_layers([plain, torch.nn.Linear(8, 8, bias=False)]) is None


def test_a_stacked_fp8_layer_keeps_every_setting_of_its_layers() -> None:
    """The fp8 level on the GPU crashed here: the stacked layer lacked `fast_accum`, which its CPU
    path never reads (found by `fluxfarm bench` on the H200)."""
    layers = [to_scaled_fp8(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.float32)[0] for _ in range(3)]
    for layer in layers:
        layer.tensor_cores, layer.fast_accum = True, False
    stacked = stack_layers(layers)
    assert stacked is not None
    assert (stacked.tensor_cores, stacked.fast_accum, stacked.compute_dtype) == (True, False, torch.float32)
    assert (stacked.in_features, stacked.out_features) == (8, 24)
    layers[1].fast_accum = True
    assert stack_layers(layers) is None  # layers that compute differently are left separate
