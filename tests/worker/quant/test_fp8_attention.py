"""The fp8 attention path: per-tensor quantization, the processor around the kernel, and the op's
registration for torch.compile, on CPU.

cuDNN's fp8 kernel runs only on a GPU (`tests/gpu/fp8_attention.py` checks it there against bf16
attention and inside a CUDA graph). Here the op gets a CPU kernel that computes what cuDNN's computes
from the same e4m3 inputs and scales (fp32 math, e4m3 output at `scale_o`), so everything around it is
checked as the worker runs it: scales, the (batch, tokens, heads, dim) layout, the text/image split and
the output projections.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2KVAttnProcessor,
    Flux2ParallelSelfAttention,
)
from torch.nn import functional

from fluxfarm.worker.fast.fast_paths import apply_fast_paths
from fluxfarm.worker.model.flux2_arch import flux2_step_inputs
from fluxfarm.worker.quant.fp8.attention import (
    attention_fp8,
    fp8_attention_op,
    fp8_attention_works,
    quantize_tensor_fp8,
    rms_norm_bound,
)
from fluxfarm.worker.quant.fp8.processors import (
    Fp8AttnProcessor,
    Fp8Flux2AttnProcessor,
    Fp8Flux2ParallelSelfAttnProcessor,
    use_fp8_attention,
)
from fluxfarm.worker.quant.fp8.weights import E4M3_MAX, to_scaled_fp8
from fluxfarm.worker.tools.tiny_flux2 import tiny_flux2_transformer
from fluxfarm.worker.tools.tiny_parts import TINY_DIMS
from fluxfarm.worker.tools.vram_probe import step_inputs

CALLS: list[tuple[int, ...]] = []
QUERY_DESCALES: list[float] = []


def _reference_kernel(q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
    """What cuDNN's fp8 attention computes: dequantized inputs, exact softmax, e4m3 output at scale_o."""
    CALLS.append(tuple(q.shape))
    QUERY_DESCALES.append(float(descale_q))
    q, k, v = (x.float() * s for x, s in ((q, descale_q), (k, descale_k), (v, descale_v)))
    out = functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    return (out * scale_o).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()


fp8_attention_op.register_kernel("cpu")(_reference_kernel)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_per_tensor_quantization_uses_the_whole_e4m3_range() -> None:
    x = torch.randn(2, 64, 3, 128) * 7
    q, descale = quantize_tensor_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert q.float().abs().max().item() == E4M3_MAX
    assert _relative(q.float() * descale, x) < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% rms


def test_quantization_leaves_its_input_alone_and_matches_the_out_of_place_formula() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 64, 3, 128) * 900).to(dtype)  # beyond the bound below: the clamp is exercised
        before = x.clone()
        bound = torch.tensor(400.0)
        q, descale = quantize_tensor_fp8(x, bound)
        assert torch.equal(x, before)
        want = (x.float() / descale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
        assert q.float().abs().max().item() == E4M3_MAX


def test_fp8_attention_agrees_with_fp32_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, 3, 128, generator=generator) for _ in "qkv")
    got = attention_fp8(q, k, v * 30)  # unit-sized query and key, as FLUX's RMS norms leave them
    want = _sdpa(q, k, v * 30)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert 0 < _relative(got, want) < 0.08


def test_the_rms_norm_bound_holds_after_norm_and_rotation(tiny_model) -> None:
    """Query and key are scaled by a bound from their norms' weights, without a pass over them: it must
    hold for any input, including one whose energy sits in a single element."""
    from diffusers.models.embeddings import apply_rotary_emb

    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    attn = next(m for m in model.modules() if isinstance(m, FluxAttention))
    with torch.no_grad():
        attn.norm_q.weight.uniform_(-3, 3)
    bound = rms_norm_bound([attn.norm_q, attn.norm_k], attn.head_dim)
    x = torch.randn(1, 64, 2, attn.head_dim)
    x[0, 0, 0] = 0
    x[0, 0, 0, int(attn.norm_q.weight.abs().argmax())] = 1e3  # all of a head's energy in its largest weight
    angles = torch.rand(64, attn.head_dim // 2) * 6.3
    rotary = (angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1))
    normed = apply_rotary_emb(attn.norm_q(x), rotary, sequence_dim=1)
    assert normed.abs().max() <= bound * 1.001
    assert normed.abs().max() > bound * 0.5  # and it is not loose by much
    assert rms_norm_bound([torch.nn.LayerNorm(128)], 128) is None


def test_the_output_scale_cannot_overflow() -> None:
    """Each output row is a convex combination of value rows, so V's scale bounds it: one huge value and a
    query that attends only to it give an output at the top of e4m3's range, finite and right."""
    q = torch.zeros(1, 8, 1, 128)
    k = torch.zeros(1, 8, 1, 128)
    q[..., 0], k[0, 3, 0, 0] = 1.0, 200.0  # every query attends to token 3 alone
    v = torch.randn(1, 8, 1, 128)
    v[0, 3, 0, 5] = 1e4
    got = attention_fp8(q, k, v)
    assert torch.isfinite(got).all()
    assert _relative(got, _sdpa(q, k, v)) < 0.05


