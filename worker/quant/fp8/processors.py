"""diffusers' attention processors of every family, with the attention itself in fp8 (`attention.py`).

FLUX.1's joint attention (`FluxAttention`), FLUX.2's double-stream attention (`Flux2Attention`) and its
single-stream block, whose one projection makes query, key, value and the MLP's input together
(`Flux2ParallelSelfAttention`): each processor keeps diffusers' projections, norms, rotation and output
layers as they are and hands the attention to cuDNN's fp8 kernel, scaling query and key by their RMS norms'
bound. At FLUX.2 [dev]'s 1024^2 the attention is ~46 ms of a ~300 ms fp8 step (56 attentions over 4,608
tokens, 48 heads of 128), which the fp8 kernel does ~1.4x faster. Anything a processor does not cover (a mask,
context parallelism) goes to diffusers' own, and so does a module running another processor (FLUX.2's
reference-image KV cache, an IP-Adapter's): only diffusers' plain processors are swapped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers import transformer_flux, transformer_flux2
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttention,
    Flux2ParallelSelfAttnProcessor,
)
from torch import nn

from fluxfarm.worker.quant.fp8.attention import attention_fp8, rms_norm_bound

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def joint_attention_fp8(
    attn: AttentionModuleMixin,
    image: Projections,
    text: Projections | None,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Attention over the text tokens (when given, first) and the image tokens, from their projections
    (batch, tokens, heads * head_dim): RMS-normed query and key, rotated, attended in fp8; returned flat."""
    heads = (-1, attn.head_dim)
    query, key, value = (x.unflatten(-1, heads) for x in image)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query_norms, key_norms = [attn.norm_q], [attn.norm_k]
    if text is not None:
        text_query, text_key, text_value = (x.unflatten(-1, heads) for x in text)
        query_norms.append(attn.norm_added_q)
        key_norms.append(attn.norm_added_k)
        query = torch.cat([attn.norm_added_q(text_query), query], dim=1)
        key = torch.cat([attn.norm_added_k(text_key), key], dim=1)
        value = torch.cat([text_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    bounds = (rms_norm_bound(query_norms, attn.head_dim), rms_norm_bound(key_norms, attn.head_dim))
    return attention_fp8(query, key, value, *bounds).flatten(2, 3)


def _split_text(hidden_states: torch.Tensor, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, image) parts of a joint sequence, each contiguous for the output projection's fp8 matmul."""
    text, image = hidden_states.split_with_sizes([text_tokens, hidden_states.shape[1] - text_tokens], dim=1)
    return text.contiguous(), image.contiguous()


class _Fp8JointAttention:
    """The fp8 call of a joint (text and image) attention, for a processor class that also derives from the
    diffusers processor it stands in for: a mask or context parallelism goes to that one (`super()`)."""

    _projections: Callable[..., tuple[Any, ...]]
    """The family's own query/key/value projections (separate or stacked), as its diffusers processor calls them."""
    _output_alone: bool
    """Whether an attention of the image tokens alone applies its output layer (FLUX.2) or hands it on (FLUX.1's
    single-stream blocks, whose MLP and output layer follow outside)."""
    _parallel_config: Any

    def __call__(
        self,
        attn: AttentionModuleMixin,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None or self._parallel_config is not None:
            return super().__call__(  # type: ignore[misc]
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        q, k, v, text_q, text_k, text_v = type(self)._projections(attn, hidden_states, encoder_hidden_states)
        text = (text_q, text_k, text_v) if attn.added_kv_proj_dim is not None else None
        hidden_states = joint_attention_fp8(attn, (q, k, v), text, image_rotary_emb)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states)) if self._output_alone else hidden_states
        encoder_hidden_states, hidden_states = _split_text(hidden_states, encoder_hidden_states.shape[1])
        return attn.to_out[1](attn.to_out[0](hidden_states)), attn.to_add_out(encoder_hidden_states)


class Fp8AttnProcessor(_Fp8JointAttention, FluxAttnProcessor):
    """FLUX.1's `FluxAttnProcessor` with the attention in fp8."""

    _projections = staticmethod(transformer_flux._get_qkv_projections)
    _output_alone = False


class Fp8Flux2AttnProcessor(_Fp8JointAttention, Flux2AttnProcessor):
    """FLUX.2's double-stream `Flux2AttnProcessor` with the attention in fp8."""

    _projections = staticmethod(transformer_flux2._get_qkv_projections)
    _output_alone = True


class Fp8Flux2ParallelSelfAttnProcessor(Flux2ParallelSelfAttnProcessor):
    """FLUX.2's single-stream `Flux2ParallelSelfAttnProcessor` with the attention in fp8: one projection
    gives query, key, value and the SwiGLU MLP's input; one output layer takes the attention and the MLP."""

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or self._parallel_config is not None:
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        projected = attn.to_qkv_mlp_proj(hidden_states)
        # Split by the parts' global ratio, as diffusers does: right also where the projection is column-sharded.
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = projected.split([local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)
        attended = joint_attention_fp8(attn, (q, k, v), None, image_rotary_emb)
        return attn.to_out(torch.cat([attended, attn.mlp_act_fn(mlp)], dim=-1))


FP8_PROCESSORS: dict[type, type] = {
    FluxAttnProcessor: Fp8AttnProcessor,
    Flux2AttnProcessor: Fp8Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor: Fp8Flux2ParallelSelfAttnProcessor,
}
"""diffusers' plain processor -> its fp8 counterpart."""


def use_fp8_attention(module: nn.Module) -> int:
    """Give every attention below `module` that runs one of diffusers' plain processors of a FLUX family the
    fp8 counterpart; returns how many."""
    switched = 0
    for attention in module.modules():
        if not isinstance(attention, AttentionModuleMixin):
            continue
        fp8 = FP8_PROCESSORS.get(type(getattr(attention, "processor", None)))
        if fp8 is not None:
            attention.set_processor(fp8())
            switched += 1
    return switched
