"""The job schema: deterministic ids, canonical form, and the bounds that keep bad input out."""

from __future__ import annotations

import hashlib
import json

import pytest

from fluxfarm.shared.celery_app import task_id
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import MAX_PROMPT_CHARS, RenderJob, canonical_job_id, parse_job
from fluxfarm.shared.models import FluxModel


def test_job_id_is_the_same_for_the_same_job_and_differs_for_any_change() -> None:
    base = {"prompt": "a fox", "seed": 1, "width": 512, "height": 768}
    assert parse_job(base).id == parse_job(dict(reversed(list(base.items())))).id
    changed = [
        {**base, "seed": 2},
        {**base, "width": 768, "height": 512},
        {**base, "prompt": "a fox "},
        {**base, "steps": 27},
        {**base, "guidance": 3.6},
        {**base, "dataset": "other"},
        {**base, "prompt_2": "a fox, T5"},
        {**base, "max_sequence_length": 256},
    ]
    ids = {parse_job(job).id for job in changed}
    assert parse_job(base).id not in ids
    assert len(ids) == len(changed)
    assert len(parse_job(base).id) == 32


def test_prompt_2_equal_to_prompt_is_the_same_job_as_none() -> None:
    assert parse_job({"prompt": "a", "prompt_2": "a"}) == parse_job({"prompt": "a"})


def test_an_explicit_job_id_is_kept_and_checked() -> None:
    assert parse_job({"prompt": "a", "job_id": "my-job.1"}).id == "my-job.1"
    for unsafe in ("../x", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(InvalidJob, match="job_id"):
            parse_job({"prompt": "a", "job_id": unsafe})


def test_a_validated_job_round_trips_through_json_unchanged() -> None:
    job = parse_job({"prompt": "ünïcode ✓", "seed": 2**32 - 1, "width": 2048, "height": 256, "steps": 100})
    assert RenderJob.model_validate_json(job.model_dump_json()) == job


@pytest.mark.parametrize(
    ("job", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a\x00b"}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"prompt": "a", "prompt_2": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt_2"),
        ({"prompt": "a", "guidance": float("nan")}, "guidance"),
        ({"prompt": "a", "max_sequence_length": 513}, "max_sequence_length"),
        ({"prompt": "a", "width": 1024.5}, "width"),
        ({"prompt": "a", "dataset": "/abs"}, "dataset"),
        ({"prompt": "a", "dataset": "a..b"}, "dataset"),
        ({"prompt": "a", "extra": 1}, "extra: unknown field"),
        ({"seed": 1}, "prompt: Field required"),
    ],
)
def test_bounds(job: dict, field: str) -> None:
    with pytest.raises(InvalidJob, match=field):
        parse_job(job)


def test_the_largest_valid_values_pass() -> None:
    job = parse_job({"prompt": "x" * MAX_PROMPT_CHARS, "seed": 2**32 - 1, "width": 2048, "height": 2048, "steps": 100})
    assert job.width == 2048 and job.seed == 2**32 - 1


def test_a_non_object_is_refused() -> None:
    with pytest.raises(InvalidJob, match="JSON object"):
        parse_job(["prompt"])  # type: ignore[arg-type]


ADAPTER_PROBLEMS = [
    ({"loras": [{"source": f"/loras/{i}.safetensors"} for i in range(5)]}, "loras: Tuple should have at most 4"),
    ({"loras": [{"source": "/loras/style.ckpt"}]}, "must be a .safetensors file"),
    ({"loras": [{"source": "https://example.com/style.safetensors"}]}, "must be hf://owner/repo/file"),
    ({"loras": [{"source": "loras/relative.safetensors"}]}, "absolute path"),
    ({"loras": [{"source": "/loras/a.safetensors", "weight": 5}]}, "less than or equal to 4"),
    ({"loras": [{"source": "/loras/a.safetensors", "scale": 1}]}, "unknown field"),
    ({"controlnet": {"source": "/cn", "control_image": "data:image/png;base64,AAAA"}}, "must be a PNG"),
    ({"controlnet": {"source": "/cn", "control_image": "data:image/png;base64," + "A" * 1_500_000}}, "at most 1 MiB"),
    (
        {"controlnet": {"source": "/cn", "control_image": "https://x.org/c.png"}},
        "must be s3://bucket/key, an absolute worker path",
    ),
    ({"controlnet": {"source": "/cn", "control_image": "/c.png", "conditioning_scale": 3}}, "less than or equal to 2"),
    # a key that climbs out of its bucket, or names no object, is refused at the schema
    ({"loras": [{"source": "s3://loras/../../etc/x.safetensors"}]}, "'..' path segment"),
    ({"loras": [{"source": "s3://loras/a//b.safetensors"}]}, "'..' path segment"),
    ({"loras": [{"source": "s3://loras/./b.safetensors"}]}, "'..' path segment"),
    ({"loras": [{"source": "hf://owner/repo/../x.safetensors"}]}, "'..' path segment"),
    ({"controlnet": {"source": "s3://nets/cn/../../x/", "control_image": "/c.png"}}, "'..' path segment"),
    ({"controlnet": {"source": "/cn", "control_image": "s3://imgs/../c.png"}}, "'..' path segment"),
]