def test_the_op_traces_for_torch_compile() -> None:
    """The fake kernel describes the real one (shapes, dtypes, strides), so Inductor can trace around it."""
    q, k, v = (quantize_tensor_fp8(torch.randn(1, 32, 2, 128)) for _ in "qkv")
    args = (q[0], k[0], v[0], q[1], k[1], v[1], 1 / v[1])
    torch.library.opcheck(fp8_attention_op, args, test_utils=("test_faketensor",))


def test_the_fp8_processor_matches_diffusers_processor_on_the_fp8_level(tiny_model) -> None:
    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    to_scaled_fp8(model, torch.float32)
    attentions = [m for m in model.modules() if isinstance(m, FluxAttention)]
    torch.manual_seed(0)
    inputs = step_inputs(dict(model.config), 128, 128, 2, "cpu", torch.float32)
    tokens = inputs["img_ids"].shape[0]
    inputs["img_ids"][:, 1] = torch.arange(tokens) // 8  # real positions, so the rotary embedding is exercised
    inputs["img_ids"][:, 2] = torch.arange(tokens) % 8
    with torch.inference_mode():
        want = model(**inputs)[0]
        assert use_fp8_attention(model) == len(attentions) > 0
        assert use_fp8_attention(model) == 0  # already switched
        CALLS.clear()
        QUERY_DESCALES.clear()
        got = model(**inputs)[0]
    assert all(isinstance(a.processor, Fp8AttnProcessor) for a in attentions)
    text_tokens = inputs["encoder_hidden_states"].shape[1]
    assert [(2, text_tokens + tokens, 2, 128)] * len(attentions) == CALLS
    double = attentions[0]  # its query comes from two norms: the image's and the text's
    bound = rms_norm_bound([double.norm_q, double.norm_added_q], double.head_dim)
    assert QUERY_DESCALES[0] == pytest.approx(float(bound) / E4M3_MAX)
    assert 0 < _relative(got, want) < 0.1


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "klein"])
def test_the_fp8_processors_match_diffusers_processors_on_flux2(guidance: bool) -> None:
    """FLUX.2's double-stream attention and its single-stream block (one projection for query, key, value and
    the MLP; one output layer for both) through the fp8 kernel, on the fp8 level, against diffusers' own."""
    torch.manual_seed(0)
    model = tiny_flux2_transformer(replace(TINY_DIMS, double_blocks=2), guidance)
    with torch.no_grad():  # norm weights other than 1, so a wrong bound or a skipped norm shows
        for name, parameter in model.named_parameters():
            if ".norm_" in name:
                parameter.uniform_(0.5, 2.0)
    to_scaled_fp8(model, torch.float32)
    model.transformer_blocks[1].attn.set_processor(Flux2KVAttnProcessor())  # another processor: left alone
    inputs = flux2_step_inputs(dict(model.config), 128, 128, 2, "cpu", torch.float32, text_tokens=24)
    with torch.inference_mode():
        want = model(**inputs)[0]
        assert use_fp8_attention(model) == 3
        CALLS.clear()
        QUERY_DESCALES.clear()
        got = model(**inputs)[0]
    double, kept = (block.attn for block in model.transformer_blocks)
    single = [block.attn for block in model.single_transformer_blocks]
    assert isinstance(double.processor, Fp8Flux2AttnProcessor) and isinstance(kept.processor, Flux2KVAttnProcessor)
    assert all(isinstance(a.processor, Fp8Flux2ParallelSelfAttnProcessor) for a in single)
    assert isinstance(double, Flux2Attention) and all(isinstance(a, Flux2ParallelSelfAttention) for a in single)
    tokens = inputs["hidden_states"].shape[1] + 24
    assert [(2, tokens, 2, 128)] * 3 == CALLS
    double_bound = rms_norm_bound([double.norm_q, double.norm_added_q], 128)  # the image's and the text's norms
    assert QUERY_DESCALES[0] == pytest.approx(float(double_bound) / E4M3_MAX)
    assert QUERY_DESCALES[1] == pytest.approx(float(rms_norm_bound([single[0].norm_q], 128)) / E4M3_MAX)
    assert 0 < _relative(got, want) < 0.1


def test_a_masked_attention_goes_to_diffusers_processor() -> None:
    attn = FluxAttention(query_dim=256, heads=2, dim_head=128, added_kv_proj_dim=None, out_dim=256)
    attn.set_processor(Fp8AttnProcessor())
    x = torch.randn(1, 16, 256)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    CALLS.clear()
    with torch.inference_mode():
        got = attn(x, attention_mask=mask)
    assert CALLS == [] and got.shape == (1, 16, 256)


@pytest.mark.parametrize("attention", ["auto", "native"])
def test_a_cpu_worker_keeps_bf16_attention(tiny_model, attention: str) -> None:
    model = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32)
    to_scaled_fp8(model, torch.float32)
    assert not fp8_attention_works(torch.device("cpu"))
    paths = apply_fast_paths(model, "cpu", attention=attention)
    assert paths.fp8_attentions == 0 and paths.attention == "native"
    assert not any(isinstance(m.processor, Fp8AttnProcessor) for m in model.modules() if isinstance(m, FluxAttention))
