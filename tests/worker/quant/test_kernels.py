"""The Triton fast paths against the reference dequantization: natively on a GPU, in Triton's
interpreter on a CPU (conftest sets TRITON_INTERPRET=1 there)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.quant.fp8.weights import ScaledFp8Linear, fp8_matmul, quantize_rows_fp8, quantize_rows_torch
from fluxfarm.worker.quant.gguf.blocks import quantize_rows
from fluxfarm.worker.quant.gguf.kernel_support import GEMV_MAX_ROWS, KERNEL_TYPES, gemv_fits
from fluxfarm.worker.quant.gguf.linear import TritonGGUFLinear, dequantize_gguf, gemv_gguf, use_triton_gguf
from fluxfarm.worker.tools.tiny_model import gguf_path
from tests.conftest import load_gguf_transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fp8_tensor_cores = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 tensor cores need a CUDA card of compute capability 8.9+; tests/gpu runs this on the device",
)


def _weights(rows: int, cols: int) -> torch.Tensor:
    """FLUX-like weights with outliers, so block scales and K-quant sub-block mins are exercised."""
    generator = torch.Generator().manual_seed(rows * cols)
    weights = torch.randn(rows, cols, generator=generator) * 0.02
    weights[::3, ::17] *= 25
    weights[1] = torch.linspace(-0.1, 0.3, cols)  # one skewed row: a nonzero minimum for the affine types
    return weights


@pytest.mark.parametrize("qtype", list(KERNEL_TYPES))
def test_triton_dequantize_equals_gguf_py(qtype: str) -> None:
    weights = _weights(6, 768)
    blocks = quantize_rows(weights, qtype)
    reference = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype]).reshape(6, 768)
    got = dequantize_gguf(blocks.to(DEVICE), qtype, 6, 768, torch.float32).cpu().numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-9)
    bf16 = dequantize_gguf(blocks.to(DEVICE), qtype, 6, 768, torch.bfloat16).cpu()
    if DEVICE == "cuda":  # the GPU rounds to nearest even, as torch does
        assert torch.equal(bf16, torch.from_numpy(reference).to(torch.bfloat16))
    else:  # the interpreter truncates to bf16: within one bf16 step
        np.testing.assert_allclose(bf16.float().numpy(), reference, rtol=2**-7, atol=0)


@pytest.mark.parametrize("qtype", list(KERNEL_TYPES))
def test_fused_gemv_equals_the_reference_weight_times_the_input(qtype: str) -> None:
    weights = _weights(9, 768)  # 9 output rows: programs of several rows, the last one partly masked
    blocks = quantize_rows(weights, qtype).to(DEVICE)
    reference = torch.from_numpy(
        gguf.quants.dequantize(blocks.cpu().numpy(), gguf.GGMLQuantizationType[qtype]).reshape(9, 768)
    ).double()
    generator = torch.Generator().manual_seed(3)
    bias = torch.randn(9, generator=generator)
    for rows in (1, GEMV_MAX_ROWS):
        x = torch.randn(rows, 768, generator=generator)
        for b in (None, bias):
            got = gemv_gguf(blocks, x.to(DEVICE), None if b is None else b.to(DEVICE), qtype, 9).cpu().double()
            want = x.double() @ reference.T + (0 if b is None else b.double())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert gemv_fits(qtype, GEMV_MAX_ROWS, 768) and not gemv_fits(qtype, GEMV_MAX_ROWS + 1, 768)


@pytest.mark.parametrize("level", [QuantLevel.Q8_0, QuantLevel.Q4_K, QuantLevel.Q6_K])
def test_swapped_tiny_transformer_computes_what_diffusers_computes(tiny_model, level: QuantLevel) -> None:
    stock = load_gguf_transformer(gguf_path(tiny_model, level), tiny_model).to(DEVICE)
    fast = load_gguf_transformer(gguf_path(tiny_model, level), tiny_model).to(DEVICE)
    swapped = use_triton_gguf(fast)
    assert swapped == sum(isinstance(m, TritonGGUFLinear) for m in fast.modules()) > 10
    generator = torch.Generator().manual_seed(0)
    config = stock.config
    inputs = {
        "hidden_states": torch.randn(1, 64, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(1, 16, config.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(64, 3),
        "txt_ids": torch.zeros(16, 3),
    }
    inputs = {name: value.to(DEVICE) for name, value in inputs.items()}
    with torch.inference_mode():
        want = stock(**inputs, return_dict=False)[0]
        got = fast(**inputs, return_dict=False)[0]
    # diffusers forms some K-quant scales in float16; the kernels follow ggml in float32
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_fp8_row_scales_are_the_row_absmax_over_448() -> None:
    x = torch.randn(5, 3072) * torch.tensor([1.0, 10.0, 0.01, 100.0, 0.0]).view(5, 1)
    q, scales = quantize_rows_fp8(x.to(DEVICE))
    want = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    torch.testing.assert_close(scales.cpu(), want)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    # the torch-ops twin that runs inside torch.compile scales the same way
    torch.testing.assert_close(quantize_rows_torch(x)[1], want)


@needs_fp8_tensor_cores
def test_fp8_rows_round_like_torch() -> None:
    x = torch.randn(64, 15360, device="cuda", dtype=torch.bfloat16)
    q, scales = quantize_rows_fp8(x)
    want, want_scales = quantize_rows_torch(x)
    assert torch.equal(scales, want_scales)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))


@needs_fp8_tensor_cores
def test_fp8_tensor_core_matmul_matches_the_upcast_layer() -> None:
    layer = ScaledFp8Linear(nn.Linear(3072, 12288, bias=True), torch.bfloat16).cuda()
    x = torch.randn(2, 333, 3072, device="cuda", dtype=torch.bfloat16)
    want = layer(x).float()
    got = fp8_matmul(x, layer.weight, layer.weight_scale, layer.bias).float()
    relative = (got - want).norm() / want.norm()
    assert relative < 0.05, relative  # the activations' own e4m3 rounding: ~2-3% relative


@needs_fp8_tensor_cores
def test_compiled_fp8_layer_matches_the_eager_one() -> None:
    """Under torch.compile the activations are quantized by torch ops Inductor fuses; same numbers."""
    layer = ScaledFp8Linear(nn.Linear(3072, 3072, bias=True), torch.bfloat16).cuda()
    layer.tensor_cores = True
    x = torch.randn(1, 512, 3072, device="cuda", dtype=torch.bfloat16)
    want = layer(x).float()
    got = torch.compile(layer, fullgraph=True)(x).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_fp8_quantized_on_a_work_device_is_left_where_the_layer_lies_and_equals_the_host_s() -> None:
    """The worker quantizes a host model's fp8 layers on its card, a layer at a time (seconds, where the host
    takes minutes for 12B parameters): the same e4m3 rows and scales, back on the host."""
    linear = nn.Linear(768, 6, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_weights(6, 768))
    on_host = ScaledFp8Linear(linear, torch.float32)
    on_card = ScaledFp8Linear(linear, torch.float32, work_device=DEVICE)
    assert {p.device.type for p in on_card.parameters()} == {"cpu"}
    assert torch.equal(on_card.weight.view(torch.uint8), on_host.weight.view(torch.uint8))
    assert torch.allclose(on_card.weight_scale, on_host.weight_scale, rtol=1e-6, atol=0)
    assert torch.equal(on_card.bias, on_host.bias)


def test_fp8_kept_on_its_work_device_is_made_there_and_equals_the_host_s() -> None:
    """A transformer that will live on the card keeps each fp8 layer there (no trip back to the host and up
    again): every parameter on the work device, the same e4m3 rows, scales and bias as the host's. The meta
    device, where no tensor can be copied out, shows on a CPU that nothing went back to the host."""
    linear = nn.Linear(768, 6, bias=True)
    with torch.no_grad():
        linear.weight.copy_(_weights(6, 768))
    on_host = ScaledFp8Linear(linear, torch.float32)
    kept = ScaledFp8Linear(linear, torch.float32, work_device=DEVICE, keep_on_work_device=True)
    assert {p.device.type for p in kept.parameters()} == {torch.device(DEVICE).type}
    assert torch.equal(kept.weight.cpu().view(torch.uint8), on_host.weight.view(torch.uint8))
    assert torch.allclose(kept.weight_scale.cpu(), on_host.weight_scale, rtol=1e-6, atol=0)
    assert torch.equal(kept.bias.cpu(), on_host.bias)
    on_meta = ScaledFp8Linear(linear, torch.float32, work_device="meta", keep_on_work_device=True)
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    assert (on_meta.weight.dtype, on_meta.weight_scale.shape) == (torch.float8_e4m3fn, (6, 1))
