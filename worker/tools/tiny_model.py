"""An offline tiny FLUX pipeline: real diffusers and transformers classes, random weights.

It lets anyone run the whole farm (and the tests) without the 24 GB FLUX.1-dev download. Its
tokenizers are trained here with the `tokenizers` library on a built-in word list. It renders
noise: the point is the path, the shapes and the timings, never the picture.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import MODELS, FluxFamily, FluxModel
from fluxfarm.worker.quant.gguf.writer import write_gguf
from fluxfarm.worker.tools.tiny_flux2 import build_tiny_flux2_dev, build_tiny_klein
from fluxfarm.worker.tools.tiny_parts import TINY_DIMS, TinyDims, corpus, flux_scheduler

GGUF_SUBDIR = "gguf"
_MARKER = "fluxfarm-tiny-model.json"
CATALOG_FILE = "catalog.toml"
"""Beside the GGUF files: a worker given it as FLUXFARM_CATALOG (and the folder as its model) finds each level."""

_SPECIAL_CLIP = ("<|startoftext|>", "<|endoftext|>")
_SPECIAL_T5 = ("<pad>", "</s>", "<unk>")


def clip_tokenizer() -> CLIPTokenizer:
    """A small CLIP BPE tokenizer trained offline: real tokenizer classes, no download."""
    bpe = Tokenizer(models.BPE(unk_token=_SPECIAL_CLIP[1], end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(_SPECIAL_CLIP),
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A small T5 Unigram tokenizer trained offline, padding to 512 tokens like FLUX's."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=list(_SPECIAL_T5), unk_token="<unk>", show_progress=False
    )
    unigram.train_from_iterator(corpus(), trainer)
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(dims: TinyDims = TINY_DIMS, seed: int = 0) -> FluxPipeline:
    """A FluxPipeline of tiny random-weight components, deterministic for a given seed."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=dims.text_hidden,
            intermediate_size=2 * dims.text_hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=dims.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=dims.text_hidden,
            d_kv=dims.text_hidden // 4,
            d_ff=2 * dims.text_hidden,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * dims.latent_channels,
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=dims.text_hidden,
        pooled_projection_dim=dims.text_hidden,
        guidance_embeds=True,
        axes_dims_rope=dims.axes_dims_rope,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(dims.vae_channels,) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=dims.latent_channels,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def gguf_path(model_dir: Path, level: QuantLevel) -> Path:
    """Where `write_tiny_model` puts the transformer at `level`."""
    return model_dir / GGUF_SUBDIR / f"tiny-flux-{level.value}.gguf"


def build_tiny(model: FluxModel, seed: int = 0) -> DiffusionPipeline:
    """The tiny pipeline of `model`'s family (FLUX.1's serves dev, schnell and krea alike)."""
    family = MODELS[model].family
    if family == FluxFamily.FLUX_1:
        return build_tiny_pipeline(seed=seed)
    if family == FluxFamily.FLUX_2_KLEIN:
        return build_tiny_klein(seed=seed)
    if family == FluxFamily.FLUX_2:
        return build_tiny_flux2_dev(seed=seed)
    raise FarmError(f"no tiny pipeline of {model.value} yet: flux.1-dev, -schnell, -krea-dev and the FLUX.2 models")


def write_tiny_model(
    out_dir: Path, levels: Sequence[QuantLevel] = (), seed: int = 0, model: FluxModel = FluxModel.FLUX_1_DEV
) -> Path:
    """Write a diffusers folder of `model`'s family usable as `--model` (with FLUXFARM_MODEL_NAME), plus
    one GGUF transformer file per level."""
    return write_model_folder(out_dir, build_tiny(model, seed), model, levels, {"seed": seed, "size": "tiny"})


def write_model_folder(
    out_dir: Path,
    pipe: DiffusionPipeline,
    model: FluxModel,
    levels: Sequence[QuantLevel],
    about: dict[str, object],
    device: str = "cpu",
) -> Path:
    """Write `pipe` (random weights) as a diffusers folder, one GGUF transformer per level (quantized on
    `device`) and a marker saying it renders noise; atomically, and never over a folder that is not one."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / _MARKER).exists():
        raise FileExistsError(f"{out_dir} exists and is not a fluxfarm random model; refusing to overwrite it")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    for level in levels:
        write_gguf(pipe.transformer.state_dict(), level, gguf_path(staging, level), device=device)
    if levels:  # FLUXFARM_CATALOG: where a worker of this folder finds each level (paths as they will be)
        final = out_dir.resolve()
        entries = [f"{level.value} = {json.dumps(str(gguf_path(final, level)))}" for level in levels]
        (staging / CATALOG_FILE).write_text("\n".join([f"[models.{json.dumps(str(final))}]", *entries, ""]))
    marker = {"model": model.value, **about, "levels": [level.value for level in levels], "renders": "noise"}
    (staging / _MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return out_dir