def test_plain_remote_sources_still_pass() -> None:
    job = parse_job(
        {
            "prompt": "p",
            "loras": [{"source": "s3://loras/styles/a.safetensors"}, {"source": "hf://o/r@v1.0/dir/b.safetensors"}],
            "controlnet": {"source": "s3://nets/canny/", "control_image": "s3://imgs/x/c.png"},
        }
    )
    assert job.controlnet is not None and job.controlnet.source == "s3://nets/canny/"


@pytest.mark.parametrize(("fields", "reason"), ADAPTER_PROBLEMS)
def test_adapter_fields_are_bounded_and_their_sources_checked(fields: dict, reason: str) -> None:
    with pytest.raises(InvalidJob, match=reason):
        parse_job({"prompt": "p", **fields})


def test_adapter_fields_count_in_the_job_id_only_when_set() -> None:
    plain = parse_job({"prompt": "p", "seed": 1})
    before = ("job_id", "loras", "controlnet", "model", "images", "strength")
    params = {k: v for k, v in plain.model_dump(mode="json").items() if k not in before}
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert plain.id == hashlib.sha256(canonical.encode()).hexdigest()[:32], "ids of jobs from before LoRAs stand"
    assert parse_job({"prompt": "p", "seed": 1, "loras": []}).id == plain.id
    lora = {"source": "hf://owner/repo/style.safetensors", "weight": 0.7}
    other = {"source": "s3://loras/subject.safetensors", "weight": 1.0}
    with_lora = parse_job({"prompt": "p", "seed": 1, "loras": [lora]})
    assert with_lora.id != plain.id
    assert with_lora.lora_set is not None and plain.lora_set is None
    one_way = parse_job({"prompt": "p", "loras": [lora, other]})
    assert one_way.lora_set == parse_job({"prompt": "p", "loras": [other, lora]}).lora_set


def test_an_explicit_id_of_content_id_shape_must_be_the_jobs_own() -> None:
    job = parse_job({"prompt": "p"})
    assert job.id == canonical_job_id(job) and not job.named
    assert parse_job({"prompt": "p", "job_id": job.id}) == job
    assert parse_job({"prompt": "p", "job_id": "md5-" + "0" * 32}).named
    with pytest.raises(InvalidJob, match="shape of a content id"):
        parse_job({"prompt": "p", "job_id": "0" * 32})


def test_task_ids_differ_between_datasets() -> None:
    assert task_id("a", "x") != task_id("b", "x")


def test_near_equal_lora_weights_are_one_job_and_one_fused_set() -> None:
    """Issue 18, finding 5: weights 1.0, 0.999, 0.998 ... each cost a fuse and a transformer's worth of cache."""
    jobs = [
        parse_job({"prompt": "p", "loras": [{"source": "/l/a.safetensors", "weight": w}]})
        for w in (1.0, 0.999, 0.998, 1.004)
    ]
    assert {job.id for job in jobs} == {jobs[0].id} and {job.lora_set for job in jobs} == {jobs[0].lora_set}
    assert jobs[1].loras[0].weight == 1.0
    assert parse_job({"prompt": "p", "loras": [{"source": "/l/a.safetensors", "weight": 0.75}]}).loras[0].weight == 0.75
    zero = parse_job({"prompt": "p", "loras": [{"source": "/l/a.safetensors", "weight": -0.001}]})
    assert str(zero.loras[0].weight) == "0.0"


