"""An offline tiny FLUX.2 [klein] pipeline: diffusers' Flux2KleinPipeline with real classes (a Qwen3 text
encoder, Flux2Transformer2DModel, AutoencoderKLFlux2) and random weights, its tokenizer trained here.

As worker/tools/tiny_model.py does for FLUX.1, it lets the farm run and be tested without the download.
The text encoder keeps klein's 36 layers (the pipeline reads hidden states 9, 18 and 27) at a width of
32, so it stays tiny. It renders noise.
"""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

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


def qwen_tokenizer() -> Qwen2TokenizerFast:
    """A small byte-level BPE tokenizer with Qwen's special tokens and chat template, trained offline."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(QWEN_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer)
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
    patch = 2  # FLUX.2 packs 2x2 patches of the latent into a token
    transformer = Flux2Transformer2DModel(
        in_channels=patch * patch * dims.latent_channels,
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=KLEIN_HIDDEN_STATES * dims.text_hidden,
        axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(dims.vae_channels,) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=dims.latent_channels,
    )
    vae.bn.running_var.fill_(1.0)  # a trained VAE's statistics; random ones would be zeros or noise
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


def describe(pipe: Flux2KleinPipeline) -> str:
    """The tiny pipeline's sizes, for logs and the tiny-model command."""
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("transformer", "text_encoder")
    }
    return json.dumps({"pipeline": type(pipe).__name__, "parameters": counts})
