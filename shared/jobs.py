"""The render job: the one schema that producer, queue and worker agree on.

A job's id is the hash of its canonical parameters, so resubmits and redeliveries of the same job
land on the same storage key: idempotent by construction.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)

from fluxfarm.shared.adapters import (
    MAX_INPUT_IMAGES,
    MAX_LORAS,
    ControlNetSpec,
    LoraSpec,
    check_image_source,
    lora_set_id,
)
from fluxfarm.shared.errors import FarmError, InvalidJob
from fluxfarm.shared.models import LEGACY_MODEL, MODELS, FluxModel, ImageUse
from fluxfarm.shared.routing import AUTO, QuantConstraint, lora_queue, parse_constraint
from fluxfarm.shared.validation_errors import describe_validation_error, validation_problems

MAX_PROMPT_CHARS = 4000
"""CLIP reads 77 tokens and T5 at most 512; 4,000 characters is well past either, so longer is a mistake."""

MIN_SIDE_PX = 256
MAX_SIDE_PX = 2048
SIDE_MULTIPLE_PX = 16
"""FLUX packs 2x2 patches of an 8x-downsampled latent, so sides must be multiples of 16."""

MAX_SEED = 2**32 - 1
MAX_STEPS = 100
MAX_T5_TOKENS = 512

SAFE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Dataset names and job ids become storage key segments: no slashes, no leading dot, no '..'."""
_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)
_JOB_ID_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern
_CONTENT_ID = re.compile(rf"[0-9a-f]{{{_JOB_ID_CHARS}}}")
"""The shape of a content id. An explicit job_id of this shape must be the job's own content id, so a
content id always names the one job whose parameters hash to it (no one can pre-fill it)."""

DEFAULT_DATASET = "default"


def _check_safe_name(value: str, what: str) -> str:
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit and contain no '..'"
        )
    return value


