"""The VRAM policy: monotonic in memory, honest about what fits, sizes equal to the architecture's."""

from __future__ import annotations

import json

import pytest

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.models import FluxModel
from fluxfarm.worker.model.plan import (
    EXTRA_IMAGE_STEP_GIB,
    MAX_PLANNED_BATCH,
    Optimize,
    PlanInputs,
    _interpolate,
    _ladder,
    decode_working_gib,
    fuse_working_gib,
    headroom_gib,
    make_plan,
    step_working_gib,
)
from tests.conftest import run_fluxfarm

BUDGETS = [b / 2 for b in range(4, 200)]  # 2 .. 99.5 GiB


@pytest.mark.parametrize("capability", [(9, 0), (8, 6)])
@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (1536, 640)])
@pytest.mark.parametrize("model", [FluxModel.FLUX_1_DEV, FluxModel.FLUX_2_KLEIN_4B, FluxModel.FLUX_2_KLEIN_9B])
@pytest.mark.parametrize("optimize", list(Optimize))
def test_more_vram_never_means_a_worse_level_and_every_plan_fits(
    capability: tuple[int, int], size: tuple[int, int], model: FluxModel, optimize: Optimize
) -> None:
    """Worse by the policy's own order: quality's ladder, or throughput's (fp8 first where it runs)."""
    order = _ladder(optimize, capability)
    previous_rank = len(QuantLevel)
    chosen = set()
    for budget in BUDGETS:
        try:
            plan = make_plan(
                PlanInputs(
                    vram_gib=budget,
                    width=size[0],
                    height=size[1],
                    compute_capability=capability,
                    model=model,
                    optimize=optimize,
                )
            )
        except FarmError:
            assert not chosen, f"{budget} GiB fits nothing though a smaller budget did"
            continue
        rank = order.index(QuantLevel(plan.level))
        assert rank <= previous_rank, (budget, plan.level)
        assert plan.predicted_peak_gib + headroom_gib(budget) <= budget
        previous_rank = rank
        chosen.add(plan.level)
    assert order[0].value in chosen and "Q2_K" in chosen
    assert ("fp8" in chosen) == (capability >= (8, 9))
    fp8_first = optimize == Optimize.THROUGHPUT and capability >= (8, 9)
    assert ("bf16" in chosen) != fp8_first, "throughput never picks bf16 where fp8, smaller and faster, runs"


def test_the_plan_places_text_encoders_by_what_fits() -> None:
    big = make_plan(PlanInputs(vram_gib=80, gpu_name="NVIDIA H100 80GB HBM3", optimize=Optimize.QUALITY))
    assert (big.level, big.text_encoders, big.vae_tiling) == ("bf16", "gpu", False)
    card_12 = make_plan(PlanInputs(vram_gib=12, gpu_name="NVIDIA GeForce RTX 3060"))
    assert card_12.level == "Q6_K" and card_12.text_encoders != "gpu"
    assert any("encoders resident would peak" in reason for reason in card_12.reasons)


def test_a_forced_level_that_cannot_fit_fails_with_the_numbers() -> None:
    with pytest.raises(
        FarmError,
        match=r"nothing of flux.1-dev fits 12\.0 GiB at 1024x1024 at level bf16: bf16: even 22\.\d+ GiB does not fit",
    ):
        make_plan(PlanInputs(vram_gib=12, forced_level=QuantLevel.BF16))
    assert make_plan(PlanInputs(vram_gib=12, forced_level=QuantLevel.Q4_K)).level == "Q4_K"


def test_fp8_needs_fp8_tensor_cores() -> None:
    ampere = make_plan(PlanInputs(vram_gib=24, gpu_name="NVIDIA GeForce RTX 3090"))
    ada = make_plan(PlanInputs(vram_gib=24, gpu_name="NVIDIA GeForce RTX 4090"))
    assert (ampere.level, ada.level) == ("Q8_0", "fp8")
    assert any("fp8: needs fp8 tensor cores" in reason for reason in ampere.reasons)


def test_plan_command_prints_the_decision_as_json() -> None:
    done = run_fluxfarm("plan", "--vram-gib", "24", "--gpu", "RTX 4090", timeout=60)
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert {"level", "predicted_peak_gib", "text_encoders", "reasons"} <= set(decision)
    assert decision["level"] == "fp8"
    refused = run_fluxfarm("plan", "--vram-gib", "8", "--level", "Q8_0", timeout=60)
    assert refused.returncode == 1 and "nothing of flux.1-dev fits 8.0 GiB" in refused.stderr


