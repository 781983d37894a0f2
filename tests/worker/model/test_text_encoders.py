"""Trimming a FLUX.2 text encoder to the layers its pipeline reads changes no embedding and drops the rest."""

from __future__ import annotations

import copy

import torch
from diffusers.quantizers.gguf.utils import GGUFLinear
from transformers import Qwen3Config, Qwen3ForCausalLM

from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.models import FluxFamily
from fluxfarm.worker.model.families import FAMILIES
from fluxfarm.worker.model.flux2_arch import ENCODER_LAYERS_READ
from fluxfarm.worker.model.text_encoders import store_text_encoder, trim_text_encoder
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


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@torch.inference_mode()
def test_an_encoder_stored_at_fp8_and_q4k_keeps_its_hidden_states_close_and_q4k_takes_the_fewest_bytes() -> None:
    """Qwen3 at a width whose rows hold whole Q4_K blocks (256; the tiny pipelines' 32 holds none)."""
    config = Qwen3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = Qwen3ForCausalLM(config).eval()
    trim_text_encoder(reference, (1, 2, 3))  # the language head goes, as in every FLUX.2 encoder
    ids = torch.randint(0, 512, (2, 24))

    def hidden(encoder: torch.nn.Module) -> torch.Tensor:
        out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
        return torch.stack(out.hidden_states[1:], dim=1)

    want = hidden(reference)
    errors, sizes = {}, {}
    for precision in ("bf16", "fp8", "Q4_K"):
        encoder = store_text_encoder(copy.deepcopy(reference), precision, torch.float32)
        errors[precision] = _relative_error(hidden(encoder), want)
        sizes[precision] = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    quantized = [m for m in encoder.modules() if isinstance(m, GGUFLinear)]
    assert len(quantized) == 7 * config.num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    assert quantized[0].weight.quant_type.name == "Q4_K"
    # Random weights have no structure for a quantizer to keep, which exaggerates both errors (fp8 ~8%,
    # Q4_K ~19% here); a wrong block layout or scale gives ~100%.
    assert errors["bf16"] == 0.0 < errors["fp8"] < errors["Q4_K"] < 0.3, errors
    assert sizes["Q4_K"] < sizes["fp8"] < sizes["bf16"], sizes