def _check_text(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


def parse_dataset_name(value: str) -> str:
    """A dataset name given on its own (CLI options, exports): the same rule as the job field."""
    try:
        return _check_safe_name(value, "dataset name")
    except ValueError as error:
        raise InvalidJob(str(error)) from None


def parse_job_id(value: str) -> str:
    """A job id given on its own (a URL's path): the same rule as the job field."""
    try:
        return _check_safe_name(value, "job_id")
    except ValueError as error:
        raise InvalidJob(str(error), (("job_id", str(error)),)) from None


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class RenderJob(BaseModel):
    """One image to render. Unknown fields are refused, every bound is enforced."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt
    prompt_2: Prompt | None = Field(
        default=None, description="FLUX.1 only: the prompt for the T5 encoder; the CLIP prompt is used when absent."
    )
    model: FluxModel = Field(
        default=LEGACY_MODEL,
        description="The model to render with (shared/models.py); producers fill in FLUXFARM_DEFAULT_MODEL.",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    width: int = Field(default=1024, ge=MIN_SIDE_PX, le=MAX_SIDE_PX, multiple_of=SIDE_MULTIPLE_PX)
    height: int = Field(default=1024, ge=MIN_SIDE_PX, le=MAX_SIDE_PX, multiple_of=SIDE_MULTIPLE_PX)
    steps: int = Field(default=28, ge=1, le=MAX_STEPS, description="Defaults to the model's (4 for schnell, klein).")
    guidance: float = Field(default=3.5, ge=0.0, le=30.0, allow_inf_nan=False, description="Defaults to the model's.")
    max_sequence_length: int = Field(default=512, ge=1, le=MAX_T5_TOKENS)
    dataset: str = DEFAULT_DATASET
    quant: str = Field(default=AUTO, description="auto (any level), min:LEVEL (that level or better) or exact:LEVEL.")
    loras: tuple[LoraSpec, ...] = Field(default=(), max_length=MAX_LORAS, description="LoRAs fused into the weights.")
    controlnet: ControlNetSpec | None = Field(default=None, description="A ControlNet and its control image.")
    images: tuple[str, ...] = Field(
        default=(),
        max_length=MAX_INPUT_IMAGES,
        description="Input images in the forms of controlnet.control_image: FLUX.1's img2img source (one), "
        "Kontext's image to edit (one), FLUX.2's reference images (up to 4).",
    )
    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="FLUX.1 img2img: how far the image is noised (1.0 ignores it); 0.6 when left out.",
    )
    job_id: str | None = Field(default=None, description="Defaults to the hash of the other fields.")

    @field_validator("prompt", "prompt_2")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None:
            _check_text(value, "prompt")
            if not value.strip():
                raise ValueError("prompt must not be blank")
        return value

    @field_validator("quant")
    @classmethod
    def _known_constraint(cls, value: str) -> str:
        try:
            return str(parse_constraint(value))
        except FarmError as error:
            raise ValueError(str(error)) from None

    @property
    def constraint(self) -> QuantConstraint:
        return parse_constraint(self.quant)

    @field_validator("images")
    @classmethod
    def _image_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_image_source(source, f"images.{index}") for index, source in enumerate(value))

    @field_validator("dataset")
    @classmethod
    def _safe_dataset(cls, value: str) -> str:
        return _check_safe_name(value, "dataset")

    @field_validator("job_id")
    @classmethod
    def _safe_job_id(cls, value: str | None) -> str | None:
        return None if value is None else _check_safe_name(value, "job_id")

    @model_validator(mode="before")
    @classmethod
    def _canonical_prompt_2(cls, data: Any) -> Any:
        # prompt_2 equal to prompt renders exactly like no prompt_2: one canonical form, one id.
        if isinstance(data, dict) and data.get("prompt_2") is not None and data.get("prompt_2") == data.get("prompt"):
            data = {**data, "prompt_2": None}
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _model_defaults(cls, data: Any, handler: ModelWrapValidatorHandler[RenderJob]) -> RenderJob:
        """Steps and guidance a job leaves out are its model's, and still count as left out (parse_job may
        build the job again for another model). A bad model name is the field's error."""
        missing: dict[str, Any] = {}
        if isinstance(data, dict):
            try:
                spec = MODELS[FluxModel(data.get("model", LEGACY_MODEL))]
                missing = {name: value for name, value in (("steps", spec.steps), ("guidance", spec.guidance))}
                missing = {name: value for name, value in missing.items() if data.get(name) is None}
            except ValueError:
                pass
        job = handler({**missing, **data} if missing else data)
        job.__pydantic_fields_set__.difference_update(missing)
        return job

    @model_validator(mode="after")
    def _fits_its_model(self) -> RenderJob:
        spec = MODELS[self.model]
        if self.prompt_2 is not None and not spec.two_prompts:
            raise ValueError(f"prompt_2: {self.model.value} reads one prompt (FLUX.2 has one text encoder)")
        if len(self.images) > spec.max_images:
            raise ValueError(
                f"images: {self.model.value} reads at most {spec.max_images} ({spec.image_use.value}), "
                f"{len(self.images)} given"
            )
        if self.strength is not None and not (self.images and spec.image_use == ImageUse.IMG2IMG):
            raise ValueError("strength: only a FLUX.1 img2img job (a FLUX.1 model and an image) reads it")
        if self.controlnet is not None and not spec.controlnets:
            raise ValueError(f"controlnet: FLUX ControlNets condition FLUX.1 text-to-image, not {self.model.value}")
        return self

    @model_validator(mode="after")
    def _fill_job_id(self) -> RenderJob:
        if self.job_id is None:
            object.__setattr__(self, "job_id", canonical_job_id(self))
        elif _CONTENT_ID.fullmatch(self.job_id) and self.job_id != canonical_job_id(self):
            raise ValueError(
                f"job_id {self.job_id!r} has the shape of a content id (32 hex digits) but is not this "
                "job's: leave job_id out, or name the job in another shape (e.g. 'img-' before it)"
            )
        return self

    @property
    def named(self) -> bool:
        """True when the job's id is a name its submitter chose rather than its content id: only then
        can a stored or queued job under that id have other parameters."""
        return not _CONTENT_ID.fullmatch(self.id)

    @property
    def lora_set(self) -> str | None:
        """Which fused weights the job needs (None: the base weights)."""
        return lora_set_id(self.loras)

    @property
    def queue(self) -> str:
        """The queue the job is sent to: its model's and constraint's, or its LoRA set's under it."""
        return lora_queue(self.constraint.queue_for(self.model), self.lora_set)

    @property
    def id(self) -> str:
        """The job id, always set after validation (typed as `str`, unlike the optional field)."""
        assert self.job_id is not None
        return self.job_id


