"""A FLUX.2 text encoder as the worker keeps it: only the part its pipeline reads, at the planned precision.

FLUX.2 pipelines condition on three intermediate hidden states of their encoder (layers 10, 20, 30 of
Mistral-Small-3.1's 40; 9, 18, 27 of Qwen3's 36), never on its last layers, its final norm, its language
head, or Mistral's vision tower (used only to caption images, which the farm does not do). Dropping them
changes no embedding (tests/worker/model/test_text_encoders.py compares) and frees a quarter of the
encoder: FLUX.2 [dev]'s falls from 24.0B to 17.4B parameters, and each prompt skips the layers and the
131k-word logits it never used.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fluxfarm.shared.models import FluxFamily
from fluxfarm.worker.model.flux2_arch import ENCODER_LAYERS_READ
from fluxfarm.worker.model.model_sizes import EncoderPrecision
from fluxfarm.worker.quant.fp8.weights import to_scaled_fp8
from fluxfarm.worker.quant.gguf.linear import to_gguf_linears

log = logging.getLogger(__name__)


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trim_text_encoder(encoder: nn.Module, layers_read: tuple[int, ...]) -> int:
    """Drop what follows the last layer read (`hidden_states[k]` is layer k's output, `hidden_states[0]` the
    token embeddings); returns how many parameters went. The trimmed model's `hidden_states[k]` for every k
    read is the untrimmed one's."""
    before = _parameters(encoder)
    outer = encoder.model
    decoder = getattr(outer, "language_model", outer)
    keep = max(layers_read)
    if len(decoder.layers) > keep:
        decoder.layers = decoder.layers[:keep]
        decoder.config.num_hidden_layers = keep
        # The last hidden state is recorded after the final norm: with the norm gone it is layer `keep`'s output.
        decoder.norm = nn.Identity()
    encoder.lm_head = nn.Identity()  # logits are never read; a tied embedding stays with the embedder
    for unused in ("vision_tower", "multi_modal_projector"):
        if getattr(outer, unused, None) is not None:
            setattr(outer, unused, None)
    dropped = before - _parameters(encoder)
    log.info("text encoder trimmed to %d layers: %.2fB parameters dropped", keep, dropped / 1e9)
    return dropped


def store_text_encoder(
    encoder: nn.Module, precision: EncoderPrecision, dtype: torch.dtype, work_device: str | None = None
) -> nn.Module:
    """A trimmed FLUX.2 encoder at `precision`, left where it lies (fp8: e4m3 Linear weights with a scale
    per row, the fp8 level's format; Q4_K: the GGUF level's blocks, a third of bf16's bytes, what lets a 16 GiB card
    swap FLUX.2 [dev]'s encoder in where fp8's 17 GiB cannot come). Both quantize on `work_device` (the worker's
    GPU, a layer or chunk at a time: far slower on the host)."""
    if precision == "fp8":
        return to_scaled_fp8(encoder, dtype, work_device)
    if precision == "Q4_K":
        return to_gguf_linears(encoder, precision, dtype, work_device)
    return encoder


def prepare_text_encoder(
    encoder: nn.Module,
    family: FluxFamily,
    precision: EncoderPrecision,
    dtype: torch.dtype,
    work_device: str | None = None,
) -> nn.Module:
    """Trim a FLUX.2 encoder and store it at `precision`. FLUX.1's encoders are kept as they load."""
    if family not in ENCODER_LAYERS_READ:
        return encoder
    trim_text_encoder(encoder, ENCODER_LAYERS_READ[family])
    return store_text_encoder(encoder, precision, dtype, work_device)