@pytest.mark.parametrize("level", [QuantLevel.BF16, QuantLevel.Q8_0, QuantLevel.Q4_K, QuantLevel.Q2_K])
def test_the_plan_counts_the_working_memory_of_a_lora_fuse(level: QuantLevel) -> None:
    """Issue 18, finding 9: the plan counted no adapter, so a LoRA job on a card planned to the edge ran out
    of memory fusing. At 512² a K-quant's fuse (1.38 GiB, measured) needs more than its step."""
    plan = make_plan(PlanInputs(vram_gib=140, width=512, height=512, forced_level=level))
    parts = plan.components_gib
    assert parts["lora_fuse"] == fuse_working_gib(level) > 0
    assert plan.predicted_peak_gib >= parts["transformer"] + parts["vae"] + parts["lora_fuse"] - 1e-3


@pytest.mark.parametrize("budget", [24, 48, 80, 141])
def test_flux2_dev_plans_keep_the_transformer_resident_and_place_its_encoder(budget: int) -> None:
    """Mistral-Small-3.1 is bigger than FLUX.1's whole stack: below ~100 GiB the plan keeps it in fp8 or
    moves it per encode phase; the transformer stays on the card for denoising at every budget."""
    plan = make_plan(
        PlanInputs(vram_gib=budget, model=FluxModel.FLUX_2_DEV, gpu_name="NVIDIA H200", optimize=Optimize.QUALITY)
    )
    assert plan.predicted_peak_gib + headroom_gib(budget) <= budget
    assert plan.components_gib["transformer"] + plan.components_gib["step"] <= plan.predicted_peak_gib
    if budget == 141:
        assert (plan.level, plan.text_encoders, plan.text_encoder_precision) == ("bf16", "gpu", "bf16")
    if budget == 24:
        assert plan.text_encoders != "gpu" and QuantLevel(plan.level).is_gguf
    assert any("scaled from FLUX.1" in reason for reason in plan.reasons)


def test_an_fp8_encoder_is_chosen_before_moving_it() -> None:
    """klein-9B at 24 GiB: bf16 transformer and bf16 Qwen3-8B do not fit together, fp8 Qwen3-8B does."""
    plan = make_plan(
        PlanInputs(vram_gib=32, model=FluxModel.FLUX_2_KLEIN_9B, gpu_name="RTX 5090", optimize=Optimize.QUALITY)
    )
    assert (plan.level, plan.text_encoders, plan.text_encoder_precision) == ("bf16", "gpu", "fp8")


def test_a_q4k_encoder_is_swapped_in_where_fp8_cannot_come_in_and_never_before_fp8() -> None:
    """FLUX.2 [dev] on a 16 GiB card: fp8 Mistral (16.8 GiB) cannot come in, so the plan had the CPU encode
    (half a minute a prompt); its Q4_K copy (10 GiB) is swapped in. Where fp8 or bf16 can be swapped, they are."""
    small = make_plan(PlanInputs(vram_gib=16, model=FluxModel.FLUX_2_DEV, gpu_name="RTX 4080"))
    assert (small.text_encoders, small.text_encoder_precision) == ("gpu-swap", "Q4_K")
    assert small.components_gib["text_encoders"] == pytest.approx(9.985)
    for budget in (24, 48):
        plan = make_plan(PlanInputs(vram_gib=budget, model=FluxModel.FLUX_2_DEV, gpu_name="NVIDIA H200"))
        assert plan.text_encoder_precision in ("bf16", "fp8"), budget
    assert make_plan(PlanInputs(vram_gib=16, gpu_name="RTX 4080")).text_encoder_precision == "bf16"  # FLUX.1


def test_a_flux1_plan_keeps_its_encoders_in_bf16() -> None:
    for budget in (8, 12, 24, 80):
        assert make_plan(PlanInputs(vram_gib=budget, gpu_name="RTX 4090")).text_encoder_precision == "bf16"


