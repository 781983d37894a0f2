"""Trimming a FLUX.2 text encoder to the layers its pipeline reads changes no embedding and drops the rest."""

from __future__ import annotations

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.models import FluxFamily
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import ENCODER_LAYERS_READ
from fluxfarm.worker.model.text_encoders import trim_text_encoder
from fluxfarm.worker.tools.tiny_flux2 import build_tiny_klein


@torch.inference_mode()
def test_a_trimmed_klein_encoder_gives_the_same_embeddings_with_fewer_layers() -> None:
    pipe = build_tiny_klein()
    jobs = [parse_job({"prompt": p, "model": "flux.2-klein-4b"}) for p in ("a red kite", "two boats at dusk")]
    ops = FAMILIES[FluxFamily.FLUX_2_KLEIN]
    before = ops.encode(pipe, jobs, torch.device("cpu"), 64)
    layers = len(pipe.text_encoder.model.layers)
    dropped = trim_text_encoder(pipe.text_encoder, ENCODER_LAYERS_READ[FluxFamily.FLUX_2_KLEIN])
    after = ops.encode(pipe, jobs, torch.device("cpu"), 64)
    assert (layers, len(pipe.text_encoder.model.layers)) == (36, 27)
    assert dropped > 0
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old.prompt, new.prompt)


@torch.inference_mode()
def test_a_trimmed_mistral3_encoder_keeps_the_hidden_states_flux2_dev_reads_and_loses_its_vision_tower() -> None:
    torch.manual_seed(0)
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 40,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "vocab_size": 100,
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
        image_token_index=10,
    )
    encoder = Mistral3ForConditionalGeneration(config).eval()
    ids = torch.randint(11, 100, (2, 9))
    read = ENCODER_LAYERS_READ[FluxFamily.FLUX_2]

    def hidden() -> tuple[torch.Tensor, ...]:
        out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
        return tuple(out.hidden_states[k] for k in read)

    before = hidden()
    trim_text_encoder(encoder, read)
    after = hidden()
    assert len(encoder.model.language_model.layers) == 30
    assert encoder.model.vision_tower is None
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