def canonical_job_id(job: RenderJob) -> str:
    """The hash of the job's canonical parameters: same job, same id, on every machine. Adapter and image
    fields (and strength) count only when set, and the model only when it is not FLUX.1 [dev], so jobs
    written before they existed keep their ids (and their stored results)."""
    unset = {name for name in ("loras", "controlnet", "images") if not getattr(job, name)}
    if job.strength is None:
        unset.add("strength")
    if job.model == LEGACY_MODEL:
        unset.add("model")
    params = job.model_dump(mode="json", exclude={"job_id", *unset})
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_JOB_ID_CHARS]


_EMPTY_DEFAULTS = frozenset(
    name for name, field in RenderJob.model_fields.items() if field.default is None or field.default == ()
)
"""RenderJob's fields whose default is empty: left out of a job's payload when they are."""


def job_payload(job: RenderJob) -> dict[str, Any]:
    """The job as its message and its dataset record carry it: fields at an empty default (no prompt_2, LoRAs,
    ControlNet, images or strength) left out, which parse back to the same job; about 75 bytes less a queued
    job, in the queue and in the record. Fields whose default depends on the model (steps, guidance) stay."""
    return {
        name: value
        for name, value in job.model_dump(mode="json").items()
        if not (name in _EMPTY_DEFAULTS and value in (None, []))
    }


def parse_jobs(items: Iterable[RenderJob | Mapping[str, Any]], model: FluxModel | None = None) -> list[RenderJob]:
    """Every job validated, or InvalidJob naming each bad one (`job 3: width: ...`, field `3.width`):
    a batch is sent whole or not at all. `model`: as parse_job's."""
    jobs: list[RenderJob] = []
    lines: list[str] = []
    problems: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        try:
            jobs.append(parse_job(dict(item) if isinstance(item, Mapping) else item, model))
        except InvalidJob as error:
            lines.append(f"job {index}: {error}")
            problems += [(f"{index}.{field}", reason) for field, reason in error.problems or (("job", str(error)),)]
    if lines:
        raise InvalidJob("; ".join(lines), tuple(problems))
    return jobs


def parse_job(data: RenderJob | dict[str, Any], model: FluxModel | None = None) -> RenderJob:
    """Validate anything that claims to be a job, raising `InvalidJob` with a readable reason. `model` is
    the model of a job that names none (a producer's FLUXFARM_DEFAULT_MODEL)."""
    if isinstance(data, RenderJob):
        if model is None or "model" in data.model_fields_set or data.model == model:
            return data
        # Built in Python without a model: built again as `model`'s, with its steps, guidance and content id.
        data = data.model_dump(mode="json", include=data.model_fields_set)
    if not isinstance(data, dict):
        raise InvalidJob(f"a job must be a JSON object, not {type(data).__name__}")
    if model is not None and "model" not in data:
        data = {**data, "model": model}
    try:
        return RenderJob.model_validate(data)
    except ValidationError as error:
        raise InvalidJob(describe_validation_error(error), validation_problems(error)) from None
