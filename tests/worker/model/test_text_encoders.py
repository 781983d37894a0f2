"""Trimming a FLUX.2 text encoder to the layers its pipeline reads changes no embedding and drops the rest."""

from __future__ import annotations

import torch

from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.models import FluxFamily
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import ENCODER_LAYERS_READ
from fluxfarm.worker.model.text_encoders import trim_text_encoder
from fluxfarm.worker.tools.tiny_flux2 import build_tiny_flux2_dev, build_tiny_klein


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
    encoder = build_tiny_flux2_dev().text_encoder.eval()  # Mistral3, FLUX.2 [dev]'s 40 layers at width 32
    ids = torch.randint(20, 500, (2, 9))
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