def test_a_job_names_its_model_and_gets_that_models_defaults_queue_and_id() -> None:
    plain = parse_job({"prompt": "p", "seed": 1})
    assert plain.model == FluxModel.FLUX_1_DEV and (plain.steps, plain.guidance) == (28, 3.5)
    assert parse_job({"prompt": "p", "seed": 1, "model": "flux.1-dev"}).id == plain.id, "ids from before models stand"
    klein = parse_job({"prompt": "p", "seed": 1, "model": "flux.2-klein-4b"})
    assert (klein.steps, klein.guidance, klein.queue) == (4, 1.0, "render.flux2-klein-4b.any")
    assert klein.id != plain.id
    assert parse_job({"prompt": "p", "seed": 1, "model": "flux.2-klein-4b", "steps": 8}).steps == 8
    assert parse_job({"prompt": "p", "quant": "min:Q8_0", "model": "flux.2-dev"}).queue == "render.flux2-dev.min.q8_0"
    # A producer's default model fills a job that names none, dict or RenderJob alike, with that model's defaults.
    schnell = parse_job(RenderJob(prompt="p", seed=1), FluxModel.FLUX_1_SCHNELL)
    assert (schnell.model, schnell.steps, schnell.guidance) == (FluxModel.FLUX_1_SCHNELL, 4, 0.0)
    assert schnell.id == parse_job({"prompt": "p", "seed": 1}, FluxModel.FLUX_1_SCHNELL).id
    assert parse_job(plain, FluxModel.FLUX_1_SCHNELL).model == FluxModel.FLUX_1_SCHNELL
    assert parse_job({"prompt": "p", "model": "flux.1-dev"}, FluxModel.FLUX_1_SCHNELL).model == FluxModel.FLUX_1_DEV


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"model": "flux.3-pro"}, "model: Input should be"),
        ({"model": "flux.2-dev", "prompt_2": "t5 words"}, "prompt_2: flux.2-dev reads one prompt"),
        (
            {
                "model": "flux.2-klein-4b",
                "controlnet": {"source": "s3://nets/canny/", "control_image": "s3://imgs/x/c.png"},
            },
            "controlnet: FLUX ControlNets condition FLUX.1",
        ),
        (
            {"images": ["s3://imgs/a.png", "s3://imgs/b.png"]},
            r"images: flux.1-dev reads at most 1 \(img2img\), 2 given",
        ),
        (
            {"model": "flux.1-kontext-dev", "images": ["s3://imgs/a.png", "s3://imgs/b.png"]},
            r"images: flux.1-kontext-dev reads at most 1 \(edit\)",
        ),
        ({"strength": 0.5}, "strength: only a FLUX.1 img2img job"),
        ({"model": "flux.2-dev", "images": ["s3://imgs/a.png"], "strength": 0.5}, "strength: only a FLUX.1 img2img"),
        ({"images": ["s3://imgs/a.png"], "strength": 0.0}, "strength: Input should be greater than 0"),
    ],
)
def test_a_job_is_checked_against_its_model_family(fields: dict, reason: str) -> None:
    with pytest.raises(InvalidJob, match=reason):
        parse_job({"prompt": "p", **fields})


def test_image_jobs_of_each_family_and_their_ids() -> None:
    """FLUX.1 takes one img2img source (strength counts in the id only when given), Kontext one image to
    edit, FLUX.2 up to four references."""
    img2img = parse_job({"prompt": "p", "images": ["s3://imgs/a.png"]})
    assert img2img.strength is None
    assert parse_job({"prompt": "p", "images": ["s3://imgs/a.png"], "strength": 0.6}).id != img2img.id
    refs = [f"s3://imgs/{n}.png" for n in "abcd"]
    assert parse_job({"prompt": "p", "model": "flux.2-klein-4b", "images": refs}).images == tuple(refs)
    with pytest.raises(InvalidJob, match="images: Tuple should have at most 4 items"):
        parse_job({"prompt": "p", "model": "flux.2-dev", "images": [*refs, "s3://imgs/e.png"]})