def test_plan_command_plans_for_the_named_model() -> None:
    done = run_fluxfarm("plan", "--model", "flux.2-klein-4b", "--vram-gib", "8", "--gpu", "RTX 4060", timeout=60)
    assert done.returncode == 0, done.stderr
    decision = json.loads(done.stdout)
    assert decision["components_gib"]["transformer"] < 4 and decision["text_encoder_precision"] in ("bf16", "fp8")
    unknown = run_fluxfarm("plan", "--model", "flux.3", "--vram-gib", "8", timeout=60)
    assert unknown.returncode != 0 and "flux.2-klein-4b" in unknown.stderr


@pytest.mark.parametrize(
    ("gpu", "budget", "quality", "throughput"),
    [
        ("NVIDIA H200", 141, "bf16", "fp8"),
        ("NVIDIA H100 80GB HBM3", 80, "bf16", "fp8"),
        ("NVIDIA GeForce RTX 4090", 24, "fp8", "fp8"),  # bf16 does not fit: fp8 is the best that does
        ("NVIDIA A100-SXM4-80GB", 80, "bf16", "bf16"),  # no fp8 tensor cores: both policies alike
        ("NVIDIA GeForce RTX 3060", 12, "Q6_K", "Q6_K"),
    ],
)
def test_the_policy_decides_what_comes_first(gpu: str, budget: int, quality: str, throughput: str) -> None:
    """Issue 21, point 1: `throughput` renders at fp8 where fp8 tensor cores run it, `quality` at the best
    level that fits; the default is throughput."""
    chosen = {o: make_plan(PlanInputs(vram_gib=budget, gpu_name=gpu, optimize=o)).level for o in Optimize}
    assert (chosen[Optimize.QUALITY], chosen[Optimize.THROUGHPUT]) == (quality, throughput)
    assert make_plan(PlanInputs(vram_gib=budget, gpu_name=gpu)).level == throughput
    forced = make_plan(PlanInputs(vram_gib=budget, gpu_name=gpu, forced_level=QuantLevel.Q4_K)).level
    assert forced == "Q4_K", "a forced level is the operator's, whatever the policy"


@pytest.mark.parametrize("model", [FluxModel.FLUX_1_DEV, FluxModel.FLUX_2_KLEIN_4B])
def test_the_planned_batch_is_the_largest_whose_step_fits(model: FluxModel) -> None:
    """Issue 21, point 2: the plan says how many images a denoising batch may hold at each size: each
    further image adds the activations measured per image (run 1), beside what stays resident."""
    for budget in (8, 12, 16, 24, 48, 80):
        try:
            plan = make_plan(PlanInputs(vram_gib=budget, model=model, gpu_name="RTX 4090"))
        except FarmError:
            continue
        usable = budget - headroom_gib(budget)
        previous = MAX_PLANNED_BATCH
        for width in (512, 768, 1024, 1536, 2048):
            batch = plan.batch_limit(width, width)
            pixels = width * width
            first = plan.step_scale * step_working_gib(QuantLevel(plan.level), pixels)
            extra = plan.step_scale * _interpolate(*EXTRA_IMAGE_STEP_GIB, pixels)

            fixed = plan.denoise_resident_gib + first
            assert batch == 1 or fixed + (batch - 1) * extra <= usable, (budget, width, batch)
            assert batch == MAX_PLANNED_BATCH or fixed + batch * extra > usable, (budget, width, batch)
            assert batch <= previous, "a larger image never batches more"
            previous = batch
            # A replayed step's pool stays reserved while the images decode: its batches keep room for both.
            graphed = plan.graph_batch_limit(width, width)
            beside = fixed + decode_working_gib(pixels, plan.vae_tiling)
            assert graphed <= batch
            assert graphed == 0 or beside + (graphed - 1) * extra <= usable, (budget, width, graphed)
            assert graphed == MAX_PLANNED_BATCH or beside + graphed * extra > usable, (budget, width, graphed)
        assert plan.max_batch_by_size["1024x1024"] == plan.batch_limit(1024, 1024) == plan.max_batch


def test_plan_command_reports_the_batch_per_size() -> None:
    done = run_fluxfarm("plan", "--vram-gib", "12", "--gpu", "RTX 3060", timeout=60)
    decision = json.loads(done.stdout)
    assert decision["max_batch"] >= 1 and decision["max_batch_by_size"]["512x512"] >= decision["max_batch"]
