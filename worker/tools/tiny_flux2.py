"""Offline tiny FLUX.2 pipelines: diffusers' Flux2KleinPipeline (a Qwen3 text encoder) and Flux2Pipeline (a
Mistral3 text encoder, FLUX.2 [dev]'s), with Flux2Transformer2DModel and AutoencoderKLFlux2, real classes with
random weights, their tokenizers trained here.

As worker/tools/tiny_model.py does for FLUX.1, it lets the farm run and be tested without the download.
Each text encoder keeps its model's depth (klein's pipeline reads hidden states 9, 18 and 27 of 36,
FLUX.2 [dev]'s 10, 20 and 30 of 40) at a width of 32, so it stays tiny. They render noise.
"""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fluxfarm.worker.tools.tiny_parts import TINY_DIMS, TinyDims, corpus, flux_scheduler

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen's ChatML, which klein's pipeline wraps each prompt in (a user turn, then the assistant's)."""
KLEIN_TEXT_LAYERS = 36
"""Qwen3-4B's depth: the pipeline stacks the hidden states of layers 9, 18 and 27."""
KLEIN_HIDDEN_STATES = 3


MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set text = message['content'][0]['text'] %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}{% else %}{{ text + eos_token }}{% endif %}"
    "{% endfor %}"
)
"""Mistral-Small-3.1's message layout, over the content lists FLUX.2 [dev]'s pipeline sends."""
DEV_TEXT_LAYERS = 40
"""Mistral-Small-3.1's depth: the pipeline stacks the hidden states of layers 10, 20 and 30."""


def _byte_bpe(special: tuple[str, ...]) -> Tokenizer:
    """A small byte-level BPE trained offline on the tiny corpus, with `special` tokens first."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer)
    return bpe


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Mistral's special tokens and chat template: what FLUX.2 [dev]'s pipeline
    calls `apply_chat_template` on (its processor's text half)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(MISTRAL_SPECIAL),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A small byte-level BPE tokenizer with Qwen's special tokens and chat template, trained offline."""
    bpe = _byte_bpe(QWEN_SPECIAL)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=512,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_klein(dims: TinyDims = TINY_DIMS, seed: int = 0) -> Flux2KleinPipeline:
    """A Flux2KleinPipeline of tiny random-weight components, distilled like klein, deterministic per seed."""
    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=dims.text_hidden,
            intermediate_size=2 * dims.text_hidden,
            num_hidden_layers=KLEIN_TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=dims.text_hidden // 2,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
    )
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=_tiny_vae(dims),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(dims, guidance=False),
        is_distilled=True,
    )


def tiny_flux2_transformer(dims: TinyDims, guidance: bool) -> Flux2Transformer2DModel:
    """A tiny FLUX.2 transformer of random weights: [dev]'s with guidance embeddings, klein's without."""
    patch = 2  # FLUX.2 packs 2x2 patches of the latent into a token
    return Flux2Transformer2DModel(
        in_channels=patch * patch * dims.latent_channels,
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=KLEIN_HIDDEN_STATES * dims.text_hidden,
        axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=guidance,
    )


def _tiny_vae(dims: TinyDims) -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(dims.vae_channels,) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=dims.latent_channels,
    )
    vae.bn.running_var.fill_(1.0)  # a trained VAE's statistics; random ones would be zeros or noise
    return vae


def build_tiny_flux2_dev(dims: TinyDims = TINY_DIMS, seed: int = 0) -> Flux2Pipeline:
    """A Flux2Pipeline of tiny random-weight components: a Mistral3 encoder of FLUX.2 [dev]'s depth (its
    vision tower two layers deep: FLUX.2 reads text only), a guidance-distilled transformer."""
    torch.manual_seed(seed)
    tokenizer = mistral_tokenizer()
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config={
                "model_type": "mistral",
                "vocab_size": len(tokenizer),
                "hidden_size": dims.text_hidden,
                "intermediate_size": 2 * dims.text_hidden,
                "num_hidden_layers": DEV_TEXT_LAYERS,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "head_dim": dims.text_hidden // 2,
                "max_position_embeddings": 1024,
                "pad_token_id": tokenizer.pad_token_id,
            },
            vision_config={
                "model_type": "pixtral",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "head_dim": 16,
                "image_size": 56,
                "patch_size": 14,
            },
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        )
    )
    return Flux2Pipeline(
        scheduler=flux_scheduler(),
        vae=_tiny_vae(dims),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(dims, guidance=True),
    )


def describe(pipe: Flux2KleinPipeline | Flux2Pipeline) -> str:
    """The tiny pipeline's sizes, for logs and the tiny-model command."""
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "text_encoder")
    }
    return json.dumps({"pipeline": type(pipe).__name__, "parameters": counts})
