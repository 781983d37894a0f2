"""CUDA-graph replay of the transformer step: same numbers as eager, recaptured when weights move."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from fluxfarm.worker.fast.step_graphs import step_graphs, use_step_graphs
from fluxfarm.worker.model.host_mirror import HostMirror
from fluxfarm.worker.tools.vram_probe import step_inputs


def _tiny(tiny_model, device: str) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", dtype=torch.float32).to(device)


def test_on_a_cpu_steps_run_eagerly_held_off_or_not_and_uninstall_restores_forward(tiny_model) -> None:
    model = _tiny(tiny_model, "cpu")
    inputs = step_inputs(dict(model.config), 128, 128, 1, "cpu", torch.float32)
    with torch.inference_mode():
        want = model(**inputs)[0]
        graphs = use_step_graphs(model)
        assert use_step_graphs(model) is graphs and step_graphs(model) is graphs
        got = model(**inputs)[0]
    assert torch.equal(got, want) and graphs.captures == 0 and graphs.replays == 0
    assert graphs.eager == {"encoder_hidden_states off the GPU": 1}  # the first tensor argument, by name
    with torch.inference_mode():
        model(inputs["hidden_states"], **{k: v for k, v in inputs.items() if k != "hidden_states"})
    assert graphs.eager["positional arguments"] == 1
    with torch.inference_mode():
        graphs.hold_off("no room")  # the engine's: eager, counted under its reason, whatever the arguments
        held = model(**inputs)[0]
        graphs.hold_off("")
        model(**inputs)
    assert torch.equal(held, want) and graphs.eager["no room"] == 1
    assert graphs.eager["encoder_hidden_states off the GPU"] == 2
    graphs.uninstall()
    assert step_graphs(model) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; tests/gpu runs this on the device")
def test_replayed_steps_equal_eager_ones_and_survive_a_weight_move(tiny_model) -> None:
    model = _tiny(tiny_model, "cuda")
    torch.manual_seed(0)
    # As FluxPipeline calls it: `joint_attention_kwargs={}` on every step.
    first = {**step_inputs(dict(model.config), 128, 128, 1, "cuda", torch.float32), "joint_attention_kwargs": {}}
    second = {**step_inputs(dict(model.config), 128, 128, 1, "cuda", torch.float32), "joint_attention_kwargs": {}}
    with torch.inference_mode():
        want = [model(**first)[0], model(**second)[0]]
        graphs = use_step_graphs(model)
        got = [model(**first)[0], model(**second)[0]]
        assert graphs.captures == 1 and graphs.replays == 2 and not graphs.eager
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        mirror = HostMirror(model)
        graphs.release()
        mirror.to_host()
        mirror.to_device("cuda")
        again = model(**second)[0]
    assert graphs.captures == 2
    torch.testing.assert_close(again, want[1], rtol=1e-5, atol=1e-5)


def test_a_dict_of_plain_values_is_part_of_the_signature() -> None:
    """FluxPipeline passes `joint_attention_kwargs={}` on every step: a FLUX.1 worker's steps replay only if
    such a dict is a plain argument (run 14b: "joint_attention_kwargs a dict 28", no replay at all)."""
    from fluxfarm.worker.fast.step_graphs import StepGraphs

    empty, _ = StepGraphs._signature({"joint_attention_kwargs": {}, "return_dict": False})
    scaled, _ = StepGraphs._signature({"joint_attention_kwargs": {"scale": 0.5}, "return_dict": False})
    assert empty is not None and scaled is not None and empty != scaled, "another value captures another graph"
    assert StepGraphs._signature({"joint_attention_kwargs": {"scale": 0.5}}) == (scaled[:1], "")
    held, why = StepGraphs._signature({"joint_attention_kwargs": {"ip_adapter_image_embeds": torch.zeros(1)}})
    assert held is None and why == "joint_attention_kwargs a dict"
